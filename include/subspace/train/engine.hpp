#pragma once
// train::plan_engine: runs a Scheduler's compute plan (schedule::action values) on the model stages one rank
// holds. Every trainer's micro-batch loop is this one.
//
// Two modes, chosen by whether the caller passes a transport to run():
//
// Local (no transport: train::trainer, the data-parallel and gossip trainers). The rank holds the whole chain of
// stages, and forward(m) / backward(m) run micro-batch m through all of them, in order and in reverse; at each
// boundary the stack's Compressor encodes, and the next stage receives what it decoded (in memory).
//
// Pipelined (a transport: the pipeline trainer). The rank holds some stages of a longer chain — its model chunks,
// several of them with an interleaved schedule — and every action names one: forward(m, chunk) runs the chunk's
// stage alone; recv_activation decodes the payload the previous stage sent into the chunk's input,
// send_activation encodes the chunk's output and hands the payload to the transport, and recv_gradient /
// send_gradient do the same for dL/d(payload) backward (encode_backward on the sender's side, decode_backward on
// the receiver's). The transport (pipeline/transport.hpp) moves payloads between ranks; a receive returns once
// the data arrived, a send may still be in flight when it returns (the transport keeps its own copy). A
// zero-bubble plan splits a backward into backward_input (the input gradient: what the previous stage waits for)
// and backward_weight (the layers' weight products, run later in a bubble), for models that can
// (Model::splits_backward; nn::llama with its dense or subspace blocks).
//
// In both modes:
//   - The micro-batches of the step are read from the source at the start of run(), in id order, so every rank of
//     a pipeline reads the same batches (each stage needs the token ids; the last one the targets).
//   - Micro-batch m takes a free activation slot of every stage and keeps it until its last action in the plan.
//   - The loss of a micro-batch is scaled by 1/M, M the plan's micro-batches, so the accumulated gradients are
//     those of the mean loss over the step's micro-batches; run() returns that mean loss on the rank that holds
//     the head, 0 on the others.
//   - ready(first, last) is called during the last backward (or backward_weight, and for the tensors it completes,
//     backward_input) of each stage in the plan with the store indices whose gradients are complete (data-parallel
//     trainers launch buckets there); the compressor's tensors are reported once every boundary's backward of the
//     step is done. optimizer_step calls the trainer's step hook: step(loss) with the rank's mean loss over the
//     step's micro-batches when the hook takes it (optimizer_step closes a plan, so every forward has run), else
//     step().
//
// The compressor sees the micro-batch's token ids (one per row of the residual stream, in the executor's memory)
// and the rank's parameter store.

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../compress/concepts.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../data/loader.hpp"
#include "../schedule/concepts.hpp"

namespace subspace::train {

/// Where the plan's micro-batches come from: next(tokens, targets) fills host [B, S] buffers.
struct loader_source {
  data::batch_loader& loader;
  void next(view<std::int32_t, host_space> tokens, view<std::int32_t, host_space> targets) {
    loader.next(tokens, targets);
  }
  shape batch_shape() const { return shape{loader.options().batch, loader.options().seq}; }
};

/// The transport of the local mode: plans that move data between ranks are rejected.
struct no_transport {};

template <class Model, class Compressor>
class plan_engine {
 public:
  using executor_type = typename Model::executor_type;
  /// The element type of the stream between stages (and of the compressor's operands).
  using value_type = typename Model::boundary_type;
  using space = space_of_t<executor_type>;

  /// The engine of `stages`, the local stages in pipeline order (a whole model is one stage), with `compressor`
  /// at their boundaries; `compressor_parameters` are the store indices the compressor declared
  /// (compress::declare, before the store was allocated for training). Stages and compressor stay the caller's
  /// (a trainer's members); bind() points the engine at them again after the trainer moved.
  plan_engine(std::vector<Model>& stages, Compressor& compressor, compress::parameter_range compressor_parameters)
      : compressor_parameters_(compressor_parameters) {
    bind(stages, compressor);
  }
  void bind(std::vector<Model>& stages, Compressor& compressor) {
    require(!stages.empty(), "train::plan_engine: no model stages");
    stages_ = &stages;
    compressor_ = &compressor;
  }

  /// Runs `plan` (local mode) with micro-batches from `source`; calls ready(first, last) as gradients complete and
  /// step(loss) or step() at optimizer_step. Returns the mean loss over the plan's micro-batches.
  template <class Source, class Ready, class Step>
  double run(const std::vector<schedule::action>& plan, Source&& source, Ready&& ready, Step&& step) {
    return run(plan, source, ready, step, no_transport{});
  }

  /// Runs `plan`; with a transport other than no_transport, in the pipelined mode (see the top of this file).
  template <class Source, class Ready, class Step, class Transport>
  double run(const std::vector<schedule::action>& plan, Source&& source, Ready&& ready, Step&& step,
             Transport&& transport) {
    constexpr bool pipelined = !std::is_same_v<std::remove_cvref_t<Transport>, no_transport>;
    const plan_summary sum = summarise(plan, pipelined);
    read_batches(source, sum.microbatches);
    const float scale = float(1.0 / double(sum.microbatches));
    const auto noop = [](std::size_t, std::size_t) {};
    double loss = 0;
    for (std::size_t i = 0; i < plan.size(); ++i) {
      const schedule::action& a = plan[i];
      if (a.kind == schedule::action_kind::optimizer_step) {
        if constexpr (std::is_invocable_v<Step&, double>) step(loss / double(sum.microbatches));
        else step();
        continue;
      }
      flight& f = a.kind == schedule::action_kind::forward || a.kind == schedule::action_kind::recv_activation
                      ? find_or_take(a.microbatch, sum.actions_of[std::size_t(a.microbatch)])
                      : running(a);
      const std::size_t k = std::size_t(a.chunk);
      const bool last_backward = i == sum.last_backward[pipelined ? k : 0];
      const bool last_input = i == sum.last_backward_input[pipelined ? k : 0];
      switch (a.kind) {
        case schedule::action_kind::forward:
          if constexpr (pipelined) loss += forward_stage(f, k, scale);
          else loss += forward_all(f, scale);
          break;
        case schedule::action_kind::backward:
          if constexpr (pipelined) {
            if (last_backward) backward_stage(f, k, ready);
            else backward_stage(f, k, noop);
          } else {
            if (last_backward) backward_all(f, ready);
            else backward_all(f, noop);
          }
          break;
        case schedule::action_kind::backward_input:
          if (last_input) backward_stage(f, k, ready, split::input);
          else backward_stage(f, k, noop, split::input);
          break;
        case schedule::action_kind::backward_weight:
          if (last_backward) backward_stage(f, k, ready, split::weight);
          else backward_stage(f, k, noop, split::weight);
          break;
        default:
          if constexpr (pipelined) move(a, f, transport);
          else reject(a, "moves data between ranks; only the pipeline trainer runs such plans");
      }
      if (i == sum.compressor_ready_at) report_compressor(ready);
      if (--f.remaining == 0) f.microbatch = -1;  // the slot is free
    }
    return loss / double(sum.microbatches);
  }

  /// The loss of tokens/targets [B, S] through every local stage, without gradient state (between steps).
  double evaluate(view<const std::int32_t, host_space> tokens, view<const std::int32_t, host_space> targets) {
    require(find_busy() == nullptr, "train::plan_engine::evaluate: micro-batches are in flight");
    if (stages_->size() == 1) return (*stages_)[0].evaluate(tokens, targets);
    flight& f = evaluation_flight(tokens, targets);
    double loss = 0;
    for (std::size_t k = 0; k < stages_->size(); ++k) {
      if (k > 0) decode_from(f, k, f.stage[k - 1].payload_out);
      loss += evaluate_stage(f, k);
      if (k + 1 < stages_->size()) encode(f, k);
    }
    f.microbatch = -1;
    return loss;
  }

  /// The same for a rank of a pipeline: its chunks in order, receiving each chunk's input from `previous` and
  /// sending its output to `next` through the transport (every rank of the pipeline calls it with the same
  /// batch). Returns the loss on the rank that holds the head, 0 on the others.
  template <class Transport>
  double evaluate(view<const std::int32_t, host_space> tokens, view<const std::int32_t, host_space> targets,
                  Transport& transport, int previous, int next) {
    require(find_busy() == nullptr, "train::plan_engine::evaluate: micro-batches are in flight");
    flight& f = evaluation_flight(tokens, targets);
    double loss = 0;
    for (std::size_t k = 0; k < stages_->size(); ++k) {
      if (!(*stages_)[k].has_embedding()) {
        size_received(f, k);
        transport.recv_activation(payload_view(f.stage[k].payload_in), previous);
        decode_from(f, k, f.stage[k].payload_in);
      }
      loss += evaluate_stage(f, k);
      if (!(*stages_)[k].has_head()) {
        encode(f, k);
        transport.send_activation(compress::payload<const value_type, space>(payload_view(f.stage[k].payload_out)),
                                  next);
      }
    }
    f.microbatch = -1;
    return loss;
  }

 private:
  /// A payload's buffers: values, and the token ids when the compressor sends them.
  struct payload_buffer {
    tensor<value_type, space> values;
    tensor<std::int32_t, space> tokens;
  };
  /// One stage's boundary buffers for one micro-batch: the input side (what was received, its decoding, and
  /// backward dL/d(input) and dL/d(payload in)) and the output side (the stage's output, its encoding, and
  /// backward dL/d(payload out) and dL/d(output)).
  struct stage_buffers {
    payload_buffer payload_in, payload_out;
    tensor<value_type, space> in, grad_in, grad_payload_in;
    tensor<value_type, space> out, grad_payload_out, grad_out;
  };
  /// One micro-batch in flight: its slot, its host batch, and its boundary buffers per local stage.
  struct flight {
    int microbatch = -1;
    std::size_t slot = 0;
    std::size_t remaining = 0;  // actions of the plan still to run on it
    host_tensor<std::int32_t> tokens, targets;
    // The token ids of the batch [B·S] as the compressor sees them: a view of `tokens` on the host, a copy in
    // device memory otherwise.
    tensor<std::int32_t, space> device_tokens;
    view<const std::int32_t, space> boundary_tokens;
    std::vector<stage_buffers> stage;
  };
  /// What run() needs to know about a plan before it starts.
  struct plan_summary {
    int microbatches = 0;
    std::vector<std::size_t> actions_of;  // per micro-batch: actions naming it
    // Per chunk (one entry in local mode): the index of its last backward or backward_weight (the layers'
    // gradients are final there), and of its last backward_input (the norms', head's and embedding's).
    std::vector<std::size_t> last_backward, last_backward_input;
    std::size_t compressor_ready_at = 0;  // the last action that touches a boundary's gradients
  };

  /// Which half of a split backward a call runs.
  enum class split { none, input, weight };
  /// The model runs backward_input and backward_weight apart (Model::splits_backward).
  static constexpr bool splits_backward = [] {
    if constexpr (requires { Model::splits_backward; }) return bool(Model::splits_backward);
    else return false;
  }();

  plan_summary summarise(const std::vector<schedule::action>& plan, bool pipelined) const {
    plan_summary s;
    const std::size_t chunks = pipelined ? stages_->size() : 1;
    s.last_backward.assign(chunks, plan.size());
    s.last_backward_input.assign(chunks, plan.size());
    s.compressor_ready_at = plan.size();
    for (std::size_t i = 0; i < plan.size(); ++i) {
      const schedule::action& a = plan[i];
      if (a.kind == schedule::action_kind::optimizer_step) continue;
      const bool split_kind =
          a.kind == schedule::action_kind::backward_input || a.kind == schedule::action_kind::backward_weight;
      if (split_kind && !splits_backward)
        reject(a, "splits the backward, which this model cannot (its layers need backward_input / backward_weight)");
      if (split_kind && !pipelined) reject(a, "splits the backward, which only pipelined plans do");
      if (a.microbatch < 0) reject(a, "names no micro-batch");
      if (a.chunk < 0 || std::size_t(a.chunk) >= chunks)
        reject(a, pipelined ? "names a chunk this rank does not hold (it holds " + std::to_string(chunks) + ")"
                            : std::string("names a chunk, which only pipelined plans do"));
      if (std::size_t(a.microbatch) >= s.actions_of.size()) s.actions_of.resize(std::size_t(a.microbatch) + 1, 0);
      ++s.actions_of[std::size_t(a.microbatch)];
      if (a.kind == schedule::action_kind::backward || a.kind == schedule::action_kind::backward_weight)
        s.last_backward[std::size_t(a.chunk)] = i;
      if (a.kind == schedule::action_kind::backward_input) s.last_backward_input[std::size_t(a.chunk)] = i;
      if (a.kind == schedule::action_kind::backward || split_kind || a.kind == schedule::action_kind::send_gradient ||
          a.kind == schedule::action_kind::recv_gradient)
        s.compressor_ready_at = i;
    }
    s.microbatches = int(s.actions_of.size());
    require(s.microbatches > 0, "train::plan_engine: the plan names no micro-batch");
    for (std::size_t m = 0; m < s.actions_of.size(); ++m)
      require(s.actions_of[m] > 0, [&] {
        return "train::plan_engine: the plan names micro-batches up to " + std::to_string(s.microbatches - 1) +
               " but never " + std::to_string(m);
      });
    return s;
  }

  [[noreturn]] static void reject(const schedule::action& a, const std::string& why) {
    throw invalid_argument("train::plan_engine: '" + schedule::to_string(a) + "' " + why);
  }

  /// Reads the step's micro-batches, in id order.
  template <class Source>
  void read_batches(Source& source, int microbatches) {
    const shape bs = source.batch_shape();
    batches_.resize(std::size_t(microbatches));
    for (auto& [tokens, targets] : batches_) {
      if (tokens.shape() != bs) {
        tokens = host_tensor<std::int32_t>(bs);
        targets = host_tensor<std::int32_t>(bs);
      }
      source.next(tokens.v(), targets.v());
    }
  }

  flight& find_or_take(int microbatch, std::size_t actions) {
    if (flight* f = find(microbatch)) return *f;
    flight& f = take_slot(microbatch);
    f.remaining = actions;
    const auto& [tokens, targets] = batches_[std::size_t(microbatch)];
    load_batch(f, tokens.v(), targets.v());
    return f;
  }

  /// The flight's copy of a batch (its buffers reused while the batch shape stays), and its boundary token ids.
  void load_batch(flight& f, view<const std::int32_t, host_space> tokens,
                  view<const std::int32_t, host_space> targets) {
    if (f.tokens.shape() != tokens.shape()) {
      f.tokens = host_tensor<std::int32_t>(tokens.shape());
      f.targets = host_tensor<std::int32_t>(tokens.shape());
    }
    copy(exec::host{}, tokens, f.tokens.v());
    copy(exec::host{}, targets, f.targets.v());
    stage_tokens(f);
  }

  flight& running(const schedule::action& a) {
    flight* f = find(a.microbatch);
    if (f == nullptr) reject(a, "comes before the micro-batch's forward");
    return *f;
  }

  flight& evaluation_flight(view<const std::int32_t, host_space> tokens, view<const std::int32_t, host_space> targets) {
    flight& f = take_slot(-2);
    load_batch(f, tokens, targets);
    return f;
  }

  typename Model::stage_io io_of(flight& f, std::size_t k) {
    typename Model::stage_io io{f.tokens.v(), f.targets.v(), {}, {}};
    if (!(*stages_)[k].has_embedding()) io.in = f.stage[k].in.v();
    if (!(*stages_)[k].has_head()) {
      size_output(f, k);
      io.out = f.stage[k].out.v();
    }
    return io;
  }

  double forward_stage(flight& f, std::size_t k, float scale) {
    return (*stages_)[k].forward(f.slot, io_of(f, k), scale);
  }
  double evaluate_stage(flight& f, std::size_t k) { return (*stages_)[k].evaluate(f.slot, io_of(f, k)); }

  double forward_all(flight& f, float scale) {
    double loss = 0;
    for (std::size_t k = 0; k < stages_->size(); ++k) {
      if (k > 0) decode_from(f, k, f.stage[k - 1].payload_out);
      loss += forward_stage(f, k, scale);
      if (k + 1 < stages_->size()) encode(f, k);
    }
    return loss;
  }

  /// Stage k's backward from dL/d(output) (already in grad_out unless the stage has the head) to dL/d(input).
  template <class Ready>
  void backward_stage(flight& f, std::size_t k, Ready&& ready, split half = split::none) {
    Model& m = (*stages_)[k];
    view<const value_type, space> grad_out{};
    view<value_type, space> grad_in{};
    if (!m.has_head()) grad_out = f.stage[k].grad_out.v();
    if (!m.has_embedding()) grad_in = f.stage[k].grad_in.v();
    if constexpr (splits_backward) {
      if (half == split::input) return m.backward_input(f.slot, grad_out, grad_in, ready);
      if (half == split::weight) return m.backward_weight(f.slot, ready);
    }
    m.backward(f.slot, grad_out, grad_in, ready);
  }

  template <class Ready>
  void backward_all(flight& f, Ready&& ready) {
    for (std::size_t k = stages_->size(); k-- > 0;) {
      if (k + 1 < stages_->size()) {
        decode_backward(f, k + 1, f.stage[k].payload_out, f.stage[k].grad_payload_out);
        encode_backward(f, k);
      }
      backward_stage(f, k, ready);
    }
  }

  template <class Ready>
  void report_compressor(Ready& ready) {
    if (!compressor_parameters_.empty()) ready(compressor_parameters_.first, compressor_parameters_.last);
  }

  /// The send and receive actions of a pipelined plan.
  template <class Transport>
  void move(const schedule::action& a, flight& f, Transport& transport) {
    const std::size_t k = std::size_t(a.chunk);
    Model& m = (*stages_)[k];
    switch (a.kind) {
      case schedule::action_kind::recv_activation:
        if (m.has_embedding()) reject(a, "receives into the first stage of the model");
        size_received(f, k);
        transport.recv_activation(payload_view(f.stage[k].payload_in), a.peer);
        decode_from(f, k, f.stage[k].payload_in);
        break;
      case schedule::action_kind::send_activation:
        if (m.has_head()) reject(a, "sends from the last stage of the model");
        encode(f, k);
        transport.send_activation(compress::payload<const value_type, space>(payload_view(f.stage[k].payload_out)),
                                  a.peer);
        break;
      case schedule::action_kind::recv_gradient:
        if (m.has_head()) reject(a, "receives a gradient into the last stage of the model");
        transport.recv_gradient(f.stage[k].grad_payload_out.v(), a.peer);
        encode_backward(f, k);
        break;
      case schedule::action_kind::send_gradient:
        if (m.has_embedding()) reject(a, "sends a gradient from the first stage of the model");
        decode_backward(f, k, f.stage[k].payload_in, f.stage[k].grad_payload_in);
        transport.send_gradient(view<const value_type, space>(f.stage[k].grad_payload_in.v()), a.peer);
        break;
      default: reject(a, "is not a send or receive");
    }
  }

  // The compressor at a boundary: stage k's output side encodes, stage k's input side decodes.

  /// Stage k's output -> its payload_out.
  void encode(flight& f, std::size_t k) {
    const compress::boundary<const value_type, space> given{f.stage[k].out.v(), f.boundary_tokens};
    compressor_->encode(executor(), given, payload_view(f.stage[k].payload_out), params());
  }
  /// `from` (stage k's received payload, or in local mode the previous stage's payload_out) -> stage k's input.
  void decode_from(flight& f, std::size_t k, payload_buffer& from) {
    size_input(f, k);
    compressor_->decode(executor(), compress::payload<const value_type, space>(payload_view(from)), f.stage[k].in.v(),
                        params());
  }
  /// dL/d(stage k's input) -> dL/d(the payload it was decoded from), into `grad_payload`.
  void decode_backward(flight& f, std::size_t k, payload_buffer& from, tensor<value_type, space>& grad_payload) {
    compressor_->decode_backward(executor(), compress::payload<const value_type, space>(payload_view(from)),
                                 view<const value_type, space>(f.stage[k].grad_in.v()), grad_payload.v(), params());
  }
  /// dL/d(stage k's payload_out) (in grad_payload_out) -> dL/d(stage k's output), into grad_out.
  void encode_backward(flight& f, std::size_t k) {
    const compress::boundary<const value_type, space> given{f.stage[k].out.v(), f.boundary_tokens};
    compressor_->encode_backward(executor(), given, view<const value_type, space>(f.stage[k].grad_payload_out.v()),
                                 f.stage[k].grad_out.v(), params());
  }

  static compress::payload<value_type, space> payload_view(payload_buffer& p) {
    if constexpr (compress::sends_tokens_v<Compressor>) return {p.values.v(), p.tokens.v()};
    else return {p.values.v()};
  }

  const executor_type& executor() const { return (*stages_)[0].executor(); }
  auto& params() { return (*stages_)[0].parameters(); }

  /// Points f.boundary_tokens at the batch's token ids [B·S] in the executor's memory (a copy on the device).
  /// Only boundaries read them.
  void stage_tokens(flight& f) {
    if (f.stage.size() < stages_->size()) f.stage.resize(stages_->size());
    const view<const std::int32_t, host_space> ids = view<const std::int32_t, host_space>(f.tokens.v()).flat();
    if constexpr (std::is_same_v<space, host_space>) {
      f.boundary_tokens = ids;
    } else {
      if (f.device_tokens.numel() != ids.numel()) f.device_tokens = tensor<std::int32_t, space>(ids.shape());
      copy(executor(), ids, f.device_tokens.v());
      f.boundary_tokens = f.device_tokens.v();
    }
  }

  /// The stream's extents at a boundary, for the micro-batch's B·S tokens.
  shape boundary_shape(const flight& f) const { return (*stages_)[0].boundary_shape(f.tokens.numel()); }

  void size_payload(payload_buffer& p, const shape& x) {
    if (p.values.data() != nullptr && p.values.shape() == compressor_->payload_shape(x)) return;
    p.values = tensor<value_type, space>(compressor_->payload_shape(x));
    if constexpr (compress::sends_tokens_v<Compressor>)
      p.tokens = tensor<std::int32_t, space>(shape{compress::rows(x)});
  }
  static void size_tensor(tensor<value_type, space>& t, const shape& s) {
    if (t.data() == nullptr || t.shape() != s) t = tensor<value_type, space>(s);
  }
  /// Stage k's decoded input and its gradient.
  void size_input(flight& f, std::size_t k) {
    const shape x = boundary_shape(f);
    size_tensor(f.stage[k].in, x);
    size_tensor(f.stage[k].grad_in, x);
  }
  /// Stage k's received payload and the gradient sent back for it (pipelined mode).
  void size_received(flight& f, std::size_t k) {
    const shape x = boundary_shape(f);
    size_payload(f.stage[k].payload_in, x);
    size_tensor(f.stage[k].grad_payload_in, compressor_->payload_shape(x));
  }
  void size_output(flight& f, std::size_t k) {
    const shape x = boundary_shape(f);
    stage_buffers& b = f.stage[k];
    size_payload(b.payload_out, x);
    size_tensor(b.out, x);
    size_tensor(b.grad_out, x);
    size_tensor(b.grad_payload_out, compressor_->payload_shape(x));
  }

  flight* find_busy() {
    for (flight& f : flights_)
      if (f.microbatch >= 0) return &f;
    return nullptr;
  }

  flight* find(int microbatch) {
    for (flight& f : flights_)
      if (f.microbatch == microbatch) return &f;
    return nullptr;
  }

  flight& take_slot(int microbatch) {
    for (flight& f : flights_)
      if (f.microbatch < 0) {
        f.microbatch = microbatch;
        return f;
      }
    flights_.push_back(flight{});
    flights_.back().microbatch = microbatch;
    flights_.back().slot = flights_.size() - 1;
    return flights_.back();
  }

  std::vector<Model>* stages_;
  Compressor* compressor_;
  compress::parameter_range compressor_parameters_;
  std::vector<flight> flights_;
  std::vector<std::pair<host_tensor<std::int32_t>, host_tensor<std::int32_t>>> batches_;
};

}  // namespace subspace::train

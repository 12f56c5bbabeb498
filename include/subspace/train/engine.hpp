#pragma once
// train::plan_engine: runs a Scheduler's compute plan (schedule::action values) on the model stages one rank
// holds. Every trainer's micro-batch loop is this one.
//
//   forward(m)        the forward of micro-batch m through the rank's local stages, in order; the stage after a
//                     boundary receives what the stack's Compressor encoded and decoded (local boundaries: the
//                     payload is handed over in memory). The compressor sees the micro-batch's token ids (one per
//                     row of the residual stream, in the executor's memory) and the rank's parameter store.
//                     Micro-batch m takes a free activation slot of every stage and keeps it until its backward.
//   backward(m)       the backward of micro-batch m through the local stages in reverse, with the compressor's
//                     backward at each boundary; the last backward of the step calls the trainer's ready hook
//                     (the model's ready ranges, store indices), where data-parallel trainers launch buckets. The
//                     compressor's tensors are reported ready once the first boundary's backward is done (with a
//                     single stage, after it).
//   optimizer_step    the trainer's step hook (clipping, the optimizer, gossip mixing: the trainer's business).
// Sends and receives between ranks belong to the pipeline trainer, which adds a transport; a plan that asks for
// one here is rejected with the action named.
//
// The loss of a micro-batch is scaled by 1/M, M the plan's forward count, so the accumulated gradients are those
// of the mean loss over the step's micro-batches; run() returns that mean.

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

template <class Model, class Compressor>
class plan_engine {
 public:
  using executor_type = typename Model::executor_type;
  using value_type = typename Model::value_type;
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

  /// Runs `plan` with micro-batches from `source`; calls ready(first, last) during the step's last backward and
  /// step() at optimizer_step. Returns the mean loss over the plan's micro-batches.
  template <class Source, class Ready, class Step>
  double run(const std::vector<schedule::action>& plan, Source&& source, Ready&& ready, Step&& step) {
    std::int64_t forwards = 0;
    std::size_t last_backward = plan.size();
    for (std::size_t i = 0; i < plan.size(); ++i) {
      forwards += plan[i].kind == schedule::action_kind::forward;
      if (plan[i].kind == schedule::action_kind::backward) last_backward = i;
    }
    require(forwards > 0, "train::plan_engine: the plan has no forward action");
    const float scale = float(1.0 / double(forwards));
    double loss = 0;
    for (std::size_t i = 0; i < plan.size(); ++i) {
      const schedule::action& a = plan[i];
      switch (a.kind) {
        case schedule::action_kind::forward: loss += forward(a.microbatch, source, scale); break;
        case schedule::action_kind::backward:
          if (i == last_backward) backward(a.microbatch, ready);
          else backward(a.microbatch, [](std::size_t, std::size_t) {});
          break;
        case schedule::action_kind::optimizer_step: step(); break;
        default:
          require(false, [&] {
            return "train::plan_engine: '" + schedule::to_string(a) +
                   "' moves data between ranks; only the pipeline trainer runs such plans";
          });
      }
    }
    return loss / double(forwards);
  }

  /// The loss of tokens/targets [B, S] through every local stage, without gradient state (between steps).
  double evaluate(view<const std::int32_t, host_space> tokens, view<const std::int32_t, host_space> targets) {
    require(find_busy() == nullptr, "train::plan_engine::evaluate: micro-batches are in flight");
    if (stages_->size() == 1) return (*stages_)[0].evaluate(tokens, targets);
    flight& f = take_slot(-2);
    const std::int64_t n = tokens.numel(), d = (*stages_)[0].config().d_model;
    stage_tokens(f, tokens);
    double loss = 0;
    for (std::size_t k = 0; k < stages_->size(); ++k) {
      const bool last = k + 1 == stages_->size();
      if (!last) size_boundary(f, k, shape{n, d});
      typename Model::stage_io io{tokens, targets, {}, {}};
      if (k > 0) io.in = f.in[k - 1].v();
      if (!last) io.out = f.out[k].v();
      loss += (*stages_)[k].evaluate(f.slot, io);
      if (!last) compress_forward(f, k);
    }
    f.microbatch = -1;
    return loss;
  }

 private:
  /// One micro-batch in flight: its slot, its host batch, and its boundary buffers.
  struct flight {
    int microbatch = -1;
    std::size_t slot = 0;
    host_tensor<std::int32_t> tokens, targets;
    // The token ids of the batch [B·S] as the compressor sees them: a view of `tokens` on the host, a copy in
    // device memory otherwise.
    tensor<std::int32_t, space> device_tokens;
    view<const std::int32_t, space> boundary_tokens;
    // Per boundary k (after stage k): stage k's output, its encoding (values, and token ids when the compressor
    // sends them), the decoded input of stage k + 1, and in backward dL/d(input of stage k + 1), dL/d(payload),
    // dL/d(output of stage k).
    std::vector<tensor<value_type, space>> out, payload, in, grad_in, grad_payload, grad_out;
    std::vector<tensor<std::int32_t, space>> payload_tokens;
  };

  template <class Source>
  double forward(int microbatch, Source& source, float scale) {
    require(find(microbatch) == nullptr, [&] {
      return "train::plan_engine: forward(" + std::to_string(microbatch) + ") while it is still in flight";
    });
    flight& f = take_slot(microbatch);
    const shape bs = source.batch_shape();
    if (f.tokens.shape() != bs) {
      f.tokens = host_tensor<std::int32_t>(bs);
      f.targets = host_tensor<std::int32_t>(bs);
    }
    source.next(f.tokens.v(), f.targets.v());
    const std::int64_t n = bs.numel(), d = (*stages_)[0].config().d_model;
    stage_tokens(f, f.tokens.v());
    double loss = 0;
    for (std::size_t k = 0; k < stages_->size(); ++k) {
      const bool last = k + 1 == stages_->size();
      if (!last) size_boundary(f, k, shape{n, d});
      typename Model::stage_io io{f.tokens.v(), f.targets.v(), {}, {}};
      if (k > 0) io.in = f.in[k - 1].v();
      if (!last) io.out = f.out[k].v();
      loss += (*stages_)[k].forward(f.slot, io, scale);
      if (!last) compress_forward(f, k);
    }
    return loss;
  }

  template <class Ready>
  void backward(int microbatch, Ready&& ready) {
    flight* f = find(microbatch);
    require(f != nullptr, [&] {
      return "train::plan_engine: backward(" + std::to_string(microbatch) + ") before its forward";
    });
    const auto& ex = (*stages_)[0].executor();
    auto& params = (*stages_)[0].parameters();
    using cview = view<const value_type, space>;
    const auto compressor_ready = [&] {
      if (!compressor_parameters_.empty()) ready(compressor_parameters_.first, compressor_parameters_.last);
    };
    for (std::size_t k = stages_->size(); k-- > 0;) {
      const bool last = k + 1 == stages_->size();
      cview grad_out{};
      if (!last) {
        compressor_->decode_backward(ex, received(*f, k), cview(f->grad_in[k].v()), f->grad_payload[k].v(), params);
        compressor_->encode_backward(ex, given(*f, k), cview(f->grad_payload[k].v()), f->grad_out[k].v(), params);
        grad_out = f->grad_out[k].v();
        if (k == 0) compressor_ready();  // every boundary's backward is done
      }
      view<value_type, space> grad_in{};
      if (k > 0) grad_in = f->grad_in[k - 1].v();
      (*stages_)[k].backward(f->slot, grad_out, grad_in, ready);
    }
    if (stages_->size() == 1) compressor_ready();
    f->microbatch = -1;  // the slot is free
  }

  /// Points f.boundary_tokens at the batch's token ids [B·S] in the executor's memory (a copy on the device).
  /// Only boundaries read them.
  void stage_tokens(flight& f, view<const std::int32_t, host_space> tokens) {
    if (stages_->size() == 1) return;
    const view<const std::int32_t, host_space> ids = tokens.flat();
    if constexpr (std::is_same_v<space, host_space>) {
      f.boundary_tokens = ids;
    } else {
      if (f.device_tokens.numel() != ids.numel()) f.device_tokens = tensor<std::int32_t, space>(ids.shape());
      copy((*stages_)[0].executor(), ids, f.device_tokens.v());
      f.boundary_tokens = f.device_tokens.v();
    }
  }

  /// What boundary k's compressor encodes: stage k's output and the batch's token ids.
  compress::boundary<const value_type, space> given(flight& f, std::size_t k) {
    return {f.out[k].v(), f.boundary_tokens};
  }
  /// What crosses boundary k: the payload values and, for a compressor that sends them, the token ids.
  compress::payload<value_type, space> sent(flight& f, std::size_t k) {
    if constexpr (compress::sends_tokens_v<Compressor>) return {f.payload[k].v(), f.payload_tokens[k].v()};
    else return {f.payload[k].v()};
  }
  /// The same, as the receiver reads it.
  compress::payload<const value_type, space> received(flight& f, std::size_t k) { return sent(f, k); }
  /// Boundary k forward: encode stage k's output, decode it into stage k + 1's input.
  void compress_forward(flight& f, std::size_t k) {
    const auto& ex = (*stages_)[0].executor();
    auto& params = (*stages_)[0].parameters();
    compressor_->encode(ex, given(f, k), sent(f, k), params);
    compressor_->decode(ex, received(f, k), f.in[k].v(), params);
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

  void size_boundary(flight& f, std::size_t k, const shape& x) {
    if (f.out.size() <= k) {
      for (auto* v : {&f.out, &f.payload, &f.in, &f.grad_in, &f.grad_payload, &f.grad_out}) v->resize(k + 1);
      f.payload_tokens.resize(k + 1);
    }
    if (f.out[k].shape() == x && f.out[k].data() != nullptr) return;
    const shape p = compressor_->payload_shape(x);
    if constexpr (compress::sends_tokens_v<Compressor>)
      f.payload_tokens[k] = tensor<std::int32_t, space>(shape{compress::rows(x)});
    f.out[k] = tensor<value_type, space>(x);
    f.payload[k] = tensor<value_type, space>(p);
    f.in[k] = tensor<value_type, space>(x);
    f.grad_in[k] = tensor<value_type, space>(x);
    f.grad_payload[k] = tensor<value_type, space>(p);
    f.grad_out[k] = tensor<value_type, space>(x);
  }

  std::vector<Model>* stages_;
  Compressor* compressor_;
  compress::parameter_range compressor_parameters_;
  std::vector<flight> flights_;
};

}  // namespace subspace::train

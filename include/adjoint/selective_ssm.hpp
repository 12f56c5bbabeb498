#pragma once
// adjoint::selective_ssm<Exec, T, Engine>: a selective state-space language model with explicit forward and
// backward, its gradients computed by the Engine policy (adjoint/engines.hpp). The narrative is in docs/ssm.md.
//
//   y_0 = embedding[tokens]
//   per layer k:  ŷ = y_{k−1} / rms(y_{k−1})                       (no gain)
//                 a = sigmoid(W_a ŷ + b_a)            [N]          the diagonal transition
//                 B = reshape(W_b ŷ + b_b) [N, P],  C = reshape(W_c ŷ + b_c) [P, N]
//                 h_t = a_t ⊙ h_{t−1} + B_t ŷ_t,   h_{−1} = 0     (per sequence)
//                 y_k = y_{k−1} + C h
//   loss = mean over the targets ≠ −1 of cross_entropy(head · rmsnorm_γ(y_K), target)
//
// It satisfies nn::Model, so train::trainer trains it like the Llama, and pipeline::pipeline_trainer trains it
// sharded by layer: a model may be one stage, layers [first_layer, last_layer), with the embedding when it starts
// at 0 and the final norm, head and loss when it ends at K. The stream between stages is y [B·S, P]; backward
// takes dL/d(out) and gives dL/d(in) — with sharded_adjoint both are g, the head's cotangent.
//
// Parameters, in the order the store, checkpoints and the optimizer see them: embedding.weight [V, P]; per layer
// layers.k.{a_proj, b_proj, c_proj}.{weight, bias} ([N, P], [N·P, P], [P·N, P] and their biases); norm.weight [P];
// head.weight [V, P]. Tensor i is initialised from the Philox stream (seed, i): weights N(0, init_std²), c_proj
// N(0, (init_std / sqrt(2K))²), b_a = gate_bias, the other biases 0, the norm gain 1.
//
// Memory: a forward keeps its activations in its slot (several micro-batches may be in flight); the B and C
// products and their gradients are formed in chunks of rows, so no [rows, N·P] tensor exists at once beyond what
// the engine keeps (C for the adjoint engines unless recompute_c; B and C for bptt). activation_bytes() reports
// what is allocated.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <subspace/core/arena.hpp>
#include <subspace/core/dtype.hpp>
#include <subspace/core/error.hpp>
#include <subspace/core/executor.hpp>
#include <subspace/core/memory.hpp>
#include <subspace/core/parameter.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/kernels/elementwise.hpp>
#include <subspace/kernels/embedding.hpp>
#include <subspace/kernels/gemm.hpp>
#include <subspace/kernels/loss.hpp>
#include <subspace/kernels/norm.hpp>
#include <subspace/kernels/reduce.hpp>
#include <subspace/nn/llama_block.hpp>
#include <subspace/nn/parameters.hpp>

#include "config.hpp"
#include "detail/bptt_host.hpp"
#include "engines.hpp"
#include "kernels/scan.hpp"
#include "layout.hpp"

namespace adjoint {

template <class Exec, class T, class Engine = exact_adjoint>
class selective_ssm {
  static_assert(std::is_same_v<Engine, bptt> || std::is_same_v<Engine, exact_adjoint> ||
                    std::is_same_v<Engine, sharded_adjoint>,
                "selective_ssm: the engine is adjoint::bptt, adjoint::exact_adjoint or adjoint::sharded_adjoint");

 public:
  using executor_type = Exec;
  using space = subspace::space_of_t<Exec>;
  using value_type = T;
  using grad_type = subspace::nn::grad_t<Exec, T>;
  using stat_type = subspace::accum_t<T>;
  using boundary_type = subspace::accum_t<T>;
  using config_type = ssm_config;
  using engine_type = Engine;
  using store_type = subspace::nn::parameter_store<T, grad_type, space>;
  using param = subspace::nn::parameter<T, grad_type, space>;
  template <class U>
  using view = subspace::view<U, space>;
  using hview = subspace::view<const std::int32_t, subspace::host_space>;

  /// What one stage call reads and writes (as nn::llama's): tokens and targets [B, S] (host int32), the stream
  /// coming in [B·S, P] (not for the first stage) and going out (not for the last).
  struct stage_io {
    hview tokens, targets;
    view<const boundary_type> in;
    view<boundary_type> out;
  };

  /// The whole model of `cfg` on `ex` with its own parameter store; weights are zero until init() or a load.
  explicit selective_ssm(const ssm_config& cfg, Exec ex = {}, Engine engine = {})
      : selective_ssm(cfg, ex, engine, ssm_stage{}) {}

  /// Stage `stage` of `cfg`, declaring its tensors in `store` (a new store when null).
  selective_ssm(const ssm_config& cfg, Exec ex, Engine engine, ssm_stage stage,
                std::shared_ptr<store_type> store = nullptr)
      : cfg_(cfg), ex_(ex), engine_(engine) {
    cfg_.validate();
    if (stage.last_layer < 0) stage.last_layer = cfg_.layers;
    subspace::require(0 <= stage.first_layer && stage.first_layer < stage.last_layer && stage.last_layer <= cfg_.layers,
                      [&] {
                        return "selective_ssm: stage layers [" + std::to_string(stage.first_layer) + ", " +
                               std::to_string(stage.last_layer) + ") must be a non-empty range inside [0, " +
                               std::to_string(cfg_.layers) + ")";
                      });
    if constexpr (std::is_same_v<Engine, sharded_adjoint>)
      subspace::require(engine_.window >= 0, [&] {
        return "sharded_adjoint: window must be 0 (none) or positive, got " + std::to_string(engine_.window);
      });
    stage_ = stage;
    require_memory();
    const std::vector<subspace::parameter_info> infos = ssm_parameter_infos(cfg_);
    store_ = store ? std::move(store) : std::make_shared<store_type>();
    first_param_ = store_->size();
    if (has_embedding()) embed_index_ = store_->add(infos[0]);
    for (std::int64_t k = stage_.first_layer; k < stage_.last_layer; ++k) {
      layer_indices_.push_back(store_->size());
      for (std::size_t j = 0; j < per_layer; ++j) store_->add(infos[1 + per_layer * std::size_t(k) + j]);
    }
    if (has_head()) {
      norm_index_ = store_->add(infos[infos.size() - 2]);
      head_index_ = store_->add(infos.back());
    }
    last_param_ = store_->size();
    bind();
  }

  selective_ssm(const selective_ssm&) = delete;
  selective_ssm& operator=(const selective_ssm&) = delete;
  selective_ssm(selective_ssm&&) = default;
  selective_ssm& operator=(selective_ssm&&) = default;

  const ssm_config& config() const { return cfg_; }
  const Exec& executor() const { return ex_; }
  const Engine& engine() const { return engine_; }
  const ssm_stage& stage() const { return stage_; }
  bool has_embedding() const { return stage_.first_layer == 0; }
  bool has_head() const { return stage_.last_layer == cfg_.layers; }
  subspace::shape boundary_shape(std::int64_t rows) const { return {rows, cfg_.d_model}; }
  store_type& parameters() { return *store_; }
  const store_type& parameters() const { return *store_; }
  const std::shared_ptr<store_type>& shared_parameters() const { return store_; }
  std::size_t first_parameter() const { return first_param_; }
  std::size_t last_parameter() const { return last_param_; }
  std::int64_t layers() const { return stage_.last_layer - stage_.first_layer; }
  /// Store indices [first, last) of layer k's six tensors (k a layer of this stage).
  std::pair<std::size_t, std::size_t> layer_parameters(std::int64_t k) const {
    const std::size_t i = local(k);
    return {layer_indices_[i], layer_indices_[i] + per_layer};
  }

  /// Bytes allocated for activations: every slot's, and the scratch the slots share.
  std::size_t activation_bytes() const {
    std::size_t n = std::size_t(scratch_arena_.numel());
    for (const auto& s : slots_) n += std::size_t(s.arena.numel());
    return n;
  }

  /// What the forward of `slot` kept of layer k (an adjoint engine; for inspection): ŷ, a, h, C [rows, P·N]
  /// (empty with recompute_c) and 1/rms per token.
  struct kept_layer {
    view<const T> yhat, a, h, c;
    view<const stat_type> rstd;
  };
  kept_layer kept(std::size_t slot, std::int64_t k) const
    requires(!(std::is_same_v<Engine, bptt> && std::is_same_v<Exec, subspace::exec::host>))
  {
    subspace::require(slot < slots_.size() && !slots_[slot].acts.empty(),
                      "selective_ssm::kept: no forward in this slot");
    const auto& a = slots_[slot].acts[local(k)];
    return {a.yhat, a.a, a.h, a.c, a.rstd};
  }
  /// The cotangent the last backward handed below this stage's layers (to the embedding or the previous stage):
  /// δ_0 (bptt, exact_adjoint) or g (sharded_adjoint).
  view<const T> handed_down() const { return delta_; }

  void init(std::uint64_t seed) {
    bind();
    store_->init(ex_, seed, first_param_, last_param_);
  }
  void zero_grad() { store_->zero_grad(ex_); }
  void after_step() {}

  double forward(std::size_t slot, const stage_io& io, float loss_scale) { return run(slot, io, true, loss_scale); }
  double evaluate(std::size_t slot, const stage_io& io) { return run(slot, io, false, 0.0f); }
  double forward(hview tokens, hview targets, float loss_scale = 1.0f) {
    require_whole("forward");
    return forward(0, stage_io{tokens, targets, {}, {}}, loss_scale);
  }
  double evaluate(hview tokens, hview targets) {
    require_whole("evaluate");
    return evaluate(0, stage_io{tokens, targets, {}, {}});
  }
  void backward() {
    require_whole("backward");
    backward(0, view<const boundary_type>{}, view<boundary_type>{}, [](std::size_t, std::size_t) {});
  }

  /// The logits at the last position of every sequence: out [B, V] (float or T, the executor's space) for tokens
  /// [B, S] (host int32). Overwrites slot 0's activations.
  template <class U>
  void logits(hview tokens, view<U> out) {
    require_whole("logits");
    check_tokens(tokens, "logits");
    slot_state& st = slot_at(0);
    st.backward_ready = false;
    const std::int64_t b = tokens.dim(0), s = tokens.dim(1);
    subspace::require(out.shape() == subspace::shape{b, cfg_.vocab}, [&] {
      return "selective_ssm::logits: out has shape " + subspace::to_string(out.shape()) + ", expected [" +
             std::to_string(b) + ", " + std::to_string(cfg_.vocab) + "]";
    });
    run_layers(st, stage_io{tokens, {}, {}, {}}, "logits");
    const view<T> gathered = rows(st.dlnf, 0, b), lnf = rows(delta_, 0, b);  // both free outside a backward
    for (std::int64_t i = 0; i < b; ++i)                                     // the last row of each sequence
      subspace::copy(ex_, ro(rows(st.y, i * s + s - 1, 1)), rows(gathered, i, 1));
    subspace::rmsnorm_forward(ex_, ro(gathered), ro(norm_.value), cfg_.norm_eps, lnf, st.rstdf.slice(0, b));
    subspace::gemm(ex_, subspace::op::none, subspace::op::transpose, 1.0f, ro(lnf), ro(head_.value), 0.0f, out);
  }

  /// Accumulates the gradients of loss_scale · loss for the forward of `slot` (the engine's gradients): grad_out
  /// = dL/d(out) (not on the last stage), grad_in ← dL/d(in) (not on the first). ready(first, last) reports
  /// the head's tensors, then each layer's from the top, then the embedding.
  template <class Ready>
  void backward(std::size_t slot, view<const boundary_type> grad_out, view<boundary_type> grad_in, Ready&& ready) {
    slot_state& st = begin_backward(slot, grad_out, ready, "backward");
    if constexpr (token_major) {
      detail::bptt_backward(st.batch, st.seq, cfg_.d_model, cfg_.state, layer_refs(), st.tape, delta_.data());
      for (std::size_t l = layer_indices_.size(); l-- > 0;) ready(layer_indices_[l], layer_indices_[l] + per_layer);
    } else {
      layers_backward(st, ready);
    }
    hand_down(st, grad_in, ready, "backward");
  }

  /// The sharded engine splits its backward, so a zero-bubble pipeline schedule can run the halves apart: its
  /// layers need only g, so backward_input hands g on (and fills the head's, the final norm's and the embedding's
  /// gradients) and backward_weight does the layers' work. The ranks of a sharded model then compute their
  /// layers' gradients at the same time instead of one after another.
  static constexpr bool splits_backward = std::is_same_v<Engine, sharded_adjoint>;

  template <class Ready>
  void backward_input(std::size_t slot, view<const boundary_type> grad_out, view<boundary_type> grad_in, Ready&& ready)
    requires splits_backward
  {
    slot_state& st = begin_backward(slot, grad_out, ready, "backward_input");
    hand_down(st, grad_in, ready, "backward_input");
    subspace::nn::detail::convert_into(ex_, ro(delta_), st.y);  // the stream is dead now: it keeps g
    st.weights_pending = true;
  }

  template <class Ready>
  void backward_weight(std::size_t slot, Ready&& ready)
    requires splits_backward
  {
    slot_state& st = slot_at(slot);
    subspace::require(st.weights_pending, "selective_ssm::backward_weight: call backward_input() on this slot first");
    st.weights_pending = false;
    bind();
    prepare_scratch(st.batch, st.seq);
    subspace::nn::detail::convert_into(ex_, ro(st.y), delta_);
    layers_backward(st, ready);
  }

 private:
  static constexpr std::size_t per_layer = 6;  // a, b, c maps: weight and bias each

  /// Checks, before the layers' descriptions are built, that this stage's values and gradients fit the memory of
  /// the executor's space: a configuration too large for the machine fails here, naming its sizes.
  void require_memory() const {
    const std::int64_t layers = stage_.last_layer - stage_.first_layer;
    const std::int64_t embedding = cfg_.vocab * cfg_.d_model;  // validated: no overflow
    const std::int64_t count = layers * cfg_.layer_parameters() + (has_embedding() ? embedding : 0) +
                               (has_head() ? cfg_.d_model + embedding : 0);
    subspace::require_capacity<space>(std::uint64_t(count) * (sizeof(T) + sizeof(grad_type)), [&] {
      return "ssm_config '" + cfg_.name + "' (vocab " + std::to_string(cfg_.vocab) + ", d_model " +
             std::to_string(cfg_.d_model) + ", state " + std::to_string(cfg_.state) + ", layers " +
             std::to_string(cfg_.layers) + "): the " + std::to_string(count) + " parameters of layers [" +
             std::to_string(stage_.first_layer) + ", " + std::to_string(stage_.last_layer) + ") with their gradients";
    });
  }

  /// One layer's parameters, bound to the store.
  struct layer_params {
    param a_w, a_b, b_w, b_b, c_w, c_b;
  };
  /// What a layer-major engine keeps of one layer per token; the graph (bptt on a device) adds the layer's input
  /// and output, the gate's pre-activation and B.
  struct layer_acts {
    view<T> yhat, a, h, c;  // c: [rows, P·N] when stored
    view<stat_type> rstd;
    view<T> y_in, out, u, b;  // keeps_graph only
  };
  struct slot_state {
    subspace::tensor<std::byte, space> arena;
    std::int64_t batch = 0, seq = 0;
    view<std::int32_t> tokens, targets;
    view<T> y;  // the stream; after the forward, the last layer's output
    std::vector<layer_acts> acts;
    std::vector<detail::bptt_tape<T, stat_type>> tape;  // bptt only
    view<T> dlnf;                                       // dL/d(final norm's output), from the loss
    view<stat_type> rstdf, losses;
    bool backward_ready = false;
    bool weights_pending = false;  // backward_input ran, backward_weight not yet
  };

  std::size_t local(std::int64_t k) const {
    subspace::require(stage_.first_layer <= k && k < stage_.last_layer, [&] {
      return "selective_ssm: layer " + std::to_string(k) + " is not on this stage (layers [" +
             std::to_string(stage_.first_layer) + ", " + std::to_string(stage_.last_layer) + "))";
    });
    return std::size_t(k - stage_.first_layer);
  }
  void require_whole(const char* op) const {
    subspace::require(has_embedding() && has_head(), [&] {
      return std::string("selective_ssm::") + op + "(tokens, ...): this model is a stage; call the slot form";
    });
  }
  void check_boundary(view<const boundary_type> v, std::int64_t n, const char* op, const char* name) const {
    subspace::require(v.shape() == subspace::shape{n, cfg_.d_model}, [&] {
      return std::string("selective_ssm::") + op + ": " + name + " has shape " + subspace::to_string(v.shape()) +
             ", expected [" + std::to_string(n) + ", " + std::to_string(cfg_.d_model) + "]";
    });
  }

  void bind() {
    store_->allocate(ex_);
    if (bound_generation_ == store_->generation()) return;
    bound_generation_ = store_->generation();
    if (has_embedding()) embed_ = (*store_)[embed_index_];
    layers_.clear();
    for (const std::size_t i : layer_indices_) {
      store_type& s = *store_;
      layers_.push_back({s[i], s[i + 1], s[i + 2], s[i + 3], s[i + 4], s[i + 5]});
    }
    if (has_head()) {
      norm_ = (*store_)[norm_index_];
      head_ = (*store_)[head_index_];
    }
  }

  std::vector<detail::layer_refs<T, grad_type>> layer_refs() const {
    std::vector<detail::layer_refs<T, grad_type>> r;
    for (const layer_params& p : layers_)
      r.push_back({p.a_w.value.data(), p.a_b.value.data(), p.b_w.value.data(), p.b_b.value.data(), p.c_w.value.data(),
                   p.c_b.value.data(), p.a_w.grad.data(), p.a_b.grad.data(), p.b_w.grad.data(), p.b_b.grad.data(),
                   p.c_w.grad.data(), p.c_b.grad.data()});
    return r;
  }

  slot_state& slot_at(std::size_t slot) {
    if (slot >= slots_.size()) {
      subspace::require(slot < 4096, [&] {
        return "selective_ssm: activation slot " + std::to_string(slot) + " is unreasonably large";
      });
      slots_.resize(slot + 1);
    }
    return slots_[slot];
  }

  /// The head's (or the next stage's) cotangent into delta_: the start of every backward.
  template <class Ready>
  slot_state& begin_backward(std::size_t slot, view<const boundary_type> grad_out, Ready& ready, const char* op) {
    slot_state& st = slot_at(slot);
    subspace::require(st.backward_ready, [&] {
      return std::string("selective_ssm::") + op +
             ": call forward() on this slot first (evaluate() keeps no gradient state, and a backward runs once "
             "per forward)";
    });
    st.backward_ready = false;
    bind();
    prepare_scratch(st.batch, st.seq);
    if (has_head()) {
      subspace::rmsnorm_backward(ex_, ro(st.y), ro(norm_.value), ro(st.rstdf), ro(st.dlnf), delta_, norm_.grad);
      ready(norm_index_, head_index_ + 1);
    } else {
      check_boundary(grad_out, st.batch * st.seq, op, "grad_out");
      subspace::nn::detail::convert_into(ex_, grad_out, delta_);
    }
    return st;
  }

  /// The layers from the top, each reporting its gradients ready.
  template <class Ready>
  void layers_backward(slot_state& st, Ready& ready) {
    for (std::size_t l = layer_indices_.size(); l-- > 0;) {
      layer_backward(st, l);
      ready(layer_indices_[l], layer_indices_[l] + per_layer);
    }
  }

  /// delta_ to the embedding, or down to the previous stage: the end of every backward.
  template <class Ready>
  void hand_down(slot_state& st, view<boundary_type> grad_in, Ready& ready, const char* op) {
    if (has_embedding()) {
      subspace::embedding_backward(ex_, ro(st.tokens), ro(delta_), embed_.grad);
      ready(embed_index_, embed_index_ + 1);
    } else {
      check_boundary(grad_in, st.batch * st.seq, op, "grad_in");
      subspace::nn::detail::convert_into(ex_, ro(delta_), grad_in);
    }
  }

  // bptt on the host walks token by token (detail/bptt_host.hpp); on a device it keeps the whole graph and walks
  // it layer by layer. The exact engine and bptt hand δ down; the sharded engine hands g.
  static constexpr bool token_major = std::is_same_v<Engine, bptt> && std::is_same_v<Exec, subspace::exec::host>;
  static constexpr bool keeps_graph = std::is_same_v<Engine, bptt> && !token_major;
  static constexpr bool propagates = !std::is_same_v<Engine, sharded_adjoint>;
  using subspace_arena = subspace::arena<space>;

  /// Rows per chunk of the B and C products: the two [rows, N·P] chunk buffers stay within 1/16 of what one
  /// layer stores for the batch, or hold 2^18 values on the host and 2^22 on a device when that is more (a GPU's
  /// GEMMs need rows to fill it); at least one row, at most every row.
  std::int64_t chunk_rows(std::int64_t n) const {
    const std::int64_t NP = cfg_.state * cfg_.d_model;
    const std::int64_t stored = 2 * cfg_.state + cfg_.d_model + 1 + (stores_c(engine_) ? NP : 0);  // per token
    const std::int64_t floor_values = std::int64_t(1) << (std::is_same_v<space, subspace::host_space> ? 18 : 22);
    const std::int64_t by_share = n / 16 * stored / (2 * NP), by_size = floor_values / NP;
    return std::clamp<std::int64_t>(std::max(by_share, by_size), 1, n);
  }

  template <class Arena>
  void layout(slot_state& st, Arena& a, std::int64_t b, std::int64_t s) {
    const std::int64_t n = b * s, P = cfg_.d_model, N = cfg_.state, NP = N * P;
    st.tokens = a.template take<std::int32_t>({n});
    st.targets = a.template take<std::int32_t>({n});
    st.y = a.template take<T>({n, P});
    st.acts.assign(token_major ? 0 : layer_indices_.size(), {});
    for (layer_acts& l : st.acts) {
      l.yhat = a.template take<T>({n, P});
      l.rstd = a.template take<stat_type>({n});
      l.a = a.template take<T>({n, N});
      l.h = a.template take<T>({n, N});
      if (stores_c(engine_)) l.c = a.template take<T>({n, NP});
      if constexpr (keeps_graph) {
        l.y_in = a.template take<T>({n, P});
        l.out = a.template take<T>({n, P});
        l.u = a.template take<T>({n, N});
        l.b = a.template take<T>({n, NP});
      }
    }
    st.tape.assign(token_major ? layer_indices_.size() : 0, {});
    for (auto& l : st.tape) {
      l.y = a.template take<T>({n, P}).data();
      l.yhat = a.template take<T>({n, P}).data();
      l.out = a.template take<T>({n, P}).data();
      l.u = a.template take<T>({n, N}).data();
      l.a = a.template take<T>({n, N}).data();
      l.h = a.template take<T>({n, N}).data();
      l.b = a.template take<T>({n, NP}).data();
      l.c = a.template take<T>({n, NP}).data();
      l.rstd = a.template take<stat_type>({n}).data();
    }
    if (has_head()) {
      st.dlnf = a.template take<T>({n, P});
      st.rstdf = a.template take<stat_type>({n});
      st.losses = a.template take<stat_type>({n});
    }
  }
  void prepare(slot_state& st, std::int64_t b, std::int64_t s) {
    if (b == st.batch && s == st.seq) return;
    subspace_arena measure;
    layout(st, measure, b, s);
    st.arena = subspace::tensor<std::byte, space>(subspace::shape{std::int64_t(measure.bytes())});
    subspace_arena carve(st.arena.data());
    layout(st, carve, b, s);
    st.batch = b;
    st.seq = s;
  }

  /// The scratch shared by the slots: the cotangent handed down [n, P] (in a forward, the final norm's output),
  /// and the adjoint engines' per-layer work: w, μ [n, N], dŷ [chunk, P] and two [chunk, N·P] products.
  void prepare_scratch(std::int64_t b, std::int64_t s) {
    if (b == scratch_batch_ && s == scratch_seq_) return;
    const auto carve_all = [&](auto& a) {
      const std::int64_t n = b * s, P = cfg_.d_model;
      delta_ = a.template take<T>({n, P});
      if constexpr (!token_major) {
        const std::int64_t N = cfg_.state, c = chunk_rows(n);
        w_ = a.template take<T>({n, N});
        mu_ = a.template take<T>({n, N});
        dyhat_ = a.template take<T>({c, P});
        bm_ = a.template take<T>({c, N * P});
        cm_ = a.template take<T>({c, N * P});
      }
    };
    subspace_arena measure;
    carve_all(measure);
    scratch_arena_ = subspace::tensor<std::byte, space>(subspace::shape{std::int64_t(measure.bytes())});
    subspace_arena carve(scratch_arena_.data());
    carve_all(carve);
    scratch_batch_ = b;
    scratch_seq_ = s;
  }

  /// Rows [r0, r0 + c) of a [rows, cols] view.
  template <class U>
  static view<U> rows(view<U> v, std::int64_t r0, std::int64_t c) {
    return v.slice(r0, r0 + c);
  }
  /// A [rows, cols] view as `rows` matrices [r, k] (r · k = cols) for batched gemms.
  template <class U>
  static view<U> per_token(view<U> v, std::int64_t r, std::int64_t k) {
    return view<U>(v.data(), subspace::shape{v.dim(0), r, k});
  }

  /// out[c] = W ŷ[c] + bias for a chunk of rows (one of the B or C maps).
  void map_rows(view<const T> yhat, const param& w, const param& bias, view<T> out) {
    subspace::gemm(ex_, subspace::op::none, subspace::op::transpose, 1.0f, yhat, ro(w.value), 0.0f, out);
    add_rows(ex_, ro(bias.value), out);
  }

  void layer_forward(slot_state& st, std::size_t l) {
    const std::int64_t n = st.batch * st.seq, P = cfg_.d_model, N = cfg_.state, cr = chunk_rows(n);
    const layer_params& p = layers_[l];
    layer_acts& act = st.acts[l];
    if constexpr (keeps_graph) subspace::copy(ex_, ro(st.y), act.y_in);
    unit_rmsnorm_forward(ex_, ro(st.y), cfg_.norm_eps, act.yhat, act.rstd);
    // a = sigmoid(W_a ŷ + b_a), with u in w_ (or kept)
    const view<T> u = keeps_graph ? act.u : w_;
    subspace::gemm(ex_, subspace::op::none, subspace::op::transpose, 1.0f, ro(act.yhat), ro(p.a_w.value), 0.0f, u);
    sigmoid_rows(ex_, ro(u), ro(p.a_b.value), act.a);
    // x_t = B_t ŷ_t (into w_), then h = scan
    for (std::int64_t r0 = 0; r0 < n; r0 += cr) {
      const std::int64_t c = std::min(cr, n - r0);
      const view<T> bm = keeps_graph ? rows(act.b, r0, c) : rows(bm_, 0, c);
      map_rows(ro(rows(act.yhat, r0, c)), p.b_w, p.b_b, bm);
      subspace::gemm(ex_, subspace::op::none, subspace::op::none, 1.0f, ro(per_token(bm, N, P)),
                     ro(per_token(rows(act.yhat, r0, c), P, 1)), 0.0f, per_token(rows(w_, r0, c), N, 1));
    }
    scan_forward(ex_, ro(act.a), ro(w_), act.h, st.seq);
    // y += C_t h_t
    for (std::int64_t r0 = 0; r0 < n; r0 += cr) {
      const std::int64_t c = std::min(cr, n - r0);
      const view<T> cm = stores_c(engine_) ? rows(act.c, r0, c) : rows(cm_, 0, c);
      map_rows(ro(rows(act.yhat, r0, c)), p.c_w, p.c_b, cm);
      const view<T> target = keeps_graph ? rows(act.out, r0, c) : rows(st.y, r0, c);
      subspace::gemm(ex_, subspace::op::none, subspace::op::none, 1.0f, ro(per_token(cm, P, N)),
                     ro(per_token(rows(act.h, r0, c), N, 1)), keeps_graph ? 0.0f : 1.0f, per_token(target, P, 1));
    }
    if constexpr (keeps_graph) subspace::axpy(ex_, 1.0f, ro(act.out), st.y);
  }

  /// One layer, layer-major (docs/ssm.md): delta_ holds the cotangent of the layer's output — δ_k (exact and
  /// bptt, left holding δ_{k−1}) or g (sharded, left unchanged).
  void layer_backward(slot_state& st, std::size_t l) {
    constexpr bool exact = propagates;
    const std::int64_t n = st.batch * st.seq, P = cfg_.d_model, N = cfg_.state, cr = chunk_rows(n);
    const layer_params& p = layers_[l];
    const layer_acts& act = st.acts[l];
    const auto c_of = [&](std::int64_t r0, std::int64_t c) {
      if (stores_c(engine_)) return rows(act.c, r0, c);
      const view<T> cm = rows(cm_, 0, c);
      map_rows(ro(rows(act.yhat, r0, c)), p.c_w, p.c_b, cm);
      return cm;
    };
    // w_t = δ_t C_t, then μ by the reverse scan (or the truncated window)
    for (std::int64_t r0 = 0; r0 < n; r0 += cr) {
      const std::int64_t c = std::min(cr, n - r0);
      subspace::gemm(ex_, subspace::op::none, subspace::op::none, 1.0f, ro(per_token(rows(delta_, r0, c), 1, P)),
                     ro(per_token(c_of(r0, c), P, N)), 0.0f, per_token(rows(w_, r0, c), 1, N));
    }
    if constexpr (std::is_same_v<Engine, sharded_adjoint>) {
      if (engine_.window > 0) scan_window(ex_, ro(act.a), ro(w_), mu_, st.seq, engine_.window);
      else scan_reverse(ex_, ro(act.a), ro(w_), mu_, st.seq);
    } else {
      scan_reverse(ex_, ro(act.a), ro(w_), mu_, st.seq);
    }
    // the gate: ā = μ ⊙ h_{t−1}, du = ā a (1 − a) (into w_)
    shifted_product(ex_, ro(mu_), ro(act.h), w_, st.seq);
    gate_backward(ex_, ro(act.a), ro(w_), w_);
    subspace::gemm(ex_, subspace::op::transpose, subspace::op::none, 1.0f, ro(w_), ro(act.yhat), 1.0f, p.a_w.grad);
    column_sums(ex_, ro(w_), p.a_b.grad);
    for (std::int64_t r0 = 0; r0 < n; r0 += cr) {
      const std::int64_t c = std::min(cr, n - r0);
      const view<const T> yh = ro(rows(act.yhat, r0, c));
      const view<T> dyh = rows(dyhat_, 0, c), bm = rows(bm_, 0, c), cm = rows(cm_, 0, c);
      if constexpr (exact) {
        subspace::gemm(ex_, subspace::op::none, subspace::op::none, 1.0f, ro(rows(w_, r0, c)), ro(p.a_w.value), 0.0f,
                       dyh);
        // the direct term ŷ̄ += μ_t B_t, with B recomputed (or kept)
        if constexpr (!keeps_graph) map_rows(yh, p.b_w, p.b_b, bm);
        const view<T> b = keeps_graph ? rows(act.b, r0, c) : bm;
        subspace::gemm(ex_, subspace::op::none, subspace::op::none, 1.0f, ro(per_token(rows(mu_, r0, c), 1, N)),
                       ro(per_token(b, N, P)), 1.0f, per_token(dyh, 1, P));
      }
      // B̄_t = μ_tᵀ ŷ_tᵀ, then its map's vjp
      subspace::gemm(ex_, subspace::op::none, subspace::op::none, 1.0f, ro(per_token(rows(mu_, r0, c), N, 1)),
                     per_token(yh, 1, P), 0.0f, per_token(bm, N, P));
      map_backward(yh, ro(bm), p.b_w, p.b_b, dyh);
      // C̄_t = δ_tᵀ h_tᵀ, then its map's vjp
      subspace::gemm(ex_, subspace::op::none, subspace::op::none, 1.0f, ro(per_token(rows(delta_, r0, c), P, 1)),
                     ro(per_token(rows(act.h, r0, c), 1, N)), 0.0f, per_token(cm, P, N));
      map_backward(yh, ro(cm), p.c_w, p.c_b, dyh);
      if constexpr (exact) unit_rmsnorm_backward(ex_, yh, ro(rows(act.rstd, r0, c)), ro(dyh), rows(delta_, r0, c));
    }
  }

  /// A map's vjp for a chunk: dW += dOutᵀ ŷ, db += Σ dOut, and (engines that hand δ down) dŷ += dOut W.
  void map_backward(view<const T> yhat, view<const T> dout, const param& w, const param& bias, view<T> dyhat) {
    subspace::gemm(ex_, subspace::op::transpose, subspace::op::none, 1.0f, dout, yhat, 1.0f, w.grad);
    column_sums(ex_, dout, bias.grad);
    if constexpr (propagates)
      subspace::gemm(ex_, subspace::op::none, subspace::op::none, 1.0f, dout, ro(w.value), 1.0f, dyhat);
  }

  /// The embedding (or the incoming stream) and every layer: st.y holds this stage's output.
  void run_layers(slot_state& st, const stage_io& io, const char* op) {
    const std::int64_t b = io.tokens.dim(0), s = io.tokens.dim(1), n = b * s;
    bind();
    prepare(st, b, s);
    prepare_scratch(b, s);
    subspace::copy(ex_, io.tokens.flat(), st.tokens);
    if (has_embedding()) {
      subspace::embedding_forward(ex_, ro(st.tokens), ro(embed_.value), st.y);
    } else {
      check_boundary(io.in, n, op, "in");
      subspace::nn::detail::convert_into(ex_, io.in, st.y);
    }
    if constexpr (!token_major) {
      for (std::size_t l = 0; l < layers_.size(); ++l) layer_forward(st, l);
    } else {
      detail::bptt_forward(b, s, cfg_.d_model, cfg_.state, stat_type(cfg_.norm_eps), layer_refs(), st.tape,
                           st.y.data());
    }
  }

  void check_tokens(hview tokens, const char* op) const {
    subspace::require(tokens.rank() == 2 && tokens.dim(0) > 0 && tokens.dim(1) > 0 && tokens.is_contiguous(), [&] {
      return std::string("selective_ssm::") + op + ": tokens must be a contiguous non-empty [B, S] view, got shape " +
             subspace::to_string(tokens.shape());
    });
  }

  double run(std::size_t slot, const stage_io& io, bool gradients, float loss_scale) {
    const char* op = gradients ? "forward" : "evaluate";
    slot_state& st = slot_at(slot);
    st.backward_ready = false;
    check_tokens(io.tokens, op);
    const std::int64_t n = io.tokens.numel();
    const std::int64_t counted = has_head() ? count_targets(io, op) : 0;
    run_layers(st, io, op);
    st.backward_ready = gradients;
    if (!has_head()) {
      check_boundary(io.out, n, op, "out");
      subspace::nn::detail::convert_into(ex_, ro(st.y), io.out);
      return 0.0;
    }
    const view<T> lnf = delta_;  // free until a backward
    subspace::rmsnorm_forward(ex_, ro(st.y), ro(norm_.value), cfg_.norm_eps, lnf, st.rstdf);
    subspace::copy(ex_, io.targets.flat(), st.targets);
    const float grad_scale = counted > 0 ? float(double(loss_scale) / double(counted)) : 0.0f;
    if (gradients)
      subspace::lm_head_cross_entropy(ex_, ro(lnf), ro(head_.value), ro(st.targets), st.losses, st.dlnf, head_.grad,
                                      grad_scale);
    else
      subspace::lm_head_cross_entropy(ex_, ro(lnf), ro(head_.value), ro(st.targets), st.losses, view<T>{},
                                      view<grad_type>{}, grad_scale);
    const double total = double(subspace::sum(ex_, ro(st.losses)));
    return counted > 0 ? total / double(counted) : 0.0;
  }

  std::int64_t count_targets(const stage_io& io, const char* op) const {
    subspace::require(io.targets.shape() == io.tokens.shape() && io.targets.is_contiguous(), [&] {
      return std::string("selective_ssm::") + op + ": targets have shape " + subspace::to_string(io.targets.shape()) +
             ", tokens " + subspace::to_string(io.tokens.shape()) + " (expected the same, contiguous)";
    });
    std::int64_t counted = 0;
    for (std::int64_t i = 0; i < io.targets.numel(); ++i) {
      const std::int32_t t = io.targets.data()[i];
      if (t != -1 && (t < 0 || t >= cfg_.vocab)) [[unlikely]]
        throw subspace::invalid_argument("selective_ssm::" + std::string(op) + ": target " + std::to_string(t) +
                                         " at position " + std::to_string(i) + " is outside the vocabulary [0, " +
                                         std::to_string(cfg_.vocab) + ") and is not -1 (ignored)");
      counted += t != -1;
    }
    return counted;
  }

  ssm_config cfg_;
  Exec ex_;
  Engine engine_;
  ssm_stage stage_{};
  std::shared_ptr<store_type> store_;
  std::size_t first_param_ = 0, last_param_ = 0, embed_index_ = 0, norm_index_ = 0, head_index_ = 0;
  std::vector<std::size_t> layer_indices_;
  std::uint64_t bound_generation_ = 0;
  param embed_, norm_, head_;
  std::vector<layer_params> layers_;
  std::vector<slot_state> slots_;
  subspace::tensor<std::byte, space> scratch_arena_;
  std::int64_t scratch_batch_ = 0, scratch_seq_ = 0;
  view<T> delta_, w_, mu_, dyhat_, bm_, cm_;
};

}  // namespace adjoint

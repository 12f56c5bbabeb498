#pragma once
// The Llama 3 model, llm.c style: explicit forward and backward, layer by layer, activations in named buffers.
//
//   x₀ = embed_tokens[tokens]
//   per layer:   h = x + o_proj(attention(rope(q_proj(n₁)), rope(k_proj(n₁)), v_proj(n₁)))    n₁ = rmsnorm(x)
//                x = h + down_proj(silu(gate_proj(n₂)) * up_proj(n₂))                          n₂ = rmsnorm(h)
//   loss = mean over the targets ≠ -1 of cross_entropy(lm_head(rmsnorm(x_L)), target)
//
// One class template serves both executors: llama<exec::host, float or double> (weights, activations and
// gradients in T: the readable reference, and double for gradient checks) and llama<exec::cuda, bf16> (bf16
// weights and activations — the working copy the optimizer writes — with fp32 weight gradients). The model calls
// only the layer kernels of docs/llama-kernels.md, gemm and the element-wise kernels, so the same code runs on both.
//
// Stages. A model may be one pipeline stage: layers [first_layer, last_layer) of the configuration, with the
// embedding when first_layer = 0 and the final norm, LM head and loss when last_layer = n_layers. A stage takes
// the residual stream [B·S, d] in (unless it is the first) and gives it out (unless it is the last); its backward
// takes dL/d(out) and gives dL/d(in). Chaining the stages of a configuration computes exactly the whole model.
// Parameter names, initial values and weight-decay flags are the whole model's, so stage checkpoints compose.
//
// Activation slots. forward(slot, ...) saves its activations in the slot's own arena and backward(slot, ...)
// reads them, so several micro-batches may be in flight on one stage (a 1F1B pipeline keeps up to P alive). An
// arena is sized for the (batch, sequence) of its first call and reallocated only when that changes. Backward
// scratch is shared by the slots.
//
// Parameters live in an nn::parameter_store (nn/parameters.hpp), the model's own or one shared with the other
// stages of a rank; they carry Hugging Face Llama names and layouts (W stored [out, in]; RoPE pairs (i, i + hd/2),
// so HF q/k weights load unpermuted), in HF's order: model.embed_tokens.weight; per layer model.layers.N.
// self_attn.{q,k,v,o}_proj.weight, mlp.{gate,up,down}_proj.weight, input_layernorm.weight,
// post_attention_layernorm.weight; model.norm.weight; lm_head.weight (absent when the head is tied to the
// embedding). Weight decay applies to the 2-D projection matrices and an untied lm_head only.
//
// Initialisation (init(seed)): parameter i of the whole model's order is drawn from the Philox stream (seed, i),
// N(0, 0.02²), the output projections o_proj and down_proj N(0, (0.02 / sqrt(2 L))²), norm gains 1; the draws
// are the same on the host and the device, rounded to each model's T.
//
// A training step of a whole model:
//   model.zero_grad();
//   double loss = model.forward(tokens, targets, loss_scale);   // host [B, S] int32 views
//   model.backward();                                            // gradients of loss_scale · loss, accumulated
// forward() already adds the LM head's weight gradient (the fused head + cross-entropy kernel computes the loss
// and its gradients in one pass, so the B·S × V logits never exist at once); evaluate() computes the loss alone
// and leaves the gradients untouched. Targets of -1 are ignored: the loss is the mean over the others.
//
// The attention, the two output projections, the residual adds and the embedding are policies made per layer by
// the Blocks factory (nn/block_policies.hpp).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/memory.hpp"
#include "../core/parameter.hpp"
#include "../core/tensor.hpp"
#include "../kernels/attention.hpp"
#include "../kernels/detail/layer_checks.hpp"
#include "../kernels/elementwise.hpp"
#include "../kernels/gemm.hpp"
#include "../kernels/loss.hpp"
#include "../kernels/norm.hpp"
#include "../kernels/reduce.hpp"
#include "../kernels/rope.hpp"
#include "../kernels/swiglu.hpp"
#include "block_policies.hpp"
#include "config.hpp"
#include "llama_block.hpp"
#include "parameters.hpp"

namespace subspace::nn {

/// The parameters of the whole model `cfg` in Hugging Face's order, with their shapes, decay flags and
/// initialisation (stream i for parameter i).
inline std::vector<parameter_info> llama_parameter_infos(const llama_config& cfg) {
  cfg.validate();
  const std::int64_t d = cfg.d_model, kv = cfg.kv_dim(), f = cfg.ffn_hidden;
  const float std_in = 0.02f, std_out = float(0.02 / std::sqrt(2.0 * double(cfg.n_layers)));
  std::vector<parameter_info> infos;
  const auto add = [&](std::string name, subspace::shape s, bool decay, float init_std) {
    const auto stream = std::uint64_t(infos.size());
    infos.push_back(parameter_info{std::move(name), s, decay, parameter_init{init_std, 1.0f, stream}});
  };
  add("model.embed_tokens.weight", {cfg.vocab, d}, false, std_in);
  for (std::int64_t l = 0; l < cfg.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "self_attn.q_proj.weight", {d, d}, true, std_in);
    add(p + "self_attn.k_proj.weight", {kv, d}, true, std_in);
    add(p + "self_attn.v_proj.weight", {kv, d}, true, std_in);
    add(p + "self_attn.o_proj.weight", {d, d}, true, std_out);
    add(p + "mlp.gate_proj.weight", {f, d}, true, std_in);
    add(p + "mlp.up_proj.weight", {f, d}, true, std_in);
    add(p + "mlp.down_proj.weight", {d, f}, true, std_out);
    add(p + "input_layernorm.weight", {d}, false, 0.0f);
    add(p + "post_attention_layernorm.weight", {d}, false, 0.0f);
  }
  add("model.norm.weight", {d}, false, 0.0f);
  if (!cfg.tied_embeddings) add("lm_head.weight", {cfg.vocab, d}, true, std_in);
  return infos;
}

/// Which part of a configuration a model instance computes, and how many micro-batches it may hold.
struct llama_stage {
  std::int64_t first_layer = 0;
  std::int64_t last_layer = -1;  // -1: the configuration's n_layers

  /// The stages that cut `cfg`'s layers at `cuts` (ascending, inside (0, n_layers)).
  static std::vector<llama_stage> split(const llama_config& cfg, const std::vector<std::int64_t>& cuts) {
    std::vector<llama_stage> out;
    std::int64_t first = 0;
    for (const std::int64_t c : cuts) {
      require(c > first && c < cfg.n_layers, [&] {
        return "llama_stage::split: cut " + std::to_string(c) + " must lie in (" + std::to_string(first) + ", " +
               std::to_string(cfg.n_layers) + ") (ascending, inside the model)";
      });
      out.push_back({first, c});
      first = c;
    }
    out.push_back({first, cfg.n_layers});
    return out;
  }
};

/// The Llama model, or one stage of it, on executor Exec with weights and activations T (see the top of this
/// file).
template <class Exec, class T, class Blocks = dense_blocks>
class llama {
 public:
  using executor_type = Exec;
  using space = space_of_t<Exec>;
  using value_type = T;
  using grad_type = grad_t<Exec, T>;
  using stat_type = accum_t<T>;
  /// The residual stream between stages: fp32 for a bf16 model (a stage may keep its stream at more precision
  /// than its activations, and a dense stream converts without loss), T otherwise.
  using boundary_type = accum_t<T>;
  using config_type = llama_config;
  using block_type = llama_block<Exec, T, Blocks>;
  using param = parameter<T, grad_type, space>;
  using store_type = parameter_store<T, grad_type, space>;
  using site_type = block_site<store_type>;
  using embedding_type = decltype(std::declval<const Blocks&>().embedding(std::declval<const site_type&>()));
  static_assert(EmbeddingPolicy<embedding_type, Exec, T, grad_type>,
                "llama: the embedding policy must provide forward(ex, tokens, weight, x) and backward(ex, tokens, "
                "dx, dweight) (see nn/block_policies.hpp)");

  /// The whole model of `cfg` (validated) on `ex`, with its own parameter store. The weights are zero until
  /// init() or a load; the gradients start at zero.
  explicit llama(const llama_config& cfg, Exec ex = {}, Blocks blocks = {})
      : llama(cfg, ex, llama_stage{}, nullptr, std::move(blocks)) {}

  /// Stage `stage` of `cfg`, declaring its tensors in `store` (a new store when null: share one between the
  /// stages a rank holds, built in order).
  llama(const llama_config& cfg, Exec ex, llama_stage stage, std::shared_ptr<store_type> store = nullptr,
        Blocks blocks = {})
      : cfg_(cfg), ex_(ex), blocks_factory_(std::move(blocks)) {
    cfg_.validate();
    if (stage.last_layer < 0) stage.last_layer = cfg_.n_layers;
    require(0 <= stage.first_layer && stage.first_layer < stage.last_layer && stage.last_layer <= cfg_.n_layers, [&] {
      return "llama: stage layers [" + std::to_string(stage.first_layer) + ", " + std::to_string(stage.last_layer) +
             ") must be a non-empty range inside [0, " + std::to_string(cfg_.n_layers) + ")";
    });
    stage_ = stage;
    require(attention_supports_head_dim<space>(cfg_.head_dim()), [&] {
      return "llama_config '" + cfg_.name + "': head dim " + std::to_string(cfg_.head_dim()) + " (d_model " +
             std::to_string(cfg_.d_model) + " / n_heads " + std::to_string(cfg_.n_heads) +
             ") is not one the CUDA attention kernels take (16, 32, 64 or 128)";
    });
    require_memory();
    const std::vector<parameter_info> infos = llama_parameter_infos(cfg_);
    require(!cfg_.tied_embeddings || (has_embedding() && has_head()), [&] {
      return "llama: '" + cfg_.name + "' ties the LM head to the embedding, so both must be on one stage (layers [" +
             std::to_string(stage.first_layer) + ", " + std::to_string(stage.last_layer) + ") of " +
             std::to_string(cfg_.n_layers) + ")";
    });
    store_ = store ? std::move(store) : std::make_shared<store_type>();
    store_type& st = *store_;
    first_param_ = st.size();
    constexpr std::size_t per_layer = block_type::per_layer;
    if (has_embedding()) {
      embed_index_ = st.add(detail::parameter_for(blocks_factory_, site_type{-1, cfg_, st}, infos[0]));
      embedding_ = std::make_unique<embedding_type>(blocks_factory_.embedding(site_type{-1, cfg_, st}));
    }
    blocks_.reserve(std::size_t(stage_.last_layer - stage_.first_layer));
    for (std::int64_t l = stage_.first_layer; l < stage_.last_layer; ++l)
      blocks_.emplace_back(cfg_, l, infos, 1 + per_layer * std::size_t(l), st, blocks_factory_);
    if (has_head()) {
      const std::size_t after_blocks = 1 + per_layer * std::size_t(cfg_.n_layers);
      norm_index_ = st.add(infos[after_blocks]);
      head_index_ = cfg_.tied_embeddings ? embed_index_ : st.add(infos[after_blocks + 1]);
    }
    last_param_ = st.size();

    // The RoPE inverse frequencies, in the executor's memory.
    const std::vector<float> f = rope_inv_freq(cfg_.rope, cfg_.head_dim());
    inv_freq_ = tensor<float, space>(shape{std::int64_t(f.size())});
    copy(ex_, view<const float, host_space>(f.data(), shape{std::int64_t(f.size())}), inv_freq_.v());
    ex_.synchronize();  // f is a local
    bind();
  }

  llama(const llama&) = delete;
  llama& operator=(const llama&) = delete;
  llama(llama&&) = default;
  llama& operator=(llama&&) = default;

  const llama_config& config() const { return cfg_; }
  const Exec& executor() const { return ex_; }
  const llama_stage& stage() const { return stage_; }
  bool has_embedding() const { return stage_.first_layer == 0; }
  bool has_head() const { return stage_.last_layer == cfg_.n_layers; }
  /// The extents of the stream between stages for a micro-batch of `rows` tokens: [rows, d].
  shape boundary_shape(std::int64_t rows) const { return shape{rows, cfg_.d_model}; }

  /// The parameter store (shared with the other stages built on it).
  store_type& parameters() { return *store_; }
  const store_type& parameters() const { return *store_; }
  const std::shared_ptr<store_type>& shared_parameters() const { return store_; }
  /// This model's tensors are store indices [first_parameter(), last_parameter()).
  std::size_t first_parameter() const { return first_param_; }
  std::size_t last_parameter() const { return last_param_; }
  /// Elements in this model's parameter tensors.
  std::int64_t parameter_count() const {
    std::int64_t n = 0;
    for (std::size_t i = first_param_; i < last_param_; ++i) n += store_->info(i).shape.numel();
    return n;
  }

  /// Bytes of the activation allocations of every slot (0 before the first call), and of the backward scratch.
  std::size_t activation_bytes() const {
    std::size_t n = std::size_t(scratch_arena_.numel());
    for (const auto& s : slots_) n += std::size_t(s.arena.numel()) + std::size_t(s.keep_arena.numel());
    return n;
  }

  /// Layer l of the configuration (a layer of this stage), with its parameters and policies.
  block_type& block(std::int64_t l) { return blocks_.at(local_layer(l)); }
  const block_type& block(std::int64_t l) const { return blocks_.at(local_layer(l)); }

  /// Initialises this model's tensors from the Philox streams of `seed` (see the top of the file).
  void init(std::uint64_t seed) {
    bind();
    store_->init(ex_, seed, first_param_, last_param_);
  }

  /// The global positions of the rows of every sequence, as consecutive chunks (nn/block_policies.hpp): empty for
  /// one chunk at position 0. A context-parallel trainer gives each rank its chunks (with an attention policy
  /// that sees the other ranks' chunks). The rows must add up to the sequence length of each call, and every
  /// position must stay below max_seq.
  void set_positions(std::vector<position_chunk> chunks) {
    for (const position_chunk& c : chunks)
      require(c.rows > 0 && c.pos0 >= 0 && c.pos0 + c.rows <= cfg_.max_seq, [&] {
        return "llama::set_positions: chunk {rows " + std::to_string(c.rows) + ", pos0 " + std::to_string(c.pos0) +
               "} must have rows > 0 and lie in [0, max_seq " + std::to_string(cfg_.max_seq) + ")";
      });
    positions_ = std::move(chunks);
  }
  /// One chunk starting at global position pos0 (a later piece of every sequence).
  void set_position_offset(std::int64_t pos0) {
    require(pos0 >= 0,
            [&] { return "llama::set_position_offset: the offset must be non-negative, got " + std::to_string(pos0); });
    pos0_ = pos0;
    positions_.clear();
  }
  std::int64_t position_offset() const { return positions_.empty() ? pos0_ : positions_.front().pos0; }

  /// Sets every gradient of the store to zero.
  void zero_grad() { store_->zero_grad(ex_); }

  /// Calls the policies' after_step hooks (after every optimizer step).
  void after_step() {
    for (auto& b : blocks_) b.after_step(ex_, *store_);
    if (embedding_) detail::after_step_policy(*embedding_, ex_, *store_);
  }

  /// What one stage call reads and writes: tokens and targets [B, S] (host int32; targets are read by the last
  /// stage only), the residual stream coming in [B·S, d] (not for the first stage) and going out (not for the
  /// last).
  struct stage_io {
    view<const std::int32_t, host_space> tokens, targets;
    view<const boundary_type, space> in;
    view<boundary_type, space> out;
  };

  /// The training forward pass of micro-batch slot `slot`: saves the activations there; the last stage returns
  /// the mean loss over the targets ≠ -1 and already accumulates the LM head's weight gradient of
  /// loss_scale · loss (other stages return 0). Call backward(slot, ...) next.
  double forward(std::size_t slot, const stage_io& io, float loss_scale) { return run(slot, io, true, loss_scale); }
  /// The forward pass without gradient state (the loss alone, on the last stage).
  double evaluate(std::size_t slot, const stage_io& io) { return run(slot, io, false, 0.0f); }

  /// Accumulates into the gradients those of loss_scale · loss for the forward of `slot`: grad_out = dL/d(out)
  /// (not for the last stage), grad_in ← dL/d(in) (not for the first). Calls ready(first, last) each time the
  /// gradients of store tensors [first, last) are complete — the final norm and LM head, then layer by layer
  /// down, then the embedding (with a tied head it completes only there); on CUDA "complete" means ordered on
  /// the executor's stream. Distributed trainers start communicating a bucket from the hook.
  template <class Ready>
  void backward(std::size_t slot, view<const boundary_type, space> grad_out, view<boundary_type, space> grad_in,
                Ready&& ready) {
    run_backward(slot, grad_out, grad_in, ready, false);
  }

  /// The layers' projection policies split their backward (dense_blocks and subspace_blocks do), so a zero-bubble
  /// pipeline schedule can run backward_input and backward_weight apart.
  static constexpr bool splits_backward = block_type::splits_backward;

  /// The first half of a split backward: dL/d(in) (grad_in) and the gradients of the norm gains, the head and the
  /// embedding, with ready() for those; the layers' weight products wait for backward_weight(slot, ready), which
  /// the slot's activations (and the output gradients kept here) stay alive for. backward_input then
  /// backward_weight accumulates exactly what backward accumulates.
  template <class Ready>
  void backward_input(std::size_t slot, view<const boundary_type, space> grad_out, view<boundary_type, space> grad_in,
                      Ready&& ready)
    requires splits_backward
  {
    run_backward(slot, grad_out, grad_in, ready, true);
  }

  /// The second half: every layer's weight products from what backward_input kept; ready() per layer.
  template <class Ready>
  void backward_weight(std::size_t slot, Ready&& ready)
    requires splits_backward
  {
    slot_state& st = slot_at(slot, "backward_weight");
    require(st.weights_pending, "llama::backward_weight: call backward_input() on this slot first");
    st.weights_pending = false;
    bind();
    const typename block_type::context c = context_of(st, slot);
    for (std::size_t l = blocks_.size(); l-- > 0;) {
      blocks_[l].backward_weight(ex_, c, st.acts[l], st.keep[l]);
      ready(blocks_[l].first_parameter(), blocks_[l].last_parameter());
    }
  }

  // The whole model, one micro-batch at a time (slot 0).

  /// The training forward pass on tokens and targets (host int32 views [B, S]; targets of -1 are ignored).
  double forward(view<const std::int32_t, host_space> tokens, view<const std::int32_t, host_space> targets,
                 float loss_scale = 1.0f) {
    require_whole("forward");
    return forward(0, stage_io{tokens, targets, {}, {}}, loss_scale);
  }
  /// The loss alone (no gradient work; the gradients are left as they are).
  double evaluate(view<const std::int32_t, host_space> tokens, view<const std::int32_t, host_space> targets) {
    require_whole("evaluate");
    return evaluate(0, stage_io{tokens, targets, {}, {}});
  }
  /// Accumulates into every gradient the gradient of loss_scale · loss of the last forward().
  void backward() {
    backward([](std::size_t, std::size_t) {});
  }
  template <class Ready>
  void backward(Ready&& ready) {
    require_whole("backward");
    backward(0, view<const boundary_type, space>{}, view<boundary_type, space>{}, ready);
  }

  /// The logits at the last position of every sequence: out [B, V] (float or T, the executor's space) for
  /// tokens [B, S] (host int32). Overwrites slot 0's activations.
  template <class U>
  void logits(view<const std::int32_t, host_space> tokens, view<U, space> out) {
    require_whole("logits");
    slot_state& st = slot_at(0, "logits");
    st.backward_ready = false;
    const auto [b, s] = check_batch(tokens, "logits");
    subspace::detail::layer::require_shape(out, shape{b, cfg_.vocab}, "llama::logits", "out");
    bind();
    prepare(st, b, s);
    run_layers(st, 0, stage_io{tokens, {}, {}, {}});
    const std::int64_t d = cfg_.d_model;
    const view<const T, space> last(st.lnf.data() + (s - 1) * d, shape{b, d}, {s * d, 1, 0, 0});
    gemm(ex_, op::none, op::transpose, 1.0f, last, detail::ro(head_.value), 0.0f, out);
  }

 private:
  using loss_type = accum_t<T>;

  /// The activations of one micro-batch slot (views into its arena), sized for (batch, seq).
  struct slot_state {
    tensor<std::byte, space> arena;
    std::int64_t batch = 0, seq = 0, counted = 0;
    view<std::int32_t, space> tokens, targets;
    std::vector<view<T, space>> x;  // the residual stream entering each local layer; x.back() leaves the last
    std::vector<typename block_type::activations> acts;
    view<T, space> lnf;             // [N, d] final norm (the LM head's input), last stage
    view<stat_type, space> rstdf;   // [N]
    view<loss_type, space> losses;  // [N] per-token cross-entropy (0 for ignored targets)
    view<T, space> dlnf;            // [N, d] dL/dlnf from the loss
    bool backward_ready = false;
    // A split backward's kept output gradients, per layer (allocated on first use).
    tensor<std::byte, space> keep_arena;
    std::vector<typename block_type::deferred> keep;
    std::int64_t keep_batch = 0, keep_seq = 0;
    bool weights_pending = false;
  };

  /// Checks, before the layers' descriptions are built, that this stage's values and gradients fit the memory of
  /// the executor's space: a configuration too large for the machine fails here, naming its sizes.
  void require_memory() const {
    const std::int64_t layers = stage_.last_layer - stage_.first_layer;
    const std::int64_t embedding = cfg_.vocab * cfg_.d_model;  // validated: no overflow
    const std::int64_t count = layers * cfg_.layer_parameters() + (has_embedding() ? embedding : 0) +
                               (has_head() ? cfg_.d_model + (cfg_.tied_embeddings ? 0 : embedding) : 0);
    require_capacity<space>(std::uint64_t(count) * (sizeof(T) + sizeof(grad_type)), [&] {
      return "llama_config '" + cfg_.name + "' (vocab " + std::to_string(cfg_.vocab) + ", d_model " +
             std::to_string(cfg_.d_model) + ", n_layers " + std::to_string(cfg_.n_layers) + ", ffn_hidden " +
             std::to_string(cfg_.ffn_hidden) + "): the " + std::to_string(count) + " parameters of layers [" +
             std::to_string(stage_.first_layer) + ", " + std::to_string(stage_.last_layer) + ") with their gradients";
    });
  }

  std::size_t local_layer(std::int64_t l) const {
    require(stage_.first_layer <= l && l < stage_.last_layer, [&] {
      return "llama::block: layer " + std::to_string(l) + " is not on this stage (layers [" +
             std::to_string(stage_.first_layer) + ", " + std::to_string(stage_.last_layer) + "))";
    });
    return std::size_t(l - stage_.first_layer);
  }

  void require_whole(const char* op) const {
    require(has_embedding() && has_head(), [&] {
      return std::string("llama::") + op + "(tokens, ...): this model is a stage (layers [" +
             std::to_string(stage_.first_layer) + ", " + std::to_string(stage_.last_layer) +
             ")); call the slot form with the residual stream";
    });
  }

  /// backward, or its first half (split): see backward_input.
  template <class Ready>
  void run_backward(std::size_t slot, view<const boundary_type, space> grad_out, view<boundary_type, space> grad_in,
                    Ready& ready, bool split) {
    slot_state& st = slot_at(slot, split ? "backward_input" : "backward");
    require(st.backward_ready,
            "llama::backward: call forward() on this slot first (evaluate() and logits() save "
            "no gradient state, and backward runs once per forward)");
    require(!st.weights_pending, "llama::backward: the slot's backward_weight() is still due");
    st.backward_ready = false;
    bind();
    const std::int64_t n = st.batch * st.seq, d = cfg_.d_model;
    prepare_scratch(st.batch, st.seq);
    if (split) prepare_keep(st);
    const typename block_type::context c = context_of(st, slot);
    const std::size_t L = blocks_.size();
    if (has_head()) {
      rmsnorm_backward(ex_, detail::ro(st.x[L]), detail::ro(norm_.value), detail::ro(st.rstdf), detail::ro(st.dlnf),
                       dres_, norm_.grad);
      if (cfg_.tied_embeddings) ready(norm_index_, norm_index_ + 1);
      else ready(norm_index_, head_index_ + 1);  // the head's gradient came from forward
    } else {
      check_boundary(grad_out, n, d, "backward", "grad_out");
      detail::convert_into(ex_, grad_out, dres_);
    }
    for (std::size_t l = L; l-- > 0;) {
      blocks_[l].backward(ex_, c, st.acts[l], detail::ro(st.x[l]), dres_, scratch_, split ? &st.keep[l] : nullptr);
      if (!split) ready(blocks_[l].first_parameter(), blocks_[l].last_parameter());
    }
    st.weights_pending = split;
    if (has_embedding()) {
      embedding_->backward(ex_, boundary_site(c), detail::ro(dres_), embed_.grad);
      ready(embed_index_, embed_index_ + 1);
    } else {
      check_boundary(grad_in, n, d, "backward", "grad_in");
      detail::convert_into(ex_, detail::ro(dres_), grad_in);
    }
  }

  /// Sizes the slot's kept output gradients (a split backward) for its (batch, seq) and carves them.
  void prepare_keep(slot_state& st) {
    if (st.keep_batch == st.batch && st.keep_seq == st.seq) return;
    const auto carve_all = [&](auto& a) {
      const std::int64_t b = st.batch, s = st.seq, n = b * s, d = cfg_.d_model, f = cfg_.ffn_hidden, hq = cfg_.n_heads,
                         hkv = cfg_.n_kv_heads, hd = cfg_.head_dim();
      st.keep.assign(blocks_.size(), {});
      for (auto& k : st.keep) {
        k.d_down = a.template take<T>({n, d});
        k.d_o = a.template take<T>({n, d});
        k.dgate = a.template take<T>({n, f});
        k.dup = a.template take<T>({n, f});
        if constexpr (block_type::recomputes_hact) k.hact = a.template take<T>({n, f});
        k.dq = a.template take<T>({b, s, hq, hd});
        k.dk = a.template take<T>({b, s, hkv, hd});
        k.dv = a.template take<T>({b, s, hkv, hd});
      }
    };
    detail::arena<space> measure;
    carve_all(measure);
    st.keep_arena = tensor<std::byte, space>(shape{std::int64_t(measure.bytes())});
    detail::arena<space> carve(st.keep_arena.data());
    carve_all(carve);
    st.keep_batch = st.batch;
    st.keep_seq = st.seq;
  }

  /// Allocates the store when tensors were declared since, and re-reads every view when it moved.
  void bind() {
    store_->allocate(ex_);
    if (bound_generation_ == store_->generation()) return;
    bound_generation_ = store_->generation();
    if (has_embedding()) {
      embed_ = (*store_)[embed_index_];
      detail::bind_policy(*embedding_, *store_);
    }
    for (auto& b : blocks_) b.bind(*store_);
    if (has_head()) {
      norm_ = (*store_)[norm_index_];
      head_ = (*store_)[head_index_];
    }
  }

  slot_state& slot_at(std::size_t slot, const char* op) {
    if (slot >= slots_.size()) {
      require(slot < 4096, [&] {
        return std::string("llama::") + op + ": activation slot " + std::to_string(slot) + " is unreasonably large";
      });
      slots_.resize(slot + 1);
    }
    return slots_[slot];
  }

  std::pair<std::int64_t, std::int64_t> check_batch(view<const std::int32_t, host_space> tokens, const char* op) const {
    require(tokens.rank() == 2 && tokens.dim(0) > 0 && tokens.dim(1) > 0, [&] {
      return std::string("llama::") + op + ": tokens must be a non-empty [B, S] view, got shape " +
             to_string(tokens.shape());
    });
    const std::int64_t s = tokens.dim(1);
    if (positions_.empty()) {
      require(pos0_ + s <= cfg_.max_seq, [&] {
        return std::string("llama::") + op + ": sequence length " + std::to_string(s) +
               (pos0_ > 0 ? " at position offset " + std::to_string(pos0_) : std::string()) + " exceeds max_seq " +
               std::to_string(cfg_.max_seq) + " of '" + cfg_.name + "'";
      });
    } else {
      std::int64_t rows = 0;
      for (const position_chunk& c : positions_) rows += c.rows;
      require(rows == s, [&] {
        return std::string("llama::") + op + ": the position chunks cover " + std::to_string(rows) +
               " rows, the sequence has " + std::to_string(s);
      });
    }
    subspace::detail::layer::require_contiguous(tokens, "llama", "tokens");
    return {tokens.dim(0), s};
  }

  void check_boundary(view<const boundary_type, space> v, std::int64_t n, std::int64_t d, const char* op,
                      const char* name) const {
    require(v.shape() == shape{n, d}, [&] {
      return std::string("llama::") + op + ": " + name + " has shape " + to_string(v.shape()) + ", expected [" +
             std::to_string(n) + ", " + std::to_string(d) + "] (this stage starts at layer " +
             std::to_string(stage_.first_layer) + " and ends at " + std::to_string(stage_.last_layer) + ")";
    });
  }

  typename block_type::context context_of(const slot_state& st, std::size_t slot) {
    if (positions_.empty()) default_positions_ = {position_chunk{st.seq, pos0_}};
    const std::span<const position_chunk> p = positions_.empty() ? std::span<const position_chunk>(default_positions_)
                                                                 : std::span<const position_chunk>(positions_);
    return {st.batch, st.seq, slot, p, inv_freq_.v(), view<const std::int32_t, space>(st.tokens)};
  }
  /// The site of the embedding and the stage boundaries (layer -1).
  static stream_site<space> boundary_site(const typename block_type::context& c) {
    return {-1, sublayer::attention, c.slot, c.tokens};
  }

  /// Sizes a slot's activation allocation for (b, s) and carves it.
  void prepare(slot_state& st, std::int64_t b, std::int64_t s) {
    if (b == st.batch && s == st.seq) return;
    detail::arena<space> measure;
    layout(st, measure, b, s);
    st.arena = tensor<std::byte, space>(shape{std::int64_t(measure.bytes())});
    detail::arena<space> carve(st.arena.data());
    layout(st, carve, b, s);
    st.batch = b;
    st.seq = s;
  }

  template <class Arena>
  void layout(slot_state& st, Arena& a, std::int64_t b, std::int64_t s) {
    const std::int64_t n = b * s, d = cfg_.d_model, f = cfg_.ffn_hidden, hq = cfg_.n_heads, hkv = cfg_.n_kv_heads,
                       hd = cfg_.head_dim();
    const std::size_t L = blocks_.size();
    st.tokens = a.template take<std::int32_t>({n});
    st.targets = a.template take<std::int32_t>({n});
    st.x.assign(L + 1, {});
    for (auto& x : st.x) x = a.template take<T>({n, d});
    st.acts.assign(L, {});
    // h is the forward's scratch when the backward recomputes it: one buffer for the slot's layers.
    const view<T, space> shared_hact = block_type::recomputes_hact ? a.template take<T>({n, f}) : view<T, space>{};
    for (auto& act : st.acts) {
      act.ln1 = a.template take<T>({n, d});
      act.rstd1 = a.template take<stat_type>({n});
      act.q = a.template take<T>({b, s, hq, hd});
      act.k = a.template take<T>({b, s, hkv, hd});
      act.v = a.template take<T>({b, s, hkv, hd});
      act.att = a.template take<T>({b, s, hq, hd});
      act.lse = a.template take<stat_type>({b, hq, s});
      act.mid = a.template take<T>({n, d});
      act.ln2 = a.template take<T>({n, d});
      act.rstd2 = a.template take<stat_type>({n});
      act.gate = a.template take<T>({n, f});
      act.up = a.template take<T>({n, f});
      act.hact = block_type::recomputes_hact ? shared_hact : a.template take<T>({n, f});
    }
    if (has_head()) {
      st.lnf = a.template take<T>({n, d});
      st.rstdf = a.template take<stat_type>({n});
      st.losses = a.template take<loss_type>({n});
      st.dlnf = a.template take<T>({n, d});
    }
  }

  /// Sizes the backward scratch shared by the slots for (b, s).
  void prepare_scratch(std::int64_t b, std::int64_t s) {
    if (b == scratch_batch_ && s == scratch_seq_) return;
    const auto carve_all = [&](auto& a) {
      const std::int64_t n = b * s, d = cfg_.d_model, f = cfg_.ffn_hidden, hq = cfg_.n_heads, hkv = cfg_.n_kv_heads,
                         hd = cfg_.head_dim();
      dres_ = a.template take<T>({n, d});
      scratch_.dln = a.template take<T>({n, d});
      scratch_.dq = a.template take<T>({b, s, hq, hd});
      scratch_.datt = a.template take<T>({b, s, hq, hd});
      scratch_.dk = a.template take<T>({b, s, hkv, hd});
      scratch_.dv = a.template take<T>({b, s, hkv, hd});
      scratch_.dgate = a.template take<T>({n, f});
      scratch_.dup = a.template take<T>({n, f});
      scratch_.dhact = a.template take<T>({n, f});
    };
    detail::arena<space> measure;
    carve_all(measure);
    scratch_arena_ = tensor<std::byte, space>(shape{std::int64_t(measure.bytes())});
    detail::arena<space> carve(scratch_arena_.data());
    carve_all(carve);
    scratch_batch_ = b;
    scratch_seq_ = s;
  }

  /// The embedding (first stage) or the incoming stream, every layer, and the final norm (last stage).
  void run_layers(slot_state& st, std::size_t slot, const stage_io& io) {
    const std::int64_t n = st.batch * st.seq;
    copy(ex_, io.tokens.flat(), st.tokens);
    const typename block_type::context c = context_of(st, slot);
    if (has_embedding()) {
      embedding_->forward(ex_, boundary_site(c), detail::ro(embed_.value), st.x[0]);
    } else {
      check_boundary(io.in, n, cfg_.d_model, "forward", "in");
      detail::enter_stream(blocks_.front().residual, ex_, boundary_site(c), io.in, st.x[0]);
    }
    for (std::size_t l = 0; l < blocks_.size(); ++l)
      blocks_[l].forward(ex_, c, st.acts[l], detail::ro(st.x[l]), st.x[l + 1]);
    if (has_head()) {
      rmsnorm_forward(ex_, detail::ro(st.x.back()), detail::ro(norm_.value), cfg_.norm_eps, st.lnf, st.rstdf);
    } else {
      check_boundary(io.out, n, cfg_.d_model, "forward", "out");
      detail::leave_stream(blocks_.back().residual, ex_, boundary_site(c), detail::ro(st.x.back()), io.out);
    }
  }

  double run(std::size_t slot, const stage_io& io, bool gradients, float loss_scale) {
    const char* op = gradients ? "forward" : "evaluate";
    slot_state& st = slot_at(slot, op);
    st.backward_ready = false;
    const auto [b, s] = check_batch(io.tokens, op);
    std::int64_t counted = 0;
    if (has_head()) {
      require(io.targets.shape() == io.tokens.shape(), [&] {
        return std::string("llama::") + op + ": targets have shape " + to_string(io.targets.shape()) + ", tokens " +
               to_string(io.tokens.shape());
      });
      subspace::detail::layer::require_contiguous(io.targets, "llama", "targets");
      for (std::int64_t i = 0; i < io.targets.numel(); ++i) {
        const std::int32_t t = io.targets.data()[i];
        if (t != -1 && (t < 0 || t >= cfg_.vocab)) [[unlikely]]
          throw invalid_argument("llama::" + std::string(op) + ": target " + std::to_string(t) + " at position " +
                                 std::to_string(i) + " is outside the vocabulary [0, " + std::to_string(cfg_.vocab) +
                                 ") and is not -1 (ignored)");
        counted += t != -1;
      }
    }
    bind();
    prepare(st, b, s);
    run_layers(st, slot, io);
    st.backward_ready = gradients;
    if (!has_head()) return 0.0;

    copy(ex_, io.targets.flat(), st.targets);
    const float grad_scale = counted > 0 ? float(double(loss_scale) / double(counted)) : 0.0f;
    const view<const T, space> h = detail::ro(st.lnf);
    const view<const std::int32_t, space> tg(st.targets);
    if (gradients)
      lm_head_cross_entropy(ex_, h, detail::ro(head_.value), tg, st.losses, st.dlnf, head_.grad, grad_scale);
    else
      lm_head_cross_entropy(ex_, h, detail::ro(head_.value), tg, st.losses, view<T, space>{}, view<grad_type, space>{},
                            grad_scale);
    const double total = double(sum(ex_, detail::ro(st.losses)));
    return counted > 0 ? total / double(counted) : 0.0;
  }

  llama_config cfg_;
  Exec ex_;
  Blocks blocks_factory_;
  llama_stage stage_{};
  std::shared_ptr<store_type> store_;
  std::size_t first_param_ = 0, last_param_ = 0;
  std::size_t embed_index_ = 0, norm_index_ = 0, head_index_ = 0;
  std::uint64_t bound_generation_ = 0;
  param embed_, norm_, head_;
  std::unique_ptr<embedding_type> embedding_;  // first stage only
  std::vector<block_type> blocks_;
  tensor<float, space> inv_freq_;
  std::vector<position_chunk> positions_;  // empty: one chunk at pos0_
  std::vector<position_chunk> default_positions_;
  std::int64_t pos0_ = 0;

  std::vector<slot_state> slots_;
  tensor<std::byte, space> scratch_arena_;
  std::int64_t scratch_batch_ = 0, scratch_seq_ = 0;
  view<T, space> dres_;  // [N, d] dL/d(residual stream) in backward
  typename block_type::scratch scratch_{};
};

}  // namespace subspace::nn

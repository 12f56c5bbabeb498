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
// Storage: every parameter value lives in one allocation of T, every gradient in one allocation of G (so
// zero_grad is one fill and an optimizer may treat them as flat), each parameter padded to 256 bytes. Every
// activation, saved statistic and backward scratch buffer lives in one byte allocation, carved into typed views
// (a first pass measures, a second carves); it is sized for the (batch, sequence) of the call and reallocated
// only when that changes.
//
// Parameters carry Hugging Face Llama names and layouts (W stored [out, in]; RoPE pairs (i, i + hd/2), so HF
// q/k weights load unpermuted), in HF's order: model.embed_tokens.weight; per layer model.layers.N.self_attn.
// {q,k,v,o}_proj.weight, mlp.{gate,up,down}_proj.weight, input_layernorm.weight, post_attention_layernorm.weight;
// model.norm.weight; lm_head.weight (absent when the head is tied to the embedding). Weight decay applies to the
// 2-D projection matrices and an untied lm_head only (not the norms, not the embedding).
//
// Initialisation (init(seed)): parameter i of that order is drawn from the Philox stream (seed, i) by fill_normal,
// N(0, 0.02²), the output projections o_proj and down_proj N(0, (0.02 / sqrt(2 L))²), norm gains 1; the draws
// are the same on the host and the device, rounded to each model's T. fill_initial gives the same values in any
// other element type (an optimizer's fp32 master weights).
//
// A training step:
//   model.zero_grad();
//   double loss = model.forward(tokens, targets, loss_scale);   // host [B, S] int32 views
//   model.backward();                                            // gradients of loss_scale · loss, accumulated
// forward() already adds the LM head's weight gradient (the fused head + cross-entropy kernel computes the loss
// and its gradients in one pass, so the B·S × V logits never exist at once); evaluate() computes the loss alone
// and leaves the gradients untouched. Targets of -1 are ignored: the loss is the mean over the others.
//
// The attention and the two output projections of every block are policies (nn/block_policies.hpp).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "../kernels/attention.hpp"
#include "../kernels/detail/layer_checks.hpp"
#include "../kernels/elementwise.hpp"
#include "../kernels/embedding.hpp"
#include "../kernels/gemm.hpp"
#include "../kernels/loss.hpp"
#include "../kernels/norm.hpp"
#include "../kernels/random.hpp"
#include "../kernels/reduce.hpp"
#include "../kernels/rope.hpp"
#include "../kernels/swiglu.hpp"
#include "../optim/concepts.hpp"
#include "block_policies.hpp"
#include "config.hpp"

namespace subspace::nn {

/// The weight-gradient type of a model on Exec with weights T: T on the host, fp32 in device memory.
template <class Exec, class T>
using grad_t = std::conditional_t<std::is_same_v<space_of_t<Exec>, device_space>, float, T>;

/// A parameter tensor: its value and its gradient (views into the model's two allocations).
template <class T, class G, class Space>
struct parameter {
  view<T, Space> value;
  view<G, Space> grad;
};

/// What the model knows about one parameter tensor besides its storage.
struct parameter_spec {
  std::string name;           // the Hugging Face name
  subspace::shape shape{};    // HF layout (W [out, in])
  bool decay = false;         // weight decay: the 2-D projection matrices only
  float init_std = 0.0f;      // N(0, init_std²) from the Philox stream (seed, rng_offset); 0: ones (norm gains)
  std::uint64_t rng_offset = 0;
};

/// Fills x with the initial values of parameter `spec` for `seed`, in x's element type and the executor's space:
/// the values llama::init writes, before their rounding to the model's T.
template <class Exec, class U>
void fill_initial(const Exec& ex, view<U, space_of_t<Exec>> x, const parameter_spec& spec, std::uint64_t seed) {
  require(x.shape() == spec.shape, "fill_initial: " + spec.name + " has shape " + to_string(spec.shape) +
                                       ", the view has shape " + to_string(x.shape()));
  if (spec.init_std == 0.0f)
    fill(ex, x, U(1.0f));
  else
    fill_normal(ex, x, seed, spec.rng_offset, 0.0f, spec.init_std);
}

/// The parameters of `cfg` in Hugging Face's order, with their shapes, decay flags and initialisation.
inline std::vector<parameter_spec> llama_parameter_specs(const llama_config& cfg) {
  cfg.validate();
  const std::int64_t d = cfg.d_model, kv = cfg.kv_dim(), f = cfg.ffn_hidden;
  const float std_in = 0.02f, std_out = float(0.02 / std::sqrt(2.0 * double(cfg.n_layers)));
  std::vector<parameter_spec> specs;
  const auto add = [&](std::string name, subspace::shape s, bool decay, float init_std) {
    const auto index = std::uint64_t(specs.size());
    specs.push_back(parameter_spec{std::move(name), s, decay, init_std, index});
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
  return specs;
}

namespace detail {

/// Carves typed views out of one byte allocation, each 256-byte aligned. Measure with a null base, allocate
/// bytes(), then carve the same sequence again from the real base.
template <class Space>
class arena {
 public:
  static constexpr std::size_t alignment = 256;
  explicit arena(std::byte* base = nullptr) : base_(base) {}

  template <class U>
  view<U, Space> take(const shape& s) {
    offset_ = (offset_ + alignment - 1) / alignment * alignment;
    U* p = base_ ? reinterpret_cast<U*>(base_ + offset_) : nullptr;
    offset_ += std::size_t(s.numel()) * sizeof(U);
    return view<U, Space>(p, s);
  }
  std::size_t bytes() const { return offset_; }

 private:
  std::byte* base_;
  std::size_t offset_ = 0;
};

/// The read-only view of v (what the policies' inputs are).
template <class U, class Space>
view<const U, Space> ro(view<U, Space> v) {
  return v;
}

}  // namespace detail

/// One pre-norm Llama layer: its parameters (views into the model's storage), its policies, and its forward and
/// backward passes over activations the model owns.
template <class Exec, class T, class Attention = dense_attention, class Projection = dense_projection>
class llama_block {
 public:
  using space = space_of_t<Exec>;
  using grad_type = grad_t<Exec, T>;
  using stat_type = accum_t<T>;
  using param = parameter<T, grad_type, space>;

  /// The sizes a block needs from the configuration.
  struct dims {
    std::int64_t d = 0, heads = 0, kv_heads = 0, head_dim = 0, ffn = 0;
    float eps = 1e-5f;
  };

  /// What one layer saves in forward for its backward pass. N = B·S rows.
  struct activations {
    view<T, space> ln1;               // [N, d] input_layernorm(x)
    view<stat_type, space> rstd1;     // [N]
    view<T, space> q, k, v;           // [B, S, Hq | Hkv, hd], q and k after RoPE
    view<T, space> att;               // [B, S, Hq, hd] attention output (o_proj's input)
    view<stat_type, space> lse;       // [B, Hq, S]
    view<T, space> mid;               // [N, d] x + attention branch
    view<T, space> ln2;               // [N, d] post_attention_layernorm(mid)
    view<stat_type, space> rstd2;     // [N]
    view<T, space> gate, up, hact;    // [N, f] gate_proj, up_proj, silu(gate) * up
  };

  /// Backward scratch, shared by every layer (overwritten layer by layer).
  struct scratch {
    view<T, space> dx, dln;           // [N, d]
    view<T, space> dq, datt;          // [B, S, Hq, hd]
    view<T, space> dk, dv;            // [B, S, Hkv, hd]
    view<T, space> dgate, dup, dhact; // [N, f]
  };

  /// The batch geometry and RoPE table of one call.
  struct context {
    std::int64_t batch = 0, seq = 0, pos0 = 0;
    view<const float, space> inv_freq;  // [hd / 2]
  };

  // Parameters, in Hugging Face's order.
  param q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, input_layernorm, post_attention_layernorm;

  // Policies: the attention, and the two projections that write into the residual stream.
  Attention attention{};
  Projection o_projection{}, down_projection{};

  dims size{};

  /// y = x + attention branch + MLP branch, saving what backward needs in `a`.
  void forward(const Exec& ex, const context& c, const activations& a, view<const T, space> x,
               view<T, space> y) {
    using detail::ro;
    const std::int64_t n = c.batch * c.seq;
    rmsnorm_forward(ex, x, ro(input_layernorm.value), size.eps, a.ln1, a.rstd1);
    linear(ex, a.ln1, q_proj, a.q);
    linear(ex, a.ln1, k_proj, a.k);
    linear(ex, a.ln1, v_proj, a.v);
    rope_apply(ex, a.q, c.inv_freq, c.pos0, false);
    rope_apply(ex, a.k, c.inv_freq, c.pos0, false);
    attention.forward(ex, ro(a.q), ro(a.k), ro(a.v), a.att, a.lse);
    o_projection.forward(ex, ro(rows(a.att, n)), ro(o_proj.value), a.mid);
    axpy(ex, 1.0f, x, a.mid);  // mid = x + o_proj(att)

    rmsnorm_forward(ex, ro(a.mid), ro(post_attention_layernorm.value), size.eps, a.ln2, a.rstd2);
    linear(ex, a.ln2, gate_proj, a.gate);
    linear(ex, a.ln2, up_proj, a.up);
    swiglu_forward(ex, ro(a.gate), ro(a.up), a.hact);
    down_projection.forward(ex, ro(a.hact), ro(down_proj.value), y);
    axpy(ex, 1.0f, ro(a.mid), y);  // y = mid + down_proj(hact)
  }

  /// On entry dres = dL/dy; on return dres = dL/dx. Weight gradients accumulate.
  void backward(const Exec& ex, const context& c, const activations& a, view<const T, space> x,
                view<T, space> dres, const scratch& s) {
    using detail::ro;
    const std::int64_t n = c.batch * c.seq;
    // MLP branch: y = mid + down(silu(gate(n2)) * up(n2)).
    down_projection.backward(ex, ro(a.hact), ro(down_proj.value), ro(dres), s.dhact, down_proj.grad);
    swiglu_backward(ex, ro(a.gate), ro(a.up), ro(s.dhact), s.dgate, s.dup);
    linear_backward(ex, a.ln2, gate_proj, s.dgate, s.dln, 0.0f);
    linear_backward(ex, a.ln2, up_proj, s.dup, s.dln, 1.0f);
    rmsnorm_backward(ex, ro(a.mid), ro(post_attention_layernorm.value), ro(a.rstd2), ro(s.dln), s.dx,
                     post_attention_layernorm.grad);
    axpy(ex, 1.0f, ro(s.dx), dres);  // dres = dL/dmid

    // Attention branch: mid = x + o(attention(rope(q(n1)), rope(k(n1)), v(n1))).
    const view<T, space> datt_rows = rows(s.datt, n);
    o_projection.backward(ex, ro(rows(a.att, n)), ro(o_proj.value), ro(dres), datt_rows, o_proj.grad);
    attention.backward(ex, ro(a.q), ro(a.k), ro(a.v), ro(a.att), ro(a.lse), ro(s.datt), s.dq, s.dk, s.dv);
    rope_apply(ex, s.dq, c.inv_freq, c.pos0, true);
    rope_apply(ex, s.dk, c.inv_freq, c.pos0, true);
    linear_backward(ex, a.ln1, q_proj, s.dq, s.dln, 0.0f);
    linear_backward(ex, a.ln1, k_proj, s.dk, s.dln, 1.0f);
    linear_backward(ex, a.ln1, v_proj, s.dv, s.dln, 1.0f);
    rmsnorm_backward(ex, x, ro(input_layernorm.value), ro(a.rstd1), ro(s.dln), s.dx, input_layernorm.grad);
    axpy(ex, 1.0f, ro(s.dx), dres);  // dres = dL/dx
  }

 private:
  /// A [B, S, H, hd] buffer as its [N, H·hd] rows (or an [N, k] buffer as itself).
  static view<T, space> rows(view<T, space> v, std::int64_t n) { return v.reshape(shape{n, v.numel() / n}); }

  /// out = in · wᵀ, out of any contiguous shape with N rows.
  static void linear(const Exec& ex, view<T, space> in, const param& w, view<T, space> out) {
    const std::int64_t n = in.dim(0);
    gemm(ex, op::none, op::transpose, 1.0f, detail::ro(in), detail::ro(w.value), 0.0f, rows(out, n));
  }

  /// din = beta · din + dout · w and w.grad += doutᵀ · in (dout of any contiguous shape with N rows).
  static void linear_backward(const Exec& ex, view<T, space> in, const param& w, view<T, space> dout,
                              view<T, space> din, float beta) {
    const std::int64_t n = in.dim(0);
    const view<const T, space> d = detail::ro(rows(dout, n));
    gemm(ex, op::none, op::none, 1.0f, d, detail::ro(w.value), beta, din);
    gemm(ex, op::transpose, op::none, 1.0f, d, detail::ro(in), 1.0f, w.grad);
  }
};

/// The Llama model on executor Exec with weights and activations T (see the top of this file).
template <class Exec, class T, class Attention = dense_attention, class Projection = dense_projection>
class llama {
 public:
  using executor_type = Exec;
  using space = space_of_t<Exec>;
  using value_type = T;
  using grad_type = grad_t<Exec, T>;
  using stat_type = accum_t<T>;
  using block_type = llama_block<Exec, T, Attention, Projection>;
  using param = parameter<T, grad_type, space>;

  static_assert(AttentionPolicy<Attention, Exec, T>,
                "llama: the Attention policy must be default constructible and provide forward(ex, q, k, v, out, "
                "lse) and backward(ex, q, k, v, out, lse, dout, dq, dk, dv) (see nn/block_policies.hpp)");
  static_assert(ProjectionPolicy<Projection, Exec, T, grad_type>,
                "llama: the Projection policy must be default constructible and provide forward(ex, x, w, y) and "
                "backward(ex, x, w, dy, dx, dw) (see nn/block_policies.hpp)");

  /// A model of `cfg` (validated) on `ex`. The weights are uninitialised until init() or a load; the gradients
  /// start at zero.
  explicit llama(const llama_config& cfg, Exec ex = {})
      : cfg_(cfg), ex_(ex), specs_(llama_parameter_specs(cfg)) {
    // Parameters: one allocation of T, one of G, each tensor padded to 256 bytes.
    constexpr std::int64_t pad = 128;  // elements: 256 bytes of bf16, more for wider types
    std::int64_t total = 0;
    for (const auto& s : specs_) {
      offsets_.push_back(total);
      total += (s.shape.numel() + pad - 1) / pad * pad;
    }
    offsets_.push_back(total);
    values_ = tensor<T, space>(shape{total});
    grads_ = tensor<grad_type, space>(shape{total});
    fill(ex_, values_.v(), T(0.0f));  // the padding stays zero: flat ranges of values are safe to communicate
    for (std::size_t i = 0; i < specs_.size(); ++i)
      params_.push_back(param{view<T, space>(values_.data() + offsets_[i], specs_[i].shape),
                              view<grad_type, space>(grads_.data() + offsets_[i], specs_[i].shape)});
    zero_grad();

    std::size_t next = 0;
    embed_ = params_[next++];
    blocks_.resize(std::size_t(cfg_.n_layers));
    for (auto& b : blocks_) {
      b.q_proj = params_[next++];
      b.k_proj = params_[next++];
      b.v_proj = params_[next++];
      b.o_proj = params_[next++];
      b.gate_proj = params_[next++];
      b.up_proj = params_[next++];
      b.down_proj = params_[next++];
      b.input_layernorm = params_[next++];
      b.post_attention_layernorm = params_[next++];
      b.size = {cfg_.d_model, cfg_.n_heads, cfg_.n_kv_heads, cfg_.head_dim(), cfg_.ffn_hidden, cfg_.norm_eps};
    }
    norm_ = params_[next++];
    head_ = cfg_.tied_embeddings ? embed_ : params_[next++];

    // The RoPE inverse frequencies, in the executor's memory.
    const std::vector<float> f = rope_inv_freq(cfg_.rope, cfg_.head_dim());
    inv_freq_ = tensor<float, space>(shape{std::int64_t(f.size())});
    copy(ex_, view<const float, host_space>(f.data(), shape{std::int64_t(f.size())}), inv_freq_.v());
    ex_.synchronize();  // f is a local
  }

  llama(const llama&) = delete;
  llama& operator=(const llama&) = delete;
  llama(llama&&) = default;
  llama& operator=(llama&&) = default;

  const llama_config& config() const { return cfg_; }
  const Exec& executor() const { return ex_; }
  const std::vector<parameter_spec>& parameter_specs() const { return specs_; }
  /// Elements in all parameter tensors.
  std::int64_t parameter_count() const {
    std::int64_t n = 0;
    for (const auto& s : specs_) n += s.shape.numel();
    return n;
  }
  /// Every parameter value / gradient as one flat view (HF order, each tensor padded to 256 bytes; the padding is
  /// zero): distributed trainers communicate contiguous ranges of them.
  view<T, space> flat_values() { return values_.v(); }
  view<grad_type, space> flat_grads() { return grads_.v(); }
  /// Where parameter i starts in the flat views; parameter_offset(parameter count) is their length.
  std::int64_t parameter_offset(std::size_t i) const { return offsets_.at(i); }

  /// Bytes of the activation allocation for the current (batch, sequence); 0 before the first call.
  std::size_t activation_bytes() const { return std::size_t(arena_.numel()); }

  /// Layer l, with its parameters and policies.
  block_type& block(std::int64_t l) { return blocks_.at(std::size_t(l)); }
  const block_type& block(std::int64_t l) const { return blocks_.at(std::size_t(l)); }

  /// Calls f(hf_name, value, grad, info) for every parameter in Hugging Face's order; info.decay is true for the
  /// 2-D projection matrices only.
  template <class F>
  void for_each_parameter(F&& f) {
    for (std::size_t i = 0; i < specs_.size(); ++i) {
      const optim::param_info info{specs_[i].name, specs_[i].shape, specs_[i].decay};
      f(specs_[i].name, params_[i].value, params_[i].grad, info);
    }
  }

  /// Initialises every parameter from the Philox streams of `seed` (see the top of the file).
  void init(std::uint64_t seed) {
    for (std::size_t i = 0; i < specs_.size(); ++i) fill_initial(ex_, params_[i].value, specs_[i], seed);
  }

  /// The global position of the first token of every sequence (RoPE's angles start there): 0 unless a
  /// context-parallel trainer runs this model on a later chunk of its sequences (with an attention policy that
  /// sees the other chunks). pos0 + S must stay within max_seq.
  void set_position_offset(std::int64_t pos0) {
    require(pos0 >= 0, "llama::set_position_offset: the offset must be non-negative, got " + std::to_string(pos0));
    pos0_ = pos0;
    ctx_.pos0 = pos0;
  }
  std::int64_t position_offset() const { return pos0_; }

  /// Sets every gradient to zero.
  void zero_grad() { fill(ex_, grads_.v(), grad_type(0.0f)); }

  /// The training forward pass on tokens and targets (host int32 views [B, S]; targets of -1 are ignored):
  /// returns the mean loss over the other targets, saves the activations, and already accumulates the LM head's
  /// weight gradient of loss_scale · loss (see the top of the file). Call backward() next.
  double forward(view<const std::int32_t, host_space> tokens, view<const std::int32_t, host_space> targets,
                 float loss_scale = 1.0f) {
    return run(tokens, targets, true, loss_scale);
  }

  /// The loss alone (no gradient work; the gradients are left as they are).
  double evaluate(view<const std::int32_t, host_space> tokens, view<const std::int32_t, host_space> targets) {
    return run(tokens, targets, false, 0.0f);
  }

  /// Accumulates into every gradient the gradient of loss_scale · loss of the last forward().
  void backward() {
    backward([](std::size_t) {});
  }

  /// backward(), calling ready(first) each time the gradients of parameters [first, previous first) are complete
  /// (parameter indices in for_each_parameter order; the first call's range ends at the parameter count). The
  /// order is the reverse of the storage order: the final norm and LM head, then layer L-1 … 0, then the
  /// embedding (with a tied head, the embedding completes only there). On CUDA "complete" means ordered on the
  /// executor's stream. Distributed trainers start communicating a bucket from the hook.
  template <class Ready>
  void backward(Ready&& ready) {
    require(backward_ready_, "llama::backward: call forward() first (evaluate() and logits() save no gradient "
                             "state, and backward runs once per forward)");
    backward_ready_ = false;
    const auto L = std::size_t(cfg_.n_layers);
    constexpr std::size_t per_layer = 9;  // q, k, v, o, gate, up, down, two norms
    const std::size_t first_block = 1, after_blocks = first_block + per_layer * L;
    rmsnorm_backward(ex_, detail::ro(x_[L]), detail::ro(norm_.value), detail::ro(rstdf_), detail::ro(dlnf_), dres_,
                     norm_.grad);
    ready(after_blocks);  // model.norm, and an untied lm_head (its gradient came from forward)
    for (std::size_t l = L; l-- > 0;) {
      blocks_[l].backward(ex_, ctx_, acts_[l], detail::ro(x_[l]), dres_, scratch_);
      ready(first_block + per_layer * l);
    }
    embedding_backward(ex_, view<const std::int32_t, space>(tokens_), dres_, embed_.grad);
    ready(0);
  }

  /// The logits at the last position of every sequence: out [B, V] (float or T, the executor's space) for
  /// tokens [B, S] (host int32). Overwrites the saved activations.
  template <class U>
  void logits(view<const std::int32_t, host_space> tokens, view<U, space> out) {
    backward_ready_ = false;
    const auto [b, s] = check_batch(tokens, "logits");
    subspace::detail::layer::require_shape(out, shape{b, cfg_.vocab}, "llama::logits", "out");
    prepare(b, s);
    run_layers(tokens);
    const std::int64_t d = cfg_.d_model;
    const view<const T, space> last(lnf_.data() + (s - 1) * d, shape{b, d}, {s * d, 1, 0, 0});
    gemm(ex_, op::none, op::transpose, 1.0f, last, detail::ro(head_.value), 0.0f, out);
  }

 private:
  std::pair<std::int64_t, std::int64_t> check_batch(view<const std::int32_t, host_space> tokens,
                                                    const char* op) const {
    require(tokens.rank() == 2 && tokens.dim(0) > 0 && tokens.dim(1) > 0,
            std::string("llama::") + op + ": tokens must be a non-empty [B, S] view, got shape " +
                to_string(tokens.shape()));
    require(pos0_ + tokens.dim(1) <= cfg_.max_seq,
            std::string("llama::") + op + ": sequence length " + std::to_string(tokens.dim(1)) +
                (pos0_ > 0 ? " at position offset " + std::to_string(pos0_) : std::string()) + " exceeds max_seq " +
                std::to_string(cfg_.max_seq) + " of '" + cfg_.name + "'");
    subspace::detail::layer::require_contiguous(tokens, "llama", "tokens");
    return {tokens.dim(0), tokens.dim(1)};
  }

  /// Sizes the activation allocation for (b, s) and carves it.
  void prepare(std::int64_t b, std::int64_t s) {
    if (b == batch_ && s == seq_) return;
    detail::arena<space> measure;
    layout(measure, b, s);
    arena_ = tensor<std::byte, space>(shape{std::int64_t(measure.bytes())});
    detail::arena<space> carve(arena_.data());
    layout(carve, b, s);
    batch_ = b;
    seq_ = s;
    ctx_ = typename block_type::context{b, s, pos0_, inv_freq_.v()};
  }

  template <class Arena>
  void layout(Arena& a, std::int64_t b, std::int64_t s) {
    const std::int64_t n = b * s, d = cfg_.d_model, f = cfg_.ffn_hidden, hq = cfg_.n_heads, hkv = cfg_.n_kv_heads,
                       hd = cfg_.head_dim(), L = cfg_.n_layers;
    tokens_ = a.template take<std::int32_t>({n});
    targets_ = a.template take<std::int32_t>({n});
    x_.assign(std::size_t(L + 1), {});
    for (auto& x : x_) x = a.template take<T>({n, d});
    acts_.assign(std::size_t(L), {});
    for (auto& act : acts_) {
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
      act.hact = a.template take<T>({n, f});
    }
    lnf_ = a.template take<T>({n, d});
    rstdf_ = a.template take<stat_type>({n});
    losses_ = a.template take<loss_type>({n});
    dlnf_ = a.template take<T>({n, d});
    dres_ = a.template take<T>({n, d});
    scratch_.dx = a.template take<T>({n, d});
    scratch_.dln = a.template take<T>({n, d});
    scratch_.dq = a.template take<T>({b, s, hq, hd});
    scratch_.datt = a.template take<T>({b, s, hq, hd});
    scratch_.dk = a.template take<T>({b, s, hkv, hd});
    scratch_.dv = a.template take<T>({b, s, hkv, hd});
    scratch_.dgate = a.template take<T>({n, f});
    scratch_.dup = a.template take<T>({n, f});
    scratch_.dhact = a.template take<T>({n, f});
  }

  /// Embedding, every layer and the final norm, for tokens already checked against the current geometry.
  void run_layers(view<const std::int32_t, host_space> tokens) {
    copy(ex_, tokens.flat(), tokens_);
    embedding_forward(ex_, view<const std::int32_t, space>(tokens_), detail::ro(embed_.value), x_[0]);
    for (std::size_t l = 0; l < blocks_.size(); ++l)
      blocks_[l].forward(ex_, ctx_, acts_[l], detail::ro(x_[l]), x_[l + 1]);
    rmsnorm_forward(ex_, detail::ro(x_.back()), detail::ro(norm_.value), cfg_.norm_eps, lnf_, rstdf_);
  }

  double run(view<const std::int32_t, host_space> tokens, view<const std::int32_t, host_space> targets,
             bool gradients, float loss_scale) {
    backward_ready_ = false;
    const char* op = gradients ? "forward" : "evaluate";
    const auto [b, s] = check_batch(tokens, op);
    require(targets.shape() == tokens.shape(), std::string("llama::") + op + ": targets have shape " +
                                                   to_string(targets.shape()) + ", tokens " +
                                                   to_string(tokens.shape()));
    subspace::detail::layer::require_contiguous(targets, "llama", "targets");
    std::int64_t counted = 0;
    for (std::int64_t i = 0; i < targets.numel(); ++i) {
      const std::int32_t t = targets.data()[i];
      if (t != -1 && (t < 0 || t >= cfg_.vocab))
        throw invalid_argument("llama::" + std::string(op) + ": target " + std::to_string(t) + " at position " +
                               std::to_string(i) + " is outside the vocabulary [0, " + std::to_string(cfg_.vocab) +
                               ") and is not -1 (ignored)");
      counted += t != -1;
    }
    prepare(b, s);
    copy(ex_, targets.flat(), targets_);
    run_layers(tokens);

    const float grad_scale = counted > 0 ? float(double(loss_scale) / double(counted)) : 0.0f;
    const view<const T, space> h = detail::ro(lnf_);
    const view<const std::int32_t, space> tg(targets_);
    if (gradients)
      lm_head_cross_entropy(ex_, h, detail::ro(head_.value), tg, losses_, dlnf_, head_.grad, grad_scale);
    else
      lm_head_cross_entropy(ex_, h, detail::ro(head_.value), tg, losses_, view<T, space>{}, view<grad_type, space>{},
                            grad_scale);
    const double total = double(sum(ex_, detail::ro(losses_)));
    backward_ready_ = gradients;
    return counted > 0 ? total / double(counted) : 0.0;
  }

  using loss_type = accum_t<T>;

  llama_config cfg_;
  Exec ex_;
  std::vector<parameter_spec> specs_;
  tensor<T, space> values_;
  tensor<grad_type, space> grads_;
  std::vector<std::int64_t> offsets_;  // parameter i starts at offsets_[i] in values_ and grads_; back(): total
  std::vector<param> params_;
  param embed_, norm_, head_;
  std::vector<block_type> blocks_;
  tensor<float, space> inv_freq_;

  // Activations (views into arena_), sized for (batch_, seq_).
  tensor<std::byte, space> arena_;
  std::int64_t batch_ = 0, seq_ = 0, pos0_ = 0;
  typename block_type::context ctx_{};
  view<std::int32_t, space> tokens_, targets_;
  std::vector<view<T, space>> x_;  // the residual stream entering layer l; x_[L] leaves the last layer
  std::vector<typename block_type::activations> acts_;
  view<T, space> lnf_;             // [N, d] final norm (the LM head's input)
  view<stat_type, space> rstdf_;   // [N]
  view<loss_type, space> losses_;  // [N] per-token cross-entropy (0 for ignored targets)
  view<T, space> dlnf_, dres_;     // [N, d] dL/dlnf from the loss; dL/d(residual stream) in backward
  typename block_type::scratch scratch_{};
  bool backward_ready_ = false;
};

}  // namespace subspace::nn

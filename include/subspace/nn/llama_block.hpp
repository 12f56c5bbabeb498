#pragma once
// One pre-norm Llama layer (nn::llama_block) and what the model and its layers share: the gradient type, the
// activation arena, the policy hooks. nn/llama.hpp builds the model from these; the narrative is at its top.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/arena.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/parameter.hpp"
#include "../core/tensor.hpp"
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
#include "parameters.hpp"
namespace subspace::nn {

/// The weight-gradient type of a model on Exec with weights T: T on the host, fp32 in device memory.
template <class Exec, class T>
using grad_t = std::conditional_t<std::is_same_v<space_of_t<Exec>, device_space>, float, T>;
namespace detail {

using ::subspace::arena;
using ::subspace::ro;

/// y <- x, converted when the element types differ.
template <class Exec, class X, class Y, class Space>
void convert_into(const Exec& ex, view<const X, Space> x, view<Y, Space> y) {
  if constexpr (std::is_same_v<X, Y>) copy(ex, x, y);
  else cast(ex, x, y);
}

/// The tensor a Blocks factory declares in place of the dense `info` (factory.parameter, when it has one).
template <class Blocks, class Site>
parameter_info parameter_for(const Blocks& blocks, const Site& site, const parameter_info& info) {
  if constexpr (requires {
                  { blocks.parameter(site, info) } -> std::convertible_to<parameter_info>;
                })
    return blocks.parameter(site, info);
  else return info;
}

/// p.enter(ex, site, in, x) / p.leave(ex, site, x, out) when the residual policy has them, else conversions.
template <class P, class Exec, class Site, class B, class T, class Space>
void enter_stream(P& p, const Exec& ex, const Site& site, view<const B, Space> in, view<T, Space> x) {
  if constexpr (requires { p.enter(ex, site, in, x); }) p.enter(ex, site, in, x);
  else convert_into(ex, in, x);
}
template <class P, class Exec, class Site, class T, class B, class Space>
void leave_stream(P& p, const Exec& ex, const Site& site, view<const T, Space> x, view<B, Space> out) {
  if constexpr (requires { p.leave(ex, site, x, out); }) p.leave(ex, site, x, out);
  else convert_into(ex, x, out);
}

/// Calls p.bind(store) / p.after_step(ex, store) when the policy has them.
template <class P, class Store>
void bind_policy(P& p, Store& store) {
  if constexpr (requires { p.bind(store); }) p.bind(store);
}
template <class P, class Exec, class Store>
void after_step_policy(P& p, const Exec& ex, Store& store) {
  if constexpr (requires { p.after_step(ex, store); }) p.after_step(ex, store);
}

}  // namespace detail

/// One pre-norm Llama layer: its parameters (indices into the store, and views bound from them), its policies,
/// and its forward and backward passes over activations the model owns.
template <class Exec, class T, class Blocks = dense_blocks>
class llama_block {
 public:
  using space = space_of_t<Exec>;
  using grad_type = grad_t<Exec, T>;
  using stat_type = accum_t<T>;
  using param = parameter<T, grad_type, space>;
  using store_type = parameter_store<T, grad_type, space>;
  using site_type = block_site<store_type>;
  using attention_type = decltype(std::declval<const Blocks&>().attention(std::declval<const site_type&>()));
  using projection_type = decltype(std::declval<const Blocks&>().projection(std::declval<const site_type&>(),
                                                                            projection_site::attention_output));
  using residual_type = decltype(std::declval<const Blocks&>().residual(std::declval<const site_type&>()));

  static_assert(AttentionPolicy<attention_type, Exec, T>,
                "llama: the attention policy must provide forward(ex, attention_forward_args) and backward(ex, "
                "attention_backward_args) (see nn/block_policies.hpp)");
  static_assert(ProjectionPolicy<projection_type, Exec, T, grad_type>,
                "llama: the projection policy must provide forward(ex, x, w, y) and backward(ex, x, w, dy, dx, dw) "
                "(see nn/block_policies.hpp)");
  static_assert(ResidualPolicy<residual_type, Exec, T>,
                "llama: the residual policy must provide forward(ex, site, x, y) and backward(ex, site, dy) (see "
                "nn/block_policies.hpp)");

  /// The projection policies split their backward (backward_input(ex, x, w, dy, dx), backward_weight(ex, x, dy,
  /// dw)), so the layer can: a zero-bubble pipeline schedule runs the two halves apart.
  static constexpr bool splits_backward = requires(projection_type& p, const Exec& ex, view<const T, space> in,
                                                   view<T, space> out, view<grad_type, space> grad) {
    p.backward_input(ex, in, in, in, out);
    p.backward_weight(ex, in, in, grad);
  };

  /// SwiGLU's output h = silu(gate) · up is not kept for the backward when the down projection's backward splits
  /// (its input gradient does not read h): SwiGLU's backward recomputes h, bit for bit, for the weight product.
  /// Every layer of a slot then shares one h buffer for its forward: L − 1 of the L copies are saved (3.75 GiB of
  /// activations at 1B).
  static constexpr bool recomputes_hact = splits_backward;

  /// The sizes a block needs from the configuration.
  struct dims {
    std::int64_t d = 0, heads = 0, kv_heads = 0, head_dim = 0, ffn = 0;
    float eps = 1e-5f;
  };

  /// What one layer saves in forward for its backward pass. N = B·S rows.
  struct activations {
    view<T, space> ln1;            // [N, d] input_layernorm(x)
    view<stat_type, space> rstd1;  // [N]
    view<T, space> q, k, v;        // [B, S, Hq | Hkv, hd], q and k after RoPE
    view<T, space> att;            // [B, S, Hq, hd] attention output (o_proj's input)
    view<stat_type, space> lse;    // [B, Hq, S]
    view<T, space> mid;            // [N, d] x + attention branch
    view<T, space> ln2;            // [N, d] post_attention_layernorm(mid)
    view<stat_type, space> rstd2;  // [N]
    view<T, space> gate, up;       // [N, f] gate_proj, up_proj
    view<T, space> hact;           // [N, f] silu(gate) * up (shared by the slot's layers when recomputes_hact)
  };

  /// Backward scratch, shared by every layer (overwritten layer by layer).
  struct scratch {
    view<T, space> dln;                // [N, d]
    view<T, space> dq, datt;           // [B, S, Hq, hd]
    view<T, space> dk, dv;             // [B, S, Hkv, hd]
    view<T, space> dgate, dup, dhact;  // [N, f]
  };

  /// The gradients of the layer's weight products' outputs, kept by a split backward's first half
  /// (backward_input) for its second (backward_weight): one set per micro-batch slot.
  struct deferred {
    view<T, space> d_down, d_o;  // [N, d] dL/d(output) of down_proj and o_proj
    view<T, space> dgate, dup;   // [N, f]
    view<T, space> hact;         // [N, f] h recomputed by the backward (recomputes_hact), down_proj's input
    view<T, space> dq;           // [B, S, Hq, hd]
    view<T, space> dk, dv;       // [B, S, Hkv, hd]
  };

  /// The batch geometry, positions, RoPE table and token ids of one call.
  struct context {
    std::int64_t batch = 0, seq = 0;
    std::size_t slot = 0;  // the micro-batch's activation slot
    std::span<const position_chunk> positions;
    view<const float, space> inv_freq;       // [hd / 2]
    view<const std::int32_t, space> tokens;  // [N]
  };

  /// Layer `layer` of `cfg`: declares its nine tensors in `store` (their infos come from the whole model's list,
  /// `infos`, starting at `first_info`) and makes its policies.
  llama_block(const llama_config& cfg, std::int64_t layer, const std::vector<parameter_info>& infos,
              std::size_t first_info, store_type& store, const Blocks& blocks)
      : layer_(layer),
        size{cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim(), cfg.ffn_hidden, cfg.norm_eps},
        first_(declare(infos, first_info, store, blocks, site_type{layer, cfg, store})),
        attention(blocks.attention(site_type{layer, cfg, store})),
        o_projection(blocks.projection(site_type{layer, cfg, store}, projection_site::attention_output)),
        down_projection(blocks.projection(site_type{layer, cfg, store}, projection_site::mlp_output)),
        residual(blocks.residual(site_type{layer, cfg, store})),
        last_(store.size()) {}

  /// Views of the block's tensors from `store` (after it allocated) and the policies' bind.
  void bind(store_type& store) {
    param* const slots[per_layer] = {&q_proj,    &k_proj,          &v_proj,
                                     &o_proj,    &gate_proj,       &up_proj,
                                     &down_proj, &input_layernorm, &post_attention_layernorm};
    for (std::size_t i = 0; i < per_layer; ++i) *slots[i] = store[first_ + i];
    detail::bind_policy(attention, store);
    detail::bind_policy(o_projection, store);
    detail::bind_policy(down_projection, store);
    detail::bind_policy(residual, store);
  }
  void after_step(const Exec& ex, store_type& store) {
    detail::after_step_policy(attention, ex, store);
    detail::after_step_policy(o_projection, ex, store);
    detail::after_step_policy(down_projection, ex, store);
    detail::after_step_policy(residual, ex, store);
  }

  static constexpr std::size_t per_layer = 9;  // q, k, v, o, gate, up, down, two norms
  /// The block's tensors are store indices [first_parameter(), last_parameter()): its nine, then any its policies
  /// declared (e.g. a K/V codec's).
  std::size_t first_parameter() const { return first_; }
  std::size_t last_parameter() const { return last_; }
  std::int64_t layer() const { return layer_; }

 private:
  std::int64_t layer_;

 public:
  dims size{};

 private:
  std::size_t first_;

 public:
  // Parameters, in Hugging Face's order.
  param q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, input_layernorm, post_attention_layernorm;

  // Policies.
  attention_type attention;
  projection_type o_projection, down_projection;  // the two projections that write into the residual stream
  residual_type residual;

 private:
  std::size_t last_;

 public:
  /// y = x + attention branch + MLP branch, saving what backward needs in `a`.
  void forward(const Exec& ex, const context& c, const activations& a, view<const T, space> x, view<T, space> y) {
    using detail::ro;
    const std::int64_t n = c.batch * c.seq;
    rmsnorm_forward(ex, x, ro(input_layernorm.value), size.eps, a.ln1, a.rstd1);
    linear(ex, a.ln1, q_proj, a.q);
    linear(ex, a.ln1, k_proj, a.k);
    linear(ex, a.ln1, v_proj, a.v);
    attention.forward(
        ex, attention_forward_args<T, space>{a.q, a.k, ro(a.v), a.att, a.lse, c.positions, c.inv_freq, c.slot});
    o_projection.forward(ex, ro(rows(a.att, n)), ro(o_proj.value), a.mid);
    residual.forward(ex, site(c, sublayer::attention), x, a.mid);  // mid = x + o_proj(att)

    rmsnorm_forward(ex, ro(a.mid), ro(post_attention_layernorm.value), size.eps, a.ln2, a.rstd2);
    linear(ex, a.ln2, gate_proj, a.gate);
    linear(ex, a.ln2, up_proj, a.up);
    swiglu_forward(ex, ro(a.gate), ro(a.up), a.hact);
    down_projection.forward(ex, ro(a.hact), ro(down_proj.value), y);
    residual.forward(ex, site(c, sublayer::mlp), ro(a.mid), y);  // y = mid + down_proj(hact)
  }

  /// On entry dres = dL/dy; on return dres = dL/dx. Weight gradients accumulate — unless `keep` is given: then
  /// only the input gradient (and the norm gains') is computed, and what the weight products need is written to
  /// *keep for backward_weight (a split backward, for zero-bubble pipeline schedules).
  void backward(const Exec& ex, const context& c, const activations& a, view<const T, space> x, view<T, space> dres,
                scratch s, const deferred* keep = nullptr) {
    using detail::ro;
    const std::int64_t n = c.batch * c.seq;
    if (keep) {  // the products' output gradients land in the kept buffers
      s.dgate = keep->dgate;
      s.dup = keep->dup;
      s.dq = keep->dq;
      s.dk = keep->dk;
      s.dv = keep->dv;
    }
    // MLP branch: y = mid + down(silu(gate(n2)) * up(n2)).
    residual.backward(ex, site(c, sublayer::mlp), dres);
    if (keep) copy(ex, ro(dres), keep->d_down);
    if constexpr (recomputes_hact) {
      // dh first (it does not read h), then SwiGLU's backward writes h over dh (or into the kept buffer), then
      // the weight product reads it.
      down_projection.backward_input(ex, view<const T, space>{}, ro(down_proj.value), ro(dres), s.dhact);
      const view<T, space> h = keep ? keep->hact : s.dhact;
      swiglu_backward(ex, ro(a.gate), ro(a.up), ro(s.dhact), s.dgate, s.dup, h);
      if (!keep) down_projection.backward_weight(ex, ro(h), ro(dres), down_proj.grad);
    } else {
      project_backward(ex, down_projection, ro(a.hact), down_proj, ro(dres), s.dhact, keep != nullptr);
      swiglu_backward(ex, ro(a.gate), ro(a.up), ro(s.dhact), s.dgate, s.dup);
    }
    linear_backward(ex, a.ln2, gate_proj, s.dgate, s.dln, 0.0f, keep == nullptr);
    linear_backward(ex, a.ln2, up_proj, s.dup, s.dln, 1.0f, keep == nullptr);
    rmsnorm_backward(ex, ro(a.mid), ro(post_attention_layernorm.value), ro(a.rstd2), ro(s.dln), dres,
                     post_attention_layernorm.grad, 1.0f);  // dres = dL/dmid

    // Attention branch: mid = x + o(attention(rope(q(n1)), rope(k(n1)), v(n1))).
    residual.backward(ex, site(c, sublayer::attention), dres);
    const view<T, space> datt_rows = rows(s.datt, n);
    if (keep) copy(ex, ro(dres), keep->d_o);
    project_backward(ex, o_projection, ro(rows(a.att, n)), o_proj, ro(dres), datt_rows, keep != nullptr);
    attention.backward(
        ex, attention_backward_args<T, space>{ro(a.q), ro(a.k), ro(a.v), ro(a.att), ro(a.lse), ro(s.datt), s.dq, s.dk,
                                              s.dv, c.positions, c.inv_freq, c.slot});
    linear_backward(ex, a.ln1, q_proj, s.dq, s.dln, 0.0f, keep == nullptr);
    linear_backward(ex, a.ln1, k_proj, s.dk, s.dln, 1.0f, keep == nullptr);
    linear_backward(ex, a.ln1, v_proj, s.dv, s.dln, 1.0f, keep == nullptr);
    rmsnorm_backward(ex, x, ro(input_layernorm.value), ro(a.rstd1), ro(s.dln), dres, input_layernorm.grad,
                     1.0f);  // dres = dL/dx
  }

  /// The second half of a split backward: the weight products' gradients from what backward kept, accumulated
  /// in the order the fused backward accumulates them.
  void backward_weight(const Exec& ex, const context& c, const activations& a, const deferred& keep)
    requires splits_backward
  {
    using detail::ro;
    const std::int64_t n = c.batch * c.seq;
    down_projection.backward_weight(ex, ro(recomputes_hact ? keep.hact : a.hact), ro(keep.d_down), down_proj.grad);
    weight_product(ex, a.ln2, gate_proj, keep.dgate);
    weight_product(ex, a.ln2, up_proj, keep.dup);
    o_projection.backward_weight(ex, ro(rows(a.att, n)), ro(keep.d_o), o_proj.grad);
    weight_product(ex, a.ln1, q_proj, keep.dq);
    weight_product(ex, a.ln1, k_proj, keep.dk);
    weight_product(ex, a.ln1, v_proj, keep.dv);
  }

 private:
  static std::size_t declare(const std::vector<parameter_info>& infos, std::size_t first, store_type& store,
                             const Blocks& blocks, const site_type& site) {
    const std::size_t index = store.size();
    for (std::size_t i = 0; i < per_layer; ++i) store.add(detail::parameter_for(blocks, site, infos[first + i]));
    return index;
  }

  stream_site<space> site(const context& c, sublayer which) const { return {layer_, which, c.slot, c.tokens}; }

  /// A [B, S, H, hd] buffer as its [N, H·hd] rows (or an [N, k] buffer as itself).
  static view<T, space> rows(view<T, space> v, std::int64_t n) { return v.reshape(shape{n, v.numel() / n}); }

  /// out = in · wᵀ, out of any contiguous shape with N rows.
  static void linear(const Exec& ex, view<T, space> in, const param& w, view<T, space> out) {
    const std::int64_t n = in.dim(0);
    gemm(ex, op::none, op::transpose, 1.0f, detail::ro(in), detail::ro(w.value), 0.0f, rows(out, n));
  }

  /// din = beta · din + dout · w and, with `weights`, w.grad += doutᵀ · in (dout of any contiguous shape with N
  /// rows).
  static void linear_backward(const Exec& ex, view<T, space> in, const param& w, view<T, space> dout,
                              view<T, space> din, float beta, bool weights) {
    const std::int64_t n = in.dim(0);
    gemm(ex, op::none, op::none, 1.0f, detail::ro(rows(dout, n)), detail::ro(w.value), beta, din);
    if (weights) weight_product(ex, in, w, dout);
  }
  /// dx = (d projection / dx)ᵀ dy, and the weight gradient unless it is deferred (input_only).
  static void project_backward(const Exec& ex, projection_type& p, view<const T, space> x, const param& w,
                               view<const T, space> dy, view<T, space> dx, bool input_only) {
    if constexpr (splits_backward) {
      if (input_only) return p.backward_input(ex, x, detail::ro(w.value), dy, dx);
    } else {
      require(!input_only, "llama: the projection policy has no split backward (backward_input / backward_weight)");
    }
    p.backward(ex, x, detail::ro(w.value), dy, dx, w.grad);
  }

  /// w.grad += doutᵀ · in.
  static void weight_product(const Exec& ex, view<T, space> in, const param& w, view<T, space> dout) {
    const std::int64_t n = in.dim(0);
    gemm(ex, op::transpose, op::none, 1.0f, detail::ro(rows(dout, n)), detail::ro(in), 1.0f, w.grad);
  }
};

}  // namespace subspace::nn

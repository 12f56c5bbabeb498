#pragma once
// The seams of a Llama block: its attention operation and its two output projections (attention o_proj, MLP
// down_proj) are policies, so later trainers can replace them without touching the model:
//
//   AttentionPolicy<P, Exec, T>       p.forward(ex, q, k, v, out, lse)
//                                      p.backward(ex, q, k, v, out, lse, dout, dq, dk, dv)
//       q, out, dout, dq [B, S, Hq, hd]; k, v, dk, dv [B, S, Hkv, hd]; lse [B, Hq, S] in accum_t<T>. q and k arrive
//       after RoPE; dq, dk, dv are overwritten. A context-parallel trainer swaps in an attention that exchanges
//       KV blocks between ranks and merges them through lse.
//
//   ProjectionPolicy<P, Exec, T, G>   p.forward(ex, x[N, in], w[out, in], y[N, out])       y = x · wᵀ (overwritten)
//                                      p.backward(ex, x, w, dy[N, out], dx[N, in], dw[out, in])
//       dx overwritten, dw += (in G).
//       The block adds y to the residual stream itself. A pipeline trainer swaps in a projection constrained to a
//       subspace (Subspace Networks' projected variant keeps w = U Uᵀ w and computes y = (x · wᵀ U) Uᵀ).
//
// Policies are objects: the block holds one of each (an attention and two projections per layer), default
// constructed, reachable through llama::block(l), so a policy may carry per-layer state (a basis, a rank id).
// The defaults, dense_attention and dense_projection, call attention_forward/backward (kernels/attention.hpp)
// and gemm.

#include <cmath>
#include <concepts>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "../kernels/attention.hpp"
#include "../kernels/gemm.hpp"

namespace subspace::nn {

/// The memory space of executor Exec, for the policy signatures below.
template <class Exec>
using space_t = space_of_t<Exec>;

/// Causal grouped-query attention of one block, by attention_forward / attention_backward, with scale 1/sqrt(hd)
/// and query and key positions both starting at 0 (a whole sequence on one device).
struct dense_attention {
  template <class Exec, class T>
  static attention_params params(view<const T, space_t<Exec>> q) {
    attention_params p;
    p.scale = float(1.0 / std::sqrt(double(q.dim(3))));
    p.causal = true;
    return p;
  }

  template <class Exec, class T>
  void forward(const Exec& ex, std::type_identity_t<view<const T, space_t<Exec>>> q,
               std::type_identity_t<view<const T, space_t<Exec>>> k,
               std::type_identity_t<view<const T, space_t<Exec>>> v, view<T, space_t<Exec>> out,
               std::type_identity_t<view<accum_t<T>, space_t<Exec>>> lse) const {
    attention_forward(ex, q, k, v, out, lse, params<Exec, T>(q));
  }

  template <class Exec, class T>
  void backward(const Exec& ex, std::type_identity_t<view<const T, space_t<Exec>>> q,
                std::type_identity_t<view<const T, space_t<Exec>>> k,
                std::type_identity_t<view<const T, space_t<Exec>>> v,
                std::type_identity_t<view<const T, space_t<Exec>>> out,
                std::type_identity_t<view<const accum_t<T>, space_t<Exec>>> lse,
                std::type_identity_t<view<const T, space_t<Exec>>> dout, view<T, space_t<Exec>> dq,
                std::type_identity_t<view<T, space_t<Exec>>> dk,
                std::type_identity_t<view<T, space_t<Exec>>> dv) const {
    attention_backward(ex, q, k, v, out, lse, dout, dq, dk, dv, params<Exec, T>(q));
  }
};

/// A plain linear layer y = x · wᵀ (w stored [out, in], as in Hugging Face), by gemm.
struct dense_projection {
  template <class Exec, class T>
  void forward(const Exec& ex, std::type_identity_t<view<const T, space_t<Exec>>> x,
               std::type_identity_t<view<const T, space_t<Exec>>> w, view<T, space_t<Exec>> y) const {
    gemm(ex, op::none, op::transpose, 1.0f, x, w, 0.0f, y);
  }

  template <class Exec, class T, class G>
  void backward(const Exec& ex, std::type_identity_t<view<const T, space_t<Exec>>> x,
                std::type_identity_t<view<const T, space_t<Exec>>> w,
                std::type_identity_t<view<const T, space_t<Exec>>> dy, view<T, space_t<Exec>> dx,
                view<G, space_t<Exec>> dw) const {
    gemm(ex, op::none, op::none, 1.0f, dy, w, 0.0f, dx);       // dx = dy · w
    gemm(ex, op::transpose, op::none, 1.0f, dy, x, 1.0f, dw);  // dw += dyᵀ · x
  }
};

/// P can be the attention of a block running on Exec with activations of type T.
template <class P, class Exec, class T>
concept AttentionPolicy =
    std::default_initializable<P> &&
    requires(P& p, const Exec& ex, view<const T, space_t<Exec>> in, view<T, space_t<Exec>> out,
             view<accum_t<T>, space_t<Exec>> lse, view<const accum_t<T>, space_t<Exec>> saved_lse) {
      p.forward(ex, in, in, in, out, lse);
      p.backward(ex, in, in, in, in, saved_lse, in, out, out, out);
    };

/// P can be an output projection of a block running on Exec, activations and weights T, weight gradients G.
template <class P, class Exec, class T, class G>
concept ProjectionPolicy = std::default_initializable<P> &&
                           requires(P& p, const Exec& ex, view<const T, space_t<Exec>> in,
                                    view<T, space_t<Exec>> out, view<G, space_t<Exec>> grad) {
                             p.forward(ex, in, in, out);
                             p.backward(ex, in, in, in, out, grad);
                           };

}  // namespace subspace::nn

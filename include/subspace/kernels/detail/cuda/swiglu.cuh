#pragma once
// SwiGLU on CUDA: a grid-stride loop over 16-byte packs (whole packs first, then the tail element by element, as
// elementwise.cuh does), fp32 math from the host's forward_op / backward_op, one rounding to T per output. Every
// pack is loaded before its outputs are stored, so the outputs may alias the inputs as on the host.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../../swiglu.hpp"
#include "layer_common.cuh"

namespace subspace {
namespace cuda_detail::swiglu {

template <int P, class T>
__global__ void forward_kernel(const T* gate, const T* up, T* h, std::int64_t n) {
  using pk = layer::pack<T, P>;
  const std::int64_t packs = n / P, items = packs + (n - packs * P);
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    if (i < packs) {
      const pk g = reinterpret_cast<const pk*>(gate)[i];
      const pk u = reinterpret_cast<const pk*>(up)[i];
      pk o;
#pragma unroll
      for (int k = 0; k < P; ++k) o.v[k] = T(detail::swiglu::forward_op{}(float(g.v[k]), float(u.v[k])));
      reinterpret_cast<pk*>(h)[i] = o;
    } else {
      const std::int64_t e = packs * P + (i - packs);
      h[e] = T(detail::swiglu::forward_op{}(float(gate[e]), float(up[e])));
    }
  }
}

template <int P, class T>
__global__ void backward_kernel(const T* gate, const T* up, const T* dh, T* dgate, T* dup, T* h, std::int64_t n) {
  using pk = layer::pack<T, P>;
  const std::int64_t packs = n / P, items = packs + (n - packs * P);
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    if (i < packs) {
      const pk g = reinterpret_cast<const pk*>(gate)[i];
      const pk u = reinterpret_cast<const pk*>(up)[i];
      const pk d = reinterpret_cast<const pk*>(dh)[i];
      pk og, ou, oh;
#pragma unroll
      for (int k = 0; k < P; ++k) {
        float dg, du;
        detail::swiglu::backward_op{}(float(g.v[k]), float(u.v[k]), float(d.v[k]), dg, du);
        og.v[k] = T(dg);
        ou.v[k] = T(du);
        if (h) oh.v[k] = T(detail::swiglu::forward_op{}(float(g.v[k]), float(u.v[k])));
      }
      reinterpret_cast<pk*>(dgate)[i] = og;
      reinterpret_cast<pk*>(dup)[i] = ou;
      if (h) reinterpret_cast<pk*>(h)[i] = oh;
    } else {
      const std::int64_t e = packs * P + (i - packs);
      float dg, du;
      const float g = float(gate[e]), u = float(up[e]);
      detail::swiglu::backward_op{}(g, u, float(dh[e]), dg, du);
      dgate[e] = T(dg);
      dup[e] = T(du);
      if (h) h[e] = T(detail::swiglu::forward_op{}(g, u));
    }
  }
}

}  // namespace cuda_detail::swiglu

/// h = silu(gate) * up on ex.stream (T = bf16, fp16 or float; h may alias gate or up).
template <class T>
  requires is_element_v<T>
void swiglu_forward(const exec::cuda& ex, std::type_identity_t<view<const T, device_space>> gate,
                    std::type_identity_t<view<const T, device_space>> up, view<T, device_space> h) {
  static_assert(cuda_detail::layer::is_activation_v<T>, "swiglu_forward (CUDA): T must be bf16, fp16 or float");
  namespace S = detail::swiglu;
  namespace L = detail::layer;
  S::check("swiglu_forward", gate, L::operand{up, "up"}, L::operand{h, "h"});
  const std::int64_t n = gate.numel();
  if (n == 0) return;
  constexpr int P = cuda_detail::layer::pack_width<T>;
  if (cuda_detail::layer::all_aligned(gate.data(), up.data(), h.data()))
    cuda_detail::swiglu::forward_kernel<P>
        <<<cuda_detail::grid_for(n / P + n % P), cuda_detail::block_threads, 0, ex.stream>>>(gate.data(), up.data(),
                                                                                             h.data(), n);
  else
    cuda_detail::swiglu::forward_kernel<1>
        <<<cuda_detail::grid_for(n), cuda_detail::block_threads, 0, ex.stream>>>(gate.data(), up.data(), h.data(), n);
  cuda_check_launch();
}

/// dgate and dup (overwritten; they may alias gate and up), and h = silu(gate) * up when h is given (it may alias
/// dh), on ex.stream.
template <class T>
  requires is_element_v<T>
void swiglu_backward(const exec::cuda& ex, std::type_identity_t<view<const T, device_space>> gate,
                     std::type_identity_t<view<const T, device_space>> up,
                     std::type_identity_t<view<const T, device_space>> dh, view<T, device_space> dgate,
                     std::type_identity_t<view<T, device_space>> dup,
                     std::type_identity_t<view<T, device_space>> h = {}) {
  static_assert(cuda_detail::layer::is_activation_v<T>, "swiglu_backward (CUDA): T must be bf16, fp16 or float");
  namespace S = detail::swiglu;
  namespace L = detail::layer;
  S::check("swiglu_backward", gate, L::operand{up, "up"}, L::operand{dh, "dh"}, L::operand{dgate, "dgate"},
           L::operand{dup, "dup"});
  if (h.data()) S::check("swiglu_backward", gate, L::operand{h, "h"});
  const std::int64_t n = gate.numel();
  if (n == 0) return;
  constexpr int P = cuda_detail::layer::pack_width<T>;
  const bool h_aligned = h.data() == nullptr || cuda_detail::layer::all_aligned(h.data());
  if (h_aligned && cuda_detail::layer::all_aligned(gate.data(), up.data(), dh.data(), dgate.data(), dup.data()))
    cuda_detail::swiglu::backward_kernel<P>
        <<<cuda_detail::grid_for(n / P + n % P), cuda_detail::block_threads, 0, ex.stream>>>(
            gate.data(), up.data(), dh.data(), dgate.data(), dup.data(), h.data(), n);
  else
    cuda_detail::swiglu::backward_kernel<1><<<cuda_detail::grid_for(n), cuda_detail::block_threads, 0, ex.stream>>>(
        gate.data(), up.data(), dh.data(), dgate.data(), dup.data(), h.data(), n);
  cuda_check_launch();
}

}  // namespace subspace

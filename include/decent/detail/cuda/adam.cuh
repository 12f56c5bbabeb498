#pragma once
// decent_adam and accum_adam on exec::cuda: one fused kernel per parameter tensor (or bucket). Each element is
// read once (the mixed point, the gradient fp32/bf16, the state) and written once (master, the state, and the
// bf16 working copy when given), with the element functions the host loop uses (detail/adam_update.hpp), so
// host and device agree bit for bit.
//
// `mixed` and `master` are not __restrict__: the plain step passes the same buffer for both. Element i of
// mixed is read before element i of master is written, by the same thread.

#include <cuda_runtime.h>

#include <cstdint>

#include <subspace/core/cuda/error.cuh>
#include <subspace/core/cuda/executor.cuh>
#include <subspace/core/cuda/launch.cuh>

#include "../adam_update.hpp"

namespace decent::detail {

template <class G>
__global__ void dadam_kernel(const float* mixed, float* master, const G* __restrict__ grad, float* __restrict__ m,
                             float* __restrict__ v, subspace::bf16* __restrict__ working, std::int64_t n,
                             adam_coefficients c) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float mi = m[i], vi = v[i];
    const float x = dadam_update(mixed[i], float(grad[i]), mi, vi, c);
    master[i] = x;
    m[i] = mi;
    v[i] = vi;
    if (working) working[i] = subspace::bf16(x);
  }
}

template <class G>
__global__ void accum_adam_kernel(const float* mixed, float* master, const G* __restrict__ grad, float* __restrict__ M,
                                  float* __restrict__ V, float* __restrict__ acc, subspace::bf16* __restrict__ working,
                                  std::int64_t n, adam_coefficients c, accum_coefficients a) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float Mi = M[i], Vi = V[i], ai = acc[i];
    const float x = accum_adam_update(mixed[i], float(grad[i]), Mi, Vi, ai, c, a);
    master[i] = x;
    M[i] = Mi;
    V[i] = Vi;
    acc[i] = ai;
    if (working) working[i] = subspace::bf16(x);
  }
}

template <>
struct adam_impl<subspace::exec::cuda> {
  using device_space = subspace::device_space;
  template <class T>
  using dview = subspace::view<T, device_space>;

  static void zero(const subspace::exec::cuda& ex, dview<float> x) {
    if (x.numel() > 0) subspace::cuda_check(cudaMemsetAsync(x.data(), 0, x.bytes(), ex.stream));
  }

  template <class G>
  static void dadam(const subspace::exec::cuda& ex, dview<const float> mixed, dview<float> master, dview<const G> grad,
                    dview<float> m, dview<float> v, dview<subspace::bf16> working, const adam_coefficients& c) {
    const std::int64_t n = master.numel();
    if (n == 0) return;
    dadam_kernel<G><<<subspace::cuda_detail::grid_for(n), subspace::cuda_detail::block_threads, 0, ex.stream>>>(
        mixed.data(), master.data(), grad.data(), m.data(), v.data(), working.data(), n, c);
    subspace::cuda_check_launch();
  }

  template <class G>
  static void accum(const subspace::exec::cuda& ex, dview<const float> mixed, dview<float> master, dview<const G> grad,
                    dview<float> M, dview<float> V, dview<float> acc, dview<subspace::bf16> working,
                    const adam_coefficients& c, const accum_coefficients& a) {
    const std::int64_t n = master.numel();
    if (n == 0) return;
    accum_adam_kernel<G><<<subspace::cuda_detail::grid_for(n), subspace::cuda_detail::block_threads, 0, ex.stream>>>(
        mixed.data(), master.data(), grad.data(), M.data(), V.data(), acc.data(), working.data(), n, c, a);
    subspace::cuda_check_launch();
  }
};

}  // namespace decent::detail

#pragma once
// optim::adamw on exec::cuda: one fused kernel per parameter tensor. Each element is read once (master fp32,
// grad fp32/bf16, m, v) and written once (master, m, v, and the bf16 working copy when given), with the same
// element function as the host loop (detail::adamw_update), so host and device agree bit for bit.

#include <cuda_runtime.h>

#include <cstdint>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../adamw.hpp"

namespace subspace::optim::detail {

/// Grid-stride loop over n elements. `working` may be null.
template <class G>
__global__ void adamw_kernel(float* __restrict__ master, const G* __restrict__ grad, float* __restrict__ m,
                             float* __restrict__ v, bf16* __restrict__ working, std::int64_t n, adamw_coefficients c) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float p = master[i], mi = m[i], vi = v[i];
    adamw_update(p, float(grad[i]), mi, vi, c);
    master[i] = p;
    m[i] = mi;
    v[i] = vi;
    if (working) working[i] = bf16(p);
  }
}

template <>
struct adamw_impl<exec::cuda> {
  static void zero(const exec::cuda& ex, view<float, device_space> x) {
    if (x.numel() > 0) cuda_check(cudaMemsetAsync(x.data(), 0, x.bytes(), ex.stream));
  }

  template <class G>
  static void step(const exec::cuda& ex, view<float, device_space> master, view<const G, device_space> grad,
                   view<float, device_space> m, view<float, device_space> v, view<bf16, device_space> working,
                   const adamw_coefficients& c) {
    const std::int64_t n = master.numel();
    if (n == 0) return;
    adamw_kernel<G><<<cuda_detail::grid_for(n), cuda_detail::block_threads, 0, ex.stream>>>(
        master.data(), grad.data(), m.data(), v.data(), working.data(), n, c);
    cuda_check_launch();
  }
};

}  // namespace subspace::optim::detail

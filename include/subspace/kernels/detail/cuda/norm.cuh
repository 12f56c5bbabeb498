#pragma once
// RMSNorm on CUDA: one warp per row (8 warps a block, grid-stride over rows), bf16/fp16/fp32 in and out, fp32
// statistics. Each lane walks its row in 16-byte packs when the row length and the pointers allow, element by
// element otherwise.
//
// Forward: a warp sum of x^2 gives rstd (1/sqrtf, correctly rounded), then y = x * rstd * weight in fp32,
// rounded once.
// Backward: a warp sum of dy*weight*x̂ per row, then dx. The weight gradient is summed per block in shared
// memory (d floats; shared-memory atomics between the block's warps) and added to the fp32 dweight with one
// global atomicAdd per column and block, so the order of the additions (and the last bits) may vary by run.

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../../norm.hpp"
#include "layer_common.cuh"

namespace subspace {
namespace cuda_detail::norm {

inline constexpr int warps_per_block = 8;

template <int P, class T>
__global__ void forward_kernel(const T* x, const T* weight, T* y, float* rstd, std::int64_t n, std::int64_t d,
                               float eps) {
  using pk = layer::pack<T, P>;
  const int lane = int(threadIdx.x % 32);
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32; row < n;
       row += std::int64_t(gridDim.x) * warps_per_block) {
    const T* xr = x + row * d;
    float ss = 0.0f;
    for (std::int64_t j = std::int64_t(lane) * P; j < d; j += 32 * P) {
      const pk v = *reinterpret_cast<const pk*>(xr + j);
#pragma unroll
      for (int k = 0; k < P; ++k) ss += float(v.v[k]) * float(v.v[k]);
    }
    ss = layer::warp_sum(ss);
    const float r = __frcp_rn(__fsqrt_rn(ss / float(d) + eps));
    if (lane == 0) rstd[row] = r;
    T* yr = y + row * d;
    for (std::int64_t j = std::int64_t(lane) * P; j < d; j += 32 * P) {
      const pk v = *reinterpret_cast<const pk*>(xr + j);
      const pk w = *reinterpret_cast<const pk*>(weight + j);
      pk o;
#pragma unroll
      for (int k = 0; k < P; ++k) o.v[k] = T(float(v.v[k]) * r * float(w.v[k]));
      *reinterpret_cast<pk*>(yr + j) = o;
    }
  }
}

template <int P, class T>
__global__ void backward_kernel(const T* x, const T* weight, const float* rstd, const T* dy, T* dx, float* dweight,
                                std::int64_t n, std::int64_t d) {
  using pk = layer::pack<T, P>;
  extern __shared__ float block_dw[];  // d floats
  for (std::int64_t j = threadIdx.x; j < d; j += blockDim.x) block_dw[j] = 0.0f;
  __syncthreads();
  const int lane = int(threadIdx.x % 32);
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32; row < n;
       row += std::int64_t(gridDim.x) * warps_per_block) {
    const T* xr = x + row * d;
    const T* dyr = dy + row * d;
    const float r = rstd[row];
    float dot = 0.0f;
    for (std::int64_t j = std::int64_t(lane) * P; j < d; j += 32 * P) {
      const pk xv = *reinterpret_cast<const pk*>(xr + j);
      const pk gv = *reinterpret_cast<const pk*>(dyr + j);
      const pk wv = *reinterpret_cast<const pk*>(weight + j);
#pragma unroll
      for (int k = 0; k < P; ++k) dot += float(gv.v[k]) * float(wv.v[k]) * (float(xv.v[k]) * r);
    }
    const float c = layer::warp_sum(dot) / float(d);
    T* dxr = dx + row * d;
    for (std::int64_t j = std::int64_t(lane) * P; j < d; j += 32 * P) {
      const pk xv = *reinterpret_cast<const pk*>(xr + j);
      const pk gv = *reinterpret_cast<const pk*>(dyr + j);
      const pk wv = *reinterpret_cast<const pk*>(weight + j);
      pk o;
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const float xhat = float(xv.v[k]) * r, g = float(gv.v[k]);
        o.v[k] = T(r * (g * float(wv.v[k]) - xhat * c));
        atomicAdd(block_dw + j + k, g * xhat);
      }
      *reinterpret_cast<pk*>(dxr + j) = o;
    }
  }
  __syncthreads();
  for (std::int64_t j = threadIdx.x; j < d; j += blockDim.x) atomicAdd(dweight + j, block_dw[j]);
}

}  // namespace cuda_detail::norm

/// y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps) per row (fp32), on ex.stream. T = bf16, fp16 or float.
template <class T>
  requires is_element_v<T>
void rmsnorm_forward(const exec::cuda& ex, std::type_identity_t<view<const T, device_space>> x,
                     std::type_identity_t<view<const T, device_space>> weight, float eps, view<T, device_space> y,
                     std::type_identity_t<view<accum_t<T>, device_space>> rstd) {
  static_assert(cuda_detail::layer::is_activation_v<T>, "rmsnorm_forward (CUDA): T must be bf16, fp16 or float");
  namespace N = cuda_detail::norm;
  detail::norm::check("rmsnorm_forward", x, weight, rstd, detail::layer::operand{y, "y"});
  require(eps > 0.0f, "rmsnorm_forward: eps must be positive");
  const std::int64_t n = x.dim(0), d = x.dim(1);
  if (n == 0) return;
  constexpr int P = cuda_detail::layer::pack_width<T>;
  const unsigned grid = cuda_detail::layer::grid_for_rows(n, N::warps_per_block);
  const unsigned threads = 32 * N::warps_per_block;
  if (d % P == 0 && cuda_detail::layer::all_aligned(x.data(), weight.data(), y.data()))
    N::forward_kernel<P><<<grid, threads, 0, ex.stream>>>(x.data(), weight.data(), y.data(), rstd.data(), n, d, eps);
  else N::forward_kernel<1><<<grid, threads, 0, ex.stream>>>(x.data(), weight.data(), y.data(), rstd.data(), n, d, eps);
  cuda_check_launch();
}

/// dx (overwritten) and dweight += (fp32) of RMSNorm, on ex.stream. T = bf16, fp16 or float; G = float.
template <class T, class G>
  requires(is_element_v<T> && is_element_v<G>)
void rmsnorm_backward(const exec::cuda& ex, std::type_identity_t<view<const T, device_space>> x,
                      std::type_identity_t<view<const T, device_space>> weight,
                      std::type_identity_t<view<const accum_t<T>, device_space>> rstd,
                      std::type_identity_t<view<const T, device_space>> dy, view<T, device_space> dx,
                      view<G, device_space> dweight) {
  static_assert(cuda_detail::layer::is_activation_v<T>, "rmsnorm_backward (CUDA): T must be bf16, fp16 or float");
  static_assert(std::is_same_v<G, float>, "rmsnorm_backward (CUDA): dweight must be float (fp32)");
  namespace N = cuda_detail::norm;
  detail::norm::check("rmsnorm_backward", x, weight, rstd, detail::layer::operand{dy, "dy"},
                      detail::layer::operand{dx, "dx"});
  detail::layer::require_shape(dweight, weight.shape(), "rmsnorm_backward", "dweight");
  detail::layer::require_contiguous(dweight, "rmsnorm_backward", "dweight");
  const std::int64_t n = x.dim(0), d = x.dim(1);
  if (n == 0) return;
  constexpr int P = cuda_detail::layer::pack_width<T>;
  const std::size_t smem = std::size_t(d) * sizeof(float);
  const bool packed = d % P == 0 && cuda_detail::layer::all_aligned(x.data(), weight.data(), dy.data(), dx.data());
  auto kernel = packed ? N::backward_kernel<P, T> : N::backward_kernel<1, T>;
  if (smem > 48 * 1024) {
    int device = 0, limit = 0;
    cuda_check(cudaGetDevice(&device));
    cuda_check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    require(smem <= std::size_t(limit), [&] {
      return "rmsnorm_backward (CUDA): rows of " + std::to_string(d) +
             " elements need more shared memory than a block has";
    });
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  // Few blocks: each adds its d partial sums to dweight once.
  const unsigned grid = cuda_detail::layer::grid_for_rows(n, N::warps_per_block, 2);
  kernel<<<grid, 32 * N::warps_per_block, smem, ex.stream>>>(x.data(), weight.data(), rstd.data(), dy.data(), dx.data(),
                                                             dweight.data(), n, d);
  cuda_check_launch();
}

}  // namespace subspace

#pragma once
// RMSNorm on CUDA: bf16/fp16/fp32 in and out, fp32 statistics.
//
// A row sits in registers: each lane of a warp loads its packs of the row (16 bytes each, or single elements
// when the row length or the pointers do not allow packs) all at once, so a warp has the whole row in flight
// rather than one pack at a time. A row is spread over the fewest warps of the block (1, 2, 4 or 8; they add
// their partial sums through shared memory) whose lanes hold it in at most max_packs packs each in the forward,
// and in at most backward_packs in the backward (it keeps more in registers, and needs the occupancy); rows wider
// than 8 warps hold (over 16384 bf16 values, 8192 fp32, or 2048 unaligned) take the streaming kernels, which walk
// the row in a loop.
//
// Forward: the row's sum of squares gives rstd (1/sqrtf, correctly rounded), then y = x * rstd * weight in fp32,
// rounded once.
// Backward: the row's sum of dy*weight*x̂, then dx (optionally added to what dx holds). Each lane sums its
// columns' share of the weight gradient in registers over every row its warp visits; at the end the block's
// warps add theirs in shared memory and the block adds the result to the fp32 dweight with one global atomicAdd
// per column, so the order of the additions (and the last bits) may vary by run.

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../../norm.hpp"
#include "layer_common.cuh"

namespace subspace {
namespace cuda_detail::norm {

inline constexpr int warps_per_block = 8;

/// Packs a lane holds of its row: a warp holds up to 32 · max_packs packs (2048 bf16 values) in registers.
inline constexpr int max_packs = 8;

/// Packs a lane of the backward holds when the row allows it: its weight-gradient sums stay in registers for
/// the whole kernel, and more than two packs cost the occupancy that hides the loads. On an H100 (bf16, 16384
/// rows, beta 1) two packs a lane over 2, 4 and 8 warps moved 68%, 83% and 87% of a device copy's bandwidth at
/// d = 768, 2048 and 4096, against 63%, 47% and 49% with four or eight packs over fewer warps.
inline constexpr int backward_packs = 2;

/// How rows of d values are spread over a block: `packs` packs of P values per lane (1, 2, 4 or 8), `warps` warps
/// per row (1, 2, 4 or 8), so a block works on warps_per_block / warps rows at once. packs == 0: the row does not
/// fit, and the streaming kernels run.
struct row_layout {
  int packs = 0;
  int warps = 1;
};

/// The fewest warps per row whose lanes hold it in at most `packs` packs each; then, if none does, in at most
/// max_packs.
inline row_layout layout_for(std::int64_t d, int P, int packs = max_packs) {
  const std::int64_t per_lane = (d / P + 31) / 32;  // packs a lane holds with one warp per row
  for (const int limit : {packs, max_packs})
    for (int warps = 1; warps <= warps_per_block; warps *= 2) {
      const std::int64_t need = (per_lane + warps - 1) / warps;
      if (need <= limit) return {need <= 1 ? 1 : need <= 2 ? 2 : need <= 4 ? 4 : 8, warps};
    }
  return {};
}

/// Calls f(std::integral_constant<int, packs>{}) for packs in {1, 2, 4, 8}.
template <class F>
void with_packs(int packs, F&& f) {
  switch (packs) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

/// The sum over a row's lanes and warps, returned to every thread of the row. Every thread of the block calls it
/// the same number of times when row_warps > 1 (it synchronises the block).
__device__ inline float row_sum(float v, float* partial, int warp, int row_warps) {
  v = layer::warp_sum(v);
  if (row_warps == 1) return v;
  if (threadIdx.x % 32 == 0) partial[warp] = v;
  __syncthreads();
  const int first = warp - warp % row_warps;
  v = 0.0f;
  for (int i = 0; i < row_warps; ++i) v += partial[first + i];
  __syncthreads();  // partial is written again for the next rows
  return v;
}

/// Column of pack c of a lane in slice `slice` of its row (packs interleave across lanes, so a warp's loads of
/// one c are contiguous).
template <int P, int C>
__device__ inline std::int64_t column(int slice, int c, int lane) {
  return (std::int64_t(slice * C + c) * 32 + lane) * P;
}

template <int P, int C, class T>
__global__ void __launch_bounds__(32 * warps_per_block)
    forward_rows_kernel(const T* x, const T* weight, T* y, float* rstd, std::int64_t n, std::int64_t d, int row_warps,
                        float eps) {
  using pk = layer::pack<T, P>;
  __shared__ float partial[warps_per_block];
  const int warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  const int rows_at_once = warps_per_block / row_warps, slice = warp % row_warps;
  for (std::int64_t first = std::int64_t(blockIdx.x) * rows_at_once; first < n;
       first += std::int64_t(gridDim.x) * rows_at_once) {
    const std::int64_t row = first + warp / row_warps;
    const bool live = row < n;
    pk v[C] = {};
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const std::int64_t j = column<P, C>(slice, c, lane);
      if (live && j < d) v[c] = *reinterpret_cast<const pk*>(x + row * d + j);
    }
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int k = 0; k < P; ++k) ss += float(v[c].v[k]) * float(v[c].v[k]);
    ss = row_sum(ss, partial, warp, row_warps);
    if (!live) continue;
    const float r = __frcp_rn(__fsqrt_rn(ss / float(d) + eps));
    if (slice == 0 && lane == 0) rstd[row] = r;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const std::int64_t j = column<P, C>(slice, c, lane);
      if (j >= d) continue;
      const pk w = *reinterpret_cast<const pk*>(weight + j);
      pk o;
#pragma unroll
      for (int k = 0; k < P; ++k) o.v[k] = T(float(v[c].v[k]) * r * float(w.v[k]));
      *reinterpret_cast<pk*>(y + row * d + j) = o;
    }
  }
}

template <int P, int C, class T>
__global__ void __launch_bounds__(32 * warps_per_block)
    backward_rows_kernel(const T* x, const T* weight, const float* rstd, const T* dy, T* dx, float* dweight,
                         std::int64_t n, std::int64_t d, int row_warps, float beta) {
  using pk = layer::pack<T, P>;
  extern __shared__ float block_dw[];  // d floats
  __shared__ float partial[warps_per_block];
  for (std::int64_t j = threadIdx.x; j < d; j += blockDim.x) block_dw[j] = 0.0f;
  const int warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  const int rows_at_once = warps_per_block / row_warps, slice = warp % row_warps;
  float dw[C][P] = {};  // this lane's columns of the weight gradient, over its rows
  for (std::int64_t first = std::int64_t(blockIdx.x) * rows_at_once; first < n;
       first += std::int64_t(gridDim.x) * rows_at_once) {
    const std::int64_t row = first + warp / row_warps;
    const bool live = row < n;
    pk xv[C] = {}, gv[C] = {};
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const std::int64_t j = column<P, C>(slice, c, lane);
      if (live && j < d) {
        xv[c] = *reinterpret_cast<const pk*>(x + row * d + j);
        gv[c] = *reinterpret_cast<const pk*>(dy + row * d + j);
      }
    }
    const float r = live ? rstd[row] : 0.0f;
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const std::int64_t j = column<P, C>(slice, c, lane);
      if (j >= d) continue;
      const pk w = *reinterpret_cast<const pk*>(weight + j);
#pragma unroll
      for (int k = 0; k < P; ++k) dot += float(gv[c].v[k]) * float(w.v[k]) * (float(xv[c].v[k]) * r);
    }
    const float mean = row_sum(dot, partial, warp, row_warps) / float(d);
    if (!live) continue;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const std::int64_t j = column<P, C>(slice, c, lane);
      if (j >= d) continue;
      const pk w = *reinterpret_cast<const pk*>(weight + j);
      pk o;
      if (beta != 0.0f) o = *reinterpret_cast<const pk*>(dx + row * d + j);
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const float xhat = float(xv[c].v[k]) * r, g = float(gv[c].v[k]);
        const float grad = r * (g * float(w.v[k]) - xhat * mean);
        o.v[k] = T(beta != 0.0f ? beta * float(o.v[k]) + grad : grad);
        dw[c][k] += g * xhat;
      }
      *reinterpret_cast<pk*>(dx + row * d + j) = o;
    }
  }
  __syncthreads();  // block_dw is zeroed
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const std::int64_t j = column<P, C>(slice, c, lane);
    if (j < d)
#pragma unroll
      for (int k = 0; k < P; ++k) atomicAdd(block_dw + j + k, dw[c][k]);
  }
  __syncthreads();
  for (std::int64_t j = threadIdx.x; j < d; j += blockDim.x) atomicAdd(dweight + j, block_dw[j]);
}

// The streaming kernels, for rows too wide for registers: one warp per row, walking it in a loop.

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
                                std::int64_t n, std::int64_t d, float beta) {
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
    const float mean = layer::warp_sum(dot) / float(d);
    T* dxr = dx + row * d;
    for (std::int64_t j = std::int64_t(lane) * P; j < d; j += 32 * P) {
      const pk xv = *reinterpret_cast<const pk*>(xr + j);
      const pk gv = *reinterpret_cast<const pk*>(dyr + j);
      const pk wv = *reinterpret_cast<const pk*>(weight + j);
      pk o;
      if (beta != 0.0f) o = *reinterpret_cast<const pk*>(dxr + j);
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const float xhat = float(xv.v[k]) * r, g = float(gv.v[k]);
        const float grad = r * (g * float(wv.v[k]) - xhat * mean);
        o.v[k] = T(beta != 0.0f ? beta * float(o.v[k]) + grad : grad);
        atomicAdd(block_dw + j + k, g * xhat);
      }
      *reinterpret_cast<pk*>(dxr + j) = o;
    }
  }
  __syncthreads();
  for (std::int64_t j = threadIdx.x; j < d; j += blockDim.x) atomicAdd(dweight + j, block_dw[j]);
}

/// Allows `smem` bytes of dynamic shared memory to `kernel` (rows of d fp32 weight-gradient sums).
template <class Kernel>
void allow_shared(Kernel kernel, std::size_t smem, std::int64_t d) {
  if (smem <= 48 * 1024) return;
  int device = 0, limit = 0;
  cuda_check(cudaGetDevice(&device));
  cuda_check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  require(smem <= std::size_t(limit), [&] {
    return "rmsnorm_backward (CUDA): rows of " + std::to_string(d) +
           " elements need more shared memory than a block has";
  });
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

/// Blocks for the backward: as many as the device holds at once, at most one per `rows_at_once` rows; each adds
/// its d partial sums to dweight once.
template <class Kernel>
unsigned backward_grid(Kernel kernel, std::size_t smem, std::int64_t n, int rows_at_once) {
  int per_sm = 0;
  cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 32 * warps_per_block, smem));
  return layer::grid_for_rows(n, rows_at_once, per_sm < 1 ? 1 : per_sm);
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
  const unsigned threads = 32 * N::warps_per_block;
  const auto launch = [&]<int Q>() {
    const N::row_layout l = N::layout_for(d, Q);
    if (l.packs == 0) {
      const unsigned grid = cuda_detail::layer::grid_for_rows(n, N::warps_per_block);
      N::forward_kernel<Q><<<grid, threads, 0, ex.stream>>>(x.data(), weight.data(), y.data(), rstd.data(), n, d, eps);
      return;
    }
    const unsigned grid = cuda_detail::layer::grid_for_rows(n, N::warps_per_block / l.warps);
    N::with_packs(l.packs, [&](auto C) {
      N::forward_rows_kernel<Q, C()>
          <<<grid, threads, 0, ex.stream>>>(x.data(), weight.data(), y.data(), rstd.data(), n, d, l.warps, eps);
    });
  };
  if (d % P == 0 && cuda_detail::layer::all_aligned(x.data(), weight.data(), y.data())) launch.template operator()<P>();
  else launch.template operator()<1>();
  cuda_check_launch();
}

/// dx = beta * dx + ∂x (beta 0: dx is only written) and dweight += (fp32) of RMSNorm, on ex.stream. T = bf16,
/// fp16 or float; G = float.
template <class T, class G>
  requires(is_element_v<T> && is_element_v<G>)
void rmsnorm_backward(const exec::cuda& ex, std::type_identity_t<view<const T, device_space>> x,
                      std::type_identity_t<view<const T, device_space>> weight,
                      std::type_identity_t<view<const accum_t<T>, device_space>> rstd,
                      std::type_identity_t<view<const T, device_space>> dy, view<T, device_space> dx,
                      view<G, device_space> dweight, float beta = 0.0f) {
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
  const unsigned threads = 32 * N::warps_per_block;
  const auto launch = [&]<int Q>() {
    const N::row_layout l = N::layout_for(d, Q, N::backward_packs);
    if (l.packs == 0) {
      auto kernel = N::backward_kernel<Q, T>;
      N::allow_shared(kernel, smem, d);
      kernel<<<N::backward_grid(kernel, smem, n, N::warps_per_block), threads, smem, ex.stream>>>(
          x.data(), weight.data(), rstd.data(), dy.data(), dx.data(), dweight.data(), n, d, beta);
      return;
    }
    N::with_packs(l.packs, [&](auto C) {
      auto kernel = N::backward_rows_kernel<Q, C(), T>;
      N::allow_shared(kernel, smem, d);
      kernel<<<N::backward_grid(kernel, smem, n, N::warps_per_block / l.warps), threads, smem, ex.stream>>>(
          x.data(), weight.data(), rstd.data(), dy.data(), dx.data(), dweight.data(), n, d, l.warps, beta);
    });
  };
  if (d % P == 0 && cuda_detail::layer::all_aligned(x.data(), weight.data(), dy.data(), dx.data()))
    launch.template operator()<P>();
  else launch.template operator()<1>();
  cuda_check_launch();
}

}  // namespace subspace

#pragma once
// lm_head_cross_entropy on CUDA (see loss.hpp), ordered on ex.stream.
//
// Per chunk of R rows (R from options; the default keeps the chunk's logits within 1 GiB), with the logits in L =
// T (options.logits = input, the default) or fp32:
//   1. logits[R, V] (L) = h_chunk weight^T               gemm, cuBLASLt, fp32 accumulation
//   2. one block per row: pass 1 reads the row once for its maximum and sum of exponentials (online, fp32), pass 2
//      reads it again and writes g = grad_scale * (softmax - onehot) as T over the same memory: row r of g starts
//      where row r of the logits does (row stride V sizeof(L) / sizeof(T) elements of T), each block writing at or
//      behind what it has read (a barrier between the reads and the writes of each stretch of the row)
//   3. dh_chunk = g weight (overwritten), dweight += g^T h_chunk       gemm, with g as a strided T matrix
// so the logits take R V sizeof(L) bytes of scratch (allocated and freed in stream order) and g needs none of its
// own. bf16 logits halve the bytes the three passes move and the number of chunks.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../../core/cuda/memory.cuh"
#include "../../loss.hpp"
#include "gemm.cuh"

namespace subspace {
namespace cuda_detail::loss {

inline constexpr int row_threads = 512;

/// Combines two (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -__builtin_huge_valf()) {
    m = mx;
    s = 0.0f;
    return;
  }
  s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
  m = mx;
}

/// Four consecutive logits (16-byte aligned for fp32, 8-byte for bf16) as floats.
template <class L>
__device__ __forceinline__ void load4(const L* p, float (&x)[4]) {
  if constexpr (std::is_same_v<L, float>) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    x[0] = a.x;
    x[1] = a.y;
    x[2] = b.x;
    x[3] = b.y;
  }
}

template <class G>
__device__ __forceinline__ void store(G* p, const float (&g)[4]) {
  if constexpr (std::is_same_v<G, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(g[0], g[1], g[2], g[3]);
  } else {
    const __nv_bfloat162 a = __floats2bfloat162_rn(g[0], g[1]), b = __floats2bfloat162_rn(g[2], g[3]);
    uint2 u;
    u.x = *reinterpret_cast<const unsigned*>(&a);
    u.y = *reinterpret_cast<const unsigned*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
  }
}

/// One block per row of logits[rows, vocab] (L = fp32 or bf16): losses[row], and with `grads` the row's gradient in
/// G (no wider than L) over the row's own memory. VEC = 4: the vocabulary is a multiple of 4 and the rows aligned
/// for vector accesses.
template <class L, class G, int VEC>
__global__ void __launch_bounds__(row_threads)
    softmax_cross_entropy_kernel(L* logits, std::int64_t vocab, const std::int32_t* targets, float* losses,
                                 float grad_scale, bool grads) {
  static_assert(sizeof(G) <= sizeof(L), "the gradient is written over the logits");
  constexpr float neg_inf = -__builtin_huge_valf();
  constexpr int warps = row_threads / 32;
  __shared__ float red_m[warps], red_s[warps];
  __shared__ float shared_lse, shared_target_logit;
  const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
  L* z = logits + std::int64_t(blockIdx.x) * vocab;
  G* g = reinterpret_cast<G*>(z);  // the gradient row, written over the logits row
  const std::int32_t target = targets[blockIdx.x];
  const bool valid = target >= 0 && target < vocab;  // uniform over the block

  float lse = 0.0f;
  if (valid) {
    float m = neg_inf, s = 0.0f;
    for (std::int64_t c = std::int64_t(tid) * VEC; c < vocab; c += std::int64_t(row_threads) * VEC) {
      float x[VEC];
      if constexpr (VEC == 4) load4(z + c, x);
      else x[0] = float(z[c]);
      float mx = x[0];
#pragma unroll
      for (int e = 1; e < VEC; ++e) mx = fmaxf(mx, x[e]);
      float part = 0.0f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) part += __expf(x[e] - mx);
      combine(m, s, mx, part);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
      combine(m, s, m2, s2);
    }
    if (lane == 0) {
      red_m[warp] = m;
      red_s[warp] = s;
    }
    __syncthreads();
    if (tid == 0) {
      float bm = red_m[0], bs = red_s[0];
      for (int w = 1; w < warps; ++w) combine(bm, bs, red_m[w], red_s[w]);
      shared_lse = bm + logf(bs);
      shared_target_logit = float(z[target]);  // read before any thread writes over the row
    }
    __syncthreads();
    lse = shared_lse;
    if (tid == 0) losses[blockIdx.x] = lse - shared_target_logit;
  } else if (tid == 0) {
    losses[blockIdx.x] = target == -1 ? 0.0f : __int_as_float(0x7fc00000);  // ignored: 0; out of range: NaN
  }
  if (!grads) return;

  // Pass 2: g = grad_scale * (exp(z - lse) - [j == target]); 0 for an ignored or invalid row. The writes of one
  // stretch land at or before the logits read in that stretch, so a barrier between them is enough.
  for (std::int64_t base = 0; base < vocab; base += std::int64_t(row_threads) * VEC) {
    const std::int64_t c = base + std::int64_t(tid) * VEC;
    float out[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (c < vocab && valid) {
      float x[VEC];
      if constexpr (VEC == 4) load4(z + c, x);
      else x[0] = float(z[c]);
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        out[e] = grad_scale * (__expf(x[e] - lse) - (c + e == std::int64_t(target) ? 1.0f : 0.0f));
    }
    __syncthreads();
    if (c < vocab) {
      if constexpr (VEC == 4) {
        store(g + c, out);
      } else {
        g[c] = G(out[0]);
      }
    }
  }
}

/// The chunk loop of lm_head_cross_entropy with its logits in L (see the top of the file).
template <class T, class L>
void chunked(const exec::cuda& ex, const detail::loss::dims& d, view<const T, device_space> h,
             view<const T, device_space> weight, view<const std::int32_t, device_space> targets,
             view<float, device_space> losses, view<T, device_space> dh, view<float, device_space> dweight,
             float grad_scale, const lm_head_options& options) {
  const bool want_dh = dh.data() != nullptr, want_dw = dweight.data() != nullptr, grads = want_dh || want_dw;
  const std::int64_t R = detail::loss::chunk_rows(d, sizeof(L), options);
  require(R <= 0x7fffffff, "lm_head_cross_entropy (CUDA): chunk of more than 2^31 - 1 rows");
  stream_scratch scratch(std::size_t(R) * std::size_t(d.vocab) * sizeof(L), ex.stream);
  L* logits = static_cast<L*>(scratch.get());
  const bool vec = d.vocab % 4 == 0;  // the scratch is 256-byte aligned, so rows are 16-byte (fp32) / 8-byte aligned

  for (std::int64_t r0 = 0; r0 < d.rows; r0 += R) {
    const std::int64_t n = std::min(R, d.rows - r0);
    const auto h_rows = h.slice(r0, r0 + n);
    gemm(ex, op::none, op::transpose, 1.0f, h_rows, weight, 0.0f, view<L, device_space>(logits, {n, d.vocab}));
    if (vec)
      softmax_cross_entropy_kernel<L, T, 4><<<unsigned(n), row_threads, 0, ex.stream>>>(
          logits, d.vocab, targets.data() + r0, losses.data() + r0, grad_scale, grads);
    else
      softmax_cross_entropy_kernel<L, T, 1><<<unsigned(n), row_threads, 0, ex.stream>>>(
          logits, d.vocab, targets.data() + r0, losses.data() + r0, grad_scale, grads);
    cuda_check_launch();
    if (!grads) continue;
    const std::int64_t pitch = d.vocab * std::int64_t(sizeof(L) / sizeof(T));  // g's row stride, in T
    const view<const T, device_space> g(reinterpret_cast<const T*>(logits), {n, d.vocab}, {pitch, 1, 0, 0});
    if (want_dh) gemm(ex, op::none, op::none, 1.0f, g, weight, 0.0f, dh.slice(r0, r0 + n));
    if (want_dw) gemm(ex, op::transpose, op::none, 1.0f, g, h_rows, 1.0f, dweight);
  }
}

}  // namespace cuda_detail::loss

/// lm_head_cross_entropy on ex.stream (see loss.hpp): T = bf16 (or float) h, weight and dh; fp32 losses and dweight
/// (+=); pass {} for dh or dweight to skip it. A target outside [-1, V) gives a NaN loss and no gradient.
template <class H>
  requires(std::is_same_v<std::remove_const_t<H>, bf16> || std::is_same_v<std::remove_const_t<H>, float>)
void lm_head_cross_entropy(const exec::cuda& ex, view<H, device_space> h,
                           view<const std::remove_const_t<H>, device_space> weight,
                           view<const std::int32_t, device_space> targets, view<float, device_space> losses,
                           view<std::remove_const_t<H>, device_space> dh, view<float, device_space> dweight,
                           float grad_scale, const lm_head_options& options = {}) {
  using T = std::remove_const_t<H>;
  const detail::loss::dims d = detail::loss::check("lm_head_cross_entropy", h, weight, targets, losses, dh, dweight);
  if (d.rows == 0) return;
  if (options.logits == lm_head_logits::input || std::is_same_v<T, float>)
    cuda_detail::loss::chunked<T, T>(ex, d, h, weight, targets, losses, dh, dweight, grad_scale, options);
  else cuda_detail::loss::chunked<T, float>(ex, d, h, weight, targets, losses, dh, dweight, grad_scale, options);
}

}  // namespace subspace

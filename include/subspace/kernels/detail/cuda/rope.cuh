#pragma once
// RoPE on CUDA: one thread per run of P pairs of one head (P = a 16-byte pack of T when hd/2 splits into whole
// aligned packs, else 1), grid-stride. The angle is float(pos0 + s) * inv_freq[i] in fp32, as on the host; its
// cosine and sine come from sincosf (full-range, accurate to 2 ulp), so CUDA and the host agree to a few ulp of
// fp32 before the rounding to T.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../../rope.hpp"
#include "layer_common.cuh"

namespace subspace {
namespace cuda_detail::rope {

template <int P, class T>
__global__ void apply_kernel(T* x, const float* inv_freq, std::int64_t rows, std::int64_t seq, std::int64_t heads,
                             std::int64_t half, std::int64_t pos0, bool inverse) {
  using pk = layer::pack<T, P>;
  const std::int64_t per_row = half / P, items = rows * per_row;
  for (std::int64_t it = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; it < items;
       it += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t row = it / per_row, i0 = (it % per_row) * P;  // row = (b * seq + s) * heads + h
    const std::int64_t s = (row / heads) % seq;
    T* lo_ptr = x + row * 2 * half + i0;
    T* hi_ptr = lo_ptr + half;
    pk lo = *reinterpret_cast<const pk*>(lo_ptr);
    pk hi = *reinterpret_cast<const pk*>(hi_ptr);
    const float pos = float(pos0 + s);
#pragma unroll
    for (int k = 0; k < P; ++k) {
      float sn, c;
      sincosf(pos * inv_freq[i0 + k], &sn, &c);
      if (inverse) sn = -sn;
      float a = float(lo.v[k]), b = float(hi.v[k]);
      detail::rope::rotate(a, b, c, sn);
      lo.v[k] = T(a);
      hi.v[k] = T(b);
    }
    *reinterpret_cast<pk*>(lo_ptr) = lo;
    *reinterpret_cast<pk*>(hi_ptr) = hi;
  }
}

}  // namespace cuda_detail::rope

/// Rotates every head of x [B, S, H, hd] in place by the angles (pos0 + s) * inv_freq[i] (negated when
/// `inverse`), on ex.stream. T = bf16, fp16 or float; inv_freq a float device view of hd/2 elements.
template <class T>
  requires is_element_v<T>
void rope_apply(const exec::cuda& ex, view<T, device_space> x, view<const float, device_space> inv_freq,
                std::int64_t pos0, bool inverse) {
  static_assert(cuda_detail::layer::is_activation_v<T>, "rope_apply (CUDA): T must be bf16, fp16 or float");
  detail::rope::check(x, inv_freq, pos0);
  const std::int64_t batch = x.dim(0), seq = x.dim(1), heads = x.dim(2), half = x.dim(3) / 2;
  const std::int64_t rows = batch * seq * heads;
  if (rows == 0 || half == 0) return;
  constexpr int P = cuda_detail::layer::pack_width<T>;
  const bool packed = half % P == 0 && cuda_detail::layer::all_aligned(x.data());
  const std::int64_t items = rows * (packed ? half / P : half);
  const unsigned grid = cuda_detail::grid_for(items);
  if (packed)
    cuda_detail::rope::apply_kernel<P><<<grid, cuda_detail::block_threads, 0, ex.stream>>>(
        x.data(), inv_freq.data(), rows, seq, heads, half, pos0, inverse);
  else
    cuda_detail::rope::apply_kernel<1><<<grid, cuda_detail::block_threads, 0, ex.stream>>>(
        x.data(), inv_freq.data(), rows, seq, heads, half, pos0, inverse);
  cuda_check_launch();
}

}  // namespace subspace

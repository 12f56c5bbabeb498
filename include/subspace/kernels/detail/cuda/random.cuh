#pragma once
// CUDA random fills: one thread per Philox block of four elements (grid-stride), contiguous views only.
// The four values of a block are stored with one aligned store of 4 * sizeof(T) bytes (16 bytes for fp32, 8
// for bf16 and fp16) when the data pointer allows; the last, partial block is stored element by element.
// Each element is the host's value bit for bit (see random.hpp).

#include <cuda_runtime.h>

#include <cstdint>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../random.hpp"
#include "elementwise.cuh"

namespace subspace {
namespace cuda_detail::random {

template <bool Vectorised, class T, class Draw>
__global__ void fill_kernel(std::int64_t n, T* x, std::uint64_t seed, std::uint64_t offset, Draw draw) {
  using quad = elementwise::vec_pack<T, 4>;
  const std::int64_t blocks = (n + 3) / 4;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t b = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks; b += stride) {
    float v[4];
    draw(seed, offset, std::uint64_t(b), v);
    const std::int64_t first = 4 * b;
    if (Vectorised && first + 4 <= n) {
      quad q;
#pragma unroll
      for (int k = 0; k < 4; ++k) q.v[k] = T(v[k]);
      reinterpret_cast<quad*>(x)[b] = q;
    } else {
      for (int k = 0; k < 4 && first + k < n; ++k) x[first + k] = T(v[k]);
    }
  }
}

template <class T, class Draw>
void fill(const exec::cuda& ex, view<T, device_space> x, std::uint64_t seed, std::uint64_t offset, Draw draw,
          const char* op) {
  detail::elementwise::require_contiguous(x, op);
  const std::int64_t n = x.numel();
  if (n == 0) return;
  const unsigned grid = grid_for((n + 3) / 4);
  if (elementwise::aligned_to(x.data(), 4 * sizeof(T)))
    fill_kernel<true><<<grid, block_threads, 0, ex.stream>>>(n, x.data(), seed, offset, draw);
  else fill_kernel<false><<<grid, block_threads, 0, ex.stream>>>(n, x.data(), seed, offset, draw);
  cuda_check_launch();
}

}  // namespace cuda_detail::random

/// Element i of x <- T(rng::uniform_at(seed, offset, i, lo, hi)), bit-identical to the host; on ex.stream.
template <class T>
  requires is_element_v<T>
void fill_uniform(const exec::cuda& ex, view<T, device_space> x, std::uint64_t seed, std::uint64_t offset,
                  float lo = 0.0f, float hi = 1.0f) {
  cuda_detail::random::fill(ex, x, seed, offset, detail::random::uniform_draw{lo, hi}, "fill_uniform");
}

/// Element i of x <- T(rng::normal_at(seed, offset, i, mean, std)), bit-identical to the host; on ex.stream.
template <class T>
  requires is_element_v<T>
void fill_normal(const exec::cuda& ex, view<T, device_space> x, std::uint64_t seed, std::uint64_t offset,
                 float mean = 0.0f, float std = 1.0f) {
  cuda_detail::random::fill(ex, x, seed, offset, detail::random::normal_draw{mean, std}, "fill_normal");
}

}  // namespace subspace

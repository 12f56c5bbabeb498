#pragma once
// Pieces shared by the CUDA layer kernels (embedding, norm, rope, swiglu): element-type checks, 16-byte packs,
// warp sums and a stream-ordered device scratch buffer.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../../core/cuda/memory.cuh"
#include "../../../core/dtype.hpp"
#include "elementwise.cuh"

namespace subspace::cuda_detail::layer {

/// The activation types the CUDA layer kernels take: bf16 (the training type), fp16 and fp32.
template <class T>
inline constexpr bool is_activation_v = std::is_same_v<T, bf16> || std::is_same_v<T, fp16> || std::is_same_v<T, float>;

/// Elements of T in one 16-byte pack.
template <class T>
inline constexpr int pack_width = int(16 / sizeof(T));

template <class T, int P>
using pack = elementwise::vec_pack<T, P>;

using elementwise::aligned_to;

/// True when every pointer is aligned to a whole 16-byte pack.
template <class... Ptr>
bool all_aligned(const Ptr*... p) {
  return (aligned_to(p, 16) && ...);
}

/// The sum of v over the 32 lanes of a warp, returned to every lane.
__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

/// Blocks of `warps` warps for a warp-per-row loop over `rows` rows, capped like grid_for.
inline unsigned grid_for_rows(std::int64_t rows, int warps, std::int64_t cap_per_sm = 8) {
  const std::int64_t needed = (rows + warps - 1) / warps;
  const std::int64_t cap = std::int64_t(multiprocessors()) * cap_per_sm;
  return unsigned(needed < 1 ? 1 : (needed < cap ? needed : cap));
}

}  // namespace subspace::cuda_detail::layer

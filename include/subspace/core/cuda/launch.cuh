#pragma once
// Launch geometry shared by the element-wise style kernels: grid-stride loops over n items.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "error.cuh"

namespace subspace::cuda_detail {

inline constexpr int block_threads = 256;

/// Multiprocessor count of the current device (cached per device).
inline int multiprocessors() {
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  static thread_local int cached_device = -1, cached_count = 0;
  if (device != cached_device) {
    cuda_check(cudaDeviceGetAttribute(&cached_count, cudaDevAttrMultiProcessorCount, device));
    cached_device = device;
  }
  return cached_count;
}

/// Blocks for a grid-stride loop over `items`: enough to fill the device a few times over, never more than
/// the items need.
inline unsigned grid_for(std::int64_t items, int threads = block_threads) {
  const std::int64_t needed = (items + threads - 1) / threads;
  const std::int64_t cap = std::int64_t(multiprocessors()) * 8;
  return unsigned(std::max<std::int64_t>(1, std::min(needed, cap)));
}

}  // namespace subspace::cuda_detail

#pragma once
// pack_token_ids / unpack_token_ids on CUDA: one thread per id, grid-stride, ordered on ex.stream. Packing marks
// the first id that does not fit in a device word and the call reads it back (one synchronisation) to raise as the
// host does.

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <string>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../../core/cuda/memory.cuh"
#include "../../token_ids.hpp"

namespace subspace {
namespace cuda_detail::token_ids {

inline constexpr unsigned long long no_error = std::numeric_limits<unsigned long long>::max();

__global__ void pack_kernel(const std::int32_t* ids, std::uint8_t* bytes, std::int64_t n, int width,
                            unsigned long long* bad) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int32_t t = ids[i];
    if (t < 0 || (width == 2 && t > 0xffff)) atomicMin(bad, static_cast<unsigned long long>(i));
    const auto u = std::uint32_t(t);
    for (int b = 0; b < width; ++b) bytes[i * width + b] = std::uint8_t(u >> (8 * b));
  }
}

__global__ void unpack_kernel(const std::uint8_t* bytes, std::int32_t* ids, std::int64_t n, int width) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    std::uint32_t u = 0;
    for (int b = 0; b < width; ++b) u |= std::uint32_t(bytes[i * width + b]) << (8 * b);
    ids[i] = std::int32_t(u);
  }
}

}  // namespace cuda_detail::token_ids

inline void pack_token_ids(const exec::cuda& ex, view<const std::int32_t, device_space> ids,
                           view<std::uint8_t, device_space> bytes, int width) {
  detail::token_ids::check(ids.numel(), bytes.numel(), width, "pack_token_ids");
  if (ids.numel() == 0) return;
  cuda_detail::stream_scratch flag(sizeof(unsigned long long), ex.stream);
  cuda_check(cudaMemsetAsync(flag.as<void>(), 0xff, sizeof(unsigned long long), ex.stream));  // no_error
  cuda_detail::token_ids::pack_kernel<<<cuda_detail::grid_for(ids.numel()), cuda_detail::block_threads, 0, ex.stream>>>(
      ids.data(), bytes.data(), ids.numel(), width, flag.as<unsigned long long>());
  cuda_check_launch();
  unsigned long long first = cuda_detail::token_ids::no_error;
  cuda_check(cudaMemcpyAsync(&first, flag.as<void>(), sizeof first, cudaMemcpyDeviceToHost, ex.stream));
  ex.synchronize();
  if (first != cuda_detail::token_ids::no_error) [[unlikely]]
    throw invalid_argument("pack_token_ids: the id at position " + std::to_string(first) + " does not fit " +
                           std::to_string(width) + " unsigned bytes");
}

inline void unpack_token_ids(const exec::cuda& ex, view<const std::uint8_t, device_space> bytes,
                             view<std::int32_t, device_space> ids, int width) {
  detail::token_ids::check(ids.numel(), bytes.numel(), width, "unpack_token_ids");
  if (ids.numel() == 0) return;
  cuda_detail::token_ids::
      unpack_kernel<<<cuda_detail::grid_for(ids.numel()), cuda_detail::block_threads, 0, ex.stream>>>(
          bytes.data(), ids.data(), ids.numel(), width);
  cuda_check_launch();
}

}  // namespace subspace

#pragma once
// Shared by the CUDA tests (include from .cu files only): a stream of the test's own, and the bitwise comparison of
// device results brought back to the host.

#if !defined(__CUDACC__)
#error "support/cuda.hpp is for the CUDA tests (.cu files) only"
#endif

#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include <subspace/core/cuda/error.cuh>
#include <subspace/core/tensor.hpp>

namespace subspace::testing {

/// A non-blocking stream, so work that strays onto the legacy default stream would race and show.
struct stream_guard {
  cudaStream_t stream = nullptr;
  stream_guard() { cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)); }
  ~stream_guard() { cudaStreamDestroy(stream); }
  stream_guard(const stream_guard&) = delete;
  stream_guard& operator=(const stream_guard&) = delete;
};

/// Index of the first element whose bits differ, or -1.
template <class T>
std::int64_t first_difference(const host_tensor<T>& a, const host_tensor<T>& b) {
  REQUIRE(a.shape() == b.shape());
  for (std::int64_t i = 0; i < a.numel(); ++i)
    if (std::memcmp(a.data() + i, b.data() + i, sizeof(T)) != 0) return i;
  return -1;
}

}  // namespace subspace::testing

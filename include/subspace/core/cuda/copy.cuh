#pragma once
// Copies between any two memory spaces, ordered on a CUDA stream.

#include <cuda_runtime.h>

#include "../tensor.hpp"
#include "executor.cuh"

namespace subspace {

/// Copies src into dst (same shape, same element type) on ex.stream. Both views must be contiguous, or rank-2
/// with unit stride in the last dimension (a pitched 2-D copy). Host memory may be pageable; the copy is then
/// complete when the call returns for host destinations only after ex.synchronize().
template <class S, class T, class SpaceA, class SpaceB>
  requires std::is_same_v<std::remove_const_t<S>, T>
void copy(const exec::cuda& ex, view<S, SpaceA> src, view<T, SpaceB> dst) {
  detail::require_same_shape(src, dst, "copy");
  if (src.empty()) return;
  if (src.is_contiguous() && dst.is_contiguous()) {
    cuda_check(cudaMemcpyAsync(dst.data(), src.data(), src.bytes(), cudaMemcpyDefault, ex.stream));
    return;
  }
  require(src.rank() == 2 && src.stride(1) == 1 && dst.stride(1) == 1, [&] {
    return "copy: on CUDA, views must be contiguous or rank-2 row-strided; got shape " + to_string(src.shape());
  });
  cuda_check(cudaMemcpy2DAsync(dst.data(), std::size_t(dst.stride(0)) * sizeof(T), src.data(),
                               std::size_t(src.stride(0)) * sizeof(T), std::size_t(src.dim(1)) * sizeof(T),
                               std::size_t(src.dim(0)), cudaMemcpyDefault, ex.stream));
}

/// A host copy of a device view (synchronizes ex.stream).
template <class S>
tensor<std::remove_const_t<S>, host_space> to_host(const exec::cuda& ex, view<S, device_space> src) {
  tensor<std::remove_const_t<S>, host_space> out(src.shape());
  copy(ex, src, out.v());
  ex.synchronize();
  return out;
}

/// A device copy of a host view (ordered on ex.stream; the host view must outlive the copy).
template <class S>
tensor<std::remove_const_t<S>, device_space> to_device(const exec::cuda& ex, view<S, host_space> src) {
  tensor<std::remove_const_t<S>, device_space> out(src.shape());
  copy(ex, src, out.v());
  return out;
}

}  // namespace subspace

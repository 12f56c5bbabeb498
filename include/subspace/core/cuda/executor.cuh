#pragma once
// exec::cuda: operations run asynchronously on `stream` of the current device.

#include <cuda_runtime.h>

#include "../executor.hpp"
#include "error.cuh"

namespace subspace {
namespace exec {

/// Runs on a CUDA stream (the legacy default stream when none is given). Operations are asynchronous with
/// respect to the host; call synchronize() before reading results on the host.
struct cuda {
  cudaStream_t stream = nullptr;

  void synchronize() const { cuda_check(cudaStreamSynchronize(stream)); }
};

}  // namespace exec

template <>
struct space_of<exec::cuda> {
  using type = device_space;
};

}  // namespace subspace

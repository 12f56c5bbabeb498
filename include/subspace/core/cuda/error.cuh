#pragma once
// CUDA, cuBLAS(Lt) and NCCL status checks that throw subspace::cuda_error with file, line and the library's
// own message.

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <source_location>
#include <string>

#include "../error.hpp"

namespace subspace {

/// A CUDA runtime, cuBLAS or NCCL call failed.
class cuda_error : public error {
 public:
  using error::error;
};

/// Throws cuda_error naming the call site and CUDA's message unless `status` is cudaSuccess.
inline void cuda_check(cudaError_t status, const std::source_location& loc = std::source_location::current()) {
  if (status != cudaSuccess)
    throw cuda_error(detail::where(loc) + ": CUDA error " + cudaGetErrorName(status) + ": " +
                     cudaGetErrorString(status));
}

/// Checks the last kernel launch (launch-configuration errors) without synchronizing.
inline void cuda_check_launch(const std::source_location& loc = std::source_location::current()) {
  cuda_check(cudaGetLastError(), loc);
}

/// Throws cuda_error naming the call site and cuBLAS's status unless `status` is CUBLAS_STATUS_SUCCESS.
inline void cublas_check(cublasStatus_t status, const std::source_location& loc = std::source_location::current()) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw cuda_error(detail::where(loc) + ": cuBLAS error " + std::to_string(int(status)) + ": " +
                     cublasLtGetStatusString(status));
}

}  // namespace subspace

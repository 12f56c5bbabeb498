#pragma once
// GoLore's Gaussian Omega on CUDA: one thread per Philox block of four elements, the same draws as the host
// (optim/projector.hpp) bit for bit. The QR, the SVD and the GEMMs of the projector functions come from
// kernels/detail/cuda/{linalg,gemm}.cuh.

#include <cuda_runtime.h>

#include <cstdint>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../../kernels/detail/cuda/gemm.cuh"
#include "../../../kernels/detail/cuda/linalg.cuh"
#include "../../projector.hpp"

namespace subspace::optim {
namespace detail {

template <class T>
__global__ void golore_gaussian_kernel(std::int64_t total, std::int64_t rank, std::uint64_t seed,
                                       std::uint32_t param_id, std::uint64_t refresh_id, T* omega, std::int64_t s0,
                                       std::int64_t s1) {
  const std::int64_t blocks = (total + 3) / 4, stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t b = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks; b += stride) {
    float draws[4];
    golore_normal4(seed, param_id, refresh_id, std::uint64_t(b), draws);
    for (int lane = 0; lane < 4; ++lane) {
      const std::int64_t idx = 4 * b + lane;
      if (idx < total) omega[(idx / rank) * s0 + (idx % rank) * s1] = T(draws[lane]);
    }
  }
}

}  // namespace detail

/// Omega <- GoLore's Gaussian draws for (seed, param_id, refresh_id) on ex.stream (any strides), bit-identical
/// to the host's.
template <class T>
void golore_gaussian(const exec::cuda& ex, const projection& p, std::uint64_t seed, std::uint32_t param_id,
                     std::uint64_t refresh_id, view<T, device_space> omega) {
  detail::golore_check(p, refresh_id);
  require(omega.shape() == p.omega_shape(), [&] {
    return "golore_gaussian: Omega has shape " + to_string(omega.shape()) + ", expected " + to_string(p.omega_shape());
  });
  const std::int64_t total = p.short_dim() * p.rank;
  if (total == 0) return;
  detail::golore_gaussian_kernel<<<cuda_detail::grid_for((total + 3) / 4), cuda_detail::block_threads, 0, ex.stream>>>(
      total, p.rank, seed, param_id, refresh_id, omega.data(), omega.stride(0), omega.stride(1));
  cuda_check_launch();
}

}  // namespace subspace::optim

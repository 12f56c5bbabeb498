#pragma once
// Allocation per memory space. Host memory is 64-byte aligned; device memory comes from cudaMalloc and is
// available only in translation units compiled by nvcc (core/cuda/memory.cuh specialises space_memory).

#include <cstddef>
#include <new>

#include "executor.hpp"

namespace subspace {

/// allocate/deallocate raw bytes in a memory space.
template <class Space>
struct space_memory {
  static_assert(dependent_false<Space>,
                "device_space memory needs CUDA: compile this translation unit with nvcc (a .cu file) and link "
                "subspace::subspace from a project with the CUDA language enabled");
};

template <>
struct space_memory<host_space> {
  static constexpr std::size_t alignment = 64;
  static void* allocate(std::size_t bytes) {
    return bytes == 0 ? nullptr : ::operator new(bytes, std::align_val_t{alignment});
  }
  static void deallocate(void* p) noexcept {
    if (p) ::operator delete(p, std::align_val_t{alignment});
  }
};

}  // namespace subspace

#if defined(__CUDACC__)
#include "cuda/memory.cuh"
#endif

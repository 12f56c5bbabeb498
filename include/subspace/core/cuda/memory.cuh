#pragma once
// Device memory from cudaMalloc on the current device.

#include <cuda_runtime.h>

#include "../memory.hpp"
#include "error.cuh"

namespace subspace {

template <>
struct space_memory<device_space> {
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    cuda_check(cudaMalloc(&p, bytes));
    return p;
  }
  static void deallocate(void* p) noexcept {
    if (p) cudaFree(p);  // a destructor must not throw; a failed free leaves nothing to recover
  }
};

}  // namespace subspace

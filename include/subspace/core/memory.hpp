#pragma once
// Allocation per memory space. Host memory is 64-byte aligned; device memory comes from cudaMalloc and is
// available only in translation units compiled by nvcc (core/cuda/memory.cuh specialises space_memory).
//
// capacity() is all the memory of the space (the host's physical memory; the current CUDA device's), and
// require_capacity checks a plan against it before anything allocates: a model too large for the machine is an
// error naming its sizes, not an allocation failure halfway through (or the OOM killer).

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <string>

#include "error.hpp"
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
  /// The host's physical memory in bytes.
  static std::uint64_t capacity() {
    const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? std::uint64_t(pages) * std::uint64_t(page) : UINT64_MAX;
  }
  static std::string name() { return "host memory"; }
};

/// Throws invalid_argument unless `bytes` fit in the capacity() of Space: "<what()> need <bytes> bytes, more than
/// the <capacity> bytes of <space>". `what` is a callable building the text, called only on failure.
template <class Space, class MakeWhat>
void require_capacity(std::uint64_t bytes, MakeWhat&& what) {
  const std::uint64_t capacity = space_memory<Space>::capacity();
  require(bytes <= capacity, [&] {
    return std::string(what()) + " need " + std::to_string(bytes) + " bytes, more than the " +
           std::to_string(capacity) + " bytes of " + space_memory<Space>::name();
  });
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "cuda/memory.cuh"
#endif

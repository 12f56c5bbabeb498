#pragma once
// Device memory: tensors from cudaMalloc on the current device; kernel scratch from the device's default memory
// pool in stream order (cudaMallocAsync / cudaFreeAsync).
//
// The default pool returns freed memory to the driver whenever a stream synchronises, so scratch that a training
// step allocates and frees every step (the loss's logits chunk, attention's accumulators, CUB's temporaries) would
// be mapped afresh each step. The first stream_scratch on a device therefore raises that pool's release threshold
// to "never": the pool keeps what it has grown to, as a caching allocator does. Set the threshold back with
// cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, ...) after that if you need the memory elsewhere.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>

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
  /// The current device's memory in bytes.
  static std::uint64_t capacity() {
    std::size_t free = 0, total = 0;
    cuda_check(cudaMemGetInfo(&free, &total));
    return total;
  }
  static std::string name() {
    int device = 0;
    cuda_check(cudaGetDevice(&device));
    return "CUDA device " + std::to_string(device) + "'s memory";
  }
};

namespace cuda_detail {

/// Makes the current device's default memory pool keep freed memory (see the top of this file); once per device.
inline void retain_pool_memory() {
  static std::mutex mutex;
  static std::uint64_t done = 0;  // bit d: device d's pool is set
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  if (device < 64 && (done >> device & 1u)) return;
  cudaMemPool_t pool = nullptr;
  cuda_check(cudaDeviceGetDefaultMemPool(&pool, device));
  std::uint64_t never = UINT64_MAX;
  cuda_check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &never));
  if (device < 64) done |= std::uint64_t(1) << device;
}

/// Device scratch space allocated and released in stream order: work queued on `stream` before the destructor
/// may still use it. Zero bytes allocate nothing (get() is null).
class stream_scratch {
 public:
  stream_scratch(std::size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes == 0) return;
    retain_pool_memory();
    cuda_check(cudaMallocAsync(&ptr_, bytes, stream));
  }
  ~stream_scratch() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);  // a destructor must not throw
  }
  stream_scratch(const stream_scratch&) = delete;
  stream_scratch& operator=(const stream_scratch&) = delete;
  void* get() const { return ptr_; }
  template <class U>
  U* as() const {
    return static_cast<U*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace cuda_detail
}  // namespace subspace

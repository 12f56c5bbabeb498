#pragma once
// Executors say where an operation runs; they are values passed to every operation (as in MatX and Thrust).
// Memory spaces say where data lives; they are types carried by every view and tensor (as in Kokkos).
//
// exec::host runs on the calling thread (kernels that parallelise use at most `threads` threads, through
// parallel_for in core/parallel.hpp).
// exec::cuda{stream} runs on a CUDA stream; it is declared in core/cuda/executor.cuh, which the umbrella
// headers include only in translation units compiled by nvcc.

#include <thread>
#include <type_traits>

#include "config.hpp"

namespace subspace {

/// Memory that the host can dereference.
struct host_space {
  static constexpr const char* name = "host";
};
/// Memory on the current CUDA device.
struct device_space {
  static constexpr const char* name = "device";
};

template <class S>
inline constexpr bool is_memory_space_v = std::is_same_v<S, host_space> || std::is_same_v<S, device_space>;

namespace exec {

/// The vector instructions host kernels may use.
enum class host_simd {
  native,    ///< the widest the CPU reports at run time (x86-64 with GCC or Clang: AVX-512, else AVX2 with FMA)
  portable,  ///< only the portable code, vectorised for the build's target: the reference the others are tested against
};

/// Runs on the calling thread. `threads` bounds the worker threads a kernel may use (0: all hardware threads);
/// `simd` the vector instructions it may use (results differ between the two in rounding only).
struct host {
  int threads = 0;
  host_simd simd = host_simd::native;

  int concurrency() const {
    if (threads > 0) return threads;
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : int(hw);
  }
  void synchronize() const {}  // host work is complete when the call returns
};

}  // namespace exec

/// The memory space an executor's operations read and write.
template <class Exec>
struct space_of {
  static_assert(dependent_false<Exec>, "space_of: not an executor (use exec::host or exec::cuda)");
};
template <>
struct space_of<exec::host> {
  using type = host_space;
};
template <class Exec>
using space_of_t = typename space_of<Exec>::type;

}  // namespace subspace

#if defined(__CUDACC__)
#include "cuda/executor.cuh"
#endif

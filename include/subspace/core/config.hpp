#pragma once
// Compiler-capability annotations shared by host and device code.
//
// SUBSPACE_HD marks functions that are valid on both the host and the device. Under a host compiler it
// expands to nothing; it never selects a backend (both backends coexist in one nvcc translation unit).

#if defined(__CUDACC__)
#define SUBSPACE_HD __host__ __device__
#define SUBSPACE_HAS_CUDA 1
#else
#define SUBSPACE_HD
#define SUBSPACE_HAS_CUDA 0
#endif

#include <type_traits>

namespace subspace {

/// `false`, dependent on T: the body of a primary template that must never be instantiated, so that its
/// static_assert fires only for the unsupported case and can say what to do instead.
template <class...>
inline constexpr bool dependent_false = false;

}  // namespace subspace

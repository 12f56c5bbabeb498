#pragma once
// CUDA element-wise kernels: fill, axpy, scale and cast on contiguous device views, ordered on ex.stream.
//
// One kernel, map_kernel, does the work of all four: y[i] = op(x[i], y[i]) in a grid-stride loop. When every
// pointer it touches is aligned to a 16-byte pack of the wider element type, each thread moves whole packs
// (16-byte loads and stores of the wider type); the elements past the last whole pack are handled one by one
// in the same loop. The element arithmetic is the host's (the op structs in elementwise.hpp), so results are
// bit-identical to exec::host.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../elementwise.hpp"

namespace subspace {
namespace cuda_detail::elementwise {

/// N consecutive elements moved as one aligned load or store.
template <class T, int N>
struct alignas(sizeof(T) * N) vec_pack {
  T v[N];
};

inline bool aligned_to(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

/// y[i] = op(x[i], y[i]) for i < n. ReadX / ReadY say which operands the op uses (the others are passed
/// value-initialised and never loaded). N > 1: items below n / N are whole packs of N elements.
template <int N, bool ReadX, bool ReadY, class X, class Y, class Op>
__global__ void map_kernel(std::int64_t n, const X* x, Y* y, Op op) {
  const std::int64_t packs = n / N;
  const std::int64_t items = packs + (n - packs * N);
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items; i += stride) {
    if (i < packs) {
      vec_pack<X, N> xs{};
      vec_pack<Y, N> ys{};
      if constexpr (ReadX) xs = reinterpret_cast<const vec_pack<X, N>*>(x)[i];
      if constexpr (ReadY) ys = reinterpret_cast<const vec_pack<Y, N>*>(y)[i];
#pragma unroll
      for (int k = 0; k < N; ++k) ys.v[k] = op(xs.v[k], ys.v[k]);
      reinterpret_cast<vec_pack<Y, N>*>(y)[i] = ys;
    } else {
      const std::int64_t e = packs * N + (i - packs);
      X xe{};
      Y ye{};
      if constexpr (ReadX) xe = x[e];
      if constexpr (ReadY) ye = y[e];
      y[e] = op(xe, ye);
    }
  }
}

/// Launches map_kernel over n elements on ex.stream, with 16-byte packs when the pointers allow.
template <bool ReadX, bool ReadY, class X, class Y, class Op>
void map(const exec::cuda& ex, std::int64_t n, const X* x, Y* y, Op op) {
  if (n == 0) return;
  constexpr int N = int(16 / (sizeof(X) > sizeof(Y) ? sizeof(X) : sizeof(Y)));
  const bool vectorised = aligned_to(y, N * sizeof(Y)) && (!ReadX || aligned_to(x, N * sizeof(X)));
  if (vectorised) {
    const std::int64_t items = n / N + n % N;
    map_kernel<N, ReadX, ReadY><<<grid_for(items), block_threads, 0, ex.stream>>>(n, x, y, op);
  } else {
    map_kernel<1, ReadX, ReadY><<<grid_for(n), block_threads, 0, ex.stream>>>(n, x, y, op);
  }
  cuda_check_launch();
}

}  // namespace cuda_detail::elementwise

/// Sets every element of x to `value` (x contiguous), on ex.stream.
template <class T>
  requires is_element_v<T>
void fill(const exec::cuda& ex, view<T, device_space> x, std::type_identity_t<T> value) {
  detail::elementwise::require_contiguous(x, "fill");
  cuda_detail::elementwise::map<false, false>(ex, x.numel(), static_cast<const T*>(nullptr), x.data(),
                                              detail::elementwise::fill_op<T>{value});
}

/// y <- alpha * x + y (x, y contiguous), computed in accum_t<T>, on ex.stream.
template <class X, class T>
  requires(is_element_v<T> && std::is_same_v<std::remove_const_t<X>, T>)
void axpy(const exec::cuda& ex, float alpha, view<X, device_space> x, view<T, device_space> y) {
  detail::require_same_shape(x, y, "axpy");
  detail::elementwise::require_contiguous(x, "axpy");
  detail::elementwise::require_contiguous(y, "axpy");
  cuda_detail::elementwise::map<true, true>(ex, y.numel(), static_cast<const T*>(x.data()), y.data(),
                                            detail::elementwise::axpy_op<T>{accum_t<T>(alpha)});
}

/// x <- alpha * x (x contiguous), computed in accum_t<T>, on ex.stream.
template <class T>
  requires is_element_v<T>
void scale(const exec::cuda& ex, float alpha, view<T, device_space> x) {
  detail::elementwise::require_contiguous(x, "scale");
  cuda_detail::elementwise::map<false, true>(ex, x.numel(), static_cast<const T*>(nullptr), x.data(),
                                             detail::elementwise::scale_op<T>{accum_t<T>(alpha)});
}

/// y <- x converted to To, rounded to nearest even (x, y contiguous), on ex.stream.
template <class X, class To>
  requires(is_element_v<std::remove_const_t<X>> && is_element_v<To>)
void cast(const exec::cuda& ex, view<X, device_space> x, view<To, device_space> y) {
  using From = std::remove_const_t<X>;
  detail::require_same_shape(x, y, "cast");
  detail::elementwise::require_contiguous(x, "cast");
  detail::elementwise::require_contiguous(y, "cast");
  cuda_detail::elementwise::map<true, false>(ex, y.numel(), static_cast<const From*>(x.data()), y.data(),
                                             detail::elementwise::cast_op<To, From>{});
}

}  // namespace subspace

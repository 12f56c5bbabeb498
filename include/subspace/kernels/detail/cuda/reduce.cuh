#pragma once
// CUDA reductions on contiguous device views, by CUB's DeviceReduce::TransformReduce (each element is widened
// to accum_t<T>, or squared, on load; the tree reduction runs in accum_t<T>).
//
// *_into(ex, x, out) is asynchronous: it writes the result into the one-element device view `out` on
// ex.stream, with CUB's scratch space allocated and freed stream-ordered (cudaMallocAsync / cudaFreeAsync),
// so nothing synchronizes: a training loop can feed the result to the next kernel (gradient clipping, say)
// without a round trip through the host. sum / max / squared_norm return the value and synchronize ex.stream.
//
// The summation order is CUB's tree, not the host's: CUDA sums agree with the host to accumulation precision,
// not bit for bit. max is exact; NaN propagates as on the host.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include <cub/device/device_reduce.cuh>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/memory.cuh"
#include "../../reduce.hpp"

namespace subspace {
namespace cuda_detail::reduce {

template <class T>
struct widen {
  __host__ __device__ accum_t<T> operator()(const T& x) const { return accum_t<T>(x); }
};
template <class T>
struct widen_square {
  __host__ __device__ accum_t<T> operator()(const T& x) const {
    const accum_t<T> a = accum_t<T>(x);
    return a * a;
  }
};
struct plus {
  template <class A>
  __host__ __device__ A operator()(const A& a, const A& b) const {
    return a + b;
  }
};
/// max that propagates NaN from either side (so the reduction is NaN when any element is).
struct nan_max {
  template <class A>
  __host__ __device__ A operator()(const A& a, const A& b) const {
    if (a != a) return a;
    if (b != b) return b;
    return a < b ? b : a;
  }
};

/// out[0] = reduce(transform(x[i])) over the contiguous view x, on ex.stream, asynchronously.
template <class X, class A, class Transform, class Reduce>
void transform_reduce_into(const exec::cuda& ex, view<X, device_space> x, view<A, device_space> out,
                           Transform transform, Reduce reduce, A init, const char* op) {
  using T = std::remove_const_t<X>;
  static_assert(std::is_same_v<A, accum_t<T>>);
  detail::elementwise::require_contiguous(x, op);
  require(out.numel() == 1, [&] {
    return std::string(op) + ": the result view must have exactly one element; got shape " + to_string(out.shape());
  });
  const T* in = x.data();
  const std::int64_t n = x.numel();
  std::size_t bytes = 0;
  cuda_check(cub::DeviceReduce::TransformReduce(nullptr, bytes, in, out.data(), n, reduce, transform, init, ex.stream));
  // Never null: CUB reads a null pointer as "query the size".
  cuda_detail::stream_scratch scratch(bytes > 0 ? bytes : 1, ex.stream);
  cuda_check(
      cub::DeviceReduce::TransformReduce(scratch.get(), bytes, in, out.data(), n, reduce, transform, init, ex.stream));
}

/// Runs an *_into reduction into a stream-ordered device scalar and returns it (synchronizes ex.stream).
template <class A, class Into>
A value_of(const exec::cuda& ex, Into into) {
  cuda_detail::stream_scratch result(sizeof(A), ex.stream);
  into(view<A, device_space>(static_cast<A*>(result.get()), shape{1}));
  A host = 0;
  cuda_check(cudaMemcpyAsync(&host, result.get(), sizeof(A), cudaMemcpyDeviceToHost, ex.stream));
  ex.synchronize();
  return host;
}

}  // namespace cuda_detail::reduce

/// out[0] = the sum of the elements of x (0 for an empty view); asynchronous on ex.stream. x contiguous.
template <class X>
  requires is_element_v<std::remove_const_t<X>>
void sum_into(const exec::cuda& ex, view<X, device_space> x, view<accum_t<std::remove_const_t<X>>, device_space> out) {
  using T = std::remove_const_t<X>;
  cuda_detail::reduce::transform_reduce_into(ex, x, out, cuda_detail::reduce::widen<T>{}, cuda_detail::reduce::plus{},
                                             accum_t<T>(0), "sum");
}

/// out[0] = the sum of the squared elements of x (0 for an empty view); asynchronous on ex.stream.
template <class X>
  requires is_element_v<std::remove_const_t<X>>
void squared_norm_into(const exec::cuda& ex, view<X, device_space> x,
                       view<accum_t<std::remove_const_t<X>>, device_space> out) {
  using T = std::remove_const_t<X>;
  cuda_detail::reduce::transform_reduce_into(ex, x, out, cuda_detail::reduce::widen_square<T>{},
                                             cuda_detail::reduce::plus{}, accum_t<T>(0), "squared_norm");
}

/// out[0] = the largest element of x, NaN when any element is NaN; asynchronous on ex.stream. Throws
/// invalid_argument for an empty view.
template <class X>
  requires is_element_v<std::remove_const_t<X>>
void max_into(const exec::cuda& ex, view<X, device_space> x, view<accum_t<std::remove_const_t<X>>, device_space> out) {
  using T = std::remove_const_t<X>;
  using A = accum_t<T>;
  require(!x.empty(), [&] { return "max: empty view (shape " + to_string(x.shape()) + ") has no largest element"; });
  cuda_detail::reduce::transform_reduce_into(ex, x, out, cuda_detail::reduce::widen<T>{},
                                             cuda_detail::reduce::nan_max{}, -std::numeric_limits<A>::infinity(),
                                             "max");
}

/// The sum of the elements of x; synchronizes ex.stream.
template <class X>
  requires is_element_v<std::remove_const_t<X>>
accum_t<std::remove_const_t<X>> sum(const exec::cuda& ex, view<X, device_space> x) {
  using A = accum_t<std::remove_const_t<X>>;
  return cuda_detail::reduce::value_of<A>(ex, [&](view<A, device_space> out) { sum_into(ex, x, out); });
}

/// The sum of the squared elements of x; synchronizes ex.stream.
template <class X>
  requires is_element_v<std::remove_const_t<X>>
accum_t<std::remove_const_t<X>> squared_norm(const exec::cuda& ex, view<X, device_space> x) {
  using A = accum_t<std::remove_const_t<X>>;
  return cuda_detail::reduce::value_of<A>(ex, [&](view<A, device_space> out) { squared_norm_into(ex, x, out); });
}

/// The largest element of x (NaN when any element is NaN); synchronizes ex.stream. Throws for an empty view.
template <class X>
  requires is_element_v<std::remove_const_t<X>>
accum_t<std::remove_const_t<X>> max(const exec::cuda& ex, view<X, device_space> x) {
  using A = accum_t<std::remove_const_t<X>>;
  return cuda_detail::reduce::value_of<A>(ex, [&](view<A, device_space> out) { max_into(ex, x, out); });
}

}  // namespace subspace

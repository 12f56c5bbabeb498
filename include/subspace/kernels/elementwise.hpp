#pragma once
// Element-wise kernels: fill, axpy, scale and cast.
//
// The host versions below are the readable reference: they accept any strided views, walk them in row-major
// order with for_each_offset, and run on the calling thread (they ignore exec::host::threads). The CUDA versions
// (detail/cuda/elementwise.cuh, compiled only by nvcc) take exec::cuda and device_space views, which must be
// contiguous.
//
// Arithmetic happens in accum_t<T> (float for the 16-bit types and float, double for double) and is written
// with explicit fused multiply-adds, so the host and the device round identically: for the same inputs, the
// CUDA results are bit-identical to the host results (NaN payloads aside).
//
// Conversions (cast, and storing accum_t<T> back into T) round to nearest even. Casting double to a 16-bit
// type rounds once, directly to the 16-bit grid: going through float with round-to-nearest would round twice
// and can land on the wrong neighbour at a tie of the 16-bit grid.

#include <cmath>
#include <cstdint>
#include <source_location>
#include <string>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/exact.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "../core/vector_math.hpp"

namespace subspace {

namespace detail::elementwise {

/// y <- alpha * x + y, computed in accum_t<T> with one rounding, then rounded to T.
template <class T>
struct axpy_op {
  accum_t<T> alpha;
  SUBSPACE_HD T operator()(T x, T y) const { return T(exact::fma(alpha, accum_t<T>(x), accum_t<T>(y))); }
};

/// x <- alpha * x, computed in accum_t<T>, then rounded to T.
template <class T>
struct scale_op {
  accum_t<T> alpha;
  SUBSPACE_HD T operator()(T, T x) const { return T(alpha * accum_t<T>(x)); }
};

template <class To, class From>
struct cast_op {
  SUBSPACE_HD To operator()(From x, To) const { return convert<To>(x); }
};

template <class T>
struct fill_op {
  T value;
  SUBSPACE_HD T operator()(T, T) const { return value; }
};

/// The CUDA kernels address flat arrays: throws invalid_argument naming the operation and the shape unless `v`
/// is contiguous.
template <class V>
void require_contiguous(const V& v, const char* op, const std::source_location& loc = std::source_location::current()) {
  require(
      v.is_contiguous(),
      [&] {
        return std::string(op) + ": the CUDA path needs a contiguous view; got a strided view of shape " +
               to_string(v.shape());
      },
      loc);
}

}  // namespace detail::elementwise

/// Sets every element of x to `value`.
template <class T>
  requires is_element_v<T>
void fill(const exec::host&, view<T, host_space> x, std::type_identity_t<T> value) {
  if (x.is_contiguous()) {
    for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] = value;
    return;
  }
  for_each_offset(x.shape(), x.strides(), x.strides(), [&](std::int64_t a, std::int64_t) { x.data()[a] = value; });
}

/// y <- alpha * x + y element by element, computed in accum_t<T> (one fused multiply-add), rounded to T.
template <class X, class T>
  requires(is_element_v<T> && std::is_same_v<std::remove_const_t<X>, T>)
void axpy(const exec::host& ex, float alpha, view<X, host_space> x, view<T, host_space> y) {
  detail::require_same_shape(x, y, "axpy");
  const detail::elementwise::axpy_op<T> op{accum_t<T>(alpha)};
  if constexpr (std::is_same_v<T, float> && std::is_same_v<std::remove_const_t<X>, float>) {
    if (x.is_contiguous() && y.is_contiguous()) {  // the same fma, as wide as the CPU runs it
      fma_into(ex, alpha, x.data(), y.data(), y.numel());
      return;
    }
  }
  if (x.is_contiguous() && y.is_contiguous()) {
    for (std::int64_t i = 0; i < y.numel(); ++i) y.data()[i] = op(x.data()[i], y.data()[i]);
    return;
  }
  for_each_offset(x.shape(), x.strides(), y.strides(),
                  [&](std::int64_t a, std::int64_t b) { y.data()[b] = op(x.data()[a], y.data()[b]); });
}

/// x <- alpha * x element by element, computed in accum_t<T>, rounded to T.
template <class T>
  requires is_element_v<T>
void scale(const exec::host&, float alpha, view<T, host_space> x) {
  const detail::elementwise::scale_op<T> op{accum_t<T>(alpha)};
  for_each_offset(x.shape(), x.strides(), x.strides(),
                  [&](std::int64_t a, std::int64_t) { x.data()[a] = op(T{}, x.data()[a]); });
}

/// y <- x converted to To, rounded to nearest even (any pair of fp32, fp64, bf16, fp16).
template <class X, class To>
  requires(is_element_v<std::remove_const_t<X>> && is_element_v<To>)
void cast(const exec::host&, view<X, host_space> x, view<To, host_space> y) {
  using From = std::remove_const_t<X>;
  detail::require_same_shape(x, y, "cast");
  const detail::elementwise::cast_op<To, From> op{};
  for_each_offset(x.shape(), x.strides(), y.strides(),
                  [&](std::int64_t a, std::int64_t b) { y.data()[b] = op(x.data()[a], To{}); });
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/elementwise.cuh"
#endif

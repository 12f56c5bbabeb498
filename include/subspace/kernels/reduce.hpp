#pragma once
// Reductions: sum, max and squared_norm, each returning accum_t<T> (float for the 16-bit types and float,
// double for double).
//
// Host (the reference): every element is widened to double and summed by cascade (pairwise) summation: runs of
// 128 elements are added in order, and the run sums are combined as a binary tree (the streaming form of
// pairwise summation, so strided views need no copy). The error bound grows with log2(n / 128) instead of n;
// for float and 16-bit inputs the double accumulator makes the sum exact to well below the final rounding
// to float.
//
// max: the largest element; NaN propagates (any NaN element gives NaN); an empty view is an error.
// sum and squared_norm of an empty view are 0.
//
// CUDA (detail/cuda/reduce.cuh): the same three with exec::cuda, plus sum_into / max_into /
// squared_norm_into, which write the result into a one-element device view without synchronizing.

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "elementwise.hpp"

namespace subspace {

namespace detail::reduce {

/// Streaming pairwise summation in double: add() values in order, then result().
class cascade_sum {
 public:
  static constexpr int run = 128;

  void add(double v) {
    partial_ += v;
    if (++count_ == run) carry();
  }
  double result() const {
    double s = partial_;
    for (int level = 0; level < levels; ++level)
      if (filled_ & (std::uint64_t(1) << level)) s += level_[level];
    return s;
  }

 private:
  static constexpr int levels = 64;

  // A full run becomes a level-0 sum; two level-k sums merge into one level-(k+1) sum (binary increment).
  void carry() {
    double s = partial_;
    partial_ = 0;
    count_ = 0;
    int level = 0;
    while (filled_ & (std::uint64_t(1) << level)) {
      s = level_[level] + s;
      filled_ &= ~(std::uint64_t(1) << level);
      ++level;
    }
    level_[level] = s;
    filled_ |= std::uint64_t(1) << level;
  }

  double partial_ = 0;
  int count_ = 0;
  std::uint64_t filled_ = 0;
  double level_[levels] = {};
};

/// Calls f(x) for every element of v, in row-major order.
template <class X, class F>
void for_each_element(view<X, host_space> v, F&& f) {
  if (v.is_contiguous()) {
    for (std::int64_t i = 0; i < v.numel(); ++i) f(v.data()[i]);
    return;
  }
  for_each_offset(v.shape(), v.strides(), v.strides(), [&](std::int64_t a, std::int64_t) { f(v.data()[a]); });
}

}  // namespace detail::reduce

/// The sum of the elements (0 for an empty view), accumulated pairwise in double, rounded to accum_t<T>.
template <class X>
  requires is_element_v<std::remove_const_t<X>>
accum_t<std::remove_const_t<X>> sum(const exec::host&, view<X, host_space> x) {
  detail::reduce::cascade_sum acc;
  detail::reduce::for_each_element(x, [&](std::remove_const_t<X> v) { acc.add(double(v)); });
  return accum_t<std::remove_const_t<X>>(acc.result());
}

/// The sum of the squared elements (0 for an empty view), accumulated pairwise in double.
template <class X>
  requires is_element_v<std::remove_const_t<X>>
accum_t<std::remove_const_t<X>> squared_norm(const exec::host&, view<X, host_space> x) {
  detail::reduce::cascade_sum acc;
  detail::reduce::for_each_element(x, [&](std::remove_const_t<X> v) {
    const double d = double(v);
    acc.add(d * d);
  });
  return accum_t<std::remove_const_t<X>>(acc.result());
}

/// The largest element; NaN when any element is NaN. Throws invalid_argument for an empty view.
template <class X>
  requires is_element_v<std::remove_const_t<X>>
accum_t<std::remove_const_t<X>> max(const exec::host&, view<X, host_space> x) {
  using A = accum_t<std::remove_const_t<X>>;
  require(!x.empty(), [&] { return "max: empty view (shape " + to_string(x.shape()) + ") has no largest element"; });
  A m = -std::numeric_limits<A>::infinity();
  bool nan = false;
  detail::reduce::for_each_element(x, [&](std::remove_const_t<X> v) {
    const A a = A(v);
    if (a != a) nan = true;
    if (a > m) m = a;
  });
  return nan ? std::numeric_limits<A>::quiet_NaN() : m;
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/reduce.cuh"
#endif

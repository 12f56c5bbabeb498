#pragma once
// Shared test helpers: fresh random inputs and relative-error comparisons in double.

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include <subspace/core/dtype.hpp>
#include <subspace/core/rng.hpp>
#include <subspace/core/tensor.hpp>

namespace subspace::testing {

/// A new seed for every call (and every run), so tests see fresh random inputs. Tests print it with
/// CAPTURE(seed) so a failure can be replayed.
inline std::uint64_t fresh_seed() {
  static std::random_device device;
  return (std::uint64_t(device()) << 32) ^ std::uint64_t(device());
}

/// A host tensor of normal draws N(mean, std^2) from the Philox stream (seed, 0), converted to T.
template <class T>
host_tensor<T> random_tensor(const shape& s, std::uint64_t seed, float mean = 0.0f, float std = 1.0f) {
  host_tensor<T> t(s);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = T(rng::normal_at(seed, 0, std::uint64_t(i), mean, std));
  return t;
}

/// ||a - b|| / ||b|| over all elements, in double. +inf when any element of either side is not finite, so NaN
/// never passes a tolerance; 0 only when both are identical.
template <class A, class B>
double rel_error(view<const A, host_space> a, view<const B, host_space> b) {
  require(a.shape() == b.shape(), "rel_error: shapes differ: " + to_string(a.shape()) + " vs " + to_string(b.shape()));
  double num = 0, den = 0;
  bool finite = true;
  for_each_offset(a.shape(), a.strides(), b.strides(), [&](std::int64_t ia, std::int64_t ib) {
    const double x = double(a.data()[ia]), y = double(b.data()[ib]);
    if (!std::isfinite(x) || !std::isfinite(y)) finite = false;
    num += (x - y) * (x - y);
    den += y * y;
  });
  if (!finite) return std::numeric_limits<double>::infinity();
  if (den == 0) return num == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(num / den);
}
template <class A, class B>
double rel_error(const host_tensor<A>& a, const host_tensor<B>& b) {
  return rel_error(a.v(), b.v());
}

}  // namespace subspace::testing

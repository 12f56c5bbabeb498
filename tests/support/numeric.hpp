#pragma once
// Shared test helpers: fresh random inputs (with cast ties), a loop over the element types, bitwise and relative-error
// comparisons in double.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

/// A host tensor of normal draws N(mean, std^2) from the Philox stream (seed, 0), converted to T: element i is
/// T(rng::normal_at(seed, 0, i, mean, std)), drawn four at a time (one Philox block each).
template <class T>
host_tensor<T> random_tensor(const shape& s, std::uint64_t seed, float mean = 0.0f, float std = 1.0f) {
  host_tensor<T> t(s);
  float block[4] = {};
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    if (i % 4 == 0) rng::normal4(seed, 0, std::uint64_t(i / 4), mean, std, block);
    t.data()[i] = T(block[i % 4]);
  }
  return t;
}

/// Replaces some elements of x by exact round-to-nearest ties of the bf16 and fp16 grids (where From can hold
/// them), so that casts meet the tie-to-even rule on random data too.
template <class From>
void add_ties(host_tensor<From>& x) {
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const double v = double(x.data()[i]);
    if (std::abs(v) < 0x1p-13 || i % 5 > 1) continue;
    const double base = i % 5 == 0 ? double(float(bf16(float(v)))) : double(float(fp16(float(v))));
    const int half_ulp_exp = std::ilogb(base) - (i % 5 == 0 ? 8 : 11);
    const double tie = base + std::ldexp(1.0, half_ulp_exp);
    if (double(From(tie)) == tie) x.data()[i] = From(tie);
  }
}

/// Calls f.template operator()<T>() for each element type: float, double, bf16, fp16.
template <class F>
void for_each_dtype(F&& f) {
  f.template operator()<float>();
  f.template operator()<double>();
  f.template operator()<bf16>();
  f.template operator()<fp16>();
}

/// True when a and b have the same bits.
template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// ||a - b|| / ||b|| over all elements, in double. +inf when any element of either side is not finite, so NaN
/// never passes a tolerance; 0 only when both are identical.
template <class A, class B>
double rel_error(view<const A, host_space> a, view<const B, host_space> b) {
  require(a.shape() == b.shape(),
          [&] { return "rel_error: shapes differ: " + to_string(a.shape()) + " vs " + to_string(b.shape()); });
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

/// A^T A (transpose = true) or A A^T, in double.
template <class T>
host_tensor<double> gram(const host_tensor<T>& a, bool transpose) {
  const std::int64_t r = a.dim(0), c = a.dim(1), k = transpose ? c : r;
  host_tensor<double> g({k, k});
  for (std::int64_t i = 0; i < k; ++i)
    for (std::int64_t j = 0; j < k; ++j) {
      double s = 0;
      for (std::int64_t l = 0; l < (transpose ? r : c); ++l)
        s += transpose ? double(a(l, i)) * double(a(l, j)) : double(a(i, l)) * double(a(j, l));
      g(i, j) = s;
    }
  return g;
}

/// max |g - I| over a square g: how far a Gram matrix is from the identity.
inline double max_abs_minus_identity(const host_tensor<double>& g) {
  double e = 0;
  for (std::int64_t i = 0; i < g.dim(0); ++i)
    for (std::int64_t j = 0; j < g.dim(1); ++j) e = std::max(e, std::abs(g(i, j) - (i == j ? 1.0 : 0.0)));
  return e;
}

}  // namespace subspace::testing

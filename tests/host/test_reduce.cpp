// Reductions on the host: sum, squared_norm and max on contiguous and strided views, their accuracy on large
// inputs far from zero, NaN propagation and the empty cases.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include <subspace/kernels/reduce.hpp>

#include "support/numeric.hpp"

using namespace subspace;

namespace {

/// Relative tolerance for a sum accumulated exactly enough and rounded once to accum_t<T>.
template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-14 : 1e-6;
}

/// The float64 references: long double (64-bit significand on x86) accumulation of the elements, in row-major
/// order.
struct reference {
  long double sum = 0, squares = 0;
  double max = -std::numeric_limits<double>::infinity();
};
template <class X>
reference reference_of(view<X, host_space> v) {
  reference r;
  for_each_offset(v.shape(), v.strides(), v.strides(), [&](std::int64_t a, std::int64_t) {
    const double x = double(v.data()[a]);
    r.sum += x;
    r.squares += (long double)x * x;
    r.max = std::max(r.max, x);
  });
  return r;
}

double rel(double got, long double want) { return double(std::abs((long double)got - want) / std::abs(want)); }

}  // namespace

TEST_CASE_TEMPLATE("sum, squared_norm and max on contiguous and strided views", T, float, double, bf16, fp16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const exec::host ex;
  auto t = testing::random_tensor<T>({37, 29}, seed, 0.3f, 1.5f);
  for (const auto& v : {std::as_const(t).v(), std::as_const(t).v().transposed(), std::as_const(t).v().slice(3, 20),
                        view<const T, host_space>(t.data() + 2, {37, 9}, {29, 3, 0, 0})}) {
    CAPTURE(to_string(v.shape()));
    const reference r = reference_of(v);
    const accum_t<T> s = sum(ex, v), q = squared_norm(ex, v), m = max(ex, v);
    static_assert(std::is_same_v<decltype(s), const accum_t<T>>);
    CHECK(rel(s, r.sum) < tolerance<T>());
    CHECK(rel(q, r.squares) < tolerance<T>());
    CHECK(double(m) == r.max);
  }
  // Views of mutable elements are accepted too.
  CHECK(rel(sum(ex, t.v()), reference_of(t.v()).sum) < tolerance<T>());
}

TEST_CASE_TEMPLATE("sums of a million elements far from zero keep the accumulator's precision", T, float, double) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const exec::host ex;
  // Mean 1000, std 1: a naive float accumulation loses about 1e-4 relative here; pairwise in double loses none.
  const auto t = testing::random_tensor<T>({1000000}, seed, 1000.0f, 1.0f);
  const reference r = reference_of(t.v());
  CHECK(rel(sum(ex, t.v()), r.sum) < tolerance<T>());
  CHECK(rel(squared_norm(ex, t.v()), r.squares) < tolerance<T>());
  // Cancellation: the same values minus their float64 mean. The sum is tiny compared with the terms; the
  // absolute error must stay at the level of the terms' rounding, not grow with n.
  host_tensor<double> c({1000000});
  const double mean = double(r.sum / 1000000.0L);
  for (std::int64_t i = 0; i < c.numel(); ++i) c.data()[i] = double(t.data()[i]) - mean;
  const reference rc = reference_of(c.v());
  CHECK(std::abs(double(sum(ex, c.v())) - double(rc.sum)) < 1e-10);
}

TEST_CASE("sum of bf16 values accumulates far beyond bf16 precision") {
  const exec::host ex;
  host_tensor<bf16> t({100000});
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = bf16(1.0f);
  CHECK(sum(ex, t.v()) == 100000.0f);  // a bf16 accumulator would stop at 256
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto r = testing::random_tensor<bf16>({300, 1000}, seed, 5.0f, 2.0f);
  CHECK(rel(sum(ex, r.v()), reference_of(r.v()).sum) < 1e-6);
  CHECK(rel(squared_norm(ex, r.v()), reference_of(r.v()).squares) < 1e-6);
}

TEST_CASE_TEMPLATE("max propagates NaN from any position and handles infinities", T, float, double, bf16, fp16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const exec::host ex;
  const std::int64_t n = 1001;
  for (std::int64_t pos :
       {std::int64_t(0), std::int64_t(500), n - 1, std::int64_t(rng::uniform_at(seed, 1, 0) * float(n - 1))}) {
    CAPTURE(pos);
    auto t = testing::random_tensor<T>({n}, seed);
    t(pos) = T(std::nanf(""));
    CHECK(std::isnan(max(ex, t.v())));
    CHECK(std::isnan(sum(ex, t.v())));
    CHECK(std::isnan(squared_norm(ex, t.v())));
    CHECK(std::isnan(max(ex, t.v().reshape({7, 143}).transposed())));
  }
  auto t = testing::random_tensor<T>({n}, seed, -100.0f, 1.0f);  // all negative
  CHECK(double(max(ex, t.v())) == reference_of(t.v()).max);
  CHECK(max(ex, t.v()) < 0);
  t(17) = T(-INFINITY);
  CHECK(double(max(ex, t.v())) == reference_of(t.v()).max);
  t(3) = T(INFINITY);
  CHECK(max(ex, t.v()) == INFINITY);
  host_tensor<T> ninf({3});
  for (int i = 0; i < 3; ++i) ninf(i) = T(-INFINITY);
  CHECK(max(ex, ninf.v()) == -INFINITY);
}

TEST_CASE("empty and single-element reductions") {
  const exec::host ex;
  host_tensor<float> e({0, 5});
  CHECK(sum(ex, e.v()) == 0.0f);
  CHECK(squared_norm(ex, e.v()) == 0.0f);
  CHECK_THROWS_WITH_AS(max(ex, e.v()), doctest::Contains("max: empty view (shape [0, 5])"), invalid_argument);
  host_tensor<double> one({1});
  one(0) = -2.5;
  CHECK(sum(ex, one.v()) == -2.5);
  CHECK(squared_norm(ex, one.v()) == 6.25);
  CHECK(max(ex, one.v()) == -2.5);
  static_assert(std::is_same_v<decltype(sum(ex, one.v())), double>);
  static_assert(std::is_same_v<decltype(sum(ex, host_tensor<bf16>({1}).v())), float>);
}

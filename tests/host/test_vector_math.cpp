// vector_exp (core/vector_math.hpp): accuracy against std::exp in double over the whole finite range, on fresh
// random arguments and on a dense sweep; the edges (under- and overflow, infinities, NaN, ±0).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <subspace/core/vector_math.hpp>

#include "support/numeric.hpp"

using namespace subspace;

namespace {

/// |got - want| in units of float spacing at want.
double ulps(float got, double want) {
  const float w = float(want);
  const double spacing = double(std::nextafter(w, std::numeric_limits<float>::infinity())) - double(w);
  return std::abs(double(got) - want) / spacing;
}

}  // namespace

TEST_CASE("vector_exp: within 1.5 ulp of exp over [-87.3, 88.7], random and swept arguments") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> wide(-87.3f, 88.7f), narrow(-20.0f, 0.0f);  // narrow: softmax arguments
  double worst = 0;
  for (int i = 0; i < 200000; ++i) {
    const float x = i % 2 ? wide(gen) : narrow(gen);
    const double e = ulps(vector_exp(x), std::exp(double(x)));
    CHECK_MESSAGE(e == e, "NaN at x = " << x);
    worst = std::max(worst, e);
  }
  for (float x = -87.3f; x <= 88.7f; x += 0.001f) worst = std::max(worst, ulps(vector_exp(x), std::exp(double(x))));
  CHECK(worst <= 1.5);
}

TEST_CASE("vector_exp: underflow to 0, overflow to inf, and the special values") {
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(vector_exp(0.0f) == 1.0f);
  CHECK(vector_exp(-0.0f) == 1.0f);
  CHECK(vector_exp(-inf) == 0.0f);
  CHECK(vector_exp(-100.0f) == 0.0f);
  CHECK(vector_exp(-1e30f) == 0.0f);
  CHECK(vector_exp(inf) == inf);
  CHECK(vector_exp(100.0f) == inf);
  CHECK(std::isnan(vector_exp(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isnan(vector_exp(-std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isfinite(vector_exp(88.7f)));
  CHECK(vector_exp(-87.3f) > 0.0f);
  CHECK(vector_exp(1.0) == std::exp(1.0));  // double: std::exp itself
}

TEST_CASE("exp_shifted and fma_into: every vector width the CPU has gives exp within 1.5 ulp and fma bit for bit") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> score(-30.0f, 10.0f), any(-4.0f, 4.0f);
  const std::int64_t n = 1037;  // odd: every vector loop's remainder runs too
  std::vector<float> x(static_cast<std::size_t>(n)), y(static_cast<std::size_t>(n));
  for (auto& v : x) v = score(gen);
  for (auto& v : y) v = any(gen);
  const float shift = 3.25f, a = any(gen);
  for (const exec::host_simd simd : {exec::host_simd::portable, exec::host_simd::native}) {
    CAPTURE(int(simd));
    std::vector<float> e = x, f = y;
    exp_shifted(exec::host{1, simd}, e.data(), n, shift);
    fma_into(exec::host{1, simd}, a, x.data(), f.data(), n);
    double worst = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      worst = std::max(worst, ulps(e[std::size_t(i)], std::exp(double(x[std::size_t(i)] - shift))));
      CHECK(f[std::size_t(i)] == std::fma(a, x[std::size_t(i)], y[std::size_t(i)]));
    }
    CHECK(worst <= 1.5);
  }
}

TEST_CASE("max_of and sum_of: the largest element and the sum over lengths around the 16 lanes") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  for (const std::int64_t n : {1, 2, 15, 16, 17, 31, 33, 256, 1000}) {
    CAPTURE(n);
    std::vector<float> x(static_cast<std::size_t>(n));
    for (auto& v : x) v = float(normal(gen));
    x[std::size_t(gen() % std::uint64_t(n))] = 7.5f;  // the maximum, anywhere
    CHECK(max_of(x.data(), n) == 7.5f);
    double want = 0, magnitude = 0;
    for (const float v : x) {
      want += double(v);
      magnitude += std::abs(double(v));
    }
    CHECK(std::abs(double(sum_of(x.data(), n)) - want) <= 1e-6 * magnitude);
  }
}

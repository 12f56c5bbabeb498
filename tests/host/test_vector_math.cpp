// vector_exp (core/vector_math.hpp): accuracy against std::exp in double over the whole finite range, on fresh
// random arguments and on a dense sweep; the edges (under- and overflow, infinities, NaN, ±0).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

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

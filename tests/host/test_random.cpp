// Random fills on the host: element i (row-major) equals T(rng::uniform_at / normal_at(seed, offset, i)) exactly,
// for every element type, odd sizes, large seeds and offsets, and strided views; and the portable normal itself has
// the moments and the distribution of N(0, 1).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include <subspace/kernels/random.hpp>

#include "support/numeric.hpp"

using namespace subspace;

namespace {

using testing::same_bits;

/// Checks every element of v, in row-major order, against the reference draw at its flat index.
template <class T>
void check_against_reference(view<T, host_space> v, std::uint64_t seed, std::uint64_t offset, bool normal, float a,
                             float b) {
  std::uint64_t i = 0;
  bool all_equal = true;
  std::uint64_t first_bad = 0;
  for_each_offset(v.shape(), v.strides(), v.strides(), [&](std::int64_t at, std::int64_t) {
    const T want = T(normal ? rng::normal_at(seed, offset, i, a, b) : rng::uniform_at(seed, offset, i, a, b));
    if (!same_bits(v.data()[at], want) && all_equal) {
      all_equal = false;
      first_bad = i;
    }
    ++i;
  });
  CAPTURE(first_bad);
  CHECK(all_equal);
}

}  // namespace

TEST_CASE_TEMPLATE("fill_uniform and fill_normal equal the reference draws element for element", T, float, double, bf16,
                   fp16) {
  const exec::host ex;
  const std::uint64_t seed = testing::fresh_seed();
  for (std::uint64_t offset :
       {std::uint64_t(0), std::uint64_t(12345), std::uint64_t(0x1234567890ull), ~std::uint64_t(0)}) {
    for (std::int64_t n : {0, 1, 2, 3, 4, 5, 7, 8, 13, 4097}) {
      CAPTURE(seed);
      CAPTURE(offset);
      CAPTURE(n);
      host_tensor<T> x({n});
      fill_uniform(ex, x.v(), seed, offset);
      check_against_reference(x.v(), seed, offset, false, 0.0f, 1.0f);
      fill_uniform(ex, x.v(), seed, offset, -3.0f, 5.0f);
      check_against_reference(x.v(), seed, offset, false, -3.0f, 5.0f);
      fill_normal(ex, x.v(), seed, offset);
      check_against_reference(x.v(), seed, offset, true, 0.0f, 1.0f);
      fill_normal(ex, x.v(), seed, offset, 2.0f, 0.02f);
      check_against_reference(x.v(), seed, offset, true, 2.0f, 0.02f);
    }
  }
}

TEST_CASE_TEMPLATE("random fills of strided views count elements in row-major order", T, float, bf16) {
  const exec::host ex;
  const std::uint64_t seed = testing::fresh_seed(), offset = (std::uint64_t(1) << 40) + 3;
  CAPTURE(seed);
  host_tensor<T> storage({7, 11});
  fill_uniform(ex, storage.v(), seed, 999);
  host_tensor<T> before({7, 11});
  copy(ex, std::as_const(storage).v(), before.v());

  SUBCASE("transposed") {
    const auto t = storage.v().transposed();  // [11, 7]
    fill_normal(ex, t, seed, offset, 1.0f, 3.0f);
    check_against_reference(t, seed, offset, true, 1.0f, 3.0f);
    CHECK(same_bits(t(10, 6), T(rng::normal_at(seed, offset, 10 * 7 + 6, 1.0f, 3.0f))));
  }
  SUBCASE("every other column of a row slice, as a rank-3 view") {
    const view<T, host_space> v(storage.data() + 11 + 1, {3, 5, 1}, {11, 2, 1, 0});  // rows 1..3, odd columns
    fill_uniform(ex, v, seed, offset, -1.0f, 1.0f);
    check_against_reference(v, seed, offset, false, -1.0f, 1.0f);
    for (int i = 0; i < 7; ++i)
      for (int j = 0; j < 11; ++j)
        if (!(i >= 1 && i <= 3 && j % 2 == 1 && j <= 9)) REQUIRE(same_bits(storage(i, j), before(i, j)));
  }
}

TEST_CASE("random fills: ranges, distinct streams, and large seeds") {
  const exec::host ex;
  const std::uint64_t seed = testing::fresh_seed() | (std::uint64_t(1) << 63);
  CAPTURE(seed);
  host_tensor<float> a({10001}), b({10001});
  fill_uniform(ex, a.v(), seed, 0, -2.0f, -1.0f);
  for (std::int64_t i = 0; i < a.numel(); ++i) REQUIRE((a(i) >= -2.0f && a(i) < -1.0f));
  fill_uniform(ex, b.v(), seed, 1, -2.0f, -1.0f);
  int same = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) same += a(i) == b(i);
  CHECK(same < 10);  // another offset is another stream
  fill_normal(ex, a.v(), seed, 7, 5.0f, 0.5f);
  double mean = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) mean += a(i);
  CHECK(mean / double(a.numel()) == doctest::Approx(5.0).epsilon(0.01));
  // The same (seed, offset) repeats the same numbers.
  fill_normal(ex, b.v(), seed, 7, 5.0f, 0.5f);
  CHECK(testing::rel_error(a, b) == 0.0);
}

TEST_CASE("random fills: a draw that rounds up to hi becomes the float below it (the range stays half-open)") {
  // On [-2, -1) floats are 2^-23 apart, so lo + (hi - lo)·u rounds to hi for u = 1 - 2^-24. This seed's stream
  // has such a u among its first 10001 draws (it returned hi before the draw was mapped below it).
  const exec::host ex;
  host_tensor<float> a({10001});
  fill_uniform(ex, a.v(), 12375951986444178182ull, 0, -2.0f, -1.0f);
  for (std::int64_t i = 0; i < a.numel(); ++i) REQUIRE((a(i) >= -2.0f && a(i) < -1.0f));
  CHECK(rng::next_below(-1.0f) == -1.0f - 0x1p-23f);
  CHECK(rng::next_below(1.0f) == 1.0f - 0x1p-24f);
  CHECK(rng::next_below(0.0f) < 0.0f);
}

TEST_CASE("portable normal: mean 0 and variance 1 over 10^7 draws, Kolmogorov-Smirnov against N(0, 1)") {
  // 10^7 draws: the standard errors of the mean and the variance are 3.2e-4 and 4.5e-4, so the bounds below sit
  // about 10 standard errors out and a fresh seed is safe.
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::uint64_t blocks = 2'500'000;
  double sum = 0, sum2 = 0;
  float v[4];
  for (std::uint64_t b = 0; b < blocks; ++b) {
    rng::normal4(seed, 11, b, 0.0f, 1.0f, v);
    for (const float x : v) {
      sum += x;
      sum2 += double(x) * x;
    }
  }
  const double n = 4.0 * double(blocks), mean = sum / n, var = sum2 / n - mean * mean;
  CAPTURE(mean);
  CAPTURE(var);
  CHECK(std::abs(mean) < 3e-3);
  CHECK(std::abs(var - 1.0) < 5e-3);

  // KS on 10^6 draws with a fixed seed: a test at p > 0.01 rejects 1% of fresh samples by design.
  std::vector<double> draws;
  draws.reserve(1'000'000);
  for (std::uint64_t b = 0; b < 250'000; ++b) {
    rng::normal4(0x5eed5eed5eedull, 12, b, 0.0f, 1.0f, v);
    draws.insert(draws.end(), v, v + 4);
  }
  std::sort(draws.begin(), draws.end());
  const double count = double(draws.size());
  double distance = 0;
  for (std::size_t i = 0; i < draws.size(); ++i) {
    const double cdf = 0.5 * std::erfc(-draws[i] / std::sqrt(2.0));
    distance = std::max({distance, std::abs(double(i + 1) / count - cdf), std::abs(cdf - double(i) / count)});
  }
  // The asymptotic Kolmogorov distribution with Stephens' small-sample correction.
  const double lambda = (std::sqrt(count) + 0.12 + 0.11 / std::sqrt(count)) * distance;
  double p = 1.0;  // the alternating series converges slowly below lambda = 0.2, where p > 0.9999 anyway
  if (lambda >= 0.2) {
    p = 0;
    for (int j = 1; j <= 100; ++j) p += 2.0 * (j % 2 ? 1.0 : -1.0) * std::exp(-2.0 * j * j * lambda * lambda);
  }
  CAPTURE(distance);
  CAPTURE(p);
  CHECK(p > 0.01);
}

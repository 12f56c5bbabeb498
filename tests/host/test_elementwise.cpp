// Element-wise kernels on the host: fill, axpy, scale and cast, on contiguous and strided views, against float64
// references computed here.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include <subspace/kernels/elementwise.hpp>

#include "support/numeric.hpp"

using namespace subspace;

namespace {

using testing::add_ties;
using testing::for_each_dtype;
using testing::same_bits;

/// Relative-norm tolerance for a result rounded to T once or twice.
template <class T>
double tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-14;
  else if constexpr (std::is_same_v<T, float>) return 1e-6;
  else if constexpr (std::is_same_v<T, fp16>) return 1e-3;
  else return 1e-2;  // bf16
}

/// ||a - b|| / ||b|| for views of any constness.
template <class A, class B>
double rel_err(view<A, host_space> a, view<B, host_space> b) {
  return testing::rel_error(view<const std::remove_const_t<A>, host_space>(a),
                            view<const std::remove_const_t<B>, host_space>(b));
}

/// A contiguous float64 copy of a view (same shape).
template <class X>
host_tensor<double> to_double(view<X, host_space> v) {
  host_tensor<double> out(v.shape());
  for_each_offset(v.shape(), v.strides(), out.v().strides(),
                  [&](std::int64_t a, std::int64_t b) { out.data()[b] = double(v.data()[a]); });
  return out;
}

/// `x` rounded to nearest even in To, found without the library: the representable neighbours of a first guess
/// are compared with x in double (the differences are exact by Sterbenz's lemma).
template <class To>
To nearest_even(double x) {
  if constexpr (std::is_same_v<To, double>) {
    return x;
  } else if constexpr (std::is_same_v<To, float>) {
    return float(x);  // the hardware conversion rounds to nearest even
  } else {
    const To guess = To(float(x));  // possibly one step off: rounded twice
    To best = guess;
    double best_err = std::abs(double(float(guess)) - x);
    for (int step : {-1, 1}) {
      const To c = To::from_bits(std::uint16_t(guess.bits + step));
      if (std::isnan(float(c))) continue;
      const double err = std::abs(double(float(c)) - x);
      if (err < best_err || (err == best_err && (c.bits & 1u) == 0)) {
        best = c;
        best_err = err;
      }
    }
    return best;
  }
}

template <class To, class From>
To cast_one(From x) {
  host_tensor<From> a({1});
  host_tensor<To> b({1});
  a(0) = x;
  cast(exec::host{}, std::as_const(a).v(), b.v());
  return b(0);
}

}  // namespace

TEST_CASE_TEMPLATE("fill sets every element of contiguous and strided views, and nothing else", T, float, double, bf16,
                   fp16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const exec::host ex;
  const T value = T(rng::normal_at(seed, 0, 0, 3.0f, 1.0f));
  const T other = T(-7.0f);

  host_tensor<T> a({5, 7});
  fill(ex, a.v(), value);
  for (std::int64_t i = 0; i < a.numel(); ++i) REQUIRE(same_bits(a.data()[i], value));

  // Every other column of a [4, 10] tensor.
  host_tensor<T> b({4, 10});
  fill(ex, b.v(), other);
  fill(ex, view<T, host_space>(b.data() + 1, {4, 5}, {10, 2, 0, 0}), value);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 10; ++j) REQUIRE(same_bits(b(i, j), j % 2 ? value : other));

  // A transposed slice: rows 1..3 of a [4, 6] tensor, seen as [6, 2].
  host_tensor<T> c({4, 6});
  fill(ex, c.v(), other);
  fill(ex, c.v().slice(1, 3).transposed(), value);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 6; ++j) REQUIRE(same_bits(c(i, j), (i == 1 || i == 2) ? value : other));

  fill(ex, host_tensor<T>({0, 3}).v(), value);  // empty: nothing to do
}

TEST_CASE_TEMPLATE("axpy: y += alpha x, computed in accum_t, on contiguous and strided views", T, float, double, bf16,
                   fp16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const exec::host ex;
  const float alpha = rng::uniform_at(seed, 3, 0, -2.0f, 2.0f);
  CAPTURE(alpha);

  SUBCASE("contiguous") {
    const auto x = testing::random_tensor<T>({33, 17}, seed, 0.5f, 2.0f);
    auto y = testing::random_tensor<T>({33, 17}, seed + 1, -1.0f, 1.0f);
    const auto y0 = to_double(y.v());
    const auto xd = to_double(x.v());
    host_tensor<double> ref({33, 17});
    for (std::int64_t i = 0; i < ref.numel(); ++i) ref.data()[i] = y0.data()[i] + double(alpha) * xd.data()[i];
    axpy(ex, alpha, x.v(), y.v());
    CHECK(rel_err(y.v(), ref.v()) < tolerance<T>());
    // One rounding of a fused multiply-add in accum_t, then the rounding to T: exactly what the kernel promises.
    for (std::int64_t i = 0; i < ref.numel(); ++i) {
      using A = accum_t<T>;
      const A expect = std::fma(A(alpha), A(xd.data()[i]), A(y0.data()[i]));
      REQUIRE(same_bits(y.data()[i], T(expect)));
    }
  }
  SUBCASE("strided: a transposed x into a row-padded y") {
    auto x0 = testing::random_tensor<T>({17, 33}, seed);
    const view<const T, host_space> x = std::as_const(x0).v().transposed();  // [33, 17]
    auto storage = testing::random_tensor<T>({33, 20}, seed + 1);
    const auto before = to_double(storage.v());
    const view<T, host_space> y(storage.data(), {33, 17}, {20, 1, 0, 0});
    auto ref = to_double(y);
    const auto xd = to_double(x);
    for (std::int64_t i = 0; i < ref.numel(); ++i) ref.data()[i] += double(alpha) * xd.data()[i];
    axpy(ex, alpha, x, y);
    CHECK(rel_err(y, ref.v()) < tolerance<T>());
    for (int i = 0; i < 33; ++i)
      for (int j = 17; j < 20; ++j) REQUIRE(double(storage(i, j)) == before(i, j));  // padding untouched
  }
}

TEST_CASE_TEMPLATE("scale: x *= alpha on contiguous and strided views", T, float, double, bf16, fp16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const exec::host ex;
  const float alpha = rng::uniform_at(seed, 3, 0, -4.0f, 4.0f);
  CAPTURE(alpha);

  auto x = testing::random_tensor<T>({3, 50, 7}, seed, 1.0f, 3.0f);
  auto ref = to_double(x.v());
  for (std::int64_t i = 0; i < ref.numel(); ++i) ref.data()[i] *= alpha;
  scale(ex, alpha, x.v());
  CHECK(rel_err(x.v(), ref.v()) < tolerance<T>());

  auto m = testing::random_tensor<T>({40, 30}, seed + 1);
  const auto t = m.v().slice(5, 35).transposed();  // [30, 30], strided
  auto ref_t = to_double(t);
  const auto before = to_double(m.v());
  for (std::int64_t i = 0; i < ref_t.numel(); ++i) ref_t.data()[i] *= alpha;
  scale(ex, alpha, t);
  CHECK(rel_err(t, ref_t.v()) < tolerance<T>());
  for (int i : {0, 4, 35, 39}) REQUIRE(double(m(i, 3)) == before(i, 3));  // rows outside the slice untouched
}

TEST_CASE("cast: every pair of fp32, fp64, bf16, fp16 rounds each element to nearest even, on strided views") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const exec::host ex;
  for_each_dtype([&]<class From>() {
    for_each_dtype([&]<class To>() {
      CAPTURE(dtype_name<From>());
      CAPTURE(dtype_name<To>());
      // Normal draws spread over several binades, with a few values near the 16-bit subnormal range.
      auto x = testing::random_tensor<From>({9, 13}, seed, 0.0f, 50.0f);
      x(0, 0) = From(3e-6f);
      x(0, 1) = From(-1e-7f);
      if constexpr (std::is_same_v<From, double>) {
        for (std::int64_t i = 0; i < x.numel(); ++i)  // give fp64 inputs bits below float's precision
          x.data()[i] += x.data()[i] * 0x1p-30 * double(rng::uniform_at(seed, 5, std::uint64_t(i)));
      }
      add_ties(x);
      host_tensor<To> y({9, 13});
      cast(ex, std::as_const(x).v(), y.v());
      for (std::int64_t i = 0; i < x.numel(); ++i)
        REQUIRE(same_bits(y.data()[i], nearest_even<To>(double(x.data()[i]))));

      host_tensor<To> yt({13, 9});  // strided source: a transposed view
      cast(ex, x.v().transposed(), yt.v());
      for (int i = 0; i < 9; ++i)
        for (int j = 0; j < 13; ++j) REQUIRE(same_bits(yt(j, i), y(i, j)));

      host_tensor<To> storage({9, 16});  // strided destination: row-padded
      cast(ex, x.v(), view<To, host_space>(storage.data(), {9, 13}, {16, 1, 0, 0}));
      for (int i = 0; i < 9; ++i)
        for (int j = 0; j < 13; ++j) REQUIRE(same_bits(storage(i, j), y(i, j)));
    });
  });
}

TEST_CASE("cast: exact ties round to even, and fp64 to 16-bit rounds once") {
  const auto bf = [](std::uint16_t b) { return bf16::from_bits(b); };
  const auto hf = [](std::uint16_t b) { return fp16::from_bits(b); };
  // fp64 -> bf16: 1 + 2^-8 is the tie between 1 and 1 + 2^-7.
  CHECK(cast_one<bf16>(1.0 + 0x1p-8).bits == 0x3f80);
  CHECK(cast_one<bf16>(1.0 + 3 * 0x1p-8).bits == 0x3f82);
  CHECK(cast_one<bf16>(1.0 + 0x1p-8 + 0x1p-40).bits == 0x3f81);  // via float this would round to the tie, then down
  CHECK(cast_one<bf16>(-(1.0 + 0x1p-8 + 0x1p-40)).bits == 0xbf81);
  CHECK(cast_one<bf16>(1.0 + 0x1p-8 - 0x1p-40).bits == 0x3f80);
  CHECK(cast_one<bf16>(1.0 + 3 * 0x1p-8 - 0x1p-45).bits == 0x3f81);
  // fp64 -> fp16: 1 + 2^-11 is the tie between 1 and 1 + 2^-10; subnormal ties at multiples of 2^-25.
  CHECK(cast_one<fp16>(1.0 + 0x1p-11).bits == 0x3c00);
  CHECK(cast_one<fp16>(1.0 + 3 * 0x1p-11).bits == 0x3c02);
  CHECK(cast_one<fp16>(1.0 + 0x1p-11 + 0x1p-40).bits == 0x3c01);
  CHECK(cast_one<fp16>(0x1p-25).bits == 0x0000);
  CHECK(cast_one<fp16>(0x1.8p-24).bits == 0x0002);
  CHECK(cast_one<fp16>(0x1p-25 + 0x1p-60).bits == 0x0001);
  CHECK(cast_one<fp16>(65519.99).bits == 0x7bff);
  CHECK(cast_one<fp16>(65520.0).bits == 0x7c00);  // the tie above the largest half rounds to infinity
  // fp64 -> fp32.
  CHECK(cast_one<float>(1.0 + 0x1p-24) == 1.0f);
  CHECK(cast_one<float>(1.0 + 3 * 0x1p-24) == 1.0f + 0x1p-22f);
  // fp32 -> 16-bit.
  CHECK(cast_one<bf16>(1.0f + 0x1p-8f).bits == 0x3f80);
  CHECK(cast_one<bf16>(1.0f + 3 * 0x1p-8f).bits == 0x3f82);
  CHECK(cast_one<fp16>(1.0f + 0x1p-11f).bits == 0x3c00);
  CHECK(cast_one<fp16>(1.0f + 3 * 0x1p-11f).bits == 0x3c02);
  // fp16 -> bf16 (1 + 2^-8 is exact in fp16) and bf16 -> fp16 (2^-25 is exact in bf16).
  CHECK(cast_one<bf16>(hf(0x3c04)).bits == 0x3f80);  // fp16 0x3c04 = 1 + 2^-8
  CHECK(cast_one<bf16>(hf(0x3c0c)).bits == 0x3f82);  // 1 + 3 * 2^-8
  CHECK(cast_one<fp16>(bf(0x3300)).bits == 0x0000);  // 2^-25
  CHECK(cast_one<fp16>(bf(0x33c0)).bits == 0x0002);  // 1.5 * 2^-24
  // Widening is exact; NaN stays NaN and infinities stay infinite.
  CHECK(cast_one<double>(bf(0x3f81)) == 1.0 + 0x1p-7);
  CHECK(cast_one<float>(hf(0x0001)) == 0x1p-24f);
  CHECK(std::isnan(float(cast_one<bf16>(std::numeric_limits<double>::quiet_NaN()))));
  CHECK(std::isnan(float(cast_one<fp16>(std::numeric_limits<double>::quiet_NaN()))));
  CHECK(std::isnan(cast_one<double>(bf16(std::nanf("")))));
  CHECK(float(cast_one<bf16>(-std::numeric_limits<double>::infinity())) == -INFINITY);
  CHECK(float(cast_one<fp16>(std::numeric_limits<double>::infinity())) == INFINITY);
  CHECK(float(cast_one<bf16>(1e300)) == INFINITY);
}

TEST_CASE("element-wise errors name the operation and both shapes") {
  const exec::host ex;
  host_tensor<float> a({3, 4}), b({4, 3});
  fill(ex, a.v(), 1.0f);
  fill(ex, b.v(), 1.0f);
  CHECK_THROWS_WITH_AS(axpy(ex, 1.0f, a.v(), b.v()), doctest::Contains("axpy: shapes differ: [3, 4] vs [4, 3]"),
                       invalid_argument);
  host_tensor<bf16> c({12});
  CHECK_THROWS_WITH_AS(cast(ex, a.v(), c.v()), doctest::Contains("cast: shapes differ: [3, 4] vs [12]"),
                       invalid_argument);
  CHECK_NOTHROW(axpy(ex, 1.0f, a.v(), b.v().transposed()));
}

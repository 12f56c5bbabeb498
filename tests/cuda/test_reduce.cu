// CUDA reductions against the host reference on the same random inputs, for sizes from 1 to several million,
// the asynchronous *_into forms, NaN propagation in max, and the errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <subspace/kernels/reduce.hpp>

#include "support/cuda.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

using testing::stream_guard;

/// Tolerance on |device - host| relative to the sum of magnitudes: the device sums in accum_t<T> in CUB's tree
/// order, the host pairwise in double.
template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-13 : 1e-5;
}

template <class T>
double sum_abs(const host_tensor<T>& x, bool squares) {
  double s = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const double v = double(x.data()[i]);
    s += squares ? v * v : std::abs(v);
  }
  return s;
}

const std::int64_t sizes[] = {1, 2, 3, 127, 128, 1000, 4097, 65537, (1 << 20) + 5, 5000000};

}  // namespace

TEST_CASE_TEMPLATE("cuda sum, squared_norm and max agree with the host from 1 to 5 million elements", T, float, double,
                   bf16, fp16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  stream_guard s;
  const exec::cuda ex{s.stream};
  const exec::host hx;
  for (const std::int64_t n : sizes) {
    CAPTURE(n);
    const auto x = testing::random_tensor<T>({n}, seed + std::uint64_t(n), 0.5f, 1.0f);
    const auto dx = to_device(ex, x.v());
    const view<const T, device_space> v = dx.v();

    const accum_t<T> hs = sum(hx, x.v()), ds = sum(ex, v);
    static_assert(std::is_same_v<decltype(ds), const accum_t<T>>);
    CHECK(std::abs(double(ds) - double(hs)) <= tolerance<T>() * sum_abs(x, false));
    const accum_t<T> hq = squared_norm(hx, x.v()), dq = squared_norm(ex, v);
    CHECK(std::abs(double(dq) - double(hq)) <= tolerance<T>() * sum_abs(x, true));
    CHECK(max(ex, v) == max(hx, x.v()));
  }
}

TEST_CASE_TEMPLATE("cuda *_into write device scalars on the stream without a host round trip", T, float, double, bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  stream_guard s;
  const exec::cuda ex{s.stream};
  const exec::host hx;
  const auto x = testing::random_tensor<T>({3, 333333}, seed, -0.25f, 2.0f);
  const auto dx = to_device(ex, x.v());
  device_tensor<accum_t<T>> out({3});
  const auto o = out.v();
  // Three reductions queued back to back, one synchronization at the end.
  sum_into(ex, dx.v(), o.slice(0, 1));
  squared_norm_into(ex, dx.v(), o.slice(1, 2).reshape({}));  // a rank-0 result view works too
  max_into(ex, dx.v(), o.slice(2, 3));
  const auto h = to_host(ex, std::as_const(out).v());
  CHECK(std::abs(double(h(0)) - double(sum(hx, x.v()))) <= tolerance<T>() * sum_abs(x, false));
  CHECK(std::abs(double(h(1)) - double(squared_norm(hx, x.v()))) <= tolerance<T>() * sum_abs(x, true));
  CHECK(h(2) == max(hx, x.v()));
  // CUB's reduction is deterministic run to run: the value forms give the same bits.
  CHECK(h(0) == sum(ex, dx.v()));
  CHECK(h(1) == squared_norm(ex, dx.v()));
}

TEST_CASE_TEMPLATE("cuda max propagates NaN from any position", T, float, double, bf16, fp16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  stream_guard s;
  const exec::cuda ex{s.stream};
  const std::int64_t n = (1 << 20) + 5;
  for (const std::int64_t pos : {std::int64_t(0), n - 1, std::int64_t(rng::uniform_at(seed, 1, 0) * float(n - 1))}) {
    CAPTURE(pos);
    auto x = testing::random_tensor<T>({n}, seed);
    x(pos) = T(std::nanf(""));
    const auto dx = to_device(ex, x.v());
    CHECK(std::isnan(max(ex, dx.v())));
    CHECK(std::isnan(sum(ex, dx.v())));
  }
  auto x = testing::random_tensor<T>({4097}, seed, -50.0f, 1.0f);  // all negative
  x(4000) = T(-INFINITY);
  const auto dx = to_device(ex, x.v());
  CHECK(max(ex, dx.v()) == max(exec::host{}, x.v()));
  CHECK(max(ex, dx.v()) < 0);
}

TEST_CASE("cuda reductions: empty views, strided views and bad result views") {
  stream_guard s;
  const exec::cuda ex{s.stream};
  device_tensor<float> e({0});
  CHECK(sum(ex, e.v()) == 0.0f);
  CHECK(squared_norm(ex, e.v()) == 0.0f);
  CHECK_THROWS_WITH_AS(max(ex, e.v()), doctest::Contains("max: empty view (shape [0])"), invalid_argument);

  device_tensor<float> a({5, 8}), out({2});
  CHECK_THROWS_WITH_AS(sum(ex, a.v().transposed()),
                       doctest::Contains("sum: the CUDA path needs a contiguous view; "
                                         "got a strided view of shape [8, 5]"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(max(ex, a.v().transposed()), doctest::Contains("max: the CUDA path"), invalid_argument);
  CHECK_THROWS_WITH_AS(squared_norm_into(ex, a.v().transposed(), out.v().slice(0, 1)),
                       doctest::Contains("squared_norm: the CUDA path"), invalid_argument);
  CHECK_THROWS_WITH_AS(sum_into(ex, a.v(), out.v()),
                       doctest::Contains("sum: the result view must have exactly one element; got shape [2]"),
                       invalid_argument);
  ex.synchronize();
}

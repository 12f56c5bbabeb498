// Element-wise kernels on CUDA against the host reference on the same random inputs: the host and the device
// round identically, so results must be bit-identical. Sizes cover the vectorised body and its tail; views that
// start one element past an allocation exercise the unaligned path.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <type_traits>
#include <utility>

#include <subspace/kernels/elementwise.hpp>

#include "support/cuda.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

using testing::add_ties;
using testing::first_difference;
using testing::for_each_dtype;
using testing::stream_guard;

/// A device view of n elements: from the start of an allocation, or one element in (misaligned for packs).
template <class T>
struct device_buffer {
  device_tensor<T> storage;
  view<T, device_space> v;
  device_buffer(std::int64_t n, bool shifted) : storage(shape{n + 1}), v(storage.data() + (shifted ? 1 : 0), {n}) {}
};

template <class T>
device_buffer<T> upload(const exec::cuda& ex, const host_tensor<T>& h, bool shifted) {
  device_buffer<T> d(h.numel(), shifted);
  copy(ex, h.v(), d.v);
  return d;
}

const std::int64_t sizes[] = {1, 3, 7, 8, 4097, (1 << 20) + 5};

}  // namespace

TEST_CASE_TEMPLATE("cuda fill, axpy and scale are bit-identical to the host", T, float, double, bf16, fp16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  stream_guard s;
  const exec::cuda ex{s.stream};
  const exec::host hx;
  const float alpha = rng::uniform_at(seed, 3, 0, -2.0f, 2.0f);
  CAPTURE(alpha);
  for (const std::int64_t n : sizes) {
    for (const bool shifted : {false, true}) {
      CAPTURE(n);
      CAPTURE(shifted);
      const auto x = testing::random_tensor<T>({n}, seed, 0.5f, 2.0f);
      auto y = testing::random_tensor<T>({n}, seed + 1, -1.0f, 1.0f);
      auto dx = upload(ex, x, shifted);
      auto dy = upload(ex, y, !shifted);  // x and y misaligned differently

      axpy(hx, alpha, x.v(), y.v());
      axpy(ex, alpha, view<const T, device_space>(dx.v), dy.v);
      CHECK(first_difference(to_host(ex, dy.v), y) == -1);

      scale(hx, alpha, y.v());
      scale(ex, alpha, dy.v);
      CHECK(first_difference(to_host(ex, dy.v), y) == -1);

      const T value = x.data()[0];
      fill(hx, y.v(), value);
      fill(ex, dy.v, value);
      CHECK(first_difference(to_host(ex, dy.v), y) == -1);
    }
  }
}

TEST_CASE("cuda cast: every pair of fp32, fp64, bf16, fp16 is bit-identical to the host") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  stream_guard s;
  const exec::cuda ex{s.stream};
  const exec::host hx;
  for_each_dtype([&]<class From>() {
    for_each_dtype([&]<class To>() {
      CAPTURE(dtype_name<From>());
      CAPTURE(dtype_name<To>());
      for (const std::int64_t n : {std::int64_t(1), std::int64_t(5), std::int64_t(4099), std::int64_t(1) << 18}) {
        for (const bool shifted : {false, true}) {
          CAPTURE(n);
          CAPTURE(shifted);
          auto x = testing::random_tensor<From>({n}, seed, 0.0f, 50.0f);
          if constexpr (std::is_same_v<From, double>) {
            for (std::int64_t i = 0; i < n; ++i)  // bits below float's precision
              x.data()[i] += x.data()[i] * 0x1p-30 * double(rng::uniform_at(seed, 5, std::uint64_t(i)));
          }
          add_ties(x);
          host_tensor<To> y(x.shape());
          cast(hx, std::as_const(x).v(), y.v());
          auto dx = upload(ex, x, shifted);
          device_buffer<To> dy(n, false);
          cast(ex, view<const From, device_space>(dx.v), dy.v);
          CHECK(first_difference(to_host(ex, dy.v), y) == -1);
        }
      }
    });
  });
}

TEST_CASE("cuda cast rounds fp64 ties to even in one step") {
  stream_guard s;
  const exec::cuda ex{s.stream};
  host_tensor<double> x({6});
  const double values[] = {1.0 + 0x1p-8,  1.0 + 3 * 0x1p-8,  1.0 + 0x1p-8 + 0x1p-40,
                           1.0 + 0x1p-11, 0x1p-25 + 0x1p-60, 0x1.8p-24};
  std::copy(std::begin(values), std::end(values), x.data());
  auto dx = to_device(ex, x.v());
  device_tensor<bf16> b({6});
  device_tensor<fp16> h({6});
  cast(ex, dx.v(), b.v());
  cast(ex, dx.v(), h.v());
  const auto hb = to_host(ex, b.v());
  const auto hh = to_host(ex, h.v());
  CHECK(hb(0).bits == 0x3f80);
  CHECK(hb(1).bits == 0x3f82);
  CHECK(hb(2).bits == 0x3f81);
  CHECK(hh(3).bits == 0x3c00);
  CHECK(hh(4).bits == 0x0001);
  CHECK(hh(5).bits == 0x0002);
}

TEST_CASE("cuda element-wise ops reject strided views and mismatched shapes by name") {
  stream_guard s;
  const exec::cuda ex{s.stream};
  device_tensor<float> a({4, 6}), b({6, 4});
  fill(ex, a.v(), 1.0f);
  fill(ex, b.v(), 2.0f);
  CHECK_THROWS_WITH_AS(fill(ex, a.v().transposed(), 0.0f),
                       doctest::Contains("fill: the CUDA path needs a contiguous view; "
                                         "got a strided view of shape [6, 4]"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(scale(ex, 2.0f, a.v().transposed()), doctest::Contains("scale:"), invalid_argument);
  CHECK_THROWS_WITH_AS(axpy(ex, 1.0f, a.v().transposed(), b.v()), doctest::Contains("axpy: the CUDA path"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(axpy(ex, 1.0f, a.v(), b.v()), doctest::Contains("axpy: shapes differ: [4, 6] vs [6, 4]"),
                       invalid_argument);
  device_tensor<bf16> c({24});
  CHECK_THROWS_WITH_AS(cast(ex, a.v(), c.v()), doctest::Contains("cast: shapes differ: [4, 6] vs [24]"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(cast(ex, b.v().transposed(), device_tensor<bf16>({4, 6}).v()),
                       doctest::Contains("cast: the CUDA path needs a contiguous view; "
                                         "got a strided view of shape [4, 6]"),
                       invalid_argument);
  // Empty views are a no-op, not an error.
  CHECK_NOTHROW(fill(ex, device_tensor<float>({0}).v(), 1.0f));
  ex.synchronize();
}

// Core vocabulary: element types, views and tensors, copies, checks, host threads, Philox and its draws.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <subspace/subspace.hpp>

#include "support/numeric.hpp"

using namespace subspace;

TEST_CASE("bf16 rounds to nearest even and keeps NaN and infinity") {
  CHECK(float(bf16(1.0f)) == 1.0f);
  CHECK(bf16(1.0f + 0x1p-8f).bits == bf16(1.0f).bits);          // tie rounds to even (down)
  CHECK(bf16(1.0f + 3 * 0x1p-8f).bits == bf16(1.0f).bits + 2);  // tie rounds to even (up)
  CHECK(bf16(1.0f + 0x1p-8f + 0x1p-20f).bits == bf16(1.0f).bits + 1);
  CHECK(std::isnan(float(bf16(std::nanf("")))));
  CHECK(std::isinf(float(bf16(INFINITY))));
  CHECK(float(bf16(-2.5f)) == -2.5f);
}

TEST_CASE("fp16 round-trips every finite half value and rounds to nearest even") {
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const fp16 h = fp16::from_bits(std::uint16_t(b));
    const float f = float(h);
    if (std::isnan(f)) {
      CHECK(std::isnan(float(fp16(f))));
      continue;
    }
    REQUIRE(fp16(f).bits == h.bits);
  }
  CHECK(float(fp16(65504.0f)) == 65504.0f);
  CHECK(std::isinf(float(fp16(65520.0f))));
  CHECK(fp16(1.0f + 0x1p-11f).bits == fp16(1.0f).bits);  // tie to even
  CHECK(fp16(0x1p-25f).bits == 0);                       // half of the smallest subnormal: to zero
  CHECK(fp16(0x1.8p-25f).bits == 1);
}

TEST_CASE("view: strides, slices, transposes and reshapes address the right elements") {
  host_tensor<float> t({2, 3, 4});
  std::iota(t.data(), t.data() + t.numel(), 0.0f);
  auto v = t.v();
  CHECK(v.is_contiguous());
  CHECK(v(1, 2, 3) == 23.0f);
  CHECK(v[1](2, 3) == 23.0f);
  CHECK(v.slice(1, 2)(0, 0, 0) == 12.0f);
  const auto m = v[0].transposed();
  CHECK(m.shape() == shape{4, 3});
  CHECK(!m.is_contiguous());
  CHECK(m(3, 1) == 7.0f);
  CHECK(v.reshape({6, 4})(5, 3) == 23.0f);
  CHECK_THROWS_AS(v.reshape({5, 5}), invalid_argument);
  CHECK_THROWS_AS(m.reshape({12}), invalid_argument);
  CHECK_THROWS_AS(v.slice(1, 3), invalid_argument);
  view<const float, host_space> c = v;  // every view converts to const
  CHECK(c(0, 1, 0) == 4.0f);
}

TEST_CASE("scratch_view: a view of the asked shape over the scratch's front, reallocated only to grow") {
  host_tensor<float> t;
  const view<float, host_space> a = scratch_view(t, shape{2, 3, 4});
  CHECK(a.shape() == shape{2, 3, 4});
  CHECK(a.stride(0) == 12);
  const float* first = t.data();
  REQUIRE(first != nullptr);
  const view<float, host_space> b = scratch_view(t, shape{4, 5});  // smaller: the same memory
  CHECK(b.data() == first);
  CHECK(b.shape() == shape{4, 5});
  CHECK(b.stride(0) == 5);
  CHECK(scratch_view(t, shape{24}).data() == first);
  CHECK(scratch_view(t, shape{5, 5}).numel() == 25);  // larger: grown
  CHECK(t.numel() == 25);
}

TEST_CASE("copy: contiguous and strided host copies, and shape mismatches are errors") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  auto a = testing::random_tensor<float>({5, 7}, seed);
  host_tensor<float> at({7, 5});
  copy(exec::host{}, a.v().transposed(), at.v());
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 7; ++j) REQUIRE(at(j, i) == a(i, j));
  host_tensor<float> wrong({5, 6});
  CHECK_THROWS_WITH_AS(copy(exec::host{}, a.v(), wrong.v()), doctest::Contains("[5, 7] vs [5, 6]"), invalid_argument);
}

TEST_CASE("require: a message callable is built only when the check fails, after the file and line") {
  int built = 0;
  const auto message = [&] {
    ++built;
    return "n must be positive, got " + std::to_string(-3);
  };
  require(true, message);
  require(1 + 1 == 2, [&] { return "never built: " + std::to_string(++built); });
  CHECK(built == 0);

  std::string what;
  int line = 0;
  try {
    line = __LINE__ + 1;
    require(false, message);
  } catch (const invalid_argument& e) {
    what = e.what();
  }
  CHECK(built == 1);
  CAPTURE(what);
  CHECK(what.find("test_core.cpp:" + std::to_string(line) + ": n must be positive, got -3") != std::string::npos);
  CHECK_THROWS_WITH_AS(require(false, "a literal message"), doctest::Contains(": a literal message"), invalid_argument);
}

TEST_CASE("parallel_for: a fixed partition into at most concurrency() chunks, exceptions reach the caller") {
  using range = std::pair<std::int64_t, std::int64_t>;
  const auto chunks = [](int threads, std::int64_t n) {
    std::mutex m;
    std::vector<range> seen;
    parallel_for(exec::host{threads}, n, [&](std::int64_t begin, std::int64_t end) {
      const std::lock_guard lock(m);
      seen.emplace_back(begin, end);
    });
    std::sort(seen.begin(), seen.end());
    return seen;
  };
  CHECK(chunks(4, 10) == std::vector<range>{{0, 3}, {3, 6}, {6, 8}, {8, 10}});
  CHECK(chunks(8, 3) == std::vector<range>{{0, 1}, {1, 2}, {2, 3}});
  CHECK(chunks(1, 5) == std::vector<range>{{0, 5}});
  CHECK(chunks(3, 0).empty());

  std::atomic<int> ran{0};
  CHECK_THROWS_WITH_AS(parallel_for(exec::host{4}, 8,
                                    [&](std::int64_t begin, std::int64_t) {
                                      ++ran;
                                      require(begin != 4, "chunk [4, 6) fails");
                                    }),
                       doctest::Contains("chunk [4, 6) fails"), invalid_argument);
  CHECK(ran == 4);  // every chunk ran to its end before the exception reached the caller

  CHECK(for_flops(exec::host{8}, 1.0e6).concurrency() == 1);
  CHECK(for_flops(exec::host{8}, 1.3e7).concurrency() == 3);
  CHECK(for_flops(exec::host{8}, 1.0e12).concurrency() == 8);
}

TEST_CASE("run_concurrently: every part on its own thread at once, the first failure reaches the caller") {
  const int n = 5;
  std::barrier all(n);  // completes only when all parts run at the same time
  std::vector<std::thread::id> ids(n);
  run_concurrently(n, [&](int i) {
    ids[std::size_t(i)] = std::this_thread::get_id();
    all.arrive_and_wait();
  });
  CHECK(ids[0] == std::this_thread::get_id());
  std::sort(ids.begin(), ids.end());
  CHECK(std::unique(ids.begin(), ids.end()) == ids.end());

  std::atomic<int> finished{0};
  CHECK_THROWS_WITH_AS(run_concurrently(3,
                                        [&](int i) {
                                          if (i == 2) throw invalid_argument("part 2 fails");
                                          ++finished;
                                        }),
                       "part 2 fails", invalid_argument);
  CHECK(finished == 2);
}

TEST_CASE("Philox4x32-10 matches Random123's known-answer vectors") {
  using rng::u32x4;
  const auto r0 = rng::philox4x32_10(u32x4{{0, 0, 0, 0}}, 0, 0);
  CHECK(r0.v[0] == 0x6627e8d5u);
  CHECK(r0.v[1] == 0xe169c58du);
  CHECK(r0.v[2] == 0xbc57ac4cu);
  CHECK(r0.v[3] == 0x9b00dbd8u);
  const auto r1 = rng::philox4x32_10(u32x4{{~0u, ~0u, ~0u, ~0u}}, ~0u, ~0u);
  CHECK(r1.v[0] == 0x408f276du);
  CHECK(r1.v[3] == 0x6d5451fdu);
  const auto r2 =
      rng::philox4x32_10(u32x4{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u);
  CHECK(r2.v[0] == 0xd16cfe09u);
  CHECK(r2.v[1] == 0x94fdccebu);
  CHECK(r2.v[2] == 0x5001e420u);
  CHECK(r2.v[3] == 0x24126ea1u);
}

TEST_CASE("deterministic log and cos/sin agree with libm to double precision") {
  for (double x : {1e-9, 2.3283064365386963e-10, 0.1, 0.5, 0.70710678, 0.9999999, 1.0, 1.7, 123.456}) {
    CAPTURE(x);
    CHECK(std::abs(rng::detail::log_det(x) - std::log(x)) <= 4e-16 * std::max(1.0, std::abs(std::log(x))));
  }
  for (int i = 0; i < 4096; ++i) {
    const double v = i / 4096.0 + 1.0 / 8192.0 * (i % 3) / 3.0;
    double c, s;
    rng::detail::cossin_2pi_det(v, c, s);
    CAPTURE(v);
    REQUIRE(std::abs(c - std::cos(2 * M_PI * v)) < 1e-15);
    REQUIRE(std::abs(s - std::sin(2 * M_PI * v)) < 1e-15);
  }
}

TEST_CASE("uniform and normal draws have the right moments and distinct streams differ") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const int n = 1 << 18;
  double su = 0, su2 = 0, sn = 0, sn2 = 0, sn4 = 0;
  float umin = 1, umax = 0;
  for (int i = 0; i < n; ++i) {
    const float u = rng::uniform_at(seed, 7, std::uint64_t(i));
    const float z = rng::normal_at(seed, 7, std::uint64_t(i));
    umin = std::min(umin, u);
    umax = std::max(umax, u);
    su += u;
    su2 += double(u) * u;
    sn += z;
    sn2 += double(z) * z;
    sn4 += double(z) * z * z * z;
  }
  CHECK(umin >= 0.0f);
  CHECK(umax < 1.0f);
  CHECK(su / n == doctest::Approx(0.5).epsilon(0.01));
  CHECK(su2 / n - (su / n) * (su / n) == doctest::Approx(1.0 / 12).epsilon(0.02));
  CHECK(std::abs(sn / n) < 0.01);
  CHECK(sn2 / n == doctest::Approx(1.0).epsilon(0.02));
  CHECK(sn4 / n == doctest::Approx(3.0).epsilon(0.05));  // kurtosis of a normal
  CHECK(rng::uniform_at(seed, 0, 5) != rng::uniform_at(seed, 1, 5));
  CHECK(rng::uniform_at(seed, 0, 5) == rng::uniform_at(seed, 0, 5));
  CHECK(rng::uniform_at(seed, 0, 5, -2.0f, 3.0f) == doctest::Approx(-2.0f + 5.0f * rng::uniform_at(seed, 0, 5)));
}

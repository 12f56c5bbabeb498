// gemm on the host: every transpose, batches, strided and transposed views, every element type, against the naive
// float64 reference of support/gemm_reference.hpp.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include <subspace/kernels/gemm.hpp>

#include "support/gemm_reference.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

using testing::cv;
using testing::for_each_transpose;
using testing::gemm_reference;

/// Runs one gemm on fresh random inputs (contiguous tensors) and returns its relative error vs the reference.
template <class TA, class TB, class TC>
double gemm_error(op op_a, op op_b, std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t batch, float alpha,
                  float beta, std::uint64_t seed, exec::host ex = {}) {
  auto [A, B, C] = testing::random_gemm_operands<TA, TB, TC>(op_a, op_b, m, n, k, batch, seed);
  if (beta == 0)  // beta == 0 must not read C: poison it
    for (std::int64_t i = 0; i < C.numel(); ++i) C.data()[i] = TC(std::numeric_limits<float>::quiet_NaN());
  const auto want = gemm_reference(op_a, op_b, alpha, cv(A), cv(B), beta, cv(C));
  gemm(ex, op_a, op_b, alpha, A.v(), B.v(), beta, C.v());
  return testing::rel_error(cv(C), cv(want));
}

}  // namespace

TEST_CASE("gemm (host): every transpose combination, odd and block-boundary sizes, fp32, portable and native") {
  struct dims {
    std::int64_t m, n, k;
  };
  // 1, odd primes, and the edges of the fp32 blockings: portable mc = 128, nc = 256, kc = 256, micro tile 8 x 8;
  // AVX-512 and AVX2 mc = 144, micro tiles 12 x 32 and 6 x 16 (native runs whichever the CPU has).
  const dims sizes[] = {{1, 1, 1},    {37, 53, 29}, {8, 8, 8},       {7, 9, 300},     {128, 256, 256}, {12, 32, 64},
                        {13, 33, 65}, {6, 16, 16},  {144, 256, 256}, {145, 257, 257}, {129, 257, 257}, {3, 260, 513}};
  for (const exec::host_simd simd : {exec::host_simd::portable, exec::host_simd::native}) {
    CAPTURE(int(simd));
    for (std::size_t i = 0; i < std::size(sizes); ++i) {
      const dims d = sizes[i];
      CAPTURE(d.m);
      CAPTURE(d.n);
      CAPTURE(d.k);
      // Every other size C += A B, which the kernels add into C's full tiles in place over one k panel (and through
      // the accumulator block over several); the others a scaled product and C.
      const float alpha = i % 2 == 0 ? 1.0f : -0.5f, beta = i % 2 == 0 ? 1.0f : 0.75f;
      for_each_transpose([&](op op_a, op op_b, std::uint64_t seed) {
        CHECK(gemm_error<float, float, float>(op_a, op_b, d.m, d.n, d.k, 0, 1.0f, 0.0f, seed, exec::host{0, simd}) <
              1e-5);
        CHECK(gemm_error<float, float, float>(op_a, op_b, d.m, d.n, d.k, 0, alpha, beta, seed + 3,
                                              exec::host{0, simd}) < 1e-5);
      });
    }
  }
}

TEST_CASE("gemm (host): alpha and beta scale the product and a non-zero C") {
  for_each_transpose([](op op_a, op op_b, std::uint64_t seed) {
    CHECK(gemm_error<float, float, float>(op_a, op_b, 45, 70, 33, 0, -0.75f, 0.5f, seed) < 1e-5);
    CHECK(gemm_error<float, float, float>(op_a, op_b, 45, 70, 33, 0, 2.0f, 1.0f, seed + 7) < 1e-5);
    CHECK(gemm_error<double, double, double>(op_a, op_b, 45, 70, 33, 0, 0.0f, -1.5f, seed + 9) < 1e-12);
  });
}

TEST_CASE("gemm (host): strided batches, including a shared (stride-0) operand") {
  for_each_transpose([](op op_a, op op_b, std::uint64_t seed) {
    CHECK(gemm_error<float, float, float>(op_a, op_b, 19, 23, 41, 3, 1.0f, 0.0f, seed) < 1e-5);
    CHECK(gemm_error<float, float, float>(op_a, op_b, 19, 23, 41, 2, 0.5f, -2.0f, seed + 5) < 1e-5);
  });

  // Padded batch stride and row stride on A; one B shared by every batch entry (batch stride 0).
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 4, m = 13, n = 17, k = 21;
  auto a_store = testing::random_tensor<float>({batch, m + 2, k + 5}, seed);
  auto b_store = testing::random_tensor<float>({k, n}, seed + 1);
  auto c = testing::random_tensor<float>({batch, m, n}, seed + 2);
  const view<const float, host_space> A(a_store.data(), {batch, m, k}, {(m + 2) * (k + 5), k + 5, 1, 0});
  const view<const float, host_space> B(b_store.data(), {batch, k, n}, {0, n, 1, 0});
  const auto want = gemm_reference(op::none, op::none, 1.0, A, B, 0.25, cv(c));
  gemm(exec::host{}, op::none, op::none, 1.0f, A, B, 0.25f, c.v());
  CHECK(testing::rel_error(cv(c), cv(want)) < 1e-5);
}

TEST_CASE("gemm (host): non-contiguous views: slices, transposed() views, and a strided C") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t m = 37, n = 53, k = 29;
  // A: rows [3, 3 + m) of a taller matrix; B: the transpose of a stored [n, k] (a transposed() view, op none).
  auto a_big = testing::random_tensor<float>({m + 10, k}, seed);
  auto bt = testing::random_tensor<float>({n, k}, seed + 1);
  const auto A = cv(a_big).slice(3, 3 + m);
  const auto B = cv(bt).transposed();

  SUBCASE("C is a transposed() view (column-major storage)") {
    auto ct = testing::random_tensor<float>({n, m}, seed + 2);
    const auto want = gemm_reference(op::none, op::none, 1.5, A, B, -1.0, cv(ct).transposed());
    gemm(exec::host{}, op::none, op::none, 1.5f, A, B, -1.0f, ct.v().transposed());
    CHECK(testing::rel_error(cv(ct).transposed(), cv(want)) < 1e-5);
  }
  SUBCASE("C is a window of a wider matrix: the elements around it stay untouched") {
    auto c_big = testing::random_tensor<float>({m, n + 7}, seed + 3);
    host_tensor<float> before({m, n + 7});
    copy(exec::host{}, cv(c_big), before.v());
    const view<float, host_space> C(c_big.data() + 2, {m, n}, {n + 7, 1, 0, 0});
    const auto want = gemm_reference(op::none, op::transpose, 1.0, A, cv(bt), 0.5, view<const float, host_space>(C));
    gemm(exec::host{}, op::none, op::transpose, 1.0f, A, cv(bt), 0.5f, C);
    CHECK(testing::rel_error(view<const float, host_space>(C), cv(want)) < 1e-5);
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n + 7; ++j)
        if (j < 2 || j >= n + 2) REQUIRE(c_big(i, j) == before(i, j));
  }
  SUBCASE("the same product through op::transpose and through transposed() views agrees exactly") {
    host_tensor<float> c1({m, n}), c2({m, n});
    gemm(exec::host{}, op::none, op::transpose, 1.0f, A, cv(bt), 0.0f, c1.v());
    gemm(exec::host{}, op::none, op::none, 1.0f, A, B, 0.0f, c2.v());
    CHECK(testing::rel_error(c1, c2) == 0.0);
  }
}

TEST_CASE("gemm (host): bf16, fp16 and double operands, bf16 and fp16 output, mixed types") {
  for_each_transpose([](op op_a, op op_b, std::uint64_t seed) {
    // The inputs are exact in bf16/fp16, so with an fp32 output only fp32 accumulation is left to err.
    CHECK(gemm_error<bf16, bf16, float>(op_a, op_b, 37, 53, 129, 0, 1.0f, 0.0f, seed) < 1e-5);
    CHECK(gemm_error<fp16, fp16, float>(op_a, op_b, 37, 53, 129, 0, 1.0f, 0.5f, seed + 3) < 1e-5);
    CHECK(gemm_error<bf16, float, float>(op_a, op_b, 20, 30, 40, 2, 1.0f, 0.0f, seed + 6) < 1e-5);
    // A bf16 output adds one rounding (relative 2^-9 at most) per element.
    CHECK(gemm_error<bf16, bf16, bf16>(op_a, op_b, 37, 53, 129, 0, 1.0f, 0.0f, seed + 9) < 4e-3);
    CHECK(gemm_error<bf16, bf16, bf16>(op_a, op_b, 33, 17, 65, 3, 0.5f, 1.0f, seed + 12) < 4e-3);
    CHECK(gemm_error<double, double, double>(op_a, op_b, 37, 53, 129, 0, 1.0f, 0.0f, seed + 15) < 1e-12);
    CHECK(gemm_error<double, double, double>(op_a, op_b, 97, 65, 300, 2, -1.0f, 0.25f, seed + 18) < 1e-12);
    CHECK(gemm_error<float, float, double>(op_a, op_b, 21, 11, 70, 0, 1.0f, 0.0f, seed + 21) < 1e-6);
    CHECK(gemm_error<fp16, fp16, fp16>(op_a, op_b, 29, 31, 64, 2, 1.0f, 0.5f, seed + 24) < 1e-3);  // 2^-11 rounding
  });
}

TEST_CASE("gemm (host): the result does not depend on the thread count") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  // The blocks' sizes follow the thread count (688 rows: 5 blocks for one thread, 6 for two); no element's sum does.
  struct dims {
    std::int64_t m, n, k;
  };
  for (const dims d : {dims{300, 520, 270}, dims{688, 344, 40}, dims{128, 344, 300}}) {
    CAPTURE(d.m);
    auto A = testing::random_tensor<float>({d.m, d.k}, seed);
    auto B = testing::random_tensor<float>({d.k, d.n}, seed + 1);
    host_tensor<float> c1({d.m, d.n});
    gemm(exec::host{1}, op::none, op::none, 1.0f, A.v(), B.v(), 0.0f, c1.v());
    const auto want = gemm_reference(op::none, op::none, 1.0, cv(A), cv(B), 0.0, cv(c1));
    CHECK(testing::rel_error(cv(c1), cv(want)) < 1e-5);
    for (const int threads : {2, 3}) {
      host_tensor<float> c({d.m, d.n});
      gemm(exec::host{threads}, op::none, op::none, 1.0f, A.v(), B.v(), 0.0f, c.v());
      CHECK(testing::rel_error(c1, c) == 0.0);
    }
  }
}

TEST_CASE("gemm (host): empty dimensions") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  // k == 0: C = beta * C.
  host_tensor<float> a({4, 0}), b({0, 5});
  auto c = testing::random_tensor<float>({4, 5}, seed);
  const auto want = gemm_reference(op::none, op::none, 1.0, cv(a), cv(b), 0.5, cv(c));
  gemm(exec::host{}, op::none, op::none, 1.0f, a.v(), b.v(), 0.5f, c.v());
  CHECK(testing::rel_error(cv(c), cv(want)) == 0.0);
  // m == 0 or batch == 0: nothing to do, nothing thrown.
  host_tensor<float> a0({0, 3}), b0({3, 5}), c0({0, 5});
  CHECK_NOTHROW(gemm(exec::host{}, op::none, op::none, 1.0f, a0.v(), b0.v(), 0.0f, c0.v()));
  host_tensor<float> ab({0, 2, 3}), bb({0, 3, 4}), cb({0, 2, 4});
  CHECK_NOTHROW(gemm(exec::host{}, op::none, op::none, 1.0f, ab.v(), bb.v(), 0.0f, cb.v()));
}

TEST_CASE("gemm (host): shape, rank and batch mismatches name the operands and their shapes") {
  host_tensor<float> a({3, 4}), b({5, 6}), c({3, 6}), b_ok({4, 6}), c_bad({3, 7});
  CHECK_THROWS_WITH_AS(gemm(exec::host{}, op::none, op::none, 1.0f, a.v(), b.v(), 0.0f, c.v()),
                       doctest::Contains("op_a(A) has shape [3, 4] (A [3, 4], op_a = none) but op_b(B) has shape "
                                         "[5, 6] (B [5, 6], op_b = none)"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(gemm(exec::host{}, op::transpose, op::none, 1.0f, a.v(), b_ok.v(), 0.0f, c.v()),
                       doctest::Contains("op_a(A) has shape [4, 3] (A [3, 4], op_a = transpose)"), invalid_argument);
  CHECK_THROWS_WITH_AS(gemm(exec::host{}, op::none, op::none, 1.0f, a.v(), b_ok.v(), 0.0f, c_bad.v()),
                       doctest::Contains("C has shape [3, 7] but op_a(A) * op_b(B) has shape [3, 6]"),
                       invalid_argument);
  host_tensor<float> v({4}), a3({2, 3, 4}), b3({3, 4, 6}), c3({2, 3, 6});
  CHECK_THROWS_WITH_AS(gemm(exec::host{}, op::none, op::none, 1.0f, v.v(), b_ok.v(), 0.0f, c.v()),
                       doctest::Contains("must all be rank 2, or all rank 3"), invalid_argument);
  CHECK_THROWS_WITH_AS(gemm(exec::host{}, op::none, op::none, 1.0f, a3.v(), b_ok.v(), 0.0f, c.v()),
                       doctest::Contains("got A [2, 3, 4], B [4, 6], C [3, 6]"), invalid_argument);
  CHECK_THROWS_WITH_AS(gemm(exec::host{}, op::none, op::none, 1.0f, a3.v(), b3.v(), 0.0f, c3.v()),
                       doctest::Contains("batch counts (dimension 0) differ: A [2, 3, 4], B [3, 4, 6], C [2, 3, 6]"),
                       invalid_argument);
  const view<float, host_space> c_shared(c3.data(), {2, 3, 6}, {0, 6, 1, 0});
  host_tensor<float> b3ok({2, 4, 6});
  CHECK_THROWS_WITH_AS(gemm(exec::host{}, op::none, op::none, 1.0f, a3.v(), b3ok.v(), 0.0f, c_shared),
                       doctest::Contains("batch stride 0"), invalid_argument);
}

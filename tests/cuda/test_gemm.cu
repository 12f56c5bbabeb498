// gemm on CUDA (cuBLASLt) against a float64 reference and the host gemm, on the same random inputs: every
// transpose in bf16 and fp32, batches, odd sizes, bf16 output, strided and transposed views, concurrent streams.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

#include <subspace/kernels/gemm.hpp>

#include "support/gemm_reference.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

using testing::cv;
using testing::for_each_transpose;
using testing::gemm_reference;

struct errors {
  double vs_reference, vs_host;
};

/// One gemm on fresh random inputs, on the device and on the host; the device result's relative errors against
/// the float64 reference and against the host gemm.
template <class T, class TC>
errors cuda_gemm_error(const exec::cuda& ex, op op_a, op op_b, std::int64_t m, std::int64_t n, std::int64_t k,
                       std::int64_t batch, float alpha, float beta, std::uint64_t seed) {
  const auto [A, B, C0] = testing::random_gemm_operands<T, T, TC>(op_a, op_b, m, n, k, batch, seed);
  const auto want = gemm_reference(op_a, op_b, alpha, cv(A), cv(B), beta, cv(C0));

  host_tensor<TC> on_host(C0.shape());
  copy(exec::host{}, cv(C0), on_host.v());
  gemm(exec::host{}, op_a, op_b, alpha, cv(A), cv(B), beta, on_host.v());

  auto dA = to_device(ex, cv(A));
  auto dB = to_device(ex, cv(B));
  auto dC = to_device(ex, cv(C0));
  gemm(ex, op_a, op_b, alpha, dA.v(), dB.v(), beta, dC.v());
  const auto got = to_host(ex, dC.v());
  return {testing::rel_error(cv(got), cv(want)), testing::rel_error(cv(got), cv(on_host))};
}

/// Relative-error bounds: fp32 in and out; bf16 in, fp32 out (the products are exact in fp32, only the fp32 sums
/// err); a bf16 output adds one rounding of relative 2^-9 at most per element.
template <class T, class TC>
constexpr double tolerance() {
  if constexpr (std::is_same_v<TC, bf16> || std::is_same_v<TC, fp16>) return 5e-3;
  else if constexpr (std::is_same_v<T, float>) return 1e-5;
  else return 1e-4;
}

}  // namespace

TEST_CASE_TEMPLATE("gemm (CUDA): every transpose combination, odd sizes and batches", T, bf16, float) {
  const exec::cuda ex{};
  struct dims {
    std::int64_t m, n, k, batch;
  };
  const dims sizes[] = {{1, 1, 1, 0},      {37, 53, 29, 0}, {64, 128, 256, 0},
                        {129, 65, 300, 0}, {19, 23, 41, 3}, {128, 64, 96, 4}};
  for (const auto& d : sizes) {
    CAPTURE(d.m);
    CAPTURE(d.n);
    CAPTURE(d.k);
    CAPTURE(d.batch);
    for_each_transpose([&](op op_a, op op_b, std::uint64_t seed) {
      const auto e = cuda_gemm_error<T, T>(ex, op_a, op_b, d.m, d.n, d.k, d.batch, 1.0f, 0.0f, seed);
      CHECK(e.vs_reference < tolerance<T, T>());
      CHECK(e.vs_host < 2 * tolerance<T, T>());
      if constexpr (std::is_same_v<T, bf16>) {  // bf16 in, fp32 out
        const auto f = cuda_gemm_error<T, float>(ex, op_a, op_b, d.m, d.n, d.k, d.batch, 1.0f, 0.0f, seed + 3);
        CHECK(f.vs_reference < tolerance<T, float>());
        CHECK(f.vs_host < 2 * tolerance<T, float>());
      }
    });
  }
}

TEST_CASE_TEMPLATE("gemm (CUDA): alpha, beta and a non-zero C, on a stream of our own", T, bf16, float) {
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  const exec::cuda ex{stream};
  for_each_transpose([&](op op_a, op op_b, std::uint64_t seed) {
    const auto e = cuda_gemm_error<T, T>(ex, op_a, op_b, 45, 70, 33, 0, -0.75f, 0.5f, seed);
    CHECK(e.vs_reference < tolerance<T, T>());
    const auto f = cuda_gemm_error<T, float>(ex, op_a, op_b, 45, 70, 33, 2, 2.0f, 1.0f, seed + 3);
    CHECK(f.vs_reference < tolerance<T, float>());
    const auto z = cuda_gemm_error<T, T>(ex, op_a, op_b, 16, 24, 8, 0, 0.0f, -1.5f, seed + 6);  // alpha == 0
    CHECK(z.vs_reference < tolerance<T, T>());
  });
  CHECK(cudaStreamDestroy(stream) == cudaSuccess);
}

TEST_CASE("gemm (CUDA): fp16 operands with fp16 and fp32 output") {
  const exec::cuda ex{};
  for_each_transpose([&](op op_a, op op_b, std::uint64_t seed) {
    CHECK(cuda_gemm_error<fp16, fp16>(ex, op_a, op_b, 37, 53, 64, 0, 1.0f, 0.0f, seed).vs_reference <
          tolerance<fp16, fp16>());
    CHECK(cuda_gemm_error<fp16, float>(ex, op_a, op_b, 37, 53, 64, 2, 1.0f, 0.5f, seed + 3).vs_reference <
          tolerance<fp16, float>());
  });
}

TEST_CASE_TEMPLATE("gemm (CUDA): strided, sliced and transposed views, a column-major C", T, bf16, float) {
  const exec::cuda ex{};
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t m = 37, n = 53, k = 29;
  // On the host: A = rows [3, 3 + m) of a taller, wider matrix (row stride k + 7); B = the transpose of [n, k].
  const auto a_big = testing::random_tensor<T>({m + 10, k + 7}, seed);
  const auto bt = testing::random_tensor<T>({n, k}, seed + 1);
  const view<const T, host_space> A(a_big.data() + 3 * (k + 7), {m, k}, {k + 7, 1, 0, 0});
  const auto B = cv(bt).transposed();
  auto d_a_big = to_device(ex, cv(a_big));
  auto d_bt = to_device(ex, cv(bt));
  const view<const T, device_space> dA(d_a_big.data() + 3 * (k + 7), {m, k}, {k + 7, 1, 0, 0});
  const auto dB = view<const T, device_space>(d_bt.v()).transposed();

  SUBCASE("C row-major with a padded row stride") {
    const auto c_big = testing::random_tensor<float>({m, n + 5}, seed + 2);
    const view<const float, host_space> C0(c_big.data(), {m, n}, {n + 5, 1, 0, 0});
    const auto want = gemm_reference(op::none, op::none, 1.0, A, B, 0.5, C0);
    auto d_c_big = to_device(ex, cv(c_big));
    const view<float, device_space> dC(d_c_big.data(), {m, n}, {n + 5, 1, 0, 0});
    gemm(ex, op::none, op::none, 1.0f, dA, dB, 0.5f, dC);
    const auto got = to_host(ex, d_c_big.v());
    CHECK(testing::rel_error(view<const float, host_space>(got.data(), {m, n}, {n + 5, 1, 0, 0}), cv(want)) <
          tolerance<T, float>());
    for (std::int64_t i = 0; i < m; ++i)  // the padding is untouched
      for (std::int64_t j = n; j < n + 5; ++j) REQUIRE(got(i, j) == c_big(i, j));
  }
  SUBCASE("C is a transposed() view (column-major storage)") {
    const auto ct = testing::random_tensor<float>({n, m}, seed + 3);
    const auto want = gemm_reference(op::none, op::transpose, -1.0, A, cv(bt), 2.0, cv(ct).transposed());
    auto d_ct = to_device(ex, cv(ct));
    gemm(ex, op::none, op::transpose, -1.0f, dA, d_bt.v(), 2.0f, d_ct.v().transposed());
    const auto got = to_host(ex, d_ct.v());
    CHECK(testing::rel_error(cv(got).transposed(), cv(want)) < tolerance<T, float>());
  }
  SUBCASE("a batch sharing one B (batch stride 0) with padded batch strides on A") {
    const std::int64_t batch = 3;
    const auto a3 = testing::random_tensor<T>({batch, m + 1, k}, seed + 4);
    const view<const T, host_space> A3(a3.data(), {batch, m, k}, {(m + 1) * k, k, 1, 0});
    const view<const T, host_space> B3(bt.data(), {batch, k, n}, {0, 1, k, 0});  // bt^T for every entry
    host_tensor<T> c3({batch, m, n});
    const auto want = gemm_reference(op::none, op::none, 1.0, A3, B3, 0.0, cv(c3));
    auto d_a3 = to_device(ex, cv(a3));
    device_tensor<T> d_c3({batch, m, n});
    const view<const T, device_space> dA3(d_a3.data(), {batch, m, k}, {(m + 1) * k, k, 1, 0});
    const view<const T, device_space> dB3(d_bt.data(), {batch, k, n}, {0, 1, k, 0});
    gemm(ex, op::none, op::none, 1.0f, dA3, dB3, 0.0f, d_c3.v());
    const auto got = to_host(ex, d_c3.v());
    CHECK(testing::rel_error(cv(got), cv(want)) < tolerance<T, T>());
  }
}

TEST_CASE("gemm (CUDA): the same call twice (cached algorithm) gives identical results, k == 0 scales C") {
  const exec::cuda ex{};
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto A = testing::random_tensor<bf16>({96, 200}, seed);
  const auto B = testing::random_tensor<bf16>({200, 72}, seed + 1);
  auto dA = to_device(ex, cv(A));
  auto dB = to_device(ex, cv(B));
  device_tensor<bf16> c1({96, 72}), c2({96, 72});
  gemm(ex, op::none, op::none, 1.0f, dA.v(), dB.v(), 0.0f, c1.v());
  gemm(ex, op::none, op::none, 1.0f, dA.v(), dB.v(), 0.0f, c2.v());
  CHECK(testing::rel_error(cv(to_host(ex, c1.v())), cv(to_host(ex, c2.v()))) == 0.0);

  const auto C0 = testing::random_tensor<float>({5, 6}, seed + 2);
  auto dC = to_device(ex, cv(C0));
  device_tensor<float> a0({5, 0}), b0({0, 6});
  gemm(ex, op::none, op::none, 1.0f, a0.v(), b0.v(), -2.0f, dC.v());
  const auto got = to_host(ex, dC.v());
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 6; ++j) REQUIRE(got(i, j) == -2.0f * C0(i, j));
}

TEST_CASE("gemm (CUDA): concurrent GEMMs on several streams from several threads") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  constexpr int workers = 4;
  std::vector<double> worst(workers, 0.0);
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w)
    threads.emplace_back([&, w] {
      cudaStream_t stream = nullptr;
      if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
        worst[std::size_t(w)] = INFINITY;
        return;
      }
      const exec::cuda ex{stream};
      try {
        for (int r = 0; r < 3; ++r) {
          const auto e = cuda_gemm_error<bf16, float>(ex, op::none, op::transpose, 256 + 32 * w, 192, 320, 2, 1.0f,
                                                      0.0f, seed + std::uint64_t(10 * w + 3 * r));
          worst[std::size_t(w)] = std::max(worst[std::size_t(w)], e.vs_reference);
        }
      } catch (...) {  // doctest's assertions are not thread-safe: report through `worst`
        worst[std::size_t(w)] = INFINITY;
      }
      cudaStreamDestroy(stream);
    });
  for (auto& t : threads) t.join();
  for (int w = 0; w < workers; ++w) {
    CAPTURE(w);
    CHECK(worst[std::size_t(w)] < tolerance<bf16, float>());
  }
}

TEST_CASE("gemm (CUDA): operands without a unit stride and shape mismatches are invalid_argument") {
  const exec::cuda ex{};
  device_tensor<float> store({64}), b({4, 4}), c({4, 4}), c_bad({4, 5});
  const view<const float, device_space> strided(store.data(), {4, 4}, {8, 2, 0, 0});
  CHECK_THROWS_WITH_AS(gemm(ex, op::none, op::none, 1.0f, strided, b.v(), 0.0f, c.v()),
                       doctest::Contains("A [4, 4] with strides [8, 2]"), invalid_argument);
  CHECK_THROWS_WITH_AS(gemm(ex, op::none, op::none, 1.0f, b.v(), b.v(), 0.0f, c_bad.v()),
                       doctest::Contains("C has shape [4, 5] but op_a(A) * op_b(B) has shape [4, 4]"),
                       invalid_argument);
}

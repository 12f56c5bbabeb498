#pragma once
// Shared by the host and CUDA gemm tests (host code only, so it compiles as C++ and as CUDA): a naive float64
// reference GEMM, random operands in the stored layout an op asks for, and a loop over every transpose pair.

#include <doctest/doctest.h>

#include <cstdint>

#include <subspace/core/tensor.hpp>
#include <subspace/kernels/gemm.hpp>

#include "support/numeric.hpp"

namespace subspace::testing {

/// A const view of a host tensor.
template <class T>
view<const T, host_space> cv(const host_tensor<T>& t) {
  return t.v();
}

/// op(X)(i, j) of a rank-2 host view, in double.
template <class T>
double op_at(view<const T, host_space> x, op o, std::int64_t i, std::int64_t j) {
  return o == op::none ? double(x(i, j)) : double(x(j, i));
}

/// alpha * op_a(A) * op_b(B) + beta * C0 in float64, the naive way. Rank 2 or 3 (batch in dimension 0).
template <class TA, class TB, class TC>
host_tensor<double> gemm_reference(op op_a, op op_b, double alpha, view<const TA, host_space> A,
                                   view<const TB, host_space> B, double beta, view<const TC, host_space> C0) {
  host_tensor<double> out(C0.shape());
  const bool batched = C0.rank() == 3;
  const std::int64_t batch = batched ? C0.dim(0) : 1;
  auto out3 = batched ? out.v() : out.v().reshape({1, out.dim(0), out.dim(1)});
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto a = batched ? A[b] : A;
    const auto bm = batched ? B[b] : B;
    const auto c = batched ? C0[b] : C0;
    const std::int64_t m = c.dim(0), n = c.dim(1), k = op_a == op::none ? a.dim(1) : a.dim(0);
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (std::int64_t p = 0; p < k; ++p) s += op_at(a, op_a, i, p) * op_at(bm, op_b, p, j);
        out3(b, i, j) = alpha * s + (beta == 0 ? 0.0 : beta * double(c(i, j)));
      }
  }
  return out;
}

/// The stored shape of an operand whose op(X) is rows x cols (with a leading batch when batch > 0).
inline shape stored(op o, std::int64_t rows, std::int64_t cols, std::int64_t batch) {
  const std::int64_t r = o == op::none ? rows : cols, c = o == op::none ? cols : rows;
  return batch > 0 ? shape{batch, r, c} : shape{r, c};
}

/// Random contiguous operands of one gemm: op_a(A) is m x k, op_b(B) is k x n, C is m x n (each with a leading
/// batch when batch > 0), drawn from seeds seed, seed + 1 and seed + 2.
template <class TA, class TB, class TC>
struct gemm_operands {
  host_tensor<TA> A;
  host_tensor<TB> B;
  host_tensor<TC> C;
};
template <class TA, class TB, class TC>
gemm_operands<TA, TB, TC> random_gemm_operands(op op_a, op op_b, std::int64_t m, std::int64_t n, std::int64_t k,
                                               std::int64_t batch, std::uint64_t seed) {
  return {random_tensor<TA>(stored(op_a, m, k, batch), seed), random_tensor<TB>(stored(op_b, k, n, batch), seed + 1),
          random_tensor<TC>(batch > 0 ? shape{batch, m, n} : shape{m, n}, seed + 2)};
}

/// Calls f(op_a, op_b, seed) for every pair of op::none and op::transpose, each with a fresh seed; the seed and
/// both ops are captured for doctest's failure messages.
template <class F>
void for_each_transpose(F&& f) {
  for (const op op_a : {op::none, op::transpose})
    for (const op op_b : {op::none, op::transpose}) {
      const auto seed = fresh_seed();
      CAPTURE(seed);
      CAPTURE(to_string(op_a));
      CAPTURE(to_string(op_b));
      f(op_a, op_b, seed);
    }
}

}  // namespace subspace::testing

// symmetric_eigen on the host (kernels/linalg.hpp): reconstruction, orthonormal eigenvectors, descending values,
// the sign convention, truncated outputs, only the lower triangle read, designed spectra with repeated and zero
// eigenvalues, agreement with the SVD on a second-moment matrix, and errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <subspace/kernels/gemm.hpp>
#include <subspace/kernels/linalg.hpp>

#include "support/numeric.hpp"

using namespace subspace;

namespace {

const exec::host ex{1};

/// (g + g^T) / 2 for a fresh normal g (n x n): symmetric and indefinite.
host_tensor<double> random_symmetric(std::int64_t n, std::uint64_t seed) {
  const auto g = testing::random_tensor<double>({n, n}, seed);
  host_tensor<double> a({n, n});
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < n; ++j) a(i, j) = 0.5 * (g(i, j) + g(j, i));
  return a;
}

/// Q diag(values) Q^T for an orthonormal Q from the QR of a fresh normal matrix; q receives Q.
host_tensor<double> with_spectrum(const std::vector<double>& values, std::uint64_t seed, host_tensor<double>& q) {
  const std::int64_t n = std::int64_t(values.size());
  const auto g = testing::random_tensor<double>({n, n}, seed);
  q = host_tensor<double>({n, n});
  orthonormalize(ex, view<const double, host_space>(g.v()), q.v());
  host_tensor<double> a({n, n});
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (std::int64_t l = 0; l < n; ++l) s += q(i, l) * values[std::size_t(l)] * q(j, l);
      a(i, j) = s;
    }
  return a;
}

/// sin of the largest principal angle between the column spans of a and b (n x r, orthonormal columns): the
/// largest singular value of a - b (b^T a).
double sin_largest_angle(const host_tensor<double>& a, const host_tensor<double>& b) {
  const std::int64_t n = a.dim(0), r = a.dim(1);
  host_tensor<double> bta({r, r}), resid({n, r}), sv({1});
  gemm(ex, op::transpose, op::none, 1.0f, view<const double, host_space>(b.v()), view<const double, host_space>(a.v()),
       0.0f, bta.v());
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < r; ++j) {
      double s = a(i, j);
      for (std::int64_t l = 0; l < r; ++l) s -= b(i, l) * bta(l, j);
      resid(i, j) = s;
    }
  svd(ex, view<const double, host_space>(resid.v()), sv.v(), view<double, host_space>{}, view<double, host_space>{});
  return sv(0);
}

/// Columns [first, first + count) of a.
host_tensor<double> columns(const host_tensor<double>& a, std::int64_t first, std::int64_t count) {
  host_tensor<double> out({a.dim(0), count});
  for (std::int64_t i = 0; i < a.dim(0); ++i)
    for (std::int64_t j = 0; j < count; ++j) out(i, j) = a(i, first + j);
  return out;
}

}  // namespace

TEST_CASE(
    "symmetric_eigen: reconstructs a, orthonormal vectors, descending values, the sign convention, "
    "truncated outputs") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const std::int64_t n : {1, 2, 3, 7, 40, 129}) {
    CAPTURE(n);
    const auto a = random_symmetric(n, seed + std::uint64_t(n));
    host_tensor<double> w({n}), v({n, n});
    symmetric_eigen(ex, view<const double, host_space>(a.v()), w.v(), v.v());
    CHECK(testing::max_abs_minus_identity(testing::gram(v, true)) <= 1e-13);
    for (std::int64_t j = 0; j + 1 < n; ++j) CHECK(w(j) >= w(j + 1));
    host_tensor<double> vw({n, n}), back({n, n});
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = 0; j < n; ++j) vw(i, j) = v(i, j) * w(j);
    gemm(ex, op::none, op::transpose, 1.0f, view<const double, host_space>(vw.v()),
         view<const double, host_space>(v.v()), 0.0f, back.v());
    CHECK(testing::rel_error(back, a) <= 1e-13);
    for (std::int64_t j = 0; j < n; ++j) {  // the largest-magnitude entry of each eigenvector is positive
      std::int64_t at = 0;
      for (std::int64_t i = 1; i < n; ++i)
        if (std::abs(v(i, j)) > std::abs(v(at, j))) at = i;
      CHECK(v(at, j) > 0.0);
    }
    // Leading outputs alone are the same bits; the strict upper triangle is never read.
    const std::int64_t r = std::max<std::int64_t>(1, n / 3);
    host_tensor<double> lower({n, n}), w_r({r}), v_r({n, r});
    copy(ex, view<const double, host_space>(a.v()), lower.v());
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = i + 1; j < n; ++j) lower(i, j) = std::numeric_limits<double>::quiet_NaN();
    symmetric_eigen(ex, view<const double, host_space>(lower.v()), w_r.v(), view<double, host_space>{});
    symmetric_eigen(ex, view<const double, host_space>(lower.v()), view<double, host_space>{}, v_r.v());
    bool same = true;
    for (std::int64_t j = 0; j < r; ++j) {
      same = same && w_r(j) == w(j);
      for (std::int64_t i = 0; i < n; ++i) same = same && v_r(i, j) == v(i, j);
    }
    CHECK(same);
  }
}

TEST_CASE(
    "symmetric_eigen: designed spectra with repeated, zero and negative eigenvalues; diagonal and zero "
    "matrices") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::vector<double> values = {7.0, 5.0, 5.0, 3.0, 1e-9, 0.0, 0.0, -2.0, -2.0, -6.5};
  const std::int64_t n = std::int64_t(values.size());
  host_tensor<double> q;
  const auto a = with_spectrum(values, seed, q);
  host_tensor<double> w({n}), v({n, n});
  symmetric_eigen(ex, view<const double, host_space>(a.v()), w.v(), v.v());
  for (std::int64_t j = 0; j < n; ++j) CHECK(std::abs(w(j) - values[std::size_t(j)]) <= 1e-13 * 7.0);
  // Each eigenspace, repeated ones as a whole (their vectors within are not unique).
  for (const auto& [first, count] :
       {std::pair{0, 1}, std::pair{1, 2}, std::pair{3, 1}, std::pair{7, 2}, std::pair{9, 1}}) {
    CAPTURE(first);
    CHECK(sin_largest_angle(columns(v, first, count), columns(q, first, count)) <= 1e-12);
  }
  CHECK(sin_largest_angle(columns(v, 4, 3), columns(q, 4, 3)) <= 1e-12);  // the null space and 1e-9

  // Already diagonal (every reflection is the identity) and all zero: orthonormal vectors, the diagonal sorted.
  host_tensor<double> diag({5, 5}), zero({5, 5}), wd({5}), vd({5, 5});
  for (std::int64_t i = 0; i < 25; ++i) diag.data()[i] = zero.data()[i] = 0.0;
  const double entries[5] = {2.0, -1.0, 4.0, 0.5, 4.0};
  for (std::int64_t i = 0; i < 5; ++i) diag(i, i) = entries[i];
  symmetric_eigen(ex, view<const double, host_space>(diag.v()), wd.v(), vd.v());
  const double sorted[5] = {4.0, 4.0, 2.0, 0.5, -1.0};
  for (std::int64_t j = 0; j < 5; ++j) CHECK(wd(j) == sorted[j]);
  CHECK(testing::max_abs_minus_identity(testing::gram(vd, true)) <= 1e-15);
  CHECK(std::abs(vd(2, 0)) + std::abs(vd(4, 0)) == doctest::Approx(1.0));  // eigenvectors of 4 are e_2 and e_4
  symmetric_eigen(ex, view<const double, host_space>(zero.v()), wd.v(), vd.v());
  for (std::int64_t j = 0; j < 5; ++j) CHECK(wd(j) == 0.0);
  CHECK(testing::max_abs_minus_identity(testing::gram(vd, true)) <= 1e-15);
}

TEST_CASE("symmetric_eigen: on a second-moment matrix the top eigenpairs equal the SVD's (float input too)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t rows = 300, n = 64, r = 8;
  auto z = testing::random_tensor<double>({rows, n}, seed);
  for (std::int64_t i = 0; i < rows; ++i)  // a decaying spectrum: distinct leading eigenvalues
    for (std::int64_t j = 0; j < n; ++j) z(i, j) *= std::pow(0.93, double(j));
  host_tensor<double> sigma({n, n});
  gemm(ex, op::transpose, op::none, 1.0f, view<const double, host_space>(z.v()), view<const double, host_space>(z.v()),
       0.0f, sigma.v());
  host_tensor<double> w({r}), v({n, r}), s({r}), u({n, r});
  symmetric_eigen(ex, view<const double, host_space>(sigma.v()), w.v(), v.v());
  svd(ex, view<const double, host_space>(sigma.v()), s.v(), u.v(), view<double, host_space>{});
  CHECK(testing::rel_error(w, s) <= 1e-13);
  CHECK(testing::rel_error(v, u) <= 1e-10);  // the same sign convention; vectors to the spectral gaps' conditioning
  host_tensor<float> sigma_f({n, n}), v_f({n, r});
  for (std::int64_t i = 0; i < n * n; ++i) sigma_f.data()[i] = float(sigma.data()[i]);
  symmetric_eigen(ex, view<const float, host_space>(sigma_f.v()), view<float, host_space>{}, v_f.v());
  CHECK(testing::rel_error(v_f, u) <= 1e-4);
}

TEST_CASE("symmetric_eigen: shapes are checked, and a NaN fails instead of looping") {
  host_tensor<double> rect({4, 3}), a({4, 4}), w5({5}), v_bad({3, 2});
  for (std::int64_t i = 0; i < 16; ++i) a.data()[i] = 1.0;
  CHECK_THROWS_WITH_AS(symmetric_eigen(ex, view<const double, host_space>(rect.v()), view<double, host_space>{},
                                       view<double, host_space>{}),
                       doctest::Contains("a must be square, got shape [4, 3]"), invalid_argument);
  CHECK_THROWS_WITH_AS(symmetric_eigen(ex, view<const double, host_space>(a.v()), w5.v(), view<double, host_space>{}),
                       doctest::Contains("w must be a vector of at most n = 4"), invalid_argument);
  CHECK_THROWS_WITH_AS(
      symmetric_eigen(ex, view<const double, host_space>(a.v()), view<double, host_space>{}, v_bad.v()),
      doctest::Contains("v must be [4, k']"), invalid_argument);
  a(2, 1) = std::numeric_limits<double>::quiet_NaN();
  host_tensor<double> w({4});
  CHECK_THROWS_WITH_AS(symmetric_eigen(ex, view<const double, host_space>(a.v()), w.v(), view<double, host_space>{}),
                       doctest::Contains("did not converge"), invalid_argument);
}

#pragma once
// Dense factorisations of small-to-medium matrices: the orthonormal factor of a thin QR, the thin SVD and the
// eigendecomposition of a symmetric matrix.
//
//   orthonormalize(ex, a, q)     a (rows x cols, rows >= cols) = Q R with diag(R) >= 0; writes Q into q
//   svd(ex, a, s, u, vt)         a (m x n) = U diag(s) V^T, k = min(m, n), singular values descending; writes the
//                                leading s (k' <= k values), u (m x k') and vt (k' x n); an empty view skips it
//   symmetric_eigen(ex, a, w, v) a (n x n, symmetric) = V diag(w) V^T, eigenvalues descending; writes the leading
//                                w (k' <= n values) and v (n x k'); host only
//
// Each is defined by a convention that makes its result unique, so that the host and CUDA implementations
// agree up to rounding:
//   * orthonormalize applies the sign fix Q <- Q diag(sign(diag R)) (sign(0) = +1). For a Gaussian `a` this Q is
//     exactly Haar-distributed on the Stiefel manifold (Mezzadri, "How to generate random matrices from the
//     classical compact groups", 2007); without the fix Householder QR biases every column's first entry.
//   * svd flips each pair (u_j, v_j) so that the largest-magnitude entry of the vector on the shorter side
//     (v_j when m >= n, u_j when m < n; the first such entry on ties) is positive. Singular vectors of a repeated
//     singular value are not unique; callers that need them should not expect host and CUDA to agree there.
//   * symmetric_eigen flips each eigenvector so that its largest-magnitude entry (the first on ties) is positive.
//
// Host (below): the readable reference, in double whatever the element types. orthonormalize is Householder QR
// in serial loop order; svd is one-sided Jacobi (Hestenes) on the shorter side, which computes singular vectors
// to high relative accuracy. Both are O(rows * cols^2) per pass and meant for the matrices an optimizer
// factorises (projectors, gradients of one layer), not for huge ones. symmetric_eigen reduces a to tridiagonal
// form by Householder reflections (4/3 n^3 flops), finds every eigenvalue by implicit QL with Wilkinson's shift
// (O(n^2)), and forms only the k' eigenvectors asked for, from the recorded QL rotations and the reflections
// (O(n^2 k')): for the top 26 eigenvectors of a second-moment matrix (PCA) it takes 0.08 s at n = 512 and 0.6 s at
// n = 1024 on one core, where the SVD's Jacobi sweeps take 3 s and 33 s.
// CUDA (detail/cuda/linalg.cuh, under nvcc): cuSOLVER, geqrf + orgqr in double for orthonormalize and gesvdj in
// fp64 (widened on the device, rounded once to fp32) for svd.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/exact.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"

namespace subspace {

namespace detail {

/// Scratch memory for the duration of one operation on executor Exec: `scratch<Exec, T> s(ex, shape); s.v()`.
/// The host version owns a host tensor; the CUDA version (detail/cuda/linalg.cuh) is stream-ordered
/// (cudaMallocAsync / cudaFreeAsync on ex.stream), so it is cheap to take every step.
template <class Exec, class T>
struct scratch {
  static_assert(dependent_false<Exec>,
                "detail::scratch: no scratch memory for this executor (exec::cuda needs a translation unit "
                "compiled by nvcc, which includes kernels/detail/cuda/linalg.cuh)");
};

template <class T>
struct scratch<exec::host, T> {
  tensor<T, host_space> t;
  scratch(const exec::host&, const shape& s) : t(s) {}
  view<T, host_space> v() { return t.v(); }
};

/// Shape checks shared by the host and CUDA orthonormalize.
template <class VA, class VQ>
void orthonormalize_check(const VA& a, const VQ& q) {
  require(a.rank() == 2 && a.dim(0) >= a.dim(1), [&] {
    return "orthonormalize: a must be rank 2 with at least as many rows as columns, got shape " + to_string(a.shape());
  });
  require_same_shape(a, q, "orthonormalize");
}

/// Shape checks shared by the host and CUDA svd: s (k'), u (m x k'), vt (k' x n), k' <= min(m, n), each optional.
template <class VA, class VS, class VU, class VV>
void svd_check(const VA& a, const VS& s, const VU& u, const VV& vt) {
  require(a.rank() == 2, [&] { return "svd: a must be rank 2, got shape " + to_string(a.shape()); });
  const std::int64_t m = a.dim(0), n = a.dim(1), k = std::min(m, n);
  require(s.data() == nullptr || (s.rank() == 1 && s.dim(0) <= k), [&] {
    return "svd: s must be a vector of at most min(m, n) = " + std::to_string(k) + " elements, got shape " +
           to_string(s.shape());
  });
  require(u.data() == nullptr || (u.rank() == 2 && u.dim(0) == m && u.dim(1) <= k), [&] {
    return "svd: u must be [" + std::to_string(m) + ", k'] with k' <= " + std::to_string(k) + ", got shape " +
           to_string(u.shape());
  });
  require(vt.data() == nullptr || (vt.rank() == 2 && vt.dim(1) == n && vt.dim(0) <= k), [&] {
    return "svd: vt must be [k', " + std::to_string(n) + "] with k' <= " + std::to_string(k) + ", got shape " +
           to_string(vt.shape());
  });
}

namespace linalg_host {

/// A column-major double matrix: element (i, j) at data[j * rows + i].
struct colmajor {
  std::int64_t rows = 0, cols = 0;
  std::vector<double> data;
  colmajor(std::int64_t r, std::int64_t c) : rows(r), cols(c), data(std::size_t(r * c), 0.0) {}
  double* col(std::int64_t j) { return data.data() + j * rows; }
  const double* col(std::int64_t j) const { return data.data() + j * rows; }
  double& operator()(std::int64_t i, std::int64_t j) { return data[std::size_t(j * rows + i)]; }
};

/// How the Householder loops form a * b + c. plain_madd leaves the compiler free to contract it into a fused
/// multiply-add (whether it does depends on the target and the flags); exact_madd is always one correctly rounded
/// fma, so the result is the same bits under every compiler, flag set and CPU (what a basis that every rank
/// builds for itself needs).
struct plain_madd {
  double operator()(double a, double b, double c) const { return a * b + c; }
};
struct exact_madd {
  double operator()(double a, double b, double c) const { return exact::fma(a, b, c); }
};

template <class Madd = plain_madd>
double dot(const double* a, const double* b, std::int64_t n, Madd madd = {}) {
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i) s = madd(a[i], b[i], s);
  return s;
}

/// Q of the thin Householder QR of w (rows x cols, rows >= cols), with the sign fix; w is overwritten.
template <class Madd = plain_madd>
colmajor householder_q(colmajor& w, Madd madd = {}) {
  const std::int64_t rows = w.rows, cols = w.cols;
  colmajor v(rows, cols);  // Householder vectors, unit norm, column k nonzero from row k on (zero: H = I)
  std::vector<double> r_diag(std::size_t(cols), 0.0);
  for (std::int64_t k = 0; k < cols; ++k) {
    double* x = w.col(k) + k;
    const std::int64_t len = rows - k;
    const double norm = std::sqrt(dot(x, x, len, madd));
    if (norm == 0.0) continue;                        // a zero column: H_k = I, R_kk = 0
    const double alpha = x[0] >= 0.0 ? -norm : norm;  // R_kk, of opposite sign to x_0: no cancellation in v_0
    double* vk = v.col(k) + k;
    for (std::int64_t i = 0; i < len; ++i) vk[i] = x[i];
    vk[0] -= alpha;
    const double vnorm = std::sqrt(dot(vk, vk, len, madd));
    for (std::int64_t i = 0; i < len; ++i) vk[i] /= vnorm;
    r_diag[std::size_t(k)] = alpha;
    for (std::int64_t j = k + 1; j < cols; ++j) {  // w[k:, j] <- (I - 2 v v^T) w[k:, j]
      double* wj = w.col(j) + k;
      const double f = 2.0 * dot(vk, wj, len, madd);
      for (std::int64_t i = 0; i < len; ++i) wj[i] = madd(-f, vk[i], wj[i]);
    }
  }
  // Q = H_0 H_1 ... H_{cols-1} [I; 0], accumulated backwards.
  colmajor q(rows, cols);
  for (std::int64_t j = 0; j < cols; ++j) q(j, j) = 1.0;
  for (std::int64_t k = cols - 1; k >= 0; --k) {
    const double* vk = v.col(k) + k;
    const std::int64_t len = rows - k;
    for (std::int64_t j = k; j < cols; ++j) {
      double* qj = q.col(j) + k;
      const double f = 2.0 * dot(vk, qj, len, madd);
      for (std::int64_t i = 0; i < len; ++i) qj[i] = madd(-f, vk[i], qj[i]);
    }
  }
  for (std::int64_t k = 0; k < cols; ++k)
    if (r_diag[std::size_t(k)] < 0.0)
      for (std::int64_t i = 0; i < rows; ++i) q(i, k) = -q(i, k);
  return q;
}

/// One-sided Jacobi on the columns of w (len x count, len >= count): afterwards the columns are mutually
/// orthogonal (w = a V with V orthogonal, accumulated into v, count x count, column-major).
inline void hestenes(colmajor& w, colmajor& v) {
  const std::int64_t len = w.rows, count = w.cols;
  for (std::int64_t j = 0; j < count; ++j) v(j, j) = 1.0;
  constexpr double tol = 1e-15;
  constexpr int max_sweeps = 80;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    bool rotated = false;
    for (std::int64_t p = 0; p + 1 < count; ++p) {
      for (std::int64_t q = p + 1; q < count; ++q) {
        double* wp = w.col(p);
        double* wq = w.col(q);
        const double alpha = dot(wp, wp, len), beta = dot(wq, wq, len), gamma = dot(wp, wq, len);
        if (alpha == 0.0 || beta == 0.0 || std::abs(gamma) <= tol * std::sqrt(alpha * beta)) continue;
        rotated = true;
        // The rotation that makes columns p and q orthogonal, with |t| <= 1 (the smaller root).
        const double zeta = (beta - alpha) / (2.0 * gamma);
        const double t = (zeta >= 0.0 ? 1.0 : -1.0) / (std::abs(zeta) + std::sqrt(1.0 + zeta * zeta));
        const double c = 1.0 / std::sqrt(1.0 + t * t), s = c * t;
        for (std::int64_t i = 0; i < len; ++i) {
          const double a = wp[i], b = wq[i];
          wp[i] = c * a - s * b;
          wq[i] = s * a + c * b;
        }
        double* vp = v.col(p);
        double* vq = v.col(q);
        for (std::int64_t i = 0; i < count; ++i) {
          const double a = vp[i], b = vq[i];
          vp[i] = c * a - s * b;
          vq[i] = s * a + c * b;
        }
      }
    }
    if (!rotated) break;
  }
}

/// -1 when the largest-magnitude entry of x[0..n) (the first on ties) is negative, else +1: the sign convention of
/// svd's and symmetric_eigen's vectors.
inline double largest_entry_sign(const double* x, std::int64_t n) {
  std::int64_t arg = 0;
  for (std::int64_t i = 1; i < n; ++i)
    if (std::abs(x[i]) > std::abs(x[arg])) arg = i;
  return x[arg] < 0.0 ? -1.0 : 1.0;
}

/// Makes column j of `basis` (len x count) a unit vector orthogonal to columns 0..j-1, starting from the first
/// standard basis vector that is not (numerically) in their span. For left singular vectors of zero singular
/// values, which Jacobi leaves at zero.
inline void complete_column(colmajor& basis, std::int64_t j) {
  const std::int64_t len = basis.rows;
  double* c = basis.col(j);
  for (std::int64_t e = 0; e < len; ++e) {
    std::fill(c, c + len, 0.0);
    c[e] = 1.0;
    for (int pass = 0; pass < 2; ++pass)  // Gram-Schmidt twice: orthogonal to working precision
      for (std::int64_t k = 0; k < j; ++k) {
        const double* b = basis.col(k);
        const double f = dot(b, c, len);
        for (std::int64_t i = 0; i < len; ++i) c[i] -= f * b[i];
      }
    const double norm = std::sqrt(dot(c, c, len));
    if (norm > 0.5) {
      for (std::int64_t i = 0; i < len; ++i) c[i] /= norm;
      return;
    }
  }
}

/// Householder reduction of the symmetric a (n x n, its lower triangle read) to tridiagonal T = Q^T a Q:
/// diag[0..n), off[i] = T(i+1, i) for i < n - 1; the reflections stay in a's lower triangle (column k below row
/// k + 1 holds v_k, unit norm, zero for an identity step) so that Q = H_0 H_1 ... H_{n-3}, H_k = I - 2 v_k v_k^T.
inline void tridiagonalize(colmajor& a, std::vector<double>& diag, std::vector<double>& off) {
  const std::int64_t n = a.rows;
  diag.assign(std::size_t(n), 0.0);
  off.assign(std::size_t(std::max<std::int64_t>(n, 1)), 0.0);
  std::vector<double> p(static_cast<std::size_t>(n)), w(static_cast<std::size_t>(n));
  for (std::int64_t k = 0; k + 2 < n; ++k) {
    const std::int64_t len = n - k - 1;  // the trailing block is rows and columns k + 1 .. n - 1
    double* x = a.col(k) + k + 1;
    const double norm = std::sqrt(dot(x, x, len));
    diag[std::size_t(k)] = a(k, k);
    if (norm == 0.0) {  // already zero below the subdiagonal: H_k = I
      off[std::size_t(k)] = 0.0;
      continue;
    }
    const double alpha = x[0] >= 0.0 ? -norm : norm;  // the new subdiagonal entry, no cancellation in v_0
    x[0] -= alpha;
    const double vnorm = std::sqrt(dot(x, x, len));
    for (std::int64_t i = 0; i < len; ++i) x[i] /= vnorm;  // x is now v_k
    off[std::size_t(k)] = alpha;
    // B <- H B H on the trailing block B: with p = B v, w = 2 p - 2 (v^T p) v, B <- B - v w^T - w v^T.
    const std::int64_t o = k + 1;
    std::fill(p.begin(), p.begin() + len, 0.0);
    for (std::int64_t j = 0; j < len; ++j) {  // p = B v from B's lower triangle, column by column
      const double* bj = a.col(o + j) + o;
      double below = 0;
      p[std::size_t(j)] += bj[j] * x[j];
      for (std::int64_t i = j + 1; i < len; ++i) {
        p[std::size_t(i)] += bj[i] * x[j];
        below += bj[i] * x[i];
      }
      p[std::size_t(j)] += below;
    }
    const double vp = dot(x, p.data(), len);
    for (std::int64_t i = 0; i < len; ++i) w[std::size_t(i)] = 2.0 * p[std::size_t(i)] - 2.0 * vp * x[i];
    for (std::int64_t j = 0; j < len; ++j) {
      double* bj = a.col(o + j) + o;
      for (std::int64_t i = j; i < len; ++i) bj[i] -= x[i] * w[std::size_t(j)] + w[std::size_t(i)] * x[j];
    }
  }
  if (n >= 2) {
    diag[std::size_t(n - 2)] = a(n - 2, n - 2);
    off[std::size_t(n - 2)] = a(n - 1, n - 2);
  }
  if (n >= 1) diag[std::size_t(n - 1)] = a(n - 1, n - 1);
}

/// A plane rotation of the QL iteration: the eigenvector matrix Z <- Z G on columns i, i + 1, with
/// G(i, i) = G(i + 1, i + 1) = c, G(i, i + 1) = s, G(i + 1, i) = -s.
struct plane_rotation {
  std::int64_t i;
  double c, s;
};

/// The eigenvalues of the symmetric tridiagonal (diag, off) by implicit QL with Wilkinson's shift, into diag (in
/// no order); every rotation applied is appended to `rotations` (Z = G_1 G_2 ... G_N is then the eigenvector
/// matrix of T, column j belonging to diag[j]). Throws when an eigenvalue does not converge in 60 iterations.
inline void tridiagonal_ql(std::vector<double>& diag, std::vector<double>& off,
                           std::vector<plane_rotation>& rotations) {
  const std::int64_t n = std::int64_t(diag.size());
  if (n == 0) return;
  double* d = diag.data();
  double* e = off.data();
  e[n - 1] = 0.0;
  constexpr double eps = 2.220446049250313e-16;
  for (std::int64_t l = 0; l < n; ++l) {
    for (int iteration = 0;; ++iteration) {
      std::int64_t m = l;
      for (; m + 1 < n; ++m)  // the first negligible off-diagonal entry at or after l splits the matrix
        if (std::abs(e[m]) <= eps * (std::abs(d[m]) + std::abs(d[m + 1]))) break;
      if (m == l) break;
      require(iteration < 60, [&] {
        return "symmetric_eigen: the QL iteration did not converge for eigenvalue " + std::to_string(l) +
               " (the matrix holds a NaN or infinity?)";
      });
      double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
      double r = std::hypot(g, 1.0);
      g = d[m] - d[l] + e[l] / (g + (g >= 0.0 ? r : -r));  // the shift: the eigenvalue of the leading 2 x 2
      double s = 1.0, c = 1.0, p = 0.0;
      std::int64_t i = m - 1;
      for (; i >= l; --i) {
        const double f = s * e[i], b = c * e[i];
        r = std::hypot(f, g);
        e[i + 1] = r;
        if (r == 0.0) {  // underflow: T splits here; undo the partial shift and restart from l
          d[i + 1] -= p;
          e[m] = 0.0;
          break;
        }
        s = f / r;
        c = g / r;
        g = d[i + 1] - p;
        r = (d[i] - g) * s + 2.0 * c * b;
        p = s * r;
        d[i + 1] = g + p;
        g = c * r - b;
        rotations.push_back({i, c, s});
      }
      if (r == 0.0 && i >= l) continue;
      d[l] -= p;
      e[l] = g;
      e[m] = 0.0;
    }
  }
}

}  // namespace linalg_host
}  // namespace detail

/// Q of the thin QR of a (rows x cols, rows >= cols) with the sign fix diag(R) >= 0, written into q (rows x cols,
/// any strides). Householder in double, serial loop order; q's columns are orthonormal even when a is rank
/// deficient. Throws invalid_argument on shapes.
template <class TA, class TQ>
void orthonormalize(const exec::host&, view<TA, host_space> a, view<TQ, host_space> q) {
  static_assert(is_element_v<std::remove_const_t<TA>> && is_element_v<TQ>,
                "orthonormalize: a and q must hold float, double, bf16 or fp16");
  detail::orthonormalize_check(a, q);
  const std::int64_t rows = a.dim(0), cols = a.dim(1);
  detail::linalg_host::colmajor w(rows, cols);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) w(i, j) = convert<double>(std::remove_const_t<TA>(a(i, j)));
  detail::linalg_host::colmajor result = detail::linalg_host::householder_q(w);
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < cols; ++j) q(i, j) = convert<TQ>(result(i, j));
}

/// Thin SVD of a (m x n): a = U diag(s) V^T with k = min(m, n) singular values in descending order. Writes the
/// leading k' of them into s (k' elements), of U into u (m x k') and of V^T into vt (k' x n), for any k' <= k
/// chosen per output; pass an empty view (`{}`) for an output that is not wanted. Sign convention: see the top of
/// this file. One-sided Jacobi in double on the shorter side; left singular vectors of zero singular values are
/// completed to an orthonormal set. Throws invalid_argument on shapes.
template <class TA, class T>
void svd(const exec::host&, view<TA, host_space> a, view<T, host_space> s, view<T, host_space> u,
         view<T, host_space> vt) {
  using detail::linalg_host::colmajor;
  static_assert(is_element_v<std::remove_const_t<TA>> && is_element_v<T>,
                "svd: a and the outputs must hold float, double, bf16 or fp16");
  detail::svd_check(a, s, u, vt);
  const std::int64_t m = a.dim(0), n = a.dim(1), k = std::min(m, n);
  if (k == 0) return;

  // Work on the shorter side: the columns of a when m >= n (len m, count n), else the columns of a^T (the rows).
  const bool tall = m >= n;
  const std::int64_t len = tall ? m : n, count = k;
  colmajor w(len, count);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      const double x = convert<double>(std::remove_const_t<TA>(a(i, j)));
      if (tall) w(i, j) = x;
      else w(j, i) = x;
    }
  colmajor rot(count, count);  // the short-side singular vectors (V when tall, U otherwise)
  detail::linalg_host::hestenes(w, rot);

  std::vector<double> sigma(static_cast<std::size_t>(count));
  for (std::int64_t j = 0; j < count; ++j)
    sigma[std::size_t(j)] = std::sqrt(detail::linalg_host::dot(w.col(j), w.col(j), len));
  std::vector<std::int64_t> order(static_cast<std::size_t>(count));
  std::iota(order.begin(), order.end(), std::int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t x, std::int64_t y) { return sigma[std::size_t(x)] > sigma[std::size_t(y)]; });

  // Sorted short-side vectors (with the sign convention) and long-side vectors w_j / sigma_j.
  colmajor shortv(count, count), longv(len, count);
  for (std::int64_t jj = 0; jj < count; ++jj) {
    const std::int64_t j = order[std::size_t(jj)];
    const double* r = rot.col(j);
    const double sign = detail::linalg_host::largest_entry_sign(r, count);
    for (std::int64_t i = 0; i < count; ++i) shortv(i, jj) = sign * r[i];
    const double sj = sigma[std::size_t(j)];
    if (sj > 0.0)
      for (std::int64_t i = 0; i < len; ++i) longv(i, jj) = sign * w.col(j)[i] / sj;
    else detail::linalg_host::complete_column(longv, jj);
  }
  // tall: U = longv (m x k), V = shortv (n x k); wide: U = shortv (m x k), V = longv (n x k).
  const colmajor& uu = tall ? longv : shortv;
  const colmajor& vv = tall ? shortv : longv;
  if (s.data())
    for (std::int64_t j = 0; j < s.dim(0); ++j) s(j) = convert<T>(sigma[std::size_t(order[std::size_t(j)])]);
  if (u.data())
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < u.dim(1); ++j) u(i, j) = convert<T>(uu.data[std::size_t(j * m + i)]);
  if (vt.data())
    for (std::int64_t j = 0; j < vt.dim(0); ++j)
      for (std::int64_t i = 0; i < n; ++i) vt(j, i) = convert<T>(vv.data[std::size_t(j * n + i)]);
}

/// Eigendecomposition of the symmetric a (n x n; its lower triangle is read): a = V diag(w) V^T, eigenvalues in
/// descending order. Writes the leading k' of them into w (k' elements) and their eigenvectors into v (n x k'), for
/// any k' <= n chosen per output; pass an empty view for an output that is not wanted. Sign convention: see the top
/// of this file. Householder tridiagonalisation and implicit QL in double (see the top of this file); only the
/// eigenvectors asked for are formed. Throws invalid_argument on shapes.
template <class TA, class T>
void symmetric_eigen(const exec::host&, view<TA, host_space> a, view<T, host_space> w, view<T, host_space> v) {
  using detail::linalg_host::colmajor;
  static_assert(is_element_v<std::remove_const_t<TA>> && is_element_v<T>,
                "symmetric_eigen: a and the outputs must hold float, double, bf16 or fp16");
  require(a.rank() == 2 && a.dim(0) == a.dim(1),
          [&] { return "symmetric_eigen: a must be square, got shape " + to_string(a.shape()); });
  const std::int64_t n = a.dim(0);
  require(w.data() == nullptr || (w.rank() == 1 && w.dim(0) <= n), [&] {
    return "symmetric_eigen: w must be a vector of at most n = " + std::to_string(n) + " elements, got shape " +
           to_string(w.shape());
  });
  require(v.data() == nullptr || (v.rank() == 2 && v.dim(0) == n && v.dim(1) <= n), [&] {
    return "symmetric_eigen: v must be [" + std::to_string(n) + ", k'] with k' <= " + std::to_string(n) +
           ", got shape " + to_string(v.shape());
  });
  if (n == 0) return;
  colmajor h(n, n);
  for (std::int64_t j = 0; j < n; ++j)
    for (std::int64_t i = j; i < n; ++i) h(i, j) = convert<double>(std::remove_const_t<TA>(a(i, j)));
  std::vector<double> diag, off;
  detail::linalg_host::tridiagonalize(h, diag, off);
  std::vector<detail::linalg_host::plane_rotation> rotations;
  detail::linalg_host::tridiagonal_ql(diag, off, rotations);
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), std::int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t x, std::int64_t y) { return diag[std::size_t(x)] > diag[std::size_t(y)]; });
  if (w.data())
    for (std::int64_t j = 0; j < w.dim(0); ++j) w(j) = convert<T>(diag[std::size_t(order[std::size_t(j)])]);
  if (!v.data()) return;
  std::vector<double> x(static_cast<std::size_t>(n));
  for (std::int64_t jj = 0; jj < v.dim(1); ++jj) {
    // Column order[jj] of Z = G_1 ... G_N is G_1 (... (G_N e_j)); then Q z = H_0 (... (H_{n-3} z)).
    std::fill(x.begin(), x.end(), 0.0);
    x[std::size_t(order[std::size_t(jj)])] = 1.0;
    for (auto g = rotations.rbegin(); g != rotations.rend(); ++g) {
      const double xi = x[std::size_t(g->i)], xn = x[std::size_t(g->i + 1)];
      x[std::size_t(g->i)] = g->c * xi + g->s * xn;
      x[std::size_t(g->i + 1)] = g->c * xn - g->s * xi;
    }
    for (std::int64_t k = n - 3; k >= 0; --k) {
      const double* vk = h.col(k) + k + 1;
      const std::int64_t len = n - k - 1;
      const double f = 2.0 * detail::linalg_host::dot(vk, x.data() + k + 1, len);
      for (std::int64_t i = 0; i < len; ++i) x[std::size_t(k + 1 + i)] -= f * vk[i];
    }
    const double sign = detail::linalg_host::largest_entry_sign(x.data(), n);
    for (std::int64_t i = 0; i < n; ++i) v(i, jj) = convert<T>(sign * x[std::size_t(i)]);
  }
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/linalg.cuh"
#endif

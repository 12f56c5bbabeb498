#pragma once
// Low-rank gradient projectors for GaLore and GoLore (guide: docs/galore.md).
//
// A projected weight W has shape m x n (out x in) and rank r <= min(m, n). The side is chosen by shape:
//
//   m >= n  right   P (r x n), P P^T = I_r    R = G P^T (m x r)    back_project(N) = N P      moments m x r
//   m <  n  left    P (m x r), P^T P = I_r    R = P^T G (r x n)    back_project(N) = P N      moments r x n
//
// Projectors:
//   galore_projector   the top-r singular vectors of the gradient (right: rows of V^T; left: columns of U), with
//                      kernels/linalg.hpp's sign convention (the largest-magnitude entry of each vector positive)
//   golore_projector   Haar-random: a Gaussian Omega (short side x r) from the portable Philox normal, then the Q
//                      of its thin QR with the sign fix; right: P = Q^T, left: P = Q. Element idx (row-major) of
//                      Omega is lane idx % 4 of rng::normal4(seed, offset, block) with
//                        block  = (param_id << 32) | (idx / 4)      counter words (idx/4, param_id,
//                        offset = (golore_stream << 32) | refresh_id                   refresh_id, STREAM_GOLORE)
//                      so it depends on nothing but (seed, param_id, refresh_id): every rank and both executors
//                      draw the same Omega bit for bit, and Q agrees to rounding.
//
// project, back_project_add and reproject_first_moment are GEMMs on any executor (fp32 accumulate on CUDA; in
// the element type on the host, so the host runs them in double for the exactness tests). On CUDA the operands
// of one GEMM share the element type (fp32): cast bf16 gradients first.
//
// Everything here works on views in the executor's memory space; the CUDA overloads of the Gaussian fill come
// from optim/detail/cuda/projector.cuh under nvcc.

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/rng.hpp"
#include "../core/tensor.hpp"
#include "../kernels/gemm.hpp"
#include "../kernels/linalg.hpp"

namespace subspace::optim {

/// Which side of W the projector multiplies: right (m >= n, P is r x n) or left (m < n, P is m x r).
enum class projection_side { right, left };

inline const char* to_string(projection_side s) { return s == projection_side::right ? "right" : "left"; }

/// The geometry of one projected matrix W (rows x cols) at rank r.
struct projection {
  std::int64_t rows = 0, cols = 0, rank = 0;
  projection_side side = projection_side::right;

  std::int64_t long_dim() const { return std::max(rows, cols); }
  std::int64_t short_dim() const { return std::min(rows, cols); }
  /// P: r x n on the right, m x r on the left.
  shape projector_shape() const { return side == projection_side::right ? shape{rank, cols} : shape{rows, rank}; }
  /// The projected gradient R and the moments M, V: m x r on the right, r x n on the left.
  shape moment_shape() const { return side == projection_side::right ? shape{rows, rank} : shape{rank, cols}; }
  /// The Gaussian Omega and its Q: short side x r (Q = P^T on the right, Q = P on the left).
  shape omega_shape() const { return shape{short_dim(), rank}; }
  /// fp32 values of optimizer state per matrix: M and V (2 max(m, n) r) and P (r min(m, n)).
  std::int64_t state_floats() const { return 2 * long_dim() * rank + rank * short_dim(); }
};

/// The projection of an m x n matrix at rank r: the side by shape (table above). Throws invalid_argument unless
/// 1 <= r <= min(m, n).
inline projection make_projection(std::int64_t rows, std::int64_t cols, std::int64_t rank) {
  require(rows >= 1 && cols >= 1, [&] {
    return "projection: the matrix must be non-empty, got " + std::to_string(rows) + " x " + std::to_string(cols);
  });
  require(rank >= 1 && rank <= std::min(rows, cols), [&] {
    return "projection: rank r = " + std::to_string(rank) +
           " must satisfy 1 <= r <= min(m, n) = " + std::to_string(std::min(rows, cols)) + " for a " +
           std::to_string(rows) + " x " + std::to_string(cols) + " matrix";
  });
  return projection{rows, cols, rank, rows >= cols ? projection_side::right : projection_side::left};
}

/// The fourth Philox counter word of GoLore's Gaussian draws ("GOLR"): keeps them apart from every other stream.
inline constexpr std::uint32_t golore_stream = 0x474f4c52u;

/// A parameter's id in GoLore's Philox counter: the 32-bit FNV-1a hash of its name, so that every rank derives
/// the same id from the same name without coordination.
inline std::uint32_t param_id_of(std::string_view name) {
  std::uint32_t h = 2166136261u;
  for (const char c : name) {
    h ^= std::uint32_t(static_cast<unsigned char>(c));
    h *= 16777619u;
  }
  return h;
}

namespace detail {

/// The four Gaussian draws of GoLore's Philox block `b` (elements 4b .. 4b + 3 of Omega, row-major).
SUBSPACE_HD inline void golore_normal4(std::uint64_t seed, std::uint32_t param_id, std::uint64_t refresh_id,
                                       std::uint64_t b, float out[4]) {
  const std::uint64_t block = (std::uint64_t(param_id) << 32) | (b & 0xffffffffull);
  const std::uint64_t offset = (std::uint64_t(golore_stream) << 32) | (refresh_id & 0xffffffffull);
  rng::normal4(seed, offset, block, 0.0f, 1.0f, out);
}

/// Omega's limits: idx / 4 and refresh_id must fit their 32-bit counter words.
inline void golore_check(const projection& p, std::uint64_t refresh_id) {
  require(std::uint64_t(p.short_dim() * p.rank) <= (std::uint64_t(1) << 34), [&] {
    return "golore_projector: Omega has " + std::to_string(p.short_dim() * p.rank) +
           " elements, more than the 2^34 the Philox counter addresses";
  });
  require(refresh_id <= 0xffffffffull, [&] {
    return "golore_projector: refresh_id " + std::to_string(refresh_id) + " exceeds the 32-bit counter word";
  });
}

template <class V>
void require_projector_shape(const projection& p, const V& P, const char* who) {
  require(P.shape() == p.projector_shape(), [&] {
    return std::string(who) + ": P has shape " + to_string(P.shape()) + ", the " + to_string(p.side) +
           " projector of a " + std::to_string(p.rows) + " x " + std::to_string(p.cols) + " matrix at rank " +
           std::to_string(p.rank) + " is " + to_string(p.projector_shape());
  });
}

}  // namespace detail

/// Omega (short side x r, row-major, any strides) <- GoLore's Gaussian draws for (seed, param_id, refresh_id).
template <class T>
void golore_gaussian(const exec::host&, const projection& p, std::uint64_t seed, std::uint32_t param_id,
                     std::uint64_t refresh_id, view<T, host_space> omega) {
  detail::golore_check(p, refresh_id);
  require(omega.shape() == p.omega_shape(), [&] {
    return "golore_gaussian: Omega has shape " + to_string(omega.shape()) + ", expected " + to_string(p.omega_shape());
  });
  const std::int64_t total = p.short_dim() * p.rank;
  float draws[4] = {};
  for (std::int64_t idx = 0; idx < total; ++idx) {
    if (idx % 4 == 0) detail::golore_normal4(seed, param_id, refresh_id, std::uint64_t(idx / 4), draws);
    omega(idx / p.rank, idx % p.rank) = T(draws[idx % 4]);
  }
}

/// P <- GoLore's Haar-random projector for (seed, param_id, refresh_id): Q of Omega's thin QR with the sign fix,
/// transposed on the right side. Any executor (the Gaussian fill and the QR have host and CUDA versions).
template <class Exec, class T>
void golore_projector(const Exec& ex, const projection& p, std::uint64_t seed, std::uint32_t param_id,
                      std::uint64_t refresh_id, view<T, space_of_t<Exec>> P) {
  detail::require_projector_shape(p, P, "golore_projector");
  subspace::detail::scratch<Exec, float> omega(ex, p.omega_shape());
  golore_gaussian(ex, p, seed, param_id, refresh_id, omega.v());
  orthonormalize(ex, view<const float, space_of_t<Exec>>(omega.v()),
                 p.side == projection_side::right ? P.transposed() : P);
}

/// P <- GaLore's projector from the gradient G (rows x cols): the top-r right singular vectors as rows (right
/// side) or left singular vectors as columns (left side). Any executor (host: Jacobi in double; CUDA: gesvdj in
/// fp64 on float or bf16 G, rounded to fp32).
template <class Exec, class G, class T>
void galore_projector(const Exec& ex, const projection& p, view<G, space_of_t<Exec>> grad,
                      view<T, space_of_t<Exec>> P) {
  using S = space_of_t<Exec>;
  require(grad.rank() == 2 && grad.dim(0) == p.rows && grad.dim(1) == p.cols, [&] {
    return "galore_projector: the gradient has shape " + to_string(grad.shape()) + ", the projection is " +
           std::to_string(p.rows) + " x " + std::to_string(p.cols);
  });
  detail::require_projector_shape(p, P, "galore_projector");
  if (p.side == projection_side::right) svd(ex, grad, view<T, S>{}, view<T, S>{}, P);
  else svd(ex, grad, view<T, S>{}, P, view<T, S>{});
}

/// R <- G P^T (right, m x r) or P^T G (left, r x n).
template <class Exec, class G, class TP, class TR>
void project(const Exec& ex, const projection& p, view<G, space_of_t<Exec>> grad, view<TP, space_of_t<Exec>> P,
             view<TR, space_of_t<Exec>> R) {
  detail::require_projector_shape(p, P, "project");
  require(R.shape() == p.moment_shape(),
          [&] { return "project: R has shape " + to_string(R.shape()) + ", expected " + to_string(p.moment_shape()); });
  if (p.side == projection_side::right) gemm(ex, op::none, op::transpose, 1.0f, grad, P, 0.0f, R);
  else gemm(ex, op::transpose, op::none, 1.0f, P, grad, 0.0f, R);
}

/// W <- W + N P (right) or W + P N (left): the back-projection of N (moment-shaped), added to W.
template <class Exec, class TN, class TP, class TW>
void back_project_add(const Exec& ex, const projection& p, view<TN, space_of_t<Exec>> N, view<TP, space_of_t<Exec>> P,
                      view<TW, space_of_t<Exec>> W) {
  detail::require_projector_shape(p, P, "back_project_add");
  require(N.shape() == p.moment_shape(), [&] {
    return "back_project_add: N has shape " + to_string(N.shape()) + ", expected " + to_string(p.moment_shape());
  });
  require(W.rank() == 2 && W.dim(0) == p.rows && W.dim(1) == p.cols, [&] {
    return "back_project_add: W has shape " + to_string(W.shape()) + ", the projection is " + std::to_string(p.rows) +
           " x " + std::to_string(p.cols);
  });
  if (p.side == projection_side::right) gemm(ex, op::none, op::none, 1.0f, N, P, 1.0f, W);
  else gemm(ex, op::none, op::none, 1.0f, P, N, 1.0f, W);
}

/// Maps the first moment M into a new basis (docs/galore.md, "The projector refresh"): M <- M (P_old P_new^T) on the
/// right, M <- (P_new^T P_old) M on the left. One r x r product and one GEMM (through scratch).
template <class Exec, class TP, class TM>
void reproject_first_moment(const Exec& ex, const projection& p, view<TP, space_of_t<Exec>> p_old,
                            view<TP, space_of_t<Exec>> p_new, view<TM, space_of_t<Exec>> M) {
  using T = std::remove_const_t<TM>;
  detail::require_projector_shape(p, p_old, "reproject_first_moment");
  detail::require_projector_shape(p, p_new, "reproject_first_moment");
  require(M.shape() == p.moment_shape(), [&] {
    return "reproject_first_moment: M has shape " + to_string(M.shape()) + ", expected " + to_string(p.moment_shape());
  });
  subspace::detail::scratch<Exec, T> change(ex, {p.rank, p.rank}), out(ex, p.moment_shape());
  if (p.side == projection_side::right) {
    gemm(ex, op::none, op::transpose, 1.0f, p_old, p_new, 0.0f, change.v());
    gemm(ex, op::none, op::none, 1.0f, M, change.v(), 0.0f, out.v());
  } else {
    gemm(ex, op::transpose, op::none, 1.0f, p_new, p_old, 0.0f, change.v());
    gemm(ex, op::none, op::none, 1.0f, change.v(), M, 0.0f, out.v());
  }
  copy(ex, out.v(), M);
}

}  // namespace subspace::optim

#if defined(__CUDACC__)
#include "detail/cuda/projector.cuh"
#endif

#pragma once
// The fixed k-dimensional subspace of a subspace network's residual stream (docs/subspace-networks.md): its basis
// U, and the maps between rows x of the stream and their coefficients c, where x = E_fix[t] + c·Uᵀ.
//
//   make_subspace_basis(d, k, seed) -> U [d, k] fp32, UᵀU ≈ I_k      host only; the same bits on every machine
//   subspace_basis_fp64(U) -> [d, k] fp64                             span(U), orthonormal to fp64 precision
//   subspace_basis_hash(U)                                            FNV-1a over U's fp32 values, row-major
//   subspace_rebuild(ex, fixed, tokens[N], c[N, k], U, x[N, d])        x = E_fix[tokens] + c·Uᵀ
//   subspace_project(ex, fixed, tokens[N], x[N, d], U, c[N, k])        c = (x - E_fix[tokens])·U
//   subspace_coefficients(ex, dx[N, d], U, g[N, k])                    g = dx·U      (gradients: dL/dc from dL/dx)
//   subspace_expand(ex, g[N, k], U, dx[N, d])                          dx = g·Uᵀ
//
// The basis. G [d, k] holds normal draws G[i, j] = rng::normal_at(seed, subspace_basis_offset, i·k + j), i.e.
// Philox counter words ((i·k + j) / 4, 0, 0, "SSNU"). U is the Q factor of G's thin QR: Householder in fp64 in a
// fixed serial loop order with every a·b + c one correctly rounded fma (kernels/linalg.hpp's exact_madd, so no
// compiler contraction can change a bit), the sign fix R_jj > 0, then rounded to fp32. Built from IEEE-exact
// operations only, U is bit-identical on every rank and in every build; ranks compare subspace_basis_hash(U) at
// start-up to prove it.
//
// Operands: tokens int32; x, c, dx and g in T (host: float or double; CUDA: float or bf16), written (never
// accumulated); x and c contiguous, dx and g with any strides gemm accepts (contiguous for bf16 on CUDA); U [d, k] with
// any strides, fp32 (on the host also fp64: float64 activations use subspace_basis_fp64(U), for which UᵀU = I holds to
// fp64 precision); E_fix as in fixed_embedding.hpp. Sums accumulate in accum_t<T>. Token ids outside [0, V) raise
// invalid_argument naming the row (token_check: see fixed_embedding.hpp).
//
// Host (below): the readable reference. rebuild writes the E_fix rows into x, then adds c·Uᵀ with gemm; project
// subtracts the E_fix rows from x into a scratch [N, d] and multiplies it by U with gemm; the gradient maps are
// gemms. CUDA (detail/cuda/subspace_projection.cuh): rebuild is one fused kernel; see there.

#include <cstdint>
#include <string>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/hash.hpp"
#include "../core/tensor.hpp"
#include "detail/layer_checks.hpp"
#include "fixed_embedding.hpp"
#include "gemm.hpp"
#include "linalg.hpp"
#include "random.hpp"

namespace subspace {

/// The fourth Philox counter word of the basis draws ("SSNU").
inline constexpr std::uint32_t subspace_basis_stream = 0x53534e55u;
/// The Philox offset of the basis draws: (subspace_basis_stream << 32); the low word is free for a future
/// basis version.
inline constexpr std::uint64_t subspace_basis_offset = std::uint64_t(subspace_basis_stream) << 32;

/// U [d, k] fp32 with UᵀU = I_k: the sign-fixed Q of the Householder QR of k Gaussian columns (top of this file).
/// Requires 1 <= k <= d.
inline host_tensor<float> make_subspace_basis(std::int64_t d, std::int64_t k, std::uint64_t seed) {
  require(d >= 1 && k >= 1 && k <= d, [&] {
    return "make_subspace_basis: need 1 <= k <= d, got d = " + std::to_string(d) + ", k = " + std::to_string(k);
  });
  host_tensor<float> draws({d, k});
  fill_normal(exec::host{}, draws.v(), seed, subspace_basis_offset);
  detail::linalg_host::colmajor w(d, k);
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < k; ++j) w(i, j) = double(draws(i, j));
  const detail::linalg_host::colmajor q = detail::linalg_host::householder_q(w, detail::linalg_host::exact_madd{});
  host_tensor<float> basis({d, k});
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < k; ++j) basis(i, j) = float(q.data[std::size_t(j * d + i)]);
  return basis;
}

/// The fp64 orthonormal basis of span(U) for an fp32 basis U: the sign-fixed Q of U's Householder QR in fp64
/// (exact_madd again). An fp32 U is orthonormal only to its rounding (UᵀU = I to ~1e-7); this basis spans the
/// same subspace to fp64 precision, differs from U by about that rounding, and satisfies QᵀQ = I to ~1e-16. The
/// fp64 paths use it, so their exactness checks see the identities exactly.
inline host_tensor<double> subspace_basis_fp64(view<const float, host_space> basis) {
  require(basis.rank() == 2 && basis.dim(1) >= 1 && basis.dim(1) <= basis.dim(0), [&] {
    return "subspace_basis_fp64: basis must be [d, k] with 1 <= k <= d, got shape " + to_string(basis.shape());
  });
  const std::int64_t d = basis.dim(0), k = basis.dim(1);
  detail::linalg_host::colmajor w(d, k);
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < k; ++j) w(i, j) = double(basis(i, j));
  const detail::linalg_host::colmajor q = detail::linalg_host::householder_q(w, detail::linalg_host::exact_madd{});
  host_tensor<double> out({d, k});
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t j = 0; j < k; ++j) out(i, j) = q.data[std::size_t(j * d + i)];
  return out;
}

/// FNV-1a (core/hash.hpp) over the fp32 values of U in row-major order.
inline std::uint64_t subspace_basis_hash(view<const float, host_space> basis) {
  fnv1a_64 h;
  for_each_offset(basis.shape(), basis.strides(), basis.strides(),
                  [&](std::int64_t at, std::int64_t) { h.add_float(basis.data()[at]); });
  return h.value();
}

namespace detail::subspace_projection {

/// Shapes and layouts of rebuild and project: tokens [N], rows [N, d], coeffs [N, k], basis [d, k], a fixed
/// embedding of width d.
template <class S, class Tok, class Rows, class Coeffs, class Basis>
void check(const char* op, const subspace::fixed_embedding<S>& fixed, const Tok& tokens, const Rows& rows,
           const Coeffs& coeffs, const Basis& basis) {
  namespace L = detail::layer;
  detail::fixed_embedding::check_rows(tokens, rows, op, "x");
  L::require_rank(basis, 2, op, "basis");
  L::require_shape(coeffs, shape{rows.dim(0), basis.dim(1)}, op, "coefficients");
  L::require_contiguous(coeffs, op, "coefficients");
  require(basis.dim(0) == rows.dim(1), [&] {
    return std::string(op) + ": basis has shape " + to_string(basis.shape()) + ", x has rows of width " +
           std::to_string(rows.dim(1));
  });
  detail::fixed_embedding::check(fixed, rows.dim(1), op);
}

/// Shapes of the gradient maps: wide [N, d], narrow [N, k], basis [d, k] (strides are gemm's business).
template <class Wide, class Narrow, class Basis>
void check_product(const char* op, const Wide& wide, const Narrow& narrow, const Basis& basis) {
  namespace L = detail::layer;
  L::require_rank(wide, 2, op, "dx");
  L::require_rank(basis, 2, op, "basis");
  L::require_shape(basis, shape{wide.dim(1), basis.dim(1)}, op, "basis");
  L::require_shape(narrow, shape{wide.dim(0), basis.dim(1)}, op, "g");
}

template <class T>
inline constexpr bool host_type_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <class T, class B>
constexpr void static_check_host() {
  static_assert(host_type_v<T>, "subspace maps (host): x, dx, the coefficients and g must be float or double");
  static_assert(host_type_v<std::remove_const_t<B>>, "subspace maps (host): the basis must be float or double");
}

}  // namespace detail::subspace_projection

/// x[n, :] = E_fix[tokens[n], :] + coeffs[n, :]·basisᵀ. T and the basis float or double.
template <class T, class B>
void subspace_rebuild(const exec::host& ex, const fixed_embedding<host_space>& fixed,
                      view<const std::int32_t, host_space> tokens,
                      std::type_identity_t<view<const T, host_space>> coeffs, view<B, host_space> basis,
                      view<T, host_space> x, token_check = token_check::raise) {
  detail::subspace_projection::static_check_host<T, B>();
  detail::subspace_projection::check("subspace_rebuild", fixed, tokens, x, coeffs, basis);
  fixed_embedding_rows(ex, fixed, tokens, x);                       // exact: E_fix is fp32
  gemm(ex, op::none, op::transpose, 1.0f, coeffs, basis, 1.0f, x);  // x += c·Uᵀ
}

/// coeffs[n, :] = (x[n, :] - E_fix[tokens[n], :])·basis. T and the basis float or double.
template <class T, class B>
void subspace_project(const exec::host& ex, const fixed_embedding<host_space>& fixed,
                      view<const std::int32_t, host_space> tokens, std::type_identity_t<view<const T, host_space>> x,
                      view<B, host_space> basis, view<T, host_space> coeffs, token_check = token_check::raise) {
  detail::subspace_projection::static_check_host<T, B>();
  detail::subspace_projection::check("subspace_project", fixed, tokens, x, coeffs, basis);
  host_tensor<T> residual(x.shape());
  fixed_embedding_rows(ex, fixed, tokens, residual.v());
  for (std::int64_t i = 0; i < residual.numel(); ++i) residual.data()[i] = x.data()[i] - residual.data()[i];
  gemm(ex, op::none, op::none, 1.0f, residual.v(), basis, 0.0f, coeffs);
}

/// g = dx·basis: the gradient with respect to the coefficients of x = E_fix + c·Uᵀ.
template <class T, class B>
void subspace_coefficients(const exec::host& ex, std::type_identity_t<view<const T, host_space>> dx,
                           view<B, host_space> basis, view<T, host_space> g) {
  detail::subspace_projection::static_check_host<T, B>();
  detail::subspace_projection::check_product("subspace_coefficients", dx, g, basis);
  gemm(ex, op::none, op::none, 1.0f, dx, basis, 0.0f, g);
}

/// dx = g·basisᵀ: the gradient with respect to x of c = (x - E_fix)·U.
template <class T, class B>
void subspace_expand(const exec::host& ex, std::type_identity_t<view<const T, host_space>> g, view<B, host_space> basis,
                     view<T, host_space> dx) {
  detail::subspace_projection::static_check_host<T, B>();
  detail::subspace_projection::check_product("subspace_expand", dx, g, basis);
  gemm(ex, op::none, op::transpose, 1.0f, g, basis, 0.0f, dx);
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/subspace_projection.cuh"
#endif

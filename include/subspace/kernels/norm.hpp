#pragma once
// RMSNorm (docs/llama-kernels.md), row by row over x[N, d]:
//
//   rmsnorm_forward(ex, x, weight[d], eps, y, rstd[N])       rstd = 1 / sqrt(mean(x^2) + eps),  y = x * rstd * weight
//   rmsnorm_backward(ex, x, weight, rstd, dy, dx, dweight, beta = 0)
//                                                            dx = beta * dx + ∂x (beta 0: dx is not read), dweight +=
//
// With x̂ = x * rstd and g = dy * weight, the backward of one row is
//   dx = rstd * (g - x̂ * mean(g * x̂)),      dweight += dy * x̂   (summed over the rows).
//
// beta 1 adds the input gradient into a residual stream's gradient in the same pass (no separate add, and one
// rounding to T instead of two). x, weight, y, dy, dx in T; rstd in A = accum_t<T> (the saved statistic); dweight
// in G. Host: the readable reference in A, on the calling thread. CUDA (detail/cuda/norm.cuh): a row held in
// registers by one warp (or a few, for wide rows), bf16 or fp32 in and out with fp32 statistics.

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor.hpp"
#include "detail/layer_checks.hpp"

namespace subspace {

namespace detail::norm {

/// Shapes and layouts shared by both executors: x [N, d], weight [d], rstd [N], and more [N, d] `rows`.
template <class X, class W, class R, class... Rows>
void check(const char* op, const X& x, const W& weight, const R& rstd, const detail::layer::operand<Rows>&... rows) {
  namespace L = detail::layer;
  L::require_rank(x, 2, op, "x");
  L::require_shape(weight, shape{x.dim(1)}, op, "weight");
  L::require_shape(rstd, shape{x.dim(0)}, op, "rstd");
  L::require_contiguous(x, op, "x");
  L::require_contiguous(weight, op, "weight");
  L::require_contiguous(rstd, op, "rstd");
  L::require_all(x.shape(), op, rows...);
}

}  // namespace detail::norm

/// y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps) per row; rstd is saved for the backward pass.
template <class T>
  requires is_element_v<T>
void rmsnorm_forward(const exec::host& ex, std::type_identity_t<view<const T, host_space>> x,
                     std::type_identity_t<view<const T, host_space>> weight, float eps, view<T, host_space> y,
                     std::type_identity_t<view<accum_t<T>, host_space>> rstd) {
  using A = accum_t<T>;
  detail::norm::check("rmsnorm_forward", x, weight, rstd, detail::layer::operand{y, "y"});
  require(eps > 0.0f, "rmsnorm_forward: eps must be positive");
  const std::int64_t n = x.dim(0), d = x.dim(1);
  // Rows are independent and each is computed the same way on any thread.
  parallel_for(for_flops(ex, 4.0 * double(n * d)), n, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t i = first; i < last; ++i) {
      const T* xr = x.data() + i * d;
      T* yr = y.data() + i * d;
      A ss = 0;
      for (std::int64_t j = 0; j < d; ++j) ss += A(xr[j]) * A(xr[j]);
      const A r = A(1) / std::sqrt(ss / A(d) + A(eps));
      rstd.data()[i] = r;
      for (std::int64_t j = 0; j < d; ++j) yr[j] = convert<T>(A(xr[j]) * r * A(weight.data()[j]));
    }
  });
}

/// dx = beta * dx + rstd * (dy*weight - x̂ * mean(dy*weight*x̂)) (beta 0: dx is only written) and
/// dweight += sum over rows of dy * x̂.
template <class T, class G>
  requires(is_element_v<T> && is_element_v<G>)
void rmsnorm_backward(const exec::host&, std::type_identity_t<view<const T, host_space>> x,
                      std::type_identity_t<view<const T, host_space>> weight,
                      std::type_identity_t<view<const accum_t<T>, host_space>> rstd,
                      std::type_identity_t<view<const T, host_space>> dy, view<T, host_space> dx,
                      view<G, host_space> dweight, float beta = 0.0f) {
  using A = accum_t<T>;
  using AG = std::conditional_t<std::is_same_v<accum_t<G>, double>, double, A>;
  detail::norm::check("rmsnorm_backward", x, weight, rstd, detail::layer::operand{dy, "dy"},
                      detail::layer::operand{dx, "dx"});
  detail::layer::require_shape(dweight, weight.shape(), "rmsnorm_backward", "dweight");
  detail::layer::require_contiguous(dweight, "rmsnorm_backward", "dweight");
  const std::int64_t n = x.dim(0), d = x.dim(1);
  std::vector<AG> dw(std::size_t(d), AG(0));
  for (std::int64_t i = 0; i < n; ++i) {
    const T* xr = x.data() + i * d;
    const T* dyr = dy.data() + i * d;
    T* dxr = dx.data() + i * d;
    const A r = rstd.data()[i];
    A dot = 0;  // sum of g * x̂
    for (std::int64_t j = 0; j < d; ++j) dot += A(dyr[j]) * A(weight.data()[j]) * (A(xr[j]) * r);
    const A c = dot / A(d);
    for (std::int64_t j = 0; j < d; ++j) {
      const A xhat = A(xr[j]) * r;
      const A grad = r * (A(dyr[j]) * A(weight.data()[j]) - xhat * c);
      dxr[j] = convert<T>(beta == 0.0f ? grad : A(beta) * A(dxr[j]) + grad);
      dw[std::size_t(j)] += AG(A(dyr[j]) * xhat);
    }
  }
  for (std::int64_t j = 0; j < d; ++j) dweight.data()[j] = convert<G>(AG(dweight.data()[j]) + dw[std::size_t(j)]);
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/norm.cuh"
#endif

#pragma once
// The subspace maps on CUDA (see subspace_projection.hpp), T = float or bf16, ordered on ex.stream.
//
//   rebuild      one fused kernel, no E_fix table needed: a thread owns a quad (four columns) of `rows_per_thread`
//                rows, regenerates E_fix[t, quad] with one normal4 call per row (or reads the materialised table)
//                and adds sum_p c[n, p]·U[quad, p] in fp32 (fma, p ascending), then rounds once to T. The basis
//                is read through its strides; pass the transposed view of a contiguous [k, d] copy, so a warp's
//                loads of U[quad, p] are contiguous (the compressor does).
//   project      a fused kernel writes x - E_fix[t] in fp32 into a scratch [N, d]; an fp32 gemm multiplies it by
//                U (into c directly for float, through an fp32 scratch [N, k] and a cast for bf16). The difference
//                stays fp32 even for bf16 x, so c carries no bf16 rounding of x - E_fix.
//   coefficients gemm dx·U (fp32); bf16 dx is cast to an fp32 scratch first, so U is never rounded to bf16.
//   expand       gemm g·Uᵀ for float; for bf16 the rebuild kernel without the E_fix term (fp32 accumulation).
//                float dx and g may have any strides gemm accepts (a unit stride in one dimension); bf16 ones must
//                be contiguous.
//
// Token ids: see fixed_embedding.cuh (token_check::raise synchronizes ex.stream once per call).

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../../core/cuda/memory.cuh"
#include "../../elementwise.hpp"
#include "../../gemm.hpp"
#include "../../subspace_projection.hpp"
#include "fixed_embedding.cuh"

namespace subspace {
namespace cuda_detail::subspace_projection {

inline constexpr int rows_per_thread = 4;
inline constexpr int quad_threads = 128;

template <class T>
inline constexpr bool activation_v = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

/// x[n, 4q + i] = T(E_fix[t_n, 4q + i] (when AddFixed) + sum_p coeffs[n, p] · basis[4q + i, p]), for the quad q
/// of this thread and R rows per step of a grid-stride loop over row groups (blockIdx.y).
template <bool AddFixed, bool FromTable, int R, class T>
__global__ void rebuild_kernel(std::int64_t n, std::int64_t d, std::int64_t k, const std::int32_t* tokens,
                               std::int64_t vocab, std::uint64_t seed, const float* table, const T* coeffs,
                               const float* basis, std::int64_t basis_row, std::int64_t basis_col, T* x,
                               unsigned long long* bad) {
  const std::int64_t q = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (4 * q >= d) return;
  const int live = int(d - 4 * q < 4 ? d - 4 * q : 4);  // columns of this quad inside the row
  for (std::int64_t first = std::int64_t(blockIdx.y) * R; first < n; first += std::int64_t(gridDim.y) * R) {
    float acc[R][4];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][i] = 0.0f;
      if constexpr (AddFixed) {
        if (first + r < n) {
          const std::int32_t t = fixed_embedding::checked_token(tokens, first + r, vocab, q == 0, bad);
          if (t >= 0) {
            fixed_embedding::quad<FromTable>(seed, table, d, t, q, acc[r]);
          } else {
            for (int i = 0; i < 4; ++i) acc[r][i] = NAN;  // a bad id (token_check::trust): the row shows it
          }
        }
      }
    }
    for (std::int64_t p = 0; p < k; ++p) {
      float u[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) u[i] = i < live ? basis[(4 * q + i) * basis_row + p * basis_col] : 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const std::int64_t row = first + r < n ? first + r : n - 1;  // rows past the end compute and drop
        const float c = float(coeffs[row * k + p]);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[r][i] = __fmaf_rn(c, u[i], acc[r][i]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (first + r >= n) break;
      for (int i = 0; i < live; ++i) x[(first + r) * d + 4 * q + i] = T(acc[r][i]);
    }
  }
}

/// Launches rebuild_kernel over x [n, d] (shapes checked by the caller).
template <bool AddFixed, class T>
void launch_rebuild(const exec::cuda& ex, const subspace::fixed_embedding<device_space>* fixed,
                    const std::int32_t* tokens, const T* coeffs, view<const float, device_space> basis,
                    view<T, device_space> x, unsigned long long* bad) {
  constexpr int R = rows_per_thread;
  const std::int64_t n = x.dim(0), d = x.dim(1), k = basis.dim(1);
  const std::int64_t quads = (d + 3) / 4, groups = (n + R - 1) / R;
  const dim3 grid(unsigned((quads + quad_threads - 1) / quad_threads), unsigned(std::min<std::int64_t>(groups, 65535)));
  const std::int64_t vocab = fixed ? fixed->vocab : 0;
  const std::uint64_t seed = fixed ? fixed->seed : 0;
  const float* table = fixed && fixed->materialised() ? fixed->table.data() : nullptr;
  if (table != nullptr)
    rebuild_kernel<AddFixed, true, R><<<grid, quad_threads, 0, ex.stream>>>(
        n, d, k, tokens, vocab, seed, table, coeffs, basis.data(), basis.stride(0), basis.stride(1), x.data(), bad);
  else
    rebuild_kernel<AddFixed, false, R><<<grid, quad_threads, 0, ex.stream>>>(
        n, d, k, tokens, vocab, seed, table, coeffs, basis.data(), basis.stride(0), basis.stride(1), x.data(), bad);
  cuda_check_launch();
}

/// The bf16 gradient maps address dx and g as flat rows.
template <class Wide, class Narrow>
void require_contiguous_rows(const char* op, const Wide& dx, const Narrow& g) {
  detail::layer::require_contiguous(dx, op, "dx (bf16 on CUDA)");
  detail::layer::require_contiguous(g, op, "g (bf16 on CUDA)");
}

/// An fp32 scratch tensor of shape s on ex.stream (stream-ordered allocation).
struct fp32_scratch {
  cuda_detail::stream_scratch memory;
  shape dims;
  fp32_scratch(const exec::cuda& ex, const shape& s)
      : memory(std::size_t(s.numel()) * sizeof(float), ex.stream), dims(s) {}
  view<float, device_space> v() const { return view<float, device_space>(memory.as<float>(), dims); }
};

/// out = a·basis (fp32 gemm): into out directly when T is float, else through an fp32 scratch and a cast.
template <class T>
void times_basis(const exec::cuda& ex, view<const float, device_space> a, view<const float, device_space> basis,
                 view<T, device_space> out) {
  if constexpr (std::is_same_v<T, float>) {
    gemm(ex, op::none, op::none, 1.0f, a, basis, 0.0f, out);
  } else {
    fp32_scratch product(ex, out.shape());
    gemm(ex, op::none, op::none, 1.0f, a, basis, 0.0f, product.v());
    cast(ex, view<const float, device_space>(product.v()), out);
  }
}

}  // namespace cuda_detail::subspace_projection

/// x[n, :] = E_fix[tokens[n], :] + coeffs[n, :]·basisᵀ on ex.stream (one fused kernel). T float or bf16.
template <class T>
void subspace_rebuild(const exec::cuda& ex, const fixed_embedding<device_space>& fixed,
                      view<const std::int32_t, device_space> tokens,
                      std::type_identity_t<view<const T, device_space>> coeffs, view<const float, device_space> basis,
                      view<T, device_space> x, token_check check = token_check::raise) {
  namespace P = cuda_detail::subspace_projection;
  static_assert(P::activation_v<T>, "subspace_rebuild (CUDA): x and the coefficients must be float or bf16");
  detail::subspace_projection::check("subspace_rebuild", fixed, tokens, x, coeffs, basis);
  if (x.numel() == 0) return;
  cuda_detail::fixed_embedding::with_token_check(
      ex, check, tokens.data(), fixed.vocab, "subspace_rebuild", [&](unsigned long long* bad) {
        P::launch_rebuild<true>(ex, &fixed, tokens.data(), coeffs.data(), basis, x, bad);
      });
}

/// coeffs[n, :] = (x[n, :] - E_fix[tokens[n], :])·basis on ex.stream (fp32 difference, fp32 gemm). T float or bf16.
template <class T>
void subspace_project(const exec::cuda& ex, const fixed_embedding<device_space>& fixed,
                      view<const std::int32_t, device_space> tokens,
                      std::type_identity_t<view<const T, device_space>> x, view<const float, device_space> basis,
                      view<T, device_space> coeffs, token_check check = token_check::raise) {
  namespace P = cuda_detail::subspace_projection;
  static_assert(P::activation_v<T>, "subspace_project (CUDA): x and the coefficients must be float or bf16");
  detail::subspace_projection::check("subspace_project", fixed, tokens, x, coeffs, basis);
  if (coeffs.numel() == 0) return;
  P::fp32_scratch residual(ex, x.shape());
  cuda_detail::fixed_embedding::launch_rows<true>(ex, fixed, tokens, x.data(), residual.v(), check, "subspace_project");
  P::times_basis(ex, view<const float, device_space>(residual.v()), basis, coeffs);
}

/// g = dx·basis on ex.stream (fp32 gemm; bf16 dx is widened to fp32 first). T float or bf16.
template <class T>
void subspace_coefficients(const exec::cuda& ex, std::type_identity_t<view<const T, device_space>> dx,
                           view<const float, device_space> basis, view<T, device_space> g) {
  namespace P = cuda_detail::subspace_projection;
  static_assert(P::activation_v<T>, "subspace_coefficients (CUDA): dx and g must be float or bf16");
  detail::subspace_projection::check_product("subspace_coefficients", dx, g, basis);
  if (g.numel() == 0) return;
  if constexpr (!std::is_same_v<T, float>) P::require_contiguous_rows("subspace_coefficients", dx, g);
  if constexpr (std::is_same_v<T, float>) {
    gemm(ex, op::none, op::none, 1.0f, dx, basis, 0.0f, g);
  } else {
    P::fp32_scratch wide(ex, dx.shape());
    cast(ex, dx, wide.v());
    P::times_basis(ex, view<const float, device_space>(wide.v()), basis, g);
  }
}

/// dx = g·basisᵀ on ex.stream (fp32 gemm for float; the fused kernel with fp32 accumulation for bf16).
template <class T>
void subspace_expand(const exec::cuda& ex, std::type_identity_t<view<const T, device_space>> g,
                     view<const float, device_space> basis, view<T, device_space> dx) {
  namespace P = cuda_detail::subspace_projection;
  static_assert(P::activation_v<T>, "subspace_expand (CUDA): g and dx must be float or bf16");
  detail::subspace_projection::check_product("subspace_expand", dx, g, basis);
  if (dx.numel() == 0) return;
  if constexpr (!std::is_same_v<T, float>) P::require_contiguous_rows("subspace_expand", dx, g);
  if constexpr (std::is_same_v<T, float>) gemm(ex, op::none, op::transpose, 1.0f, g, basis, 0.0f, dx);
  else P::launch_rebuild<false>(ex, nullptr, nullptr, g.data(), basis, dx, nullptr);
}

}  // namespace subspace

#pragma once
// E_fix on CUDA (see fixed_embedding.hpp): one thread per quad (four elements) of a row, grid-stride. A quad is one
// normal4 call, or four loads from a materialised table; either way the values are the host's bit for bit.
// Token ids are checked as embedding_forward checks them: the first offending row goes to a device word, read
// back after the launch (token_check::raise), and the rows of bad ids hold NaN.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../fixed_embedding.hpp"
#include "embedding.cuh"

namespace subspace {
namespace cuda_detail::fixed_embedding {

/// E_fix[token, 4q .. 4q + 3]: read from the table when there is one (elements past the row's end read as 0),
/// else regenerated.
template <bool FromTable>
__device__ inline void quad(std::uint64_t seed, const float* table, std::int64_t d, std::int32_t token, std::int64_t q,
                            float out[4]) {
  if constexpr (FromTable) {
    const float* src = table + std::int64_t(token) * d + 4 * q;
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = 4 * q + i < d ? src[i] : 0.0f;
  } else {
    fixed_embedding_quad(seed, token, q, out);
  }
}

/// The token of `row`, or -1 when it is outside [0, vocab); then, when `record` (one thread per row) and a word
/// is given, the row is recorded there with atomicMin.
__device__ inline std::int32_t checked_token(const std::int32_t* tokens, std::int64_t row, std::int64_t vocab,
                                             bool record, unsigned long long* bad) {
  const std::int32_t t = tokens[row];
  if (t >= 0 && t < vocab) return t;
  if (record && bad != nullptr) atomicMin(bad, static_cast<unsigned long long>(row));
  return -1;
}

/// out[n, j] = Out(E_fix[t_n, j]), or Out(float(x[n, j]) - E_fix[t_n, j]) when Subtract; rows [n, d].
template <bool FromTable, bool Subtract, class X, class Out>
__global__ void rows_kernel(std::int64_t n, std::int64_t d, const std::int32_t* tokens, std::int64_t vocab,
                            std::uint64_t seed, const float* table, const X* x, Out* out, unsigned long long* bad) {
  const std::int64_t quads = (d + 3) / 4, items = n * quads;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t row = i / quads, q = i % quads;
    const std::int32_t t = checked_token(tokens, row, vocab, q == 0, bad);
    float e[4] = {NAN, NAN, NAN, NAN};
    if (t >= 0) quad<FromTable>(seed, table, d, t, q, e);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (4 * q + k >= d) break;
      const std::int64_t at = row * d + 4 * q + k;
      if constexpr (Subtract) out[at] = Out(float(x[at]) - e[k]);
      else out[at] = Out(e[k]);
    }
  }
}

/// table[t, j] = T(E_fix[t, j]) for t < vocab.
template <class T>
__global__ void fill_kernel(std::int64_t vocab, std::int64_t d, std::uint64_t seed, T* table) {
  const std::int64_t quads = (d + 3) / 4, items = vocab * quads;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t t = i / quads, q = i % quads;
    float e[4];
    fixed_embedding_quad(seed, std::int32_t(t), q, e);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (4 * q + k < d) table[t * d + 4 * q + k] = T(e[k]);
  }
}

/// Runs launch(bad) with the device word of token_check::raise (then reads it back and throws for the first bad
/// row), or with nullptr for token_check::trust.
template <class Launch>
void with_token_check(const exec::cuda& ex, token_check check, const std::int32_t* tokens, std::int64_t vocab,
                      const char* op, Launch launch) {
  if (check == token_check::trust) {
    launch(static_cast<unsigned long long*>(nullptr));
    return;
  }
  cuda_detail::embedding::with_token_check(ex, tokens, vocab, op, launch);
}

/// out = E_fix rows (Subtract = false) or x - E_fix rows (Subtract = true), on ex.stream; shapes checked by the
/// caller.
template <bool Subtract, class X, class Out>
void launch_rows(const exec::cuda& ex, const subspace::fixed_embedding<device_space>& fixed,
                 view<const std::int32_t, device_space> tokens, const X* x, view<Out, device_space> out,
                 token_check check, const char* op) {
  const std::int64_t n = out.dim(0), d = out.dim(1);
  if (n == 0 || d == 0) return;
  const std::int64_t items = n * ((d + 3) / 4);
  with_token_check(ex, check, tokens.data(), fixed.vocab, op, [&](unsigned long long* bad) {
    const unsigned grid = cuda_detail::grid_for(items);
    if (fixed.materialised())
      rows_kernel<true, Subtract><<<grid, cuda_detail::block_threads, 0, ex.stream>>>(
          n, d, tokens.data(), fixed.vocab, fixed.seed, fixed.table.data(), x, out.data(), bad);
    else
      rows_kernel<false, Subtract><<<grid, cuda_detail::block_threads, 0, ex.stream>>>(
          n, d, tokens.data(), fixed.vocab, fixed.seed, nullptr, x, out.data(), bad);
    cuda_check_launch();
  });
}

}  // namespace cuda_detail::fixed_embedding

/// out[n, :] = T(E_fix[tokens[n], :]) on ex.stream, bit for bit the host's values. With token_check::raise
/// (default) synchronizes ex.stream and throws invalid_argument for a token outside [0, V).
template <class T>
  requires is_element_v<T>
void fixed_embedding_rows(const exec::cuda& ex, const fixed_embedding<device_space>& fixed,
                          view<const std::int32_t, device_space> tokens, view<T, device_space> out,
                          token_check check = token_check::raise) {
  detail::fixed_embedding::check_rows(tokens, out, "fixed_embedding_rows", "out");
  detail::fixed_embedding::check(fixed, out.dim(1), "fixed_embedding_rows");
  cuda_detail::fixed_embedding::launch_rows<false>(ex, fixed, tokens, static_cast<const float*>(nullptr), out, check,
                                                   "fixed_embedding_rows");
}

/// table[t, :] = E_fix[t, :] for every t < V = table.dim(0), on ex.stream.
inline void fill_fixed_embedding(const exec::cuda& ex, std::uint64_t seed, view<float, device_space> table) {
  detail::layer::require_rank(table, 2, "fill_fixed_embedding", "table");
  detail::layer::require_contiguous(table, "fill_fixed_embedding", "table");
  const fixed_embedding<device_space> generated{seed, table.dim(0), table.dim(1), {}};
  detail::fixed_embedding::check(generated, table.dim(1), "fill_fixed_embedding");
  const std::int64_t items = table.dim(0) * ((table.dim(1) + 3) / 4);
  if (items == 0) return;
  cuda_detail::fixed_embedding::fill_kernel<<<cuda_detail::grid_for(items), cuda_detail::block_threads, 0, ex.stream>>>(
      table.dim(0), table.dim(1), seed, table.data());
  cuda_check_launch();
}

}  // namespace subspace

#pragma once
// Token embedding on CUDA: one thread per 16-byte pack of a row (or per element when the rows do not split
// into whole aligned packs), grid-stride.
//
// Forward copies table rows; backward adds dout rows into the fp32 gradient table with atomicAdd (repeated
// tokens meet there, so the order of the additions, and hence the last bits, may vary from run to run).
// A token outside [0, V) leaves its output row zero (forward) or adds nothing (backward) and records its
// position with atomicMin in a device word; the call reads that word back (one synchronisation of ex.stream)
// and throws invalid_argument naming the first offending position and its value, as the host does.

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../../embedding.hpp"
#include "layer_common.cuh"

namespace subspace {
namespace cuda_detail::embedding {

inline constexpr unsigned long long no_error = std::numeric_limits<unsigned long long>::max();

template <int P, class T>
__global__ void forward_kernel(const std::int32_t* tokens, const T* table, T* out, std::int64_t n, std::int64_t vocab,
                               std::int64_t d, unsigned long long* bad) {
  using pk = layer::pack<T, P>;
  const std::int64_t per_row = d / P, items = n * per_row;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t row = i / per_row, col = (i % per_row) * P;
    const std::int32_t t = tokens[row];
    pk v{};
    if (t >= 0 && t < vocab) {
      v = *reinterpret_cast<const pk*>(table + std::int64_t(t) * d + col);
    } else if (col == 0) {
      atomicMin(bad, static_cast<unsigned long long>(row));
    }
    *reinterpret_cast<pk*>(out + row * d + col) = v;
  }
}

template <int P, class T>
__global__ void backward_kernel(const std::int32_t* tokens, const T* dout, float* dtable, std::int64_t n,
                                std::int64_t vocab, std::int64_t d, unsigned long long* bad) {
  using pk = layer::pack<T, P>;
  const std::int64_t per_row = d / P, items = n * per_row;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < items;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t row = i / per_row, col = (i % per_row) * P;
    const std::int32_t t = tokens[row];
    if (t < 0 || t >= vocab) {
      if (col == 0) atomicMin(bad, static_cast<unsigned long long>(row));
      continue;
    }
    const pk g = *reinterpret_cast<const pk*>(dout + row * d + col);
    float* dst = dtable + std::int64_t(t) * d + col;
#pragma unroll
    for (int k = 0; k < P; ++k) atomicAdd(dst + k, float(g.v[k]));
  }
}

/// Runs `launch(bad)` with a device word initialised to no_error, reads it back (synchronizing ex.stream) and
/// throws invalid_argument for the first bad token.
template <class Launch>
void with_token_check(const exec::cuda& ex, const std::int32_t* tokens, std::int64_t vocab, const char* op,
                      Launch launch) {
  cuda_detail::stream_scratch flag(sizeof(unsigned long long), ex.stream);
  cuda_check(cudaMemsetAsync(flag.as<void>(), 0xff, sizeof(unsigned long long), ex.stream));
  launch(flag.as<unsigned long long>());
  unsigned long long first = no_error;
  cuda_check(cudaMemcpyAsync(&first, flag.as<void>(), sizeof first, cudaMemcpyDeviceToHost, ex.stream));
  ex.synchronize();
  if (first == no_error) return;
  std::int32_t token = 0;
  cuda_check(cudaMemcpy(&token, tokens + first, sizeof token, cudaMemcpyDeviceToHost));
  throw invalid_argument(detail::embedding::bad_token_message(op, std::int64_t(first), token, vocab));
}

}  // namespace cuda_detail::embedding

/// out[n, :] = table[tokens[n], :] on ex.stream (T = bf16, fp16 or float). Synchronizes ex.stream to check the
/// tokens; throws invalid_argument for a token outside [0, V) (its row of out is then zero).
template <class T>
  requires is_element_v<T>
void embedding_forward(const exec::cuda& ex, view<const std::int32_t, device_space> tokens,
                       std::type_identity_t<view<const T, device_space>> table, view<T, device_space> out) {
  static_assert(cuda_detail::layer::is_activation_v<T>, "embedding_forward (CUDA): T must be bf16, fp16 or float");
  namespace E = cuda_detail::embedding;
  detail::embedding::check(tokens, table, out, "embedding_forward", "table", "out");
  const std::int64_t n = tokens.dim(0), vocab = table.dim(0), d = table.dim(1);
  if (n == 0 || d == 0) return;
  constexpr int P = cuda_detail::layer::pack_width<T>;
  const bool packed = d % P == 0 && cuda_detail::layer::all_aligned(table.data(), out.data());
  E::with_token_check(ex, tokens.data(), vocab, "embedding_forward", [&](unsigned long long* bad) {
    const std::int64_t items = packed ? n * (d / P) : n * d;
    const unsigned grid = cuda_detail::grid_for(items);
    if (packed)
      E::forward_kernel<P><<<grid, cuda_detail::block_threads, 0, ex.stream>>>(tokens.data(), table.data(), out.data(),
                                                                               n, vocab, d, bad);
    else
      E::forward_kernel<1><<<grid, cuda_detail::block_threads, 0, ex.stream>>>(tokens.data(), table.data(), out.data(),
                                                                               n, vocab, d, bad);
    cuda_check_launch();
  });
}

/// dtable[tokens[n], :] += dout[n, :] (fp32 gradient table, atomic adds) on ex.stream. Synchronizes ex.stream to
/// check the tokens; throws invalid_argument for a token outside [0, V) (that row adds nothing).
template <class DOut, class G>
  requires(is_element_v<std::remove_const_t<DOut>> && is_element_v<G>)
void embedding_backward(const exec::cuda& ex, view<const std::int32_t, device_space> tokens,
                        view<DOut, device_space> dout, view<G, device_space> dtable) {
  using T = std::remove_const_t<DOut>;
  static_assert(cuda_detail::layer::is_activation_v<T>, "embedding_backward (CUDA): dout must be bf16, fp16 or float");
  static_assert(std::is_same_v<G, float>, "embedding_backward (CUDA): the gradient table must be float (fp32)");
  namespace E = cuda_detail::embedding;
  detail::embedding::check(tokens, dtable, dout, "embedding_backward", "dtable", "dout");
  const std::int64_t n = tokens.dim(0), vocab = dtable.dim(0), d = dtable.dim(1);
  if (n == 0 || d == 0) return;
  constexpr int P = cuda_detail::layer::pack_width<T>;
  const bool packed = d % P == 0 && cuda_detail::layer::all_aligned(dout.data());
  E::with_token_check(ex, tokens.data(), vocab, "embedding_backward", [&](unsigned long long* bad) {
    const std::int64_t items = packed ? n * (d / P) : n * d;
    const unsigned grid = cuda_detail::grid_for(items);
    const T* src = dout.data();
    if (packed)
      E::backward_kernel<P>
          <<<grid, cuda_detail::block_threads, 0, ex.stream>>>(tokens.data(), src, dtable.data(), n, vocab, d, bad);
    else
      E::backward_kernel<1>
          <<<grid, cuda_detail::block_threads, 0, ex.stream>>>(tokens.data(), src, dtable.data(), n, vocab, d, bad);
    cuda_check_launch();
  });
}

}  // namespace subspace

#pragma once
// Token embedding (docs/llama-kernels.md):
//
//   embedding_forward(ex, tokens[N], table[V, d], out[N, d])        out[n] = table[tokens[n]]
//   embedding_backward(ex, tokens[N], dout[N, d], dtable[V, d])     dtable[tokens[n]] += dout[n]   (accumulates)
//
// Tokens are int32. A token outside [0, V) is an error: the host throws invalid_argument naming its position and
// value before touching any output; the CUDA kernels (detail/cuda/embedding.cuh) record the first offending
// position in a device flag, which the call reads back (one stream synchronisation) and reports the same way.
//
// Host: the readable reference, on the calling thread; out and dout in T, dtable in G (any element types; the
// sum happens in accum_t<G>). All views contiguous.

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "detail/layer_checks.hpp"

namespace subspace {

namespace detail::embedding {

/// The shape and layout checks common to both executors.
template <class Tok, class Table, class Rows>
void check(const Tok& tokens, const Table& table, const Rows& rows, const char* op, const char* table_name,
           const char* rows_name) {
  namespace L = detail::layer;
  L::require_rank(tokens, 1, op, "tokens");
  L::require_rank(table, 2, op, table_name);
  L::require_shape(rows, shape{tokens.dim(0), table.dim(1)}, op, rows_name);
  L::require_contiguous(tokens, op, "tokens");
  L::require_contiguous(table, op, table_name);
  L::require_contiguous(rows, op, rows_name);
}

/// "<op>: token <value> at position <n> is outside the vocabulary [0, V)".
inline std::string bad_token_message(const char* op, std::int64_t position, std::int64_t token, std::int64_t vocab) {
  return std::string(op) + ": token " + std::to_string(token) + " at position " + std::to_string(position) +
         " is outside the vocabulary [0, " + std::to_string(vocab) + ")";
}

/// Throws invalid_argument for the first token outside [0, vocab).
inline void require_tokens(const std::int32_t* tokens, std::int64_t n, std::int64_t vocab, const char* op) {
  for (std::int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= vocab) throw invalid_argument(bad_token_message(op, i, tokens[i], vocab));
}

}  // namespace detail::embedding

/// out[n, :] = table[tokens[n], :]. Throws invalid_argument for a token outside [0, V).
template <class T>
  requires is_element_v<T>
void embedding_forward(const exec::host&, view<const std::int32_t, host_space> tokens,
                       std::type_identity_t<view<const T, host_space>> table, view<T, host_space> out) {
  detail::embedding::check(tokens, table, out, "embedding_forward", "table", "out");
  const std::int64_t n = tokens.dim(0), vocab = table.dim(0), d = table.dim(1);
  detail::embedding::require_tokens(tokens.data(), n, vocab, "embedding_forward");
  for (std::int64_t i = 0; i < n; ++i) {
    const T* src = table.data() + std::int64_t(tokens.data()[i]) * d;
    std::copy(src, src + d, out.data() + i * d);
  }
}

/// dtable[tokens[n], :] += dout[n, :] (accumulates). Throws invalid_argument for a token outside [0, V).
template <class DOut, class G>
  requires(is_element_v<std::remove_const_t<DOut>> && is_element_v<G>)
void embedding_backward(const exec::host&, view<const std::int32_t, host_space> tokens, view<DOut, host_space> dout,
                        view<G, host_space> dtable) {
  detail::embedding::check(tokens, dtable, dout, "embedding_backward", "dtable", "dout");
  const std::int64_t n = tokens.dim(0), vocab = dtable.dim(0), d = dtable.dim(1);
  detail::embedding::require_tokens(tokens.data(), n, vocab, "embedding_backward");
  using A = accum_t<G>;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto* src = dout.data() + i * d;
    G* dst = dtable.data() + std::int64_t(tokens.data()[i]) * d;
    for (std::int64_t j = 0; j < d; ++j) dst[j] = convert<G>(convert<A>(dst[j]) + convert<A>(src[j]));
  }
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/embedding.cuh"
#endif

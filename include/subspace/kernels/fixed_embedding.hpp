#pragma once
// E_fix, the frozen random token embedding of a subspace network (docs/subspace-networks.md): a V x d table of
// i.i.d. N(0, 1) entries that is regenerated from the counter RNG instead of stored:
//
//   E_fix[t, j] = rng::normal_at(seed, fixed_embedding_offset(t), j)
//   fixed_embedding_offset(t) = (fixed_embedding_stream << 32) | t        fixed_embedding_stream = "EFIX"
//
// Row t is the Philox stream (seed, offset(t)): Philox counter words (j / 4, 0, t, "EFIX"), so elements
// 4q .. 4q + 3 of a row come from one normal4 call (block q), and any (token, dim) costs the same to compute. Each
// token has its own stream, apart from the library's other streams: parameter initialisation (small offsets), the
// loader's shuffle (0xD47A << 48), GoLore ("GOLR" << 32) and the subspace basis ("SSNU" << 32).
//
// A kernel takes E_fix as a fixed_embedding<S>{seed, vocab, dim, table}: with an empty table the values are
// regenerated; otherwise they are read from a materialised fp32 table [vocab, dim] in memory space S, filled by
// fill_fixed_embedding. Both hold the same values bit for bit, so results do not depend on the choice.
//
//   fixed_embedding_rows(ex, fixed, tokens[N], out[N, d])   out[n, :] = T(E_fix[tokens[n], :])
//   fill_fixed_embedding(ex, seed, table[V, d])             table = E_fix (fp32)
//   fixed_embedding_hash(seed, vocab, d)                     a fingerprint of the rows of 16 probe tokens
//
// Host: rows are spread over ex's threads (parallel_for); each row is computed the same way on any thread.
// A token id outside [0, V) raises invalid_argument naming its row: on the host before anything is written; on
// CUDA (detail/cuda/fixed_embedding.cuh) the kernels record the first offending row in a device word, which the
// call reads back (one synchronisation of ex.stream), unless the caller passes token_check::trust.

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/config.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/hash.hpp"
#include "../core/parallel.hpp"
#include "../core/rng.hpp"
#include "../core/tensor.hpp"
#include "detail/layer_checks.hpp"
#include "embedding.hpp"

namespace subspace {

/// The fourth Philox counter word of E_fix's draws ("EFIX").
inline constexpr std::uint32_t fixed_embedding_stream = 0x45464958u;

/// The Philox offset of token t's row of E_fix: (fixed_embedding_stream << 32) | t.
SUBSPACE_HD constexpr std::uint64_t fixed_embedding_offset(std::int32_t token) {
  return (std::uint64_t(fixed_embedding_stream) << 32) | std::uint64_t(std::uint32_t(token));
}

/// E_fix[token, j].
SUBSPACE_HD inline float fixed_embedding_at(std::uint64_t seed, std::int32_t token, std::int64_t j) {
  return rng::normal_at(seed, fixed_embedding_offset(token), std::uint64_t(j));
}

/// E_fix[token, 4q .. 4q + 3] (past the end of a row when 4q + 3 >= d: the caller drops those).
SUBSPACE_HD inline void fixed_embedding_quad(std::uint64_t seed, std::int32_t token, std::int64_t q, float out[4]) {
  rng::normal4(seed, fixed_embedding_offset(token), std::uint64_t(q), 0.0f, 1.0f, out);
}

/// E_fix as a kernel operand: regenerated from `seed` when `table` is empty, else read from `table` ([vocab, dim],
/// fp32, contiguous, in memory space S, filled by fill_fixed_embedding with the same seed).
template <class S>
struct fixed_embedding {
  std::uint64_t seed = 0;
  std::int64_t vocab = 0;
  std::int64_t dim = 0;
  view<const float, S> table{};

  bool materialised() const { return table.data() != nullptr; }
};

/// What a CUDA call does about token ids outside [0, V): `raise` reads back the first offending row (one
/// synchronisation of ex.stream) and throws invalid_argument naming it; `trust` skips that readback, for callers
/// that checked the ids already (the rows of bad ids then hold NaN). The host always raises.
enum class token_check { raise, trust };

namespace detail::fixed_embedding {

/// Checks the operand: vocab >= 1, dim as expected, and a table (when given) of [vocab, dim], contiguous.
template <class S>
void check(const subspace::fixed_embedding<S>& fixed, std::int64_t dim, const char* op) {
  require(fixed.vocab >= 1 && fixed.vocab <= (std::int64_t(1) << 31), [&] {
    return std::string(op) + ": the fixed embedding's vocabulary must hold 1 to 2^31 tokens, got " +
           std::to_string(fixed.vocab);
  });
  require(fixed.dim == dim, [&] {
    return std::string(op) + ": the fixed embedding has width " + std::to_string(fixed.dim) + ", the rows have width " +
           std::to_string(dim);
  });
  if (fixed.materialised()) {
    detail::layer::require_shape(fixed.table, shape{fixed.vocab, fixed.dim}, op, "the fixed embedding table");
    detail::layer::require_contiguous(fixed.table, op, "the fixed embedding table");
  }
}

/// Tokens [N] and rows [N, d] of rank 1 and 2, contiguous, with N equal.
template <class Tok, class Rows>
void check_rows(const Tok& tokens, const Rows& rows, const char* op, const char* rows_name) {
  namespace L = detail::layer;
  L::require_rank(tokens, 1, op, "tokens");
  L::require_rank(rows, 2, op, rows_name);
  L::require_shape(rows, shape{tokens.dim(0), rows.dim(1)}, op, rows_name);
  L::require_contiguous(tokens, op, "tokens");
  L::require_contiguous(rows, op, rows_name);
}

/// The rough cost of regenerating one element (a quarter of a Philox block, a logarithm and a sine/cosine in
/// fp64), for sizing the host's thread count.
inline constexpr double flops_per_element = 60.0;

/// Row `token` of E_fix into row[0, d): from the table, or regenerated four elements at a time.
inline void row(const subspace::fixed_embedding<host_space>& fixed, std::int32_t token, float* out) {
  const std::int64_t d = fixed.dim;
  if (fixed.materialised()) {
    const float* src = fixed.table.data() + std::int64_t(token) * d;
    std::copy(src, src + d, out);
    return;
  }
  float quad[4];
  for (std::int64_t j = 0; j < d; j += 4) {
    fixed_embedding_quad(fixed.seed, token, j / 4, quad);
    for (std::int64_t i = 0; i < 4 && j + i < d; ++i) out[j + i] = quad[i];
  }
}

}  // namespace detail::fixed_embedding

/// out[n, :] = T(E_fix[tokens[n], :]). Throws invalid_argument for a token outside [0, V) (before writing).
template <class T>
  requires is_element_v<T>
void fixed_embedding_rows(const exec::host& ex, const fixed_embedding<host_space>& fixed,
                          view<const std::int32_t, host_space> tokens, view<T, host_space> out,
                          token_check = token_check::raise) {
  detail::fixed_embedding::check_rows(tokens, out, "fixed_embedding_rows", "out");
  detail::fixed_embedding::check(fixed, out.dim(1), "fixed_embedding_rows");
  const std::int64_t n = tokens.dim(0), d = out.dim(1);
  detail::embedding::require_tokens(tokens.data(), n, fixed.vocab, "fixed_embedding_rows");
  parallel_for(for_flops(ex, detail::fixed_embedding::flops_per_element * double(n * d)), n,
               [&](std::int64_t first, std::int64_t last) {
                 std::vector<float> row(static_cast<std::size_t>(d));
                 for (std::int64_t i = first; i < last; ++i) {
                   detail::fixed_embedding::row(fixed, tokens.data()[i], row.data());
                   for (std::int64_t j = 0; j < d; ++j) out.data()[i * d + j] = convert<T>(row[std::size_t(j)]);
                 }
               });
}

/// table[t, :] = E_fix[t, :] for every token t < V = table.dim(0): the materialised form of E_fix.
inline void fill_fixed_embedding(const exec::host& ex, std::uint64_t seed, view<float, host_space> table) {
  detail::layer::require_rank(table, 2, "fill_fixed_embedding", "table");
  detail::layer::require_contiguous(table, "fill_fixed_embedding", "table");
  const fixed_embedding<host_space> generated{seed, table.dim(0), table.dim(1), {}};
  detail::fixed_embedding::check(generated, table.dim(1), "fill_fixed_embedding");
  const double flops = detail::fixed_embedding::flops_per_element * double(table.numel());
  parallel_for(for_flops(ex, flops), table.dim(0), [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t t = first; t < last; ++t)
      detail::fixed_embedding::row(generated, std::int32_t(t), table.data() + t * table.dim(1));
  });
}

/// The 16 probe tokens whose rows fixed_embedding_hash covers: floor(i (V - 1) / 15) for i = 0 .. 15, so the
/// first and the last token are among them.
inline std::array<std::int32_t, 16> fixed_embedding_probe_tokens(std::int64_t vocab) {
  require(vocab >= 1,
          [&] { return "fixed_embedding_probe_tokens: vocab must be positive, got " + std::to_string(vocab); });
  std::array<std::int32_t, 16> probes{};
  for (std::int64_t i = 0; i < 16; ++i) probes[std::size_t(i)] = std::int32_t(i * (vocab - 1) / 15);
  return probes;
}

/// FNV-1a (core/hash.hpp) over the fp32 values E_fix[t, 0 .. d-1] of the 16 probe tokens t, in order: ranks
/// compare it at start-up to confirm they regenerate the same E_fix.
inline std::uint64_t fixed_embedding_hash(std::uint64_t seed, std::int64_t vocab, std::int64_t dim) {
  require(dim >= 1, [&] { return "fixed_embedding_hash: dim must be positive, got " + std::to_string(dim); });
  const fixed_embedding<host_space> generated{seed, vocab, dim, {}};
  std::vector<float> row(static_cast<std::size_t>(dim));
  fnv1a_64 h;
  for (const std::int32_t t : fixed_embedding_probe_tokens(vocab)) {
    detail::fixed_embedding::row(generated, t, row.data());
    for (const float v : row) h.add_float(v);
  }
  return h.value();
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/fixed_embedding.cuh"
#endif

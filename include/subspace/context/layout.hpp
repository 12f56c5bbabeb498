#pragma once
// Which rows of a sequence each rank of a context-parallel group holds (docs/context.md).
//
// A sequence of `seq` tokens is cut into chunks of `chunk_rows` consecutive positions; the chunks are the unit of
// placement (and of compression, when the K/V exchange compresses per chunk). Each of the `ranks` ranks holds
// seq / (ranks · chunk_rows) of them:
//
//   contiguous   rank i holds chunks i·c … (i+1)·c − 1 (c chunks per rank): one run of positions. Under a causal
//                mask the last rank does the most attention work and the first the least.
//   zigzag       two chunks per rank: rank i holds chunks i and 2D − 1 − i, so every rank has one early and one
//                late piece and the causal work is balanced.
//
// A rank's rows are its chunks in that order, concatenated: the local sequence the model sees, with the chunks'
// global positions given to the model (nn::llama::set_positions) so RoPE and the causal mask use them.

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../nn/block_policies.hpp"

namespace subspace::context {

enum class placement { contiguous, zigzag };

/// A rectangle of (one rank's query rows × another's key rows) that one attention call covers: local rows
/// [q0, q0 + q_rows) of the querying rank and [k0, k0 + k_rows) of the owner. A masked block is one query chunk
/// and one key chunk that the causal mask cuts (the kernel masks it from the chunks' first positions); in an
/// unmasked one every query sees every key, and its rows may span several chunks.
struct visible_block {
  std::int64_t q0 = 0, q_rows = 0, k0 = 0, k_rows = 0, q_pos0 = 0, k_pos0 = 0;
  bool masked = false;
  friend bool operator==(const visible_block&, const visible_block&) = default;
};

inline std::string_view to_string(placement p) { return p == placement::contiguous ? "contiguous" : "zigzag"; }

/// The chunks of a sequence and the rank each belongs to (see the top of this file).
class layout {
 public:
  /// `seq` tokens over `ranks` ranks in chunks of `chunk_rows` positions (0: one chunk per rank when contiguous,
  /// two per rank when zigzag).
  layout(std::int64_t seq, int ranks, placement kind, std::int64_t chunk_rows = 0)
      : seq_(seq), ranks_(ranks), kind_(kind) {
    require(ranks >= 1, [&] { return "context::layout: ranks must be >= 1, got " + std::to_string(ranks); });
    const std::int64_t per_rank = kind == placement::zigzag ? 2 : 1;
    chunk_rows_ = chunk_rows > 0 ? chunk_rows : seq / (per_rank * ranks);
    require(seq > 0 && chunk_rows_ > 0 && seq % (chunk_rows_ * ranks) == 0, [&] {
      return "context::layout: a sequence of " + std::to_string(seq) + " tokens does not split into chunks of " +
             std::to_string(chunk_rows_) + " rows, an equal number per rank over " + std::to_string(ranks) +
             " ranks (the sequence must be a multiple of " + std::to_string(per_rank * ranks) +
             (chunk_rows > 0 ? " chunks" : "") + ")";
    });
    require(kind != placement::zigzag || seq == 2 * ranks * chunk_rows_, [&] {
      return "context::layout: zigzag places exactly two chunks on each rank, so chunk_rows must be seq / (2 · "
             "ranks) = " +
             std::to_string(seq / (2 * ranks)) + ", got " + std::to_string(chunk_rows_);
    });
  }

  std::int64_t seq() const { return seq_; }
  int ranks() const { return ranks_; }
  placement kind() const { return kind_; }
  std::int64_t chunk_rows() const { return chunk_rows_; }
  std::int64_t chunks() const { return seq_ / chunk_rows_; }
  std::int64_t chunks_per_rank() const { return chunks() / ranks_; }
  /// Rows each rank holds: seq / ranks.
  std::int64_t rows_per_rank() const { return seq_ / ranks_; }

  /// The global chunk indices rank `r` holds, in its local order.
  std::vector<std::int64_t> chunks_of(int r) const {
    check_rank(r);
    const std::int64_t c = chunks_per_rank();
    if (kind_ == placement::zigzag) return {r, 2 * std::int64_t(ranks_) - 1 - r};
    std::vector<std::int64_t> out;
    for (std::int64_t j = 0; j < c; ++j) out.push_back(r * c + j);
    return out;
  }
  /// The rank that holds global chunk `chunk`, and its index among that rank's chunks.
  int owner(std::int64_t chunk) const {
    if (kind_ == placement::zigzag) return int(chunk < ranks_ ? chunk : 2 * ranks_ - 1 - chunk);
    return int(chunk / chunks_per_rank());
  }

  /// Rank r's rows as position chunks (one per chunk, in local order; for nn::llama::set_positions).
  std::vector<nn::position_chunk> positions(int r) const {
    std::vector<nn::position_chunk> out;
    for (const std::int64_t c : chunks_of(r)) out.push_back({chunk_rows_, c * chunk_rows_});
    return out;
  }

  /// The blocks of rank `me`'s queries × rank `owner`'s keys that the causal mask lets see each other, as few and
  /// as large as the placement allows: neighbouring chunks that see each other whole share one unmasked block.
  /// Zigzag gives one block per other owner (two chunks of queries × one of keys, or one × two) and three for the
  /// rank's own keys, instead of up to four blocks of a chunk each.
  std::vector<visible_block> visible_blocks(int me, int owner) const {
    const std::vector<nn::position_chunk> qs = positions(me), ks = positions(owner);
    std::vector<visible_block> per_key;  // runs of neighbouring query chunks that see a key chunk whole
    std::int64_t k0 = 0;
    for (const nn::position_chunk& kc : ks) {
      std::int64_t q0 = 0;
      for (const nn::position_chunk& qc : qs) {
        const bool sees_some = kc.pos0 <= qc.pos0 + qc.rows - 1, sees_all = kc.pos0 + kc.rows - 1 <= qc.pos0;
        visible_block* last = per_key.empty() ? nullptr : &per_key.back();
        if (sees_all && last && !last->masked && last->k0 == k0 && last->q0 + last->q_rows == q0)
          last->q_rows += qc.rows;
        else if (sees_some) per_key.push_back({q0, qc.rows, k0, kc.rows, qc.pos0, kc.pos0, !sees_all});
        q0 += qc.rows;
      }
      k0 += kc.rows;
    }
    std::vector<visible_block> blocks;  // unmasked blocks of the same query rows and neighbouring key rows joined
    for (const visible_block& b : per_key) {
      const auto joins = [&](const visible_block& m) {
        return !m.masked && !b.masked && m.q0 == b.q0 && m.q_rows == b.q_rows && m.k0 + m.k_rows == b.k0;
      };
      const auto into = std::find_if(blocks.begin(), blocks.end(), joins);
      if (into != blocks.end()) into->k_rows += b.k_rows;
      else blocks.push_back(b);
    }
    return blocks;
  }

  /// Copies rank r's rows of every sequence of `full` [B, seq] into `local` [B, rows_per_rank()].
  template <class T>
  void take(int r, view<const T, host_space> full, view<T, host_space> local) const {
    require(full.rank() == 2 && full.dim(1) == seq_ && local.shape() == shape{full.dim(0), rows_per_rank()}, [&] {
      return "context::layout::take: expected full [B, " + std::to_string(seq_) + "] and local [B, " +
             std::to_string(rows_per_rank()) + "], got " + to_string(full.shape()) + " and " + to_string(local.shape());
    });
    const std::vector<std::int64_t> mine = chunks_of(r);
    for (std::int64_t b = 0; b < full.dim(0); ++b)
      for (std::size_t j = 0; j < mine.size(); ++j)
        for (std::int64_t s = 0; s < chunk_rows_; ++s)
          local(b, std::int64_t(j) * chunk_rows_ + s) = full(b, mine[j] * chunk_rows_ + s);
  }

 private:
  void check_rank(int r) const {
    require(0 <= r && r < ranks_, [&] {
      return "context::layout: rank " + std::to_string(r) + " is outside [0, " + std::to_string(ranks_) + ")";
    });
  }

  std::int64_t seq_;
  int ranks_;
  placement kind_;
  std::int64_t chunk_rows_ = 0;
};

}  // namespace subspace::context

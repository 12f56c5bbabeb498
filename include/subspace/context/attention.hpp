#pragma once
// Context-parallel attention: the attention policy of nn::llama when the rows of every sequence are spread over
// the ranks of a group (context/layout.hpp says which rank holds which chunks). docs/context.md tells the story.
//
// Forward, on every rank: RoPE on the local q and k at the chunks' global positions; the rotated K and V of every
// rank's chunks arrive (exchange::all_gather: one all-gather; exchange::ring: passed from rank to rank, each hop
// sent while the block that came before it is attended to); each local query chunk attends to each key chunk
// that its causal mask lets it see (the kernels' global-position masks), and the partial results are folded
// together by their log-sum-exp (attention_merge). The merged out and lse are exactly single-device attention's.
//
// Backward: the kernels' backward on each (query chunk, key chunk) pair, given the merged out and lse, is that
// pair's share of the full gradients (kernels/attention.hpp), so dq sums over the key chunks locally, and each
// rank's partial dK/dV of every key chunk goes back to the chunk's owner, summed there: one reduce-scatter
// (all_gather) or an accumulator per block passed around the ring, each rank adding its part (ring). The K/V that
// arrived in forward are kept per activation slot for this, so the backward moves only gradients.
//
// On the wire per layer and micro-batch, each rank sends (D − 1) blocks of its rows' K and V forward and (D − 1)
// blocks of dK/dV backward, in the activation type: 2 · B · (S / D) · d_kv elements per block.
//
// The policies of a rank share one context::group (its communicator and layout); context::blocks is the
// factory nn::llama makes them with (every other seam stays dense).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../comm/concepts.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../kernels/attention.hpp"
#include "../kernels/elementwise.hpp"
#include "../nn/block_policies.hpp"
#include "../nn/parameters.hpp"
#include "layout.hpp"

namespace subspace::context {

/// How the K/V blocks reach every rank.
enum class exchange { all_gather, ring };

inline std::string_view to_string(exchange e) { return e == exchange::ring ? "ring" : "all_gather"; }

/// What a rank's attention policies share: the communicator of its context-parallel group (not owned) and the
/// layout of the sequence over that group.
template <class Comm>
struct group {
  Comm* communicator = nullptr;
  std::optional<context::layout> layout;
};

/// One layer's context-parallel attention on a rank (see the top of this file).
template <class Comm, class T, class Space>
class attention {
 public:
  using accum_type = accum_t<T>;

  attention(std::shared_ptr<group<Comm>> g, exchange how) : group_(std::move(g)), how_(how) {}

  template <class Exec>
  void forward(const Exec& ex, const nn::attention_forward_args<T, Space>& a) {
    const geometry g = geometry_of(a.q, a.k, a.positions, "forward");
    nn::apply_rope(ex, a.q, a.inv_freq, a.positions, false);
    nn::apply_rope(ex, a.k, a.inv_freq, a.positions, false);
    slot_state& st = prepare_slot(a.slot, g);
    out_acc_ = sized<accum_type>(out_acc_, shape{g.batch, g.rows, g.heads, g.head_dim});
    fill(ex, out_acc_.v(), accum_type(0));
    fill(ex, a.lse, -std::numeric_limits<accum_type>::infinity());
    Comm& comm = communicator();
    const auto attend = [&](int owner) { attend_block(ex, g, a, st, owner); };
    if (how_ == exchange::all_gather) {
      copy(ex, view<const T, Space>(a.k), key_of(own_, g));
      copy(ex, a.v, value_of(own_, g));
      comm.all_gather(view<const T, Space>(own_.v()), st.kv.v()).wait();
      for (int owner = 0; owner < g.ranks; ++owner) attend(owner);
    } else {
      copy(ex, view<const T, Space>(a.k), key_of(block(st, g.me, g), g));
      copy(ex, a.v, value_of(block(st, g.me, g), g));
      const int next = (g.me + 1) % g.ranks, prev = (g.me + g.ranks - 1) % g.ranks;
      for (int s = 0; s < g.ranks; ++s) {
        const int owner = (g.me - s + g.ranks) % g.ranks;
        if (s + 1 < g.ranks) {  // pass this block on and take the next while attending to it
          comm.group_start();
          auto sent = comm.send(view<const T, Space>(block(st, owner, g)), next);
          auto got = comm.recv(block(st, (owner + g.ranks - 1) % g.ranks, g), prev);
          comm.group_end();
          attend(owner);
          sent.wait();
          got.wait();
        } else {
          attend(owner);
        }
      }
    }
    cast(ex, view<const accum_type, Space>(out_acc_.v()), a.out);
  }

  template <class Exec>
  void backward(const Exec& ex, const nn::attention_backward_args<T, Space>& a) {
    const geometry g = geometry_of(a.q, a.k, a.positions, "backward");
    require(a.slot < slots_.size() && slots_[a.slot].kv.numel() > 0,
            "context::attention::backward: no forward kept K/V in this activation slot");
    slot_state& st = slots_[a.slot];
    fill(ex, a.dq, T(0.0f));
    Comm& comm = communicator();
    const shape blk = block_shape(g);
    if (how_ == exchange::all_gather) {
      grads_ = sized<T>(grads_, shape{g.ranks * blk.numel()});
      fill(ex, grads_.v(), T(0.0f));
      for (int owner = 0; owner < g.ranks; ++owner) gradients_of_block(ex, g, a, st, owner, slice(grads_, owner, blk));
      own_ = sized<T>(own_, blk);
      comm.reduce_scatter(view<const T, Space>(grads_.v()), own_.v(), comm::reduce_op::sum).wait();
      finish(ex, g, a, own_.v());
      return;
    }
    // Ring: the accumulator of block o starts at rank o + 1 and travels the ring, each rank adding its part; the
    // owner adds its own last.
    for (auto& t : ring_) t = sized<T>(t, blk);
    own_ = sized<T>(own_, blk);
    fill(ex, own_.v(), T(0.0f));
    gradients_of_block(ex, g, a, st, g.me, own_.v());
    if (g.ranks == 1) {
      finish(ex, g, a, own_.v());
      return;
    }
    const int next = (g.me + 1) % g.ranks, prev = (g.me + g.ranks - 1) % g.ranks;
    using request = std::remove_cvref_t<decltype(comm.recv(std::declval<view<T, Space>>(), 0))>;
    std::optional<request> sent, got;
    int cur = 0;  // ring_[cur]: the accumulator built at this step; ring_[2]: this step's part
    for (int s = 1; s < g.ranks; ++s) {
      const int owner = (g.me - s + g.ranks) % g.ranks;
      fill(ex, ring_[2].v(), T(0.0f));
      gradients_of_block(ex, g, a, st, owner, ring_[2].v());  // while the previous hop is in flight
      if (s == 1) {
        copy(ex, view<const T, Space>(ring_[2].v()), ring_[cur].v());
      } else {
        got->wait();
        axpy(ex, 1.0f, view<const T, Space>(ring_[2].v()), ring_[cur].v());
        sent->wait();
      }
      comm.group_start();
      sent.emplace(comm.send(view<const T, Space>(ring_[cur].v()), next));
      got.emplace(comm.recv(ring_[1 - cur].v(), prev));
      comm.group_end();
      cur = 1 - cur;
    }
    got->wait();
    sent->wait();
    axpy(ex, 1.0f, view<const T, Space>(ring_[cur].v()), own_.v());  // everyone's parts of this rank's block
    finish(ex, g, a, own_.v());
  }

 private:
  /// The sizes of one call and this rank's place.
  struct geometry {
    int me = 0, ranks = 1;
    std::int64_t batch = 0, rows = 0, heads = 0, kv_heads = 0, head_dim = 0;
    const context::layout* layout = nullptr;
  };
  /// The K/V of every rank's rows for one activation slot: [D][2][B, S, Hkv, hd] (rotated K, then V).
  struct slot_state {
    tensor<T, Space> kv;
  };

  Comm& communicator() const {
    require(group_ && group_->communicator && group_->layout,
            "context::attention: the policy's group has no communicator and layout (context::blocks::connect)");
    return *group_->communicator;
  }

  geometry geometry_of(view<const T, Space> q, view<const T, Space> k, std::span<const nn::position_chunk> positions,
                       const char* op) const {
    Comm& comm = communicator();
    geometry g{comm.rank(), comm.size(), q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3), &*group_->layout};
    require(g.layout->ranks() == g.ranks && g.rows == g.layout->rows_per_rank(), [&] {
      return std::string("context::attention::") + op + ": the layout spreads " + std::to_string(g.layout->seq()) +
             " tokens over " + std::to_string(g.layout->ranks()) + " ranks (" +
             std::to_string(g.layout->rows_per_rank()) + " rows each); the group has " + std::to_string(g.ranks) +
             " ranks and this call " + std::to_string(g.rows) + " rows";
    });
    const std::vector<nn::position_chunk> mine = g.layout->positions(g.me);
    require(std::equal(mine.begin(), mine.end(), positions.begin(), positions.end()), [&] {
      return std::string("context::attention::") + op + ": the model's position chunks are not rank " +
             std::to_string(g.me) + "'s chunks of the layout (nn::llama::set_positions(layout.positions(rank)))";
    });
    return g;
  }

  /// A block, flat: [2][B, S, Hkv, hd].
  static shape block_shape(const geometry& g) { return shape{2 * g.batch * g.rows * g.kv_heads * g.head_dim}; }

  template <class U>
  static tensor<U, Space> sized(tensor<U, Space>& t, const shape& s) {
    if (t.shape() == s) return std::move(t);
    return tensor<U, Space>(s);
  }
  static view<T, Space> slice(tensor<T, Space>& t, int i, const shape& s) {
    return view<T, Space>(t.data() + std::int64_t(i) * s.numel(), s);
  }

  slot_state& prepare_slot(std::size_t slot, const geometry& g) {
    if (slot >= slots_.size()) slots_.resize(slot + 1);
    slot_state& st = slots_[slot];
    const shape blk = block_shape(g);
    st.kv = sized<T>(st.kv, shape{g.ranks * blk.numel()});
    if (how_ == exchange::all_gather) own_ = sized<T>(own_, blk);
    return st;
  }
  view<T, Space> block(slot_state& st, int owner, const geometry& g) { return slice(st.kv, owner, block_shape(g)); }

  /// The K (first) and V (second) halves of a block.
  static view<T, Space> key_of(view<T, Space> blk, const geometry& g) {
    return view<T, Space>(blk.data(), shape{g.batch, g.rows, g.kv_heads, g.head_dim});
  }
  static view<T, Space> key_of(tensor<T, Space>& t, const geometry& g) { return key_of(t.v(), g); }
  static view<T, Space> value_of(view<T, Space> blk, const geometry& g) {
    return view<T, Space>(blk.data() + g.batch * g.rows * g.kv_heads * g.head_dim,
                          shape{g.batch, g.rows, g.kv_heads, g.head_dim});
  }
  static view<T, Space> value_of(tensor<T, Space>& t, const geometry& g) { return value_of(t.v(), g); }

  /// Rows [s0, s0 + n) of sequence b of a [B, S, H, hd] view, as a contiguous [1, n, H, hd] view.
  template <class U>
  static view<U, Space> rows_of(view<U, Space> x, std::int64_t b, std::int64_t s0, std::int64_t n) {
    return view<U, Space>(x.data() + (b * x.dim(1) + s0) * x.dim(2) * x.dim(3), shape{1, n, x.dim(2), x.dim(3)});
  }
  /// The same rows of a [B, H, S] statistic, as a [1, H, n] view.
  template <class U>
  static view<U, Space> stat_rows(view<U, Space> l, std::int64_t b, std::int64_t s0, std::int64_t n) {
    return view<U, Space>(l.data() + b * l.dim(1) * l.dim(2) + s0, shape{1, l.dim(1), n}, {0, l.dim(2), 1, 0});
  }

  /// Calls f(query chunk, key chunk, q_row0, k_row0) for each pair of a local query chunk and a key chunk of
  /// `owner` that the causal mask lets see each other.
  template <class F>
  static void for_each_visible(const geometry& g, int owner, F&& f) {
    const std::vector<nn::position_chunk> qs = g.layout->positions(g.me), ks = g.layout->positions(owner);
    std::int64_t q0 = 0;
    for (const nn::position_chunk& qc : qs) {
      std::int64_t k0 = 0;
      for (const nn::position_chunk& kc : ks) {
        if (kc.pos0 <= qc.pos0 + qc.rows - 1) f(qc, kc, q0, k0);
        k0 += kc.rows;
      }
      q0 += qc.rows;
    }
  }

  static attention_params params_of(const geometry& g, const nn::position_chunk& qc, const nn::position_chunk& kc) {
    attention_params p;
    p.scale = float(1.0 / std::sqrt(double(g.head_dim)));
    p.causal = true;
    p.q_pos0 = qc.pos0;
    p.kv_pos0 = kc.pos0;
    return p;
  }

  /// Folds the local queries' attention to `owner`'s keys into out_acc_ and a.lse.
  template <class Exec>
  void attend_block(const Exec& ex, const geometry& g, const nn::attention_forward_args<T, Space>& a, slot_state& st,
                    int owner) {
    const view<T, Space> blk = block(st, owner, g);
    const view<T, Space> k = key_of(blk, g), v = value_of(blk, g);
    for_each_visible(
        g, owner, [&](const nn::position_chunk& qc, const nn::position_chunk& kc, std::int64_t q0, std::int64_t k0) {
          part_out_ = sized<T>(part_out_, shape{1, qc.rows, g.heads, g.head_dim});
          part_lse_ = sized<accum_type>(part_lse_, shape{1, g.heads, qc.rows});
          const view<T, Space> po(part_out_.data(), shape{1, qc.rows, g.heads, g.head_dim});
          const view<accum_type, Space> pl(part_lse_.data(), shape{1, g.heads, qc.rows});
          for (std::int64_t b = 0; b < g.batch; ++b) {
            attention_forward(ex, view<const T, Space>(rows_of(a.q, b, q0, qc.rows)),
                              view<const T, Space>(rows_of(k, b, k0, kc.rows)),
                              view<const T, Space>(rows_of(v, b, k0, kc.rows)), po, pl, params_of(g, qc, kc));
            attention_merge(ex, view<const T, Space>(po), view<const accum_type, Space>(pl),
                            rows_of(out_acc_.v(), b, q0, qc.rows), stat_rows(a.lse, b, q0, qc.rows));
          }
        });
  }

  /// Adds the local queries' gradients w.r.t. `owner`'s (rotated) keys and values into `into` [2, B, S, Hkv, hd],
  /// and their gradient w.r.t. the local (rotated) queries into a.dq.
  template <class Exec>
  void gradients_of_block(const Exec& ex, const geometry& g, const nn::attention_backward_args<T, Space>& a,
                          slot_state& st, int owner, view<T, Space> into) {
    const view<T, Space> blk = block(st, owner, g);
    const view<T, Space> k = key_of(blk, g), v = value_of(blk, g), dk = key_of(into, g), dv = value_of(into, g);
    for_each_visible(
        g, owner, [&](const nn::position_chunk& qc, const nn::position_chunk& kc, std::int64_t q0, std::int64_t k0) {
          part_dq_ = sized<T>(part_dq_, shape{1, qc.rows, g.heads, g.head_dim});
          part_dkv_ = sized<T>(part_dkv_, shape{2, kc.rows, g.kv_heads, g.head_dim});
          const view<T, Space> pdq(part_dq_.data(), shape{1, qc.rows, g.heads, g.head_dim});
          const view<T, Space> pdk(part_dkv_.data(), shape{1, kc.rows, g.kv_heads, g.head_dim});
          const view<T, Space> pdv(part_dkv_.data() + kc.rows * g.kv_heads * g.head_dim,
                                   shape{1, kc.rows, g.kv_heads, g.head_dim});
          for (std::int64_t b = 0; b < g.batch; ++b) {
            attention_backward(ex, rows_of(a.q, b, q0, qc.rows), view<const T, Space>(rows_of(k, b, k0, kc.rows)),
                               view<const T, Space>(rows_of(v, b, k0, kc.rows)), rows_of(a.out, b, q0, qc.rows),
                               stat_rows(a.lse, b, q0, qc.rows), rows_of(a.dout, b, q0, qc.rows), pdq, pdk, pdv,
                               params_of(g, qc, kc));
            axpy(ex, 1.0f, view<const T, Space>(pdq), rows_of(a.dq, b, q0, qc.rows));
            axpy(ex, 1.0f, view<const T, Space>(pdk), rows_of(dk, b, k0, kc.rows));
            axpy(ex, 1.0f, view<const T, Space>(pdv), rows_of(dv, b, k0, kc.rows));
          }
        });
  }

  /// dk, dv from this rank's summed block gradients, and dq, dk back through RoPE.
  template <class Exec>
  void finish(const Exec& ex, const geometry& g, const nn::attention_backward_args<T, Space>& a,
              view<T, Space> own) const {
    copy(ex, view<const T, Space>(key_of(own, g)), a.dk);
    copy(ex, view<const T, Space>(value_of(own, g)), a.dv);
    nn::apply_rope(ex, a.dq, a.inv_freq, a.positions, true);
    nn::apply_rope(ex, a.dk, a.inv_freq, a.positions, true);
  }

  std::shared_ptr<group<Comm>> group_;
  exchange how_;
  std::vector<slot_state> slots_;
  // Scratch, sized on use: the fp32/fp64 output accumulator, one pair's partial results, this rank's packed
  // block (all-gather input, then its summed gradients), the block gradients of every rank (reduce-scatter input)
  // and the ring's two accumulators and part.
  tensor<accum_type, Space> out_acc_;
  tensor<T, Space> part_out_, part_dq_, part_dkv_;
  tensor<accum_type, Space> part_lse_;
  tensor<T, Space> own_, grads_;
  tensor<T, Space> ring_[3];
};

/// The policies of a Llama whose attention is context parallel (every other seam dense). Copies share one group:
/// connect() it to the rank's communicator and layout before the first forward.
template <class Comm>
class blocks : public nn::dense_blocks {
 public:
  explicit blocks(exchange how = exchange::ring) : group_(std::make_shared<group<Comm>>()), how_(how) {}

  template <class T, class G, class S>
  context::attention<Comm, T, S> attention(const nn::block_site<nn::parameter_store<T, G, S>>&) const {
    return {group_, how_};
  }

  /// The communicator of this rank's context-parallel group (kept by pointer: it must outlive the policies) and
  /// the layout of the sequence over it.
  void connect(Comm& communicator, const context::layout& layout) const {
    require(layout.ranks() == communicator.size(), [&] {
      return "context::blocks::connect: the layout has " + std::to_string(layout.ranks()) +
             " ranks, the communicator " + std::to_string(communicator.size());
    });
    group_->communicator = &communicator;
    group_->layout = layout;
  }
  exchange how() const { return how_; }

 private:
  std::shared_ptr<group<Comm>> group_;
  exchange how_;
};

}  // namespace subspace::context

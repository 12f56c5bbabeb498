#pragma once
// Context-parallel attention: the attention policy of nn::llama when the rows of every sequence are spread over
// the ranks of a group (context/layout.hpp says which rank holds which chunks). docs/context.md tells the story.
//
// Forward, on every rank: RoPE on the local q at its chunks' global positions; the layer's K/V codec
// (compress/kv.hpp: compress::kv_identity sends K and V as they are, a compressing codec something smaller) encodes
// the local K (before RoPE) and V into a payload; the payloads of every rank arrive (exchange::all_gather: one
// all-gather; exchange::ring: passed from rank to rank, each hop in flight while the payload that came before it
// is used); each rank rebuilds K̂, V̂ from every payload, its own included, rotates K̂ at the owner's positions, and
// the local queries attend to the key chunks the causal mask lets them see, in as few blocks as the layout allows
// (layout::visible_blocks; the kernels' global-position masks cut the diagonal ones), the partial results folded
// together by their log-sum-exp (attention_merge). With kv_identity the merged out and lse are exactly
// single-device attention's.
//
// Backward: the kernels' backward on each block of (queries, keys), given the merged out and lse, is that
// block's share of the full gradients (kernels/attention.hpp). So dq sums over the key chunks locally; a rank's
// gradients w.r.t. an owner's K̂ (rotated back) and V̂ go through the codec's decode_backward into its part of
// d(payload), and the parts are summed at the owner — one reduce-scatter (all_gather), or an accumulator per
// block passed around the ring, each rank adding its part (ring) — where encode_backward gives dK and dV. The
// payloads and the K̂, V̂ of every rank are kept per activation slot, so the backward moves only gradients.
//
// On the wire per layer and micro-batch, each rank sends (D − 1) payloads forward and (D − 1) payload gradients
// backward; with kv_identity a payload is its rows' K and V, 2 · B · (S / D) · d_kv elements.
//
// The policies of a rank share one context::group (its communicator and layout); context::blocks is the
// factory nn::llama makes them with (every other seam stays dense).

#include <algorithm>
#include <cmath>
#include <concepts>
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
#include "../compress/kv.hpp"
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

/// One layer's context-parallel attention on a rank (see the top of this file), its K/V exchanged through `Codec`
/// (compress/kv.hpp).
template <class Comm, class T, class Space, class Codec = compress::kv_identity>
class attention {
 public:
  using accum_type = accum_t<T>;

  attention(std::shared_ptr<group<Comm>> g, exchange how, Codec codec = {})
      : group_(std::move(g)), how_(how), codec_(std::move(codec)) {}

  const Codec& codec() const { return codec_; }
  Codec& codec() { return codec_; }

  /// Views of the codec's tensors (when it declared any) after the store allocated.
  template <class Store>
  void bind(Store& store) {
    if constexpr (requires { codec_.bind(store); }) codec_.bind(store);
  }

  /// Leaves q rotated and k as it came (the codec compresses K before RoPE); backward expects them so.
  template <class Exec>
  void forward(const Exec& ex, const nn::attention_forward_args<T, Space>& a) {
    const geometry g = geometry_of(a.q, a.k, a.positions, "forward");
    nn::apply_rope(ex, a.q, a.inv_freq, a.positions, false);
    slot_state& st = prepare_slot(a.slot, g);
    out_acc_ = sized<accum_type>(out_acc_, shape{g.batch, g.rows, g.heads, g.head_dim});
    fill(ex, out_acc_.v(), accum_type(0));
    fill(ex, a.lse, -std::numeric_limits<accum_type>::infinity());
    Comm& comm = communicator();
    const auto arrived = [&](int owner) {  // rebuild the owner's K̂, V̂ from its payload, then attend to them
      const view<T, Space> kh = key_of(block(st.kv, owner, g), g), vh = value_of(block(st.kv, owner, g), g);
      codec_.decode(ex, g.rows_of_codec, ro(values_of(st.payload, owner, g)), ro(side_of(st.payload, owner, g)), kh,
                    vh);
      nn::apply_rope(ex, kh, a.inv_freq, std::span<const nn::position_chunk>(g.layout->positions(owner)), false);
      attend_block(ex, g, a, st, owner);
    };
    const view<T, Space> own_values = values_of(st.payload, g.me, g);
    const view<accum_type, Space> own_side = side_of(st.payload, g.me, g);
    if (how_ == exchange::all_gather) {
      own_ = sized_payload(own_, g.size, 1);
      codec_.encode(ex, g.rows_of_codec, ro(a.k), a.v, own_.values.v(), own_.side.v());
      exchange_all(comm, own_, st.payload, g);
      for (int owner = 0; owner < g.ranks; ++owner) arrived(owner);
    } else {
      codec_.encode(ex, g.rows_of_codec, ro(a.k), a.v, own_values, own_side);
      const int next = (g.me + 1) % g.ranks, prev = (g.me + g.ranks - 1) % g.ranks;
      for (int s = 0; s < g.ranks; ++s) {
        const int owner = (g.me - s + g.ranks) % g.ranks;
        if (s + 1 < g.ranks) {  // pass this payload on and take the next while attending to this one
          const int incoming = (owner + g.ranks - 1) % g.ranks;
          hop h = start_hop(comm, values_of(st.payload, owner, g), side_of(st.payload, owner, g),
                            values_of(st.payload, incoming, g), side_of(st.payload, incoming, g), next, prev);
          arrived(owner);
          h.wait();
        } else {
          arrived(owner);
        }
      }
    }
    cast(ex, view<const accum_type, Space>(out_acc_.v()), a.out);
  }

  template <class Exec>
  void backward(const Exec& ex, const nn::attention_backward_args<T, Space>& a) {
    const geometry g = geometry_of(a.q, a.k, a.positions, "backward");
    require(a.slot < slots_.size() && slots_[a.slot].kv.data() != nullptr,
            "context::attention::backward: no forward kept K/V in this activation slot");
    slot_state& st = slots_[a.slot];
    fill(ex, a.dq, T(0.0f));
    Comm& comm = communicator();
    // d(payload) of `owner`'s block from the local queries: dK̂, dV̂, back through RoPE and the codec.
    const auto part_of = [&](int owner, view<T, Space> values, view<accum_type, Space> side) {
      dkv_ = sized<T>(dkv_, shape{2 * g.kv_elements});
      fill(ex, dkv_.v(), T(0.0f));
      const view<T, Space> dk = key_of(dkv_.v(), g), dv = value_of(dkv_.v(), g);
      gradients_of_block(ex, g, a, st, owner, dk, dv);
      nn::apply_rope(ex, dk, a.inv_freq, std::span<const nn::position_chunk>(g.layout->positions(owner)), true);
      codec_.decode_backward(ex, g.rows_of_codec, ro(values_of(st.payload, owner, g)),
                             ro(side_of(st.payload, owner, g)), ro(dk), ro(dv), values, side);
    };
    if (how_ == exchange::all_gather) {
      grads_ = sized_payload(grads_, g.size, g.ranks);
      for (int owner = 0; owner < g.ranks; ++owner)
        part_of(owner, slice(grads_.values, owner, g.size.values), slice(grads_.side, owner, g.size.side));
      own_ = sized_payload(own_, g.size, 1);
      sum_to_owners(comm, grads_, own_, g);
      finish(ex, g, a, st, own_);
      return;
    }
    // Ring: the accumulator of block o starts at rank o + 1 and travels the ring, each rank adding its part; the
    // owner adds its own last.
    for (auto& r : ring_) r = sized_payload(r, g.size, 1);
    own_ = sized_payload(own_, g.size, 1);
    part_of(g.me, own_.values.v(), own_.side.v());
    if (g.ranks > 1) {
      const int next = (g.me + 1) % g.ranks, prev = (g.me + g.ranks - 1) % g.ranks;
      std::optional<hop> in_flight;
      int cur = 0;  // ring_[cur]: the accumulator built at this step; ring_[2]: this step's part
      for (int s = 1; s < g.ranks; ++s) {
        part_of((g.me - s + g.ranks) % g.ranks, ring_[2].values.v(), ring_[2].side.v());  // while the hop flies
        if (s == 1) {
          copy_payload(ex, ring_[2], ring_[cur]);
        } else {
          in_flight->wait();
          add_payload(ex, ring_[2], ring_[cur]);
        }
        in_flight.emplace(start_hop(comm, ring_[cur].values.v(), ring_[cur].side.v(), ring_[1 - cur].values.v(),
                                    ring_[1 - cur].side.v(), next, prev));
        cur = 1 - cur;
      }
      in_flight->wait();
      add_payload(ex, ring_[cur], own_);  // everyone's parts of this rank's block
    }
    finish(ex, g, a, st, own_);
  }

 private:
  /// The sizes of one call and this rank's place.
  struct geometry {
    int me = 0, ranks = 1;
    std::int64_t batch = 0, rows = 0, heads = 0, kv_heads = 0, head_dim = 0;
    const context::layout* layout = nullptr;
    compress::kv_rows rows_of_codec;
    compress::kv_payload_size size;
    std::int64_t kv_elements = 0;  // of K (or V): B · S · Hkv · hd
  };
  /// A payload's two buffers (flat): values in T, side in accum_t<T>.
  struct payload_buffers {
    tensor<T, Space> values;
    tensor<accum_type, Space> side;
  };
  /// What a forward keeps for backward: every rank's payload and the K̂, V̂ rebuilt from it ([D][2][B, S, Hkv,
  /// hd], K̂ rotated).
  struct slot_state {
    payload_buffers payload;
    tensor<T, Space> kv;
  };
  /// A send of one payload block and the receive of the next (both buffers), in flight.
  struct hop {
    using request = std::remove_cvref_t<decltype(std::declval<Comm&>().recv(std::declval<view<T, Space>>(), 0))>;
    std::vector<request> pending;
    void wait() {
      for (auto& r : pending) r.wait();
    }
  };

  template <class U>
  static view<const U, Space> ro(view<U, Space> v) {
    return v;
  }

  Comm& communicator() const {
    require(group_ && group_->communicator && group_->layout,
            "context::attention: the policy's group has no communicator and layout (context::blocks::connect)");
    return *group_->communicator;
  }

  geometry geometry_of(view<const T, Space> q, view<const T, Space> k, std::span<const nn::position_chunk> positions,
                       const char* op) const {
    Comm& comm = communicator();
    geometry g;
    g.me = comm.rank();
    g.ranks = comm.size();
    g.batch = q.dim(0);
    g.rows = q.dim(1);
    g.heads = q.dim(2);
    g.kv_heads = k.dim(2);
    g.head_dim = q.dim(3);
    g.layout = &*group_->layout;
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
    g.rows_of_codec = {g.batch, g.layout->chunks_per_rank(), g.layout->chunk_rows(), g.kv_heads, g.head_dim};
    g.size = codec_.payload_size(g.rows_of_codec);
    g.kv_elements = g.rows_of_codec.elements();
    return g;
  }

  template <class U>
  static tensor<U, Space> sized(tensor<U, Space>& t, const shape& s) {
    if (t.shape() == s) return std::move(t);
    return tensor<U, Space>(s);
  }
  /// `count` payloads of `size` back to back.
  static payload_buffers sized_payload(payload_buffers& p, const compress::kv_payload_size& size, int count) {
    return {sized<T>(p.values, shape{count * size.values}), sized<accum_type>(p.side, shape{count * size.side})};
  }
  template <class U>
  static view<U, Space> slice(tensor<U, Space>& t, int i, std::int64_t n) {
    return view<U, Space>(t.data() + std::int64_t(i) * n, shape{n});
  }
  static view<T, Space> values_of(payload_buffers& p, int owner, const geometry& g) {
    return slice(p.values, owner, g.size.values);
  }
  static view<accum_type, Space> side_of(payload_buffers& p, int owner, const geometry& g) {
    return slice(p.side, owner, g.size.side);
  }
  static view<T, Space> block(tensor<T, Space>& kv, int owner, const geometry& g) {
    return slice(kv, owner, 2 * g.kv_elements);
  }

  slot_state& prepare_slot(std::size_t slot, const geometry& g) {
    if (slot >= slots_.size()) slots_.resize(slot + 1);
    slot_state& st = slots_[slot];
    st.payload = sized_payload(st.payload, g.size, g.ranks);
    st.kv = sized<T>(st.kv, shape{g.ranks * 2 * g.kv_elements});
    return st;
  }

  /// The K (first) and V (second) halves of a [2][B, S, Hkv, hd] block.
  static view<T, Space> key_of(view<T, Space> blk, const geometry& g) {
    return view<T, Space>(blk.data(), shape{g.batch, g.rows, g.kv_heads, g.head_dim});
  }
  static view<T, Space> value_of(view<T, Space> blk, const geometry& g) {
    return view<T, Space>(blk.data() + g.kv_elements, shape{g.batch, g.rows, g.kv_heads, g.head_dim});
  }

  /// Sends (values, side) to `next` and receives the same sizes from `prev`, as one group.
  static hop start_hop(Comm& comm, view<T, Space> send_values, view<accum_type, Space> send_side,
                       view<T, Space> recv_values, view<accum_type, Space> recv_side, int next, int prev) {
    hop h;
    comm.group_start();
    if (send_values.numel() > 0) {
      h.pending.push_back(comm.send(view<const T, Space>(send_values), next));
      h.pending.push_back(comm.recv(recv_values, prev));
    }
    if (send_side.numel() > 0) {
      h.pending.push_back(comm.send(view<const accum_type, Space>(send_side), next));
      h.pending.push_back(comm.recv(recv_side, prev));
    }
    comm.group_end();
    return h;
  }
  static void exchange_all(Comm& comm, payload_buffers& own, payload_buffers& all, const geometry& g) {
    if (g.size.values > 0) comm.all_gather(view<const T, Space>(own.values.v()), all.values.v()).wait();
    if (g.size.side > 0) comm.all_gather(view<const accum_type, Space>(own.side.v()), all.side.v()).wait();
  }
  static void sum_to_owners(Comm& comm, payload_buffers& all, payload_buffers& own, const geometry& g) {
    if (g.size.values > 0)
      comm.reduce_scatter(view<const T, Space>(all.values.v()), own.values.v(), comm::reduce_op::sum).wait();
    if (g.size.side > 0)
      comm.reduce_scatter(view<const accum_type, Space>(all.side.v()), own.side.v(), comm::reduce_op::sum).wait();
  }
  template <class Exec>
  static void copy_payload(const Exec& ex, payload_buffers& from, payload_buffers& to) {
    copy(ex, view<const T, Space>(from.values.v()), to.values.v());
    if (from.side.numel() > 0) copy(ex, view<const accum_type, Space>(from.side.v()), to.side.v());
  }
  template <class Exec>
  static void add_payload(const Exec& ex, payload_buffers& from, payload_buffers& to) {
    axpy(ex, 1.0f, view<const T, Space>(from.values.v()), to.values.v());
    if (from.side.numel() > 0) axpy(ex, 1.0f, view<const accum_type, Space>(from.side.v()), to.side.v());
  }

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

  static attention_params params_of(const geometry& g, const visible_block& blk) {
    attention_params p;
    p.scale = float(1.0 / std::sqrt(double(g.head_dim)));
    p.causal = blk.masked;
    p.q_pos0 = blk.q_pos0;
    p.kv_pos0 = blk.k_pos0;
    return p;
  }

  /// Folds the local queries' attention to `owner`'s K̂, V̂ into out_acc_ and a.lse.
  template <class Exec>
  void attend_block(const Exec& ex, const geometry& g, const nn::attention_forward_args<T, Space>& a, slot_state& st,
                    int owner) {
    const view<T, Space> blk = block(st.kv, owner, g);
    const view<T, Space> k = key_of(blk, g), v = value_of(blk, g);
    for (const visible_block& vb : g.layout->visible_blocks(g.me, owner)) {
      const view<T, Space> part_out = scratch_view(part_out_, shape{1, vb.q_rows, g.heads, g.head_dim});
      const view<accum_type, Space> part_lse = scratch_view(part_lse_, shape{1, g.heads, vb.q_rows});
      for (std::int64_t b = 0; b < g.batch; ++b) {
        attention_forward(ex, ro(rows_of(a.q, b, vb.q0, vb.q_rows)), ro(rows_of(k, b, vb.k0, vb.k_rows)),
                          ro(rows_of(v, b, vb.k0, vb.k_rows)), part_out, part_lse, params_of(g, vb));
        attention_merge(ex, ro(part_out), ro(part_lse), rows_of(out_acc_.v(), b, vb.q0, vb.q_rows),
                        stat_rows(a.lse, b, vb.q0, vb.q_rows));
      }
    }
  }

  /// Adds the local queries' gradients w.r.t. `owner`'s K̂ (rotated) and V̂ into dk, dv [B, S, Hkv, hd], and
  /// their gradient w.r.t. the local (rotated) queries into a.dq.
  template <class Exec>
  void gradients_of_block(const Exec& ex, const geometry& g, const nn::attention_backward_args<T, Space>& a,
                          slot_state& st, int owner, view<T, Space> dk, view<T, Space> dv) {
    const view<T, Space> blk = block(st.kv, owner, g);
    const view<T, Space> k = key_of(blk, g), v = value_of(blk, g);
    for (const visible_block& vb : g.layout->visible_blocks(g.me, owner)) {
      const view<T, Space> part_dq = scratch_view(part_dq_, shape{1, vb.q_rows, g.heads, g.head_dim});
      const view<T, Space> part_dk = scratch_view(part_dk_, shape{1, vb.k_rows, g.kv_heads, g.head_dim});
      const view<T, Space> part_dv = scratch_view(part_dv_, shape{1, vb.k_rows, g.kv_heads, g.head_dim});
      for (std::int64_t b = 0; b < g.batch; ++b) {
        attention_backward(ex, rows_of(a.q, b, vb.q0, vb.q_rows), ro(rows_of(k, b, vb.k0, vb.k_rows)),
                           ro(rows_of(v, b, vb.k0, vb.k_rows)), rows_of(a.out, b, vb.q0, vb.q_rows),
                           stat_rows(a.lse, b, vb.q0, vb.q_rows), rows_of(a.dout, b, vb.q0, vb.q_rows), part_dq,
                           part_dk, part_dv, params_of(g, vb));
        axpy(ex, 1.0f, ro(part_dq), rows_of(a.dq, b, vb.q0, vb.q_rows));
        axpy(ex, 1.0f, ro(part_dk), rows_of(dk, b, vb.k0, vb.k_rows));
        axpy(ex, 1.0f, ro(part_dv), rows_of(dv, b, vb.k0, vb.k_rows));
      }
    }
  }

  /// dk, dv from this rank's summed d(payload) through the codec, and dq back through RoPE.
  template <class Exec>
  void finish(const Exec& ex, const geometry& g, const nn::attention_backward_args<T, Space>& a, slot_state& st,
              payload_buffers& own) {
    codec_.encode_backward(ex, g.rows_of_codec, a.k, a.v, ro(values_of(st.payload, g.me, g)),
                           ro(side_of(st.payload, g.me, g)), ro(own.values.v()), ro(own.side.v()), a.dk, a.dv);
    nn::apply_rope(ex, a.dq, a.inv_freq, a.positions, true);
  }

  std::shared_ptr<group<Comm>> group_;
  exchange how_;
  Codec codec_;
  std::vector<slot_state> slots_;
  // Scratch, sized on use: the fp32/fp64 output accumulator, one block's partial results (grown only, as blocks
  // differ in shape: scratch_view), the gradients w.r.t. one owner's K̂ and V̂, this rank's payload (all-gather
  // input, then its summed gradients), every owner's payload gradients (reduce-scatter input), and the ring's two
  // accumulators and part.
  tensor<accum_type, Space> out_acc_;
  tensor<T, Space> part_out_, part_dq_, part_dk_, part_dv_, dkv_;
  tensor<accum_type, Space> part_lse_;
  payload_buffers own_, grads_;
  payload_buffers ring_[3];
};

/// The policies of a Llama whose attention is context parallel; every other seam is Base's (dense, or
/// nn::subspace_blocks for a Subspace Network split into pipeline stages). Copies share one group: connect() it to
/// the rank's communicator and layout before the first forward.
template <class Comm, class Compressor = compress::identity, class Base = nn::dense_blocks>
class blocks : public Base {
 public:
  using communicator_type = Comm;
  using compressor_type = Compressor;

  // Defaults only where the types have them: a defaulted argument of a type without one breaks traits such as
  // std::is_default_constructible under nvcc, which instantiates default arguments eagerly.
  explicit blocks(exchange how, Compressor compressor, Base base)
      : Base(std::move(base)), group_(std::make_shared<group<Comm>>()), how_(how), compressor_(std::move(compressor)) {}
  explicit blocks(exchange how, Compressor compressor)
    requires std::default_initializable<Base>
      : blocks(how, std::move(compressor), Base{}) {}
  explicit blocks(exchange how = exchange::ring)
    requires std::default_initializable<Compressor> && std::default_initializable<Base>
      : blocks(how, Compressor{}, Base{}) {}

  /// The attention of the layer at `site`, with the K/V codec the compressor gives that layer.
  template <class T, class G, class S>
  auto attention(const nn::block_site<nn::parameter_store<T, G, S>>& site) const {
    auto codec = compress::kv_codec_for<T, S>(compressor_, site);
    return context::attention<Comm, T, S, decltype(codec)>(group_, how_, std::move(codec));
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
  const Compressor& compressor() const { return compressor_; }

 private:
  std::shared_ptr<group<Comm>> group_;
  exchange how_;
  Compressor compressor_;
};

}  // namespace subspace::context

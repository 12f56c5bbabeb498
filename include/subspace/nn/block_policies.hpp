#pragma once
// The seams of a Llama model: the policies a block calls where a trainer may need something else than the
// dense computation: Subspace Networks replace the projections, residual adds and embedding (nn/subspace_blocks.hpp,
// docs/pipeline.md), context parallelism the attention (context/attention.hpp, docs/context.md).
//
//   attention    p.forward(ex, attention_forward_args)       RoPE on q and k (in place), then attention
//                p.backward(ex, attention_backward_args)      gradients w.r.t. the pre-RoPE q and k, and v
//   projection   p.forward(ex, x[N, in], w, y[N, out])                 y = x · wᵀ (overwritten)
//                p.backward(ex, x, w, dy, dx, dw)                       dx overwritten, dw += (in G)
//                optional halves for a split backward (zero-bubble schedules):
//                p.backward_input(ex, x, w, dy, dx), p.backward_weight(ex, x, dy, dw)
//                (the attention o_proj and the MLP down_proj: the two products that write into the residual).
//                backward_input must not read x: with the halves, the block passes down_proj an empty x there
//                and recomputes SwiGLU's output for backward_weight instead of keeping it
//   residual     p.forward(ex, site, x, y)                    y ← x + y, the residual add after a sublayer
//                p.backward(ex, site, dy)                     dy ← (∂out/∂y)ᵀ dy in place
//                A policy may keep the stream in another representation (coefficients in a subspace, out =
//                E + P(x + y − E)); its Jacobian must be the same for x and y, since the block uses the
//                transformed dy for both. Optional, for a stage that is not the model's first / last:
//                p.enter(ex, site, in, x)  the stage's input (the boundary type) -> the stream x entering its
//                                          first layer (default: a cast)
//                p.leave(ex, site, x, out) the stream leaving its last layer -> the stage's output (default: a
//                                          cast); the gradients cross the boundary as casts
//   embedding    p.forward(ex, site, weight, x[N, d])         x overwritten (site.tokens: the ids)
//                p.backward(ex, site, dx[N, d], dweight)      dweight += (in G)
//
// Sites. A stream_site names where the stream is touched: the layer (-1 for the embedding and the stage
// boundaries), the sublayer, the activation slot of the micro-batch (a policy may keep per-micro-batch state) and
// the token ids of the rows (device memory, [N]).
//
// Positions. The rows of a sequence are a list of chunks, each a run of consecutive global positions
// (position_chunk): one chunk {S, 0} for a whole sequence on one device, {S, offset} for a later piece of it, and
// several for load-balanced context parallelism (rank i holding chunks i and 2D−1−i). The attention policy owns
// RoPE, so a context-parallel policy sees pre-RoPE keys and can place every chunk it receives.
//
// Policies are made per layer by a factory (dense_blocks below is the default): factory.attention(site),
// .projection(site, which), .residual(site), .embedding(site), where the site names the layer, the model's
// configuration and its parameter store — a policy may declare trainable tensors there (store.add) and may hold
// per-layer state (a basis, a communicator). Optional members the model calls when present:
//   factory.parameter(site, info) -> parameter_info   the tensor to declare in place of the dense one `info`
//                             (o_proj, down_proj, embed_tokens): another shape or name, e.g. a factor in a
//                             subspace; the policy that uses it receives its views as `w` / `weight`
//   p.bind(store)             after the store (re)allocated: re-read views of the policy's tensors
//   p.after_step(ex, store)   after every optimizer step (a policy that constrains its weights re-projects them)

#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "../kernels/attention.hpp"
#include "../kernels/elementwise.hpp"
#include "../kernels/embedding.hpp"
#include "../kernels/gemm.hpp"
#include "../kernels/rope.hpp"
#include "config.hpp"

namespace subspace::nn {

/// The memory space of executor Exec, for the policy signatures below.
template <class Exec>
using space_t = space_of_t<Exec>;

/// `rows` consecutive rows of a sequence at global positions pos0, pos0 + 1, ...
struct position_chunk {
  std::int64_t rows = 0;
  std::int64_t pos0 = 0;
  friend bool operator==(const position_chunk&, const position_chunk&) = default;
};

/// Rotates x [B, S, H, hd] in place, row s of each sequence at the global position the chunks give it.
template <class Exec, class T>
void apply_rope(const Exec& ex, view<T, space_t<Exec>> x, view<const float, space_t<Exec>> inv_freq,
                std::span<const position_chunk> positions, bool inverse) {
  if (positions.size() == 1) {  // the common case: one call over the whole batch
    rope_apply(ex, x, inv_freq, positions[0].pos0, inverse);
    return;
  }
  const std::int64_t batch = x.dim(0), seq = x.dim(1), row = x.dim(2) * x.dim(3);
  for (std::int64_t b = 0; b < batch; ++b) {
    std::int64_t s0 = 0;
    for (const position_chunk& c : positions) {
      const view<T, space_t<Exec>> piece(x.data() + (b * seq + s0) * row, shape{1, c.rows, x.dim(2), x.dim(3)});
      rope_apply(ex, piece, inv_freq, c.pos0, inverse);
      s0 += c.rows;
    }
  }
}

/// The operands of an attention forward: q, k [B, S, H(kv), hd] arrive before RoPE; the policy may rotate them in
/// place (dense_attention does), and backward receives them as forward left them; out [B, S, Hq, hd] and lse
/// [B, Hq, S] are overwritten. `slot` is the micro-batch's
/// activation slot: a policy that keeps state for backward (the K/V it received) keeps it per slot.
template <class T, class Space>
struct attention_forward_args {
  view<T, Space> q, k;
  view<const T, Space> v;
  view<T, Space> out;
  view<accum_t<T>, Space> lse;
  std::span<const position_chunk> positions;
  view<const float, Space> inv_freq;  // [hd / 2]
  std::size_t slot = 0;
};

/// The operands of an attention backward: q, k as forward left them, the saved out and lse, and dout;
/// dq, dk (w.r.t. the pre-RoPE q and k) and dv are overwritten.
template <class T, class Space>
struct attention_backward_args {
  view<const T, Space> q, k, v, out;
  view<const accum_t<T>, Space> lse;
  view<const T, Space> dout;
  view<T, Space> dq, dk, dv;
  std::span<const position_chunk> positions;
  view<const float, Space> inv_freq;
  std::size_t slot = 0;
};

/// Causal grouped-query attention of one sequence piece on one device, scale 1/sqrt(hd). Several chunks are
/// accepted when they are consecutive (they are one run of positions); scattered chunks need a policy that
/// sees the other pieces (context parallelism).
struct dense_attention {
  template <class Exec, class T>
  void forward(const Exec& ex, const attention_forward_args<T, space_t<Exec>>& a) const {
    const attention_params p = params(a.q.dim(3), a.positions);
    apply_rope(ex, a.q, a.inv_freq, a.positions, false);
    apply_rope(ex, a.k, a.inv_freq, a.positions, false);
    attention_forward(ex, view<const T, space_t<Exec>>(a.q), view<const T, space_t<Exec>>(a.k), a.v, a.out, a.lse, p);
  }

  template <class Exec, class T>
  void backward(const Exec& ex, const attention_backward_args<T, space_t<Exec>>& a) const {
    attention_backward(ex, a.q, a.k, a.v, a.out, a.lse, a.dout, a.dq, a.dk, a.dv, params(a.q.dim(3), a.positions));
    apply_rope(ex, a.dq, a.inv_freq, a.positions, true);
    apply_rope(ex, a.dk, a.inv_freq, a.positions, true);
  }

 private:
  static attention_params params(std::int64_t head_dim, std::span<const position_chunk> positions) {
    require(!positions.empty(), "dense_attention: no position chunks");
    for (std::size_t i = 1; i < positions.size(); ++i)
      require(positions[i].pos0 == positions[i - 1].pos0 + positions[i - 1].rows, [&] {
        return "dense_attention: chunk " + std::to_string(i) + " starts at position " +
               std::to_string(positions[i].pos0) + ", not where chunk " + std::to_string(i - 1) + " ends (" +
               std::to_string(positions[i - 1].pos0 + positions[i - 1].rows) +
               "); scattered chunks need a context-parallel attention policy";
      });
    attention_params p;
    p.scale = float(1.0 / std::sqrt(double(head_dim)));
    p.causal = true;
    p.q_pos0 = p.kv_pos0 = positions[0].pos0;
    return p;
  }
};

/// A plain linear layer y = x · wᵀ (w stored [out, in], as in Hugging Face), by gemm.
struct dense_projection {
  template <class Exec, class T>
  void forward(const Exec& ex, std::type_identity_t<view<const T, space_t<Exec>>> x,
               std::type_identity_t<view<const T, space_t<Exec>>> w, view<T, space_t<Exec>> y) const {
    gemm(ex, op::none, op::transpose, 1.0f, x, w, 0.0f, y);
  }

  template <class Exec, class T, class G>
  void backward(const Exec& ex, std::type_identity_t<view<const T, space_t<Exec>>> x,
                std::type_identity_t<view<const T, space_t<Exec>>> w,
                std::type_identity_t<view<const T, space_t<Exec>>> dy, view<T, space_t<Exec>> dx,
                view<G, space_t<Exec>> dw) const {
    backward_input<Exec, T>(ex, x, w, dy, dx);
    backward_weight<Exec, T, G>(ex, x, dy, dw);
  }
  /// The two halves of backward, for a split (zero-bubble) backward: dx = dy · w, and dw += dyᵀ · x.
  template <class Exec, class T>
  void backward_input(const Exec& ex, std::type_identity_t<view<const T, space_t<Exec>>>,
                      std::type_identity_t<view<const T, space_t<Exec>>> w,
                      std::type_identity_t<view<const T, space_t<Exec>>> dy, view<T, space_t<Exec>> dx) const {
    gemm(ex, op::none, op::none, 1.0f, dy, w, 0.0f, dx);
  }
  template <class Exec, class T, class G>
  void backward_weight(const Exec& ex, std::type_identity_t<view<const T, space_t<Exec>>> x,
                       view<const T, space_t<Exec>> dy, view<G, space_t<Exec>> dw) const {
    gemm(ex, op::transpose, op::none, 1.0f, dy, x, 1.0f, dw);
  }
};

/// Which residual add a residual policy is called for.
enum class sublayer { attention, mlp };

/// Where the residual stream is touched (see the top of this file).
template <class Space>
struct stream_site {
  std::int64_t layer = 0;
  nn::sublayer sublayer = nn::sublayer::attention;
  std::size_t slot = 0;
  view<const std::int32_t, Space> tokens;
};

/// The plain residual stream: out = x + y.
struct dense_residual {
  template <class Exec, class T>
  void forward(const Exec& ex, const stream_site<space_t<Exec>>&, std::type_identity_t<view<const T, space_t<Exec>>> x,
               view<T, space_t<Exec>> y) const {
    axpy(ex, 1.0f, x, y);
  }
  template <class Exec, class T>
  void backward(const Exec&, const stream_site<space_t<Exec>>&, view<T, space_t<Exec>>) const {}
};

/// The token embedding table lookup (kernels/embedding.hpp).
struct token_embedding {
  template <class Exec, class T>
  void forward(const Exec& ex, const stream_site<space_t<Exec>>& site,
               std::type_identity_t<view<const T, space_t<Exec>>> weight, view<T, space_t<Exec>> x) const {
    embedding_forward(ex, site.tokens, weight, x);
  }
  template <class Exec, class T, class G>
  void backward(const Exec& ex, const stream_site<space_t<Exec>>& site, view<const T, space_t<Exec>> dx,
                view<G, space_t<Exec>> dweight) const {
    embedding_backward(ex, site.tokens, dx, dweight);
  }
};

/// Which output projection a projection policy is made for.
enum class projection_site { attention_output, mlp_output };

/// What a policy factory knows when it makes a layer's policies: the layer (-1 for the embedding), the model's
/// configuration and the parameter store the policy may declare tensors in.
template <class Store>
struct block_site {
  std::int64_t layer = 0;
  const llama_config& config;
  Store& parameters;
};

/// The policies of a plain Llama.
struct dense_blocks {
  template <class Store>
  dense_attention attention(const block_site<Store>&) const {
    return {};
  }
  template <class Store>
  dense_projection projection(const block_site<Store>&, projection_site) const {
    return {};
  }
  template <class Store>
  dense_residual residual(const block_site<Store>&) const {
    return {};
  }
  template <class Store>
  token_embedding embedding(const block_site<Store>&) const {
    return {};
  }
};

/// P can be the attention of a block running on Exec with activations of type T.
template <class P, class Exec, class T>
concept AttentionPolicy = requires(P& p, const Exec& ex, const attention_forward_args<T, space_t<Exec>>& fwd,
                                   const attention_backward_args<T, space_t<Exec>>& bwd) {
  p.forward(ex, fwd);
  p.backward(ex, bwd);
};

/// P can be an output projection of a block running on Exec, activations and weights T, weight gradients G.
template <class P, class Exec, class T, class G>
concept ProjectionPolicy = requires(P& p, const Exec& ex, view<const T, space_t<Exec>> in, view<T, space_t<Exec>> out,
                                    view<G, space_t<Exec>> grad) {
  p.forward(ex, in, in, out);
  p.backward(ex, in, in, in, out, grad);
};

/// P can be the residual add of a block running on Exec with activations of type T.
template <class P, class Exec, class T>
concept ResidualPolicy = requires(P& p, const Exec& ex, const stream_site<space_t<Exec>>& site,
                                  view<const T, space_t<Exec>> in, view<T, space_t<Exec>> out) {
  p.forward(ex, site, in, out);
  p.backward(ex, site, out);
};

/// P can be the token embedding of a model on Exec with weights T and weight gradients G.
template <class P, class Exec, class T, class G>
concept EmbeddingPolicy =
    requires(P& p, const Exec& ex, const stream_site<space_t<Exec>>& site, view<const T, space_t<Exec>> in,
             view<T, space_t<Exec>> out, view<G, space_t<Exec>> grad) {
      p.forward(ex, site, in, out);
      p.backward(ex, site, in, grad);
    };

}  // namespace subspace::nn

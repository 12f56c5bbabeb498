#pragma once
// Grouped-query scaled-dot-product attention with a causal mask on global positions (docs/llama-kernels.md):
//
//   attention_forward(ex, q[B,S,Hq,hd], k[B,Skv,Hkv,hd], v[B,Skv,Hkv,hd], out[B,S,Hq,hd], lse[B,Hq,S], params)
//   attention_backward(ex, q, k, v, out, lse, dout, dq, dk, dv, params)        dq, dk, dv overwritten
//
// Query head h reads KV head h / (Hq / Hkv). Query row i sits at global position q_pos0 + i, key j at kv_pos0 + j;
// with params.causal, row i sees key j when q_pos0 + i >= kv_pos0 + j. For each row
//
//   s_j = scale * q_i . k_j  (visible j),   lse_i = log sum_j exp(s_j),   out_i = sum_j exp(s_j - lse_i) v_j
//
// and a row that sees no key gets out = 0 and lse = -inf (its gradients are 0). The backward pass recomputes
// p_ij = exp(s_ij - lse_i) from the lse it is given and uses D_i = dout_i . out_i, so it also works on one KV block
// when out and lse are the merged results over several blocks (context parallelism): the gradients of block b
// are then exactly block b's share of the full attention's gradients. Two blocks' results merge as
//
//   lse = log(exp(lse_1) + exp(lse_2)),   out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2,
//
// which attention_merge(ex, out_part, lse_part, out_acc, lse_acc) applies to running accumulators in A (start
// them at out 0, lse -inf; a part row that saw no key leaves its row as it is).
//
// Host (this file): the readable reference, templated on the element type T (float, double, bf16, fp16; compute
// in A = accum_t<T>, lse in A), any strides; (batch, head) pairs are spread over at most ex.concurrency() threads
// (core/parallel.hpp), and the result does not depend on the thread count. CUDA (detail/cuda/attention.cuh): bf16
// q/k/v/out/dout/dq/ dk/dv, fp32 lse and fp32 math, head dims 16, 32, 64 and 128, a fused flash-attention-style kernel
// for each pass.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor.hpp"
#include "../core/vector_math.hpp"
#include "elementwise.hpp"
#include "gemm.hpp"

namespace subspace {

/// Which CUDA kernels compute the forward and the backward (the host ignores it): `fastest` takes the Hopper
/// kernels (wgmma fed by TMA) where the device is an H100-class GPU, the build has sm_90a code and the head dim is
/// 64 or 128, else the mma.sync kernels; `portable` always the mma.sync kernels. Both are exact to bf16 rounding,
/// not to each other.
enum class attention_kernel { fastest, portable };

/// What attention computes besides its operands: the score scale (usually 1/sqrt(hd)), whether the causal mask
/// applies, the global positions of query row 0 and key 0 that the mask compares, and the CUDA kernel choice.
struct attention_params {
  float scale;
  bool causal = true;
  std::int64_t q_pos0 = 0, kv_pos0 = 0;
  attention_kernel kernel = attention_kernel::fastest;
};

/// Whether attention in `Space` takes head dimension `hd`: the host kernels take any, the CUDA kernels are
/// instantiated for 16, 32, 64 and 128. Models check it when they are built, before a step fails on it.
template <class Space>
constexpr bool attention_supports_head_dim(std::int64_t hd) {
  if constexpr (std::is_same_v<Space, device_space>) return hd == 16 || hd == 32 || hd == 64 || hd == 128;
  return hd > 0;
}

namespace detail::attention {

/// The sizes of one attention call, checked.
struct dims {
  std::int64_t batch = 0, seq = 0, seq_kv = 0, heads = 0, kv_heads = 0, head_dim = 0;
  std::int64_t group() const { return heads / kv_heads; }
};

/// Throws invalid_argument "<op>: <name> has shape [..], expected [..]" unless v has shape `want`.
template <class V>
void require_shape(const V& v, const shape& want, const char* op, const char* name) {
  require(v.shape() == want, [&] {
    return std::string(op) + ": " + name + " has shape " + to_string(v.shape()) + ", expected " + to_string(want);
  });
}

/// Checks q, k, v, lse and the parameters (the callers check their other operands with require_shape); returns the
/// sizes.
template <class VQ, class VK, class VV, class VL>
dims check(const char* op, const VQ& q, const VK& k, const VV& v, const VL& lse, const attention_params& p) {
  require(q.rank() == 4,
          [&] { return std::string(op) + ": q must have rank 4 [B, S, Hq, hd], got shape " + to_string(q.shape()); });
  require(k.rank() == 4, [&] {
    return std::string(op) + ": k must have rank 4 [B, Skv, Hkv, hd], got shape " + to_string(k.shape());
  });
  dims d{q.dim(0), q.dim(1), k.dim(1), q.dim(2), k.dim(2), q.dim(3)};
  require(k.dim(0) == d.batch && k.dim(3) == d.head_dim, [&] {
    return std::string(op) + ": k has shape " + to_string(k.shape()) + " but q has shape " + to_string(q.shape()) +
           " (batch and head dim must agree)";
  });
  require(d.kv_heads > 0 && d.heads % d.kv_heads == 0, [&] {
    return std::string(op) + ": the query heads (" + std::to_string(d.heads) + ", q " + to_string(q.shape()) +
           ") must be a positive multiple of the KV heads (" + std::to_string(d.kv_heads) + ", k " +
           to_string(k.shape()) + ")";
  });
  require_shape(v, k.shape(), op, "v");
  require_shape(lse, shape{d.batch, d.heads, d.seq}, op, "lse [B, Hq, S]");
  require(std::isfinite(p.scale), [&] { return std::string(op) + ": params.scale must be finite"; });
  return d;
}

/// Runs f(task) for every task in [0, tasks) on the threads of `ex` worth starting for `flops` of work. Each task is
/// independent, so the results do not depend on the thread count.
template <class F>
void for_each_task(const exec::host& ex, std::int64_t tasks, double flops, F&& f) {
  parallel_for(for_flops(ex, flops), tasks, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t t = first; t < last; ++t) f(t);
  });
}

/// The keys [0, visible_keys(i)) are the ones query row i may see.
inline std::int64_t visible_keys(const dims& d, const attention_params& p, std::int64_t i) {
  if (!p.causal) return d.seq_kv;
  const std::int64_t last = p.q_pos0 + i - p.kv_pos0;  // the last visible key index
  return std::clamp<std::int64_t>(last + 1, 0, d.seq_kv);
}

/// Row (b, s, h) of a [B, S, H, hd] view and the stride between its elements.
template <class V>
auto row(const V& x, std::int64_t b, std::int64_t s, std::int64_t h) {
  return x.data() + b * x.stride(0) + s * x.stride(1) + h * x.stride(2);
}

/// One row of attention_merge: folds (o_part, l_part) into (o_acc, l_acc) through their log-sum-exp.
template <class A, class O>
SUBSPACE_HD void merge_row(const O* o_part, std::int64_t sp, A l_part, A* o_acc, std::int64_t sa, A& l_acc,
                           std::int64_t hd) {
  const A m = l_acc > l_part ? l_acc : l_part;
  if (l_part == -std::numeric_limits<A>::infinity()) return;  // the part saw no key
  const A l = m + std::log(std::exp(l_acc - m) + std::exp(l_part - m));
  const A wa = std::exp(l_acc - l), wp = std::exp(l_part - l);
  for (std::int64_t e = 0; e < hd; ++e) o_acc[e * sa] = wa * o_acc[e * sa] + wp * A(o_part[e * sp]);
  l_acc = l;
}

/// Query rows are processed in blocks of this many: a block's scores are one gemm over the keys its last row sees
/// (the causal triangle costs at most a block's worth of masked scores per row).
inline constexpr std::int64_t rows_per_block = 64;

/// Query rows [i0, i0 + rows) and the keys [0, keys) the last of them sees.
struct row_block {
  std::int64_t rows = 0, keys = 0;
};
inline row_block block_of(const dims& d, const attention_params& p, std::int64_t i0) {
  const std::int64_t rows = std::min(rows_per_block, d.seq - i0);
  return {rows, visible_keys(d, p, i0 + rows - 1)};
}

/// Rows [s0, s0 + n) of head h of batch entry b of a [B, S, H, hd] view, as an [n, hd] matrix (the view's strides).
template <class T>
view<T, host_space> rows(const view<T, host_space>& x, std::int64_t b, std::int64_t h, std::int64_t s0,
                         std::int64_t n) {
  return view<T, host_space>(x.data() + b * x.stride(0) + s0 * x.stride(1) + h * x.stride(2), shape{n, x.dim(3)},
                             {x.stride(1), x.stride(3)});
}

/// One task's scratch: a block's scores (or probabilities) and their gradients, rows_per_block x seq_kv, in A.
template <class A>
struct block_buffers {
  host_tensor<A> s, ds;
  explicit block_buffers(std::int64_t seq_kv)
      : s({rows_per_block, std::max<std::int64_t>(seq_kv, 1)}),
        ds({rows_per_block, std::max<std::int64_t>(seq_kv, 1)}) {}
  view<A, host_space> scores(const row_block& r) { return part(s, r.rows, r.keys); }
  view<A, host_space> score_grads(const row_block& r) { return part(ds, r.rows, r.keys); }

 private:
  static view<A, host_space> part(host_tensor<A>& t, std::int64_t rows, std::int64_t cols) {
    return view<A, host_space>(t.data(), shape{rows, cols}, {t.dim(1), 1});
  }
};

/// Softmax in place over the first n of a row's `keys` scores (the rest, masked, become 0); returns the row's
/// log-sum-exp (-inf when n == 0).
template <class A>
A softmax_row(const exec::host& ex, A* s, std::int64_t n, std::int64_t keys) {
  if (n == 0) {  // a row of the block that sees no key (context parallelism): max_of needs one element
    std::fill(s, s + keys, A(0));
    return -std::numeric_limits<A>::infinity();
  }
  const A m = max_of(s, n);
  exp_shifted(ex, s, n, m);
  const A sum = sum_of(s, n), inv = A(1) / sum;
  for_each_index(ex, n, [&](std::int64_t j) { s[j] *= inv; });
  std::fill(s + n, s + keys, A(0));  // the masked keys
  return m + std::log(sum);
}

template <class A, class X, class Y>
A dot(const X* x, std::int64_t sx, const Y* y, std::int64_t sy, std::int64_t n) {
  A s = 0;
  for (std::int64_t e = 0; e < n; ++e) s += A(x[e * sx]) * A(y[e * sy]);
  return s;
}

}  // namespace detail::attention

/// out = softmax(scale * q k^T, masked) v and lse = the rows' log-sum-exp, on the host (see the top of the file).
template <class Q>
  requires is_element_v<std::remove_const_t<Q>>
void attention_forward(const exec::host& ex, view<Q, host_space> q, view<const std::remove_const_t<Q>, host_space> k,
                       view<const std::remove_const_t<Q>, host_space> v, view<std::remove_const_t<Q>, host_space> out,
                       view<accum_t<std::remove_const_t<Q>>, host_space> lse, const attention_params& p) {
  using T = std::remove_const_t<Q>;
  using A = accum_t<T>;
  namespace at = detail::attention;
  const at::dims d = at::check("attention_forward", q, k, v, lse, p);
  at::require_shape(out, q.shape(), "attention_forward", "out");
  const std::int64_t hd = d.head_dim;
  const double flops = 4.0 * double(d.batch * d.heads) * double(d.seq) * double(d.seq_kv) * double(hd);

  at::for_each_task(ex, d.batch * d.heads, flops, [&](std::int64_t task) {
    const std::int64_t b = task / d.heads, h = task % d.heads, hk = h / d.group();
    const exec::host one{1, ex.simd};  // this task's thread
    at::block_buffers<A> buf(d.seq_kv);
    for (std::int64_t i0 = 0; i0 < d.seq; i0 += at::rows_per_block) {
      const at::row_block r = at::block_of(d, p, i0);
      if (r.keys > 0) {
        const auto s = buf.scores(r);
        gemm(one, op::none, op::transpose, p.scale, at::rows(q, b, h, i0, r.rows), at::rows(k, b, hk, 0, r.keys), 0.0f,
             s);
        for (std::int64_t i = 0; i < r.rows; ++i)
          lse(b, h, i0 + i) = at::softmax_row(one, &s(i, 0), at::visible_keys(d, p, i0 + i), r.keys);
        gemm(one, op::none, op::none, 1.0f, view<const A, host_space>(s), at::rows(v, b, hk, 0, r.keys), 0.0f,
             at::rows(out, b, h, i0, r.rows));
      }
      for (std::int64_t i = 0; i < r.rows; ++i) {
        if (at::visible_keys(d, p, i0 + i) > 0) continue;  // a row that sees no key
        T* oi = at::row(out, b, i0 + i, h);
        for (std::int64_t e = 0; e < hd; ++e) oi[e * out.stride(3)] = T(0.0f);
        lse(b, h, i0 + i) = -std::numeric_limits<A>::infinity();
      }
    }
  });
}

/// dq, dk, dv (overwritten) of attention_forward given dout, from the out and lse passed in (see the top).
template <class Q>
  requires is_element_v<std::remove_const_t<Q>>
void attention_backward(const exec::host& ex, view<Q, host_space> q, view<const std::remove_const_t<Q>, host_space> k,
                        view<const std::remove_const_t<Q>, host_space> v,
                        view<const std::remove_const_t<Q>, host_space> out,
                        view<const accum_t<std::remove_const_t<Q>>, host_space> lse,
                        view<const std::remove_const_t<Q>, host_space> dout,
                        view<std::remove_const_t<Q>, host_space> dq, view<std::remove_const_t<Q>, host_space> dk,
                        view<std::remove_const_t<Q>, host_space> dv, const attention_params& p) {
  using T = std::remove_const_t<Q>;
  using A = accum_t<T>;
  namespace at = detail::attention;
  const char* op_name = "attention_backward";
  const at::dims d = at::check(op_name, q, k, v, lse, p);
  at::require_shape(out, q.shape(), op_name, "out");
  at::require_shape(dout, q.shape(), op_name, "dout");
  at::require_shape(dq, q.shape(), op_name, "dq");
  at::require_shape(dk, k.shape(), op_name, "dk");
  at::require_shape(dv, k.shape(), op_name, "dv");
  const std::int64_t hd = d.head_dim, G = d.group();
  const double flops = 10.0 * double(d.batch * d.heads) * double(d.seq) * double(d.seq_kv) * double(hd);

  // One task per (batch, KV head): it owns dk and dv of that head and dq of the query heads that share it.
  at::for_each_task(ex, d.batch * d.kv_heads, flops, [&](std::int64_t task) {
    const std::int64_t b = task / d.kv_heads, hk = task % d.kv_heads;
    const exec::host one{1, ex.simd};
    at::block_buffers<A> buf(d.seq_kv);
    host_tensor<A> dk_acc({d.seq_kv, hd}), dv_acc({d.seq_kv, hd});
    fill(one, dk_acc.v(), A(0));
    fill(one, dv_acc.v(), A(0));
    for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      for (std::int64_t i0 = 0; i0 < d.seq; i0 += at::rows_per_block) {
        const at::row_block r = at::block_of(d, p, i0);
        const auto qr = at::rows(q, b, h, i0, r.rows);
        const auto dor = at::rows(dout, b, h, i0, r.rows);
        const auto dqr = at::rows(dq, b, h, i0, r.rows);
        if (r.keys == 0) {
          fill(one, dqr, T(0.0f));
          continue;
        }
        const auto kr = at::rows(k, b, hk, 0, r.keys);
        const auto s = buf.scores(r), dp = buf.score_grads(r);
        // p_ij from the lse (0 where masked, and on a row whose lse is -inf), then ds_ij = p_ij (dp_ij - D_i).
        gemm(one, op::none, op::transpose, p.scale, qr, kr, 0.0f, s);
        gemm(one, op::none, op::transpose, 1.0f, dor, at::rows(v, b, hk, 0, r.keys), 0.0f, dp);
        for (std::int64_t i = 0; i < r.rows; ++i) {
          const std::int64_t n = at::visible_keys(d, p, i0 + i);
          const A l = lse(b, h, i0 + i);
          const bool sees = n > 0 && l != -std::numeric_limits<A>::infinity();
          const A D = sees ? at::dot<A>(at::row(dout, b, i0 + i, h), dout.stride(3), at::row(out, b, i0 + i, h),
                                        out.stride(3), hd)
                           : A(0);
          A* si = &s(i, 0);
          A* dpi = &dp(i, 0);
          const std::int64_t live = sees ? n : 0;
          exp_shifted(one, si, live, l);
          for (std::int64_t j = live; j < r.keys; ++j) si[j] = A(0);
          for (std::int64_t j = 0; j < r.keys; ++j) dpi[j] = si[j] * (dpi[j] - D);
        }
        const view<const A, host_space> pc(s), dsc(dp);
        gemm(one, op::none, op::none, p.scale, dsc, kr, 0.0f, dqr);
        gemm(one, op::transpose, op::none, 1.0f, dsc, qr, 1.0f, dk_acc.v().slice(0, r.keys));
        gemm(one, op::transpose, op::none, 1.0f, pc, dor, 1.0f, dv_acc.v().slice(0, r.keys));
      }
    }
    for (std::int64_t j = 0; j < d.seq_kv; ++j) {
      T* dkj = at::row(dk, b, j, hk);
      T* dvj = at::row(dv, b, j, hk);
      for (std::int64_t e = 0; e < hd; ++e) {
        dkj[e * dk.stride(3)] = convert<T>(A(p.scale) * dk_acc(j, e));
        dvj[e * dv.stride(3)] = convert<T>(dv_acc(j, e));
      }
    }
  });
}

/// Folds one block's attention result (out_part [B, S, H, hd], lse_part [B, H, S]) into the running accumulators
/// out_acc and lse_acc (in A = accum_t<T>; any strides), as the top of the file says.
template <class O>
  requires is_element_v<std::remove_const_t<O>>
void attention_merge(const exec::host&, view<O, host_space> out_part,
                     view<const accum_t<std::remove_const_t<O>>, host_space> lse_part,
                     view<accum_t<std::remove_const_t<O>>, host_space> out_acc,
                     view<accum_t<std::remove_const_t<O>>, host_space> lse_acc) {
  using A = accum_t<std::remove_const_t<O>>;
  namespace at = detail::attention;
  require(out_part.rank() == 4, [&] {
    return "attention_merge: out_part must have rank 4 [B, S, H, hd], got shape " + to_string(out_part.shape());
  });
  const std::int64_t B = out_part.dim(0), S = out_part.dim(1), H = out_part.dim(2), hd = out_part.dim(3);
  at::require_shape(out_acc, out_part.shape(), "attention_merge", "out_acc");
  at::require_shape(lse_part, shape{B, H, S}, "attention_merge", "lse_part [B, H, S]");
  at::require_shape(lse_acc, shape{B, H, S}, "attention_merge", "lse_acc [B, H, S]");
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t s = 0; s < S; ++s)
      for (std::int64_t h = 0; h < H; ++h)
        at::merge_row<A>(at::row(out_part, b, s, h), out_part.stride(3), lse_part(b, h, s), at::row(out_acc, b, s, h),
                         out_acc.stride(3), lse_acc(b, h, s), hd);
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/attention.cuh"
#endif

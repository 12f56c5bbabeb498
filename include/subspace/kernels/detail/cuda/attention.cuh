#pragma once
// attention_forward / attention_backward on CUDA: fused flash-attention-style kernels (FlashAttention-2's
// algorithm) on bf16 tensor cores (mma.sync m16n8k16, fp32 accumulation), fp32 softmax statistics. On Hopper (H100,
// H200) with an sm_90a image, head dims 64 and 128 go to the Hopper kernels instead (attention_sm90.cuh,
// attention_sm90_backward.cuh) unless attention_params::kernel asks for these portable ones.
//
// Operands: q/out/dout/dq [B, S, Hq, hd], k/v/dk/dv [B, Skv, Hkv, hd] in bf16, lse [B, Hq, S] in fp32. Any strides
// with unit stride in the head dim and 16-byte aligned rows (strides and the data pointer multiples of 8
// elements), so a block of a longer sequence can be passed as a strided view. Head dims 16, 32, 64 and 128.
//
// Forward. One block of W warps per (BM = 16 W query rows, head, batch); each warp owns 16 rows. The block walks
// the keys in tiles of BN, K and V double-buffered in shared memory (cp.async), with the online softmax in the
// exp2 domain: S = Q K^T and O += P V run on tensor cores with Q held in registers as A fragments and P re-used
// from the score accumulators (the m16n8 accumulator layout is the m16n8k16 A-fragment layout). Causal blocks stop
// at the diagonal and mask only the tiles that cross it; the blocks with the most keys start first.
//
// Backward. A small kernel computes D = rowsum(dout * out) (fp32) and the accumulator for dq is zeroed. Then one
// block of W warps per (BN = 16 W keys, KV head, batch) keeps K and V of its keys in shared memory and walks every
// query tile (BM rows) of every query head that shares the KV head, Q, dout, lse and D double-buffered: S^T = K Q^T,
// P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q, with dK and dV in
// registers for the whole walk, so dk and dv need no atomics and are written once, in bf16. dS goes through
// shared memory for dQ = dS K, which the block adds into an fp32 accumulator [B, Hq, S, hd] with 8-byte vector
// atomics (red.global.add on sm_90); a last kernel scales it into dq in bf16. The scratch (fp32 D and the dq
// accumulator, 4 (hd + 1) B Hq S bytes) is allocated and freed in stream order (cudaMallocAsync).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../../core/cuda/memory.cuh"
#include "../../attention.hpp"
#include "attention_common.cuh"
#include "attention_sm90.cuh"
#include "attention_sm90_backward.cuh"

namespace subspace {
namespace cuda_detail::attention {

// ---- PTX wrappers ---------------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_address(const void* p) { return unsigned(__cvta_generic_to_shared(p)); }

/// 16 bytes global -> shared (a shared-window address), asynchronously; zero-filled (nothing read) when !valid.
__device__ __forceinline__ void cp_async16(unsigned smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}

/// 4 bytes global -> shared, asynchronously; zero-filled when !valid.
__device__ __forceinline__ void cp_async4(unsigned smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 4 : 0) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses (shared window) of matrix m.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

/// The same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

/// d += a (16x16, row) * b (16x8, col), bf16 in, fp32 accumulate.
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// Two floats as a bf16 pair (lo in the low half), round to nearest even.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&v);
}

// ---- Tiles ----------------------------------------------------------------------------------------------------

/// Shared-memory rows of hd bf16 are padded by 16 bytes: ldmatrix's eight 16-byte row reads then fall in eight
/// different 4-bank groups (row strides of 48, 80, 144 and 272 bytes), so no bank conflicts and no swizzle.
template <int HD>
inline constexpr int row_pitch = HD + 8;

/// Rows [0, ROWS) of a tile, `valid` of them from global memory (row r at g + r * stride), the rest zero-filled,
/// into shared memory at byte address s with row_pitch<HD>; cp.async, 16 bytes per copy, over THREADS threads.
template <int HD, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(unsigned s, const __nv_bfloat16* g, std::int64_t stride, int valid) {
  constexpr int chunks = HD / 8, total = ROWS * chunks, iters = (total + THREADS - 1) / THREADS;
#pragma unroll
  for (int it = 0; it < iters; ++it) {
    const int c = it * THREADS + int(threadIdx.x);
    if (total % THREADS == 0 || c < total) {
      const int r = c / chunks, col = (c % chunks) * 8;
      const bool ok = r < valid;
      cp_async16(s + unsigned(r * row_pitch<HD> + col) * 2u, ok ? g + r * stride + col : g, ok);
    }
  }
}

/// Per-lane byte offsets of ldmatrix.x4 row addresses in a tile of pitch `pitch_bytes`:
///  * frag_a: the 16x16 A fragment at (0, 0) (matrices: rows 0-7 / 8-15 x cols 0-7, then cols 8-15), and equally
///    the .trans B fragments of two 8-column n-tiles of a [k][n] tile (rows = k).
///  * frag_b: the B fragments of two n-tiles of an [n][k] tile (matrices: n 0-7 x k 0-7, k 8-15, n 8-15 x ...),
///    and equally the .trans A fragment of a [k][m] tile.
__device__ __forceinline__ unsigned frag_a(int lane, int pitch_bytes) {
  return unsigned((lane & 15) * pitch_bytes + (lane >> 4) * 16);
}
__device__ __forceinline__ unsigned frag_b(int lane, int pitch_bytes) {
  return unsigned(((lane >> 4) * 8 + (lane & 7)) * pitch_bytes + ((lane >> 3) & 1) * 16);
}

/// Block shapes. Forward: WARPS warps of 16 query rows each, key tiles of BN. Backward: WARPS warps of 16 keys
/// each (BN = 16 WARPS keys per block), query tiles of BM rows; MIN_BLOCKS is the residency the registers aim at.
template <int HD>
struct forward_shape {
  static constexpr int warps = 8, bn = 64, min_blocks = HD <= 64 ? 2 : 1;
};
template <int HD>
struct backward_shape {
  static constexpr int warps = HD <= 64 ? 4 : 8, bm = HD <= 64 ? 64 : 32, min_blocks = 1;
};

template <int HD>
constexpr std::size_t forward_smem_bytes() {
  using F = forward_shape<HD>;
  return std::size_t(16 * F::warps + 4 * F::bn) * row_pitch<HD> * 2;  // Q, then K and V twice (two stages)
}
template <int HD>
constexpr std::size_t backward_smem_bytes() {
  using S = backward_shape<HD>;
  const int bn = 16 * S::warps;
  return std::size_t(2 * bn + 4 * S::bm) * row_pitch<HD> * 2  // K, V; Q and dO twice
         + std::size_t(4 * S::bm) * 4                         // lse and D twice
         + std::size_t(bn) * (S::bm + 8) * 2;                 // dS^T
}

// ---- Kernel parameters ----------------------------------------------------------------------------------------

struct forward_params {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  __nv_bfloat16* out;
  float* lse;
  bsh_strides qs, ks, vs, os;
  std::int64_t lse_b, lse_h, lse_s;
  int seq, seq_kv, group;
  bool causal;
  std::int64_t delta;  // q_pos0 - kv_pos0: row i sees key j when j <= i + delta
  float scale_log2;    // scale * log2(e)
};

struct backward_params {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const __nv_bfloat16* dout;
  const float* lse;
  float* d;         // [B, Hq, S], rowsum(dout * out)
  float* dq_accum;  // [B, Hq, S, hd]
  __nv_bfloat16* dk;
  __nv_bfloat16* dv;
  bsh_strides qs, ks, vs, dos, dks, dvs;
  std::int64_t lse_b, lse_h, lse_s;
  int seq, seq_kv, heads, group;
  bool causal;
  std::int64_t delta;
  float scale, scale_log2;
};

// ---- Forward --------------------------------------------------------------------------------------------------

template <int HD>
__global__ void __launch_bounds__(forward_shape<HD>::warps * 32, forward_shape<HD>::min_blocks)
    forward_kernel(const forward_params p) {
  constexpr int W = forward_shape<HD>::warps, BN = forward_shape<HD>::bn, BM = 16 * W, T = 32 * W;
  constexpr int LD = row_pitch<HD>, LDB = 2 * LD, KT = HD / 16, NT = BN / 8, DT = HD / 8;
  constexpr float neg_inf = -__builtin_huge_valf();
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* sq = reinterpret_cast<__nv_bfloat16*>(smem);
  const unsigned sq_a = smem_address(smem);
  const unsigned sk_a = sq_a + BM * LDB;  // two stages of BN rows
  const unsigned sv_a = sk_a + 2 * BN * LDB;

  const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);  // the blocks with the most keys first
  const int h = int(blockIdx.y), b = int(blockIdx.z), hk = h / p.group;
  const int i0 = m_block * BM, rows = min(BM, p.seq - i0);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const unsigned off_a = frag_a(lane, LDB), off_b = frag_b(lane, LDB);

  const __nv_bfloat16* qg = p.q + b * p.qs.b + h * p.qs.h + std::int64_t(i0) * p.qs.s;
  const __nv_bfloat16* kg = p.k + b * p.ks.b + hk * p.ks.h;
  const __nv_bfloat16* vg = p.v + b * p.vs.b + hk * p.vs.h;
  const int kv_end = key_end(p.causal, i0 + rows, p.delta, p.seq_kv);
  const int n_tiles = (kv_end + BN - 1) / BN;

  load_tile<HD, BM, T>(sq_a, qg, p.qs.s, rows);
  if (n_tiles > 0) {
    load_tile<HD, BN, T>(sk_a, kg, p.ks.s, min(BN, p.seq_kv));
    load_tile<HD, BN, T>(sv_a, vg, p.vs.s, min(BN, p.seq_kv));
  }
  cp_async_commit();

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m[2] = {neg_inf, neg_inf}, l[2] = {0.0f, 0.0f};
  unsigned qf[KT][4];
  const int r0 = i0 + warp * 16 + g;  // this thread's rows: r0 and r0 + 8
  int last_key[2];                    // the last key each of them sees (-1: none)
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) last_key[rh] = key_end(p.causal, r0 + 8 * rh + 1, p.delta, p.seq_kv) - 1;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int j0 = tile * BN, stage = tile & 1;
    if (tile + 1 < n_tiles) {
      const int jn = j0 + BN;
      load_tile<HD, BN, T>(sk_a + (stage ^ 1) * BN * LDB, kg + std::int64_t(jn) * p.ks.s, p.ks.s,
                           min(BN, p.seq_kv - jn));
      load_tile<HD, BN, T>(sv_a + (stage ^ 1) * BN * LDB, vg + std::int64_t(jn) * p.vs.s, p.vs.s,
                           min(BN, p.seq_kv - jn));
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (tile == 0) {
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) ldmatrix_x4(qf[kk], sq_a + warp * 16 * LDB + off_a + kk * 32);
    }
    const unsigned ks = sk_a + stage * BN * LDB + off_b, vs = sv_a + stage * BN * LDB + off_a;

    // S = Q K^T: 16 rows x BN keys per warp.
    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        unsigned kb[4];
        ldmatrix_x4(kb, ks + np * 16 * LDB + kk * 32);
        mma(s[2 * np], qf[kk], kb[0], kb[1]);
        mma(s[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // Scale into the exp2 domain; mask the tiles that cross the diagonal or the end of the keys.
    const bool full = j0 + BN <= p.seq_kv && (!p.causal || std::int64_t(j0 + BN - 1) <= std::int64_t(i0) + p.delta);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (!full) x = j0 + nt * 8 + 2 * t + (e & 1) <= last_key[e >> 1] ? x : neg_inf;
        s[nt][e] = x;
      }

    // Online softmax, per row half (rh = 0: row r0, rh = 1: row r0 + 8); a row's 4 threads share a quad.
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      float mx = neg_inf;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rh], s[nt][2 * rh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[rh], mx);
      const float base = m_new == neg_inf ? 0.0f : m_new;  // a row with nothing visible yet stays at 0
      const float corr = exp2_approx(m[rh] - base);
      m[rh] = m_new;
      l[rh] *= corr;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][2 * rh] *= corr;
        o[dt][2 * rh + 1] *= corr;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        s[nt][2 * rh] = exp2_approx(s[nt][2 * rh] - base);
        s[nt][2 * rh + 1] = exp2_approx(s[nt][2 * rh + 1] - base);
        l[rh] += s[nt][2 * rh] + s[nt][2 * rh + 1];
      }
    }

    // O += P V: P from the score registers (bf16), V transposed out of shared memory.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const unsigned a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                             pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < HD / 16; ++dp) {
        unsigned vb[4];
        ldmatrix_x4_trans(vb, vs + kk * 16 * LDB + dp * 32);
        mma(o[2 * dp], a, vb[0], vb[1]);
        mma(o[2 * dp + 1], a, vb[2], vb[3]);
      }
    }
    __syncthreads();  // this stage is reloaded two tiles on
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: out = O / l through this warp's 16 rows of sq (16-byte stores to global), lse = m + log2(l) in ln.
  float inv[2], lse[2];
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) finish_row(m[rh], l[rh], inv[rh], lse[rh]);
  __nv_bfloat16* so = sq + warp * 16 * LD;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    *reinterpret_cast<unsigned*>(so + g * LD + dt * 8 + 2 * t) = pack_bf16(o[dt][0] * inv[0], o[dt][1] * inv[0]);
    *reinterpret_cast<unsigned*>(so + (g + 8) * LD + dt * 8 + 2 * t) = pack_bf16(o[dt][2] * inv[1], o[dt][3] * inv[1]);
  }
  __syncwarp();
  __nv_bfloat16* og = p.out + b * p.os.b + h * p.os.h;
#pragma unroll
  for (int it = 0; it < HD / 16; ++it) {  // 16 rows x HD/8 chunks of 16 bytes, 32 lanes
    const int c = it * 32 + lane, r = c / (HD / 8), col = (c % (HD / 8)) * 8;
    const int row = i0 + warp * 16 + r;
    if (row < p.seq)
      *reinterpret_cast<uint4*>(og + std::int64_t(row) * p.os.s + col) =
          *reinterpret_cast<const uint4*>(so + r * LD + col);
  }
  if (t == 0) {
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int row = r0 + 8 * rh;
      if (row < p.seq) p.lse[b * p.lse_b + h * p.lse_h + std::int64_t(row) * p.lse_s] = lse[rh];
    }
  }
}

// ---- Backward -------------------------------------------------------------------------------------------------

/// D[b, h, i] = sum_e dout[b, i, h, e] * out[b, i, h, e] in fp32; HD / 8 threads per row, rows in D's order.
template <int HD>
__global__ void backward_dot_kernel(const __nv_bfloat16* out, bsh_strides os, const __nv_bfloat16* dout,
                                    bsh_strides dos, float* d, int heads, int seq, std::int64_t rows) {
  constexpr int TPR = HD / 8;
  const std::int64_t gid = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t row = gid / TPR;
  const int part = int(gid % TPR);
  float acc = 0.0f;
  if (row < rows) {
    const std::int64_t i = row % seq, h = (row / seq) % heads, b = row / (std::int64_t(seq) * heads);
    const uint4 x = *reinterpret_cast<const uint4*>(out + b * os.b + i * os.s + h * os.h + part * 8);
    const uint4 y = *reinterpret_cast<const uint4*>(dout + b * dos.b + i * dos.s + h * dos.h + part * 8);
    const __nv_bfloat162* xv = reinterpret_cast<const __nv_bfloat162*>(&x);
    const __nv_bfloat162* yv = reinterpret_cast<const __nv_bfloat162*>(&y);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 xf = __bfloat1622float2(xv[e]), yf = __bfloat1622float2(yv[e]);
      acc = fmaf(xf.x, yf.x, acc);
      acc = fmaf(xf.y, yf.y, acc);
    }
  }
#pragma unroll
  for (int off = TPR / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (row < rows && part == 0) d[row] = acc;
}

/// dq[b, i, h, :] = bf16(scale * accum[b, h, i, :]); 8 elements per thread, grid-stride.
template <int HD>
__global__ void backward_dq_kernel(const float* accum, __nv_bfloat16* dq, bsh_strides qs, int heads, int seq,
                                   std::int64_t rows, float scale) {
  constexpr int CPR = HD / 8;
  const std::int64_t items = rows * CPR;
  for (std::int64_t c = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < items;
       c += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t row = c / CPR;
    const int part = int(c % CPR);
    const std::int64_t i = row % seq, h = (row / seq) % heads, b = row / (std::int64_t(seq) * heads);
    const float4 lo = *reinterpret_cast<const float4*>(accum + c * 8);
    const float4 hi = *reinterpret_cast<const float4*>(accum + c * 8 + 4);
    const uint4 packed{pack_bf16(lo.x * scale, lo.y * scale), pack_bf16(lo.z * scale, lo.w * scale),
                       pack_bf16(hi.x * scale, hi.y * scale), pack_bf16(hi.z * scale, hi.w * scale)};
    *reinterpret_cast<uint4*>(dq + b * qs.b + i * qs.s + h * qs.h + part * 8) = packed;
  }
}

template <int HD>
__global__ void __launch_bounds__(backward_shape<HD>::warps * 32, backward_shape<HD>::min_blocks)
    backward_kernel(const backward_params p) {
  constexpr int W = backward_shape<HD>::warps, BM = backward_shape<HD>::bm, BN = 16 * W, T = 32 * W;
  constexpr int LD = row_pitch<HD>, LDB = 2 * LD, LDS = BM + 8, KT = HD / 16, MT = BM / 8, DT = HD / 8;
  constexpr int RG = BM / 16, CS = W / RG, CW = HD / CS;  // dQ: RG row groups x CS column slices of CW
  static_assert(W % RG == 0 && CW % 16 == 0, "backward_kernel: the dQ tile does not split over the warps");
  constexpr float neg_inf = -__builtin_huge_valf(), pos_inf = __builtin_huge_valf();
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* sk = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* sv = sk + BN * LD;
  __nv_bfloat16* sds = sv + BN * LD + 4 * BM * LD;         // dS^T: BN keys x BM queries (after Q and dO, x 2)
  float* slse = reinterpret_cast<float*>(sds + BN * LDS);  // two stages of BM
  float* sd = slse + 2 * BM;
  const unsigned sk_a = smem_address(smem), sv_a = sk_a + BN * LDB;
  const unsigned sq_a = sv_a + BN * LDB;       // two stages of BM rows
  const unsigned sdo_a = sq_a + 2 * BM * LDB;  // two stages
  const unsigned sds_a = smem_address(sds), slse_a = smem_address(slse), sd_a = smem_address(sd);

  const int n_block = int(blockIdx.x), hk = int(blockIdx.y), b = int(blockIdx.z);
  const int j0 = n_block * BN, keys = min(BN, p.seq_kv - j0);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const unsigned off_a = frag_a(lane, LDB), off_b = frag_b(lane, LDB), off_s = frag_b(lane, 2 * LDS);

  load_tile<HD, BN, T>(sk_a, p.k + b * p.ks.b + hk * p.ks.h + std::int64_t(j0) * p.ks.s, p.ks.s, keys);
  load_tile<HD, BN, T>(sv_a, p.v + b * p.vs.b + hk * p.vs.h + std::int64_t(j0) * p.vs.s, p.vs.s, keys);

  // The query tiles that can see these keys.
  const int first_row = first_row_seeing(p.causal, j0, p.delta, p.seq);
  const int m_tiles = (p.seq + BM - 1) / BM, m_begin = first_row / BM;
  const int per_head = first_row >= p.seq ? 0 : m_tiles - m_begin;
  const int n_iter = p.group * per_head;

  const auto issue = [&](int it, int stage) {
    const int h = hk * p.group + it / per_head, i0 = (m_begin + it % per_head) * BM, rows = min(BM, p.seq - i0);
    load_tile<HD, BM, T>(sq_a + stage * BM * LDB, p.q + b * p.qs.b + h * p.qs.h + std::int64_t(i0) * p.qs.s, p.qs.s,
                         rows);
    load_tile<HD, BM, T>(sdo_a + stage * BM * LDB, p.dout + b * p.dos.b + h * p.dos.h + std::int64_t(i0) * p.dos.s,
                         p.dos.s, rows);
    const float* lg = p.lse + b * p.lse_b + h * p.lse_h + std::int64_t(i0) * p.lse_s;
    const float* dg = p.d + (std::int64_t(b) * p.heads + h) * p.seq + i0;
    for (int c = int(threadIdx.x); c < BM; c += T) {
      const bool ok = c < rows;
      cp_async4(slse_a + unsigned(stage * BM + c) * 4u, ok ? lg + c * p.lse_s : lg, ok);
      cp_async4(sd_a + unsigned(stage * BM + c) * 4u, ok ? dg + c : dg, ok);
    }
  };
  if (n_iter > 0) issue(0, 0);
  cp_async_commit();

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.0f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.0f;
  }
  int first_query[2];  // the first query row each of this thread's keys (j0 + 16 warp + g, + 8) is seen by
#pragma unroll
  for (int kh = 0; kh < 2; ++kh) {
    const int j = j0 + warp * 16 + g + 8 * kh;
    first_query[kh] = j >= p.seq_kv ? p.seq : first_row_seeing(p.causal, j, p.delta, p.seq);
  }

  for (int it = 0; it < n_iter; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_iter) issue(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int h = hk * p.group + it / per_head, i0 = (m_begin + it % per_head) * BM;
    const unsigned qs = sq_a + stage * BM * LDB, dos = sdo_a + stage * BM * LDB;
    const float* ls = slse + stage * BM;
    const float* ds = sd + stage * BM;

    // S^T = K Q^T: this warp's 16 keys x BM queries.
    float st[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
      unsigned ka[4];
      ldmatrix_x4(ka, sk_a + warp * 16 * LDB + off_a + kk * 32);
#pragma unroll
      for (int np = 0; np < MT / 2; ++np) {
        unsigned qb[4];
        ldmatrix_x4(qb, qs + off_b + np * 16 * LDB + kk * 32);
        mma(st[2 * np], ka, qb[0], qb[1]);
        mma(st[2 * np + 1], ka, qb[2], qb[3]);
      }
    }

    // P^T = exp2(S^T scale log2(e) - lse log2(e)); 0 where masked, past the ends, or where the row saw nothing.
    const bool full = j0 + BN <= p.seq_kv && i0 + BM <= p.seq &&
                      (!p.causal || std::int64_t(j0 + BN - 1) <= std::int64_t(i0) + p.delta);
#pragma unroll
    for (int nt = 0; nt < MT; ++nt) {
      const float2 lv = *reinterpret_cast<const float2*>(ls + nt * 8 + 2 * t);
      const float l2[2] = {lv.x == neg_inf ? pos_inf : lv.x * log2e, lv.y == neg_inf ? pos_inf : lv.y * log2e};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pv = exp2_approx(fmaf(st[nt][e], p.scale_log2, -l2[e & 1]));
        if (!full) {
          const int i = i0 + nt * 8 + 2 * t + (e & 1);
          pv = i >= first_query[e >> 1] && i < p.seq ? pv : 0.0f;
        }
        st[nt][e] = pv;
      }
    }

    // dV += P^T dO.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const unsigned a[4] = {pack_bf16(st[2 * kk][0], st[2 * kk][1]), pack_bf16(st[2 * kk][2], st[2 * kk][3]),
                             pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                             pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < HD / 16; ++dp) {
        unsigned bb[4];
        ldmatrix_x4_trans(bb, dos + off_a + kk * 16 * LDB + dp * 32);
        mma(dv[2 * dp], a, bb[0], bb[1]);
        mma(dv[2 * dp + 1], a, bb[2], bb[3]);
      }
    }

    // dP^T = V dO^T, then dS^T = P^T (dP^T - D) in place.
    float dst[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) dst[i][0] = dst[i][1] = dst[i][2] = dst[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
      unsigned va[4];
      ldmatrix_x4(va, sv_a + warp * 16 * LDB + off_a + kk * 32);
#pragma unroll
      for (int np = 0; np < MT / 2; ++np) {
        unsigned ob[4];
        ldmatrix_x4(ob, dos + off_b + np * 16 * LDB + kk * 32);
        mma(dst[2 * np], va, ob[0], ob[1]);
        mma(dst[2 * np + 1], va, ob[2], ob[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < MT; ++nt) {
      const float2 dv2 = *reinterpret_cast<const float2*>(ds + nt * 8 + 2 * t);
      dst[nt][0] = st[nt][0] * (dst[nt][0] - dv2.x);
      dst[nt][1] = st[nt][1] * (dst[nt][1] - dv2.y);
      dst[nt][2] = st[nt][2] * (dst[nt][2] - dv2.x);
      dst[nt][3] = st[nt][3] * (dst[nt][3] - dv2.y);
    }

    // dK += dS^T Q; dS^T to shared memory for dQ.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const unsigned a[4] = {pack_bf16(dst[2 * kk][0], dst[2 * kk][1]), pack_bf16(dst[2 * kk][2], dst[2 * kk][3]),
                             pack_bf16(dst[2 * kk + 1][0], dst[2 * kk + 1][1]),
                             pack_bf16(dst[2 * kk + 1][2], dst[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < HD / 16; ++dp) {
        unsigned bb[4];
        ldmatrix_x4_trans(bb, qs + off_a + kk * 16 * LDB + dp * 32);
        mma(dk[2 * dp], a, bb[0], bb[1]);
        mma(dk[2 * dp + 1], a, bb[2], bb[3]);
      }
      *reinterpret_cast<unsigned*>(sds + (warp * 16 + g) * LDS + (2 * kk) * 8 + 2 * t) = a[0];
      *reinterpret_cast<unsigned*>(sds + (warp * 16 + g + 8) * LDS + (2 * kk) * 8 + 2 * t) = a[1];
      *reinterpret_cast<unsigned*>(sds + (warp * 16 + g) * LDS + (2 * kk + 1) * 8 + 2 * t) = a[2];
      *reinterpret_cast<unsigned*>(sds + (warp * 16 + g + 8) * LDS + (2 * kk + 1) * 8 + 2 * t) = a[3];
    }
    __syncthreads();

    // dQ (unscaled) += dS K for rows [16 rg, 16 rg + 16) x columns [c0, c0 + CW) of the tile, into the fp32
    // accumulator.
    const int rg = warp % RG, c0 = (warp / RG) * CW;
    unsigned dsa[BN / 16][4];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) ldmatrix_x4_trans(dsa[kk], sds_a + off_s + kk * 16 * 2 * LDS + rg * 32);
    const int row_a = i0 + rg * 16 + g, row_b = row_a + 8;
    float* acc_base = p.dq_accum + (std::int64_t(b) * p.heads + h) * p.seq * std::int64_t(HD);
#pragma unroll
    for (int cp = 0; cp < CW / 16; ++cp) {
      float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        unsigned kb[4];
        ldmatrix_x4_trans(kb, sk_a + off_a + kk * 16 * LDB + (c0 + cp * 16) * 2);
        mma(acc[0], dsa[kk], kb[0], kb[1]);
        mma(acc[1], dsa[kk], kb[2], kb[3]);
      }
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        const int col = c0 + cp * 16 + x * 8 + 2 * t;
        if (row_a < p.seq) atomic_add2(acc_base + std::int64_t(row_a) * HD + col, acc[x][0], acc[x][1]);
        if (row_b < p.seq) atomic_add2(acc_base + std::int64_t(row_b) * HD + col, acc[x][2], acc[x][3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: dK (scaled) and dV to bf16 through this warp's rows of sk / sv, then 16-byte stores.
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    const int r = warp * 16 + g;
    *reinterpret_cast<unsigned*>(sk + r * LD + dt * 8 + 2 * t) = pack_bf16(dk[dt][0] * p.scale, dk[dt][1] * p.scale);
    *reinterpret_cast<unsigned*>(sk + (r + 8) * LD + dt * 8 + 2 * t) =
        pack_bf16(dk[dt][2] * p.scale, dk[dt][3] * p.scale);
    *reinterpret_cast<unsigned*>(sv + r * LD + dt * 8 + 2 * t) = pack_bf16(dv[dt][0], dv[dt][1]);
    *reinterpret_cast<unsigned*>(sv + (r + 8) * LD + dt * 8 + 2 * t) = pack_bf16(dv[dt][2], dv[dt][3]);
  }
  __syncwarp();
  __nv_bfloat16* dkg = p.dk + b * p.dks.b + hk * p.dks.h;
  __nv_bfloat16* dvg = p.dv + b * p.dvs.b + hk * p.dvs.h;
#pragma unroll
  for (int it = 0; it < HD / 16; ++it) {
    const int c = it * 32 + lane, r = warp * 16 + c / (HD / 8), col = (c % (HD / 8)) * 8;
    const int j = j0 + r;
    if (j < p.seq_kv) {
      *reinterpret_cast<uint4*>(dkg + std::int64_t(j) * p.dks.s + col) =
          *reinterpret_cast<const uint4*>(sk + r * LD + col);
      *reinterpret_cast<uint4*>(dvg + std::int64_t(j) * p.dvs.s + col) =
          *reinterpret_cast<const uint4*>(sv + r * LD + col);
    }
  }
}

// ---- Host side ------------------------------------------------------------------------------------------------

/// Throws unless the CUDA kernels can address `x` ([.., hd] rows): unit stride in the head dim, the other strides
/// and the data pointer multiples of 8 elements (16-byte rows).
template <class V>
void require_rows(const V& x, const char* op, const char* name) {
  bool ok = x.stride(x.rank() - 1) == 1 || x.dim(x.rank() - 1) <= 1;
  for (int d = 0; d + 1 < x.rank(); ++d) ok = ok && (x.stride(d) % 8 == 0 || x.dim(d) <= 1);
  ok = ok && reinterpret_cast<std::uintptr_t>(x.data()) % 16 == 0;
  if (ok) return;
  std::string s;
  for (int d = 0; d < x.rank(); ++d) s += (d ? ", " : "") + std::to_string(x.stride(d));
  throw invalid_argument(std::string(op) + " (CUDA): " + name + " of shape " + to_string(x.shape()) +
                         " with strides [" + s +
                         "] needs unit stride in the head dim and 16-byte aligned rows (the other strides and " +
                         "the data address multiples of 8 elements)");
}

inline void require_launchable(const detail::attention::dims& d, const char* op) {
  require(attention_supports_head_dim<device_space>(d.head_dim), [&] {
    return std::string(op) + " (CUDA): head dim " + std::to_string(d.head_dim) +
           " is not supported (16, 32, 64 or 128)";
  });
  require(
      d.seq < (std::int64_t(1) << 30) && d.seq_kv < (std::int64_t(1) << 30) && d.batch <= 65535 && d.heads <= 65535,
      [&] { return std::string(op) + " (CUDA): sizes beyond the kernels' grid (S, Skv < 2^30, B and Hq <= 65535)"; });
}

template <class F>
void set_smem(F* kernel, std::size_t bytes) {
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <int HD>
void launch_forward(const forward_params& p, int batch, int heads, cudaStream_t stream) {
  constexpr int BM = 16 * forward_shape<HD>::warps;
  constexpr std::size_t smem = forward_smem_bytes<HD>();
  set_smem(forward_kernel<HD>, smem);
  const dim3 grid(unsigned((p.seq + BM - 1) / BM), unsigned(heads), unsigned(batch));
  forward_kernel<HD><<<grid, forward_shape<HD>::warps * 32, smem, stream>>>(p);
  cuda_check_launch();
}

/// Whether the Hopper kernels may take a call: the fastest kernel asked for, head dim 64 or 128, some keys, at most
/// 65535 row and key blocks (their grids' z extent), and an sm_90a image on the device (TMA's acceptance of the
/// strides is checked when the maps are made).
inline bool sm90_applies(attention_kernel choice, std::int64_t hd, int seq, int seq_kv, cudaStream_t stream) {
  const bool fits = (std::int64_t(seq) + sm90::BM - 1) / sm90::BM <= 65535 &&
                    (std::int64_t(seq_kv) + sm90::BN - 1) / sm90::BN <= 65535;
  return choice == attention_kernel::fastest && (hd == 64 || hd == 128) && seq_kv > 0 && fits &&
         sm90::available(stream);
}

/// The Hopper forward (attention_sm90.cuh) when sm90_applies and TMA takes the operands' strides; false when it
/// does not apply, so the mma.sync kernel runs instead.
template <class VQ, class VK>
bool launch_forward_sm90(const forward_params& p, const VQ& q, const VK& k, const VK& v, attention_kernel choice,
                         cudaStream_t stream) {
  const std::int64_t hd = q.dim(3);
  if (!sm90_applies(choice, hd, p.seq, p.seq_kv, stream)) return false;
  const std::optional<CUtensorMap> mq = sm90::map_bsh(q, sm90::BM), mk = sm90::map_bsh(k, sm90::BN),
                                   mv = sm90::map_bsh(v, sm90::BN);
  if (!mq || !mk || !mv) return false;
  const sm90::params sp{p.out,   p.lse, p.os.b,   p.os.s,  p.os.h,   p.lse_b, p.lse_h,
                        p.lse_s, p.seq, p.seq_kv, p.group, p.causal, p.delta, p.scale_log2};
  const dim3 grid(unsigned(q.dim(2)), unsigned(q.dim(0)), unsigned((p.seq + sm90::BM - 1) / sm90::BM));
  const auto launch = [&]<int HD>() {
    set_smem(sm90::forward_kernel<HD, sm90::ping_pong>, sm90::smem_bytes<HD>());
    sm90::forward_kernel<HD, sm90::ping_pong>
        <<<grid, sm90::threads, sm90::smem_bytes<HD>(), stream>>>(*mq, *mk, *mv, sp);
  };
  if (hd == 64) launch.template operator()<64>();
  else launch.template operator()<128>();
  cuda_check_launch();
  return true;
}

/// The Hopper dq/dk/dv kernel (attention_sm90_backward.cuh) under the same conditions as launch_forward_sm90;
/// false when it does not apply.
template <class VQ, class VK, class VO>
bool launch_backward_sm90(const backward_params& p, const VQ& q, const VK& k, const VK& v, const VO& dout,
                          attention_kernel choice, cudaStream_t stream) {
  const std::int64_t hd = q.dim(3);
  if (!sm90_applies(choice, hd, p.seq, p.seq_kv, stream)) return false;
  const std::optional<CUtensorMap> mq = sm90::map_bsh(q, sm90::backward_bm),
                                   mdo = sm90::map_bsh(dout, sm90::backward_bm), mk = sm90::map_bsh(k, sm90::BN),
                                   mv = sm90::map_bsh(v, sm90::BN);
  if (!mq || !mdo || !mk || !mv) return false;
  const sm90::backward_args a{p.lse, p.lse_b, p.lse_h,  p.lse_s, p.d,     p.dq_accum, p.dk,    p.dv,    p.dks,
                              p.dvs, p.seq,   p.seq_kv, p.heads, p.group, p.causal,   p.delta, p.scale, p.scale_log2};
  const dim3 grid(unsigned(k.dim(2)), unsigned(q.dim(0)), unsigned((p.seq_kv + sm90::BN - 1) / sm90::BN));
  const auto launch = [&]<int HD>() {
    set_smem(sm90::backward_kernel<HD>, sm90::backward_smem_bytes<HD>());
    sm90::backward_kernel<HD><<<grid, sm90::threads, sm90::backward_smem_bytes<HD>(), stream>>>(*mq, *mk, *mv, *mdo, a);
  };
  if (hd == 64) launch.template operator()<64>();
  else launch.template operator()<128>();
  cuda_check_launch();
  return true;
}

/// D, the zeroed dq accumulator, the dq/dk/dv kernel (`hopper()` launches the Hopper one and says whether it
/// applied; else the mma.sync one), then dq from the accumulator.
template <int HD, class Hopper>
void launch_backward(const backward_params& p, const __nv_bfloat16* out, bsh_strides os, __nv_bfloat16* dq,
                     bsh_strides dqs, int batch, int kv_heads, Hopper&& hopper, cudaStream_t stream) {
  const std::int64_t rows = std::int64_t(batch) * p.heads * p.seq;
  constexpr int threads = 256;
  const std::int64_t dot_threads = rows * (HD / 8);
  backward_dot_kernel<HD><<<unsigned((dot_threads + threads - 1) / threads), threads, 0, stream>>>(
      out, os, p.dout, p.dos, p.d, p.heads, p.seq, rows);
  cuda_check_launch();
  cuda_check(cudaMemsetAsync(p.dq_accum, 0, std::size_t(rows) * HD * sizeof(float), stream));

  constexpr int BN = 16 * backward_shape<HD>::warps;
  constexpr std::size_t smem = backward_smem_bytes<HD>();
  if (p.seq_kv > 0 && !hopper()) {  // with no key, dq stays zero
    set_smem(backward_kernel<HD>, smem);
    const dim3 grid(unsigned((p.seq_kv + BN - 1) / BN), unsigned(kv_heads), unsigned(batch));
    backward_kernel<HD><<<grid, backward_shape<HD>::warps * 32, smem, stream>>>(p);
    cuda_check_launch();
  }

  backward_dq_kernel<HD>
      <<<grid_for(rows * (HD / 8)), block_threads, 0, stream>>>(p.dq_accum, dq, dqs, p.heads, p.seq, rows, p.scale);
  cuda_check_launch();
}

template <class F>
void dispatch_head_dim(std::int64_t hd, F&& f) {
  switch (hd) {
    case 16: f.template operator()<16>(); break;
    case 32: f.template operator()<32>(); break;
    case 64: f.template operator()<64>(); break;
    default: f.template operator()<128>(); break;  // checked by require_launchable
  }
}

template <class T>
const __nv_bfloat16* raw(const T* p) {
  return reinterpret_cast<const __nv_bfloat16*>(p);
}
template <class T>
__nv_bfloat16* raw(T* p) {
  return reinterpret_cast<__nv_bfloat16*>(p);
}

}  // namespace cuda_detail::attention

/// attention_forward on ex.stream (see attention.hpp): bf16 q, k, v and out, fp32 lse; head dims 16, 32, 64, 128.
template <class Q>
void attention_forward(const exec::cuda& ex, view<Q, device_space> q,
                       view<const std::remove_const_t<Q>, device_space> k,
                       view<const std::remove_const_t<Q>, device_space> v,
                       view<std::remove_const_t<Q>, device_space> out, view<float, device_space> lse,
                       const attention_params& p) {
  static_assert(std::is_same_v<std::remove_const_t<Q>, bf16>,
                "attention_forward (CUDA): q, k, v and out must hold bf16 (fp32 statistics in lse)");
  namespace at = detail::attention;
  namespace ca = cuda_detail::attention;
  const char* op = "attention_forward";
  const at::dims d = at::check(op, q, k, v, lse, p);
  at::require_shape(out, q.shape(), op, "out");
  if (d.batch == 0 || d.seq == 0 || d.heads == 0) return;
  ca::require_launchable(d, op);
  if (d.seq_kv > 0) {
    ca::require_rows(k, op, "k");
    ca::require_rows(v, op, "v");
  }
  ca::require_rows(q, op, "q");
  ca::require_rows(out, op, "out");

  ca::forward_params fp{};
  fp.q = ca::raw(q.data());
  fp.k = ca::raw(k.data());
  fp.v = ca::raw(v.data());
  fp.out = ca::raw(out.data());
  fp.lse = lse.data();
  fp.qs = ca::strides_of(q);
  fp.ks = ca::strides_of(k);
  fp.vs = ca::strides_of(v);
  fp.os = ca::strides_of(out);
  fp.lse_b = lse.stride(0);
  fp.lse_h = lse.stride(1);
  fp.lse_s = lse.stride(2);
  fp.seq = int(d.seq);
  fp.seq_kv = int(d.seq_kv);
  fp.group = int(d.group());
  fp.causal = p.causal;
  fp.delta = p.q_pos0 - p.kv_pos0;
  fp.scale_log2 = p.scale * ca::log2e;
  if (ca::launch_forward_sm90(fp, q, k, v, p.kernel, ex.stream)) return;
  ca::dispatch_head_dim(d.head_dim,
                        [&]<int HD>() { ca::launch_forward<HD>(fp, int(d.batch), int(d.heads), ex.stream); });
}

/// attention_backward on ex.stream (see attention.hpp): dq, dk, dv overwritten, in bf16; fp32 scratch of
/// 4 (hd + 1) B Hq S bytes allocated and freed in stream order.
template <class Q>
void attention_backward(const exec::cuda& ex, view<Q, device_space> q,
                        view<const std::remove_const_t<Q>, device_space> k,
                        view<const std::remove_const_t<Q>, device_space> v,
                        view<const std::remove_const_t<Q>, device_space> out, view<const float, device_space> lse,
                        view<const std::remove_const_t<Q>, device_space> dout,
                        view<std::remove_const_t<Q>, device_space> dq, view<std::remove_const_t<Q>, device_space> dk,
                        view<std::remove_const_t<Q>, device_space> dv, const attention_params& p) {
  static_assert(std::is_same_v<std::remove_const_t<Q>, bf16>,
                "attention_backward (CUDA): q, k, v, out, dout, dq, dk and dv must hold bf16 (fp32 lse)");
  namespace at = detail::attention;
  namespace ca = cuda_detail::attention;
  const char* op = "attention_backward";
  const at::dims d = at::check(op, q, k, v, lse, p);
  at::require_shape(out, q.shape(), op, "out");
  at::require_shape(dout, q.shape(), op, "dout");
  at::require_shape(dq, q.shape(), op, "dq");
  at::require_shape(dk, k.shape(), op, "dk");
  at::require_shape(dv, k.shape(), op, "dv");
  if (d.batch == 0 || d.heads == 0) return;
  ca::require_launchable(d, op);
  if (d.seq_kv > 0) {
    ca::require_rows(k, op, "k");
    ca::require_rows(v, op, "v");
    ca::require_rows(dk, op, "dk");
    ca::require_rows(dv, op, "dv");
  }
  if (d.seq > 0) {
    ca::require_rows(q, op, "q");
    ca::require_rows(out, op, "out");
    ca::require_rows(dout, op, "dout");
    ca::require_rows(dq, op, "dq");
  }
  if (d.seq == 0) {  // no query: dk and dv are zero
    if (d.seq_kv > 0) {
      require(dk.is_contiguous() && dv.is_contiguous(),
              "attention_backward (CUDA): with S = 0, dk and dv must be contiguous to be zeroed");
      cuda_check(cudaMemsetAsync(dk.data(), 0, dk.bytes(), ex.stream));
      cuda_check(cudaMemsetAsync(dv.data(), 0, dv.bytes(), ex.stream));
    }
    return;
  }

  const std::int64_t rows = d.batch * d.heads * d.seq;
  cuda_detail::stream_scratch scratch(std::size_t(rows) * std::size_t(d.head_dim + 1) * sizeof(float), ex.stream);
  ca::backward_params bp{};
  bp.q = ca::raw(q.data());
  bp.k = ca::raw(k.data());
  bp.v = ca::raw(v.data());
  bp.dout = ca::raw(dout.data());
  bp.lse = lse.data();
  bp.dq_accum = static_cast<float*>(scratch.get());
  bp.d = bp.dq_accum + rows * d.head_dim;
  bp.dk = ca::raw(dk.data());
  bp.dv = ca::raw(dv.data());
  bp.qs = ca::strides_of(q);
  bp.ks = ca::strides_of(k);
  bp.vs = ca::strides_of(v);
  bp.dos = ca::strides_of(dout);
  bp.dks = ca::strides_of(dk);
  bp.dvs = ca::strides_of(dv);
  bp.lse_b = lse.stride(0);
  bp.lse_h = lse.stride(1);
  bp.lse_s = lse.stride(2);
  bp.seq = int(d.seq);
  bp.seq_kv = int(d.seq_kv);
  bp.heads = int(d.heads);
  bp.group = int(d.group());
  bp.causal = p.causal;
  bp.delta = p.q_pos0 - p.kv_pos0;
  bp.scale = p.scale;
  bp.scale_log2 = p.scale * ca::log2e;
  const auto hopper = [&] { return ca::launch_backward_sm90(bp, q, k, v, dout, p.kernel, ex.stream); };
  ca::dispatch_head_dim(d.head_dim, [&]<int HD>() {
    ca::launch_backward<HD>(bp, ca::raw(out.data()), ca::strides_of(out), ca::raw(dq.data()), ca::strides_of(dq),
                            int(d.batch), int(d.kv_heads), hopper, ex.stream);
  });
}

namespace cuda_detail::attention {

/// One thread per (b, s, h) row: folds out_part/lse_part into the fp32 accumulators (detail::attention::merge_row).
template <class O>
__global__ void merge_kernel(const O* out_part, bsh_strides ps, const float* lse_part, std::int64_t lp_b,
                             std::int64_t lp_h, std::int64_t lp_s, float* out_acc, bsh_strides as, float* lse_acc,
                             std::int64_t la_b, std::int64_t la_h, std::int64_t la_s, int seq, int heads, int hd,
                             std::int64_t rows) {
  for (std::int64_t r = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t h = r % heads, s = (r / heads) % seq, b = r / (std::int64_t(heads) * seq);
    float& l_acc = lse_acc[b * la_b + h * la_h + s * la_s];
    detail::attention::merge_row<float>(out_part + b * ps.b + s * ps.s + h * ps.h, 1,
                                        lse_part[b * lp_b + h * lp_h + s * lp_s],
                                        out_acc + b * as.b + s * as.s + h * as.h, 1, l_acc, hd);
  }
}

}  // namespace cuda_detail::attention

/// attention_merge on ex.stream (see attention.hpp): bf16 or fp32 out_part, fp32 lse and accumulators; any strides
/// with unit stride in the head dim.
template <class O>
void attention_merge(const exec::cuda& ex, view<O, device_space> out_part, view<const float, device_space> lse_part,
                     view<float, device_space> out_acc, view<float, device_space> lse_acc) {
  using T = std::remove_const_t<O>;
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, float>,
                "attention_merge (CUDA): out_part holds bf16 or fp32, the accumulators fp32");
  namespace at = detail::attention;
  namespace ca = cuda_detail::attention;
  require(out_part.rank() == 4, [&] {
    return "attention_merge: out_part must have rank 4 [B, S, H, hd], got shape " + to_string(out_part.shape());
  });
  const std::int64_t B = out_part.dim(0), S = out_part.dim(1), H = out_part.dim(2), hd = out_part.dim(3);
  at::require_shape(out_acc, out_part.shape(), "attention_merge", "out_acc");
  at::require_shape(lse_part, shape{B, H, S}, "attention_merge", "lse_part [B, H, S]");
  at::require_shape(lse_acc, shape{B, H, S}, "attention_merge", "lse_acc [B, H, S]");
  require((out_part.stride(3) == 1 || hd <= 1) && (out_acc.stride(3) == 1 || hd <= 1),
          "attention_merge (CUDA): out_part and out_acc need unit stride in the head dim");
  const std::int64_t rows = B * S * H;
  if (rows == 0) return;
  const auto* part =
      reinterpret_cast<const std::conditional_t<std::is_same_v<T, bf16>, __nv_bfloat16, float>*>(out_part.data());
  ca::merge_kernel<<<cuda_detail::grid_for(rows), cuda_detail::block_threads, 0, ex.stream>>>(
      part, ca::strides_of(out_part), lse_part.data(), lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
      out_acc.data(), ca::strides_of(out_acc), lse_acc.data(), lse_acc.stride(0), lse_acc.stride(1), lse_acc.stride(2),
      int(S), int(H), int(hd), rows);
  cuda_check(cudaGetLastError());
}

}  // namespace subspace

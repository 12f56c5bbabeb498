#pragma once
// attention_backward on Hopper (sm_90a): the dq/dk/dv kernel of FlashAttention-3's design, beside the mma.sync
// one in attention.cuh (same D = rowsum(dout * out) kernel before it and the same fp32 dq accumulator and final
// scaling after it). docs/llama-kernels.md, "Hopper attention".
//
// One block of three warpgroups per (KV head, batch, BN = 128 keys), the key blocks seen by the most rows first,
// walking every 64-row query tile of every query head that shares the KV head. Warpgroup 0 produces: one thread loads K
// and V once and Q and dout per tile (TMA, two stages), one warp copies the tile's lse (in the exp2 domain) and D into
// shared memory. Warpgroups 1 and 2 consume, 64 keys each, in the transposed orientation so that dK and dV stay in
// registers for the whole walk: S^T = K Q^T and dP^T = V dO^T; P^T = exp2(S^T scale log2 e - lse log2 e) while dP^T
// runs; dV += P^T dO (P from registers) while dS^T = P^T (dP^T - D) is computed; dK += dS^T Q (dS from registers). dS^T
// also goes to shared memory (128-byte swizzle, two buffers) for dQ = dS K, a wgmma with both operands MN-major: at
// head dim 128 each consumer takes 64 of dq's columns, at 64 they take turns by tile. dq is added into the fp32
// accumulator with 8-byte atomics.

#include "attention_sm90.cuh"

namespace subspace::cuda_detail::attention::sm90 {

/// Query rows per backward tile: a consumer thread's dK and dV (hd / 2 floats each) and its 64 x 64 score tiles
/// fit its 240 registers at head dim 128 (128 rows spill at head dim 64).
inline constexpr int backward_bm = 64;

template <int HD>
struct backward_shared {
  static constexpr int bm = backward_bm, chunks = HD / 64;
  alignas(1024) unsigned char k[chunks][BN * 128];
  alignas(1024) unsigned char v[chunks][BN * 128];
  alignas(1024) unsigned char q[stages][chunks][bm * 128];
  alignas(1024) unsigned char dout[stages][chunks][bm * 128];
  alignas(1024) unsigned char ds[2][BN * 128];  // dS^T: key rows of the tile's 64 query columns; two tiles
  float lse2[stages][bm], dot[stages][bm];
  alignas(8) std::uint64_t bar_kv, full[stages], empty[stages];
};
template <int HD>
constexpr std::size_t backward_smem_bytes() {
  return sizeof(backward_shared<HD>) + 1024;
}

struct backward_args {
  const float* lse;
  std::int64_t lse_b, lse_h, lse_s;
  const float* dot;  // [B, Hq, S]: rowsum(dout * out)
  float* dq_accum;   // [B, Hq, S, hd]
  __nv_bfloat16* dk;
  __nv_bfloat16* dv;
  bsh_strides dks, dvs;
  int seq, seq_kv, heads, group;
  bool causal;
  std::int64_t delta;  // q_pos0 - kv_pos0: row i sees key j when j <= i + delta
  float scale, scale_log2;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
/// `d` through a register move the compiler cannot see through: descriptors made from it inside the tile loop
/// stay there, instead of dozens of loop-invariant 64-bit descriptors held in registers for the whole walk.
__device__ __forceinline__ std::uint64_t fresh(std::uint64_t d) {
  std::uint64_t r;
  asm volatile("mov.b64 %0, %1;" : "=l"(r) : "l"(d));
  return r;
}
/// A descriptor `bytes` further on in shared memory (the start address is in 16-byte units in the low bits).
__device__ __forceinline__ std::uint64_t advance(std::uint64_t d, unsigned bytes) { return d + (bytes >> 4); }

/// Named barrier `id` over the two consumer warpgroups.
__device__ __forceinline__ void consumers_sync(int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "n"(128 * consumers) : "memory");
}
#endif

template <int HD>
__global__ void __launch_bounds__(threads, 1)
    backward_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                    const __grid_constant__ CUtensorMap map_v, const __grid_constant__ CUtensorMap map_dout,
                    const backward_args p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int bm = backward_bm, chunks = HD / 64, KV_REGS = HD / 2, S_REGS = bm / 2;
  constexpr unsigned tile_chunk = bm * 128;  // bytes between the 64-column chunks of a Q or dout tile
  constexpr float pos_inf = __builtin_huge_valf();
  extern __shared__ unsigned char window[];
  auto& sm = *reinterpret_cast<backward_shared<HD>*>((reinterpret_cast<std::uintptr_t>(window) + 1023) &
                                                     ~std::uintptr_t(1023));
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0), t = int(threadIdx.x) % 128;
  // The key block is the grid's slowest dimension: under a causal mask the first key blocks, seen by the most
  // query rows, start first over every head and sequence (longest first).
  const int hk = int(blockIdx.x), b = int(blockIdx.y), j0 = int(blockIdx.z) * BN;

  // The query tiles that can see these keys.
  const int first_row = first_row_seeing(p.causal, j0, p.delta, p.seq);
  const int m_tiles = (p.seq + bm - 1) / bm, m_begin = first_row / bm;
  const int per_head = first_row >= p.seq ? 0 : m_tiles - m_begin;
  const int n_iter = p.group * per_head;
  const auto head_of = [&](int it) { return hk * p.group + it / per_head; };
  const auto row_of = [&](int it) { return (m_begin + it % per_head) * bm; };

  if (threadIdx.x == 0) {
    mbar_init(&sm.bar_kv, 1);
    for (int s = 0; s < stages; ++s) {
      mbar_init(&sm.full[s], 1 + 32);            // the TMA thread's expect_tx and the 32 lanes copying lse and D
      mbar_init(&sm.empty[s], 128 * consumers);  // every consumer thread: each releases its own lse/D reads
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    const int warp = t / 32, lane = t % 32;
    if (n_iter == 0) return;
    if (warp == 0 && lane == 0) {
      mbar_expect_tx(&sm.bar_kv, sizeof(sm.k) + sizeof(sm.v));
      for (int c = 0; c < chunks; ++c) {
        tma_load_4d(sm.k[c], &map_k, 64 * c, hk, j0, b, &sm.bar_kv);
        tma_load_4d(sm.v[c], &map_v, 64 * c, hk, j0, b, &sm.bar_kv);
      }
      for (int it = 0; it < n_iter; ++it) {
        const int s = it % stages, h = head_of(it), i0 = row_of(it);
        mbar_wait(&sm.empty[s], (unsigned(it / stages) & 1u) ^ 1u);
        mbar_expect_tx(&sm.full[s], sizeof(sm.q[s]) + sizeof(sm.dout[s]));
        for (int c = 0; c < chunks; ++c) {
          tma_load_4d(sm.q[s][c], &map_q, 64 * c, h, i0, b, &sm.full[s]);
          tma_load_4d(sm.dout[s][c], &map_dout, 64 * c, h, i0, b, &sm.full[s]);
        }
      }
    } else if (warp == 1) {
      // lse in the exp2 domain, +inf for a row that saw no key or lies past S (its P is then 0), and D; lane
      // copies rows lane and lane + 32 of each tile (lean: this warp has 24 registers).
      int h = hk * p.group, m = m_begin;
      for (int it = 0; it < n_iter; ++it) {
        const int s = it % stages;
        mbar_wait(&sm.empty[s], (unsigned(it / stages) & 1u) ^ 1u);
        const float* lse = p.lse + b * p.lse_b + h * p.lse_h;
        const float* dot = p.dot + (std::int64_t(b) * p.heads + h) * p.seq;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = lane + 32 * half, i = m * bm + r;
          const float l = i < p.seq ? lse[std::int64_t(i) * p.lse_s] : -pos_inf;
          sm.lse2[s][r] = l == -pos_inf ? pos_inf : l * log2e;
          sm.dot[s][r] = i < p.seq ? dot[i] : 0.0f;
        }
        mbar_arrive(&sm.full[s]);
        if (++m == m_tiles) {
          m = m_begin;
          ++h;
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  // Consumer c owns keys j0 + 64c .. + 63; this thread keys `key` and key + 8 of those (accumulator rows r, r + 8)
  // and, in each 8-column block of an accumulator, the columns 2 q4 and 2 q4 + 1.
  const int c = wg - 1, warp = t / 32, lane = t % 32, q4 = lane % 4;
  const int r = 16 * warp + lane / 4, key = j0 + 64 * c + r;
  int first_query[2];  // the first query row each of the thread's keys is seen by (S: none)
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int j = key + 8 * hh;
    first_query[hh] = j >= p.seq_kv ? p.seq : first_row_seeing(p.causal, j, p.delta, p.seq);
  }

  float dk[KV_REGS], dv[KV_REGS];
#pragma unroll
  for (int i = 0; i < KV_REGS; ++i) dk[i] = dv[i] = 0.0f;
  if (n_iter > 0) mbar_wait(&sm.bar_kv, 0);
  for (int it = 0; it < n_iter; ++it) {
    const int s = it % stages, h = head_of(it), i0 = row_of(it);
    mbar_wait(&sm.full[s], unsigned(it / stages) & 1u);

    // S^T = K Q^T and dP^T = V dO^T, two groups: A is this consumer's 64 key rows of K (V), B the tile's bm query
    // rows of Q (dout), all K-major (32 bytes per k-step of 16 within a 64-column chunk). P is computed while the
    // dP product runs.
    const std::uint64_t k_km = fresh(sw128(sm.k[0] + 64 * c * 128, 16, 1024)),
                        q_km = fresh(sw128(sm.q[s][0], 16, 1024));
    const std::uint64_t v_km = fresh(sw128(sm.v[0] + 64 * c * 128, 16, 1024)),
                        do_km = fresh(sw128(sm.dout[s][0], 16, 1024));
    const auto k_step = [](int kk, unsigned chunk) { return unsigned(kk / 4) * chunk + unsigned(kk % 4) * 32u; };
    float st[S_REGS], dpt[S_REGS];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
      wgmma_ss_m64n64(st, advance(k_km, k_step(kk, BN * 128)), advance(q_km, k_step(kk, tile_chunk)), kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
      wgmma_ss_m64n64(dpt, advance(v_km, k_step(kk, BN * 128)), advance(do_km, k_step(kk, tile_chunk)), kk > 0);
    wgmma_commit();
    wgmma_wait<1>();
    operand_fence(st);

    // P^T, 0 where masked; as bf16 A fragments (the accumulator layout is the A-fragment layout).
    const bool full = j0 + 64 * c + 64 <= p.seq_kv && i0 + bm <= p.seq &&
                      (!p.causal || std::int64_t(j0 + 64 * c + 63) <= std::int64_t(i0) + p.delta);
    unsigned pa[bm / 16][4];
#pragma unroll
    for (int n8 = 0; n8 < bm / 8; ++n8) {
      const float2 l2 = *reinterpret_cast<const float2*>(&sm.lse2[s][8 * n8 + 2 * q4]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pv = exp2_approx(fmaf(st[4 * n8 + e], p.scale_log2, -((e & 1) ? l2.y : l2.x)));
        if (!full) {
          const int i = i0 + 8 * n8 + 2 * q4 + (e & 1);
          pv = i >= first_query[e >> 1] && i < p.seq ? pv : 0.0f;
        }
        st[4 * n8 + e] = pv;
      }
    }
#pragma unroll
    for (int kk = 0; kk < bm / 16; ++kk)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const __nv_bfloat162 pr = __floats2bfloat162_rn(st[8 * kk + 2 * x], st[8 * kk + 2 * x + 1]);
        pa[kk][x] = *reinterpret_cast<const unsigned*>(&pr);
      }

    // dV += P^T dO (dout MN-major: its rows are the k dimension), running while dS is computed.
    const std::uint64_t do_mn = fresh(sw128(sm.dout[s][0], tile_chunk, 1024));
    operand_fence(dv);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < bm / 16; ++kk) {
      const std::uint64_t ob = advance(do_mn, kk * 16 * 128);
      if constexpr (HD == 64) wgmma_rs_m64n64(dv, pa[kk], ob);
      else wgmma_rs_m64n128(dv, pa[kk], ob);
    }
    wgmma_commit();
    wgmma_wait<1>();
    operand_fence(dpt);

    // dS^T = P^T (dP^T - D), with P as the dV product read it (bf16), as bf16 A fragments.
    unsigned dsa[bm / 16][4];
#pragma unroll
    for (int kk = 0; kk < bm / 16; ++kk)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int idx = 8 * kk + 2 * x, col = 8 * (idx / 4) + 2 * q4;
        const float2 pv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pa[kk][x]));
        const float2 dd = *reinterpret_cast<const float2*>(&sm.dot[s][col]);
        const __nv_bfloat162 d2 = __floats2bfloat162_rn(pv.x * (dpt[idx] - dd.x), pv.y * (dpt[idx + 1] - dd.y));
        dsa[kk][x] = *reinterpret_cast<const unsigned*>(&d2);
      }

    // dK += dS^T Q, running while dS^T goes to shared memory.
    const std::uint64_t q_mn = fresh(sw128(sm.q[s][0], tile_chunk, 1024));
    operand_fence(dk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < bm / 16; ++kk) {
      const std::uint64_t qb = advance(q_mn, kk * 16 * 128);
      if constexpr (HD == 64) wgmma_rs_m64n64(dk, dsa[kk], qb);
      else wgmma_rs_m64n128(dk, dsa[kk], qb);
    }
    wgmma_commit();

    // dS^T into the swizzled tile (key row jr, query column i: 16-byte unit i / 8 ^ jr % 8). Tiles alternate
    // between two buffers: the last reader of this one, the dQ product of tile it - 2, finished before its
    // consumer reached the barrier below in tile it - 1, so one barrier a tile is enough.
    unsigned char* const ds = sm.ds[it % 2];
#pragma unroll
    for (int kk = 0; kk < bm / 16; ++kk)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int jr = 64 * c + r + 8 * (x % 2), i = 16 * kk + 8 * (x / 2) + 2 * q4;
        unsigned char* dst = ds + jr * 128 + (((i / 8) ^ (jr % 8)) * 16) + (i % 8) * 2;
        *reinterpret_cast<unsigned*>(dst) = dsa[kk][x];
      }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the stores, visible to wgmma
    consumers_sync(1);

    // dQ (unscaled) = dS K over the tile's 128 keys: A = dS^T read MN-major, B = K read MN-major (its rows are
    // the k dimension). At head dim 128 consumer c takes head-dim columns 64c..64c+63; at 64 the consumers take
    // turns, one tile each.
    const bool dq_here = HD == 128 || (it % 2) == c;
    if (dq_here) {
      float dq[32];
      const std::uint64_t ds_mn = fresh(sw128(ds, BN * 128, 1024)),
                          k_mn = fresh(sw128(sm.k[HD == 128 ? c : 0], BN * 128, 1024));
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        wgmma_ss_m64n64<1, 1>(dq, advance(ds_mn, kk * 16 * 128), advance(k_mn, kk * 16 * 128), kk > 0);
      wgmma_commit();
      wgmma_wait_all();
      operand_fence(dq);
      operand_fence(dk);
      operand_fence(dv);
      mbar_arrive(&sm.empty[s]);
      const int q_col = (HD == 128 ? 64 * c : 0) + 2 * q4;
      float* acc = p.dq_accum + ((std::int64_t(b) * p.heads + h) * p.seq + i0) * HD;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = r + 8 * hh;
        if (i0 + row >= p.seq) continue;
#pragma unroll
        for (int n8 = 0; n8 < 8; ++n8)
          atomic_add2(acc + std::int64_t(row) * HD + q_col + 8 * n8, dq[4 * n8 + 2 * hh], dq[4 * n8 + 2 * hh + 1]);
      }
    } else {
      wgmma_wait_all();
      operand_fence(dk);
      operand_fence(dv);
      mbar_arrive(&sm.empty[s]);
    }
  }

  // Epilogue: dk (scaled) and dv in bf16, pairs straight from the accumulators; keys past Skv are not stored.
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int j = key + 8 * hh;
    if (j >= p.seq_kv) continue;
    __nv_bfloat16* dkg = p.dk + b * p.dks.b + hk * p.dks.h + std::int64_t(j) * p.dks.s + 2 * q4;
    __nv_bfloat16* dvg = p.dv + b * p.dvs.b + hk * p.dvs.h + std::int64_t(j) * p.dvs.s + 2 * q4;
#pragma unroll
    for (int n8 = 0; n8 < HD / 8; ++n8) {
      *reinterpret_cast<__nv_bfloat162*>(dkg + 8 * n8) =
          __floats2bfloat162_rn(dk[4 * n8 + 2 * hh] * p.scale, dk[4 * n8 + 2 * hh + 1] * p.scale);
      *reinterpret_cast<__nv_bfloat162*>(dvg + 8 * n8) =
          __floats2bfloat162_rn(dv[4 * n8 + 2 * hh], dv[4 * n8 + 2 * hh + 1]);
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

}  // namespace subspace::cuda_detail::attention::sm90

#pragma once
// attention_forward on Hopper (sm_90a): the forward kernel of FlashAttention-3's design (docs/llama-kernels.md,
// "Hopper attention").
//
// One block of three warpgroups per (head, batch, BM = 128 query rows), the row blocks with the most keys first.
// Warpgroup 0 is the producer: one thread issues TMA loads of the Q tile and of 128-key K and V tiles into two stages
// each (full and empty mbarriers per stage). Warpgroups 1 and 2 are consumers of 64 query rows each: S = Q K^T with
// wgmma (both operands in shared memory, 128-byte swizzle), the online softmax on the accumulators (exp2 domain), O +=
// P V with P taken from the S registers and V read from shared memory as an MN-major operand. Within a consumer, tile
// n's S product runs while tile n - 1's PV does, and the softmax of tile n while PV finishes (intra-warpgroup overlap);
// between the consumers, named barriers make them take turns issuing (ping-pong), so one's softmax overlaps the other's
// products. The producer gives its registers to the consumers (setmaxnreg), which hold S, P and O (up to 160
// values a thread at head dim 128).
//
// Operands and semantics are those of the mma.sync kernel in attention.cuh (causal on global positions, GQA, rows
// without a visible key give O = 0 and lse = -inf); TMA sees q [B, S, Hq, hd] as a 4-D tensor {hd, Hq, S, B} with
// the view's strides, so a row tile never reads into the next sequence (rows past S come back as zeros). The
// kernel body exists only in an sm_90a image (__CUDA_ARCH_FEAT_SM90_ALL); `available()` asks the device once
// whether the running image has it.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/memory.cuh"
#include "attention_common.cuh"

namespace subspace::cuda_detail::attention::sm90 {

inline constexpr int BM = 128, BN = 128, stages = 2, consumers = 2, threads = 128 * (1 + consumers);
inline constexpr int chunk_bytes = 128 * 128;  // 128 rows of one 64-column (128-byte) swizzle chunk

template <int HD>
struct shared {
  static constexpr int chunks = HD / 64;
  alignas(1024) unsigned char q[chunks][chunk_bytes];
  alignas(1024) unsigned char k[stages][chunks][chunk_bytes];
  alignas(1024) unsigned char v[stages][chunks][chunk_bytes];
  alignas(8) std::uint64_t bar_q, full_k[stages], full_v[stages], empty_k[stages], empty_v[stages];
};
template <int HD>
constexpr std::size_t smem_bytes() {
  return sizeof(shared<HD>) + 1024;  // the dynamic window is aligned up to 1024 bytes in the kernel
}

struct params {
  __nv_bfloat16* out;
  float* lse;
  std::int64_t os_b, os_s, os_h, lse_b, lse_h, lse_s;
  int seq, seq_kv, group;
  bool causal;
  std::int64_t delta;  // q_pos0 - kv_pos0: row i sees key j when j <= i + delta
  float scale_log2;
};

// ---- PTX (sm_90a) ---------------------------------------------------------------------------------------------

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) { return std::uint32_t(__cvta_generic_to_shared(p)); }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(std::uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(std::uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
/// Waits until the barrier's phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
}
/// A box of the 4-D map at coordinates (x, y, z, w) into shared memory, completing `bar`'s transaction bytes.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, int x, int y, int z, int w,
                                            std::uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];" ::"r"(smem_u32(dst)),
      "l"(map), "r"(x), "r"(y), "r"(z), "r"(w), "r"(smem_u32(bar))
      : "memory");
}

/// A wgmma shared-memory matrix descriptor, 128-byte swizzle (offsets in bytes).
__device__ __forceinline__ std::uint64_t sw128(const void* start, unsigned leading, unsigned stride) {
  return ((smem_u32(start) & 0x3FFFF) >> 4) | (std::uint64_t((leading & 0x3FFFF) >> 4) << 16) |
         (std::uint64_t((stride & 0x3FFFF) >> 4) << 32) | (std::uint64_t(1) << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
/// Waits until at most N of the committed wgmma groups are still pending (groups complete in order).
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

/// Keeps the compiler from moving reads or writes of accumulator registers across the asynchronous region.
template <int N>
__device__ __forceinline__ void operand_fence(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// The wgmma shapes the kernel uses, expanded over their accumulator registers.
#define SUBSPACE_WGMMA_D32                                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"
#define SUBSPACE_WGMMA_D64                                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define SUBSPACE_OUT32(d)                                                                                     \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),  \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define SUBSPACE_OUT64(d)                                                                                       \
  SUBSPACE_OUT32(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), \
      "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]),   \
      "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),   \
      "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),   \
      "+f"(d[63])

/// d[64 x 128] (+)= A[64 x 16] B[16 x 128], both in shared memory: K-major (TA, TB = 0) or MN-major (1).
template <int TA = 0, int TB = 0>
__device__ __forceinline__ void wgmma_ss_m64n128(float (&d)[64], std::uint64_t a, std::uint64_t b, int accumulate) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " SUBSPACE_WGMMA_D64 ", %64, %65, p, 1, 1, %67, %68;\n}\n"
      : SUBSPACE_OUT64(d)
      : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}
/// d[64 x 64] (+)= A[64 x 16] B[16 x 64], both in shared memory, majors as above.
template <int TA = 0, int TB = 0>
__device__ __forceinline__ void wgmma_ss_m64n64(float (&d)[32], std::uint64_t a, std::uint64_t b, int accumulate) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " SUBSPACE_WGMMA_D32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
      : SUBSPACE_OUT32(d)
      : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}
/// d[64 x 64] += A[64 x 16] (registers) B[16 x 64] (MN-major in shared memory).
__device__ __forceinline__ void wgmma_rs_m64n64(float (&d)[32], const unsigned (&a)[4], std::uint64_t b) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " SUBSPACE_WGMMA_D32
      ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : SUBSPACE_OUT32(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
/// d[64 x 128] += A[64 x 16] (registers) B[16 x 128] (MN-major in shared memory).
__device__ __forceinline__ void wgmma_rs_m64n128(float (&d)[64], const unsigned (&a)[4], std::uint64_t b) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " SUBSPACE_WGMMA_D64
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : SUBSPACE_OUT64(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
#undef SUBSPACE_WGMMA_D32
#undef SUBSPACE_WGMMA_D64
#undef SUBSPACE_OUT32
#undef SUBSPACE_OUT64
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ---- Kernel ---------------------------------------------------------------------------------------------------

/// Whether the two consumer warpgroups take turns issuing their wgmmas (ping-pong), so that one's softmax runs
/// while the other's products do.
inline constexpr bool ping_pong = true;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
/// Consumer c (0 or 1) waits for its turn to issue wgmmas: named barrier 1 + c, passed when the other consumer's
/// 128 threads have arrived on it.
__device__ __forceinline__ void consumer_sync(int c) { asm volatile("bar.sync %0, 256;" ::"r"(1 + c) : "memory"); }
/// Consumer c hands the turn to the other consumer.
__device__ __forceinline__ void consumer_arrive(int c) { asm volatile("bar.arrive %0, 256;" ::"r"(2 - c) : "memory"); }
#endif

template <int HD, bool PingPong>
__global__ void __launch_bounds__(threads, 1)
    forward_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                   const __grid_constant__ CUtensorMap map_v, const params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int chunks = HD / 64, O_REGS = HD / 2;
  constexpr float neg_inf = -__builtin_huge_valf();
  extern __shared__ unsigned char window[];
  auto& sm = *reinterpret_cast<shared<HD>*>((reinterpret_cast<std::uintptr_t>(window) + 1023) & ~std::uintptr_t(1023));
  // The warpgroup index through a shuffle, so the compiler knows it is uniform across the warp.
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0), t = int(threadIdx.x) % 128;
  // The row block is the grid's slowest dimension, counted down, so the blocks with the most keys start first
  // over every head and sequence (longest first: the shorter blocks fill the last wave).
  const int m_block = int(gridDim.z) - 1 - int(blockIdx.z);
  const int h = int(blockIdx.x), b = int(blockIdx.y), hk = h / p.group;
  const int i0 = m_block * BM, rows = min(BM, p.seq - i0);
  const int kv_end = key_end(p.causal, i0 + rows, p.delta, p.seq_kv);
  const int tiles = (kv_end + BN - 1) / BN;

  if (threadIdx.x == 0) {
    mbar_init(&sm.bar_q, 1);
    for (int s = 0; s < stages; ++s) {
      mbar_init(&sm.full_k[s], 1);
      mbar_init(&sm.full_v[s], 1);
      mbar_init(&sm.empty_k[s], consumers);
      mbar_init(&sm.empty_v[s], consumers);
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the inits, visible to the TMA unit
  }
  __syncthreads();

  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    if (t != 0 || tiles == 0) return;
    mbar_expect_tx(&sm.bar_q, sizeof(sm.q));
    for (int c = 0; c < chunks; ++c) tma_load_4d(sm.q[c], &map_q, 64 * c, h, i0, b, &sm.bar_q);
    for (int n = 0; n < tiles; ++n) {
      const int s = n % stages;
      const unsigned phase = unsigned(n / stages) & 1u;
      mbar_wait(&sm.empty_k[s], phase ^ 1u);  // a fresh barrier passes parity 1 at once
      mbar_expect_tx(&sm.full_k[s], sizeof(sm.k[s]));
      for (int c = 0; c < chunks; ++c) tma_load_4d(sm.k[s][c], &map_k, 64 * c, hk, n * BN, b, &sm.full_k[s]);
      mbar_wait(&sm.empty_v[s], phase ^ 1u);
      mbar_expect_tx(&sm.full_v[s], sizeof(sm.v[s]));
      for (int c = 0; c < chunks; ++c) tma_load_4d(sm.v[s][c], &map_v, 64 * c, hk, n * BN, b, &sm.full_v[s]);
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  // Consumer warpgroup c owns rows 64c .. 64c + 63 of the tile; this thread rows r and r + 8 of those, and in
  // each 8-column block of an accumulator the columns 2q and 2q + 1 (the m64nNk16 accumulator layout).
  const int c = wg - 1, warp = t / 32, lane = t % 32, q4 = lane % 4;
  const int r = 16 * warp + lane / 4, row0 = i0 + 64 * c + r;
  int last_key[2];  // the last key each of the thread's rows sees (-1: none)
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) last_key[hh] = key_end(p.causal, row0 + 8 * hh + 1, p.delta, p.seq_kv) - 1;

  float o[O_REGS], m[2] = {neg_inf, neg_inf}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < O_REGS; ++i) o[i] = 0.0f;

  // The turn to issue wgmmas (ping-pong): consumer 0 goes first. Each consumer has tiles + 1 turns, and the last
  // turn of consumer 1 hands over to nobody, so every arrival on a named barrier is waited for.
  const auto take_turn = [&] {
    if constexpr (PingPong) consumer_sync(c);
  };
  const auto pass_turn = [&](bool last) {
    if constexpr (PingPong)
      if (!(last && c == 1)) consumer_arrive(c);
  };
  if constexpr (PingPong)
    if (c == 1 && tiles > 0) consumer_arrive(c);

  // S = Q K^T of stage s into sc, over HD / 16 k-steps of 16 (the chunk changes every 4); not committed.
  const auto issue_s = [&](float(&sc)[64], int s) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
      wgmma_ss_m64n128(sc, sw128(sm.q[kk / 4] + 64 * c * 128 + (kk % 4) * 32, 16, 1024),
                       sw128(sm.k[s][kk / 4] + (kk % 4) * 32, 16, 1024), kk > 0);
  };
  // O += P V of stage s: P as bf16 pairs in the A-fragment layout, V's 16 key rows of k-step kk at +2048 bytes,
  // its 64-column chunks one stage-chunk apart; not committed.
  const auto issue_pv = [&](const unsigned(&pa)[BN / 16][4], int s) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const std::uint64_t vb = sw128(sm.v[s][0] + kk * 16 * 128, chunk_bytes, 1024);
      if constexpr (HD == 64) wgmma_rs_m64n64(o, pa[kk], vb);
      else wgmma_rs_m64n128(o, pa[kk], vb);
    }
  };
  // The online softmax of key tile n in sc (exp2 domain, masked where the tile crosses the diagonal or the end of
  // the keys): sc becomes P = 2^(x - m), m and l are updated, and `correction` is the factor O must take.
  const auto softmax = [&](float(&sc)[64], int n, float(&correction)[2]) {
    const int j0 = n * BN;
    const bool full =
        j0 + BN <= p.seq_kv && (!p.causal || std::int64_t(j0 + BN - 1) <= std::int64_t(i0 + 64 * c) + p.delta);
    float row_max[2] = {neg_inf, neg_inf};
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      const int hh = (i % 4) / 2, col = 8 * (i / 4) + 2 * q4 + (i & 1);
      float x = sc[i] * p.scale_log2;
      if (!full && j0 + col > last_key[hh]) x = neg_inf;
      sc[i] = x;
      row_max[hh] = fmaxf(row_max[hh], x);
    }
    float base[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      row_max[hh] = fmaxf(row_max[hh], __shfl_xor_sync(0xffffffffu, row_max[hh], 1));
      row_max[hh] = fmaxf(row_max[hh], __shfl_xor_sync(0xffffffffu, row_max[hh], 2));
      const float m_new = fmaxf(m[hh], row_max[hh]);
      base[hh] = m_new == neg_inf ? 0.0f : m_new;  // a row with nothing visible yet stays at 0
      correction[hh] = exp2_approx(m[hh] - base[hh]);
      m[hh] = m_new;
      l[hh] *= correction[hh];
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      const int hh = (i % 4) / 2;
      sc[i] = exp2_approx(sc[i] - base[hh]);
      l[hh] += sc[i];
    }
  };
  // P as bf16 pairs: the accumulator layout is the A-fragment layout. Every P register is written before the
  // first wgmma reads any (else ptxas fences between the wgmmas).
  const auto to_fragments = [](const float(&sc)[64], unsigned(&pa)[BN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const __nv_bfloat162 pr = __floats2bfloat162_rn(sc[8 * kk + 2 * x], sc[8 * kk + 2 * x + 1]);
        pa[kk][x] = *reinterpret_cast<const unsigned*>(&pr);
      }
  };

  if (tiles > 0) {
    // Tile n's S product is issued together with tile n - 1's PV product, so the softmax of tile n runs while
    // the tensor cores do PV; O takes tile n's correction once PV has landed.
    float sc[64], correction[2];
    unsigned pa[BN / 16][4];
    mbar_wait(&sm.bar_q, 0);
    mbar_wait(&sm.full_k[0], 0);
    take_turn();
    wgmma_fence();
    issue_s(sc, 0);
    wgmma_commit();
    pass_turn(false);
    wgmma_wait<0>();
    operand_fence(sc);
    if (t == 0) mbar_arrive(&sm.empty_k[0]);
    softmax(sc, 0, correction);  // O is still 0: no correction to apply
    to_fragments(sc, pa);
    for (int n = 1; n < tiles; ++n) {
      const int s = n % stages, s_prev = (n - 1) % stages;
      mbar_wait(&sm.full_k[s], unsigned(n / stages) & 1u);
      mbar_wait(&sm.full_v[s_prev], unsigned((n - 1) / stages) & 1u);
      take_turn();
      operand_fence(o);
      wgmma_fence();
      issue_s(sc, s);
      wgmma_commit();
      issue_pv(pa, s_prev);
      wgmma_commit();
      pass_turn(false);
      wgmma_wait<1>();  // S landed; PV may still run
      operand_fence(sc);
      if (t == 0) mbar_arrive(&sm.empty_k[s]);
      softmax(sc, n, correction);
      wgmma_wait<0>();
      operand_fence(o);
      if (t == 0) mbar_arrive(&sm.empty_v[s_prev]);
#pragma unroll
      for (int i = 0; i < O_REGS; ++i) o[i] *= correction[(i % 4) / 2];
      to_fragments(sc, pa);
    }
    const int s_last = (tiles - 1) % stages;
    mbar_wait(&sm.full_v[s_last], unsigned((tiles - 1) / stages) & 1u);
    take_turn();
    operand_fence(o);
    wgmma_fence();
    issue_pv(pa, s_last);
    wgmma_commit();
    pass_turn(true);
    wgmma_wait<0>();
    operand_fence(o);
    if (t == 0) mbar_arrive(&sm.empty_v[s_last]);
  }

  // Epilogue: out = O / l in bf16, lse = (m + log2 l) ln 2; the rows past S were zeros and are not stored.
  float inv[2], lse[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) finish_row(m[hh], l[hh], inv[hh], lse[hh]);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = row0 + 8 * hh;
    if (row >= p.seq) continue;
    __nv_bfloat16* og = p.out + b * p.os_b + h * p.os_h + std::int64_t(row) * p.os_s + 2 * q4;
#pragma unroll
    for (int j = 0; j < HD / 8; ++j)
      *reinterpret_cast<__nv_bfloat162*>(og + 8 * j) =
          __floats2bfloat162_rn(o[4 * j + 2 * hh] * inv[hh], o[4 * j + 2 * hh + 1] * inv[hh]);
    if (q4 == 0) p.lse[b * p.lse_b + h * p.lse_h + std::int64_t(row) * p.lse_s] = lse[hh];
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// ---- Host side ------------------------------------------------------------------------------------------------

/// Writes 1 when the running image of this kernel was built for sm_90a (a template, so that every translation unit
/// including this header may define it).
template <int = 0>
__global__ void probe_kernel(int* has_sm90a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *has_sm90a = 1;
#else
  *has_sm90a = 0;
#endif
}

/// Whether the current device runs this file's sm_90a kernels: asked once per device (one small launch and a
/// synchronization of `stream` the first time).
inline bool available(cudaStream_t stream) {
  static std::mutex mutex;
  static std::map<int, bool> known;
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  const std::lock_guard lock(mutex);
  if (const auto it = known.find(device); it != known.end()) return it->second;
  int major = 0;
  cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  bool has = false;
  if (major == 9) {
    cuda_detail::stream_scratch flag(sizeof(int), stream);
    probe_kernel<><<<1, 1, 0, stream>>>(static_cast<int*>(flag.get()));
    cuda_check(cudaGetLastError());
    int value = 0;
    cuda_check(cudaMemcpyAsync(&value, flag.get(), sizeof value, cudaMemcpyDeviceToHost, stream));
    cuda_check(cudaStreamSynchronize(stream));
    has = value == 1;
  }
  known.emplace(device, has);
  return has;
}

using encode_tiled_fn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                     const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                     CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/// The driver's cuTensorMapEncodeTiled, found through the runtime (no link against libcuda).
inline encode_tiled_fn encode_tiled() {
  static const encode_tiled_fn f = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    cuda_check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || p == nullptr)
      throw cuda_error("attention (CUDA): the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<encode_tiled_fn>(p);
  }();
  return f;
}

/// A TMA map of a bf16 [B, S, H, hd] view (unit stride in hd) as {hd, H, S, B}, boxes of 64 head-dim columns x 1
/// head x `box_rows` rows x 1 sequence, 128-byte swizzle, zeros out of bounds; nullopt where the driver refuses
/// the strides (the caller then takes the mma.sync kernel). A dimension of extent 1 gets the stride a contiguous
/// layout would give it, since TMA checks every stride, also those it never steps.
template <class V>
std::optional<CUtensorMap> map_bsh(const V& x, int box_rows) {
  const std::int64_t hd = x.dim(3), heads = x.dim(2), seq = x.dim(1), batch = x.dim(0);
  const std::int64_t s_h = heads > 1 ? x.stride(2) : hd, s_s = seq > 1 ? x.stride(1) : s_h * heads,
                     s_b = batch > 1 ? x.stride(0) : s_s * seq;
  CUtensorMap m;
  const cuuint64_t dims[4] = {cuuint64_t(hd), cuuint64_t(heads), cuuint64_t(seq), cuuint64_t(batch)};
  const cuuint64_t strides[3] = {cuuint64_t(s_h) * 2, cuuint64_t(s_s) * 2, cuuint64_t(s_b) * 2};
  const cuuint32_t box[4] = {64, 1, cuuint32_t(box_rows), 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUresult r =
      encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<void*>(static_cast<const void*>(x.data())),
                     dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return std::nullopt;
  return m;
}

}  // namespace subspace::cuda_detail::attention::sm90

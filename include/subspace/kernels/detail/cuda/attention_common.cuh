#pragma once
// What the CUDA attention kernels share: the exp2 of the online softmax, the [B, S, H, hd] strides, the causal
// key range of a block of rows and the first row that sees a key, the end of a row's online softmax, the backward's
// adds into the fp32 dq.

#include <cstdint>

namespace subspace::cuda_detail::attention {

/// 2^x (MUFU.EX2; exact 0 for -inf).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

inline constexpr float log2e = 1.4426950408889634f;
inline constexpr float ln2 = 0.6931471805599453f;

/// Element strides of a [B, S, H, hd] operand (the head-dim stride is 1).
struct bsh_strides {
  std::int64_t b = 0, s = 0, h = 0;
};

template <class V>
bsh_strides strides_of(const V& x) {
  return {x.stride(0), x.stride(1), x.stride(2)};
}

/// The last key index (exclusive) that rows [0, rows_end) may see, clamped to [0, seq_kv].
__device__ __forceinline__ int key_end(bool causal, int rows_end, std::int64_t delta, int seq_kv) {
  if (!causal) return seq_kv;
  const std::int64_t e = std::int64_t(rows_end - 1) + delta + 1;
  return int(e < 0 ? 0 : (e > seq_kv ? std::int64_t(seq_kv) : e));
}

/// The first query row that sees key j (causal: row i sees j when j <= i + delta), clamped to [0, seq]; 0 without
/// a mask. The backward kernels start their walk over the query tiles of a key block there.
__device__ __forceinline__ int first_row_seeing(bool causal, int j, std::int64_t delta, int seq) {
  if (!causal) return 0;
  const std::int64_t f = std::int64_t(j) - delta;
  return int(f < 0 ? 0 : (f > seq ? std::int64_t(seq) : f));
}

/// The end of the online softmax for a row whose four quad lanes each hold part of its sum l (in the exp2 domain,
/// relative to the running maximum m): inv = 1 / l, lse = (m + log2 l) ln 2, or 0 and -inf for a row that saw no
/// key.
__device__ __forceinline__ void finish_row(float m, float l, float& inv, float& lse) {
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  inv = l > 0.0f ? 1.0f / l : 0.0f;
  lse = l > 0.0f ? (m + __log2f(l)) * ln2 : -__builtin_huge_valf();
}

/// address[0..1] += (a, b), one 8-byte vector atomic on sm_90 (the backward's adds into the fp32 dq accumulator).
__device__ __forceinline__ void atomic_add2(float* address, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(address), make_float2(a, b));
#else
  atomicAdd(address, a);
  atomicAdd(address + 1, b);
#endif
}

}  // namespace subspace::cuda_detail::attention

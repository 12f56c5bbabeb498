#pragma once
// The host gemm's fp32 micro-kernels for x86-64 vector units, chosen at run time: AVX-512 (a 12 x 32 register
// tile: 24 of the 32 zmm registers accumulate) or AVX2 with FMA (6 x 16: 12 of the 16 ymm registers), compiled for
// those instruction sets with function attributes whatever the build's -march, and used when the CPU has them and
// the executor allows it (exec::host::vectors). kernels/gemm.hpp packs the panels and runs the blocks; the portable
// micro-kernel there is the reference these are tested against. GCC and Clang on x86-64 only; elsewhere nothing here
// is compiled and the portable kernel runs.

#include <cstdint>
#include <type_traits>
#include <utility>

#include "../../core/executor.hpp"
#include "../../core/vector_math.hpp"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SUBSPACE_DETAIL_GEMM_X86 1  // undefined at the end of this header
#include <immintrin.h>
#endif

namespace subspace::detail::gemm_host {

#if defined(SUBSPACE_DETAIL_GEMM_X86)

// Each kernel computes c[mr x 32 or 16] (leading dimension ldc) = (add ? c : 0) + A_tile * B_tile over kc steps.
// B's row p of the tile is at b + p * ldb (ldb = nr for a packed panel, or B's own row stride when B is read in
// place). A's tile is a packed panel (row i of step p at a[p * mr + i]) or, with InPlace, A itself (row i at
// a + i * lda, its k elements contiguous). Rows are unrolled with index_sequence folds: a lambda would not inherit
// the target attribute.

template <bool InPlace, std::size_t... I>
[[gnu::target("avx512f"), gnu::always_inline]] inline void rank1_avx512(__m512 (&acc)[sizeof...(I)][2], const float* a,
                                                                        std::int64_t lda, const __m512& b0,
                                                                        const __m512& b1, std::index_sequence<I...>) {
  ((acc[I][0] = _mm512_fmadd_ps(_mm512_set1_ps(a[InPlace ? std::int64_t(I) * lda : std::int64_t(I)]), b0, acc[I][0]),
    acc[I][1] = _mm512_fmadd_ps(_mm512_set1_ps(a[InPlace ? std::int64_t(I) * lda : std::int64_t(I)]), b1, acc[I][1])),
   ...);
}

/// row[0, 32) = (add ? row : 0) + (x0, x1).
[[gnu::target("avx512f"), gnu::always_inline]] inline void store_row_avx512(float* row, const __m512& x0,
                                                                            const __m512& x1, bool add) {
  _mm512_storeu_ps(row, add ? _mm512_add_ps(_mm512_loadu_ps(row), x0) : x0);
  _mm512_storeu_ps(row + 16, add ? _mm512_add_ps(_mm512_loadu_ps(row + 16), x1) : x1);
}

template <std::size_t... I>
[[gnu::target("avx512f"), gnu::always_inline]] inline void store_avx512(const __m512 (&acc)[sizeof...(I)][2], float* c,
                                                                        int ldc, bool add, std::index_sequence<I...>) {
  (store_row_avx512(c + std::int64_t(I) * ldc, acc[I][0], acc[I][1], add), ...);
}

/// The AVX-512 kernel: a 12 x 32 tile in 24 zmm accumulators.
template <bool InPlace>
[[gnu::target("avx512f")]] inline void micro_kernel_avx512(int kc, const float* a, std::int64_t lda, const float* b,
                                                           std::int64_t ldb, float* c, int ldc, bool add) {
  constexpr int mr = 12;
  __m512 acc[mr][2];
  for (auto& row : acc) row[0] = row[1] = _mm512_setzero_ps();
  for (int p = 0; p < kc; ++p, a += InPlace ? 1 : mr, b += ldb) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    rank1_avx512<InPlace>(acc, a, lda, b0, b1, std::make_index_sequence<mr>{});
  }
  store_avx512(acc, c, ldc, add, std::make_index_sequence<mr>{});
}

template <bool InPlace, std::size_t... I>
[[gnu::target("avx2,fma"), gnu::always_inline]] inline void rank1_avx2(__m256 (&acc)[sizeof...(I)][2], const float* a,
                                                                       std::int64_t lda, const __m256& b0,
                                                                       const __m256& b1, std::index_sequence<I...>) {
  ((acc[I][0] =
        _mm256_fmadd_ps(_mm256_broadcast_ss(a + (InPlace ? std::int64_t(I) * lda : std::int64_t(I))), b0, acc[I][0]),
    acc[I][1] =
        _mm256_fmadd_ps(_mm256_broadcast_ss(a + (InPlace ? std::int64_t(I) * lda : std::int64_t(I))), b1, acc[I][1])),
   ...);
}

[[gnu::target("avx2,fma"), gnu::always_inline]] inline void store_row_avx2(float* row, const __m256& x0,
                                                                           const __m256& x1, bool add) {
  _mm256_storeu_ps(row, add ? _mm256_add_ps(_mm256_loadu_ps(row), x0) : x0);
  _mm256_storeu_ps(row + 8, add ? _mm256_add_ps(_mm256_loadu_ps(row + 8), x1) : x1);
}

template <std::size_t... I>
[[gnu::target("avx2,fma"), gnu::always_inline]] inline void store_avx2(const __m256 (&acc)[sizeof...(I)][2], float* c,
                                                                       int ldc, bool add, std::index_sequence<I...>) {
  (store_row_avx2(c + std::int64_t(I) * ldc, acc[I][0], acc[I][1], add), ...);
}

/// The AVX2 kernel: a 6 x 16 tile in 12 ymm accumulators.
template <bool InPlace>
[[gnu::target("avx2,fma")]] inline void micro_kernel_avx2(int kc, const float* a, std::int64_t lda, const float* b,
                                                          std::int64_t ldb, float* c, int ldc, bool add) {
  constexpr int mr = 6;
  __m256 acc[mr][2];
  for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
  for (int p = 0; p < kc; ++p, a += InPlace ? 1 : mr, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    rank1_avx2<InPlace>(acc, a, lda, b0, b1, std::make_index_sequence<mr>{});
  }
  store_avx2(acc, c, ldc, add, std::make_index_sequence<mr>{});
}

/// The tiles of kernels/gemm.hpp's blocked loop for the kernels above (mc a multiple of mr, nc of nr). They can read
/// fp32 operands in place: a whole tile of A whose rows are contiguous along k (micro_direct), and a whole tile of
/// B whose rows are contiguous along n (any micro call, with B's row stride as ldb), which saves packing them.
struct avx512_tile {
  using acc = float;
  static constexpr int mr = 12, nr = 32, mc = 144, nc = 256, kc = 256;
  static void micro(int kc_, const float* a, const float* b, std::int64_t ldb, float* c, int ldc, bool add) {
    micro_kernel_avx512<false>(kc_, a, 0, b, ldb, c, ldc, add);
  }
  static void micro_direct(int kc_, const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float* c,
                           int ldc, bool add) {
    micro_kernel_avx512<true>(kc_, a, lda, b, ldb, c, ldc, add);
  }
};
struct avx2_tile {
  using acc = float;
  static constexpr int mr = 6, nr = 16, mc = 144, nc = 256, kc = 256;
  static void micro(int kc_, const float* a, const float* b, std::int64_t ldb, float* c, int ldc, bool add) {
    micro_kernel_avx2<false>(kc_, a, 0, b, ldb, c, ldc, add);
  }
  static void micro_direct(int kc_, const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float* c,
                           int ldc, bool add) {
    micro_kernel_avx2<true>(kc_, a, lda, b, ldb, c, ldc, add);
  }
};

#endif

/// Calls run(tile) with the widest tile the CPU and `ex` allow and returns true; false when only the portable
/// kernel may run (another CPU, another compiler, fp64, or exec::host::simd == portable).
template <class Acc, class Run>
bool run_vectorised([[maybe_unused]] const exec::host& ex, [[maybe_unused]] Run&& run) {
#if defined(SUBSPACE_DETAIL_GEMM_X86)
  if constexpr (std::is_same_v<Acc, float>) {
    switch (widest(ex)) {
      case vector_width::avx512: run(avx512_tile{}); return true;
      case vector_width::avx2_fma: run(avx2_tile{}); return true;
      case vector_width::portable: break;
    }
  }
#endif
  return false;
}

}  // namespace subspace::detail::gemm_host

#undef SUBSPACE_DETAIL_GEMM_X86

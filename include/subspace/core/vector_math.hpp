#pragma once
// Elementary functions for host loops that the compiler can vectorise: no library call, no branch, only the
// arithmetic of the build's target (no FMA, no SSE4.1 rounding), so a loop applying them runs 4 to 16 lanes wide
// where std::exp would run one element per call. Accuracy is stated per function; the host kernels that use them
// (attention's softmax, SwiGLU's sigmoid) are tested against float64 references.
//
// for_each_index runs a loop compiled for the CPU's widest vector unit when the executor allows it (exec::host::simd;
// x86-64 with GCC or Clang: AVX-512, else AVX2 with FMA, detected at run time by cpu_features, which
// kernels/detail/gemm_x86.hpp uses too); exp_shifted and fma_into are loops through it.

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "executor.hpp"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SUBSPACE_DETAIL_X86_TARGETS 1  // undefined at the end of this header
#endif

namespace subspace {

namespace detail {

/// The x86 vector instruction sets the host kernels use, as the CPU reports them (cached after the first call).
struct x86_features {
  bool avx2_fma = false, avx512 = false;
};

inline x86_features cpu_features() {
#if defined(SUBSPACE_DETAIL_X86_TARGETS)
  static const x86_features f = [] {
    __builtin_cpu_init();
    x86_features r;
    r.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    r.avx512 = __builtin_cpu_supports("avx512f");
    return r;
  }();
  return f;
#else
  return {};
#endif
}

/// The widest instruction set `ex` lets host loops use on this CPU.
enum class vector_width { portable, avx2_fma, avx512 };
inline vector_width widest(const exec::host& ex) {
  if (ex.simd == exec::host_simd::portable) return vector_width::portable;
  const x86_features f = cpu_features();
  return f.avx512 ? vector_width::avx512 : f.avx2_fma ? vector_width::avx2_fma : vector_width::portable;
}

}  // namespace detail

/// e^x in float, within a few ulp of the correctly rounded result for x in [-87.3, 88.7] (measured against std::exp
/// in double over that range: tests/host/test_vector_math.cpp); 0 below it, +inf above it, NaN for NaN. Cody–Waite
/// reduction x = n ln2 + r (|r| <= ln2 / 2) and a degree-6 polynomial for e^r (Cephes' expf coefficients), then 2^n
/// through the exponent bits.
[[gnu::always_inline]] inline float vector_exp(float x) {  // inlined: the loops around it vectorise
  constexpr float log2e = 1.44269504088896341f;
  constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;  // ln2_hi has 9 bits: n * ln2_hi is exact
  constexpr float round_magic = 12582912.0f;                        // 1.5 * 2^23: adding it rounds to an integer
  constexpr std::uint32_t lowest = 0xC2AE999Au;                     // -87.3f
  constexpr std::uint32_t highest = 0x42B16666u;                    // 88.7f
  constexpr std::uint32_t inf = 0x7F800000u, sign = 0x80000000u;
  // The range tests compare bit patterns as integers: a floating-point select would be a branch under GCC's
  // default -ftrapping-math, and the loop would not vectorise. Unsigned order is float order on each sign's side.
  const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  const bool nan = (u & ~sign) > inf;
  const bool under = !nan & (u > lowest);               // below -87.3 (the negative side grows with the magnitude)
  const bool over = !nan & (u > highest) & (u < sign);  // above 88.7
  // Masks rather than selects, so that the optimiser does not split the loop into constant and computed cases.
  const std::uint32_t m_under = 0u - std::uint32_t(under), m_high = 0u - std::uint32_t(over | nan);
  const float xc = std::bit_cast<float>((u & ~(m_under | m_high)) | (lowest & m_under) | (highest & m_high));
  const float n = (xc * log2e + round_magic) - round_magic;
  const float r = (xc - n * ln2_hi) - n * ln2_lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * (r * r) + r + 1.0f;
  // 2^n as two normal powers of two (n in [-126, 128] does not fit one float exponent at both ends).
  const std::int32_t ni = static_cast<std::int32_t>(n), n1 = ni / 2, n2 = ni - n1;
  const float y = er * std::bit_cast<float>((n1 + 127) << 23) * std::bit_cast<float>((n2 + 127) << 23);
  const std::uint32_t yb = std::bit_cast<std::uint32_t>(y);
  const std::uint32_t m_nan = 0u - std::uint32_t(nan), m_over = 0u - std::uint32_t(over);
  return std::bit_cast<float>((yb & ~(m_under | m_over | m_nan)) | (inf & m_over) | (u & m_nan));
}

/// e^x in double: std::exp (the float64 paths are references, not hot loops).
inline double vector_exp(double x) { return std::exp(x); }

namespace detail {

#if defined(SUBSPACE_DETAIL_X86_TARGETS)
// The loop of for_each_index compiled for wider units; f (default target) inlines into it.
template <class F>
[[gnu::target("avx512f")]] void for_each_index_avx512(std::int64_t n, F& f) {
  for (std::int64_t i = 0; i < n; ++i) f(i);
}
template <class F>
[[gnu::target("avx2,fma")]] void for_each_index_avx2(std::int64_t n, F& f) {
  for (std::int64_t i = 0; i < n; ++i) f(i);
}
#endif

}  // namespace detail

/// f(i) for every i in [0, n), in order, in a loop compiled for the widest vector unit `ex` allows on this CPU: f is
/// inlined into the loop, so a branch-free f (vector_exp, std::fma, arithmetic) vectorises at that width. Floating-
/// point results may differ between widths in rounding (the compiler may fuse a multiply and an add where the unit
/// has FMA), never in anything else.
template <class F>
void for_each_index([[maybe_unused]] const exec::host& ex, std::int64_t n, F&& f) {
#if defined(SUBSPACE_DETAIL_X86_TARGETS)
  switch (detail::widest(ex)) {
    case detail::vector_width::avx512: return detail::for_each_index_avx512(n, f);
    case detail::vector_width::avx2_fma: return detail::for_each_index_avx2(n, f);
    case detail::vector_width::portable: break;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) f(i);
}

/// The largest of x[0, n) (n >= 1; NaNs are skipped unless every element is NaN), in 16 independent lanes that the
/// compiler vectorises.
template <class T>
T max_of(const T* x, std::int64_t n) {
  T lanes[16];
  for (auto& l : lanes) l = x[0];
  std::int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) lanes[l] = x[j + l] > lanes[l] ? x[j + l] : lanes[l];
  T m = lanes[0];
  for (int l = 1; l < 16; ++l) m = lanes[l] > m ? lanes[l] : m;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

/// x[0] + ... + x[n-1], summed in 16 lanes (element j into lane j mod 16), then the lanes in order: vectorised, and
/// the same sum on every call with the same n.
template <class T>
T sum_of(const T* x, std::int64_t n) {
  T lanes[16] = {};
  std::int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += x[j + l];
  T s = 0;
  for (const T l : lanes) s += l;
  for (; j < n; ++j) s += x[j];
  return s;
}

/// x[i] = e^(x[i] - shift) for i < n (vector_exp in float, std::exp in double).
template <class T>
void exp_shifted(const exec::host& ex, T* x, std::int64_t n, T shift) {
  for_each_index(ex, n, [&](std::int64_t i) { x[i] = vector_exp(x[i] - shift); });
}

/// y[i] = fma(a, x[i], y[i]) for i < n, each correctly rounded: the same bits at every width, and as exact::fma.
inline void fma_into(const exec::host& ex, float a, const float* x, float* y, std::int64_t n) {
  for_each_index(ex, n, [&](std::int64_t i) { y[i] = std::fma(a, x[i], y[i]); });
}

}  // namespace subspace

#undef SUBSPACE_DETAIL_X86_TARGETS

#pragma once
// Elementary functions for host loops that the compiler can vectorise: no library call, no branch, only the
// arithmetic of the build's target (no FMA, no SSE4.1 rounding), so a loop applying them runs 4 to 16 lanes wide
// where std::exp would run one element per call. Accuracy is stated per function; the host kernels that use them
// (attention's softmax, SwiGLU's sigmoid) are tested against float64 references.

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace subspace {

/// e^x in float, within a few ulp of the correctly rounded result for x in [-87.3, 88.7] (measured against std::exp
/// in double over that range: tests/host/test_vector_math.cpp); 0 below it, +inf above it, NaN for NaN. Cody–Waite
/// reduction x = n ln2 + r (|r| <= ln2 / 2) and a degree-6 polynomial for e^r (Cephes' expf coefficients), then 2^n
/// through the exponent bits.
inline float vector_exp(float x) {
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

}  // namespace subspace

#pragma once
// Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11) and the draws built on it.
//
// A draw is a pure function of (seed, offset, index), so the host and the device produce bit-identical
// numbers for the same arguments, whatever the thread layout. To make that hold for the normal draws too, the
// transcendental functions below are written with explicit fused multiply-adds and IEEE-exact operations only:
// nvcc may otherwise contract a*b+c differently from the host compiler, and libm's log/sin/cos differ
// between the host and the device in the last bit.
//
// Layout: element i of a fill with (seed, offset) comes from Philox block i/4 with
//   counter = {lo32(i/4), hi32(i/4), lo32(offset), hi32(offset)},  key = {lo32(seed), hi32(seed)},
// lane i%4 for uniform draws; for normal draws lanes (0,1) and (2,3) form Box-Muller pairs (cos, sin).
// Distinct offsets give independent streams: give every fill its own offset.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "config.hpp"
#include "exact.hpp"

namespace subspace::rng {

struct u32x4 {
  std::uint32_t v[4];
};

namespace detail {
SUBSPACE_HD inline void mulhilo(std::uint32_t a, std::uint32_t b, std::uint32_t& hi, std::uint32_t& lo) {
  const std::uint64_t p = std::uint64_t(a) * std::uint64_t(b);
  hi = std::uint32_t(p >> 32);
  lo = std::uint32_t(p);
}
}  // namespace detail

/// Philox4x32 with 10 rounds; checked against Random123's known-answer vectors.
SUBSPACE_HD inline u32x4 philox4x32_10(u32x4 ctr, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u, w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, lo0, hi1, lo1;
    detail::mulhilo(m0, ctr.v[0], hi0, lo0);
    detail::mulhilo(m1, ctr.v[2], hi1, lo1);
    ctr = u32x4{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += w0;
    k1 += w1;
  }
  return ctr;
}

/// The four raw 32-bit words of block `block` of stream (seed, offset).
SUBSPACE_HD inline u32x4 bits4(std::uint64_t seed, std::uint64_t offset, std::uint64_t block) {
  return philox4x32_10(
      u32x4{{std::uint32_t(block), std::uint32_t(block >> 32), std::uint32_t(offset), std::uint32_t(offset >> 32)}},
      std::uint32_t(seed), std::uint32_t(seed >> 32));
}

namespace detail {

SUBSPACE_HD inline std::uint64_t double_bits(double x) {
#if defined(__CUDA_ARCH__)
  return std::uint64_t(__double_as_longlong(x));
#else
  std::uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}
SUBSPACE_HD inline double bits_double(std::uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double((long long)u);
#else
  double x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

/// Natural log of a normal positive double, accurate to a few ulp, computed identically on host and device.
SUBSPACE_HD inline double log_det(double x) {
  const std::uint64_t b = double_bits(x);
  int e = int((b >> 52) & 0x7ff) - 1023;
  double m = bits_double((b & 0x000fffffffffffffull) | 0x3ff0000000000000ull);  // m in [1, 2)
  if (m > 1.4142135623730951) {
    m = m * 0.5;  // exact
    e += 1;
  }
  // log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716: the odd series to s^25 is below 1e-17.
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double p = 1.0 / 25.0;
  p = exact::fma(p, s2, 1.0 / 23.0);
  p = exact::fma(p, s2, 1.0 / 21.0);
  p = exact::fma(p, s2, 1.0 / 19.0);
  p = exact::fma(p, s2, 1.0 / 17.0);
  p = exact::fma(p, s2, 1.0 / 15.0);
  p = exact::fma(p, s2, 1.0 / 13.0);
  p = exact::fma(p, s2, 1.0 / 11.0);
  p = exact::fma(p, s2, 1.0 / 9.0);
  p = exact::fma(p, s2, 1.0 / 7.0);
  p = exact::fma(p, s2, 1.0 / 5.0);
  p = exact::fma(p, s2, 1.0 / 3.0);
  const double two_s = 2.0 * s;
  const double log_m = exact::fma(two_s, s2 * p, two_s);
  constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  return exact::fma(double(e), ln2_hi, exact::fma(double(e), ln2_lo, log_m));
}

/// cos(2 pi v) and sin(2 pi v) for v in [0, 1), computed identically on host and device.
SUBSPACE_HD inline void cossin_2pi_det(double v, double& c, double& s) {
  const double w = v * 4.0;  // exact
  const double q = (w - double(std::int64_t(w))) > 0.5 ? double(std::int64_t(w)) + 1.0 : double(std::int64_t(w));
  const double g = w - q;  // in [-0.5, 0.5], exact
  const int quadrant = int(q) & 3;
  const double t = g * 1.5707963267948966;  // angle in [-pi/4, pi/4]
  const double t2 = t * t;
  // Taylor series: terms past t^17 / t^18 are below 1e-17 on this interval.
  double ps = 1.0 / 355687428096000.0;  // 1/17!
  ps = exact::fma(ps, t2, -1.0 / 1307674368000.0);
  ps = exact::fma(ps, t2, 1.0 / 6227020800.0);
  ps = exact::fma(ps, t2, -1.0 / 39916800.0);
  ps = exact::fma(ps, t2, 1.0 / 362880.0);
  ps = exact::fma(ps, t2, -1.0 / 5040.0);
  ps = exact::fma(ps, t2, 1.0 / 120.0);
  ps = exact::fma(ps, t2, -1.0 / 6.0);
  const double sin_t = exact::fma(t * t2, ps, t);
  double pc = -1.0 / 6402373705728000.0;  // -1/18!
  pc = exact::fma(pc, t2, 1.0 / 20922789888000.0);
  pc = exact::fma(pc, t2, -1.0 / 87178291200.0);
  pc = exact::fma(pc, t2, 1.0 / 479001600.0);
  pc = exact::fma(pc, t2, -1.0 / 3628800.0);
  pc = exact::fma(pc, t2, 1.0 / 40320.0);
  pc = exact::fma(pc, t2, -1.0 / 720.0);
  pc = exact::fma(pc, t2, 1.0 / 24.0);
  pc = exact::fma(pc, t2, -0.5);
  const double cos_t = exact::fma(t2, pc, 1.0);
  switch (quadrant) {
    case 0:
      c = cos_t;
      s = sin_t;
      break;
    case 1:
      c = -sin_t;
      s = cos_t;
      break;
    case 2:
      c = -cos_t;
      s = -sin_t;
      break;
    default:
      c = sin_t;
      s = -cos_t;
      break;
  }
}

}  // namespace detail

/// Maps 32 random bits to a float uniform on [0, 1) (24 significant bits, exact).
SUBSPACE_HD inline float to_uniform(std::uint32_t x) { return float(x >> 8) * (1.0f / 16777216.0f); }

/// The float next to x towards -infinity (x finite).
SUBSPACE_HD inline float next_below(float x) {
  if (x == 0.0f) return -1.4e-45f;  // the smallest negative denormal
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = x > 0.0f ? bits - 1 : bits + 1;
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

/// Four uniform draws on [lo, hi) from block `block` of stream (seed, offset). lo + (hi - lo)·u can round up to
/// hi when u is just below 1; such a draw is the float just below hi instead, so hi is never returned.
SUBSPACE_HD inline void uniform4(std::uint64_t seed, std::uint64_t offset, std::uint64_t block, float lo, float hi,
                                 float out[4]) {
  const u32x4 r = bits4(seed, offset, block);
  for (int i = 0; i < 4; ++i) {
    const float v = exact::fma(hi - lo, to_uniform(r.v[i]), lo);
    out[i] = v < hi ? v : next_below(hi);
  }
}

/// Four normal draws N(mean, std^2) from block `block` of stream (seed, offset), by Box-Muller.
SUBSPACE_HD inline void normal4(std::uint64_t seed, std::uint64_t offset, std::uint64_t block, float mean, float std,
                                float out[4]) {
  const u32x4 r = bits4(seed, offset, block);
  for (int pair = 0; pair < 2; ++pair) {
    const double u1 = (double(r.v[2 * pair]) + 1.0) * (1.0 / 4294967296.0);  // (0, 1]
    const double u2 = double(r.v[2 * pair + 1]) * (1.0 / 4294967296.0);      // [0, 1)
    const double radius = exact::sqrt(-2.0 * detail::log_det(u1));
    double c, s;
    detail::cossin_2pi_det(u2, c, s);
    out[2 * pair] = exact::fma(std, float(radius * c), mean);
    out[2 * pair + 1] = exact::fma(std, float(radius * s), mean);
  }
}

/// Element `index` of a uniform fill with (seed, offset): the reference definition the kernels follow.
SUBSPACE_HD inline float uniform_at(std::uint64_t seed, std::uint64_t offset, std::uint64_t index, float lo = 0.0f,
                                    float hi = 1.0f) {
  float v[4];
  uniform4(seed, offset, index / 4, lo, hi, v);
  return v[index % 4];
}

/// Element `index` of a normal fill with (seed, offset).
SUBSPACE_HD inline float normal_at(std::uint64_t seed, std::uint64_t offset, std::uint64_t index, float mean = 0.0f,
                                   float std = 1.0f) {
  float v[4];
  normal4(seed, offset, index / 4, mean, std, v);
  return v[index % 4];
}

}  // namespace subspace::rng

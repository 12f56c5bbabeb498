#pragma once
// Element types: bf16 and fp16 usable on the host (bit-exact round-to-nearest-even conversions) and on the
// device (layout-compatible with __nv_bfloat16 / __half, converted with the hardware instructions there).

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "config.hpp"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace subspace {

namespace detail {
SUBSPACE_HD inline std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
SUBSPACE_HD inline float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
/// Rounds a double to float with round-to-odd: the result is exact, or the neighbour of the two that has an
/// odd last bit. A round-to-odd value with at least two more significant bits than the final format
/// (float's 24 against bf16's 8 and fp16's 11) rounds to nearest even into that format exactly as the original
/// double would (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using
/// rounding to odd", 2008).
SUBSPACE_HD inline float to_float_round_odd(double d) {
  const float nearest = float(d);                      // round to nearest even
  if (double(nearest) == d || d != d) return nearest;  // exact, or NaN
  std::uint32_t bits = float_bits(nearest);
  const double abs_nearest = nearest < 0 ? -double(nearest) : double(nearest);
  const double abs_d = d < 0 ? -d : d;
  if (abs_nearest > abs_d) --bits;  // truncate: one step toward zero (also turns infinity into the largest float)
  return bits_float(bits | 1u);
}

}  // namespace detail

/// bfloat16: 1 sign, 8 exponent, 7 mantissa bits. Conversion from float rounds to nearest even; NaN stays NaN.
struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  SUBSPACE_HD bf16(float f) : bits(from_float(f)) {}  // NOLINT: implicit, like a built-in narrowing
  SUBSPACE_HD operator float() const { return detail::bits_float(std::uint32_t(bits) << 16); }

  SUBSPACE_HD static bf16 from_bits(std::uint16_t b) {
    bf16 r;
    r.bits = b;
    return r;
  }
  SUBSPACE_HD static std::uint16_t from_float(float f) {
#if defined(__CUDA_ARCH__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    std::uint32_t u = detail::float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return std::uint16_t(u >> 16);
#endif
  }
};

/// IEEE binary16: 1 sign, 5 exponent, 10 mantissa bits, with subnormals; round to nearest even.
struct fp16 {
  std::uint16_t bits = 0;

  fp16() = default;
  SUBSPACE_HD fp16(float f) : bits(from_float(f)) {}  // NOLINT
  SUBSPACE_HD operator float() const { return to_float(bits); }

  SUBSPACE_HD static fp16 from_bits(std::uint16_t b) {
    fp16 r;
    r.bits = b;
    return r;
  }
  SUBSPACE_HD static std::uint16_t from_float(float f) {
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(f));
#else
    const std::uint32_t u = detail::float_bits(f);
    const std::uint32_t sign = (u >> 16) & 0x8000u;
    const std::uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);   // NaN
    if (abs >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // rounds to infinity (>= 65520)
    if (abs < 0x38800000u) {                                       // subnormal or zero in half
      // value = abs_float; half subnormal unit is 2^-24. Round abs / 2^-24 to nearest even.
      const float scaled = detail::bits_float(abs) * 16777216.0f;  // exact: multiply by 2^24
      std::uint32_t q = std::uint32_t(scaled);
      const float rem = scaled - float(q);
      if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
      return std::uint16_t(sign | q);
    }
    std::uint32_t h = ((abs >> 13) - (112u << 10));  // rebias exponent 127 -> 15
    const std::uint32_t rest = abs & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return std::uint16_t(sign | h);
#endif
  }
  SUBSPACE_HD static float to_float(std::uint16_t b) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(b));
#else
    const std::uint32_t sign = std::uint32_t(b & 0x8000u) << 16;
    const std::uint32_t exp = (b >> 10) & 0x1fu;
    const std::uint32_t man = b & 0x3ffu;
    if (exp == 0) {
      const float v = float(man) * (1.0f / 16777216.0f);  // man * 2^-24, exact
      return sign ? -v : v;
    }
    if (exp == 31) return detail::bits_float(sign | 0x7f800000u | (man << 13));
    return detail::bits_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
  }
};

static_assert(sizeof(bf16) == 2 && sizeof(fp16) == 2);
static_assert(std::is_trivially_copyable_v<bf16> && std::is_trivially_copyable_v<fp16>);

/// True for the element types the kernels accept.
template <class T>
inline constexpr bool is_element_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

/// The type arithmetic on T accumulates in: float for the 16-bit types and float, double for double.
template <class T>
using accum_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// Converts between element types with a single round-to-nearest-even (double to a 16-bit type goes through
/// a round-to-odd float, which avoids double rounding).
template <class To, class From>
SUBSPACE_HD inline To convert(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (std::is_same_v<From, double> && (std::is_same_v<To, bf16> || std::is_same_v<To, fp16>)) {
    return To(detail::to_float_round_odd(x));
  } else if constexpr (std::is_same_v<To, double> || std::is_same_v<From, double>) {
    return To(static_cast<double>(x));
  } else {
    return To(float(x));
  }
}

/// Human-readable name of an element type, for messages and benchmark records.
template <class T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  else if constexpr (std::is_same_v<T, double>) return "fp64";
  else if constexpr (std::is_same_v<T, bf16>) return "bf16";
  else if constexpr (std::is_same_v<T, fp16>) return "fp16";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "int32";
  else if constexpr (std::is_same_v<T, std::uint16_t>) return "uint16";
  else return "unknown";
}

}  // namespace subspace

#pragma once
// Correctly rounded arithmetic that rounds identically on the host and the device.
//
// nvcc contracts a*b+c into a fused multiply-add where the host compiler may not, and the device's fast
// division and square root are approximate; either would make a CUDA result differ from the host reference in
// the last bit. Kernels that promise bit-identical results (RNG draws, axpy, AdamW) spell those operations
// with these functions.

#include <cmath>

#include "config.hpp"

namespace subspace::exact {

/// a * b + c with one rounding.
SUBSPACE_HD inline float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
SUBSPACE_HD inline double fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

/// a / b, correctly rounded.
SUBSPACE_HD inline float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

/// The square root, correctly rounded.
SUBSPACE_HD inline float sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
SUBSPACE_HD inline double sqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

}  // namespace subspace::exact

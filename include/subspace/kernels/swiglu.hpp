#pragma once
// SwiGLU (docs/llama-kernels.md), element by element over [N, f]:
//
//   swiglu_forward(ex, gate, up, h)                    h = silu(gate) * up,  silu(g) = g * sigmoid(g)
//   swiglu_backward(ex, gate, up, dh, dgate, dup, h = {})
//                                                      dgate = dh * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
//                                                      dup   = dh * silu(g)                    (both overwritten)
//                                                      h     = silu(g) * up, when h is given: the forward's output
//                                                              recomputed bit for bit, so a layer need not keep it
//
// Every element is computed in accum_t<T> from its own inputs and rounded to T once, so the outputs may alias
// the inputs (h may be gate or up; dgate may be gate, dup may be up, the backward's h may be dh), which lets a
// caller overwrite the saved activations with their gradients. Host: the reference, on the calling thread. CUDA
// (detail/cuda/swiglu.cuh): a grid-stride loop with 16-byte vector access when the pointers allow.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../core/config.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor.hpp"
#include "../core/vector_math.hpp"
#include "detail/layer_checks.hpp"

namespace subspace {

namespace detail::swiglu {

SUBSPACE_HD inline float exp_of(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return vector_exp(x);  // the host loops below vectorise with it
#endif
}
SUBSPACE_HD inline double exp_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <class A>
SUBSPACE_HD inline A sigmoid(A g) {
  return A(1) / (A(1) + exp_of(-g));
}

/// h = silu(g) * u, computing sigmoid(g) or given it as s (the same operations, so the same bits).
struct forward_op {
  template <class A>
  SUBSPACE_HD A operator()(A g, A u, A s) const {
    return g * s * u;
  }
  template <class A>
  SUBSPACE_HD A operator()(A g, A u) const {
    return (*this)(g, u, sigmoid(g));
  }
};

/// (dgate, dup) of one element, from its sigmoid s = sigmoid(g) or computing it.
struct backward_op {
  template <class A>
  SUBSPACE_HD void operator()(A g, A u, A dh, A s, A& dg, A& du) const {
    dg = dh * u * s * (A(1) + g * (A(1) - s));
    du = dh * g * s;
  }
  template <class A>
  SUBSPACE_HD void operator()(A g, A u, A dh, A& dg, A& du) const {
    (*this)(g, u, dh, sigmoid(g), dg, du);
  }
};

/// What for_flops weighs one element at (the exponential's polynomial and a division, roughly).
inline constexpr double flops_per_element = 30.0;

/// Shapes and layouts shared by both executors: every operand is [N, f] like gate, and contiguous.
template <class Gate, class... Rows>
void check(const char* op, const Gate& gate, const detail::layer::operand<Rows>&... rows) {
  namespace L = detail::layer;
  L::require_rank(gate, 2, op, "gate");
  L::require_contiguous(gate, op, "gate");
  L::require_all(gate.shape(), op, rows...);
}

}  // namespace detail::swiglu

/// h = silu(gate) * up, element by element (h may alias gate or up).
template <class T>
  requires is_element_v<T>
void swiglu_forward(const exec::host& ex, std::type_identity_t<view<const T, host_space>> gate,
                    std::type_identity_t<view<const T, host_space>> up, view<T, host_space> h) {
  using A = accum_t<T>;
  namespace S = detail::swiglu;
  namespace L = detail::layer;
  S::check("swiglu_forward", gate, L::operand{up, "up"}, L::operand{h, "h"});
  const T *g = gate.data(), *u = up.data();
  T* out = h.data();
  parallel_for(for_flops(ex, S::flops_per_element * double(gate.numel())), gate.numel(),
               [&](std::int64_t first, std::int64_t last) {
                 for_each_index(ex, last - first, [&](std::int64_t k) {
                   const std::int64_t i = first + k;
                   out[i] = convert<T>(S::forward_op{}(A(g[i]), A(u[i])));
                 });
               });
}

/// dgate and dup from dh (overwritten; dgate may alias gate and dup may alias up), and h = silu(gate) * up when
/// h is given (it may alias dh).
template <class T>
  requires is_element_v<T>
void swiglu_backward(const exec::host& ex, std::type_identity_t<view<const T, host_space>> gate,
                     std::type_identity_t<view<const T, host_space>> up,
                     std::type_identity_t<view<const T, host_space>> dh, view<T, host_space> dgate,
                     std::type_identity_t<view<T, host_space>> dup, std::type_identity_t<view<T, host_space>> h = {}) {
  using A = accum_t<T>;
  namespace S = detail::swiglu;
  namespace L = detail::layer;
  S::check("swiglu_backward", gate, L::operand{up, "up"}, L::operand{dh, "dh"}, L::operand{dgate, "dgate"},
           L::operand{dup, "dup"});
  if (h.data()) S::check("swiglu_backward", gate, L::operand{h, "h"});
  const T *g = gate.data(), *u = up.data(), *d = dh.data();
  T *dg_out = dgate.data(), *du_out = dup.data(), *h_out = h.data();
  // Blocks of `block` elements: the arithmetic writes local arrays, a second loop copies them out. The outputs may
  // alias the inputs, so in one loop the compiler needs run-time overlap checks for every pair of pointers; with h
  // there are more than it will emit, and the loop ran scalar (11% of a host step of the tiny preset).
  constexpr std::int64_t block = 256;
  const auto run = [&]<bool WithH>() {  // two variants rather than a test per element, so each vectorises
    parallel_for(
        for_flops(ex, (WithH ? 3 : 2) * S::flops_per_element * double(gate.numel())), gate.numel(),
        [&](std::int64_t first, std::int64_t last) {
          A sg[block], dg[block], du[block];
          [[maybe_unused]] A hh[WithH ? block : 1];
          for (std::int64_t b0 = first; b0 < last; b0 += block) {
            const std::int64_t n = std::min(block, last - b0);
            const T *gb = g + b0, *ub = u + b0, *db = d + b0;
            for_each_index(ex, n, [&](std::int64_t k) { sg[k] = S::sigmoid(A(gb[k])); });
            for_each_index(
                ex, n, [&](std::int64_t k) { S::backward_op{}(A(gb[k]), A(ub[k]), A(db[k]), sg[k], dg[k], du[k]); });
            if constexpr (WithH)
              for_each_index(ex, n, [&](std::int64_t k) { hh[k] = S::forward_op{}(A(gb[k]), A(ub[k]), sg[k]); });
            T *dgb = dg_out + b0, *dub = du_out + b0;
            for_each_index(ex, n, [&](std::int64_t k) {
              dgb[k] = convert<T>(dg[k]);
              dub[k] = convert<T>(du[k]);
            });
            if constexpr (WithH) {
              T* hb = h_out + b0;
              for_each_index(ex, n, [&](std::int64_t k) { hb[k] = convert<T>(hh[k]); });
            }
          }
        });
  };
  if (h_out) run.template operator()<true>();
  else run.template operator()<false>();
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/swiglu.cuh"
#endif

#pragma once
// Rotary position embedding (docs/llama-kernels.md), Hugging Face's layout: within a head of hd elements, element
// i and element i + hd/2 form a pair (i < hd/2), rotated by the angle (pos0 + s) * inv_freq[i] at sequence
// position s:
//
//   x'[i]        = x[i] cos - x[i + hd/2] sin
//   x'[i + hd/2] = x[i + hd/2] cos + x[i] sin
//
//   rope_inv_freq(rope_config, hd) -> std::vector<float>       the hd/2 inverse frequencies (Llama 3.1 scaling
//                                                                when enabled), computed in double on the host
//   rope_apply(ex, x[B, S, H, hd], inv_freq[hd/2], pos0, inverse)   rotates x in place; inverse = true rotates
//                                                                by the negative angle, which is the backward pass
//
// inv_freq is a float view in the executor's memory space. The angle is formed in accum_t<T> (float for bf16 and
// float, double for double; Hugging Face forms it in fp32 too) and its cosine and sine are taken there; the
// rotation is computed in accum_t<T> and rounded to T once. Host: the reference, on the calling thread, with a
// per-call table of the S x hd/2 cosines and sines. CUDA (detail/cuda/rope.cuh): one thread per run of pairs.

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor.hpp"
#include "detail/layer_checks.hpp"
#include "rope_config.hpp"

namespace subspace {

/// The hd/2 inverse frequencies theta^(-2i/hd), i < hd/2, with the Llama 3.1 rescaling when
/// cfg.llama31_scaling: wavelengths longer than original_max_position / low_freq_factor are divided by
/// `factor`, those shorter than original_max_position / high_freq_factor are kept, and those in between are
/// interpolated (Hugging Face's _compute_llama3_parameters).
inline std::vector<float> rope_inv_freq(const rope_config& cfg, std::int64_t head_dim) {
  require(head_dim > 0 && head_dim % 2 == 0,
          [&] { return "rope_inv_freq: head_dim must be positive and even, got " + std::to_string(head_dim); });
  require(cfg.theta > 0, "rope_inv_freq: theta must be positive");
  const std::int64_t half = head_dim / 2;
  std::vector<float> out(static_cast<std::size_t>(half));
  for (std::int64_t i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(double(cfg.theta), double(2 * i) / double(head_dim));
    if (cfg.llama31_scaling) {
      require(cfg.factor > 0 && cfg.high_freq_factor > cfg.low_freq_factor && cfg.low_freq_factor > 0 &&
                  cfg.original_max_position > 0,
              "rope_inv_freq: Llama 3.1 scaling needs factor > 0, high_freq_factor > low_freq_factor > 0 and "
              "original_max_position > 0");
      const double old_len = double(cfg.original_max_position);
      const double low_wavelen = old_len / cfg.low_freq_factor, high_wavelen = old_len / cfg.high_freq_factor;
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f = f / cfg.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor);
        f = (1.0 - smooth) * f / cfg.factor + smooth * f;
      }
    }
    out[static_cast<std::size_t>(i)] = float(f);
  }
  return out;
}

namespace detail::rope {

/// Shapes and layouts shared by both executors.
template <class X, class F>
void check(const X& x, const F& inv_freq, std::int64_t pos0) {
  namespace L = detail::layer;
  L::require_rank(x, 4, "rope_apply", "x");
  L::require_contiguous(x, "rope_apply", "x");
  require(x.dim(3) % 2 == 0,
          [&] { return "rope_apply: head dimension of x " + to_string(x.shape()) + " must be even"; });
  L::require_shape(inv_freq, shape{x.dim(3) / 2}, "rope_apply", "inv_freq");
  L::require_contiguous(inv_freq, "rope_apply", "inv_freq");
  require(pos0 >= 0, [&] { return "rope_apply: pos0 must be non-negative, got " + std::to_string(pos0); });
}

/// Rotates the pair (a, b) by the angle whose cosine and sine are (c, s): a' = a c - b s, b' = b c + a s.
template <class A>
SUBSPACE_HD inline void rotate(A& a, A& b, A c, A s) {
  const A a0 = a, b0 = b;
  a = a0 * c - b0 * s;
  b = b0 * c + a0 * s;
}

}  // namespace detail::rope

/// Rotates every head of x [B, S, H, hd] in place by the angles (pos0 + s) * inv_freq[i] (negated when
/// `inverse`).
template <class T>
  requires is_element_v<T>
void rope_apply(const exec::host& ex, view<T, host_space> x, view<const float, host_space> inv_freq, std::int64_t pos0,
                bool inverse) {
  using A = accum_t<T>;
  detail::rope::check(x, inv_freq, pos0);
  const std::int64_t batch = x.dim(0), seq = x.dim(1), heads = x.dim(2), hd = x.dim(3), half = hd / 2;
  std::vector<A> cs(static_cast<std::size_t>(seq * half * 2));
  for (std::int64_t s = 0; s < seq; ++s)
    for (std::int64_t i = 0; i < half; ++i) {
      const A angle = A(pos0 + s) * A(inv_freq.data()[i]);
      cs[std::size_t(2 * (s * half + i))] = std::cos(angle);
      cs[std::size_t(2 * (s * half + i) + 1)] = inverse ? -std::sin(angle) : std::sin(angle);
    }
  // Rows (b, s) are independent; each is rotated the same way on any thread.
  parallel_for(for_flops(ex, 6.0 * double(x.numel())), batch * seq, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t bs = first; bs < last; ++bs) {
      const A* c = cs.data() + 2 * (bs % seq) * half;
      for (std::int64_t h = 0; h < heads; ++h) {
        T* row = x.data() + (bs * heads + h) * hd;
        for (std::int64_t i = 0; i < half; ++i) {
          A lo = A(row[i]), hi = A(row[i + half]);
          detail::rope::rotate(lo, hi, c[2 * i], c[2 * i + 1]);
          row[i] = convert<T>(lo);
          row[i + half] = convert<T>(hi);
        }
      }
    }
  });
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/rope.cuh"
#endif

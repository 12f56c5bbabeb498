#pragma once
// The element updates of decent_adam and accum_adam (decent_adam.hpp, accum_adam.hpp), shared by the host loop
// below and the CUDA kernels (detail/cuda/adam.cuh), and the checks both optimizers run on their arguments.
//
// The updates are written with explicit fused multiply-adds and correctly rounded division and square root
// (subspace::exact), so the host and the device produce the same bits whatever the compilers' contraction
// settings. DAdam and AccumAdam share the decay and the final Adam step, so AccumAdam with K = 1 is DAdam bit
// for bit.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include <subspace/core/config.hpp>
#include <subspace/core/dtype.hpp>
#include <subspace/core/error.hpp>
#include <subspace/core/exact.hpp>
#include <subspace/core/executor.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/optim/concepts.hpp>

namespace decent {

/// How weight decay enters the update of a decayed parameter (optim::param_info::decay).
enum class weight_decay_rule {
  l2,         // Adam: the gradient gets wd·x̃ (x̃: the mixed point), so the decay also feeds the moments
  decoupled,  // AdamW: x̃ <- x̃·(1 − lr·wd) before the Adam step, outside the moments
};

namespace detail {

/// The scalars of one step, shared by every element of a parameter.
struct adam_coefficients {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float step_size;   // lr / (1 − beta1^k)
  float sqrt_bias2;  // sqrt(1 − beta2^k)
  float eps;
  float l2;            // wd under weight_decay_rule::l2 on a decayed parameter, else 0
  float decay_factor;  // 1 − lr·wd under weight_decay_rule::decoupled on a decayed parameter, else 1
};

/// AccumAdam's window scalars: K, and whether this step closes a window (s mod K == 0).
struct accum_coefficients {
  float accum_iter;
  bool closes_window;
};

/// Weight decay on one element: L2 adds wd·x̃ to the gradient; decoupled shrinks x̃. Returns the gradient the
/// moments see and updates x in place.
SUBSPACE_HD inline float apply_decay(float& x, float g, const adam_coefficients& c) {
  if (c.l2 != 0.0f) g = subspace::exact::fma(c.l2, x, g);
  x = x * c.decay_factor;
  return g;
}

/// The bias-corrected Adam step from moments m and v: x − step_size · m / (sqrt(v) / sqrt_bias2 + eps).
SUBSPACE_HD inline float adam_step(float x, float m, float v, const adam_coefficients& c) {
  const float denom = subspace::exact::div(subspace::exact::sqrt(v), c.sqrt_bias2) + c.eps;
  return subspace::exact::fma(-c.step_size, subspace::exact::div(m, denom), x);
}

/// One element of DAdam at the mixed point x̃: updates m and v in place and returns the new parameter.
SUBSPACE_HD inline float dadam_update(float mixed, float g, float& m, float& v, const adam_coefficients& c) {
  g = apply_decay(mixed, g, c);
  m = subspace::exact::fma(c.beta1, m, c.one_minus_beta1 * g);
  v = subspace::exact::fma(c.beta2, v, c.one_minus_beta2 * (g * g));
  return adam_step(mixed, m, v, c);
}

/// One element of AccumAdam at the mixed point x̃: the step uses look-ahead moments with the current gradient;
/// the persistent M and V take the window's mean gradient Acc when the window closes. Returns the new parameter.
SUBSPACE_HD inline float accum_adam_update(float mixed, float g, float& M, float& V, float& acc,
                                           const adam_coefficients& c, const accum_coefficients& a) {
  g = apply_decay(mixed, g, c);
  acc = acc + subspace::exact::div(g, a.accum_iter);
  const float m = subspace::exact::fma(c.beta1, M, c.one_minus_beta1 * g);
  const float v = subspace::exact::fma(c.beta2, V, c.one_minus_beta2 * (g * g));
  const float x = adam_step(mixed, m, v, c);
  if (a.closes_window) {
    M = subspace::exact::fma(c.beta1, M, c.one_minus_beta1 * acc);
    V = subspace::exact::fma(c.beta2, V, c.one_minus_beta2 * (acc * acc));
    acc = 0.0f;
  }
  return x;
}

/// The executor-specific part of both optimizers: zeroed state and the element loops. Specialised for
/// exec::host below and for exec::cuda in detail/cuda/adam.cuh.
template <class Exec>
struct adam_impl {
  static_assert(subspace::dependent_false<Exec>,
                "decent::decent_adam / accum_adam: no implementation for this executor (exec::cuda needs a "
                "translation unit compiled by nvcc, which includes decent/detail/cuda/adam.cuh)");
};

template <>
struct adam_impl<subspace::exec::host> {
  using host_space = subspace::host_space;
  template <class T>
  using hview = subspace::view<T, host_space>;

  static void zero(const subspace::exec::host&, hview<float> x) { std::fill(x.data(), x.data() + x.numel(), 0.0f); }

  /// `mixed` may alias `master` (the plain step); `working` may be empty.
  template <class G>
  static void dadam(const subspace::exec::host&, hview<const float> mixed, hview<float> master, hview<const G> grad,
                    hview<float> m, hview<float> v, hview<subspace::bf16> working, const adam_coefficients& c) {
    const std::int64_t n = master.numel();
    for (std::int64_t i = 0; i < n; ++i) {
      const float x = dadam_update(mixed.data()[i], float(grad.data()[i]), m.data()[i], v.data()[i], c);
      master.data()[i] = x;
      if (working.data()) working.data()[i] = subspace::bf16(x);
    }
  }

  template <class G>
  static void accum(const subspace::exec::host&, hview<const float> mixed, hview<float> master, hview<const G> grad,
                    hview<float> M, hview<float> V, hview<float> acc, hview<subspace::bf16> working,
                    const adam_coefficients& c, const accum_coefficients& a) {
    const std::int64_t n = master.numel();
    for (std::int64_t i = 0; i < n; ++i) {
      const float x =
          accum_adam_update(mixed.data()[i], float(grad.data()[i]), M.data()[i], V.data()[i], acc.data()[i], c, a);
      master.data()[i] = x;
      if (working.data()) working.data()[i] = subspace::bf16(x);
    }
  }
};

/// The step's scalars for bias-correction count k (DAdam: the step s; AccumAdam: the window ⌈s/K⌉), computed in
/// double and rounded once to float.
inline adam_coefficients coefficients(float beta1, float beta2, float eps, float weight_decay, weight_decay_rule rule,
                                      const subspace::optim::param_info& info, float lr, std::int64_t k) {
  const double bias1 = 1.0 - std::pow(double(beta1), double(k));
  const double bias2 = 1.0 - std::pow(double(beta2), double(k));
  const bool decays = info.decay && weight_decay != 0.0f;
  return adam_coefficients{
      beta1,
      float(1.0 - double(beta1)),
      beta2,
      float(1.0 - double(beta2)),
      float(double(lr) / bias1),
      float(std::sqrt(bias2)),
      eps,
      decays && rule == weight_decay_rule::l2 ? weight_decay : 0.0f,
      decays && rule == weight_decay_rule::decoupled ? float(1.0 - double(lr) * double(weight_decay)) : 1.0f,
  };
}

/// The hyper-parameter checks both optimizers share; `who` starts the message.
inline void check_hyper(const std::string& who, float beta1, float beta2, float eps, float weight_decay,
                        const subspace::optim::step_context& ctx) {
  subspace::require(0.0f <= beta1 && beta1 < 1.0f && 0.0f <= beta2 && beta2 < 1.0f, [&] {
    return who + "beta1 and beta2 must lie in [0, 1), got " + std::to_string(beta1) + " and " + std::to_string(beta2);
  });
  subspace::require(eps > 0.0f, [&] { return who + "eps must be positive, got " + std::to_string(eps); });
  subspace::require(weight_decay >= 0.0f,
                    [&] { return who + "weight_decay must be >= 0, got " + std::to_string(weight_decay); });
  subspace::require(ctx.step >= 1,
                    [&] { return who + "step_context::step is 1-based, got " + std::to_string(ctx.step); });
}

/// Shapes and layout of the views one step touches: all shaped info.shape and contiguous; `working` may be
/// empty (no working copy).
template <class S, class G>
void check_views(const std::string& who, const subspace::optim::param_info& info, subspace::view<const float, S> mixed,
                 subspace::view<float, S> master, subspace::view<G, S> grad, const subspace::shape& state_shape,
                 subspace::view<subspace::bf16, S> working) {
  using subspace::to_string;
  const auto& want = info.shape;
  subspace::require(master.shape() == want, [&] {
    return who + "master has shape " + to_string(master.shape()) + ", the parameter " + to_string(want);
  });
  subspace::require(mixed.shape() == want, [&] {
    return who + "mixed has shape " + to_string(mixed.shape()) + ", the parameter " + to_string(want);
  });
  subspace::require(grad.shape() == want, [&] {
    return who + "grad has shape " + to_string(grad.shape()) + ", the parameter " + to_string(want);
  });
  subspace::require(state_shape == want, [&] {
    return who + "state has shape " + to_string(state_shape) + ", the parameter " + to_string(want) +
           " (init it with this parameter's info)";
  });
  subspace::require(working.data() == nullptr || working.shape() == want, [&] {
    return who + "working has shape " + to_string(working.shape()) + ", the parameter " + to_string(want);
  });
  subspace::require(master.is_contiguous() && mixed.is_contiguous() && grad.is_contiguous() && working.is_contiguous(),
                    [&] { return who + "master, mixed, grad and working must be contiguous"; });
  // The kernels read element i of mixed just before writing element i of master: the same view, or disjoint ones.
  const auto m = reinterpret_cast<std::uintptr_t>(mixed.data());
  const auto p = reinterpret_cast<std::uintptr_t>(master.data());
  const auto bytes = std::uintptr_t(master.bytes());
  subspace::require(m == p || m + bytes <= p || p + bytes <= m,
                    [&] { return who + "mixed must be master itself or not overlap it"; });
}

}  // namespace detail
}  // namespace decent

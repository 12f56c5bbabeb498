#pragma once
// optim::adamw: Adam with decoupled weight decay, as torch.optim.AdamW.
//
// For step t (ctx.step, 1-based), gradient g (times ctx.grad_scale, the clipping factor), learning rate lr:
//   m  <- beta1 m + (1 - beta1) g
//   v  <- beta2 v + (1 - beta2) g^2
//   p  <- p (1 - lr wd)                                   only when info.decay
//   p  <- p - (lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// and, when a working view is given, working <- bf16(p).
//
// The master weights, m and v are fp32; the gradient is fp32 or bf16. The bias corrections are computed once
// per step in double. The element update (adamw_update below) is one function shared by the host loop and the
// CUDA kernel, written with explicit fused multiply-adds and correctly rounded division and square root, so the
// two executors produce the same bits whatever the compilers' contraction settings.
//
// Executors: exec::host here; exec::cuda (one fused kernel: reads master, grad, m, v; writes master, m, v and
// the working copy in one pass) in detail/cuda/adamw.cuh, included below in nvcc translation units.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../core/config.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/exact.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "concepts.hpp"

namespace subspace::optim {

namespace detail {

/// The scalars of one AdamW step, shared by every element.
struct adamw_coefficients {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float step_size;   // lr / (1 - beta1^t)
  float sqrt_bias2;  // sqrt(1 - beta2^t)
  float eps;
  float decay_factor;  // 1 - lr wd, or 1 without decay
  float grad_scale;    // the clipping factor (step_context::grad_scale)
};

/// One element of an AdamW step: updates p, m and v in place and returns the new p.
SUBSPACE_HD inline float adamw_update(float& p, float grad, float& m, float& v, const adamw_coefficients& c) {
  const float g = grad * c.grad_scale;  // for an fp32 gradient, the bits scale() would write into it
  m = exact::fma(c.beta1, m, c.one_minus_beta1 * g);
  v = exact::fma(c.beta2, v, c.one_minus_beta2 * (g * g));
  const float denom = exact::div(exact::sqrt(v), c.sqrt_bias2) + c.eps;
  p = exact::fma(-c.step_size, exact::div(m, denom), p * c.decay_factor);
  return p;
}

/// The executor-specific part of adamw: allocation of zeroed state and the element loop. Specialised for
/// exec::host below and for exec::cuda in detail/cuda/adamw.cuh.
template <class Exec>
struct adamw_impl {
  static_assert(dependent_false<Exec>,
                "optim::adamw: no implementation for this executor (exec::cuda needs a translation unit compiled "
                "by nvcc, which includes optim/detail/cuda/adamw.cuh)");
};

template <>
struct adamw_impl<exec::host> {
  static void zero(const exec::host&, view<float, host_space> x) { std::fill(x.data(), x.data() + x.numel(), 0.0f); }

  template <class G>
  static void step(const exec::host&, view<float, host_space> master, view<const G, host_space> grad,
                   view<float, host_space> m, view<float, host_space> v, view<bf16, host_space> working,
                   const adamw_coefficients& c) {
    float* p = master.data();
    const G* g = grad.data();
    float* mm = m.data();
    float* vv = v.data();
    bf16* w = working.data();  // null: no working copy
    const std::int64_t n = master.numel();
    for (std::int64_t i = 0; i < n; ++i) {
      const float updated = adamw_update(p[i], float(g[i]), mm[i], vv[i], c);
      if (w) w[i] = bf16(updated);
    }
  }
};

}  // namespace detail

struct adamw {
  /// Clipping is folded into the update (optim::applies_grad_scale).
  static constexpr bool applies_grad_scale = true;

  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;  // applied only to parameters with info.decay

  /// The first and second moments, fp32, shaped like the parameter, in the executor's memory space.
  template <class Space>
  struct state {
    tensor<float, Space> m, v;

    /// The tensors a checkpoint holds (Hugging Face / PyTorch names).
    template <class F>
    void for_each_tensor(F&& f) {
      f("exp_avg", m.v());
      f("exp_avg_sq", v.v());
    }
  };

  /// Zeroed moments for a parameter of info.shape, ordered on ex.
  template <class Exec>
  state<space_of_t<Exec>> init(const Exec& ex, const param_info& info) const {
    using space = space_of_t<Exec>;
    state<space> st{tensor<float, space>(info.shape), tensor<float, space>(info.shape)};
    detail::adamw_impl<Exec>::zero(ex, st.m.v());
    detail::adamw_impl<Exec>::zero(ex, st.v.v());
    return st;
  }

  /// One AdamW step of `master` (and of state) from `grad` (fp32 or bf16). When `working` is given (non-null
  /// data) it receives bf16(updated master) from the same pass. All views contiguous and shaped info.shape.
  template <class Exec, class GradIn, class S>
    requires(std::is_same_v<std::remove_const_t<GradIn>, float> || std::is_same_v<std::remove_const_t<GradIn>, bf16>)
  void step(const Exec& ex, view<float, S> master, view<GradIn, S> grad, state<S>& st, const param_info& info,
            const step_context& ctx, view<bf16, S> working = {}) const {
    static_assert(std::is_same_v<S, space_of_t<Exec>>,
                  "optim::adamw::step: the views must live in the executor's memory space");
    check(master, grad, st, info, ctx, working);
    detail::adamw_impl<Exec>::step(ex, master, view<const std::remove_const_t<GradIn>, S>(grad), st.m.v(), st.v.v(),
                                   working, coefficients(info, ctx));
  }

  /// Bytes of m and v.
  template <class Space>
  std::size_t state_bytes(const state<Space>& st) const {
    return st.m.bytes() + st.v.bytes();
  }
  /// The bytes init(ex, info) would allocate, without allocating: for memory plans of whole models.
  std::size_t state_bytes_for(const param_info& info) const {
    return std::size_t(2 * info.shape.numel()) * sizeof(float);
  }

  /// The step's scalars, computed in double and rounded once to float.
  detail::adamw_coefficients coefficients(const param_info& info, const step_context& ctx) const {
    const double t = double(ctx.step);
    const double bias1 = 1.0 - std::pow(double(beta1), t);
    const double bias2 = 1.0 - std::pow(double(beta2), t);
    return detail::adamw_coefficients{
        beta1,
        float(1.0 - double(beta1)),
        beta2,
        float(1.0 - double(beta2)),
        float(double(ctx.lr) / bias1),
        float(std::sqrt(bias2)),
        eps,
        info.decay ? float(1.0 - double(ctx.lr) * double(weight_decay)) : 1.0f,
        ctx.grad_scale,
    };
  }

 private:
  template <class GradIn, class S>
  void check(view<float, S> master, view<GradIn, S> grad, const state<S>& st, const param_info& info,
             const step_context& ctx, view<bf16, S> working) const {
    const auto who = [&] { return "optim::adamw::step(" + info.name + "): "; };
    require(0.0f <= beta1 && beta1 < 1.0f && 0.0f <= beta2 && beta2 < 1.0f,
            [&] { return who() + "beta1 and beta2 must lie in [0, 1)"; });
    require(eps > 0.0f, [&] { return who() + "eps must be positive"; });
    require(ctx.step >= 1, [&] { return who() + "step_context::step is 1-based, got " + std::to_string(ctx.step); });
    require(std::isfinite(ctx.grad_scale) && ctx.grad_scale > 0.0f, [&] {
      return who() + "step_context::grad_scale must be a positive number, got " + std::to_string(ctx.grad_scale);
    });
    require(master.shape() == info.shape, [&] {
      return who() + "master has shape " + to_string(master.shape()) + ", the parameter " + to_string(info.shape);
    });
    require(grad.shape() == info.shape, [&] {
      return who() + "grad has shape " + to_string(grad.shape()) + ", the parameter " + to_string(info.shape);
    });
    require(st.m.shape() == info.shape && st.v.shape() == info.shape, [&] {
      return who() + "state has shape " + to_string(st.m.shape()) + ", the parameter " + to_string(info.shape) +
             " (init it with this parameter's info)";
    });
    require(working.data() == nullptr || working.shape() == info.shape, [&] {
      return who() + "working has shape " + to_string(working.shape()) + ", the parameter " + to_string(info.shape);
    });
    require(master.is_contiguous() && grad.is_contiguous() && working.is_contiguous(),
            [&] { return who() + "master, grad and working must be contiguous"; });
  }
};

static_assert(Optimizer<adamw>);

}  // namespace subspace::optim

#if defined(__CUDACC__)
#include "detail/cuda/adamw.cuh"
#endif

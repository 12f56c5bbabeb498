#pragma once
// decent::accum_adam and decent::accum_adamw: AccumAdam / AccumAdamW as the authors' code implements them
// (Decent-DP, Wang et al., ICLR 2025; guide: docs/decent.md). The parameters move and are gossiped every step;
// only the persistent moments see a K-times larger batch, through the mean gradient of a window of K steps. This
// is not gradient accumulation: each step is applied.
//
// With K = accum_iter, s = ctx.step (1-based), k = ⌈s/K⌉ the window count, lr = ctx.lr, x̃ the mixed point
// (master, or `mixed` in step_from_mixed), and persistent M, V and the accumulator Acc zero-initialised:
//
//   accum_adam  (L2):          g ← g + wd·x̃                 only when info.decay
//   accum_adamw (decoupled):   x̃ ← x̃·(1 − lr·wd)           only when info.decay
//   Acc ← Acc + g/K
//   m = β1·M + (1 − β1)·g                                     look-ahead moments with the current g
//   v = β2·V + (1 − β2)·g⊙g
//   x ← x̃ − lr/(1 − β1^k) · m / (√v/√(1 − β2^k) + ε)        bias correction counts windows
//   if s mod K == 0:  M ← β1·M + (1 − β1)·Acc,  V ← β2·V + (1 − β2)·Acc⊙Acc,  Acc ← 0
//
// β2 (not β1) in V's update and ε outside the square root follow the authors' code, not the paper's Appendix C
// listing. With K = 1 the update is decent_adam's (decent_adamw's) bit for bit.
//
// No hook beyond subspace::Optimizer is needed: the window position is a function of ctx.step, so the trainer
// calls step once per local step with the 1-based count of local steps (not per gradient-accumulation
// micro-step). Like decent_adam it also has step_from_mixed(ex, mixed, master, grad, state, info, ctx,
// working = {}), which reads x̃ from `mixed` and writes the result to `master` (the fused mix-and-step).
//
// State: M, V and Acc in fp32 (one parameter-sized buffer more than Adam). Weight decay on info.decay
// parameters only. Executors: exec::host here; exec::cuda (one fused kernel) in detail/cuda/adam.cuh.

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include <subspace/core/dtype.hpp>
#include <subspace/core/executor.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/optim/concepts.hpp>

#include "detail/adam_update.hpp"

namespace decent {

template <weight_decay_rule Rule>
struct basic_accum_adam {
  static constexpr weight_decay_rule rule = Rule;
  static constexpr const char* name = Rule == weight_decay_rule::l2 ? "decent::accum_adam" : "decent::accum_adamw";

  int accum_iter = 8;  // K; the library's defaults: K = 8, β = (0.9, 0.98), ε = 1e-8, AdamW decay 0.1
  float beta1 = 0.9f;
  float beta2 = 0.98f;
  float eps = 1e-8f;
  float weight_decay = Rule == weight_decay_rule::decoupled ? 0.1f : 0.0f;  // on info.decay parameters only

  /// The persistent moments M and V and the window's accumulator Acc, fp32, shaped like the parameter.
  template <class Space>
  struct state {
    subspace::tensor<float, Space> m, v, acc;

    /// The tensors a per-rank checkpoint holds (io/checkpoint.hpp): M and V under PyTorch's Adam names, and the
    /// open window's accumulator, which differs between ranks like the moments do.
    template <class F>
    void for_each_tensor(F&& f) {
      f("exp_avg", m.v());
      f("exp_avg_sq", v.v());
      f("accum_grad", acc.v());
    }
  };

  /// k = ⌈s/K⌉: the window step s (1-based) falls in, the count the bias correction uses.
  std::int64_t window(std::int64_t s) const { return (s + accum_iter - 1) / accum_iter; }
  /// Whether step s ends its window (s mod K == 0), when M and V take Acc.
  bool closes_window(std::int64_t s) const { return s % accum_iter == 0; }

  /// Zeroed M, V and Acc for a parameter of info.shape, in the executor's memory space.
  template <class Exec>
  state<subspace::space_of_t<Exec>> init(const Exec& ex, const subspace::optim::param_info& info) const {
    using space = subspace::space_of_t<Exec>;
    state<space> st{subspace::tensor<float, space>(info.shape), subspace::tensor<float, space>(info.shape),
                    subspace::tensor<float, space>(info.shape)};
    detail::adam_impl<Exec>::zero(ex, st.m.v());
    detail::adam_impl<Exec>::zero(ex, st.v.v());
    detail::adam_impl<Exec>::zero(ex, st.acc.v());
    return st;
  }

  /// One step from the mixed point held in `master` (fp32, updated in place), with grad fp32 or bf16.
  template <class Exec, class GradIn, class S>
    requires(std::is_same_v<std::remove_const_t<GradIn>, float> ||
             std::is_same_v<std::remove_const_t<GradIn>, subspace::bf16>)
  void step(const Exec& ex, subspace::view<float, S> master, subspace::view<GradIn, S> grad, state<S>& st,
            const subspace::optim::param_info& info, const subspace::optim::step_context& ctx,
            subspace::view<subspace::bf16, S> working = {}) const {
    step_from_mixed(ex, master, master, grad, st, info, ctx, working);
  }

  /// One step from the mixed point read from `mixed`, written to `master` (see the top of this file).
  template <class Exec, class GradIn, class S>
    requires(std::is_same_v<std::remove_const_t<GradIn>, float> ||
             std::is_same_v<std::remove_const_t<GradIn>, subspace::bf16>)
  void step_from_mixed(const Exec& ex, std::type_identity_t<subspace::view<const float, S>> mixed,
                       subspace::view<float, S> master, subspace::view<GradIn, S> grad, state<S>& st,
                       const subspace::optim::param_info& info, const subspace::optim::step_context& ctx,
                       subspace::view<subspace::bf16, S> working = {}) const {
    static_assert(std::is_same_v<S, subspace::space_of_t<Exec>>,
                  "decent::accum_adam::step: the views must live in the executor's memory space");
    const std::string who = std::string(name) + "::step(" + info.name + "): ";
    subspace::require(accum_iter >= 1,
                      [&] { return who + "accum_iter (K) must be >= 1, got " + std::to_string(accum_iter); });
    detail::check_hyper(who, beta1, beta2, eps, weight_decay, ctx);
    detail::check_views(who, info, mixed, master, grad, st.m.shape(), working);
    subspace::require(st.v.shape() == st.m.shape() && st.acc.shape() == st.m.shape(),
                      [&] { return who + "state buffers differ in shape"; });
    using G = std::remove_const_t<GradIn>;
    detail::adam_impl<Exec>::template accum<G>(ex, mixed, master, subspace::view<const G, S>(grad), st.m.v(), st.v.v(),
                                               st.acc.v(), working, coefficients(info, ctx), window_coefficients(ctx));
  }

  /// Bytes of M, V and Acc.
  template <class Space>
  std::size_t state_bytes(const state<Space>& st) const {
    return st.m.bytes() + st.v.bytes() + st.acc.bytes();
  }

  /// The step's scalars: bias correction by the window count k = ⌈s/K⌉.
  detail::adam_coefficients coefficients(const subspace::optim::param_info& info,
                                         const subspace::optim::step_context& ctx) const {
    return detail::coefficients(beta1, beta2, eps, weight_decay, Rule, info, ctx.lr, window(ctx.step));
  }
  detail::accum_coefficients window_coefficients(const subspace::optim::step_context& ctx) const {
    return {float(accum_iter), closes_window(ctx.step)};
  }
};

/// AccumAdam: L2 weight decay (g += wd·x̃).
using accum_adam = basic_accum_adam<weight_decay_rule::l2>;
/// AccumAdamW: decoupled weight decay (x̃ *= 1 − lr·wd); the library's default gossip optimizer.
using accum_adamw = basic_accum_adam<weight_decay_rule::decoupled>;

static_assert(subspace::check_optimizer<accum_adam>());
static_assert(subspace::check_optimizer<accum_adamw>());

}  // namespace decent

#if defined(__CUDACC__)
#include "detail/cuda/adam.cuh"
#endif

#pragma once
// decent::decent_adam (DAdam) and decent::decent_adamw: each worker's Adam in adapt-while-combine form
// (Decent-DP, Wang et al., ICLR 2025; guide: docs/decent.md, "Optimizers").
//
// The gossip trainer computes g at the un-mixed x^t while the mixing of x^t runs, then steps from the mixed
// point x̃ = Σ_j W_ij x_j^t. Per worker, with s = ctx.step (1-based) and lr = ctx.lr:
//
//   decent_adam  (L2):          g ← g + wd·x̃                 only when info.decay
//   decent_adamw (decoupled):   x̃ ← x̃·(1 − lr·wd)           only when info.decay
//   m ← β1·m + (1 − β1)·g
//   v ← β2·v + (1 − β2)·g²
//   x ← x̃ − lr/(1 − β1^s) · m / (√v/√(1 − β2^s) + ε)
//
// Moments are local and never communicated. Weight decay applies to info.decay parameters only: the library's
// rule is matrices and embeddings (optim::param_info_for), never norm gains or biases (the Decent-DP package
// inverts this; a regression test keeps the library's rule).
//
// It satisfies subspace::Optimizer: step(ex, master, grad, state, info, ctx, working) takes master as x̃ (the
// trainer has mixed it already). One extra member fuses the mixing copy into the update:
//
//   step_from_mixed(ex, mixed, master, grad, state, info, ctx, working = {})
//       reads x̃ from `mixed` (e.g. a bucket's communication block holding the group average after its
//       all-reduce) and writes the updated parameters to `master`: the gossip loop's "x_b ← comm_b, then step" in
//       one pass over memory. `mixed` is master itself or a view that does not overlap it.
//
// Master weights and moments are fp32; gradients fp32 or bf16; `working`, when given, receives bf16(x).
// Executors: exec::host here; exec::cuda (one fused kernel) in detail/cuda/adam.cuh under nvcc.

#include <cstddef>
#include <string>
#include <type_traits>

#include <subspace/core/dtype.hpp>
#include <subspace/core/executor.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/optim/concepts.hpp>

#include "detail/adam_update.hpp"

namespace decent {

template <weight_decay_rule Rule>
struct basic_decent_adam {
  static constexpr weight_decay_rule rule = Rule;
  static constexpr const char* name = Rule == weight_decay_rule::l2 ? "decent::decent_adam" : "decent::decent_adamw";

  float beta1 = 0.9f;  // the library's DAdam defaults: β = (0.9, 0.999)
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = Rule == weight_decay_rule::decoupled ? 0.1f : 0.0f;  // on info.decay parameters only

  /// The local first and second moments, fp32, shaped like the parameter.
  template <class Space>
  struct state {
    subspace::tensor<float, Space> m, v;

    /// The tensors a per-rank checkpoint holds (io/checkpoint.hpp), with PyTorch's Adam names.
    template <class F>
    void for_each_tensor(F&& f) {
      f("exp_avg", m.v());
      f("exp_avg_sq", v.v());
    }
  };

  /// Zeroed moments for a parameter of info.shape, in the executor's memory space.
  template <class Exec>
  state<subspace::space_of_t<Exec>> init(const Exec& ex, const subspace::optim::param_info& info) const {
    using space = subspace::space_of_t<Exec>;
    state<space> st{subspace::tensor<float, space>(info.shape), subspace::tensor<float, space>(info.shape)};
    detail::adam_impl<Exec>::zero(ex, st.m.v());
    detail::adam_impl<Exec>::zero(ex, st.v.v());
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
                  "decent::decent_adam::step: the views must live in the executor's memory space");
    const std::string who = std::string(name) + "::step(" + info.name + "): ";
    detail::check_hyper(who, beta1, beta2, eps, weight_decay, ctx);
    detail::check_views(who, info, mixed, master, grad, st.m.shape(), working);
    subspace::require(st.v.shape() == st.m.shape(), [&] { return who + "state moments differ in shape"; });
    using G = std::remove_const_t<GradIn>;
    detail::adam_impl<Exec>::template dadam<G>(ex, mixed, master, subspace::view<const G, S>(grad), st.m.v(), st.v.v(),
                                               working, coefficients(info, ctx));
  }

  /// Bytes of m and v.
  template <class Space>
  std::size_t state_bytes(const state<Space>& st) const {
    return st.m.bytes() + st.v.bytes();
  }

  /// The step's scalars: bias correction by the step count s = ctx.step.
  detail::adam_coefficients coefficients(const subspace::optim::param_info& info,
                                         const subspace::optim::step_context& ctx) const {
    return detail::coefficients(beta1, beta2, eps, weight_decay, Rule, info, ctx.lr, ctx.step);
  }
};

/// DAdam: Adam with L2 weight decay (g += wd·x̃), at the mixed point.
using decent_adam = basic_decent_adam<weight_decay_rule::l2>;
/// DAdamW: Adam with decoupled weight decay (x̃ *= 1 − lr·wd), at the mixed point.
using decent_adamw = basic_decent_adam<weight_decay_rule::decoupled>;

static_assert(subspace::check_optimizer<decent_adam>());
static_assert(subspace::check_optimizer<decent_adamw>());

}  // namespace decent

#if defined(__CUDACC__)
#include "detail/cuda/adam.cuh"
#endif

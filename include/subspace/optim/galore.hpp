#pragma once
// optim::galore<Inner>: Adam in a low-rank gradient subspace whose projector comes from the SVD of the current
// gradient (Zhao et al., GaLore, ICML 2024; guide: docs/galore.md).
//
//   optim::galore<> opt{.rank = 128, .refresh_period = 200, .scale = 0.25f};
//   auto st = opt.init(ex, info);                       // per parameter
//   opt.step(ex, master, grad, st, info, ctx, working); // per step
//
// Per parameter:
//   * projected when opt.target(info) (default: a matrix whose name contains "attn" or "mlp") and
//     r < min(m, n), r = `rank` or by default (auto_rank) a quarter of min(m, n); otherwise Inner runs unchanged
//     (embeddings, norms, lm_head, small matrices). With require_projection set, a target with min(m, n) <= r is an
//     error instead; a model where nothing is projected is an error at the trainer (check_parameters) unless
//     allow_no_projection is set. summary(store) says what is projected.
//   * Inner is wrapped (optim/subspace_rule.hpp): it steps the parameters that are not projected; a projected
//     matrix is always stepped by Adam in the subspace, with Inner's hyper-parameters.
//   * the side by shape: m >= n projects on the right (P r x n, moments m x r), m < n on the left (P m x r,
//     moments r x n); see optim/projector.hpp.
//   * every refresh_period (tau) steps of the matrix, starting at its first, P is recomputed from the SVD of that
//     step's gradient (host: Jacobi in double; CUDA: cuSOLVER gesvdj in fp64). The moments are kept as they are
//     (galore_torch), or with reproject_moments the first moment is mapped into the new basis (M <- M P_old
//     P_new^T on the right, (P_new^T P_old) M on the left); V is never transformed.
//   * then Adam in the projected space with GaLore's eps placement and the matrix's own bias-correction counter
//     s (see optim/detail/low_rank.hpp), the update scaled by `scale` (alpha); decoupled decay lr wd
//     (Inner's weight_decay, info.decay only) is not scaled by alpha.
//
// The matrix's step count s lives in the state, so ctx.step matters only to parameters that use Inner. State
// bytes: 4 (2 max(m, n) r + r min(m, n)) per projected matrix (M, V and P in fp32), Inner's own elsewhere;
// state_bytes_for(info) gives the same figure without allocating. Host and CUDA (under nvcc).

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "adamw.hpp"
#include "concepts.hpp"
#include "detail/low_rank.hpp"
#include "projector.hpp"

namespace subspace::optim {

template <class Inner = adamw>
struct galore {
  static_assert(check_subspace_inner<Inner>());

  Inner inner = subspace_rule<Inner>::reference();  // runs the parameters that are not projected
  std::int64_t rank = auto_rank;                    // r for every matrix; auto_rank: max(1, min(m, n) / 4) for each
  std::int64_t refresh_period = 200;                // tau, in steps of each matrix
  float scale = 1.0f;                               // alpha (GaLore's 60M recipe: 0.25)
  bool reproject_moments = false;                   // map M into each new basis (galore_torch: off)
  bool (*target)(const param_info&) = &attention_or_mlp_matrix;  // which parameters to project
  bool require_projection = false;   // a target with min(m, n) <= rank: error instead of falling back to Inner
  bool allow_no_projection = false;  // a model where nothing is projected trains with Inner alone (else an error)

  template <class Exec>
  using state_type = detail::low_rank_state_for<Inner, Exec>;

  /// Zeroed moments and projector (projected parameters) or Inner's state, in the executor's memory space.
  template <class Exec>
  state_type<Exec> init(const Exec& ex, const param_info& info) const {
    return detail::init(inner, settings(), ex, info);
  }

  /// One step of `master` from `grad` (fp32 or bf16), refreshing the projector when the matrix's step count is a
  /// multiple of refresh_period; writes bf16(master) into `working` when given. Views contiguous, shaped
  /// info.shape.
  template <class Exec, class GradIn, class S, class IS>
    requires(std::is_same_v<std::remove_const_t<GradIn>, float> || std::is_same_v<std::remove_const_t<GradIn>, bf16>)
  void step(const Exec& ex, view<float, S> master, view<GradIn, S> grad, low_rank_state<IS, S>& st,
            const param_info& info, const step_context& ctx, view<bf16, S> working = {}) const {
    detail::step(inner, settings(), ex, master, grad, st, info, ctx, working,
                 [&](std::int64_t) { return detail::refresh_decision{false, reproject_moments, 0}; });
  }

  /// Bytes of the state: M, V and P of a projected matrix, Inner's state otherwise.
  template <class IS, class Space>
  std::size_t state_bytes(const low_rank_state<IS, Space>& st) const {
    return detail::state_bytes(inner, st);
  }

  /// The bytes init(ex, info) would allocate, without allocating: for memory plans of whole models.
  std::size_t state_bytes_for(const param_info& info) const { return detail::state_bytes_for(inner, settings(), info); }

  /// Whether a parameter is projected (a target with rank_for(info) < min(m, n)).
  bool projects(const param_info& info) const { return detail::is_projected(settings(), info); }
  /// The rank r of a projected parameter: `rank`, or with auto_rank max(1, min(m, n) / 4).
  std::int64_t rank_for(const param_info& info) const { return detail::rank_for(settings(), info); }
  /// What is projected of a whole model's parameters (anything with size() and info(i), e.g. model.parameters()).
  template <class Store>
  projection_summary summary(const Store& store) const {
    return detail::summarize(settings(), store);
  }
  /// Called by the trainers with every parameter a replica holds: raises invalid_argument when none is projected
  /// (the run would be Inner's under this policy's name), unless allow_no_projection.
  template <class Store>
  void check_parameters(const Store& store) const {
    detail::check_parameters(settings(), store);
  }

  detail::low_rank_settings settings() const {
    return {"optim::galore", rank, refresh_period, scale, target, require_projection, allow_no_projection};
  }
};

static_assert(Optimizer<galore<adamw>>);

}  // namespace subspace::optim

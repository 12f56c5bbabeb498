#pragma once
// optim::golore<Inner>: Adam in a low-rank subspace drawn uniformly at random, with GaLore for the first part of
// training (He et al., Subspace Optimization for Large Language Models with Convergence Guarantees, ICML 2025;
// guide: docs/galore.md).
//
//   optim::golore<> opt{.rank = 128, .refresh_period = 200, .random_percent = 20, .total_steps = 10000, .seed = 7};
//
// GoLore@x% (x = random_percent): at a refresh at step s of a matrix (0-based, s a multiple of refresh_period),
// the projector is
//   * Haar-random (GoLore) when x > 0 and s >= (1 - x/100) total_steps: the Q of a thin QR of a Gaussian drawn
//     from the portable Philox normal with counter (idx/4, param_id_of(info.name), s / refresh_period,
//     golore_stream) and `seed` (optim/projector.hpp), so every rank and both executors draw the same projector
//     with no communication;
//   * else GaLore's, from the SVD of the step's gradient.
// x = 100 is pure GoLore (total_steps not needed), x = 0 is GaLore with reprojected moments. The first moment is
// mapped into the new basis at every refresh after the first, whatever the source (M <- M P_old P_new^T on the
// right, (P_new^T P_old) M on the left); V is never transformed.
//
// Everything else — targets and fallback to Inner, side by shape, the projected Adam step, state and its bytes —
// is galore's (optim/galore.hpp, optim/detail/low_rank.hpp).

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "adamw.hpp"
#include "concepts.hpp"
#include "detail/low_rank.hpp"
#include "projector.hpp"

namespace subspace::optim {

template <class Inner = adamw>
struct golore {
  static_assert(check_subspace_inner<Inner>());

  Inner inner = subspace_rule<Inner>::reference();  // runs the parameters that are not projected
  std::int64_t rank = auto_rank;                    // r for every matrix; auto_rank: max(1, min(m, n) / 4) for each
  std::int64_t refresh_period = 200;                // tau, in steps of each matrix
  float scale = 1.0f;                               // alpha
  double random_percent = 20.0;                     // x of GoLore@x%: the last x% of training use random projectors
  std::int64_t total_steps = 0;                     // S_total, the planned optimizer steps (needed when 0 < x < 100)
  std::uint64_t seed = 0;                           // Philox key of the random projectors (same on every rank)
  bool (*target)(const param_info&) = &attention_or_mlp_matrix;  // which parameters to project
  bool require_projection = false;   // a target with min(m, n) <= rank: error instead of falling back to Inner
  bool allow_no_projection = false;  // a model where nothing is projected trains with Inner alone (else an error)

  template <class Exec>
  using state_type = detail::low_rank_state_for<Inner, Exec>;

  template <class Exec>
  state_type<Exec> init(const Exec& ex, const param_info& info) const {
    check_schedule();
    return detail::init(inner, settings(), ex, info);
  }

  /// One step of `master` from `grad` (fp32 or bf16); see galore::step. The refresh takes its projector from
  /// uses_random_projector(s) and always reprojects the first moment.
  template <class Exec, class GradIn, class S, class IS>
    requires(std::is_same_v<std::remove_const_t<GradIn>, float> || std::is_same_v<std::remove_const_t<GradIn>, bf16>)
  void step(const Exec& ex, view<float, S> master, view<GradIn, S> grad, low_rank_state<IS, S>& st,
            const param_info& info, const step_context& ctx, view<bf16, S> working = {}) const {
    if (!st.inner) check_schedule();
    detail::step(inner, settings(), ex, master, grad, st, info, ctx, working,
                 [&](std::int64_t s) { return detail::refresh_decision{uses_random_projector(s), true, seed}; });
  }

  /// Whether a refresh at step s (0-based) draws a random projector: x > 0 and s >= (1 - x/100) total_steps,
  /// compared exactly as 100 s >= (100 - x) total_steps.
  bool uses_random_projector(std::int64_t s) const {
    if (random_percent <= 0.0) return false;
    if (random_percent >= 100.0) return true;
    return 100.0 * double(s) >= (100.0 - random_percent) * double(total_steps);
  }

  /// The first refresh step (a multiple of refresh_period) that draws a random projector, or -1 when none does
  /// within total_steps.
  std::int64_t first_random_refresh() const {
    check_schedule();
    if (random_percent >= 100.0) return 0;
    for (std::int64_t s = 0; s < total_steps; s += refresh_period)
      if (uses_random_projector(s)) return s;
    return -1;
  }

  template <class IS, class Space>
  std::size_t state_bytes(const low_rank_state<IS, Space>& st) const {
    return detail::state_bytes(inner, st);
  }

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
    return {"optim::golore", rank, refresh_period, scale, target, require_projection, allow_no_projection};
  }

 private:
  void check_schedule() const {
    detail::check_settings(settings());
    require(0.0 <= random_percent && random_percent <= 100.0, [&] {
      return "optim::golore: random_percent (x of GoLore@x%) must lie in [0, 100], got " +
             std::to_string(random_percent);
    });
    require(total_steps >= 0, "optim::golore: total_steps must not be negative");
    require(random_percent <= 0.0 || random_percent >= 100.0 || total_steps > 0, [&] {
      return "optim::golore: GoLore@" + std::to_string(random_percent) +
             "% switches to random projectors at (1 - x/100) * total_steps: set total_steps to the planned number "
             "of optimizer steps (or random_percent = 100 for pure GoLore)";
    });
  }
};

static_assert(Optimizer<golore<adamw>>);

}  // namespace subspace::optim

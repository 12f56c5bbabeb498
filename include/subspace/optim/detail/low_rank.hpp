#pragma once
// The machinery shared by optim::galore and optim::golore (guide: docs/galore.md): which parameters
// are projected, the per-parameter state, the Adam step in the projected space, and the refresh logic. The two
// policies differ only in where a refreshed projector comes from and whether the first moment is reprojected;
// they pass that decision in as a function of the step count.
//
// The Adam step in the projected space (GaLore's; s is the matrix's own step count, 1-based after the increment):
//
//   R = project(G)                                     one GEMM
//   M = beta1 M + (1 - beta1) R
//   V = beta2 V + (1 - beta2) R (.) R
//   N = -(lr alpha sqrt(1 - beta2^s) / (1 - beta1^s)) M / (sqrt(V) + eps)      eps on the uncorrected sqrt(V)
//   W = W + back_project(N)                           one GEMM (beta = 1)
//   W = W - lr wd W                                    decoupled decay, not scaled by alpha (info.decay only)
//   working = bf16(W)                                  when a working view is given
//
// The element updates (subspace_adam_update, the decay) are SUBSPACE_HD functions with explicit fused
// multiply-adds, shared by the host loops here and the CUDA kernels in detail/cuda/low_rank.cuh.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "../../core/config.hpp"
#include "../../core/dtype.hpp"
#include "../../core/error.hpp"
#include "../../core/exact.hpp"
#include "../../core/executor.hpp"
#include "../../core/tensor.hpp"
#include "../../kernels/elementwise.hpp"
#include "../../kernels/linalg.hpp"
#include "../adamw.hpp"
#include "../concepts.hpp"
#include "../projector.hpp"
#include "../subspace_rule.hpp"

namespace subspace::optim {

// --- targets ----------------------------------------------------------------------------------------------------

/// The default target rule (galore_torch's; see docs/galore.md): a parameter is projected when it is a matrix
/// (rank 2) and its name contains "attn" or "mlp". With the Hugging Face Llama names of nn/llama.hpp this selects
/// self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj, and never the embedding, the norms or lm_head.
inline bool attention_or_mlp_matrix(const param_info& info) {
  const std::string_view name = info.name;
  return info.shape.rank == 2 &&
         (name.find("attn") != std::string_view::npos || name.find("mlp") != std::string_view::npos);
}

/// Every matrix (rank 2), whatever its name: for models without the naming convention, and for toy problems.
inline bool any_matrix(const param_info& info) { return info.shape.rank == 2; }

/// The default `rank` of galore and golore: each matrix gets a quarter of its short side, r = max(1, min(m, n) / 4)
/// (GaLore's recipes: 128 on the 512-wide 60M model), so every target of at least 2 x 2 is projected whatever the
/// model's width. A fixed rank above a target's short side leaves that target to Inner.
inline constexpr std::int64_t auto_rank = 0;

// --- what a model has projected -----------------------------------------------------------------------------------

/// Which parameters of a model galore/golore project, from opt.summary(store): for the line a program prints at
/// start ("projected 28 of 30 matrices at rank 16-32") and for the check that something is.
struct projection_summary {
  std::int64_t matrices = 0;                // parameters of rank 2
  std::int64_t targets = 0;                 // matrices the target rule selects
  std::int64_t projected = 0;               // targets whose rank is below their short side: Adam in the subspace
  std::int64_t min_rank = 0, max_rank = 0;  // over the projected matrices (0 when none)
  std::int64_t min_short_side = 0, max_short_side = 0;  // min(m, n) over the targets (0 when none)

  /// "projected 28 of 30 matrices at rank 16-32" (one rank: "at rank 32").
  std::string text() const {
    std::string t = "projected " + std::to_string(projected) + " of " + std::to_string(matrices) + " matrices";
    if (projected > 0)
      t += " at rank " + std::to_string(min_rank) + (max_rank > min_rank ? "-" + std::to_string(max_rank) : "");
    return t;
  }
};

// --- state ----------------------------------------------------------------------------------------------------------

/// Where the current projector came from.
enum class projector_source { none, svd, random };

inline const char* to_string(projector_source s) {
  switch (s) {
    case projector_source::none: return "none";
    case projector_source::svd: return "svd";
    case projector_source::random: return "random";
  }
  return "?";
}

/// The state of one parameter under galore/golore: Inner's state for parameters that are not projected, else the
/// projected moments, the projector and the matrix's own step counter.
template <class InnerState, class Space>
struct low_rank_state {
  std::optional<InnerState> inner;  // engaged: the parameter uses Inner
  projection geometry{};            // projected parameters: side, m, n, r
  tensor<float, Space> m, v;        // first and second moments, geometry.moment_shape(), fp32
  tensor<float, Space> p;           // the projector, geometry.projector_shape(), fp32
  std::int64_t steps = 0;           // s: optimizer steps taken on this matrix (refresh when s % period == 0)
  std::uint32_t param_id = 0;       // GoLore's Philox counter word (param_id_of(info.name))
  std::int64_t source_code = 0;     // projector_source of the current projector (an integer: checkpoints hold it)
  std::int64_t refreshes = 0;       // projectors computed so far

  bool projected() const { return !inner.has_value(); }
  projector_source source() const { return projector_source(source_code); }

  /// Calls f(name, view) for every tensor a checkpoint must hold to continue exactly: Inner's tensors for a
  /// parameter that is not projected, else the moments, the projector and the counters (host int64 [1] views;
  /// param_id and the geometry follow from the parameter's name and shape).
  template <class F>
  void for_each_tensor(F&& f) {
    if (inner) {
      for_each_state_tensor(*inner, f);
      return;
    }
    f("exp_avg", m.v());
    f("exp_avg_sq", v.v());
    f("projector", p.v());
    f("steps", view<std::int64_t, host_space>(&steps, shape{1}));
    f("refreshes", view<std::int64_t, host_space>(&refreshes, shape{1}));
    f("projector_source", view<std::int64_t, host_space>(&source_code, shape{1}));
  }
};

// --- the element updates -----------------------------------------------------------------------------------------

namespace detail {

/// a / b correctly rounded on host and device (float: exact::div; double division is IEEE on both).
SUBSPACE_HD inline float quotient(float a, float b) { return exact::div(a, b); }
SUBSPACE_HD inline double quotient(double a, double b) { return a / b; }

/// The scalars of one projected Adam step; neg_step = -lr alpha sqrt(1 - beta2^s) / (1 - beta1^s).
template <class T>
struct subspace_adam_coefficients {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, neg_step;
};

/// One element: updates m and v from the projected gradient r and returns the scaled update direction
/// neg_step * m / (sqrt(v) + eps).
template <class T>
SUBSPACE_HD inline T subspace_adam_update(T r, T& m, T& v, const subspace_adam_coefficients<T>& c) {
  m = exact::fma(c.beta1, m, c.one_minus_beta1 * r);
  v = exact::fma(c.beta2, v, c.one_minus_beta2 * (r * r));
  return c.neg_step * quotient(m, exact::sqrt(v) + c.eps);
}

/// Decoupled weight decay of one element: w - lr wd w with one rounding.
template <class T>
SUBSPACE_HD inline T decayed(T w, T neg_lr_wd) {
  return exact::fma(neg_lr_wd, w, w);
}

template <class T>
subspace_adam_coefficients<T> coefficients(const subspace_adam& h, double scale, std::int64_t s, double lr) {
  const double t = double(s);
  const double bias1 = 1.0 - std::pow(double(h.beta1), t), bias2 = 1.0 - std::pow(double(h.beta2), t);
  return subspace_adam_coefficients<T>{T(h.beta1), T(1.0 - double(h.beta1)),
                                       T(h.beta2), T(1.0 - double(h.beta2)),
                                       T(h.eps),   T(-(lr * scale * std::sqrt(bias2) / bias1))};
}

/// The executor-specific loops: the Adam element update over R, M, V and the final pass over W (decay and the
/// working copy), and the projection (which on CUDA widens bf16 gradients to fp32 first). Specialised for
/// exec::host below and for exec::cuda in detail/cuda/low_rank.cuh.
template <class Exec>
struct low_rank_impl {
  static_assert(dependent_false<Exec>,
                "optim::galore / optim::golore: no implementation for this executor (exec::cuda needs a translation "
                "unit compiled by nvcc, which includes optim/detail/cuda/low_rank.cuh)");
};

template <>
struct low_rank_impl<exec::host> {
  template <class G, class T>
  static void project(const exec::host& ex, const projection& p, view<G, host_space> grad, view<const T, host_space> P,
                      view<T, host_space> R) {
    optim::project(ex, p, grad, P, R);
  }

  /// R <- the scaled update direction; M and V updated in place. All contiguous, same shape.
  template <class T>
  static void adam(const exec::host&, view<T, host_space> R, view<T, host_space> M, view<T, host_space> V,
                   const subspace_adam_coefficients<T>& c) {
    T* r = R.data();
    T* m = M.data();
    T* v = V.data();
    const std::int64_t n = R.numel();
    for (std::int64_t i = 0; i < n; ++i) r[i] = subspace_adam_update(r[i], m[i], v[i], c);
  }

  /// W <- W - lr wd W when `decay`, and working <- bf16(W) when working has data.
  template <class T>
  static void finish(const exec::host&, view<T, host_space> W, bool decay, T neg_lr_wd,
                     view<bf16, host_space> working) {
    T* w = W.data();
    bf16* out = working.data();
    const std::int64_t n = W.numel();
    if (decay)
      for (std::int64_t i = 0; i < n; ++i) w[i] = decayed(w[i], neg_lr_wd);
    if (out)
      for (std::int64_t i = 0; i < n; ++i) out[i] = bf16(float(w[i]));
  }
};

}  // namespace detail

/// One Adam step in the projected space with the current projector P (no refresh): the update path of galore and
/// golore, exposed for tests (which run it in double on the host) and for trainers that manage projectors
/// themselves. s is the matrix's 1-based step count (bias correction), `scale` GaLore's alpha. W, M, V, P and
/// working contiguous; M and V moment-shaped.
template <class Exec, class T, class G, class S>
void subspace_adam_step(const Exec& ex, const projection& p, view<T, S> W, view<G, S> grad, view<T, S> M, view<T, S> V,
                        view<const T, S> P, const subspace_adam& h, double scale, std::int64_t s, double lr, bool decay,
                        view<bf16, S> working = {}) {
  static_assert(std::is_same_v<S, space_of_t<Exec>>, "subspace_adam_step: views must live in the executor's space");
  using impl = detail::low_rank_impl<Exec>;
  require(s >= 1, [&] { return "subspace_adam_step: the step count s is 1-based, got " + std::to_string(s); });
  require(M.shape() == p.moment_shape() && V.shape() == p.moment_shape(), [&] {
    return "subspace_adam_step: moments have shapes " + to_string(M.shape()) + " and " + to_string(V.shape()) +
           ", expected " + to_string(p.moment_shape());
  });
  require(W.is_contiguous() && M.is_contiguous() && V.is_contiguous() && P.is_contiguous() && grad.is_contiguous() &&
              working.is_contiguous(),
          "subspace_adam_step: W, grad, M, V, P and working must be contiguous");
  subspace::detail::scratch<Exec, T> R(ex, p.moment_shape());
  impl::project(ex, p, grad, P, R.v());
  impl::adam(ex, R.v(), M, V, detail::coefficients<T>(h, scale, s, lr));
  back_project_add(ex, p, view<const T, S>(R.v()), P, W);
  const bool decays = decay && h.weight_decay != 0.0f && lr != 0.0;
  if (decays || working.data() != nullptr) impl::finish(ex, W, decays, T(-(lr * double(h.weight_decay))), working);
}

namespace detail {

/// What a policy decides at a refresh at step s (0-based, before the increment).
struct refresh_decision {
  bool random = false;     // GoLore's Haar-random projector (else GaLore's SVD)
  bool reproject = false;  // map M into the new basis (never at s = 0)
  std::uint64_t seed = 0;  // GoLore's seed
};

/// The settings galore and golore share.
struct low_rank_settings {
  const char* who;
  std::int64_t rank, refresh_period;
  float scale;
  bool (*target)(const param_info&);
  bool require_projection;
  bool allow_no_projection;
};

inline void check_settings(const low_rank_settings& s) {
  const auto who = [&] { return std::string(s.who); };
  require(s.rank >= 1 || s.rank == auto_rank, [&] {
    return who() + ": rank must be at least 1 (or optim::auto_rank, a quarter of each matrix's short side), got " +
           std::to_string(s.rank);
  });
  require(s.refresh_period >= 1, [&] {
    return who() + ": refresh_period (tau) must be at least 1 step, got " + std::to_string(s.refresh_period);
  });
  require(std::isfinite(s.scale) && s.scale > 0.0f,
          [&] { return who() + ": scale (alpha) must be positive and finite"; });
  require(s.target != nullptr,
          [&] { return who() + ": target must name a predicate (e.g. optim::attention_or_mlp_matrix)"; });
}

/// The rank r of a matrix: the settings' rank, or with auto_rank max(1, min(m, n) / 4).
inline std::int64_t rank_for(const low_rank_settings& s, const param_info& info) {
  if (s.rank != auto_rank || info.shape.rank != 2) return s.rank;
  return std::max<std::int64_t>(1, std::min(info.shape[0], info.shape[1]) / 4);
}

inline bool is_target(const low_rank_settings& s, const param_info& info) {
  return info.shape.rank == 2 && s.target(info);
}

/// True when the parameter is projected: a target of the rule with rank < min(m, n). A target with
/// min(m, n) <= rank falls back to Inner, or is an error when require_projection is set.
inline bool is_projected(const low_rank_settings& s, const param_info& info) {
  if (!is_target(s, info)) return false;
  const std::int64_t short_side = std::min(info.shape[0], info.shape[1]);
  const std::int64_t rank = rank_for(s, info);
  if (rank < short_side) return true;
  require(!s.require_projection, [&] {
    return std::string(s.who) + ": parameter '" + info.name + "' of shape " + to_string(info.shape) +
           " is a projection target but rank r = " + std::to_string(rank) +
           (rank > short_side ? " exceeds" : " equals") + " min(m, n) = " + std::to_string(short_side) +
           " (require_projection is set; lower the rank or unset it to fall back to the inner optimizer)";
  });
  return false;
}

/// What the settings project of a store's parameters (anything with size() and info(i)).
template <class Store>
projection_summary summarize(const low_rank_settings& s, const Store& store) {
  check_settings(s);
  projection_summary sum;
  const auto widen = [](std::int64_t& lo, std::int64_t& hi, std::int64_t x) {
    lo = lo == 0 ? x : std::min(lo, x);
    hi = std::max(hi, x);
  };
  for (std::size_t i = 0; i < store.size(); ++i) {
    const param_info& info = store.info(i);
    if (info.shape.rank != 2) continue;
    ++sum.matrices;
    if (!is_target(s, info)) continue;
    ++sum.targets;
    widen(sum.min_short_side, sum.max_short_side, std::min(info.shape[0], info.shape[1]));
    if (!is_projected(s, info)) continue;
    ++sum.projected;
    widen(sum.min_rank, sum.max_rank, rank_for(s, info));
  }
  return sum;
}

/// A store where nothing is projected would train Inner alone under the policy's name: an error naming why,
/// unless allow_no_projection is set.
template <class Store>
void check_parameters(const low_rank_settings& s, const Store& store) {
  if (s.allow_no_projection) return;
  const projection_summary sum = summarize(s, store);
  require(sum.projected > 0, [&] {
    const std::string who = std::string(s.who) + ": no parameter is projected, so every one would be stepped by " +
                            "the inner optimizer alone: ";
    const std::string unless = "; or set allow_no_projection to train with the inner optimizer alone";
    if (sum.targets == 0)
      return who + "none of the " + std::to_string(sum.matrices) +
             " matrices is a target of the target rule (the default, optim::attention_or_mlp_matrix, takes matrices "
             "whose names contain \"attn\" or \"mlp\"); choose another target, e.g. optim::any_matrix" +
             unless;
    return who + "rank r = " + std::to_string(s.rank) + " is not below the short side of any of the " +
           std::to_string(sum.targets) + " target matrices (min(m, n) from " + std::to_string(sum.min_short_side) +
           " to " + std::to_string(sum.max_short_side) + "); lower the rank, or leave it optim::auto_rank (a quarter " +
           "of each short side)" + unless;
  });
}

template <class Inner, class Exec>
using low_rank_state_for = low_rank_state<state_t<Inner, Exec>, space_of_t<Exec>>;

template <class Inner, class Exec>
low_rank_state_for<Inner, Exec> init(const Inner& inner, const low_rank_settings& s, const Exec& ex,
                                     const param_info& info) {
  using Space = space_of_t<Exec>;
  check_settings(s);
  low_rank_state_for<Inner, Exec> st;
  if (!is_projected(s, info)) {
    st.inner.emplace(inner.init(ex, info));
    return st;
  }
  st.geometry = make_projection(info.shape[0], info.shape[1], rank_for(s, info));
  st.m = tensor<float, Space>(st.geometry.moment_shape());
  st.v = tensor<float, Space>(st.geometry.moment_shape());
  st.p = tensor<float, Space>(st.geometry.projector_shape());
  fill(ex, st.m.v(), 0.0f);
  fill(ex, st.v.v(), 0.0f);
  fill(ex, st.p.v(), 0.0f);
  st.param_id = param_id_of(info.name);
  return st;
}

template <class Inner, class IS, class Space>
std::size_t state_bytes(const Inner& inner, const low_rank_state<IS, Space>& st) {
  if (st.inner) return std::size_t(inner.state_bytes(*st.inner));
  return st.m.bytes() + st.v.bytes() + st.p.bytes();
}

template <class Inner>
std::size_t state_bytes_for(const Inner& inner, const low_rank_settings& s, const param_info& info) {
  check_settings(s);
  if (!is_projected(s, info)) return subspace_rule<Inner>::state_bytes_for(inner, info);
  return std::size_t(make_projection(info.shape[0], info.shape[1], rank_for(s, info)).state_floats()) * sizeof(float);
}

/// One optimizer step of a parameter: Inner's step, or a refresh when s % period == 0 followed by the projected
/// Adam step. `decide(s)` returns the refresh_decision of the policy.
template <class Inner, class Exec, class GradIn, class S, class IS, class Decide>
void step(const Inner& inner, const low_rank_settings& s, const Exec& ex, view<float, S> master, view<GradIn, S> grad,
          low_rank_state<IS, S>& st, const param_info& info, const step_context& ctx, view<bf16, S> working,
          Decide&& decide) {
  static_assert(std::is_same_v<S, space_of_t<Exec>>,
                "optim::galore/golore::step: views must live in the executor's memory space");
  using G = std::remove_const_t<GradIn>;
  if (st.inner) {
    inner.step(ex, master, grad, *st.inner, info, ctx, working);
    return;
  }
  check_settings(s);
  const auto who = [&] { return std::string(s.who) + "::step(" + info.name + "): "; };
  const projection& p = st.geometry;
  require(ctx.step >= 1, [&] { return who() + "step_context::step is 1-based, got " + std::to_string(ctx.step); });
  require(master.shape() == info.shape, [&] {
    return who() + "master has shape " + to_string(master.shape()) + ", the parameter " + to_string(info.shape);
  });
  require(grad.shape() == info.shape, [&] {
    return who() + "grad has shape " + to_string(grad.shape()) + ", the parameter " + to_string(info.shape);
  });
  require(p.rows == info.shape[0] && p.cols == info.shape[1] && p.rank == rank_for(s, info), [&] {
    return who() + "state was made for a " + std::to_string(p.rows) + " x " + std::to_string(p.cols) +
           " matrix at rank " + std::to_string(p.rank) + "; the parameter is " + to_string(info.shape) + " at rank " +
           std::to_string(rank_for(s, info)) + " (init it with this parameter's info and this optimizer)";
  });
  require(working.data() == nullptr || working.shape() == info.shape, [&] {
    return who() + "working has shape " + to_string(working.shape()) + ", the parameter " + to_string(info.shape);
  });
  require(master.is_contiguous() && grad.is_contiguous() && working.is_contiguous(),
          [&] { return who() + "master, grad and working must be contiguous"; });
  const subspace_adam h = subspace_rule<Inner>::hyper(inner);
  require(0.0f <= h.beta1 && h.beta1 < 1.0f && 0.0f <= h.beta2 && h.beta2 < 1.0f,
          [&] { return who() + "beta1 and beta2 must lie in [0, 1)"; });
  require(h.eps > 0.0f, [&] { return who() + "eps must be positive"; });

  const view<const G, S> g(grad);
  if (st.steps % s.refresh_period == 0) {
    const refresh_decision d = decide(st.steps);
    const std::uint64_t refresh_id = std::uint64_t(st.steps / s.refresh_period);
    const bool reproject = d.reproject && st.steps > 0;
    tensor<float, S> fresh;
    const view<float, S> target = reproject ? (fresh = tensor<float, S>(p.projector_shape())).v() : st.p.v();
    if (d.random) golore_projector(ex, p, d.seed, st.param_id, refresh_id, target);
    else galore_projector(ex, p, g, target);
    if (reproject) {
      reproject_first_moment(ex, p, view<const float, S>(st.p.v()), view<const float, S>(fresh.v()), st.m.v());
      st.p = std::move(fresh);
    }
    st.source_code = std::int64_t(d.random ? projector_source::random : projector_source::svd);
    ++st.refreshes;
  }
  ++st.steps;
  subspace_adam_step(ex, p, master, g, st.m.v(), st.v.v(), view<const float, S>(st.p.v()), h, double(s.scale), st.steps,
                     double(ctx.lr), info.decay, working);
}

}  // namespace detail
}  // namespace subspace::optim

#if defined(__CUDACC__)
#include "cuda/low_rank.cuh"
#endif

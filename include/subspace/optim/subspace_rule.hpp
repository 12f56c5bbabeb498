#pragma once
// optim::subspace_rule<Inner>: how optim::galore<Inner> and optim::golore<Inner> wrap an inner optimizer (guide:
// docs/galore.md, "Another inner optimizer").
//
// Wrapping means two things. Parameters that are not projected (vectors, embeddings, matrices the target rule
// skips) are stepped by Inner itself, bit for bit as Inner alone would. Projected matrices are always stepped by
// Adam in the projected space (optim/detail/low_rank.hpp) — whatever Inner's own rule is — with the
// hyper-parameters subspace_rule<Inner>::hyper(inner) reads from Inner. So galore<MyOptimizer> needs MyOptimizer
// to be an Optimizer and a specialisation
//
//   template <> struct optim::subspace_rule<MyOptimizer> {
//     static MyOptimizer reference();                                  // the default `inner` of the policies
//     static optim::subspace_adam hyper(const MyOptimizer&);           // beta1, beta2, eps, weight decay
//     static std::size_t state_bytes_for(const MyOptimizer&, const optim::param_info&);  // without allocating
//   };
//
// check_subspace_inner<Inner>() (asserted by both policies) names what is missing in one message.

#include <concepts>
#include <cstddef>

#include "../core/config.hpp"
#include "adamw.hpp"
#include "concepts.hpp"

namespace subspace::optim {

/// The hyper-parameters of Adam in the projected space.
struct subspace_adam {
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-6f, weight_decay = 0.0f;
};

/// What galore/golore read from inner optimizer Inner; specialise it for your own (the primary has nothing, so
/// that check_subspace_inner can say so).
template <class Inner>
struct subspace_rule {};

template <>
struct subspace_rule<adamw> {
  /// The AdamW of the GaLore and GoLore reference recipes: beta (0.9, 0.999), eps 1e-6, no weight decay.
  static adamw reference() { return adamw{0.9f, 0.999f, 1e-6f, 0.0f}; }
  static subspace_adam hyper(const adamw& a) { return {a.beta1, a.beta2, a.eps, a.weight_decay}; }
  static std::size_t state_bytes_for(const adamw& a, const param_info& info) { return a.state_bytes_for(info); }
};

/// An optimizer galore/golore can wrap: an Optimizer with a complete subspace_rule.
template <class Inner>
concept SubspaceInner = Optimizer<Inner> && requires(const Inner& inner, const param_info& info) {
  { subspace_rule<Inner>::reference() } -> std::convertible_to<Inner>;
  { subspace_rule<Inner>::hyper(inner) } -> std::convertible_to<subspace_adam>;
  { subspace_rule<Inner>::state_bytes_for(inner, info) } -> std::convertible_to<std::size_t>;
};

/// static_assert(check_subspace_inner<Inner>()): one readable message naming what Inner misses.
template <class Inner>
consteval bool check_subspace_inner() {
  if constexpr (!Optimizer<Inner>) {
    return check_optimizer<Inner>();  // names the Optimizer requirement Inner misses
  } else if constexpr (!SubspaceInner<Inner>) {
    static_assert(dependent_false<Inner>,
                  "optim::galore<Inner> / optim::golore<Inner>: no optim::subspace_rule<Inner>. Projected matrices "
                  "are always stepped by Adam in the subspace, with Inner's hyper-parameters; Inner steps the rest. "
                  "Specialise optim::subspace_rule<Inner> with reference() -> Inner, hyper(inner) -> "
                  "optim::subspace_adam and state_bytes_for(inner, info) -> std::size_t (optim/subspace_rule.hpp)");
    return false;
  } else {
    return true;
  }
}

}  // namespace subspace::optim

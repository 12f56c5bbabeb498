#pragma once
// The Scheduler policy: the plan of a training step, as a plain value.
//
// A scheduler answers "what does rank r do in step t?" without doing any of it: which micro-batch runs forward or
// backward, who sends to whom, which peers mix with which weight. Plans are values, so schedules are unit-tested
// without a communicator, compared with ==, printed, and replayed.
//
// Requirements:
//
//   typename S::plan_type                  std::regular: default-constructible, copyable, equality-comparable
//   s.plan(std::int64_t step, int rank)    the plan of step `step` (0-based: the optimizer's step_context::step
//       -> S::plan_type                      is step + 1) on rank `rank`; a pure function of (s, step, rank):
//                                            equal schedules give equal plans. step < 0 or rank outside
//                                            [0, world_size()) raises subspace::invalid_argument
//   s.world_size() -> int                  the number of ranks the schedule is written for (>= 1)
//   S is copyable                          schedules are small values
//
// Each scheduler documents its plan type. The compute plans of single-device and pipeline schedules are
// sequences of schedule::action (below); gossip schedules plan groups and mixing weights.

#include <concepts>
#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>

#include "../core/config.hpp"

namespace subspace {
namespace schedule {

/// What one action of a compute plan does. Pipeline schedules use the send/recv kinds to move a micro-batch's
/// activations (forward) and activation gradients (backward) between neighbouring stages; pipeline/plan.hpp
/// says where they stand in a plan.
enum class action_kind {
  forward,          // run the forward of micro-batch `microbatch` through model chunk `chunk`
  backward,         // its whole backward: the input gradient and the parameter gradients (accumulated)
  backward_input,   // the first half of a split backward: only the gradient of the chunk's input (zero-bubble
                    // schedules); its parameter gradients wait for backward_weight
  backward_weight,  // the second half: accumulate the chunk's parameter gradients of that micro-batch, after its
                    // backward_input; sends nothing
  send_activation,  // send micro-batch `microbatch`'s boundary activations to `peer`
  recv_activation,  // receive micro-batch `microbatch`'s boundary activations from `peer`
  send_gradient,    // send the gradient of micro-batch `microbatch`'s boundary activations to `peer`
  recv_gradient,    // receive that gradient from `peer`
  optimizer_step,   // apply the optimizer to the accumulated gradients (once per step, last)
};

inline constexpr std::string_view to_string(action_kind k) {
  switch (k) {
    case action_kind::forward: return "forward";
    case action_kind::backward: return "backward";
    case action_kind::backward_input: return "backward_input";
    case action_kind::backward_weight: return "backward_weight";
    case action_kind::send_activation: return "send_activation";
    case action_kind::recv_activation: return "recv_activation";
    case action_kind::send_gradient: return "send_gradient";
    case action_kind::recv_gradient: return "recv_gradient";
    case action_kind::optimizer_step: return "optimizer_step";
  }
  return "?";
}

/// One action of a compute plan. `microbatch` is -1 for optimizer_step; `peer` is -1 unless the kind sends or
/// receives. `chunk` is the model chunk on this rank the action computes, or whose computation a send drains or
/// a receive feeds: 0 unless the schedule gives each rank several chunks (pipeline::interleaved_1f1b).
struct action {
  action_kind kind = action_kind::forward;
  int microbatch = -1;
  int peer = -1;
  int chunk = 0;

  friend bool operator==(const action&, const action&) = default;
};

/// "forward(3)", "send_activation(3 -> 1)", "recv_gradient(3 <- 2)", "optimizer_step"; a nonzero chunk follows
/// the micro-batch: "forward(3, chunk 1)", "send_activation(3 -> 1, chunk 1)".
inline std::string to_string(const action& a) {
  std::string s(to_string(a.kind));
  if (a.kind == action_kind::optimizer_step) return s;
  s += '(' + std::to_string(a.microbatch);
  if (a.kind == action_kind::send_activation || a.kind == action_kind::send_gradient)
    s += " -> " + std::to_string(a.peer);
  if (a.kind == action_kind::recv_activation || a.kind == action_kind::recv_gradient)
    s += " <- " + std::to_string(a.peer);
  if (a.chunk != 0) s += ", chunk " + std::to_string(a.chunk);
  return s + ')';
}
inline std::ostream& operator<<(std::ostream& o, const action& a) { return o << to_string(a); }

namespace requirement {
template <class S>
concept plan_type = requires { typename S::plan_type; } && std::regular<typename S::plan_type>;
template <class S>
concept plans = requires(const S& s, std::int64_t step, int rank) {
  { s.plan(step, rank) } -> std::same_as<typename S::plan_type>;
};
template <class S>
concept world = requires(const S& s) {
  { s.world_size() } -> std::convertible_to<int>;
};
}  // namespace requirement
}  // namespace schedule

/// Produces the plan of a step as a plain value; see schedule/concepts.hpp.
template <class S>
concept Scheduler = std::copyable<S> && schedule::requirement::plan_type<S> && schedule::requirement::plans<S> &&
                    schedule::requirement::world<S>;

/// static_assert(check_scheduler<S>()) names the first requirement S misses, in one readable message.
template <class S>
consteval bool check_scheduler() {
  namespace r = schedule::requirement;
  if constexpr (!std::copyable<S>) {
    static_assert(dependent_false<S>, "`scheduler` does not satisfy subspace::Scheduler: not copyable");
    return false;
  } else if constexpr (!requires { typename S::plan_type; }) {
    static_assert(dependent_false<S>, "`scheduler` does not satisfy subspace::Scheduler: missing `plan_type`");
    return false;
  } else if constexpr (!r::plan_type<S>) {
    static_assert(dependent_false<S>,
                  "`scheduler` does not satisfy subspace::Scheduler: `plan_type` is not std::regular "
                  "(default-constructible, copyable and comparable with ==)");
    return false;
  } else if constexpr (!r::plans<S>) {
    static_assert(dependent_false<S>,
                  "`scheduler` does not satisfy subspace::Scheduler: missing `plan(std::int64_t step, int rank) "
                  "const -> plan_type`");
    return false;
  } else if constexpr (!r::world<S>) {
    static_assert(dependent_false<S>,
                  "`scheduler` does not satisfy subspace::Scheduler: missing `world_size() const -> int`");
    return false;
  } else {
    return true;
  }
}

}  // namespace subspace

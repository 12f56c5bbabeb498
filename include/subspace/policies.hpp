#pragma once
// Training stacks: the four policies a trainer is built from, and the check every trainer runs on them.
//
// A training stack is a struct naming one type per policy kind:
//
//   struct my_stack : subspace::default_policies {     // inherit the defaults, override what differs
//     using optimizer = my_optimizer;
//   };
//
//   member          concept                    default
//   communicator    subspace::Communicator     comm::self                        (one rank)
//   compressor      subspace::Compressor       compress::identity                (send everything)
//   scheduler       subspace::Scheduler        schedule::gradient_accumulation   (micro-batches, then a step)
//   optimizer       subspace::Optimizer        optim::adamw
//
// Trainers check their stack at the outermost template, first thing in the class body:
//
//   template <class Model, class Stack>
//   class my_trainer {
//     static_assert(subspace::check_stack<Stack>());
//     ...
//
// check_stack reports, per policy, the first thing missing: the member itself ("training stack: missing
// `using optimizer = ...;`") or the first requirement of the concept the policy fails ("`optimizer` does not
// satisfy subspace::Optimizer: missing `state_bytes(const state&) -> std::size_t`"); the compiler's
// instantiation notes name the stack and the policy type. The concept subspace::TrainingStack is the same test
// as a boolean, for overloading.

#include <type_traits>

#include "comm/concepts.hpp"
#include "comm/self.hpp"
#include "compress/concepts.hpp"
#include "compress/identity.hpp"
#include "core/config.hpp"
#include "optim/adamw.hpp"
#include "optim/concepts.hpp"
#include "schedule/concepts.hpp"
#include "schedule/gradient_accumulation.hpp"

namespace subspace {

/// The single-device defaults: one rank, no compression, gradient accumulation, AdamW.
struct default_policies {
  using communicator = comm::self;
  using compressor = compress::identity;
  using scheduler = schedule::gradient_accumulation;
  using optimizer = optim::adamw;
};

/// True when Stack names the four policies and each satisfies its concept.
template <class Stack>
concept TrainingStack = requires {
  typename Stack::communicator;
  typename Stack::compressor;
  typename Stack::scheduler;
  typename Stack::optimizer;
} && Communicator<typename Stack::communicator> && Compressor<typename Stack::compressor> &&
                        Scheduler<typename Stack::scheduler> && Optimizer<typename Stack::optimizer>;

namespace detail {

template <class Stack>
consteval bool check_stack_communicator() {
  if constexpr (!requires { typename Stack::communicator; }) {
    static_assert(dependent_false<Stack>,
                  "training stack: missing `using communicator = ...;` (derive the stack from "
                  "subspace::default_policies to inherit comm::self)");
    return false;
  } else {
    return check_communicator<typename Stack::communicator>();
  }
}
template <class Stack>
consteval bool check_stack_compressor() {
  if constexpr (!requires { typename Stack::compressor; }) {
    static_assert(dependent_false<Stack>,
                  "training stack: missing `using compressor = ...;` (derive the stack from "
                  "subspace::default_policies to inherit compress::identity)");
    return false;
  } else {
    return check_compressor<typename Stack::compressor>();
  }
}
template <class Stack>
consteval bool check_stack_scheduler() {
  if constexpr (!requires { typename Stack::scheduler; }) {
    static_assert(dependent_false<Stack>,
                  "training stack: missing `using scheduler = ...;` (derive the stack from "
                  "subspace::default_policies to inherit schedule::gradient_accumulation)");
    return false;
  } else {
    return check_scheduler<typename Stack::scheduler>();
  }
}
template <class Stack>
consteval bool check_stack_optimizer() {
  if constexpr (!requires { typename Stack::optimizer; }) {
    static_assert(dependent_false<Stack>,
                  "training stack: missing `using optimizer = ...;` (derive the stack from "
                  "subspace::default_policies to inherit optim::adamw)");
    return false;
  } else {
    return check_optimizer<typename Stack::optimizer>();
  }
}

}  // namespace detail

/// static_assert(check_stack<Stack>()): true for a valid stack; otherwise one readable error per faulty policy.
template <class Stack>
consteval bool check_stack() {
  if constexpr (!std::is_class_v<Stack>) {
    static_assert(dependent_false<Stack>,
                  "training stack: expected a struct naming communicator, compressor, scheduler and optimizer "
                  "(derive it from subspace::default_policies)");
    return false;
  } else {
    // Every check is instantiated (no short circuit at compile time), so each faulty policy reports once.
    constexpr bool communicator_ok = detail::check_stack_communicator<Stack>();
    constexpr bool compressor_ok = detail::check_stack_compressor<Stack>();
    constexpr bool scheduler_ok = detail::check_stack_scheduler<Stack>();
    constexpr bool optimizer_ok = detail::check_stack_optimizer<Stack>();
    return communicator_ok && compressor_ok && scheduler_ok && optimizer_ok;
  }
}

static_assert(TrainingStack<default_policies>);
static_assert(check_stack<default_policies>());

}  // namespace subspace

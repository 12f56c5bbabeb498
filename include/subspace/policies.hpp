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
#include <utility>

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

/// A training stack as a value: each policy written once, its type deduced (C++20 aggregate deduction), the
/// omitted ones defaulted — the way every trainer takes its policies:
///
///   train::trainer t(model, subspace::stack{.scheduler = schedule::gradient_accumulation{4},
///                                           .optimizer = optim::golore<>{}}, options);
template <class Communicator = comm::self, class Compressor = compress::identity,
          class Scheduler = schedule::gradient_accumulation, class Optimizer = optim::adamw>
struct stack {
  using communicator_type = Communicator;
  using compressor_type = Compressor;
  using scheduler_type = Scheduler;
  using optimizer_type = Optimizer;

  Communicator communicator{};
  Compressor compressor{};
  Scheduler scheduler{};
  Optimizer optimizer{};
};

/// The single-device defaults as types: one rank, no compression, gradient accumulation, AdamW.
struct default_policies {
  using communicator = comm::self;
  using compressor = compress::identity;
  using scheduler = schedule::gradient_accumulation;
  using optimizer = optim::adamw;
};

namespace detail {
/// A value stack (subspace::stack or any aggregate with the four members) seen as a type stack.
template <class Stack>
struct policy_types {
  using type = Stack;
};
template <class Stack>
  requires requires(Stack& s) {
    s.communicator;
    s.compressor;
    s.scheduler;
    s.optimizer;
  }
struct policy_types<Stack> {
  struct type {
    using communicator = std::remove_cvref_t<decltype(std::declval<Stack&>().communicator)>;
    using compressor = std::remove_cvref_t<decltype(std::declval<Stack&>().compressor)>;
    using scheduler = std::remove_cvref_t<decltype(std::declval<Stack&>().scheduler)>;
    using optimizer = std::remove_cvref_t<decltype(std::declval<Stack&>().optimizer)>;
  };
};
}  // namespace detail

/// True when Stack names the four policies and each satisfies its concept.
template <class S, class Stack = typename detail::policy_types<S>::type>
concept TrainingStack =
    requires {
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
template <class S>
consteval bool check_stack() {
  using Stack = typename detail::policy_types<S>::type;
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
static_assert(TrainingStack<stack<>>);
static_assert(check_stack<stack<>>());

}  // namespace subspace

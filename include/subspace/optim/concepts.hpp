#pragma once
// The Optimizer policy: per-parameter state and the update rule.
//
// One optimizer object holds the hyper-parameters; the trainer calls init once per parameter tensor and keeps the
// returned state beside the parameter; each step it calls step with the parameter's fp32 master weights and its
// gradient. Everything that changes from step to step lives in the state (moments, projectors, counters), so one
// optimizer object serves every parameter and states can be checkpointed and measured.
//
// Requirements (checked with exec::host on host-space views):
//
//   o.init(ex, const param_info& info) -> State        State lives in the executor's memory space (an
//                                                       optimizer typically has `template <class Space> struct
//                                                       state`), initialised for a parameter of info.shape
//   o.step(ex, view<float, S> master,                  one update of `master` (fp32 master weights, in place)
//          view<const G, S> grad,                       from grad, G = float or bf16;
//          State& state, const param_info& info,
//          const step_context& ctx,
//          view<bf16, S> working = {})                  when `working` is given (non-null data; the default
//                                                       view means none), the same pass also writes
//                                                       bf16(updated master) into it (the compute copy)
//   o.state_bytes(const State& state) -> std::size_t   the bytes the state occupies (memory accounting)
//   state.for_each_tensor(f)                           needed for checkpoints: calls f(name, view) for every
//                                                       tensor a checkpoint must hold to continue exactly
//                                                       (views in the state's space, or host int64 counters);
//                                                       a state with no tensors defines an empty one. For a state
//                                                       type you cannot change, specialise
//                                                       optim::state_tensors<State> instead
//
// Optional: o.check_parameters(store) — the trainers call it once with every parameter a replica holds (anything
// with size() and info(i)), before allocating, for checks across parameters (galore/golore: something is projected).
//
// step must accept the default `working`. Shapes that disagree with info.shape raise
// subspace::invalid_argument. check_optimizer<O>() below names the first requirement O misses.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "../core/dtype.hpp"
#include "../core/executor.hpp"
#include "../core/parameter.hpp"
#include "../core/tensor.hpp"

namespace subspace {
namespace optim {

/// What an optimizer knows about a parameter tensor: its name, shape and whether weight decay applies
/// (core/parameter.hpp; the initialisation fields are the model's business).
using param_info = parameter_info;

/// The library's weight-decay rule: parameters with two or more dimensions (weight matrices, embeddings)
/// decay; vectors (norm gains, biases) do not.
inline param_info param_info_for(std::string name, const shape& s) {
  return param_info{std::move(name), s, s.rank >= 2, {}};
}

/// What changes from one optimizer step to the next.
struct step_context {
  float lr = 0.0f;          // the learning rate of this step (after any schedule)
  std::int64_t step = 1;    // 1-based count of optimizer steps taken, this one included (bias correction)
  float grad_scale = 1.0f;  // every gradient element is multiplied by this before use (global-norm clipping)
};

/// Whether optimizer O multiplies each gradient element by step_context::grad_scale as it reads it, which saves
/// the pass over every gradient that scaling them in memory takes. train::replica::step_all scales the gradients
/// in memory for the others and hands them a grad_scale of 1.
template <class O>
inline constexpr bool applies_grad_scale = requires { requires O::applies_grad_scale; };

/// The state type O::init returns for executor Exec.
template <class O, class Exec>
using state_t = decltype(std::declval<O&>().init(std::declval<const Exec&>(), std::declval<const param_info&>()));

/// Names the tensors of an optimizer state whose type cannot be given a member for_each_tensor(f): specialise it
/// with `template <class F> static void for_each(State& s, F&& f)` calling f(name, view) for each tensor.
template <class State>
struct state_tensors {};

/// Calls f(name, view) for every tensor of `state` (its for_each_tensor, else state_tensors<State>::for_each):
/// what checkpoints save and restore.
template <class State, class F>
void for_each_state_tensor(State& state, F&& f) {
  if constexpr (requires { state.for_each_tensor(f); }) {
    state.for_each_tensor(f);
  } else {
    static_assert(
        requires { state_tensors<State>::for_each(state, f); },
        "optimizer state: no checkpoint layout; give the state a member for_each_tensor(f) calling "
        "f(name, view) for each tensor, or specialise optim::state_tensors<State>");
    state_tensors<State>::for_each(state, f);
  }
}

namespace requirement {
template <class G>
using grad_t = view<const G, host_space>;
using master_t = view<float, host_space>;
using working_t = view<bf16, host_space>;

template <class O>
concept init = requires(O& o, const exec::host& ex, const param_info& info) {
  { o.init(ex, info) } -> std::movable;
};
template <class O, class G>
concept step = init<O> && requires(O& o, const exec::host& ex, master_t master, grad_t<G> grad,
                                   state_t<O, exec::host>& state, const param_info& info,
                                   const step_context& ctx) { o.step(ex, master, grad, state, info, ctx); };
template <class O>
concept working_copy =
    init<O> && requires(O& o, const exec::host& ex, master_t master, grad_t<float> grad, state_t<O, exec::host>& state,
                        const param_info& info, const step_context& ctx,
                        working_t working) { o.step(ex, master, grad, state, info, ctx, working); };
template <class O>
concept state_bytes = init<O> && requires(O& o, const state_t<O, exec::host>& state) {
  { o.state_bytes(state) } -> std::convertible_to<std::size_t>;
};
/// What checkpoints call a state's for_each_tensor with: f(name, view) for any name, element type and space.
struct tensor_visitor {
  template <class Name, class T, class S>
  void operator()(const Name&, view<T, S>) const {}
};
template <class State>
concept names_its_tensors = requires(State& state, tensor_visitor f) { state.for_each_tensor(f); } ||
                            requires(State& state, tensor_visitor f) { state_tensors<State>::for_each(state, f); };
template <class O>
concept checkpoint_tensors = init<O> && names_its_tensors<state_t<O, exec::host>>;
}  // namespace requirement
}  // namespace optim

/// Creates per-parameter state and updates fp32 master weights from gradients; see optim/concepts.hpp.
template <class O>
concept Optimizer = optim::requirement::init<O> && optim::requirement::step<O, float> &&
                    optim::requirement::step<O, bf16> && optim::requirement::working_copy<O> &&
                    optim::requirement::state_bytes<O> && optim::requirement::checkpoint_tensors<O>;

/// static_assert(check_optimizer<O>()) names the first requirement O misses, in one readable message.
template <class O>
consteval bool check_optimizer() {
  namespace r = optim::requirement;
  if constexpr (!r::init<O>) {
    static_assert(dependent_false<O>,
                  "`optimizer` does not satisfy subspace::Optimizer: missing `init(ex, const optim::param_info&) -> "
                  "state`");
    return false;
  } else if constexpr (!r::step<O, float>) {
    static_assert(dependent_false<O>,
                  "`optimizer` does not satisfy subspace::Optimizer: missing `step(ex, view<float, S> master, "
                  "view<const float, S> grad, state&, const optim::param_info&, const optim::step_context&)`");
    return false;
  } else if constexpr (!r::step<O, bf16>) {
    static_assert(dependent_false<O>,
                  "`optimizer` does not satisfy subspace::Optimizer: `step` does not accept bf16 gradients "
                  "(view<const bf16, S> grad)");
    return false;
  } else if constexpr (!r::working_copy<O>) {
    static_assert(dependent_false<O>,
                  "`optimizer` does not satisfy subspace::Optimizer: `step` does not take the optional bf16 "
                  "working copy (a last parameter view<bf16, S> working = {})");
    return false;
  } else if constexpr (!r::state_bytes<O>) {
    static_assert(dependent_false<O>,
                  "`optimizer` does not satisfy subspace::Optimizer: missing `state_bytes(const state&) -> "
                  "std::size_t`");
    return false;
  } else if constexpr (!r::checkpoint_tensors<O>) {
    static_assert(dependent_false<O>,
                  "`optimizer` does not satisfy subspace::Optimizer: its state has no `for_each_tensor(f)` calling "
                  "f(name, view) for each tensor (needed for checkpoints; a state without tensors defines an empty "
                  "one, a state type you cannot change gets a specialisation of optim::state_tensors<State>)");
    return false;
  } else {
    return true;
  }
}

}  // namespace subspace

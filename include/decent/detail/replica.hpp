#pragma once
// The gossip trainer's fused mix-and-step over a train::replica (subspace/train/replica.hpp: one rank's model,
// masters, optimizer and states).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <subspace/comm/concepts.hpp>
#include <subspace/core/dtype.hpp>
#include <subspace/core/error.hpp>
#include <subspace/core/executor.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/kernels/elementwise.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/optim/concepts.hpp>
#include <subspace/train/replica.hpp>

namespace decent::detail {

/// Whether optimizer O fuses the mixing copy into its update (decent_adam, accum_adam: step_from_mixed).
template <class O, class Exec, class G>
concept steps_from_mixed = requires(
    const O& o, const Exec& ex, subspace::view<const float, subspace::space_of_t<Exec>> mixed,
    subspace::view<float, subspace::space_of_t<Exec>> master, subspace::view<const G, subspace::space_of_t<Exec>> grad,
    subspace::optim::state_t<O, Exec>& st, const subspace::optim::param_info& info,
    const subspace::optim::step_context& ctx, subspace::view<subspace::bf16, subspace::space_of_t<Exec>> working) {
  o.step_from_mixed(ex, mixed, master, grad, st, info, ctx, working);
};

/// One optimizer step of parameter i of replica `r` from the mixed point `mixed` (shaped like the parameter):
/// fused for optimizers with step_from_mixed (decent_adam, accum_adam), else the mixed point is copied into the
/// master first.
template <class Model, class Optimizer>
void step_from_mixed(subspace::train::replica<Model, Optimizer>& r, std::size_t i,
                     subspace::view<const float, typename subspace::train::replica<Model, Optimizer>::space> mixed,
                     const subspace::optim::step_context& ctx) {
  using replica_type = subspace::train::replica<Model, Optimizer>;
  using space = typename replica_type::space;
  using grad_type = typename replica_type::grad_type;
  const auto& ex = r.executor();
  if constexpr (steps_from_mixed<Optimizer, typename replica_type::executor_type, grad_type>) {
    r.optimizer().step_from_mixed(ex, mixed, r.master(i), subspace::view<const grad_type, space>(r.grad(i)),
                                  r.states()[i], r.info(i), ctx, r.working(i));
  } else {
    subspace::copy(ex, mixed, r.master(i));
    r.step(i, ctx);
  }
}

}  // namespace decent::detail

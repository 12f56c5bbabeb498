#pragma once
// What data_parallel_trainer and gossip_trainer share beyond train::replica (subspace/train/replica.hpp, one
// rank's model, masters, optimizer and states): the fused mix-and-step, the request type of an all-reduce, and
// the mean of a number over the ranks.

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
concept steps_from_mixed =
    requires(const O& o, const Exec& ex, subspace::view<const float, subspace::space_of_t<Exec>> mixed,
             subspace::view<float, subspace::space_of_t<Exec>> master,
             subspace::view<const G, subspace::space_of_t<Exec>> grad,
             subspace::optim::state_t<O, Exec>& st, const subspace::optim::param_info& info,
             const subspace::optim::step_context& ctx,
             subspace::view<subspace::bf16, subspace::space_of_t<Exec>> working) {
      o.step_from_mixed(ex, mixed, master, grad, st, info, ctx, working);
    };

/// The request C's all_reduce returns for a view<T, S>.
template <class C, class T, class S>
using all_reduce_request_t = std::remove_cvref_t<decltype(std::declval<C&>().all_reduce(
    std::declval<subspace::view<T, S>>(), subspace::comm::reduce_op::sum))>;

/// The mean of `x` over the ranks of `comm` (collective; host memory).
template <class C>
double mean_over_ranks(C& comm, double x) {
  double buf = x;
  comm.all_reduce(subspace::view<double, subspace::host_space>(&buf, {1}), subspace::comm::reduce_op::avg).wait();
  return buf;
}

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

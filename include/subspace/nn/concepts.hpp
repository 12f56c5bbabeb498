#pragma once
// The Model concept: what every trainer needs from a model (or a pipeline stage of one). nn::llama satisfies it;
// another architecture that does trains through the same trainers.
//
//   typename M::executor_type, value_type, grad_type     where it runs, weights/activations, weight gradients
//   typename M::boundary_type                             the element type of the stream between stages
//   typename M::config_type                               its configuration
//   typename M::stage_io                                  what one stage call reads and writes: tokens,
//                                                         targets ([B, S] host int32), in, out (the boundary)
//   m.config() -> const config_type&,  m.executor()
//   m.has_embedding(), m.has_head() -> bool               the stage reads the tokens / computes the loss (a
//                                                         whole model does both); the others take `in` / give
//                                                         `out`
//   m.boundary_shape(rows) -> shape                       the extents of in and out for a micro-batch of
//                                                         `rows` tokens
//   m.parameters()                                        its nn::parameter_store (shared by the stages of a rank)
//   m.init(seed)                                          its tensors' initial values
//   m.forward(slot, io, loss_scale) -> double             the training forward of one micro-batch in an
//                                                         activation slot; the loss on the last stage
//   m.backward(slot, grad_out, grad_in, ready)            ready(first, last): store tensors [first, last) are final
//   m.evaluate(slot, io) -> double                        the forward without gradient state
//   m.evaluate(tokens, targets) -> double                 the loss alone, for a whole model
//   m.after_step()                                        after every optimizer step (policies' hooks)

#include <concepts>
#include <cstddef>
#include <cstdint>

#include "../core/config.hpp"
#include "../core/tensor.hpp"

namespace subspace::nn {

namespace requirement {
struct ignore_ready {
  void operator()(std::size_t, std::size_t) const {}
};

template <class M>
concept types = requires {
  typename M::executor_type;
  typename M::value_type;
  typename M::grad_type;
  typename M::boundary_type;
  typename M::config_type;
  typename M::stage_io;
};
template <class M>
concept state = types<M> && requires(M& m, const M& cm, std::uint64_t seed) {
  { cm.config() } -> std::same_as<const typename M::config_type&>;
  cm.executor();
  { cm.has_embedding() } -> std::convertible_to<bool>;
  { cm.has_head() } -> std::convertible_to<bool>;
  { cm.boundary_shape(std::int64_t{}) } -> std::same_as<shape>;
  m.parameters().flat_values();
  m.parameters().flat_grads();
  m.init(seed);
  m.after_step();
};
template <class M>
concept passes = types<M> && requires(M& m, std::size_t slot, const typename M::stage_io& io, float scale,
                                      view<const typename M::boundary_type, space_of_t<typename M::executor_type>> g,
                                      view<typename M::boundary_type, space_of_t<typename M::executor_type>> gi,
                                      view<const std::int32_t, host_space> tokens) {
  { m.forward(slot, io, scale) } -> std::convertible_to<double>;
  { m.evaluate(slot, io) } -> std::convertible_to<double>;
  m.backward(slot, g, gi, ignore_ready{});
  { m.evaluate(tokens, tokens) } -> std::convertible_to<double>;
};
}  // namespace requirement

template <class M>
concept Model = requirement::types<M> && requirement::state<M> && requirement::passes<M>;

/// static_assert(check_model<M>()) names the first requirement M misses, in one readable message.
template <class M>
consteval bool check_model() {
  if constexpr (!requirement::types<M>) {
    static_assert(dependent_false<M>,
                  "Model: missing a member type (executor_type, value_type, grad_type, boundary_type, config_type, "
                  "stage_io; see "
                  "nn/concepts.hpp)");
    return false;
  } else if constexpr (!requirement::state<M>) {
    static_assert(dependent_false<M>,
                  "Model: missing config(), executor(), has_embedding(), has_head(), boundary_shape(rows), "
                  "parameters() (an nn::parameter_store), init(seed) or after_step() (see nn/concepts.hpp)");
    return false;
  } else if constexpr (!requirement::passes<M>) {
    static_assert(dependent_false<M>,
                  "Model: missing forward(slot, stage_io, loss_scale), evaluate(slot, stage_io), backward(slot, "
                  "grad_out, grad_in, ready) or evaluate(tokens, targets) (see nn/concepts.hpp)");
    return false;
  } else {
    return true;
  }
}

}  // namespace subspace::nn

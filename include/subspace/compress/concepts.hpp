#pragma once
// The Compressor policy: what crosses a boundary (a pipeline stage's activations, a chunk's K/V) in place of the
// full tensor, and the matching rule for gradients.
//
// Forward, the sender encodes x into a payload and sends the payload; the receiver decodes it into x_hat.
// Backward, the receiver turns dL/dx_hat into dL/dpayload (decode_backward), sends that, and the sender turns it
// into dL/dx (encode_backward). Both backward functions are vector-Jacobian products; for a linear compressor
// (identity, a subspace projection) they are the adjoints of decode and encode.
//
// Requirements (checked with exec::host on host-space float views):
//
//   c.payload_shape(shape x) -> shape                  the payload's extents for an input of extents x
//   c.wire_bytes(shape x, std::size_t element_bytes)   bytes one encoded x puts on the wire when payload
//       -> std::size_t                                   elements travel with element_bytes each: exactly
//                                                        payload elements × element_bytes + a side channel
//                                                        that does not depend on element_bytes (0 for a
//                                                        dense payload; e.g. rotation coefficients in fp32)
//   c.encode(ex, view<const T, S> x, view<T, S> payload)
//   c.decode(ex, view<const T, S> payload, view<T, S> x_hat)
//   c.decode_backward(ex, view<const T, S> payload,     grad_payload = (d decode / d payload)ᵀ · grad_x_hat,
//       view<const T, S> grad_x_hat,                     at the payload decode saw
//       view<T, S> grad_payload)
//   c.encode_backward(ex, view<const T, S> x,           grad_x = (d encode / d x)ᵀ · grad_payload, at the x
//       view<const T, S> grad_payload, view<T, S> grad_x) encode saw
//   c.visit_parameters(f)                               calls f(compress::parameter<S>{...}) once per trainable
//                                                        tensor the compressor owns (never, for identity)
//
// Outputs are overwritten. The forward inputs passed to the backward functions let nonlinear compressors
// (a rotation chosen from the data) recompute what they need; linear ones ignore them. Shape mismatches raise
// subspace::invalid_argument.
//
// Trainable parameters. A compressor may own parameters the model trains (a basis, a rotation head). It keeps
// each one's value and gradient buffer itself and exposes them through visit_parameters: the trainer adds them
// to the optimizer's parameter list, all-reduces their gradients with the model's and zeroes them after each
// step. decode_backward and encode_backward ACCUMULATE (+=) into the parameter gradients (a compressor is used
// once per micro-batch and per boundary). A visitor rather than a returned container keeps the interface free of
// the memory space: a compressor whose parameters live on the device calls f with device views.
//
// Optional: `static constexpr bool is_linear = true;` declares encode and decode linear in their tensor inputs;
// the conformance suite then also checks the adjoint identities <decode(p), g> = <p, decode_backward(g)> and
// <encode(x), q> = <x, encode_backward(q)>.

#include <concepts>
#include <cstddef>
#include <string_view>
#include <type_traits>

#include "../core/executor.hpp"
#include "../core/tensor.hpp"

namespace subspace {
namespace compress {

/// A trainable tensor owned by a compressor: its value and the gradient its backward accumulates into.
/// `decay` says whether weight decay applies (as optim::param_info::decay).
template <class Space>
struct parameter {
  std::string_view name;
  view<float, Space> value;
  view<float, Space> grad;
  bool decay = false;
};

/// True when C declares `static constexpr bool is_linear = true`.
template <class C>
inline constexpr bool is_linear_v = [] {
  if constexpr (requires { C::is_linear; }) {
    return bool(C::is_linear);
  } else {
    return false;
  }
}();

namespace requirement {
using in_t = view<const float, host_space>;
using out_t = view<float, host_space>;

/// The visitor the concept check passes to visit_parameters: accepts a parameter in any memory space.
struct parameter_probe {
  template <class Space>
  void operator()(const parameter<Space>&) const {}
};

template <class C>
concept shapes = requires(const C& c, const shape& s, std::size_t element_bytes) {
  { c.payload_shape(s) } -> std::same_as<shape>;
  { c.wire_bytes(s, element_bytes) } -> std::convertible_to<std::size_t>;
};
template <class C>
concept forward = requires(C& c, const exec::host& ex, in_t in, out_t out) {
  c.encode(ex, in, out);
  c.decode(ex, in, out);
};
template <class C>
concept backward = requires(C& c, const exec::host& ex, in_t fwd, in_t in, out_t out) {
  c.decode_backward(ex, fwd, in, out);
  c.encode_backward(ex, fwd, in, out);
};
template <class C>
concept parameters = requires(C& c, parameter_probe f) { c.visit_parameters(f); };
}  // namespace requirement
}  // namespace compress

/// Encodes tensors into payloads and back, with the matching gradient rule; see compress/concepts.hpp.
template <class C>
concept Compressor = compress::requirement::shapes<C> && compress::requirement::forward<C> &&
                     compress::requirement::backward<C> && compress::requirement::parameters<C>;

/// static_assert(check_compressor<C>()) names the first requirement C misses, in one readable message.
template <class C>
consteval bool check_compressor() {
  namespace r = compress::requirement;
  if constexpr (!r::shapes<C>) {
    static_assert(dependent_false<C>,
                  "`compressor` does not satisfy subspace::Compressor: missing `payload_shape(shape) const -> "
                  "shape` or `wire_bytes(shape, std::size_t element_bytes) const -> std::size_t`");
    return false;
  } else if constexpr (!r::forward<C>) {
    static_assert(dependent_false<C>,
                  "`compressor` does not satisfy subspace::Compressor: missing `encode(ex, view<const T, S> x, "
                  "view<T, S> payload)` or `decode(ex, view<const T, S> payload, view<T, S> x_hat)`");
    return false;
  } else if constexpr (!r::backward<C>) {
    static_assert(dependent_false<C>,
                  "`compressor` does not satisfy subspace::Compressor: missing `decode_backward(ex, payload, "
                  "grad_x_hat, grad_payload)` or `encode_backward(ex, x, grad_payload, grad_x)`");
    return false;
  } else if constexpr (!r::parameters<C>) {
    static_assert(dependent_false<C>,
                  "`compressor` does not satisfy subspace::Compressor: missing `visit_parameters(f)` (a "
                  "compressor without trainable parameters never calls f)");
    return false;
  } else {
    return true;
  }
}

}  // namespace subspace

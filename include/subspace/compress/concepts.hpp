#pragma once
// The Compressor policy: what crosses a boundary (a pipeline stage's activations, a chunk's K/V) in place of the
// full tensor, and the matching rule for gradients.
//
// Forward, the sender encodes x into a payload and sends the payload; the receiver decodes it into x_hat.
// Backward, the receiver turns dL/dx_hat into dL/dpayload (decode_backward), sends that, and the sender turns it
// into dL/dx (encode_backward). Both backward functions are vector-Jacobian products; for a linear compressor
// (identity, a subspace projection) they are the adjoints of decode and encode.
//
// Operands. The sender's side is a compress::boundary{x, tokens}: x (e.g. the residual stream [N, d]) and the
// token ids of x's rows ([N] int32, one per row — rows(x.shape()) — in x's memory space; a side input the
// compressor may use or ignore). A compress::payload{values, tokens} is what travels: values of
// payload_shape(x), and, when the compressor declares `static constexpr bool sends_tokens = true`, the token ids
// of x's rows (encode copies them there, so the receiver can rebuild a token-dependent term); otherwise
// payload.tokens is empty and unused. Gradients have no token part: dL/dpayload is a view of payload_shape(x).
//
// Requirements (checked with exec::host on host-space float views and a store of float values and gradients):
//
//   c.payload_shape(shape x) -> shape                  the extents of payload.values for an input of extents x
//   c.wire_bytes(shape x, std::size_t element_bytes)   bytes one encoded x puts on the wire when payload values
//       -> std::size_t                                   travel with element_bytes each: exactly payload
//                                                        elements × element_bytes + a side channel that does
//                                                        not depend on element_bytes (0 for a dense payload;
//                                                        2 or 4 · rows(x) for the token ids of a compressor
//                                                        that sends them, as uint16 or uint32 by vocabulary
//                                                        size; e.g. rotation coefficients in fp32)
//   c.declare_parameters(store)                        declares the compressor's trainable tensors (see below)
//   c.encode(ex, boundary<const T, S> in,              in.x -> out.values (and out.tokens when it sends them)
//       payload<T, S> out, params)
//   c.decode(ex, payload<const T, S> in,               in -> x_hat
//       view<T, S> x_hat, params)
//   c.decode_backward(ex, payload<const T, S> in,      grad_payload = (d decode / d values)ᵀ · grad_x_hat, at the
//       view<const T, S> grad_x_hat,                     payload decode saw; += into the parameter gradients
//       view<T, S> grad_payload, params)
//   c.encode_backward(ex, boundary<const T, S> in,     grad_x = (d encode / d x)ᵀ · grad_payload, at the input
//       view<const T, S> grad_payload,                   encode saw; += into the parameter gradients
//       view<T, S> grad_x, params)
//
// Tensor outputs are overwritten. The forward inputs passed to the backward functions let nonlinear compressors
// (a rotation chosen from the data) recompute what they need; linear ones ignore them. Shape mismatches raise
// subspace::invalid_argument.
//
// Trainable parameters live in the rank's parameter store (nn::parameter_store), not in the compressor. The
// trainer calls c.declare_parameters(store) once, before training: the compressor adds each tensor with
// store.add(parameter_info{name, shape, decay, init}) and keeps the index it returns (identity declares
// nothing). `init` gives the initial values (std > 0: normal draws from the Philox stream `init.stream`; else the
// constant), which the trainer sets with the model's. Every encode/decode/backward call receives the store as
// `params` (any type with value(i) and grad(i) views in the executor's space; value and gradient element types
// may differ from T, e.g. bf16 values and fp32 gradients on CUDA): the compressor reads values there, and the
// backward functions ACCUMULATE (+=) into grad(i) (a compressor runs once per micro-batch and per boundary). The
// optimizer, the gradient all-reduce, clipping and checkpoints then treat those tensors like the model's.
//
// Optional: `static constexpr bool is_linear = true;` declares encode and decode linear in their tensor inputs;
// the conformance suite then also checks the adjoint identities <decode(p), g> = <p, decode_backward(g)> and
// <encode(x), q> = <x, encode_backward(q)>.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../core/executor.hpp"
#include "../core/parameter.hpp"
#include "../core/tensor.hpp"

namespace subspace {
namespace compress {

/// One token id per row of a tensor of extents x: the product of every extent but the last (1 for rank 0).
inline std::int64_t rows(const shape& x) {
  std::int64_t n = 1;
  for (int i = 0; i + 1 < x.rank; ++i) n *= x[i];
  return n;
}

/// The sender's side of a boundary: the tensor x and the token ids of its rows ([rows(x)], x's memory space;
/// empty when the caller has none).
template <class T, class S>
struct boundary {
  view<T, S> x;
  view<const std::int32_t, S> tokens{};
};
template <class T, class S>
boundary(view<T, S>) -> boundary<T, S>;
template <class T, class S>
boundary(view<T, S>, std::type_identity_t<view<const std::int32_t, S>>) -> boundary<T, S>;

/// What crosses the wire: values of payload_shape(x) and, for a compressor that sends them, the token ids of
/// x's rows ([rows(x)]; empty otherwise). The tokens are const exactly when the values are.
template <class T, class S>
struct payload {
  using token_type = std::conditional_t<std::is_const_v<T>, const std::int32_t, std::int32_t>;
  view<T, S> values;
  view<token_type, S> tokens{};

  /// The same payload, read-only.
  template <class U>
    requires(std::is_same_v<U, const T> && !std::is_same_v<U, T>)
  operator payload<U, S>() const {  // NOLINT: implicit, like view's
    return {values, tokens};
  }
};
template <class T, class S>
payload(view<T, S>) -> payload<T, S>;
template <class T, class S>
payload(view<T, S>, std::type_identity_t<view<typename payload<T, S>::token_type, S>>) -> payload<T, S>;

/// Store indices [first, last): the tensors a compressor declared.
struct parameter_range {
  std::size_t first = 0, last = 0;
  bool empty() const { return first == last; }
  std::size_t size() const { return last - first; }
};

/// Calls c.declare_parameters(store) and returns the indices of the tensors it added.
template <class C, class Store>
parameter_range declare(C& c, Store& store) {
  const std::size_t first = store.size();
  c.declare_parameters(store);
  return {first, store.size()};
}

/// True when C declares `static constexpr bool is_linear = true`.
template <class C>
inline constexpr bool is_linear_v = [] {
  if constexpr (requires { C::is_linear; }) {
    return bool(C::is_linear);
  } else {
    return false;
  }
}();

/// True when C declares `static constexpr bool sends_tokens = true`: its payloads carry the token ids.
template <class C>
inline constexpr bool sends_tokens_v = [] {
  if constexpr (requires { C::sends_tokens; }) {
    return bool(C::sends_tokens);
  } else {
    return false;
  }
}();

namespace requirement {
using in_t = view<const float, host_space>;
using out_t = view<float, host_space>;
using boundary_t = boundary<const float, host_space>;
using payload_in_t = payload<const float, host_space>;
using payload_out_t = payload<float, host_space>;

/// The parameter store the concept check passes (declarations only): add, size, value(i) and grad(i).
struct store_probe {
  std::size_t add(parameter_info);
  std::size_t size() const;
  view<float, host_space> value(std::size_t);
  view<float, host_space> grad(std::size_t);
};

template <class C>
concept shapes = requires(const C& c, const shape& s, std::size_t element_bytes) {
  { c.payload_shape(s) } -> std::same_as<shape>;
  { c.wire_bytes(s, element_bytes) } -> std::convertible_to<std::size_t>;
};
template <class C>
concept parameters = requires(C& c, store_probe& store) { c.declare_parameters(store); };
template <class C>
concept forward = requires(C& c, const exec::host& ex, boundary_t x, payload_out_t p_out, payload_in_t p_in, out_t out,
                           store_probe& params) {
  c.encode(ex, x, p_out, params);
  c.decode(ex, p_in, out, params);
};
template <class C>
concept backward =
    requires(C& c, const exec::host& ex, boundary_t x, payload_in_t p, in_t in, out_t out, store_probe& params) {
      c.decode_backward(ex, p, in, out, params);
      c.encode_backward(ex, x, in, out, params);
    };
}  // namespace requirement
}  // namespace compress

/// Encodes tensors into payloads and back, with the matching gradient rule; see compress/concepts.hpp.
template <class C>
concept Compressor = compress::requirement::shapes<C> && compress::requirement::parameters<C> &&
                     compress::requirement::forward<C> && compress::requirement::backward<C>;

/// static_assert(check_compressor<C>()) names the first requirement C misses, in one readable message.
template <class C>
consteval bool check_compressor() {
  namespace r = compress::requirement;
  if constexpr (!r::shapes<C>) {
    static_assert(dependent_false<C>,
                  "`compressor` does not satisfy subspace::Compressor: missing `payload_shape(shape) const -> "
                  "shape` or `wire_bytes(shape, std::size_t element_bytes) const -> std::size_t`");
    return false;
  } else if constexpr (!r::parameters<C>) {
    static_assert(dependent_false<C>,
                  "`compressor` does not satisfy subspace::Compressor: missing `declare_parameters(store)` (a "
                  "compressor without trainable parameters declares nothing)");
    return false;
  } else if constexpr (!r::forward<C>) {
    static_assert(dependent_false<C>,
                  "`compressor` does not satisfy subspace::Compressor: missing `encode(ex, compress::boundary<const "
                  "T, S> in, compress::payload<T, S> out, params)` or `decode(ex, compress::payload<const T, S> in, "
                  "view<T, S> x_hat, params)`");
    return false;
  } else if constexpr (!r::backward<C>) {
    static_assert(dependent_false<C>,
                  "`compressor` does not satisfy subspace::Compressor: missing `decode_backward(ex, payload, "
                  "grad_x_hat, grad_payload, params)` or `encode_backward(ex, boundary, grad_payload, grad_x, "
                  "params)`");
    return false;
  } else {
    return true;
  }
}

}  // namespace subspace

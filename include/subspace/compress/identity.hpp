#pragma once
// compress::identity: sends the tensor as it is. The payload is x (no token ids); every function is a copy; the
// wire carries every element; no trainable parameters. The baseline every other compressor is measured against.

#include <cstddef>
#include <string>
#include <type_traits>

#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "concepts.hpp"

namespace subspace::compress {

struct identity {
  static constexpr bool is_linear = true;

  shape payload_shape(const shape& x) const { return x; }
  std::size_t wire_bytes(const shape& x, std::size_t element_bytes) const {
    return std::size_t(x.numel()) * element_bytes;
  }
  /// No trainable parameters.
  template <class Store>
  void declare_parameters(Store&) const {}

  // Inputs may be views of const or mutable elements; outputs have the same element type. The parameter store
  // is not read.

  /// payload = x. Works with any executor that can copy between the two views (exec::host; exec::cuda in nvcc
  /// translation units).
  template <class Exec, class In, class T, class S, class Params>
    requires std::is_same_v<std::remove_const_t<In>, T>
  void encode(const Exec& ex, boundary<In, S> in, payload<T, S> out, Params&) const {
    pass(ex, in.x, out.values, "encode");
  }
  /// x_hat = payload.
  template <class Exec, class In, class T, class S, class Params>
    requires std::is_same_v<std::remove_const_t<In>, T>
  void decode(const Exec& ex, payload<In, S> in, view<T, S> x_hat, Params&) const {
    pass(ex, in.values, x_hat, "decode");
  }
  /// grad_payload = grad_x_hat.
  template <class Exec, class Fwd, class In, class T, class S, class Params>
    requires std::is_same_v<std::remove_const_t<In>, T> && std::is_same_v<std::remove_const_t<Fwd>, T>
  void decode_backward(const Exec& ex, payload<Fwd, S> /*in*/, view<In, S> grad_x_hat, view<T, S> grad_payload,
                       Params&) const {
    pass(ex, grad_x_hat, grad_payload, "decode_backward");
  }
  /// grad_x = grad_payload.
  template <class Exec, class Fwd, class In, class T, class S, class Params>
    requires std::is_same_v<std::remove_const_t<In>, T> && std::is_same_v<std::remove_const_t<Fwd>, T>
  void encode_backward(const Exec& ex, boundary<Fwd, S> /*in*/, view<In, S> grad_payload, view<T, S> grad_x,
                       Params&) const {
    pass(ex, grad_payload, grad_x, "encode_backward");
  }

 private:
  template <class Exec, class In, class T, class S>
  static void pass(const Exec& ex, view<In, S> in, view<T, S> out, const char* op) {
    require(in.shape() == out.shape(), [&] {
      return std::string("compress::identity::") + op + ": shapes differ: " + to_string(in.shape()) + " vs " +
             to_string(out.shape());
    });
    copy(ex, in, out);
  }
};

static_assert(Compressor<identity>);

}  // namespace subspace::compress

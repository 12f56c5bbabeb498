#pragma once
// Argument checks shared by the Llama layer kernels (embedding, norm, rope, swiglu): every failure throws
// invalid_argument naming the operation, the operand and both shapes, as docs/llama-kernels.md asks.

#include <cstdint>
#include <source_location>
#include <string>

#include "../../core/error.hpp"
#include "../../core/tensor.hpp"

namespace subspace::detail::layer {

/// Throws unless `v` has exactly shape `want`: "<op>: <operand> has shape [..], expected [..]".
template <class V>
void require_shape(const V& v, const shape& want, const char* op, const char* operand,
                   const std::source_location& loc = std::source_location::current()) {
  const auto message = [&] {
    return std::string(op) + ": " + operand + " has shape " + to_string(v.shape()) + ", expected " + to_string(want);
  };
  require(v.shape() == want, message, loc);
}

/// Throws unless `v` has rank `r`.
template <class V>
void require_rank(const V& v, int r, const char* op, const char* operand,
                  const std::source_location& loc = std::source_location::current()) {
  const auto message = [&] {
    return std::string(op) + ": " + operand + " must have rank " + std::to_string(r) + ", got shape " +
           to_string(v.shape());
  };
  require(v.rank() == r, message, loc);
}

/// Throws unless `v` is dense and row-major (the layer kernels address flat rows).
template <class V>
void require_contiguous(const V& v, const char* op, const char* operand,
                        const std::source_location& loc = std::source_location::current()) {
  const auto message = [&] {
    return std::string(op) + ": " + operand + " must be contiguous; got a strided view of shape " +
           to_string(v.shape());
  };
  require(v.is_contiguous(), message, loc);
}

/// A view with its name in messages.
template <class V>
struct operand {
  const V& v;
  const char* name;
};
template <class V>
operand(const V&, const char*) -> operand<V>;

/// Throws unless every operand has shape `want` and is contiguous.
template <class... V>
void require_all(const shape& want, const char* op, const operand<V>&... ops) {
  (
      [&] {
        require_shape(ops.v, want, op, ops.name);
        require_contiguous(ops.v, op, ops.name);
      }(),
      ...);
}

}  // namespace subspace::detail::layer

#pragma once
// K/V compression for context-parallel attention: what a rank sends of its rows' keys and values, and the
// matching rule for their gradients (docs/context.md). The second role of a Compressor policy, beside the stage
// boundaries of compress/concepts.hpp: a compressor that can compress K/V gives each attention layer a codec,
//
//   compressor.kv_codec<T, Space>(site) -> codec            site: the layer, the model configuration and the
//                                                            parameter store (the codec may declare tensors there)
//
// and compress::identity gives every layer compress::kv_identity (K and V as they are).
//
// A codec works on one rank's rows of a micro-batch, described by a kv_rows: B sequences of `chunks` chunks of
// `chunk_rows` rows each (the layout's compression unit), K and V [B, S, Hkv, hd] with S = chunks · chunk_rows.
// K arrives before RoPE: receivers rotate what they rebuild at the owner's positions. The payload is two flat
// buffers, values (the activation type T) and side (accum_t<T>, e.g. per-chunk rotation coefficients in fp32):
//
//   codec.payload_size(rows) -> kv_payload_size         {values, side} element counts
//   codec.encode(ex, rows, k, v, values, side)          the owner: K, V -> payload
//   codec.decode(ex, rows, values, side, k_hat, v_hat)  every rank (the owner too): payload -> K̂, V̂
//   codec.decode_backward(ex, rows, values, side,       a receiver: dK̂, dV̂ -> its part of d(payload), written
//       dk_hat, dv_hat, grad_values, grad_side)           (overwritten); the parts of every rank are summed
//   codec.encode_backward(ex, rows, k, v, values, side, the owner: the summed d(payload) -> dK, dV (overwritten);
//       grad_values, grad_side, dk, dv)                   += into the gradients of the codec's own tensors
//
// A codec keeps no state between calls beyond its tables, so the backward functions receive the forward's inputs.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "../kernels/elementwise.hpp"
#include "identity.hpp"

namespace subspace::compress {

/// One rank's rows of a micro-batch as a K/V codec sees them (see the top of this file).
struct kv_rows {
  std::int64_t batch = 0, chunks = 0, chunk_rows = 0, kv_heads = 0, head_dim = 0;
  std::int64_t rows() const { return chunks * chunk_rows; }
  std::int64_t kv_dim() const { return kv_heads * head_dim; }
  /// Elements of K (or V): B · S · Hkv · hd.
  std::int64_t elements() const { return batch * rows() * kv_dim(); }
  shape kv_shape() const { return shape{batch, rows(), kv_heads, head_dim}; }
};

/// Element counts of a payload: `values` of the activation type, `side` of its accumulation type.
struct kv_payload_size {
  std::int64_t values = 0, side = 0;
  friend bool operator==(const kv_payload_size&, const kv_payload_size&) = default;
};

/// K and V as they are: values = [K; V], no side channel.
struct kv_identity {
  kv_payload_size payload_size(const kv_rows& r) const { return {2 * r.elements(), 0}; }

  template <class Exec, class T, class A, class S>
  void encode(const Exec& ex, const kv_rows& r, view<const T, S> k, view<const T, S> v, view<T, S> values,
              view<A, S>) const {
    copy(ex, k, first(values, r));
    copy(ex, v, second(values, r));
  }
  template <class Exec, class T, class A, class S>
  void decode(const Exec& ex, const kv_rows& r, view<const T, S> values, view<const A, S>, view<T, S> k_hat,
              view<T, S> v_hat) const {
    copy(ex, first(values, r), k_hat);
    copy(ex, second(values, r), v_hat);
  }
  template <class Exec, class T, class A, class S>
  void decode_backward(const Exec& ex, const kv_rows& r, view<const T, S>, view<const A, S>, view<const T, S> dk_hat,
                       view<const T, S> dv_hat, view<T, S> grad_values, view<A, S>) const {
    copy(ex, dk_hat, first(grad_values, r));
    copy(ex, dv_hat, second(grad_values, r));
  }
  template <class Exec, class T, class A, class S>
  void encode_backward(const Exec& ex, const kv_rows& r, view<const T, S>, view<const T, S>, view<const T, S>,
                       view<const A, S>, view<const T, S> grad_values, view<const A, S>, view<T, S> dk,
                       view<T, S> dv) const {
    copy(ex, first(grad_values, r), dk);
    copy(ex, second(grad_values, r), dv);
  }

 private:
  template <class U, class S>
  static view<U, S> first(view<U, S> values, const kv_rows& r) {
    return view<U, S>(values.data(), r.kv_shape());
  }
  template <class U, class S>
  static view<U, S> second(view<U, S> values, const kv_rows& r) {
    return view<U, S>(values.data() + r.elements(), r.kv_shape());
  }
};

/// C can compress the K/V of context-parallel attention: compress::identity (dense), or a compressor tagged
/// `static constexpr bool compresses_kv = true` with kv_codec<T, Space>(site).
template <class C>
concept KVCompressor = std::is_same_v<C, identity> || (requires {
                         { C::compresses_kv } -> std::convertible_to<bool>;
                       } && bool(C::compresses_kv));

/// The codec `compressor` gives the attention of the layer at `site`: kv_identity for compress::identity, else
/// compressor.kv_codec<T, Space>(site).
template <class T, class Space, class Compressor, class Site>
auto kv_codec_for(Compressor& compressor, const Site& site) {
  if constexpr (std::is_same_v<std::remove_cvref_t<Compressor>, identity>) return kv_identity{};
  else return compressor.template kv_codec<T, Space>(site);
}

}  // namespace subspace::compress

#pragma once
// nn::subspace_blocks: the block policies of a Subspace Network (docs/subspace-networks.md) — a Llama whose
// layers before the last pipeline stage write into one fixed k-dimensional subspace span(U) of the residual
// stream, so that every stage boundary is exactly k coefficients and a token id (compress::subspace_projection).
//
// Constrained layers are those below `unconstrained_from`, the first layer of the last stage, and the embedding
// unless that is 0 (a single stage: the plain model). There:
//   embedding    the learned E [V, k] (declared in place of embed_tokens): c = E[t], x = E_fix[t] + c·Uᵀ
//   projection   o_proj and down_proj write y = (x·Zᵀ)·Uᵀ, Z [k, in] declared in place of W [d, in]
//                (reparameterised, the default); or, projected, y = (x·Wᵀ)·U·Uᵀ with the full W, re-projected
//                W ← U·Uᵀ·W after every optimizer step
//   residual     the stream is kept as c (accum_t<T>, k per token, per micro-batch slot): c ← c + y·U, and the
//                next sublayer's input is rebuilt, x = E_fix[t] + c·Uᵀ; backward projects dL/dy onto span(U)
//                (the Jacobian of out = E + P(x + y − E)); stage entry projects the incoming stream onto c, stage
//                exit rebuilds it from c at boundary precision
// Layers from `unconstrained_from` on are dense Llama layers (the last stage, which ends in the untied head).
//
// Why keeping c matters: E_fix[t] has entries of size ~1 while the learned part c·Uᵀ is small, so x − E_fix
// computed from a bf16 x would lose most of c's bits. Backward needs no c (the block keeps its materialised
// sublayer inputs).

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../compress/subspace_projection.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/parameter.hpp"
#include "../core/tensor.hpp"
#include "../kernels/elementwise.hpp"
#include "../kernels/embedding.hpp"
#include "../kernels/fixed_embedding.hpp"
#include "../kernels/gemm.hpp"
#include "../kernels/subspace_projection.hpp"
#include "block_policies.hpp"

namespace subspace::nn {

/// How a constrained output projection is parameterised.
enum class subspace_variant {
  reparameterised,  // Z [k, in]: y = (x·Zᵀ)·Uᵀ
  projected,        // W [d, in] kept at U·Uᵀ·W: y = (x·Wᵀ)·U·Uᵀ
};

namespace detail::subspace {

/// A tensor resized to `s` when its extents differ (scratch that follows the batch geometry).
template <class T, class S>
view<T, S> sized(tensor<T, S>& t, const shape& s) {
  if (t.data() == nullptr || t.shape() != s) t = tensor<T, S>(s);
  return t.v();
}

/// The stream coefficients of every activation slot, shared by the residual and embedding policies of a model.
template <class B, class S>
struct stream_state {
  std::vector<tensor<B, S>> coefficients;
  view<B, S> at(std::size_t slot, const shape& s) {
    if (coefficients.size() <= slot) coefficients.resize(slot + 1);
    return sized(coefficients[slot], s);
  }
};

template <class T, class S>
view<const T, S> ro(view<T, S> v) {
  return v;
}

}  // namespace detail::subspace

/// The output projection of a layer (see the top of this file); dense when not constrained.
template <class T, class Space>
class subspace_projection_policy {
 public:
  subspace_projection_policy(compress::subspace_projection codec, bool constrained, subspace_variant variant,
                             std::string weight_name)
      : codec_(std::move(codec)), constrained_(constrained), variant_(variant), weight_name_(std::move(weight_name)) {}

  template <class Exec>
  void forward(const Exec& ex, view<const T, Space> x, view<const T, Space> w, view<T, Space> y) {
    if (!constrained_) return dense_projection{}.forward<Exec, T>(ex, x, w, y);
    const view<T, Space> z = detail::subspace::sized(narrow_, shape{x.dim(0), codec_.k()});
    if (variant_ == subspace_variant::reparameterised) {
      gemm(ex, op::none, op::transpose, 1.0f, x, w, 0.0f, z);  // z = x·Zᵀ
    } else {
      gemm(ex, op::none, op::transpose, 1.0f, x, w, 0.0f, y);  // x·Wᵀ, then z = (x·Wᵀ)·U
      subspace_coefficients(ex, detail::subspace::ro(y), basis(ex), z);
    }
    subspace_expand(ex, detail::subspace::ro(z), basis(ex), y);  // y = z·Uᵀ
  }

  template <class Exec, class G>
  void backward(const Exec& ex, view<const T, Space> x, view<const T, Space> w, view<const T, Space> dy,
                view<T, Space> dx, view<G, Space> dw) {
    backward_input(ex, x, w, dy, dx);
    backward_weight(ex, x, dy, dw);
  }
  /// dx: reparameterised dz·Z with dz = dy·U; projected (dz·Uᵀ)·W.
  template <class Exec>
  void backward_input(const Exec& ex, view<const T, Space> x, view<const T, Space> w, view<const T, Space> dy,
                      view<T, Space> dx) {
    if (!constrained_) return dense_projection{}.backward_input<Exec, T>(ex, x, w, dy, dx);
    gemm(ex, op::none, op::none, 1.0f, product_gradient(ex, dy), w, 0.0f, dx);
  }
  /// dZ += dzᵀ·x (reparameterised) or dW += (dz·Uᵀ)ᵀ·x (projected).
  template <class Exec, class G>
  void backward_weight(const Exec& ex, view<const T, Space> x, view<const T, Space> dy, view<G, Space> dw) {
    if (!constrained_) return dense_projection{}.backward_weight<Exec, T, G>(ex, x, dy, dw);
    gemm(ex, op::transpose, op::none, 1.0f, product_gradient(ex, dy), x, 1.0f, dw);
  }

  /// Projected variant: W ← U·(Uᵀ·W) on the store's values after every optimizer step.
  template <class Exec, class Store>
  void after_step(const Exec& ex, Store& store) {
    if (!constrained_ || variant_ != subspace_variant::projected) return;
    const auto index = store.find(weight_name_);
    require(index.has_value(), [&] { return "nn::subspace_blocks: no tensor '" + weight_name_ + "' in the store"; });
    const view<T, Space> w = store.value(*index);  // [d, in]
    const view<T, Space> wt = detail::subspace::sized(wide_, shape{w.dim(1), w.dim(0)});
    copy(ex, detail::subspace::ro(w).transposed(), wt);  // Wᵀ [in, d]
    const view<T, Space> c = detail::subspace::sized(narrow_, shape{w.dim(1), codec_.k()});
    subspace_coefficients(ex, detail::subspace::ro(wt), basis(ex), c);  // Wᵀ·U
    subspace_expand(ex, detail::subspace::ro(c), basis(ex), wt);        // Wᵀ·U·Uᵀ
    copy(ex, detail::subspace::ro(wt).transposed(), w);
  }

 private:
  template <class Exec>
  auto basis(const Exec& ex) const {
    return codec_.basis_on<T>(ex);
  }
  /// dL/d(the product with the parameter): dz = dy·U [N, k] (reparameterised), or dz·Uᵀ [N, d] (projected: y =
  /// (x·Wᵀ)·U·Uᵀ).
  template <class Exec>
  view<const T, Space> product_gradient(const Exec& ex, view<const T, Space> dy) {
    const view<T, Space> dz = detail::subspace::sized(narrow_, shape{dy.dim(0), codec_.k()});
    subspace_coefficients(ex, dy, basis(ex), dz);
    if (variant_ == subspace_variant::reparameterised) return dz;
    const view<T, Space> dyp = detail::subspace::sized(wide_, dy.shape());
    subspace_expand(ex, detail::subspace::ro(dz), basis(ex), dyp);
    return dyp;
  }

  compress::subspace_projection codec_;
  bool constrained_;
  subspace_variant variant_;
  std::string weight_name_;
  tensor<T, Space> narrow_, wide_;  // [N, k] and [N, d] scratch
};

/// The residual stream of a layer kept as coefficients (see the top of this file); dense when not constrained.
template <class T, class Space>
class subspace_residual_policy {
 public:
  using boundary_type = accum_t<T>;
  using state_type = detail::subspace::stream_state<boundary_type, Space>;

  subspace_residual_policy(compress::subspace_projection codec, bool constrained, std::shared_ptr<state_type> state)
      : codec_(std::move(codec)), constrained_(constrained), state_(std::move(state)) {}

  /// c ← c + y·U; y ← E_fix[t] + c·Uᵀ.
  template <class Exec>
  void forward(const Exec& ex, const stream_site<Space>& site, view<const T, Space> x, view<T, Space> y) {
    if (!constrained_) return dense_residual{}.forward<Exec, T>(ex, site, x, y);
    const view<boundary_type, Space> c = coefficients(site, y.dim(0));
    const view<T, Space> z = detail::subspace::sized(narrow_, c.shape());
    subspace_coefficients(ex, detail::subspace::ro(y), basis<T>(ex), z);
    if constexpr (std::is_same_v<T, boundary_type>) {
      axpy(ex, 1.0f, detail::subspace::ro(z), c);
    } else {
      const view<boundary_type, Space> zb = detail::subspace::sized(update_, c.shape());
      cast(ex, detail::subspace::ro(z), zb);
      axpy(ex, 1.0f, detail::subspace::ro(zb), c);
    }
    rebuild(ex, site, c, y);
  }
  /// dy ← dy·U·Uᵀ.
  template <class Exec>
  void backward(const Exec& ex, const stream_site<Space>& site, view<T, Space> dy) {
    if (!constrained_) return dense_residual{}.backward<Exec, T>(ex, site, dy);
    const view<T, Space> g = detail::subspace::sized(narrow_, shape{dy.dim(0), codec_.k()});
    subspace_coefficients(ex, detail::subspace::ro(dy), basis<T>(ex), g);
    subspace_expand(ex, detail::subspace::ro(g), basis<T>(ex), dy);
  }
  /// Stage entry: c = (in − E_fix[t])·U, x = E_fix[t] + c·Uᵀ.
  template <class Exec>
  void enter(const Exec& ex, const stream_site<Space>& site, view<const boundary_type, Space> in, view<T, Space> x) {
    if (!constrained_) return convert(ex, in, x);
    const view<boundary_type, Space> c = coefficients(site, in.dim(0));
    subspace_project(ex, codec_.fixed_embedding_on(ex), site.tokens, in, basis<boundary_type>(ex), c);
    rebuild(ex, site, c, x);
  }
  /// Stage exit: out = E_fix[t] + c·Uᵀ at boundary precision.
  template <class Exec>
  void leave(const Exec& ex, const stream_site<Space>& site, view<const T, Space> x, view<boundary_type, Space> out) {
    if (!constrained_) return convert(ex, x, out);
    const view<boundary_type, Space> c = coefficients(site, x.dim(0));
    subspace_rebuild(ex, codec_.fixed_embedding_on(ex), site.tokens, detail::subspace::ro(c), basis<boundary_type>(ex),
                     out);
  }

  const compress::subspace_projection& codec() const { return codec_; }

  /// The coefficients of the micro-batch in `site.slot` ([rows, k]).
  view<boundary_type, Space> coefficients(const stream_site<Space>& site, std::int64_t rows) {
    return state_->at(site.slot, shape{rows, codec_.k()});
  }

  /// x (T) = E_fix[t] + c·Uᵀ, c at boundary precision.
  template <class Exec>
  void rebuild(const Exec& ex, const stream_site<Space>& site, view<boundary_type, Space> c, view<T, Space> x) {
    if constexpr (std::is_same_v<T, boundary_type>) {
      subspace_rebuild(ex, codec_.fixed_embedding_on(ex), site.tokens, detail::subspace::ro(c), basis<T>(ex), x);
    } else {
      const view<T, Space> ct = detail::subspace::sized(narrow_, c.shape());
      cast(ex, detail::subspace::ro(c), ct);  // x is rounded to T anyway, E_fix dominating its magnitude
      subspace_rebuild(ex, codec_.fixed_embedding_on(ex), site.tokens, detail::subspace::ro(ct), basis<T>(ex), x);
    }
  }

 private:
  template <class U, class Exec>
  auto basis(const Exec& ex) const {
    return codec_.basis_on<U>(ex);
  }
  template <class Exec, class X, class Y>
  static void convert(const Exec& ex, view<const X, Space> x, view<Y, Space> y) {
    if constexpr (std::is_same_v<X, Y>) copy(ex, x, y);
    else cast(ex, x, y);
  }

  compress::subspace_projection codec_;
  bool constrained_;
  std::shared_ptr<state_type> state_;
  tensor<T, Space> narrow_;              // [N, k] scratch
  tensor<boundary_type, Space> update_;  // [N, k] the update at boundary precision (T narrower than it)
};

/// The embedding of a constrained model: c = E[t] into the slot's coefficients, x = E_fix[t] + c·Uᵀ; dense (the
/// token table) when not constrained.
template <class T, class Space>
class subspace_embedding_policy {
 public:
  using residual_type = subspace_residual_policy<T, Space>;

  subspace_embedding_policy(bool constrained, residual_type stream)
      : constrained_(constrained), stream_(std::move(stream)) {}

  template <class Exec>
  void forward(const Exec& ex, const stream_site<Space>& site, view<const T, Space> weight, view<T, Space> x) {
    if (!constrained_) return token_embedding{}.forward<Exec, T>(ex, site, weight, x);
    const auto c = stream_.coefficients(site, x.dim(0));
    if constexpr (std::is_same_v<T, typename residual_type::boundary_type>) {
      embedding_forward(ex, site.tokens, weight, c);
    } else {
      const view<T, Space> e = detail::subspace::sized(narrow_, c.shape());
      embedding_forward(ex, site.tokens, weight, e);
      cast(ex, detail::subspace::ro(e), c);
    }
    stream_.rebuild(ex, site, c, x);
  }
  /// dE[t] += dx·U.
  template <class Exec, class G>
  void backward(const Exec& ex, const stream_site<Space>& site, view<const T, Space> dx, view<G, Space> dweight) {
    if (!constrained_) return token_embedding{}.backward<Exec, T, G>(ex, site, dx, dweight);
    const view<T, Space> g = detail::subspace::sized(narrow_, shape{dx.dim(0), dweight.dim(1)});
    subspace_coefficients(ex, dx, basis(ex), g);
    embedding_backward(ex, site.tokens, detail::subspace::ro(g), dweight);
  }

 private:
  template <class Exec>
  auto basis(const Exec& ex) const {
    return stream_.codec().template basis_on<T>(ex);
  }

  bool constrained_;
  residual_type stream_;
  tensor<T, Space> narrow_;
};

/// The Blocks factory of a Subspace Network (see the top of this file): `codec` gives U and E_fix (the same tables
/// as the boundaries' compressor), layers below `unconstrained_from` are constrained.
class subspace_blocks {
 public:
  subspace_blocks(compress::subspace_projection codec, std::int64_t unconstrained_from,
                  subspace_variant variant = subspace_variant::reparameterised)
      : codec_(std::move(codec)), unconstrained_from_(unconstrained_from), variant_(variant) {
    require(unconstrained_from >= 0, [&] {
      return "nn::subspace_blocks: unconstrained_from must be a layer index >= 0, got " +
             std::to_string(unconstrained_from);
    });
  }

  const compress::subspace_projection& codec() const { return codec_; }
  std::int64_t unconstrained_from() const { return unconstrained_from_; }
  subspace_variant variant() const { return variant_; }
  /// Layer `layer` (-1: the embedding) writes into span(U): below the last stage, when there is more than one.
  bool constrained(std::int64_t layer) const { return unconstrained_from_ > 0 && layer < unconstrained_from_; }

  /// The tensors of constrained layers: Z [k, in] for o_proj and down_proj (reparameterised), E [V, k] for the
  /// embedding, N(0, 0.02²) each, from the dense tensor's stream.
  template <class Store>
  parameter_info parameter(const block_site<Store>& site, parameter_info info) const {
    if (!constrained(site.layer)) return info;
    check(site.config);
    const std::int64_t k = codec_.k();
    if (site.layer < 0 && ends_with(info.name, "embed_tokens.weight")) {
      info.name = "model.embed_tokens.subspace_weight";
      info.shape = shape{info.shape[0], k};
      info.init.std = 0.02f;
    } else if (variant_ == subspace_variant::reparameterised && is_output_projection(info.name)) {
      info.name = info.name.substr(0, info.name.size() - std::string(".weight").size()) + ".subspace_weight";
      info.shape = shape{k, info.shape[1]};
      info.init.std = 0.02f;
    }
    return info;
  }

  template <class Store>
  dense_attention attention(const block_site<Store>&) const {
    return {};
  }
  template <class Store>
  subspace_projection_policy<typename Store::value_type, typename Store::space> projection(
      const block_site<Store>& site, projection_site which) const {
    const std::string name =
        "model.layers." + std::to_string(site.layer) +
        (which == projection_site::attention_output ? ".self_attn.o_proj.weight" : ".mlp.down_proj.weight");
    return {codec_, constrained(site.layer), variant_, name};
  }
  template <class Store>
  subspace_residual_policy<typename Store::value_type, typename Store::space> residual(
      const block_site<Store>& site) const {
    return {codec_, constrained(site.layer), state<Store>()};
  }
  template <class Store>
  subspace_embedding_policy<typename Store::value_type, typename Store::space> embedding(
      const block_site<Store>& site) const {
    return {constrained(site.layer), residual(site)};
  }

 private:
  static bool ends_with(const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
  }
  static bool is_output_projection(const std::string& name) {
    return ends_with(name, ".self_attn.o_proj.weight") || ends_with(name, ".mlp.down_proj.weight");
  }
  void check(const llama_config& cfg) const {
    require(cfg.d_model == codec_.d_model() && cfg.vocab == codec_.vocab(), [&] {
      return "nn::subspace_blocks: the codec is for d_model " + std::to_string(codec_.d_model()) + ", vocab " +
             std::to_string(codec_.vocab()) + "; '" + cfg.name + "' has d_model " + std::to_string(cfg.d_model) +
             ", vocab " + std::to_string(cfg.vocab);
    });
  }

  /// The stream state the policies of one model share (one per memory space and type; made on first use).
  template <class Store>
  std::shared_ptr<detail::subspace::stream_state<accum_t<typename Store::value_type>, typename Store::space>> state()
      const {
    using state_type = detail::subspace::stream_state<accum_t<typename Store::value_type>, typename Store::space>;
    if (!state_) state_ = std::make_shared<state_type>();
    return std::static_pointer_cast<state_type>(state_);
  }

  compress::subspace_projection codec_;
  std::int64_t unconstrained_from_;
  subspace_variant variant_;
  mutable std::shared_ptr<void> state_;
};

/// Writes into `dense` (the parameter store of a plain nn::llama of the same configuration, allocated) the plain
/// Llama that computes what the Subspace Network with `ssn`'s tensors computes (a store of the whole constrained
/// model, or the union of its stages' tensors, made with `blocks`): the embedding E_fix + E·Uᵀ, each constrained
/// projection U·Z (reparameterised) or U·Uᵀ·W (projected), every other tensor as it is. A checkpoint of the
/// result is an ordinary Llama (Hugging Face's LlamaForCausalLM loads it). Host stores of float or double.
template <class SsnStore, class DenseStore>
void export_dense(const exec::host& ex, const subspace_blocks& blocks, SsnStore& ssn, DenseStore& dense) {
  using T = typename DenseStore::value_type;
  const compress::subspace_projection& codec = blocks.codec();
  const auto basis = codec.basis_on<T>(ex);
  const auto source = [&](const std::string& name) {
    const auto i = ssn.find(name);
    require(i.has_value(), [&] { return "nn::export_dense: the subspace model has no tensor '" + name + "'"; });
    return view<const typename SsnStore::value_type, host_space>(ssn.value(*i));
  };
  const auto factor_name = [](const std::string& name) {
    return name.substr(0, name.size() - std::string("weight").size()) + "subspace_weight";
  };
  for (std::size_t i = 0; i < dense.size(); ++i) {
    const std::string& name = dense.info(i).name;
    const view<T, host_space> out = dense.value(i);
    const bool projection = name.ends_with(".self_attn.o_proj.weight") || name.ends_with(".mlp.down_proj.weight");
    if (name == "model.embed_tokens.weight" && ssn.find(factor_name(name))) {
      // Row t of the plain table is E_fix[t] + E[t]·Uᵀ: the rebuild of coefficients E at tokens 0 .. V-1.
      const auto e = source(factor_name(name));
      host_tensor<std::int32_t> ids({e.dim(0)});
      for (std::int64_t t = 0; t < e.dim(0); ++t) ids.data()[t] = std::int32_t(t);
      host_tensor<T> coefficients(e.shape());
      cast(ex, e, coefficients.v());
      subspace_rebuild(ex, codec.fixed_embedding_on(ex), view<const std::int32_t, host_space>(ids.v()),
                       view<const T, host_space>(coefficients.v()), basis, out);
    } else if (projection && ssn.find(factor_name(name))) {
      gemm(ex, op::none, op::none, 1.0f, basis, source(factor_name(name)), 0.0f, out);  // U·Z
    } else if (projection && blocks.variant() == subspace_variant::projected &&
               blocks.constrained(std::stoll(name.substr(std::string("model.layers.").size())))) {
      const auto w = source(name);  // U·(Uᵀ·W)
      host_tensor<T> c({codec.k(), w.dim(1)});
      gemm(ex, op::transpose, op::none, 1.0f, basis, w, 0.0f, c.v());
      gemm(ex, op::none, op::none, 1.0f, basis, view<const T, host_space>(c.v()), 0.0f, out);
    } else {
      cast(ex, source(name), out);
    }
  }
}

}  // namespace subspace::nn

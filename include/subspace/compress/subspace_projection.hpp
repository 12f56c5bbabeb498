#pragma once
// compress::subspace_projection: the boundary of a subspace network (docs/subspace-networks.md). Upstream of the
// boundary every layer writes into one fixed k-dimensional subspace span(U) of the residual stream, so a row x of
// it is exactly E_fix[t] + c·Uᵀ, where t is the row's token id and E_fix a frozen random table that every stage
// regenerates. The payload is then c = (x - E_fix[t])·U [.., k] plus the token ids; decode rebuilds
// x = E_fix[t] + c·Uᵀ. Backward, decode_backward sends g = dL/dx·U and encode_backward returns g·Uᵀ.
//
// The maps are exact for x in the subspace form; for any other x, decode(encode(x)) = E_fix + (x - E_fix)·U·Uᵀ.
// They are affine, not linear (E_fix), so the compressor does not declare is_linear; its backward functions are
// the adjoints of the linear parts. No trainable parameters: the learned embedding and the factors of the
// constrained output projections live in the model.
//
// The wire: the coefficients travel in wire_dtype (fp32 by default; bf16; or `compute`, the activation type
// itself, for exactness tests) and encode / decode_backward round their outputs to it when it is narrower than the
// activation type, so a run computes with what a real wire would deliver. Token ids travel as uint16 when
// V <= 65535, else uint32: wire_bytes(x, element_bytes) = N·k·element_bytes + N·token_id_bytes(), N = rows(x).
//
// U (kernels/subspace_projection.hpp) and E_fix (kernels/fixed_embedding.hpp) are functions of their seeds; ranks
// compare basis_hash() and fixed_embedding_hash() at start-up. A compressor and its copies share the tables;
// device copies (U, and the E_fix table when materialised) are made on first use per device.
//
// Executors: exec::host with float or double activations; exec::cuda with float or bf16 in translation units
// compiled by nvcc (compress/detail/cuda/subspace_projection.cuh). Float64 activations use subspace_basis_fp64(U),
// the same subspace orthonormal to fp64 precision, so fp64 round trips are exact to ~1e-15; basis_on<T>(ex) gives
// the basis the maps use for T, which layers feeding this boundary should use too.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>

#include "../core/config.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "../kernels/fixed_embedding.hpp"
#include "../kernels/subspace_projection.hpp"
#include "concepts.hpp"

namespace subspace::compress {

/// The element type the coefficients travel in: the activation type itself, fp32, or bf16.
enum class wire_dtype { compute, fp32, bf16 };

inline const char* to_string(wire_dtype w) {
  return w == wire_dtype::compute ? "compute" : w == wire_dtype::fp32 ? "fp32" : "bf16";
}

/// The default subspace dimension: d / 100 for d >= 4096, else d / 50 (integer division), at least 8 and at most d.
constexpr std::int64_t default_subspace_rank(std::int64_t d_model) {
  const std::int64_t rule = d_model / (d_model >= 4096 ? 100 : 50);
  return std::min(d_model, std::max<std::int64_t>(8, rule));
}

struct subspace_projection_options {
  std::int64_t d_model = 0;                // d, the width of the residual stream
  std::int64_t vocab = 0;                  // V; token ids are in [0, V)
  std::int64_t k = 0;                      // the subspace dimension; 0: default_subspace_rank(d_model)
  std::uint64_t basis_seed = 1;            // U's draws (the same on every rank)
  std::uint64_t fixed_embedding_seed = 2;  // E_fix's draws (the same on every rank)
  wire_dtype wire = wire_dtype::fp32;
  bool materialise_fixed_embedding = false;  // keep a V x d fp32 E_fix table per memory space instead of
                                             // regenerating rows (same results bit for bit)
};

namespace detail {

/// What every copy of one compressor shares: the resolved options, U and the hashes (immutable), and the lazily
/// made copies per memory space (guarded).
struct subspace_tables {
  subspace_projection_options options;
  host_tensor<float> basis;        // U [d, k]
  host_tensor<double> basis_fp64;  // subspace_basis_fp64(U), for float64 activations
  std::uint64_t basis_hash = 0, fixed_embedding_hash = 0;

  mutable std::once_flag host_table_made;
  mutable host_tensor<float> host_table;  // E_fix [V, d] when materialised
  mutable std::mutex device_mutex;
  mutable std::map<int, std::shared_ptr<void>> on_device;  // per device: see the CUDA header
};

/// The executor-specific pieces of subspace_projection: U and E_fix in the executor's memory space, and the wire
/// rounding. Specialised for exec::host below and for exec::cuda in compress/detail/cuda/subspace_projection.cuh.
template <class Exec>
struct subspace_on {
  static_assert(dependent_false<Exec>,
                "compress::subspace_projection: no implementation for this executor (exec::host; exec::cuda in "
                "translation units compiled by nvcc, which include compress/detail/cuda/subspace_projection.cuh)");
};

template <>
struct subspace_on<exec::host> {
  template <class T>
  static auto basis(const subspace_tables& t, const exec::host&) {
    if constexpr (std::is_same_v<T, double>) return t.basis_fp64.v();
    else return t.basis.v();
  }

  static fixed_embedding<host_space> fixed(const subspace_tables& t, const exec::host& ex) {
    const subspace_projection_options& o = t.options;
    fixed_embedding<host_space> e{o.fixed_embedding_seed, o.vocab, o.d_model, {}};
    if (o.materialise_fixed_embedding) {
      std::call_once(t.host_table_made, [&] {
        t.host_table = host_tensor<float>({o.vocab, o.d_model});
        fill_fixed_embedding(ex, o.fixed_embedding_seed, t.host_table.v());
      });
      e.table = t.host_table.v();
    }
    return e;
  }

  /// values <- values rounded to the wire type, where that is narrower than T.
  template <class T>
  static void round_to_wire(wire_dtype wire, const exec::host&, view<T, host_space> values) {
    T* v = values.data();
    const std::int64_t n = values.numel();
    if (wire == wire_dtype::fp32 && sizeof(T) > sizeof(float))
      for (std::int64_t i = 0; i < n; ++i) v[i] = T(float(v[i]));
    if (wire == wire_dtype::bf16 && sizeof(T) > sizeof(bf16))
      for (std::int64_t i = 0; i < n; ++i) v[i] = convert<T>(convert<bf16>(v[i]));
  }
};

}  // namespace detail

class subspace_projection {
 public:
  static constexpr bool sends_tokens = true;

  /// Builds U and the hashes (host work of O(d k^2), once). Throws invalid_argument unless d >= 1,
  /// 1 <= V <= 2^31 - 1 and 1 <= k <= d.
  explicit subspace_projection(const subspace_projection_options& options) : tables_(make_tables(options)) {}

  // --- geometry and the wire ---------------------------------------------------------------------------------

  std::int64_t d_model() const { return tables_->options.d_model; }
  std::int64_t vocab() const { return tables_->options.vocab; }
  /// The subspace dimension k: the coefficients per row.
  std::int64_t k() const { return tables_->options.k; }
  wire_dtype wire() const { return tables_->options.wire; }
  /// The options as resolved (k filled in).
  const subspace_projection_options& options() const { return tables_->options; }

  /// x = [.., d] -> [.., k].
  shape payload_shape(const shape& x) const {
    require_rows_of(x, d_model(), "payload_shape", "x");
    shape p = x;
    p.dims[std::size_t(x.rank - 1)] = k();
    return p;
  }
  /// Bytes per token id on the wire: 2 (uint16) when V <= 65535, else 4 (uint32).
  std::size_t token_id_bytes() const { return vocab() <= 65535 ? 2 : 4; }
  /// Bytes per coefficient on the wire when the activations have compute_bytes per element.
  std::size_t wire_element_bytes(std::size_t compute_bytes) const {
    return wire() == wire_dtype::compute ? compute_bytes : wire() == wire_dtype::fp32 ? 4 : 2;
  }
  /// N·k·element_bytes + N·token_id_bytes() for N = rows(x).
  std::size_t wire_bytes(const shape& x, std::size_t element_bytes) const {
    return std::size_t(payload_shape(x).numel()) * element_bytes + std::size_t(rows(x)) * token_id_bytes();
  }
  /// No trainable parameters.
  template <class Store>
  void declare_parameters(Store&) const {}

  // --- the fixed tables ----------------------------------------------------------------------------------------

  std::uint64_t basis_seed() const { return tables_->options.basis_seed; }
  std::uint64_t fixed_embedding_seed() const { return tables_->options.fixed_embedding_seed; }
  /// U [d, k], fp32, on the host: the basis every rank builds and hashes.
  view<const float, host_space> basis() const { return tables_->basis.v(); }
  /// subspace_basis_fp64(U) [d, k] on the host: the same subspace, orthonormal to fp64 precision.
  view<const double, host_space> basis_fp64() const { return tables_->basis_fp64.v(); }
  /// The basis the maps use for activations of type T, in the executor's memory space: basis_fp64() for double,
  /// else U. On CUDA: the transposed view of a contiguous [k, d] device copy of U.
  template <class T, class Exec>
  auto basis_on(const Exec& ex) const {
    return detail::subspace_on<Exec>::template basis<T>(*tables_, ex);
  }
  /// E_fix as a kernel operand in the executor's memory space (with the table when materialised).
  template <class Exec>
  fixed_embedding<space_of_t<Exec>> fixed_embedding_on(const Exec& ex) const {
    return detail::subspace_on<Exec>::fixed(*tables_, ex);
  }
  /// subspace_basis_hash(U) and fixed_embedding_hash(seed, V, d): equal on every rank that built the same tables.
  std::uint64_t basis_hash() const { return tables_->basis_hash; }
  std::uint64_t fixed_embedding_hash() const { return tables_->fixed_embedding_hash; }

  // --- the Compressor functions ----------------------------------------------------------------------------
  // Views: x-shaped [.., d] and payload-shaped [.., k] tensors contiguous, token ids [rows(x)] in the same memory
  // space. Outputs are overwritten. The parameter store is not read.

  /// out.values = round_wire((x - E_fix[tokens])·U); out.tokens = in.tokens.
  template <class Exec, class In, class T, class S, class Params>
    requires std::is_same_v<std::remove_const_t<In>, T>
  void encode(const Exec& ex, boundary<In, S> in, payload<T, S> out, Params&) const {
    const auto x = flat_rows(in.x, d_model(), "encode", "x");
    const auto c = flat_rows(out.values, k(), "encode", "payload values");
    require_payload(in.x.shape(), out.values.shape(), "encode", "payload values");
    require_tokens(in.tokens, x.dim(0), "encode", "the boundary's token ids");
    require_tokens(out.tokens, x.dim(0), "encode", "the payload's token ids");
    subspace_project(ex, fixed_embedding_on(ex), in.tokens, view<const T, S>(x), basis_on<T>(ex), c);
    copy(ex, in.tokens, out.tokens);
    detail::subspace_on<Exec>::round_to_wire(wire(), ex, c);
  }
  /// x_hat = E_fix[in.tokens] + in.values·Uᵀ.
  template <class Exec, class In, class T, class S, class Params>
    requires std::is_same_v<std::remove_const_t<In>, T>
  void decode(const Exec& ex, payload<In, S> in, view<T, S> x_hat, Params&) const {
    const auto x = flat_rows(x_hat, d_model(), "decode", "x_hat");
    const auto c = flat_rows(in.values, k(), "decode", "payload values");
    require_payload(x_hat.shape(), in.values.shape(), "decode", "payload values");
    require_tokens(in.tokens, x.dim(0), "decode", "the payload's token ids");
    subspace_rebuild(ex, fixed_embedding_on(ex), in.tokens, view<const T, S>(c), basis_on<T>(ex), x);
  }
  /// grad_payload = round_wire(grad_x_hat·U).
  template <class Exec, class Fwd, class In, class T, class S, class Params>
    requires std::is_same_v<std::remove_const_t<In>, T> && std::is_same_v<std::remove_const_t<Fwd>, T>
  void decode_backward(const Exec& ex, payload<Fwd, S> in, view<In, S> grad_x_hat, view<T, S> grad_payload,
                       Params&) const {
    const auto dx = flat_rows(grad_x_hat, d_model(), "decode_backward", "grad_x_hat");
    const auto g = flat_rows(grad_payload, k(), "decode_backward", "grad_payload");
    require_payload(grad_x_hat.shape(), grad_payload.shape(), "decode_backward", "grad_payload");
    require_payload(grad_x_hat.shape(), in.values.shape(), "decode_backward", "the payload's values");
    subspace_coefficients(ex, view<const T, S>(dx), basis_on<T>(ex), g);
    detail::subspace_on<Exec>::round_to_wire(wire(), ex, g);
  }
  /// grad_x = grad_payload·Uᵀ.
  template <class Exec, class Fwd, class In, class T, class S, class Params>
    requires std::is_same_v<std::remove_const_t<In>, T> && std::is_same_v<std::remove_const_t<Fwd>, T>
  void encode_backward(const Exec& ex, boundary<Fwd, S> in, view<In, S> grad_payload, view<T, S> grad_x,
                       Params&) const {
    const auto dx = flat_rows(grad_x, d_model(), "encode_backward", "grad_x");
    const auto g = flat_rows(grad_payload, k(), "encode_backward", "grad_payload");
    require_payload(grad_x.shape(), grad_payload.shape(), "encode_backward", "grad_payload");
    subspace::detail::layer::require_shape(in.x, grad_x.shape(), "compress::subspace_projection::encode_backward", "x");
    subspace_expand(ex, view<const T, S>(g), basis_on<T>(ex), dx);
  }

 private:
  std::shared_ptr<const detail::subspace_tables> tables_;

  static std::shared_ptr<const detail::subspace_tables> make_tables(subspace_projection_options o) {
    require(o.d_model >= 1, [&] {
      return "compress::subspace_projection: d_model must be positive, got " + std::to_string(o.d_model);
    });
    require(o.vocab >= 1 && o.vocab <= 0x7fffffff, [&] {
      return "compress::subspace_projection: vocab must be in [1, 2^31 - 1] (int32 token ids), got " +
             std::to_string(o.vocab);
    });
    if (o.k == 0) o.k = default_subspace_rank(o.d_model);
    require(o.k >= 1 && o.k <= o.d_model, [&] {
      return "compress::subspace_projection: k must be in [1, d_model = " + std::to_string(o.d_model) + "], got " +
             std::to_string(o.k);
    });
    auto t = std::make_shared<detail::subspace_tables>();
    t->options = o;
    t->basis = make_subspace_basis(o.d_model, o.k, o.basis_seed);
    t->basis_fp64 = subspace_basis_fp64(t->basis.v());
    t->basis_hash = subspace_basis_hash(t->basis.v());
    t->fixed_embedding_hash = subspace::fixed_embedding_hash(o.fixed_embedding_seed, o.vocab, o.d_model);
    return t;
  }

  static std::string where(const char* op) { return std::string("compress::subspace_projection::") + op; }

  /// Throws unless x has rank >= 1 and last extent `width`.
  static void require_rows_of(const shape& x, std::int64_t width, const char* op, const char* operand) {
    require(x.rank >= 1 && x[x.rank - 1] == width, [&] {
      return where(op) + ": " + operand + " has shape " + to_string(x) + ", expected rows of width " +
             std::to_string(width) + " ([.., " + std::to_string(width) + "])";
    });
  }

  /// v [.., width], contiguous, as [rows, width].
  template <class V>
  static V flat_rows(const V& v, std::int64_t width, const char* op, const char* operand) {
    require_rows_of(v.shape(), width, op, operand);
    require(v.is_contiguous(), [&] {
      return where(op) + ": " + operand + " must be contiguous; got a strided view of shape " + to_string(v.shape());
    });
    return V(v.data(), shape{rows(v.shape()), width});
  }

  /// Throws unless the payload-shaped operand has extents payload_shape(x).
  void require_payload(const shape& x, const shape& p, const char* op, const char* operand) const {
    const shape want = payload_shape(x);
    require(p == want, [&] {
      return where(op) + ": " + operand + " has shape " + to_string(p) + ", expected " + to_string(want) +
             " for x of shape " + to_string(x);
    });
  }

  /// Throws unless `tokens` holds one id per row.
  template <class Tok>
  static void require_tokens(const Tok& tokens, std::int64_t n, const char* op, const char* operand) {
    require(tokens.rank() == 1 && tokens.dim(0) == n && tokens.is_contiguous(), [&] {
      return where(op) + ": " + operand + " have shape " + to_string(tokens.shape()) + ", expected [" +
             std::to_string(n) + "] (one contiguous int32 id per row: the receiver rebuilds E_fix[t])";
    });
  }
};

static_assert(Compressor<subspace_projection>);

}  // namespace subspace::compress

#if defined(__CUDACC__)
#include "detail/cuda/subspace_projection.cuh"
#endif

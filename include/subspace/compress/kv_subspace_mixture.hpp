#pragma once
// compress::kv_subspace_mixture: Mixture of Subspaces (docs/context.md), the K/V compressor of context-parallel
// attention. Each chunk of a rank's rows sends its keys and values in an r-dimensional subspace chosen for that
// chunk: a data-dependent rotation of a shared basis.
//
// Per attention layer ℓ but the last, and separately for Z = K (before RoPE) and Z = V [n rows, d_kv]:
//
//   z̄ = mean of the chunk's rows,   u = W_ψ z̄ / ‖z̄‖₁ + b_ψ,   θ = θ_max tanh(u / θ_max)
//                                    (m numbers; ψ a learned linear head, zero at the start; θ_max 0: θ = u)
//   U(θ) = U_0 + Σ_j θ_j P_j + ½ Σ_jl θ_j θ_l Q_jl      (= (I + S + ½S²) U_0, S = Σ θ_j A_j: the 2nd-order Taylor
//                                                        form of exp(S) U_0, through P_j = A_j U_0, Q_jl = A_j A_l U_0)
//   sent: C = Z U(θ) [n, r] and θ;   rebuilt by every rank, the owner too: Ẑ = C U(θ)ᵀ
//
// The A_j are fixed skew-symmetric generators, (G_j − G_jᵀ)/√(2 d_kv) with G_j from the portable Philox normal
// (seed, stream (ℓ, K/V, j)); U_0 is the top-r eigenbasis of the uncentered second moment Σ Zᵀ Z gathered over
// the last steps of an uncompressed warm-up (every rank's, summed; rank 0 computes U_0, P and Q and broadcasts
// them in fp32, so every rank holds the same bits). The final layer always sends K and V dense.
//
// Two things here are ours, not the paper's θ = W_ψ z̄ + b_ψ: ψ reads z̄ over its ℓ1 norm, so that an Adam step
// (about lr per weight, whatever the gradient's scale) moves θ by at most about 2 lr, where on z̄ itself it moved θ
// by lr ‖z̄‖₁ (‖z̄‖₁ is in the hundreds to thousands for a Llama's keys); and θ is bounded by θ_max (default 0.5),
// where the Taylor form is nearly a rotation (its singular values are √(1 + λ⁴/4) for an eigenvalue iλ of S: 1.12
// at λ = 1). Unbounded, θ grew to hundreds and training diverged (docs/context.md, "Why ψ reads z̄ / ‖z̄‖₁").
//
// Phases, by the 1-based step: steps 1 .. warmup_steps are dense (the last pca_steps of them accumulate Σ);
// from warmup_steps + 1 on the layers compress (after switch_to_compressed); from unplug_at_step on (when set)
// they are dense again.
//
// Backward. A receiver turns dẐ into dC = dẐ U and dθ_l = ⟨dẐᵀ C, ∂U/∂θ_l⟩ (the d_kv × r matrix dU is contracted
// at once, never sent); the owner sums every rank's (dC, dθ) and adds its own path: dZ = dC Uᵀ, dθ_l +=
// ⟨Zᵀ dC, ∂U/∂θ_l⟩, then through the head (du = dθ (1 − (θ/θ_max)²), x = z̄/‖z̄‖₁): dW_ψ += du xᵀ, db_ψ += du,
// dZ += 𝟙 ((dx − (dx·x) sign(z̄)) / ‖z̄‖₁)ᵀ / n with dx = W_ψᵀ du, where ∂U/∂θ_l = P_l + ½ Σ_l' θ_l' (Q_ll' +
// Q_l'l). The payload: values = C^K then C^V for every (sequence, chunk), in the activation type; side = θ^K then
// θ^V, in its accumulation type.
//
// Host (this file, the reference, float or double) and CUDA (detail/cuda/kv_subspace.cuh, nvcc: bf16 K/V, fp32 θ,
// tables and accumulation).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/config.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/hash.hpp"
#include "../core/parameter.hpp"
#include "../core/rng.hpp"
#include "../core/tensor.hpp"
#include "../kernels/gemm.hpp"
#include "../kernels/linalg.hpp"
#include "kv.hpp"

namespace subspace::compress {

/// What Mixture of Subspaces needs to know (see the top of this file).
struct kv_subspace_options {
  std::int64_t layers = 0;              // the model's layers: 0 .. layers − 2 compress, the last stays dense
  std::int64_t kv_dim = 0;              // d_kv = KV heads · head dim
  std::int64_t rank_k = 0, rank_v = 0;  // r of K and V; 0: round(0.02 d_kv), round(0.05 d_kv), at least 1
  std::int64_t generators = 1;          // m, the size of θ
  std::uint64_t generator_seed = 1;     // the A_j's draws
  std::int64_t warmup_steps = 500;      // dense steps before compression starts
  std::int64_t pca_steps = 50;          // the last warm-up steps accumulate Σ Zᵀ Z
  std::int64_t unplug_at_step = 0;      // from this step on dense again (0: never)
  double theta_max = 0.5;               // |θ| < theta_max, through tanh (0: unbounded, θ = u)

  std::int64_t k_rank() const {
    return rank_k > 0 ? rank_k : std::max<std::int64_t>(1, std::llround(0.02 * double(kv_dim)));
  }
  std::int64_t v_rank() const {
    return rank_v > 0 ? rank_v : std::max<std::int64_t>(1, std::llround(0.05 * double(kv_dim)));
  }

  /// Throws invalid_argument naming the field and the expected value.
  void validate() const {
    const auto need = [](bool ok, const auto& what) {
      require(ok, [&] { return std::string("compress::kv_subspace_options: ") + what(); });
    };
    need(layers >= 1, [&] { return "layers must be >= 1, got " + std::to_string(layers); });
    need(kv_dim >= 2, [&] { return "kv_dim must be >= 2, got " + std::to_string(kv_dim); });
    need(k_rank() < kv_dim && v_rank() < kv_dim, [&] {
      return "rank_k (" + std::to_string(k_rank()) + ") and rank_v (" + std::to_string(v_rank()) +
             ") must be below kv_dim " + std::to_string(kv_dim) + " (a rank of kv_dim compresses nothing)";
    });
    need(generators >= 1, [&] { return "generators must be >= 1, got " + std::to_string(generators); });
    need(warmup_steps >= 1, [&] {
      return "warmup_steps must be >= 1 (U_0 comes from the warm-up's K/V), got " + std::to_string(warmup_steps);
    });
    need(pca_steps >= 1 && pca_steps <= warmup_steps, [&] {
      return "pca_steps must lie in [1, warmup_steps = " + std::to_string(warmup_steps) + "], got " +
             std::to_string(pca_steps);
    });
    need(std::isfinite(theta_max) && theta_max >= 0,
         [&] { return "theta_max must be a finite number >= 0 (0: unbounded), got " + std::to_string(theta_max); });
    need(unplug_at_step == 0 || unplug_at_step > warmup_steps + 1, [&] {
      return "unplug_at_step must be 0 (never) or after the first compressed step " + std::to_string(warmup_steps + 1) +
             ", got " + std::to_string(unplug_at_step);
    });
  }
};

/// Which projection a basis compresses.
enum class kv_part : int { key = 0, value = 1 };

/// Generator A_j of layer `layer`, part `part` [d, d] in double: (G − Gᵀ)/√(2d), G from the portable normal with
/// (seed, stream (layer, part, j)). Skew-symmetric bit for bit.
inline host_tensor<double> kv_generator(std::uint64_t seed, std::int64_t layer, kv_part part, std::int64_t j,
                                        std::int64_t generators, std::int64_t d) {
  const std::uint64_t stream = std::uint64_t((layer * 2 + std::int64_t(part)) * generators + j);
  host_tensor<double> a(shape{d, d});
  const double scale = 1.0 / std::sqrt(2.0 * double(d));
  for (std::int64_t r = 0; r < d; ++r)
    for (std::int64_t c = 0; c < d; ++c) {
      const double g_rc = rng::normal_at(seed, stream, std::uint64_t(r * d + c));
      const double g_cr = rng::normal_at(seed, stream, std::uint64_t(c * d + r));
      a(r, c) = (g_rc - g_cr) * scale;
    }
  return a;
}

/// The shared constants of one basis: U_0 [d, r], P [m][d, r], Q [m][m][d, r], flat in that order (fp32).
struct kv_tables {
  std::int64_t d = 0, r = 0, m = 0;
  host_tensor<float> data;  // [(1 + m + m²) · d · r]

  std::int64_t block() const { return d * r; }
  const float* u0() const { return data.data(); }
  const float* p(std::int64_t j) const { return data.data() + (1 + j) * block(); }
  const float* q(std::int64_t j, std::int64_t l) const { return data.data() + (1 + m + j * m + l) * block(); }
  std::uint64_t hash() const {
    fnv1a_64 h;
    const std::int64_t n = data.data() ? data.numel() : 0;
    for (std::int64_t i = 0; i < n; ++i) h.add_float(data.data()[i]);
    return h.value();
  }

  /// The tables of U_0 (d × r, double) with the generators of (seed, layer, part): P_j = A_j U_0, Q_jl = A_j P_l.
  static kv_tables from_basis(view<const double, host_space> u0, std::int64_t m, std::uint64_t seed, std::int64_t layer,
                              kv_part part) {
    kv_tables t;
    t.d = u0.dim(0);
    t.r = u0.dim(1);
    t.m = m;
    t.data = host_tensor<float>(shape{(1 + m + m * m) * t.d * t.r});
    const std::int64_t d = t.d, r = t.r;
    std::vector<host_tensor<double>> a, p;
    for (std::int64_t j = 0; j < m; ++j) a.push_back(kv_generator(seed, layer, part, j, m, d));
    const auto times = [&](const host_tensor<double>& g, const double* x, double* out) {  // out = g x, x [d, r]
      for (std::int64_t i = 0; i < d; ++i)
        for (std::int64_t c = 0; c < r; ++c) {
          double s = 0;
          for (std::int64_t k = 0; k < d; ++k) s += g(i, k) * x[k * r + c];
          out[i * r + c] = s;
        }
    };
    float* out = t.data.data();
    for (std::int64_t i = 0; i < d * r; ++i) out[i] = float(u0.data()[i]);
    std::vector<double> u0d(u0.data(), u0.data() + d * r), tmp(std::size_t(d * r));
    for (std::int64_t j = 0; j < m; ++j) {
      p.emplace_back(shape{d, r});
      times(a[std::size_t(j)], u0d.data(), p.back().data());
      for (std::int64_t i = 0; i < d * r; ++i) out[(1 + j) * d * r + i] = float(p.back().data()[i]);
    }
    for (std::int64_t j = 0; j < m; ++j)
      for (std::int64_t l = 0; l < m; ++l) {
        times(a[std::size_t(j)], p[std::size_t(l)].data(), tmp.data());
        for (std::int64_t i = 0; i < d * r; ++i) out[(1 + m + j * m + l) * d * r + i] = float(tmp[std::size_t(i)]);
      }
    return t;
  }
};

/// The top-r eigenbasis of a symmetric positive semi-definite [d, d] matrix (uncentered PCA), as [d, r] in double.
inline host_tensor<double> top_eigenbasis(view<const double, host_space> sigma, std::int64_t r) {
  host_tensor<double> u(shape{sigma.dim(0), r});
  symmetric_eigen(exec::host{1}, sigma, view<double, host_space>{}, u.v());
  return u;
}

/// U(θ) = U_0 + Σ θ_j P_j + ½ Σ θ_j θ_l Q_jl into u [d, r] (any element type).
template <class U, class A>
void rotated_basis(const kv_tables& t, const A* theta, U* u) {
  const std::int64_t n = t.block();
  for (std::int64_t i = 0; i < n; ++i) {
    double x = t.u0()[i];
    for (std::int64_t j = 0; j < t.m; ++j) {
      x += double(theta[j]) * t.p(j)[i];
      for (std::int64_t l = 0; l < t.m; ++l) x += 0.5 * double(theta[j]) * double(theta[l]) * t.q(j, l)[i];
    }
    u[i] = convert<U>(x);
  }
}

/// θ of the head's output u: θ_max tanh(u / θ_max), or u when theta_max is 0 (host and device).
template <class F>
SUBSPACE_HD F bounded_theta(F u, F theta_max) {
  return theta_max > F(0) ? theta_max * std::tanh(u / theta_max) : u;
}
/// dθ/du at θ: 1 − (θ / θ_max)², or 1 when theta_max is 0 (host and device).
template <class F>
SUBSPACE_HD F bounded_theta_slope(F theta, F theta_max) {
  return theta_max > F(0) ? F(1) - (theta / theta_max) * (theta / theta_max) : F(1);
}

/// dθ_l += ⟨G, ∂U/∂θ_l⟩ for G [d, r], with ∂U/∂θ_l = P_l + ½ Σ_l' θ_l' (Q_ll' + Q_l'l).
template <class G, class A>
void contract_basis_gradient(const kv_tables& t, const G* g, const A* theta, A* dtheta) {
  const std::int64_t n = t.block();
  const auto dot = [&](const float* tab) {
    double s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += double(g[i]) * tab[i];
    return s;
  };
  for (std::int64_t l = 0; l < t.m; ++l) {
    double s = dot(t.p(l));
    for (std::int64_t k = 0; k < t.m; ++k) s += 0.5 * double(theta[k]) * (dot(t.q(l, k)) + dot(t.q(k, l)));
    dtheta[l] += A(s);
  }
}

/// What a layer's Mixture-of-Subspaces codec keeps whatever its memory space: the options, the layer, its phase
/// (dense warm-up, compressed, unplugged; whether training forwards add to Σ), the shared tables once switched, the
/// partial second moments, and where ψ lives in the store. Copies share it (the attention policy moves its codec).
class kv_subspace_phase {
 public:
  kv_subspace_phase(const kv_subspace_options& o, std::int64_t layer, std::size_t psi_first)
      : o_(o), layer_(layer), psi_first_(psi_first), state_(std::make_shared<state>()) {}

  const kv_subspace_options& options() const { return o_; }
  std::int64_t layer() const { return layer_; }
  /// The last layer sends dense K/V at every step.
  bool is_final() const { return layer_ == o_.layers - 1; }
  bool compressing() const { return state_->compressing; }
  std::int64_t rank(kv_part p) const { return p == kv_part::key ? o_.k_rank() : o_.v_rank(); }
  /// The store indices of ψ: W_ψ^K [m, d_kv], b_ψ^K [m], W_ψ^V, b_ψ^V (none for the last layer).
  std::size_t psi_index(kv_part p, bool bias) const { return psi_first_ + 2 * std::size_t(p) + (bias ? 1 : 0); }
  const kv_tables& tables(kv_part p) const { return state_->tables[int(p)]; }

  /// Before step `step` (1-based): the phase, and whether training forwards add to Σ.
  void begin_step(std::int64_t step) {
    state& s = *state_;
    s.accumulating = !is_final() && step > o_.warmup_steps - o_.pca_steps && step <= o_.warmup_steps;
    s.compressing =
        !is_final() && s.switched && step > o_.warmup_steps && (o_.unplug_at_step == 0 || step < o_.unplug_at_step);
  }
  /// After the step's forwards: evaluation does not add to Σ.
  void end_step() { state_->accumulating = false; }
  /// Σ Zᵀ Z of part p so far (the d_kv × d_kv sum over this rank's rows, in double on the host;
  /// has_second_moment false before the first accumulating forward).
  host_tensor<double>& second_moment(kv_part p) { return state_->sigma[int(p)]; }
  bool has_second_moment(kv_part p) const { return state_->sigma[int(p)].shape() == shape{o_.kv_dim, o_.kv_dim}; }
  /// Installs the shared tables of both parts (every rank the same bits); compression starts at the next
  /// begin_step after the warm-up.
  void set_tables(kv_tables key, kv_tables value) {
    state_->tables[0] = std::move(key);
    state_->tables[1] = std::move(value);
    state_->switched = true;
    state_->sigma[0] = host_tensor<double>();
    state_->sigma[1] = host_tensor<double>();
    ++state_->tables_version;
  }
  bool switched() const { return state_->switched; }

  kv_payload_size payload_size(const kv_rows& r) const {
    if (!compressing()) return {2 * r.elements(), 0};
    const std::int64_t units = r.batch * r.chunks;
    return {units * r.chunk_rows * (o_.k_rank() + o_.v_rank()), 2 * units * o_.generators};
  }

 protected:
  struct state {
    bool accumulating = false, compressing = false, switched = false;
    kv_tables tables[2];
    host_tensor<double> sigma[2];
    std::uint64_t tables_version = 0;  // bumped by set_tables (a device copy knows when to refresh)
  };
  bool accumulating() const { return state_->accumulating; }
  std::uint64_t tables_version() const { return state_->tables_version; }
  /// Σ of part p, allocated at zero on first use.
  host_tensor<double>& sigma(kv_part p) {
    host_tensor<double>& s = state_->sigma[int(p)];
    if (s.shape() != shape{o_.kv_dim, o_.kv_dim}) {
      s = host_tensor<double>(shape{o_.kv_dim, o_.kv_dim});
      std::fill(s.data(), s.data() + s.numel(), 0.0);
    }
    return s;
  }

  /// Calls f(part, offset of its C in values, offset of its θ in side) for K, then V. A part's units (unit = b ·
  /// chunks + c, one chunk of one sequence) lie in a row: its C [units, chunk_rows, r], its θ [units, m].
  template <class F>
  void for_each_part(const kv_rows& r, F&& f) const {
    const std::int64_t units = r.batch * r.chunks;
    f(kv_part::key, std::int64_t(0), std::int64_t(0));
    f(kv_part::value, units * r.chunk_rows * o_.k_rank(), units * o_.generators);
  }
  /// Calls f(part, unit, rows of Z, offset of C in values, offset of θ in side) for every (part, sequence, chunk):
  /// unit = b · chunks + c indexes the chunk's rows in [B, S, Hkv, hd]; the rows of Z are those of zk or zv (null
  /// when the caller has none).
  template <class Z, class F>
  void for_each_unit(const kv_rows& r, Z* zk, Z* zv, F&& f) const {
    const std::int64_t units = r.batch * r.chunks, n = r.chunk_rows, m = o_.generators;
    for_each_part(r, [&](kv_part p, std::int64_t c_base, std::int64_t t_base) {
      Z* base = p == kv_part::key ? zk : zv;
      for (std::int64_t u = 0; u < units; ++u)
        f(p, u, base ? base + u * n * r.kv_dim() : nullptr, c_base + u * n * rank(p), t_base + u * m);
    });
  }

  kv_subspace_options o_;
  std::int64_t layer_;
  std::size_t psi_first_;
  std::shared_ptr<state> state_;
};

/// One layer's K/V codec (compress/kv.hpp) on the host: compressed, or dense (warm-up, unplugged, the last layer).
template <class T, class G>
class kv_subspace_codec : public kv_subspace_phase {
  using A = accum_t<T>;

 public:
  using value_type = T;
  using kv_subspace_phase::kv_subspace_phase;

  template <class Store>
  void bind(Store& store) {
    if (is_final()) return;
    for (int p = 0; p < 2; ++p) {
      psi_w_[p] = store.value(psi_index(kv_part(p), false));
      psi_b_[p] = store.value(psi_index(kv_part(p), true));
      psi_dw_[p] = store.grad(psi_index(kv_part(p), false));
      psi_db_[p] = store.grad(psi_index(kv_part(p), true));
    }
  }

  void encode(const exec::host& ex, const kv_rows& r, view<const T, host_space> k, view<const T, host_space> v,
              view<T, host_space> values, view<A, host_space> side) {
    if (accumulating()) {
      accumulate(ex, r, k, kv_part::key);
      accumulate(ex, r, v, kv_part::value);
    }
    if (!compressing()) return dense_.encode(ex, r, k, v, values, side);
    for_each_unit(r, k.data(), v.data(), [&](kv_part p, std::int64_t, const T* z, std::int64_t c0, std::int64_t t0) {
      A* theta = side.data() + t0;
      chunk_theta(r, p, z, theta);
      gemm(ex, op::none, op::none, 1.0f, rows(z, r), basis_of(p, theta), 0.0f, coefficients(values.data() + c0, r, p));
    });
  }

  void decode(const exec::host& ex, const kv_rows& r, view<const T, host_space> values, view<const A, host_space> side,
              view<T, host_space> k_hat, view<T, host_space> v_hat) {
    if (!compressing()) return dense_.decode(ex, r, values, side, k_hat, v_hat);
    for_each_unit(r, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                  [&](kv_part p, std::int64_t unit, const T*, std::int64_t c0, std::int64_t t0) {
                    const view<const T, host_space> u = basis_of(p, side.data() + t0);
                    T* out = (p == kv_part::key ? k_hat : v_hat).data() + unit * r.chunk_rows * r.kv_dim();
                    gemm(ex, op::none, op::transpose, 1.0f, coefficients(values.data() + c0, r, p), u, 0.0f,
                         view<T, host_space>(out, shape{r.chunk_rows, r.kv_dim()}));
                  });
  }

  void decode_backward(const exec::host& ex, const kv_rows& r, view<const T, host_space> values,
                       view<const A, host_space> side, view<const T, host_space> dk_hat,
                       view<const T, host_space> dv_hat, view<T, host_space> grad_values,
                       view<A, host_space> grad_side) {
    if (!compressing()) return dense_.decode_backward(ex, r, values, side, dk_hat, dv_hat, grad_values, grad_side);
    for_each_unit(r, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                  [&](kv_part p, std::int64_t unit, const T*, std::int64_t c0, std::int64_t t0) {
                    const A* theta = side.data() + t0;
                    const view<const T, host_space> u = basis_of(p, theta);
                    const T* dz = (p == kv_part::key ? dk_hat : dv_hat).data() + unit * r.chunk_rows * r.kv_dim();
                    const view<const T, host_space> dzv(dz, shape{r.chunk_rows, r.kv_dim()});
                    const view<const T, host_space> c = coefficients(values.data() + c0, r, p);
                    gemm(ex, op::none, op::none, 1.0f, dzv, u, 0.0f, coefficients(grad_values.data() + c0, r, p));
                    const view<T, host_space> g = scratch_view(g_, shape{r.kv_dim(), rank(p)});
                    gemm(ex, op::transpose, op::none, 1.0f, dzv, c, 0.0f, g);  // dẐᵀ C
                    A* dtheta = grad_side.data() + t0;
                    for (std::int64_t l = 0; l < o_.generators; ++l) dtheta[l] = A(0);
                    contract_basis_gradient(tables(p), g.data(), theta, dtheta);
                  });
  }

  void encode_backward(const exec::host& ex, const kv_rows& r, view<const T, host_space> k, view<const T, host_space> v,
                       view<const T, host_space> values, view<const A, host_space> side,
                       view<const T, host_space> grad_values, view<const A, host_space> grad_side,
                       view<T, host_space> dk, view<T, host_space> dv) {
    if (!compressing()) return dense_.encode_backward(ex, r, k, v, values, side, grad_values, grad_side, dk, dv);
    const std::int64_t m = o_.generators, n = r.chunk_rows, dkv = r.kv_dim();
    std::vector<A> dtheta(static_cast<std::size_t>(m));
    for_each_unit(r, k.data(), v.data(),
                  [&](kv_part p, std::int64_t unit, const T* z, std::int64_t c0, std::int64_t t0) {
                    const A* theta = side.data() + t0;
                    const view<const T, host_space> u = basis_of(p, theta);
                    const view<const T, host_space> dc = coefficients(grad_values.data() + c0, r, p);
                    T* dz = (p == kv_part::key ? dk : dv).data() + unit * n * dkv;
                    const view<T, host_space> dzv(dz, shape{n, dkv});
                    gemm(ex, op::none, op::transpose, 1.0f, dc, u, 0.0f, dzv);  // dZ = dC Uᵀ
                    const view<T, host_space> g = scratch_view(g_, shape{dkv, rank(p)});
                    gemm(ex, op::transpose, op::none, 1.0f, rows(z, r), dc, 0.0f, g);  // Zᵀ dC
                    for (std::int64_t l = 0; l < m; ++l) dtheta[std::size_t(l)] = grad_side.data()[t0 + l];
                    contract_basis_gradient(tables(p), g.data(), theta, dtheta.data());
                    // The head (see the top of this file): du = dθ θ'(u), dW += du xᵀ, db += du, dx = Wᵀ du, and
                    // every row's dZ += (dx − (dx·x) sign(z̄)) / (‖z̄‖₁ n), x = z̄ / ‖z̄‖₁.
                    const head_input h = head_of(z, n, dkv);
                    const int q = int(p);
                    for (std::int64_t l = 0; l < m; ++l) {
                      const A du = dtheta[std::size_t(l)] * A(bounded_theta_slope(double(theta[l]), o_.theta_max));
                      dtheta[std::size_t(l)] = du;
                      psi_db_[q].data()[l] += G(du);
                      for (std::int64_t c = 0; c < dkv; ++c)
                        psi_dw_[q].data()[l * dkv + c] += G(du * h.x[std::size_t(c)]);
                    }
                    if (h.norm == A(0)) return;  // z̄ = 0: x is 0 around it (a subgradient)
                    std::vector<A> dx(static_cast<std::size_t>(dkv), A(0));
                    A dot = 0;
                    for (std::int64_t c = 0; c < dkv; ++c) {
                      for (std::int64_t l = 0; l < m; ++l)
                        dx[std::size_t(c)] += A(psi_w_[q].data()[l * dkv + c]) * dtheta[std::size_t(l)];
                      dot += dx[std::size_t(c)] * h.x[std::size_t(c)];
                    }
                    for (std::int64_t c = 0; c < dkv; ++c) {
                      const A mc = h.mean[std::size_t(c)], sign = mc > A(0) ? A(1) : (mc < A(0) ? A(-1) : A(0));
                      const A add = (dx[std::size_t(c)] - dot * sign) / (h.norm * A(n));
                      for (std::int64_t i = 0; i < n; ++i) dz[i * dkv + c] = convert<T>(A(dz[i * dkv + c]) + add);
                    }
                  });
  }

 private:
  static view<const T, host_space> rows(const T* z, const kv_rows& r) {
    return view<const T, host_space>(z, shape{r.chunk_rows, r.kv_dim()});
  }
  template <class U>
  view<U, host_space> coefficients(U* at, const kv_rows& r, kv_part p) const {
    return view<U, host_space>(at, shape{r.chunk_rows, rank(p)});
  }

  static std::vector<A> row_mean(const T* z, std::int64_t n, std::int64_t d) {
    std::vector<A> mean(std::size_t(d), A(0));
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = 0; c < d; ++c) mean[std::size_t(c)] += A(z[i * d + c]);
    for (auto& x : mean) x /= A(n);
    return mean;
  }
  /// What ψ reads of a chunk: z̄, its ℓ1 norm and x = z̄ / ‖z̄‖₁ (zero when z̄ is).
  struct head_input {
    std::vector<A> mean, x;
    A norm = 0;
  };
  static head_input head_of(const T* z, std::int64_t n, std::int64_t d) {
    head_input h{row_mean(z, n, d), std::vector<A>(static_cast<std::size_t>(d), A(0)), A(0)};
    for (const A m : h.mean) h.norm += std::abs(m);
    if (h.norm > A(0))
      for (std::int64_t c = 0; c < d; ++c) h.x[std::size_t(c)] = h.mean[std::size_t(c)] / h.norm;
    return h;
  }
  /// θ of one chunk's rows: θ_max tanh((W_ψ x + b_ψ) / θ_max).
  void chunk_theta(const kv_rows& r, kv_part p, const T* z, A* theta) const {
    const std::int64_t d = r.kv_dim();
    const head_input h = head_of(z, r.chunk_rows, d);
    const int q = int(p);
    for (std::int64_t l = 0; l < o_.generators; ++l) {
      A u = A(psi_b_[q].data()[l]);
      for (std::int64_t c = 0; c < d; ++c) u += A(psi_w_[q].data()[l * d + c]) * h.x[std::size_t(c)];
      theta[l] = A(bounded_theta(double(u), o_.theta_max));
    }
  }
  /// U(θ) of part p, in T (in u_).
  view<const T, host_space> basis_of(kv_part p, const A* theta) {
    const kv_tables& t = tables(p);
    const view<T, host_space> u = scratch_view(u_, shape{t.d, t.r});
    rotated_basis(t, theta, u.data());
    return u;
  }
  void accumulate(const exec::host& ex, const kv_rows& r, view<const T, host_space> z, kv_part p) {
    host_tensor<double>& s = sigma(p);
    const std::int64_t d = r.kv_dim();
    const view<const T, host_space> all(z.data(), shape{r.batch * r.rows(), d});
    const view<T, host_space> zz = scratch_view(zz_, shape{d, d});
    gemm(ex, op::transpose, op::none, 1.0f, all, all, 0.0f, zz);
    for (std::int64_t i = 0; i < d * d; ++i) s.data()[i] += double(zz.data()[i]);
  }

  kv_identity dense_;
  view<T, host_space> psi_w_[2], psi_b_[2];
  view<G, host_space> psi_dw_[2], psi_db_[2];
  host_tensor<T> u_, g_, zz_;  // scratch, grown only (scratch_view): K and V differ in rank
};

template <class G>
class kv_subspace_codec_cuda;  // compress/detail/cuda/kv_subspace.cuh (nvcc)

/// The compressor a context-parallel stack names: options, and a codec per attention layer (kv_codec).
class kv_subspace_mixture {
 public:
  static constexpr bool compresses_kv = true;
  explicit kv_subspace_mixture(kv_subspace_options o) : o_(std::move(o)) { o_.validate(); }
  const kv_subspace_options& options() const { return o_; }

  /// The codec of the layer at `site` (site.layer, site.parameters): declares ψ^K and ψ^V (W [m, d_kv] and b [m],
  /// zero, no weight decay) unless it is the last layer.
  template <class T, class Space, class Site>
  auto kv_codec(const Site& site) const {
    using store_type = std::remove_reference_t<decltype(site.parameters)>;
    using G = typename store_type::grad_type;
    const std::int64_t l = site.layer;
    require(o_.layers == site.config.n_layers && o_.kv_dim == site.config.kv_dim(), [&] {
      return "compress::kv_subspace_mixture: the options describe " + std::to_string(o_.layers) + " layers of kv_dim " +
             std::to_string(o_.kv_dim) + ", the model has " + std::to_string(site.config.n_layers) + " of " +
             std::to_string(site.config.kv_dim());
    });
    std::size_t first = 0;
    if (l < o_.layers - 1) {
      const std::string prefix = "model.layers." + std::to_string(l) + ".self_attn.";
      for (const char* part : {"k_subspace", "v_subspace"}) {
        const std::size_t w = site.parameters.add(
            parameter_info{prefix + part + ".psi.weight", shape{o_.generators, o_.kv_dim}, false, {0.0f, 0.0f, 0}});
        site.parameters.add(parameter_info{prefix + part + ".psi.bias", shape{o_.generators}, false, {0.0f, 0.0f, 0}});
        if (part[0] == 'k') first = w;
      }
    }
    if constexpr (std::is_same_v<Space, host_space>) {
      return kv_subspace_codec<T, G>(o_, l, first);
    } else {
      static_assert(std::is_same_v<T, bf16>,
                    "compress::kv_subspace_mixture: in device memory the codec compresses bf16 K/V (fp32 tables, θ "
                    "and accumulation), as the CUDA Llama holds them");
      return kv_subspace_codec_cuda<G>(o_, l, first);
    }
  }

 private:
  kv_subspace_options o_;
};

}  // namespace subspace::compress

#if defined(__CUDACC__)
#include "detail/cuda/kv_subspace.cuh"
#endif

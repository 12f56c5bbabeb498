// GaLore and GoLore on the host (docs/galore.md): the factorisations, the projectors,
// the projected Adam step against a float64 reference, refresh timing and moments, fallbacks, errors, memory
// accounting on the Llama-60M configuration, and the Optimizer conformance suite.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <subspace/kernels/gemm.hpp>
#include <subspace/kernels/linalg.hpp>
#include <subspace/nn/config.hpp>
#include <subspace/optim/adamw.hpp>
#include <subspace/optim/galore.hpp>
#include <subspace/optim/golore.hpp>
#include <subspace/optim/projector.hpp>
#include <tuple>
#include <vector>

#include "conformance.hpp"
#include "support/numeric.hpp"

using namespace subspace;
using optim::projection_side;
using testing::gram;
using testing::max_abs_minus_identity;

namespace {

const exec::host ex{};

template <class T, class U>
host_tensor<T> converted(const host_tensor<U>& x) {
  host_tensor<T> y(x.shape());
  for (std::int64_t i = 0; i < x.numel(); ++i) y.data()[i] = convert<T>(x.data()[i]);
  return y;
}

template <class T>
host_tensor<T> copy_of(const host_tensor<T>& x) {
  host_tensor<T> y(x.shape());
  copy(ex, x.v(), y.v());
  return y;
}

template <class T>
bool same_bits(const host_tensor<T>& a, const host_tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

/// A rows x cols matrix with orthonormal columns (double).
host_tensor<double> random_orthonormal(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  const auto g = testing::random_tensor<double>({rows, cols}, seed);
  host_tensor<double> q({rows, cols});
  orthonormalize(ex, g.v(), q.v());
  return q;
}

/// max |P P^T - I| (right) or |P^T P - I| (left): how far P is from orthonormal.
template <class T>
double orthonormality_error(const host_tensor<T>& p, projection_side side) {
  return max_abs_minus_identity(gram(p, side == projection_side::left));
}

/// The sine of the largest principal angle between the row spaces of a and b (r x n, orthonormal rows):
/// the largest singular value of a^T - b^T (b a^T).
template <class TA, class TB>
double sin_largest_angle(const host_tensor<TA>& a, const host_tensor<TB>& b) {
  const std::int64_t r = a.dim(0), n = a.dim(1);
  host_tensor<double> ad = converted<double>(a), bd = converted<double>(b), bat({r, r}), resid({n, r});
  gemm(ex, op::none, op::transpose, 1.0f, bd.v(), ad.v(), 0.0f, bat.v());  // b a^T
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < r; ++j) {
      double s = ad(j, i);
      for (std::int64_t l = 0; l < r; ++l) s -= bd(l, i) * bat(l, j);
      resid(i, j) = s;
    }
  host_tensor<double> sv({1});
  svd(ex, resid.v(), sv.v(), view<double, host_space>{}, view<double, host_space>{});
  return sv(0);
}

/// The transpose, as a new tensor.
template <class T>
host_tensor<T> transposed(const host_tensor<T>& a) {
  host_tensor<T> t({a.dim(1), a.dim(0)});
  copy(ex, a.v().transposed(), t.v());
  return t;
}

/// G = X diag(sigma) Y^T with orthonormal X (m x k), Y (n x k), k = min(m, n), sigma_j = 2 * 0.8^j.
struct designed_matrix {
  host_tensor<double> x, y, g;
  std::vector<double> sigma;
};
designed_matrix designed(std::int64_t m, std::int64_t n, std::uint64_t seed) {
  const std::int64_t k = std::min(m, n);
  designed_matrix d{
      random_orthonormal(m, k, seed), random_orthonormal(n, k, seed + 1), host_tensor<double>({m, n}), {}};
  for (std::int64_t j = 0; j < k; ++j) d.sigma.push_back(2.0 * std::pow(0.8, double(j)));
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t l = 0; l < n; ++l) {
      double s = 0;
      for (std::int64_t j = 0; j < k; ++j) s += d.x(i, j) * d.sigma[std::size_t(j)] * d.y(l, j);
      d.g(i, l) = s;
    }
  return d;
}

/// The leading r columns of a as a new tensor.
template <class T>
host_tensor<T> leading_columns(const host_tensor<T>& a, std::int64_t r) {
  host_tensor<T> out({a.dim(0), r});
  for (std::int64_t i = 0; i < a.dim(0); ++i)
    for (std::int64_t j = 0; j < r; ++j) out(i, j) = a(i, j);
  return out;
}

}  // namespace

// === factorisations ==============================================================================================

TEST_CASE("orthonormalize: Q has orthonormal columns, Q^T a is upper triangular with a non-negative diagonal") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const auto& [rows, cols] : {std::pair{9, 4}, std::pair{16, 16}, std::pair{40, 7}, std::pair{5, 1}}) {
    CAPTURE(rows);
    CAPTURE(cols);
    const auto a = testing::random_tensor<double>({rows, cols}, seed + std::uint64_t(rows));
    host_tensor<double> q({rows, cols});
    orthonormalize(ex, a.v(), q.v());
    CHECK(max_abs_minus_identity(gram(q, true)) <= 1e-13);
    host_tensor<double> r({cols, cols});
    gemm(ex, op::transpose, op::none, 1.0f, q.v(), a.v(), 0.0f, r.v());
    double below = 0, scale = 0;
    bool positive = true;
    for (std::int64_t i = 0; i < cols; ++i)
      for (std::int64_t j = 0; j < cols; ++j) {
        scale = std::max(scale, std::abs(r(i, j)));
        if (i > j) below = std::max(below, std::abs(r(i, j)));
        if (i == j) positive = positive && r(i, i) > 0.0;
      }
    CHECK(below <= 1e-13 * scale);
    CHECK(positive);
    // a = Q R
    host_tensor<double> back({rows, cols});
    gemm(ex, op::none, op::none, 1.0f, q.v(), r.v(), 0.0f, back.v());
    CHECK(testing::rel_error(back, a) <= 1e-14);
  }
}

TEST_CASE("orthonormalize: rank-deficient input still gives orthonormal columns, strided output") {
  host_tensor<double> a({6, 3});
  for (std::int64_t i = 0; i < 6; ++i) {
    a(i, 0) = double(i + 1);
    a(i, 1) = 2.0 * double(i + 1);  // parallel to column 0
    a(i, 2) = 0.0;                  // zero
  }
  host_tensor<float> qt({3, 6});  // written through a transposed view
  orthonormalize(ex, a.v(), qt.v().transposed());
  CHECK(orthonormality_error(qt, projection_side::right) <= 1e-6);
  // The first column is a's first column normalised, with the positive sign.
  const double norm = std::sqrt(91.0);
  for (std::int64_t i = 0; i < 6; ++i) CHECK(qt(0, i) == doctest::Approx(double(i + 1) / norm).epsilon(1e-6));
}

TEST_CASE("svd: reconstructs a, orthonormal factors, descending values, the sign convention, truncated outputs") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const auto& [m, n] :
       {std::pair{12, 7}, std::pair{7, 12}, std::pair{10, 10}, std::pair{1, 5}, std::pair{33, 2}}) {
    CAPTURE(m);
    CAPTURE(n);
    const std::int64_t k = std::min(m, n);
    const auto a = testing::random_tensor<double>({m, n}, seed + std::uint64_t(m * 100 + n));
    host_tensor<double> s({k}), u({m, k}), vt({k, n});
    svd(ex, a.v(), s.v(), u.v(), vt.v());
    CHECK(max_abs_minus_identity(gram(u, true)) <= 1e-13);
    CHECK(max_abs_minus_identity(gram(vt, false)) <= 1e-13);
    for (std::int64_t j = 0; j + 1 < k; ++j) CHECK(s(j) >= s(j + 1));
    CHECK(s(k - 1) >= 0.0);
    host_tensor<double> us({m, k}), back({m, n});
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < k; ++j) us(i, j) = u(i, j) * s(j);
    gemm(ex, op::none, op::none, 1.0f, us.v(), vt.v(), 0.0f, back.v());
    CHECK(testing::rel_error(back, a) <= 1e-13);
    // Sign convention: the largest-magnitude entry of the shorter-side vector is positive.
    for (std::int64_t j = 0; j < k; ++j) {
      double best = -1, at = 0;
      for (std::int64_t i = 0; i < (m >= n ? n : m); ++i) {
        const double x = m >= n ? vt(j, i) : u(i, j);
        if (std::abs(x) > best) {
          best = std::abs(x);
          at = x;
        }
      }
      CHECK(at > 0.0);
    }
    // Truncated outputs are the leading singular vectors, bit for bit.
    const std::int64_t r = std::max<std::int64_t>(1, k / 2);
    host_tensor<double> u_r({m, r}), vt_r({r, n});
    svd(ex, a.v(), view<double, host_space>{}, u_r.v(), view<double, host_space>{});
    svd(ex, a.v(), view<double, host_space>{}, view<double, host_space>{}, vt_r.v());
    bool same = true;
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < r; ++j) same = same && u_r(i, j) == u(i, j);
    for (std::int64_t j = 0; j < r; ++j)
      for (std::int64_t i = 0; i < n; ++i) same = same && vt_r(j, i) == vt(j, i);
    CHECK(same);
  }
}

TEST_CASE("svd: recovers a designed spectrum and singular subspaces, a zero matrix gives orthonormal factors") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const auto& [m, n] : {std::pair{20, 9}, std::pair{9, 20}}) {
    const auto d = designed(m, n, seed);
    const std::int64_t k = std::min(m, n);
    host_tensor<double> s({k}), u({m, k}), vt({k, n});
    svd(ex, d.g.v(), s.v(), u.v(), vt.v());
    for (std::int64_t j = 0; j < k; ++j) CHECK(s(j) == doctest::Approx(d.sigma[std::size_t(j)]).epsilon(1e-12));
    CHECK(sin_largest_angle(transposed(leading_columns(u, 3)), transposed(leading_columns(d.x, 3))) <= 1e-12);
    host_tensor<double> vt3({3, n});
    copy(ex, vt.v().slice(0, 3), vt3.v());
    CHECK(sin_largest_angle(vt3, transposed(leading_columns(d.y, 3))) <= 1e-12);
  }
  host_tensor<double> zero({5, 3}), s({3}), u({5, 3}), vt({3, 3});
  fill(ex, zero.v(), 0.0);
  svd(ex, zero.v(), s.v(), u.v(), vt.v());
  CHECK(max_abs_minus_identity(gram(u, true)) <= 1e-15);
  CHECK(max_abs_minus_identity(gram(vt, false)) <= 1e-15);
  CHECK(s(0) == 0.0);
}

TEST_CASE("svd and orthonormalize: shape errors name the operand") {
  host_tensor<double> a({4, 3}), q({3, 4}), s({5});
  CHECK_THROWS_WITH_AS(orthonormalize(ex, a.v().transposed(), q.v()), doctest::Contains("at least as many rows"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(svd(ex, a.v(), s.v(), view<double, host_space>{}, view<double, host_space>{}),
                       doctest::Contains("svd: s must be"), invalid_argument);
}

// === projectors ==================================================================================================

TEST_CASE("projection: the side by shape, the shapes, and bad ranks") {
  const auto right = optim::make_projection(64, 32, 8);
  CHECK(right.side == projection_side::right);
  CHECK(right.projector_shape() == shape{8, 32});
  CHECK(right.moment_shape() == shape{64, 8});
  const auto left = optim::make_projection(32, 64, 8);
  CHECK(left.side == projection_side::left);
  CHECK(left.projector_shape() == shape{32, 8});
  CHECK(left.moment_shape() == shape{8, 64});
  CHECK(optim::make_projection(16, 16, 4).side == projection_side::right);
  CHECK_THROWS_WITH_AS(optim::make_projection(64, 32, 33), doctest::Contains("1 <= r <= min(m, n) = 32"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(optim::make_projection(64, 32, 0), doctest::Contains("rank r = 0"), invalid_argument);
}

TEST_CASE("projectors are orthonormal in fp32 (GaLore and GoLore, both sides)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const auto& [m, n, r] : {std::tuple{64, 32, 8}, std::tuple{32, 64, 8}, std::tuple{96, 96, 17}}) {
    CAPTURE(m);
    CAPTURE(n);
    const auto p = optim::make_projection(m, n, r);
    const auto g = testing::random_tensor<float>({m, n}, seed + std::uint64_t(m));
    host_tensor<float> pg(p.projector_shape()), pr(p.projector_shape());
    optim::galore_projector(ex, p, g.v(), pg.v());
    optim::golore_projector(ex, p, seed, 7u, 3u, pr.v());
    CHECK(orthonormality_error(pg, p.side) <= 1e-6);
    CHECK(orthonormality_error(pr, p.side) <= 1e-6);
  }
}

TEST_CASE("galore_projector spans the top-r singular subspace (right: rows of V^T, left: columns of U)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const auto& [m, n] : {std::pair{40, 24}, std::pair{24, 40}}) {
    CAPTURE(m);
    CAPTURE(n);
    const std::int64_t r = 6;
    const auto d = designed(m, n, seed);
    const auto p = optim::make_projection(m, n, r);
    host_tensor<float> P(p.projector_shape());
    optim::galore_projector(ex, p, converted<float>(d.g).v(), P.v());
    const auto expected =
        p.side == projection_side::right ? transposed(leading_columns(d.y, r)) : transposed(leading_columns(d.x, r));
    const auto rows = p.side == projection_side::right ? copy_of(P) : transposed(P);
    CHECK(sin_largest_angle(rows, expected) <= 1e-5);  // sigma_r / sigma_{r+1} = 1.25; the inputs are fp32
  }
}

TEST_CASE("golore: Omega is the documented Philox stream, P is reproducible and depends on (seed, param, refresh)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto p = optim::make_projection(30, 20, 5);  // right: Omega 20 x 5
  host_tensor<float> omega(p.omega_shape());
  optim::golore_gaussian(ex, p, seed, 0xabcdu, 9u, omega.v());
  bool documented = true;
  for (std::int64_t idx = 0; idx < omega.numel(); ++idx) {
    float v[4];
    rng::normal4(seed, (std::uint64_t(optim::golore_stream) << 32) | 9u,
                 (std::uint64_t(0xabcdu) << 32) | std::uint64_t(idx / 4), 0.0f, 1.0f, v);
    documented = documented && testing::same_bits(omega.data()[idx], v[idx % 4]);
  }
  CHECK(documented);

  host_tensor<float> a(p.projector_shape()), b(p.projector_shape()), c(p.projector_shape()), d(p.projector_shape());
  optim::golore_projector(ex, p, seed, 1u, 2u, a.v());
  optim::golore_projector(ex, p, seed, 1u, 2u, b.v());
  optim::golore_projector(ex, p, seed, 1u, 3u, c.v());
  optim::golore_projector(ex, p, seed, 2u, 2u, d.v());
  CHECK(same_bits(a, b));
  CHECK(!same_bits(a, c));
  CHECK(!same_bits(a, d));
  // P = Q^T with Q the sign-fixed QR factor of Omega.
  host_tensor<float> om(p.omega_shape());
  optim::golore_gaussian(ex, p, seed, 1u, 2u, om.v());
  host_tensor<float> q(p.omega_shape());
  orthonormalize(ex, om.v(), q.v());
  CHECK(same_bits(transposed(q), a));
}

TEST_CASE("golore: Haar distribution — mean P^T P = (r/n) I and Q_00 > 0 half the time (n = 8, r = 2, 20k draws)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  constexpr int draws = 20000;
  for (const auto& [m, n] : {std::pair{16, 8}, std::pair{8, 16}}) {  // right (P 2 x 8) and left (P 8 x 2)
    CAPTURE(m);
    CAPTURE(n);
    const auto p = optim::make_projection(m, n, 2);
    const std::int64_t k = p.short_dim();
    host_tensor<double> mean({k, k});
    fill(ex, mean.v(), 0.0);
    int q00_positive = 0;
    host_tensor<float> P(p.projector_shape());
    for (int t = 0; t < draws; ++t) {
      optim::golore_projector(ex, p, seed, std::uint32_t(t % 97), std::uint64_t(t / 97), P.v());
      const auto g = gram(P, p.side == projection_side::right);  // P^T P (right) or P P^T (left): k x k
      for (std::int64_t i = 0; i < k * k; ++i) mean.data()[i] += g.data()[i] / draws;
      q00_positive += P(0, 0) > 0.0f;
    }
    double worst = 0;
    for (std::int64_t i = 0; i < k; ++i)
      for (std::int64_t j = 0; j < k; ++j)
        worst = std::max(worst, std::abs(mean(i, j) - (i == j ? 2.0 / double(k) : 0.0)));
    CHECK(worst <= 0.01);
    const double share = double(q00_positive) / draws;
    CAPTURE(share);
    CHECK(std::abs(share - 0.5) <= 0.02);
  }
}

TEST_CASE("reproject_first_moment: back_new(M_new) = Pi_new(back_old(M_old)) in fp64") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const auto& [m, n] : {std::pair{20, 12}, std::pair{12, 20}}) {
    CAPTURE(m);
    CAPTURE(n);
    const auto p = optim::make_projection(m, n, 4);
    host_tensor<double> p_old(p.projector_shape()), p_new(p.projector_shape());
    optim::golore_projector(ex, p, seed, 1u, 0u, p_old.v());
    optim::golore_projector(ex, p, seed, 1u, 1u, p_new.v());
    auto M = testing::random_tensor<double>(p.moment_shape(), seed + 5);
    host_tensor<double> back_old({m, n}), back_new({m, n}), expected({m, n});
    fill(ex, back_old.v(), 0.0);
    fill(ex, back_new.v(), 0.0);
    optim::back_project_add(ex, p, M.v(), p_old.v(), back_old.v());
    optim::reproject_first_moment(ex, p, view<const double, host_space>(p_old.v()),
                                  view<const double, host_space>(p_new.v()), M.v());
    optim::back_project_add(ex, p, M.v(), p_new.v(), back_new.v());
    // Pi_new: onto the new row space (right: X P^T P) or column space (left: P P^T X).
    host_tensor<double> pi(p.side == projection_side::right ? shape{n, n} : shape{m, m});
    if (p.side == projection_side::right) {
      gemm(ex, op::transpose, op::none, 1.0f, p_new.v(), p_new.v(), 0.0f, pi.v());
      gemm(ex, op::none, op::none, 1.0f, back_old.v(), pi.v(), 0.0f, expected.v());
    } else {
      gemm(ex, op::none, op::transpose, 1.0f, p_new.v(), p_new.v(), 0.0f, pi.v());
      gemm(ex, op::none, op::none, 1.0f, pi.v(), back_old.v(), 0.0f, expected.v());
    }
    CHECK(testing::rel_error(back_new, expected) <= 1e-12);
  }
}

// === the projected Adam step ======================================================================================

TEST_CASE(
    "subspace_adam_step with P = I (r = n) equals the AdamW formula with GaLore's eps placement, bitwise (fp64)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t m = 12, n = 8;
  const auto p = optim::make_projection(m, n, n);  // bypasses the policies' fallback on purpose
  host_tensor<double> P({n, n});
  fill(ex, P.v(), 0.0);
  for (std::int64_t i = 0; i < n; ++i) P(i, i) = 1.0;
  const optim::subspace_adam h{0.85f, 0.99f, 1e-6f, 0.3f};
  const double scale = 0.25;
  for (const bool decay : {false, true}) {
    CAPTURE(decay);
    auto W = testing::random_tensor<double>({m, n}, seed);
    auto ref_w = copy_of(W);
    host_tensor<double> M({m, n}), V({m, n}), ref_m({m, n}), ref_v({m, n});
    for (auto* t : {&M, &V, &ref_m, &ref_v}) fill(ex, t->v(), 0.0);
    host_tensor<bf16> working({m, n});
    for (std::int64_t s = 1; s <= 5; ++s) {
      CAPTURE(s);
      const auto G = testing::random_tensor<double>({m, n}, seed + std::uint64_t(s), 0.0f, 0.1f * float(s));
      const double lr = 1e-2 / double(s);
      optim::subspace_adam_step(ex, p, W.v(), G.v(), M.v(), V.v(), view<const double, host_space>(P.v()), h, scale, s,
                                lr, decay, working.v());
      // The reference, element by element (the formula of optim/detail/low_rank.hpp, fused multiply-adds as
      // documented).
      const double b1 = double(h.beta1), b2 = double(h.beta2), eps = double(h.eps);
      const double bias1 = 1.0 - std::pow(b1, double(s)), bias2 = 1.0 - std::pow(b2, double(s));
      const double neg_step = -(lr * scale * std::sqrt(bias2) / bias1);
      for (std::int64_t i = 0; i < W.numel(); ++i) {
        const double g = G.data()[i];
        double& mm = ref_m.data()[i];
        double& vv = ref_v.data()[i];
        double& w = ref_w.data()[i];
        mm = std::fma(b1, mm, (1.0 - b1) * g);
        vv = std::fma(b2, vv, (1.0 - b2) * (g * g));
        w = w + neg_step * (mm / (std::sqrt(vv) + eps));
        if (decay) w = std::fma(-(lr * double(h.weight_decay)), w, w);
      }
      CHECK(same_bits(M, ref_m));
      CHECK(same_bits(V, ref_v));
      CHECK(same_bits(W, ref_w));
      bool working_ok = true;
      for (std::int64_t i = 0; i < W.numel(); ++i)
        working_ok = working_ok && working.data()[i].bits == bf16(float(W.data()[i])).bits;
      CHECK(working_ok);
    }
  }
}

TEST_CASE("galore: r = min(m, n), non-target names and vectors use the inner AdamW, bit for bit") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const optim::adamw inner{0.9f, 0.999f, 1e-6f, 0.1f};
  const optim::galore<> gal{.inner = inner, .rank = 32, .refresh_period = 2};
  const optim::golore<> gol{.inner = inner, .rank = 32, .refresh_period = 2, .random_percent = 100};
  const std::vector<optim::param_info> params = {
      {"layers.0.self_attn.q_proj.weight", {64, 32}, true},  // r = min(m, n): the fallback
      {"layers.0.mlp.up_proj.weight", {20, 64}, true},       // r > min(m, n): the fallback
      {"model.embed_tokens.weight", {100, 64}, false},       // not a target
      {"lm_head.weight", {100, 64}, true},                   // not a target
      optim::param_info_for("layers.0.input_layernorm.weight", {64}),
  };
  for (const auto& info : params) {
    CAPTURE(info.name);
    CHECK(!gal.projects(info));
    CHECK(!gol.projects(info));
    auto w_ref = testing::random_tensor<float>(info.shape, seed);
    auto w_gal = copy_of(w_ref), w_gol = copy_of(w_ref);
    auto s_ref = inner.init(ex, info);
    auto s_gal = gal.init(ex, info);
    auto s_gol = gol.init(ex, info);
    CHECK(gal.state_bytes(s_gal) == inner.state_bytes(s_ref));
    CHECK(gal.state_bytes_for(info) == inner.state_bytes(s_ref));
    for (std::int64_t t = 1; t <= 4; ++t) {
      const auto g = testing::random_tensor<bf16>(info.shape, seed + std::uint64_t(t));
      const optim::step_context ctx{1e-2f, t};
      inner.step(ex, w_ref.v(), g.v(), s_ref, info, ctx);
      gal.step(ex, w_gal.v(), g.v(), s_gal, info, ctx);
      gol.step(ex, w_gol.v(), g.v(), s_gol, info, ctx);
    }
    CHECK(same_bits(w_gal, w_ref));
    CHECK(same_bits(w_gol, w_ref));
  }
}

TEST_CASE("galore: the target rule picks the attention and MLP matrices of the Llama names") {
  const optim::galore<> opt{.rank = 4};
  CHECK(opt.projects({"model.layers.0.self_attn.q_proj.weight", {64, 64}, true}));
  CHECK(opt.projects({"model.layers.7.mlp.down_proj.weight", {64, 172}, true}));
  CHECK(!opt.projects({"model.embed_tokens.weight", {256, 64}, false}));
  CHECK(!opt.projects({"lm_head.weight", {256, 64}, true}));
  CHECK(!opt.projects({"model.layers.0.post_attention_layernorm.weight", {64}, false}));
  CHECK(!opt.projects({"model.layers.0.mlp.bias", {64}, false}));
  const optim::galore<> every{.rank = 4, .target = &optim::any_matrix};
  CHECK(every.projects({"lm_head.weight", {256, 64}, true}));
}

// === refresh schedule and moments ===============================================================================

namespace {

/// Runs `steps` steps of opt on one matrix with fresh gradients; calls after(t, state) after step t (1-based).
template <class O, class F>
void drive(const O& opt, const optim::param_info& info, std::uint64_t seed, int steps, F&& after) {
  auto w = testing::random_tensor<float>(info.shape, seed);
  auto st = opt.init(ex, info);
  for (int t = 1; t <= steps; ++t) {
    const auto g = testing::random_tensor<float>(info.shape, seed + 1000 + std::uint64_t(t));
    opt.step(ex, w.v(), g.v(), st, info, optim::step_context{1e-3f, t});
    after(t, st, w);
  }
}

}  // namespace

TEST_CASE("refresh schedule: P changes exactly at s = 0, tau, 2 tau, ... (GaLore and GoLore, both sides)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const shape s : {shape{24, 16}, shape{16, 24}}) {
    CAPTURE(to_string(s));
    const optim::param_info info{"layers.0.mlp.gate_proj.weight", s, true};
    const auto check = [&](const auto& opt, const char* name) {
      const std::string label = name;
      CAPTURE(label);
      host_tensor<float> previous;
      drive(opt, info, seed, 23, [&](int t, const auto& st, const auto&) {
        const bool refreshed_now = (t - 1) % 5 == 0;  // s = t - 1 before the increment
        if (t > 1) {
          CAPTURE(t);
          CHECK(same_bits(st.p, previous) == !refreshed_now);
        }
        CHECK(st.steps == t);
        CHECK(st.refreshes == (t - 1) / 5 + 1);
        previous = copy_of(st.p);
      });
    };
    check(optim::galore<>{.rank = 3, .refresh_period = 5}, "galore");
    check(optim::golore<>{.rank = 3, .refresh_period = 5, .random_percent = 100, .seed = seed}, "golore");
  }
}

TEST_CASE("GoLore@x%: the source switches at the first refresh with s >= (1 - x/100) S_total, x = 0 and 100") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const optim::param_info info{"layers.0.self_attn.o_proj.weight", {20, 12}, true};
  const optim::golore<> at35{.rank = 3, .refresh_period = 10, .random_percent = 35, .total_steps = 100, .seed = 3};
  CHECK(at35.first_random_refresh() == 70);  // (1 - 0.35) * 100 = 65 -> the refresh at 70
  CHECK(!at35.uses_random_projector(60));
  CHECK(at35.uses_random_projector(65));
  const optim::golore<> at20{.rank = 3, .refresh_period = 200, .random_percent = 20, .total_steps = 10000};
  CHECK(at20.first_random_refresh() == 8000);
  CHECK(!at20.uses_random_projector(7999));
  CHECK(at20.uses_random_projector(8000));
  drive(at35, info, seed, 100, [&](int t, const auto& st, const auto&) {
    CAPTURE(t);
    CHECK(st.source() == (t - 1 >= 70 ? optim::projector_source::random : optim::projector_source::svd));
  });

  // x = 0 is GaLore with reprojected moments, bit for bit; x = 100 is pure GoLore whatever total_steps says.
  const auto final_weights = [&](const auto& opt) {
    host_tensor<float> out;
    drive(opt, info, seed, 25, [&](int, const auto&, const auto& w) { out = copy_of(w); });
    return out;
  };
  const optim::galore<> galore_reproject{.rank = 3, .refresh_period = 10, .reproject_moments = true};
  const optim::golore<> at0{.rank = 3, .refresh_period = 10, .random_percent = 0, .total_steps = 25};
  CHECK(same_bits(final_weights(galore_reproject), final_weights(at0)));
  const optim::golore<> pure{.rank = 3, .refresh_period = 10, .random_percent = 100, .seed = 4};
  const optim::golore<> pure_planned{
      .rank = 3, .refresh_period = 10, .random_percent = 100, .total_steps = 25, .seed = 4};
  CHECK(same_bits(final_weights(pure), final_weights(pure_planned)));
  drive(pure, info, seed, 25,
        [&](int, const auto& st, const auto&) { CHECK(st.source() == optim::projector_source::random); });
}

TEST_CASE("moments at a refresh: GaLore keeps M, GaLore(reproject) and GoLore map M into the new basis, V never") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const shape s : {shape{18, 10}, shape{10, 18}}) {
    CAPTURE(to_string(s));
    const optim::param_info info{"layers.1.mlp.up_proj.weight", s, false};
    const auto check = [&](const auto& opt, bool reprojects, const char* name) {
      const std::string label = name;
      CAPTURE(label);
      auto w = testing::random_tensor<float>(s, seed);
      auto st = opt.init(ex, info);
      const float b1 = opt.inner.beta1, b2 = opt.inner.beta2;
      for (int t = 1; t <= 9; ++t) {
        const auto g = testing::random_tensor<float>(s, seed + 77 + std::uint64_t(t));
        const auto m_before = copy_of(st.m), v_before = copy_of(st.v), p_before = copy_of(st.p);
        opt.step(ex, w.v(), g.v(), st, info, optim::step_context{1e-3f, t});
        if ((t - 1) % 4 != 0 || t == 1) continue;  // refreshes at s = 4, 8 (t = 5, 9)
        CAPTURE(t);
        // Expected: M = b1 M' + (1 - b1) R and V = b2 V + (1 - b2) R^2, with R projected on the new P and M' the
        // old M, mapped into the new basis when the policy reprojects.
        const auto& p = st.geometry;
        host_tensor<float> r(p.moment_shape());
        optim::project(ex, p, g.v(), st.p.v(), r.v());
        auto m_prime = copy_of(m_before);
        if (reprojects)
          optim::reproject_first_moment(ex, p, view<const float, host_space>(p_before.v()),
                                        view<const float, host_space>(st.p.v()), m_prime.v());
        host_tensor<double> m_exp(p.moment_shape()), v_exp(p.moment_shape());
        for (std::int64_t i = 0; i < r.numel(); ++i) {
          const double ri = r.data()[i];
          m_exp.data()[i] = double(b1) * m_prime.data()[i] + (1.0 - double(b1)) * ri;
          v_exp.data()[i] = double(b2) * v_before.data()[i] + (1.0 - double(b2)) * ri * ri;
        }
        CHECK(!same_bits(st.p, p_before));
        CHECK(testing::rel_error(st.m, m_exp) <= 1e-6);
        CHECK(testing::rel_error(st.v, v_exp) <= 1e-6);
      }
    };
    check(optim::galore<>{.rank = 4, .refresh_period = 4}, false, "galore");
    check(optim::galore<>{.rank = 4, .refresh_period = 4, .reproject_moments = true}, true, "galore, reproject");
    check(optim::golore<>{.rank = 4, .refresh_period = 4, .random_percent = 100, .seed = 9}, true, "golore");
    check(optim::golore<>{.rank = 4, .refresh_period = 4, .random_percent = 50, .total_steps = 12}, true, "golore@50%");
  }
}

TEST_CASE("golore: ranks with different local gradients hold bitwise-equal projectors (shared seed, no traffic)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const optim::golore<> opt{.rank = 4, .refresh_period = 3, .random_percent = 100, .seed = seed};
  const optim::param_info info{"model.layers.2.self_attn.k_proj.weight", {16, 32}, true};
  std::vector<host_tensor<float>> weights;
  std::vector<decltype(opt.init(ex, info))> states;
  for (int rank = 0; rank < 4; ++rank) {
    weights.push_back(testing::random_tensor<float>(info.shape, seed + std::uint64_t(rank)));
    states.push_back(opt.init(ex, info));
  }
  for (int t = 1; t <= 7; ++t)
    for (int rank = 0; rank < 4; ++rank) {
      const auto g = testing::random_tensor<float>(info.shape, seed + 100 * std::uint64_t(rank + 1) + std::uint64_t(t));
      opt.step(ex, weights[std::size_t(rank)].v(), g.v(), states[std::size_t(rank)], info,
               optim::step_context{1e-3f, t});
    }
  for (int rank = 1; rank < 4; ++rank) CHECK(same_bits(states[std::size_t(rank)].p, states[0].p));
}

// === configuration errors ==========================================================================================

TEST_CASE("bad configurations raise invalid_argument saying what to change") {
  const optim::param_info info{"model.layers.0.self_attn.q_proj.weight", {32, 16}, true};
  CHECK_THROWS_WITH_AS((optim::galore<>{.rank = 4, .refresh_period = 0}.init(ex, info)),
                       doctest::Contains("refresh_period (tau) must be at least 1"), invalid_argument);
  CHECK_THROWS_WITH_AS((optim::golore<>{.rank = 4, .refresh_period = 0, .random_percent = 100}.init(ex, info)),
                       doctest::Contains("refresh_period (tau) must be at least 1"), invalid_argument);
  CHECK_THROWS_WITH_AS((optim::galore<>{.rank = -1}.init(ex, info)), doctest::Contains("rank must be at least 1"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS((optim::galore<>{.rank = 4, .scale = 0.0f}.init(ex, info)), doctest::Contains("scale"),
                       invalid_argument);
  // r > min(m, n): the matrix falls back to the inner optimizer; require_projection makes it an error.
  CHECK_THROWS_WITH_AS((optim::galore<>{.rank = 20, .require_projection = true}.init(ex, info)),
                       doctest::Contains("rank r = 20 exceeds min(m, n) = 16"), invalid_argument);
  CHECK_THROWS_WITH_AS((optim::golore<>{.rank = 16, .random_percent = 100, .require_projection = true}.init(ex, info)),
                       doctest::Contains("rank r = 16 equals min(m, n) = 16"), invalid_argument);
  CHECK_NOTHROW((optim::galore<>{.rank = 20}.init(ex, info)));
  // GoLore@x% needs the planned step count.
  CHECK_THROWS_WITH_AS((optim::golore<>{.rank = 4, .random_percent = 20}.init(ex, info)),
                       doctest::Contains("set total_steps"), invalid_argument);
  CHECK_THROWS_WITH_AS((optim::golore<>{.rank = 4, .random_percent = 120, .total_steps = 10}.init(ex, info)),
                       doctest::Contains("random_percent"), invalid_argument);
  // State of another parameter, and step counts that are not 1-based.
  const optim::galore<> opt{.rank = 4};
  auto st = opt.init(ex, optim::param_info{"model.layers.0.self_attn.k_proj.weight", {16, 32}, true, {}});
  auto w = testing::random_tensor<float>(info.shape, 1), g = testing::random_tensor<float>(info.shape, 2);
  CHECK_THROWS_WITH_AS(opt.step(ex, w.v(), g.v(), st, info, optim::step_context{1e-3f, 1}), doctest::Contains("q_proj"),
                       invalid_argument);
  auto good = opt.init(ex, info);
  CHECK_THROWS_WITH_AS(opt.step(ex, w.v(), g.v(), good, info, optim::step_context{1e-3f, 0}),
                       doctest::Contains("1-based"), invalid_argument);
}

// === memory accounting ===========================================================================================

namespace {

/// The parameters of nn/llama.hpp (Hugging Face names, [out, in] weights), from the configuration.
std::vector<optim::param_info> llama_params(const nn::llama_config& cfg) {
  std::vector<optim::param_info> out;
  const std::int64_t d = cfg.d_model, kv = cfg.kv_dim(), f = cfg.ffn_hidden;
  out.push_back({"model.embed_tokens.weight", {cfg.vocab, d}, false});
  for (std::int64_t l = 0; l < cfg.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    out.push_back({p + "self_attn.q_proj.weight", {d, d}, true});
    out.push_back({p + "self_attn.k_proj.weight", {kv, d}, true});
    out.push_back({p + "self_attn.v_proj.weight", {kv, d}, true});
    out.push_back({p + "self_attn.o_proj.weight", {d, d}, true});
    out.push_back({p + "mlp.gate_proj.weight", {f, d}, true});
    out.push_back({p + "mlp.up_proj.weight", {f, d}, true});
    out.push_back({p + "mlp.down_proj.weight", {d, f}, true});
    out.push_back({p + "input_layernorm.weight", {d}, false});
    out.push_back({p + "post_attention_layernorm.weight", {d}, false});
  }
  out.push_back({"model.norm.weight", {d}, false});
  if (!cfg.tied_embeddings) out.push_back({"lm_head.weight", {cfg.vocab, d}, true});
  return out;
}

}  // namespace

TEST_CASE("memory: state bytes are 4 (2 max(m, n) r + r min(m, n)) per projected matrix, as allocated") {
  const optim::galore<> gal{.rank = 8};
  const optim::golore<> gol{.rank = 8, .random_percent = 100};
  for (const shape s : {shape{64, 32}, shape{32, 64}, shape{40, 40}, shape{9, 100}}) {
    CAPTURE(to_string(s));
    const optim::param_info info{"layers.0.mlp.w", s, true};
    const std::int64_t mx = std::max(s[0], s[1]), mn = std::min(s[0], s[1]);
    const std::size_t expected = std::size_t(4 * (2 * mx * 8 + 8 * mn));
    const auto st = gal.init(ex, info);
    CHECK(gal.state_bytes(st) == expected);
    CHECK(gal.state_bytes_for(info) == expected);
    CHECK(gol.state_bytes(gol.init(ex, info)) == expected);
  }
}

TEST_CASE("memory: Llama-60M at r = 128 — the state formula, against full AdamW") {
  const auto cfg = nn::presets::llama_60m();
  const auto params = llama_params(cfg);
  const optim::galore<> gal{.rank = 128};
  const optim::golore<> gol{.rank = 128, .random_percent = 20, .total_steps = 10000};
  const optim::adamw adam = optim::subspace_rule<optim::adamw>::reference();
  std::size_t galore_total = 0, golore_total = 0, adam_total = 0, projected_galore = 0, projected_adam = 0, formula = 0;
  int projected = 0;
  std::set<std::uint32_t> ids;
  for (const auto& info : params) {
    const std::size_t a = optim::subspace_rule<optim::adamw>::state_bytes_for(adam, info);
    const std::size_t g = gal.state_bytes_for(info);
    galore_total += g;
    golore_total += gol.state_bytes_for(info);
    adam_total += a;
    if (gal.projects(info)) {
      ++projected;
      ids.insert(optim::param_id_of(info.name));
      const std::int64_t mx = std::max(info.shape[0], info.shape[1]), mn = std::min(info.shape[0], info.shape[1]);
      formula += std::size_t(4 * (2 * mx * 128 + 128 * mn));
      projected_galore += g;
      projected_adam += a;
    } else {
      CHECK(g == a);
    }
  }
  CHECK(projected == 7 * 8);
  CHECK(ids.size() == std::size_t(projected));  // GoLore's param ids are distinct
  CHECK(projected_galore == formula);
  // Per layer: q, k, v, o are 512 x 512 -> 4 (2*512*128 + 128*512) = 786,432 B each; gate and up are 1376 x 512
  // and down 512 x 1376 -> 4 (2*1376*128 + 128*512) = 1,671,168 B each.
  CHECK(projected_galore == std::size_t(8 * (4 * 786432 + 3 * 1671168)));
  CHECK(projected_galore == 65273856);
  CHECK(projected_adam == 202375168);
  CHECK(adam_total == 464588800);
  CHECK(galore_total == 327487488);
  CHECK(golore_total == galore_total);
  MESSAGE("Llama-60M, r = 128: projected matrices "
          << projected_galore << " B (AdamW " << projected_adam << " B, -"
          << 100.0 * (1.0 - double(projected_galore) / double(projected_adam)) << "%); whole model " << galore_total
          << " B (AdamW " << adam_total << " B, -" << 100.0 * (1.0 - double(galore_total) / double(adam_total))
          << "%)");
  // A projected 60M matrix actually allocates what state_bytes_for says.
  const optim::param_info down{"model.layers.0.mlp.down_proj.weight", {512, 1376}, true};
  CHECK(gal.state_bytes(gal.init(ex, down)) == 1671168);
}

// === the Optimizer conformance suite ===============================================================================

namespace {

std::vector<optim::param_info> conformance_params() {
  return {{"layers.0.self_attn.q_proj.weight", {12, 8}, true},  // projected, right side
          {"layers.0.mlp.down_proj.weight", {6, 10}, true},     // projected, left side
          {"layers.0.mlp.small", {3, 5}, true},                 // a target with min(m, n) = rank: Inner
          {"model.embed_tokens.weight", {9, 5}, false},         // not a target: Inner
          optim::param_info_for("model.norm.weight", {11})};
}

struct galore_fixture {
  using optimizer = optim::galore<>;
  static optimizer make() { return {.rank = 3, .refresh_period = 2}; }
  static std::vector<optim::param_info> params() { return conformance_params(); }
};

struct galore_reproject_fixture {
  using optimizer = optim::galore<>;
  static optimizer make() {
    return {.inner = optim::adamw{0.9f, 0.99f, 1e-8f, 0.1f},
            .rank = 3,
            .refresh_period = 2,
            .scale = 0.25f,
            .reproject_moments = true};
  }
  static std::vector<optim::param_info> params() { return conformance_params(); }
};

struct golore_fixture {
  using optimizer = optim::golore<>;
  // Refreshes at s = 0 (SVD) and s = 2 (random: 100 * 2 >= 50 * 3).
  static optimizer make() {
    return {.rank = 3, .refresh_period = 2, .random_percent = 50, .total_steps = 3, .seed = 11};
  }
  static std::vector<optim::param_info> params() { return conformance_params(); }
};

}  // namespace

TYPE_TO_STRING(galore_fixture);
TYPE_TO_STRING(galore_reproject_fixture);
TYPE_TO_STRING(golore_fixture);
TEST_CASE_TEMPLATE_APPLY(optimizer_conformance, std::tuple<galore_fixture, galore_reproject_fixture, golore_fixture>);

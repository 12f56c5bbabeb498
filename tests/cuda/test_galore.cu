// GaLore and GoLore on CUDA against the host (docs/galore.md): cuSOLVER's SVD and QR
// against the host's fp64 Jacobi and Householder, GoLore's Gaussian bits and projectors, and whole optimizer
// steps (refreshes, reprojection, bf16 gradients, the fallback to AdamW) on the same gradients.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <subspace/kernels/linalg.hpp>
#include <subspace/optim/galore.hpp>
#include <subspace/optim/golore.hpp>
#include <subspace/optim/projector.hpp>
#include <subspace/subspace.hpp>
#include <tuple>
#include <vector>

#include "support/cuda.hpp"
#include "support/numeric.hpp"

using namespace subspace;
using optim::projection_side;

namespace {

const exec::host host{};

template <class T>
host_tensor<T> copy_of(const host_tensor<T>& x) {
  host_tensor<T> y(x.shape());
  copy(host, x.v(), y.v());
  return y;
}

template <class T, class U>
host_tensor<T> converted(const host_tensor<U>& x) {
  host_tensor<T> y(x.shape());
  for (std::int64_t i = 0; i < x.numel(); ++i) y.data()[i] = convert<T>(x.data()[i]);
  return y;
}

/// max |a - b| over all elements, and where (printed when a check fails).
template <class A, class B>
double max_abs_diff(const host_tensor<A>& a, const host_tensor<B>& b, std::int64_t* where = nullptr) {
  REQUIRE(a.shape() == b.shape());
  double e = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double d = std::abs(double(a.data()[i]) - double(b.data()[i]));
    if (!(d <= e)) {
      e = d;
      if (where) *where = i;
    }
  }
  return e;
}

/// Prints the first few elements of both sides, for failing comparisons.
template <class A, class B>
std::string head(const host_tensor<A>& a, const host_tensor<B>& b, std::int64_t at) {
  std::string s = "at flat index " + std::to_string(at) + ": device " + std::to_string(double(a.data()[at])) +
                  " host " + std::to_string(double(b.data()[at])) + "; first elements device/host:";
  for (std::int64_t i = 0; i < std::min<std::int64_t>(4, a.numel()); ++i)
    s += " " + std::to_string(double(a.data()[i])) + "/" + std::to_string(double(b.data()[i]));
  return s;
}

host_tensor<double> random_orthonormal(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  const auto g = testing::random_tensor<double>({rows, cols}, seed);
  host_tensor<double> q({rows, cols});
  orthonormalize(host, g.v(), q.v());
  return q;
}

/// G = X diag(sigma) Y^T in fp32 with random orthonormal X, Y and sigma_j = scale * 0.8^j: every consecutive
/// singular value ratio is 1.25, so every leading singular subspace is well determined.
host_tensor<float> designed(std::int64_t m, std::int64_t n, std::uint64_t seed, double scale = 1.0) {
  const std::int64_t k = std::min(m, n);
  const auto x = random_orthonormal(m, k, seed), y = random_orthonormal(n, k, seed + 1);
  host_tensor<float> g({m, n});
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t l = 0; l < n; ++l) {
      double s = 0;
      for (std::int64_t j = 0; j < k; ++j) s += x(i, j) * scale * std::pow(0.8, double(j)) * y(l, j);
      g(i, l) = float(s);
    }
  return g;
}

/// max |P P^T - I| (right) or |P^T P - I| (left).
double orthonormality_error(const host_tensor<float>& p, projection_side side) {
  const bool cols = side == projection_side::left;
  const std::int64_t k = cols ? p.dim(1) : p.dim(0), len = cols ? p.dim(0) : p.dim(1);
  double e = 0;
  for (std::int64_t i = 0; i < k; ++i)
    for (std::int64_t j = 0; j < k; ++j) {
      double s = 0;
      for (std::int64_t l = 0; l < len; ++l) s += cols ? double(p(l, i)) * p(l, j) : double(p(i, l)) * p(j, l);
      e = std::max(e, std::abs(s - (i == j ? 1.0 : 0.0)));
    }
  return e;
}

/// The sine of the largest principal angle between the spans of the projectors a and b (same side).
double sin_largest_angle(const host_tensor<float>& a, const host_tensor<float>& b, projection_side side) {
  // Rows span the subspace on the right, columns on the left: bring both to rows (r x len).
  const auto rows = [&](const host_tensor<float>& p) {
    host_tensor<double> r(side == projection_side::right ? p.shape() : shape{p.dim(1), p.dim(0)});
    for (std::int64_t i = 0; i < r.dim(0); ++i)
      for (std::int64_t j = 0; j < r.dim(1); ++j) r(i, j) = side == projection_side::right ? p(i, j) : p(j, i);
    return r;
  };
  const auto ra = rows(a), rb = rows(b);
  const std::int64_t r = ra.dim(0), n = ra.dim(1);
  host_tensor<double> bat({r, r}), resid({n, r}), s({1});
  gemm(host, op::none, op::transpose, 1.0f, rb.v(), ra.v(), 0.0f, bat.v());
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < r; ++j) {
      double v = ra(j, i);
      for (std::int64_t l = 0; l < r; ++l) v -= rb(l, i) * bat(l, j);
      resid(i, j) = v;
    }
  svd(host, resid.v(), s.v(), view<double, host_space>{}, view<double, host_space>{});
  return s(0);
}

}  // namespace

// === factorisations ==============================================================================================

TEST_CASE("svd (CUDA, gesvdj fp64): singular values, subspaces and signs match the host's fp64 Jacobi") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  testing::stream_guard sg;
  const exec::cuda dev{sg.stream};
  for (const auto& [m, n] : {std::pair{64, 32}, std::pair{32, 64}, std::pair{300, 257}, std::pair{96, 96}}) {
    CAPTURE(m);
    CAPTURE(n);
    const std::int64_t k = std::min(m, n), r = std::min<std::int64_t>(8, k - 1);
    const auto a = designed(m, n, seed + std::uint64_t(m));
    const auto a_d = to_device(dev, a.v());
    host_tensor<float> s_h({k}), u_h({m, r}), vt_h({r, n});
    svd(host, a.v(), s_h.v(), u_h.v(), vt_h.v());
    device_tensor<float> s_d({k}), u_d({m, r}), vt_d({r, n});
    svd(dev, view<const float, device_space>(a_d.v()), s_d.v(), u_d.v(), vt_d.v());
    const auto s = to_host(dev, s_d.v()), u = to_host(dev, u_d.v()), vt = to_host(dev, vt_d.v());
    std::int64_t at = 0;
    const double s_err = max_abs_diff(s, s_h, &at);
    CAPTURE(head(s, s_h, at));
    CHECK(s_err <= 1e-5);
    const double u_err = max_abs_diff(u, u_h, &at);
    CAPTURE(head(u, u_h, at));
    CHECK(u_err <= 1e-4);  // equal vectors (the sign convention), to fp32 rounding of the fp64 Jacobi
    const double vt_err = max_abs_diff(vt, vt_h, &at);
    CAPTURE(head(vt, vt_h, at));
    CHECK(vt_err <= 1e-4);
    CHECK(orthonormality_error(vt, projection_side::right) <= 1e-5);
    CHECK(orthonormality_error(u, projection_side::left) <= 1e-5);
  }
}

TEST_CASE("svd (CUDA): bf16 input is widened exactly, outputs may be skipped") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  testing::stream_guard sg;
  const exec::cuda dev{sg.stream};
  const auto a = converted<bf16>(designed(48, 20, seed));
  const auto a_d = to_device(dev, a.v());
  device_tensor<float> vt_d({5, 20});
  svd(dev, view<const bf16, device_space>(a_d.v()), view<float, device_space>{}, view<float, device_space>{}, vt_d.v());
  host_tensor<float> vt_h({5, 20});
  svd(host, a.v(), view<float, host_space>{}, view<float, host_space>{}, vt_h.v());
  std::int64_t at = 0;
  const auto vt = to_host(dev, vt_d.v());
  const double err = max_abs_diff(vt, vt_h, &at);
  CAPTURE(head(vt, vt_h, at));
  CHECK(err <= 1e-4);
}

TEST_CASE("orthonormalize (CUDA, geqrf + orgqr fp64): Q equals the host's Householder Q to 1e-6") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  testing::stream_guard sg;
  const exec::cuda dev{sg.stream};
  for (const auto& [rows, cols] : {std::pair{8, 2}, std::pair{100, 37}, std::pair{512, 128}, std::pair{64, 64}}) {
    CAPTURE(rows);
    CAPTURE(cols);
    const auto a = testing::random_tensor<float>({rows, cols}, seed + std::uint64_t(rows));
    host_tensor<float> q_h({rows, cols});
    orthonormalize(host, a.v(), q_h.v());
    const auto a_d = to_device(dev, a.v());
    device_tensor<float> q_d({rows, cols});
    orthonormalize(dev, view<const float, device_space>(a_d.v()), q_d.v());
    const auto q = to_host(dev, q_d.v());
    std::int64_t at = 0;
    const double err = max_abs_diff(q, q_h, &at);
    CAPTURE(head(q, q_h, at));
    CHECK(err <= 1e-6);
    CHECK(orthonormality_error(q, projection_side::left) <= 1e-6);
  }
}

// === projectors ==================================================================================================

TEST_CASE("golore (CUDA): Gaussian bits equal the host's, projectors equal to rounding and orthonormal in fp32") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  testing::stream_guard sg;
  const exec::cuda dev{sg.stream};
  for (const auto& [m, n, r] : {std::tuple{64, 32, 8}, std::tuple{32, 64, 8}, std::tuple{1376, 512, 128},
                                std::tuple{512, 1376, 128}, std::tuple{37, 29, 5}}) {
    CAPTURE(m);
    CAPTURE(n);
    const auto p = optim::make_projection(m, n, r);
    const std::uint32_t id = optim::param_id_of("model.layers.3.mlp.up_proj.weight");
    host_tensor<float> omega_h(p.omega_shape());
    device_tensor<float> omega_d(p.omega_shape());
    optim::golore_gaussian(host, p, seed, id, 17u, omega_h.v());
    optim::golore_gaussian(dev, p, seed, id, 17u, omega_d.v());
    const auto omega = to_host(dev, omega_d.v());
    const std::int64_t first = testing::first_difference(omega, omega_h);
    CAPTURE(first);
    CHECK(first == -1);

    host_tensor<float> p_h(p.projector_shape());
    device_tensor<float> p_d(p.projector_shape());
    optim::golore_projector(host, p, seed, id, 17u, p_h.v());
    optim::golore_projector(dev, p, seed, id, 17u, p_d.v());
    const auto pd = to_host(dev, p_d.v());
    std::int64_t at = 0;
    const double err = max_abs_diff(pd, p_h, &at);
    CAPTURE(head(pd, p_h, at));
    CHECK(err <= 1e-5);
    CHECK(orthonormality_error(pd, p.side) <= 1e-6);
  }
}

TEST_CASE("galore (CUDA): the projector spans the host's top-r singular subspace (largest angle <= 1e-4)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  testing::stream_guard sg;
  const exec::cuda dev{sg.stream};
  for (const auto& [m, n, r] : {std::tuple{64, 32, 8}, std::tuple{32, 64, 8}, std::tuple{400, 160, 32}}) {
    CAPTURE(m);
    CAPTURE(n);
    const auto p = optim::make_projection(m, n, r);
    const auto g = designed(m, n, seed + std::uint64_t(n));
    host_tensor<float> p_h(p.projector_shape());
    optim::galore_projector(host, p, g.v(), p_h.v());
    const auto g_d = to_device(dev, g.v());
    device_tensor<float> p_d(p.projector_shape());
    optim::galore_projector(dev, p, view<const float, device_space>(g_d.v()), p_d.v());
    const auto pd = to_host(dev, p_d.v());
    const double angle = sin_largest_angle(pd, p_h, p.side);
    CAPTURE(angle);
    CHECK(angle <= 1e-4);
    CHECK(orthonormality_error(pd, p.side) <= 1e-6);
  }
}

// === optimizer steps =============================================================================================

namespace {

/// Runs `steps` steps of opt on host and device from the same weights and gradients; compares weights, update,
/// moments, projector and the working copy after every step.
template <class O, class G>
void compare_steps(const O& opt, const optim::param_info& info, std::uint64_t seed, int steps, const char* label) {
  const std::string what = label;
  CAPTURE(what);
  CAPTURE(info.name);
  CAPTURE(to_string(info.shape));
  CAPTURE(dtype_name<G>());
  testing::stream_guard sg;
  const exec::cuda dev{sg.stream};
  auto w_h = testing::random_tensor<float>(info.shape, seed);
  const auto w0 = copy_of(w_h);
  auto w_d = to_device(dev, w_h.v());
  auto st_h = opt.init(host, info);
  auto st_d = opt.init(dev, info);
  CHECK(opt.state_bytes(st_d) == opt.state_bytes(st_h));
  host_tensor<bf16> work_h(info.shape);
  device_tensor<bf16> work_d(info.shape);
  const bool matrix = info.shape.rank == 2;
  for (int t = 1; t <= steps; ++t) {
    CAPTURE(t);
    // Gradients with a clear spectral gap at every rank (so GaLore's subspace is well determined), varying per step.
    const auto g32 = matrix ? designed(info.shape[0], info.shape[1], seed + 10 * std::uint64_t(t), 0.05 * t)
                            : testing::random_tensor<float>(info.shape, seed + std::uint64_t(t));
    const auto g = converted<G>(g32);
    const auto g_d = to_device(dev, g.v());
    const optim::step_context ctx{1e-2f / float(t), t};
    opt.step(host, w_h.v(), g.v(), st_h, info, ctx, work_h.v());
    opt.step(dev, w_d.v(), view<const G, device_space>(g_d.v()), st_d, info, ctx, work_d.v());
    const auto w = to_host(dev, w_d.v());
    const auto work = to_host(dev, work_d.v());

    std::int64_t at = 0;
    CHECK(testing::rel_error(w, w_h) <= 1e-5);
    host_tensor<double> du_d(info.shape), du_h(info.shape);
    for (std::int64_t i = 0; i < w.numel(); ++i) {
      du_d.data()[i] = double(w.data()[i]) - double(w0.data()[i]);
      du_h.data()[i] = double(w_h.data()[i]) - double(w0.data()[i]);
    }
    const double update_err = testing::rel_error(du_d, du_h);
    CAPTURE(update_err);
    CHECK(update_err <= 1e-3);
    host_tensor<bf16> expected(info.shape);
    for (std::int64_t i = 0; i < expected.numel(); ++i) expected.data()[i] = bf16(w.data()[i]);
    CHECK(testing::first_difference(work, expected) == -1);
    if (st_h.projected()) {
      REQUIRE(st_d.projected());
      CHECK(st_d.steps == st_h.steps);
      CHECK(st_d.source() == st_h.source());
      const auto p = to_host(dev, st_d.p.v());
      const double p_err = max_abs_diff(p, st_h.p, &at);
      CAPTURE(head(p, st_h.p, at));
      CHECK(p_err <= (st_h.source() == optim::projector_source::random ? 1e-5 : 1e-4));
      const auto m = to_host(dev, st_d.m.v()), v = to_host(dev, st_d.v.v());
      CHECK(testing::rel_error(m, st_h.m) <= 1e-3);
      CHECK(testing::rel_error(v, st_h.v) <= 1e-3);
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("galore/golore (CUDA): steps agree with the host on the same gradients", G, float, bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const optim::adamw inner{0.9f, 0.999f, 1e-6f, 0.05f};
  const std::vector<optim::param_info> params = {
      {"model.layers.0.mlp.gate_proj.weight", {96, 40}, true},  // right side
      {"model.layers.0.mlp.down_proj.weight", {40, 96}, true},  // left side
      {"model.layers.0.self_attn.q_proj.weight", {48, 48}, true},
      {"model.layers.0.self_attn.k_proj.weight", {8, 48}, true},  // min(m, n) <= r: AdamW
      {"model.embed_tokens.weight", {50, 16}, false},             // not a target: AdamW
      optim::param_info_for("model.norm.weight", {40}),
  };
  const optim::galore<> gal{.inner = inner, .rank = 8, .refresh_period = 3, .scale = 0.5f};
  const optim::galore<> gal_re{.inner = inner, .rank = 8, .refresh_period = 3, .reproject_moments = true};
  const optim::golore<> gol{
      .inner = inner, .rank = 8, .refresh_period = 3, .random_percent = 50, .total_steps = 8, .seed = seed};
  for (const auto& info : params) {
    compare_steps<optim::galore<>, G>(gal, info, seed, 8, "galore");
    compare_steps<optim::galore<>, G>(gal_re, info, seed, 8, "galore, reproject_moments");
    compare_steps<optim::golore<>, G>(gol, info, seed, 8, "golore@50%");
  }
}

TEST_CASE("golore (CUDA): states on one device with different gradients hold bitwise-equal projectors") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  testing::stream_guard sg;
  const exec::cuda dev{sg.stream};
  const optim::golore<> opt{.rank = 16, .refresh_period = 2, .random_percent = 100, .seed = seed};
  const optim::param_info info{"model.layers.1.self_attn.v_proj.weight", {128, 64}, true};
  auto a = opt.init(dev, info), b = opt.init(dev, info);
  const auto wa_h = testing::random_tensor<float>(info.shape, seed),
             wb_h = testing::random_tensor<float>(info.shape, seed + 1);
  auto wa = to_device(dev, wa_h.v());
  auto wb = to_device(dev, wb_h.v());
  for (int t = 1; t <= 5; ++t) {
    const auto ga_h = testing::random_tensor<float>(info.shape, seed + 10 + std::uint64_t(t));
    const auto gb_h = testing::random_tensor<float>(info.shape, seed + 20 + std::uint64_t(t));
    const auto ga = to_device(dev, ga_h.v());
    const auto gb = to_device(dev, gb_h.v());
    opt.step(dev, wa.v(), ga.v(), a, info, optim::step_context{1e-3f, t});
    opt.step(dev, wb.v(), gb.v(), b, info, optim::step_context{1e-3f, t});
    dev.synchronize();
  }
  const auto pa = to_host(dev, a.p.v()), pb = to_host(dev, b.p.v());
  CHECK(testing::first_difference(pa, pb) == -1);
}

TEST_CASE("subspace_adam_step (CUDA) with P = I equals the host's to 1e-6") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  testing::stream_guard sg;
  const exec::cuda dev{sg.stream};
  const std::int64_t m = 40, n = 24;
  const auto p = optim::make_projection(m, n, n);
  host_tensor<float> eye({n, n});
  fill(host, eye.v(), 0.0f);
  for (std::int64_t i = 0; i < n; ++i) eye(i, i) = 1.0f;
  const auto eye_d = to_device(dev, eye.v());
  const optim::subspace_adam h{0.9f, 0.999f, 1e-6f, 0.1f};
  auto w_h = testing::random_tensor<float>({m, n}, seed);
  auto w_d = to_device(dev, w_h.v());
  host_tensor<float> m_h({m, n}), v_h({m, n});
  fill(host, m_h.v(), 0.0f);
  fill(host, v_h.v(), 0.0f);
  auto m_d = to_device(dev, m_h.v()), v_d = to_device(dev, v_h.v());
  host_tensor<bf16> work_h({m, n});
  device_tensor<bf16> work_d({m, n});
  for (std::int64_t s = 1; s <= 5; ++s) {
    CAPTURE(s);
    const auto g = testing::random_tensor<float>({m, n}, seed + std::uint64_t(s), 0.0f, 0.1f * float(s));
    const auto g_d = to_device(dev, g.v());
    optim::subspace_adam_step(host, p, w_h.v(), g.v(), m_h.v(), v_h.v(), view<const float, host_space>(eye.v()), h, 0.5,
                              s, 1e-2, true, work_h.v());
    optim::subspace_adam_step(dev, p, w_d.v(), g_d.v(), m_d.v(), v_d.v(), eye_d.v(), h, 0.5, s, 1e-2, true, work_d.v());
    const auto w = to_host(dev, w_d.v()), mm = to_host(dev, m_d.v()), vv = to_host(dev, v_d.v());
    CHECK(testing::rel_error(w, w_h) <= 1e-6);
    CHECK(testing::rel_error(mm, m_h) <= 1e-6);
    CHECK(testing::rel_error(vv, v_h) <= 1e-6);
    const std::int64_t differ = testing::first_difference(w, w_h);
    if (differ != -1) MESSAGE("master weights first differ from the host at " << differ << " (cuBLASLt vs host GEMM)");
  }
}

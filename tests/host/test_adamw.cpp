// optim::adamw on the host against a float64 reference written out here.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <subspace/kernels/elementwise.hpp>
#include <subspace/optim/adamw.hpp>

#include "support/numeric.hpp"

using namespace subspace;

namespace {

/// torch.optim.AdamW in float64, one tensor: the reference the float32 implementation is measured against.
struct adamw_reference {
  double beta1, beta2, eps, weight_decay;
  std::vector<double> p, m, v;

  void step(const std::vector<double>& g, double lr, std::int64_t t, bool decay) {
    const double bias1 = 1.0 - std::pow(beta1, double(t));
    const double bias2 = 1.0 - std::pow(beta2, double(t));
    for (std::size_t i = 0; i < p.size(); ++i) {
      m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
      v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
      if (decay) p[i] *= 1.0 - lr * weight_decay;
      const double mhat = m[i] / bias1, vhat = v[i] / bias2;
      p[i] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
  }
};

template <class T>
host_tensor<double> as_double(const std::vector<T>& x, const shape& s) {
  host_tensor<double> t(s);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = double(x[std::size_t(i)]);
  return t;
}
template <class T>
std::vector<double> to_vector(const host_tensor<T>& t) {
  std::vector<double> out(std::size_t(t.numel()));
  for (std::int64_t i = 0; i < t.numel(); ++i) out[std::size_t(i)] = double(t.data()[i]);
  return out;
}

}  // namespace

TEST_CASE_TEMPLATE("optim::adamw (host) follows the float64 AdamW reference over several steps", G, float, bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  CAPTURE(dtype_name<G>());
  for (const bool decay : {true, false}) {
    CAPTURE(decay);
    const optim::adamw opt{};  // beta1 0.9, beta2 0.95, eps 1e-8, weight decay 0.1
    const optim::param_info info{"w", {24, 17}, decay};
    auto master = testing::random_tensor<float>(info.shape, seed);
    auto state = opt.init(exec::host{}, info);
    adamw_reference ref{opt.beta1,
                        opt.beta2,
                        opt.eps,
                        opt.weight_decay,
                        to_vector(master),
                        std::vector<double>(std::size_t(info.shape.numel()), 0.0),
                        std::vector<double>(std::size_t(info.shape.numel()), 0.0)};
    host_tensor<bf16> working(info.shape);
    const float lrs[] = {1e-2f, 3e-3f, 5e-2f, 1e-3f, 2e-2f, 1e-2f};
    for (int t = 1; t <= 6; ++t) {
      CAPTURE(t);
      // Gradients of varying scale, so the moments see more than one magnitude.
      const auto grad = testing::random_tensor<G>(info.shape, seed + std::uint64_t(t), 0.0f, 0.1f * float(t));
      const float lr = lrs[t - 1];
      opt.step(exec::host{}, master.v(), grad.v(), state, info, optim::step_context{lr, t}, working.v());
      ref.step(to_vector(grad), double(lr), t, decay);

      CHECK(testing::rel_error(master, as_double(ref.p, info.shape)) <= 1e-6);
      CHECK(testing::rel_error(state.m, as_double(ref.m, info.shape)) <= 1e-6);
      CHECK(testing::rel_error(state.v, as_double(ref.v, info.shape)) <= 1e-6);
      bool working_is_bf16_of_master = true;
      for (std::int64_t i = 0; i < master.numel(); ++i)
        working_is_bf16_of_master = working_is_bf16_of_master && working.data()[i].bits == bf16(master.data()[i]).bits;
      CHECK(working_is_bf16_of_master);
    }
  }
}

TEST_CASE("optim::adamw: the first step is bias-corrected to lr * sign(g), after decoupled decay") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const optim::adamw opt{0.8f, 0.99f, 1e-8f, 0.5f};
  const optim::param_info info{"w", {64}, true};
  auto master = testing::random_tensor<float>(info.shape, seed);
  const auto w0 = testing::random_tensor<float>(info.shape, seed);
  const auto grad = testing::random_tensor<float>(info.shape, seed + 1, 0.0f, 1e-2f);
  auto state = opt.init(exec::host{}, info);
  const float lr = 0.05f;
  opt.step(exec::host{}, master.v(), grad.v(), state, info, optim::step_context{lr, 1});
  // m_hat = g and v_hat = g^2 at step 1, so the update is lr g / (|g| + eps).
  host_tensor<double> expected(info.shape);
  for (std::int64_t i = 0; i < expected.numel(); ++i) {
    const double g = grad.data()[i];
    expected.data()[i] = double(w0.data()[i]) * (1.0 - double(lr) * 0.5) - double(lr) * g / (std::abs(g) + 1e-8);
  }
  CHECK(testing::rel_error(master, expected) <= 1e-6);
}

TEST_CASE("optim::adamw: step_context::grad_scale equals scaling the fp32 gradient in memory first, bit for bit") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const optim::adamw opt{};
  const optim::param_info info{"w", {3, 41}, true};
  const float factor = 0.37f;
  auto folded = testing::random_tensor<float>(info.shape, seed);
  auto scaled = testing::random_tensor<float>(info.shape, seed);
  auto st_folded = opt.init(exec::host{}, info), st_scaled = opt.init(exec::host{}, info);
  for (std::int64_t t = 1; t <= 3; ++t) {
    const auto grad = testing::random_tensor<float>(info.shape, seed + std::uint64_t(t), 0.0f, 0.1f);
    const auto kept = testing::random_tensor<float>(info.shape, seed + std::uint64_t(t), 0.0f, 0.1f);
    auto grad_scaled = testing::random_tensor<float>(info.shape, seed + std::uint64_t(t), 0.0f, 0.1f);
    scale(exec::host{}, factor, grad_scaled.v());
    opt.step(exec::host{}, folded.v(), grad.v(), st_folded, info, optim::step_context{1e-2f, t, factor});
    opt.step(exec::host{}, scaled.v(), grad_scaled.v(), st_scaled, info, optim::step_context{1e-2f, t});
    CHECK(std::memcmp(grad.data(), kept.data(), std::size_t(grad.numel()) * sizeof(float)) == 0);  // read only
  }
  CHECK(std::memcmp(folded.data(), scaled.data(), std::size_t(folded.numel()) * sizeof(float)) == 0);
  CHECK(std::memcmp(st_folded.m.data(), st_scaled.m.data(), std::size_t(folded.numel()) * sizeof(float)) == 0);
  CHECK(std::memcmp(st_folded.v.data(), st_scaled.v.data(), std::size_t(folded.numel()) * sizeof(float)) == 0);
  CHECK(optim::applies_grad_scale<optim::adamw>);
  for (const float bad : {0.0f, -1.0f, NAN, INFINITY}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH_AS(
        opt.step(exec::host{}, folded.v(), scaled.v(), st_folded, info, optim::step_context{1e-2f, 4, bad}),
        doctest::Contains("grad_scale must be a positive number"), invalid_argument);
  }
}

TEST_CASE("optim::adamw: state is two fp32 moments, zeroed, and its size is exact") {
  const optim::adamw opt{};
  for (const shape& s : {shape{7}, shape{3, 5}, shape{2, 3, 4}, shape{}}) {
    CAPTURE(to_string(s));
    const auto info = optim::param_info_for("p", s);
    const auto st = opt.init(exec::host{}, info);
    CHECK(st.m.shape() == s);
    CHECK(st.v.shape() == s);
    CHECK(opt.state_bytes(st) == std::size_t(2 * s.numel()) * sizeof(float));
    for (std::int64_t i = 0; i < s.numel(); ++i) CHECK((st.m.data()[i] == 0.0f && st.v.data()[i] == 0.0f));
  }
}

TEST_CASE("optim::adamw: weight decay applies only to parameters marked decay, and only through lr * wd") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const optim::adamw opt{};
  const auto w0 = testing::random_tensor<float>({8, 8}, seed);
  host_tensor<float> zero({8, 8});
  std::fill(zero.data(), zero.data() + zero.numel(), 0.0f);
  // With a zero gradient the Adam term vanishes (m = 0), leaving the decay alone.
  for (const bool decay : {true, false}) {
    CAPTURE(decay);
    const optim::param_info info{"w", {8, 8}, decay};
    auto w = testing::random_tensor<float>({8, 8}, seed);
    auto st = opt.init(exec::host{}, info);
    opt.step(exec::host{}, w.v(), zero.v(), st, info, optim::step_context{0.1f, 1});
    host_tensor<double> expected({8, 8});
    for (std::int64_t i = 0; i < 64; ++i) expected.data()[i] = double(w0.data()[i]) * (decay ? 1.0 - 0.1 * 0.1 : 1.0);
    CHECK(testing::rel_error(w, expected) <= 2e-7);
  }
}

TEST_CASE("optim::adamw: misuse is reported with the parameter's name") {
  const optim::adamw opt{};
  const auto info = optim::param_info_for("layers.0.wq", {4, 4});
  host_tensor<float> w({4, 4}), g({4, 4}), g_wrong({4, 5});
  std::fill(w.data(), w.data() + 16, 1.0f);
  std::fill(g.data(), g.data() + 16, 1.0f);
  auto st = opt.init(exec::host{}, info);
  CHECK_THROWS_WITH_AS(opt.step(exec::host{}, w.v(), g.v(), st, info, optim::step_context{1e-3f, 0}),
                       doctest::Contains("1-based"), invalid_argument);
  CHECK_THROWS_WITH_AS(opt.step(exec::host{}, w.v(), g_wrong.v(), st, info, optim::step_context{1e-3f, 1}),
                       doctest::Contains("layers.0.wq"), invalid_argument);
  auto other = opt.init(exec::host{}, optim::param_info_for("b", {4}));
  CHECK_THROWS_WITH_AS(opt.step(exec::host{}, w.v(), g.v(), other, info, optim::step_context{1e-3f, 1}),
                       doctest::Contains("state has shape [4]"), invalid_argument);
  const optim::adamw bad{1.0f};
  CHECK_THROWS_AS(bad.step(exec::host{}, w.v(), g.v(), st, info, optim::step_context{1e-3f, 1}), invalid_argument);
  CHECK_THROWS_AS(opt.step(exec::host{}, w.v().transposed(), g.v(), st, info, optim::step_context{1e-3f, 1}),
                  invalid_argument);
}

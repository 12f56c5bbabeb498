// The GoLore counter-example (spec: shared/specs/galore-golore.md §2 and §8.10) through the optimizer policies:
// GaLore stalls, GoLore and GoLore@50% converge, full AdamW converges, and averaging the noise over a batch of
// 100 shrinks GaLore's gap more than tenfold. The same problem as examples/golore_counterexample.cpp.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <numbers>
#include <subspace/optim/adamw.hpp>
#include <subspace/optim/galore.hpp>
#include <subspace/optim/golore.hpp>

using namespace subspace;

namespace {

constexpr std::int64_t dim = 10, active = 6;

/// min_X 1/2 |A X|^2 + <B, X>, A = diag(I_6, 0_4), B = [B11 0; 0 0], B11 ~ N(0, 1); stochastic gradient
/// grad f + sigma * mean(signs) * diag(0_6, I_4).
struct problem {
  host_tensor<float> b{{dim, dim}};
  std::uint64_t seed;
  float sigma = 1.0f;

  explicit problem(std::uint64_t s) : seed(s) {
    for (std::int64_t i = 0; i < dim; ++i)
      for (std::int64_t j = 0; j < dim; ++j)
        b(i, j) = i < active && j < active ? rng::normal_at(seed, 0, std::uint64_t(i * dim + j)) : 0.0f;
  }
  double value(const host_tensor<float>& x) const {
    double f = 0;
    for (std::int64_t i = 0; i < dim; ++i)
      for (std::int64_t j = 0; j < dim; ++j)
        f += (i < active ? 0.5 * double(x(i, j)) * double(x(i, j)) : 0.0) + double(b(i, j)) * double(x(i, j));
    return f;
  }
  double optimum() const {
    double s = 0;
    for (std::int64_t i = 0; i < active; ++i)
      for (std::int64_t j = 0; j < active; ++j) s += double(b(i, j)) * double(b(i, j));
    return -0.5 * s;
  }
  void gradient(const host_tensor<float>& x, std::int64_t t, int batch, host_tensor<float>& g) const {
    double mean_sign = 0;
    for (int k = 0; k < batch; ++k)
      mean_sign += rng::uniform_at(seed, 1, std::uint64_t(t) * 1024 + std::uint64_t(k)) < 0.5f ? -1.0 : 1.0;
    mean_sign /= batch;
    for (std::int64_t i = 0; i < dim; ++i)
      for (std::int64_t j = 0; j < dim; ++j)
        g(i, j) = (i < active ? x(i, j) : 0.0f) + b(i, j) + (i >= active && i == j ? float(sigma * mean_sign) : 0.0f);
  }
};

constexpr int steps = 3000;
constexpr float peak_lr = 0.01f;

/// f(X) - f* after `steps` steps from X = 0, cosine learning rate from peak_lr to 0.
template <class O>
double gap(const O& opt, const problem& pb, int batch) {
  const exec::host ex{};
  const optim::param_info info{"x", {dim, dim}, false};
  host_tensor<float> x({dim, dim}), g({dim, dim});
  fill(ex, x.v(), 0.0f);
  auto st = opt.init(ex, info);
  for (std::int64_t t = 1; t <= steps; ++t) {
    pb.gradient(x, t, batch, g);
    const double lr = 0.5 * double(peak_lr) * (1.0 + std::cos(std::numbers::pi * double(t - 1) / double(steps)));
    opt.step(ex, x.v(), view<const float, host_space>(g.v()), st, info, optim::step_context{float(lr), t});
  }
  return pb.value(x) - pb.optimum();
}

}  // namespace

TEST_CASE("counter-example: GaLore stalls on noise-dominated SVD subspaces, GoLore converges (r = 4, tau = 100)") {
  const problem pb(1);  // a fixed seed (spec §8.10); the outcome holds for seeds 1..30, see the example
  const optim::adamw adam = optim::subspace_rule<optim::adamw>::reference();
  const optim::galore<> galore{.inner = adam, .rank = 4, .refresh_period = 100, .target = &optim::any_matrix};
  const auto golore_at = [&](double percent) {
    return optim::golore<>{.inner = adam,
                           .rank = 4,
                           .refresh_period = 100,
                           .random_percent = percent,
                           .total_steps = steps,
                           .seed = 2,
                           .target = &optim::any_matrix};
  };
  const double adam_gap = gap(adam, pb, 1);
  const double galore_gap = gap(galore, pb, 1);
  const double golore_gap = gap(golore_at(100.0), pb, 1);
  const double golore50_gap = gap(golore_at(50.0), pb, 1);
  const double galore_batch_gap = gap(galore, pb, 100);
  MESSAGE("f - f*: AdamW " << adam_gap << ", GaLore " << galore_gap << ", GoLore " << golore_gap << ", GoLore@50% "
                           << golore50_gap << ", GaLore batch 100 " << galore_batch_gap);
  CHECK(adam_gap <= 1e-2);
  CHECK(galore_gap >= 0.25);
  CHECK(galore_gap <= 3.0);
  CHECK(golore_gap <= 5e-2);
  CHECK(golore50_gap <= 5e-2);
  CHECK(galore_batch_gap * 10.0 <= galore_gap);
}

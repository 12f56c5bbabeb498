#pragma once
// The GoLore counter-example problem (He et al., ICML 2025, from pkumelon/Golore; docs/galore.md), shared by
// examples/golore_counterexample and its test:
//
//   min_X f(X) = 1/2 |A X|_F^2 + <B, X>,  X 10 x 10,  A = diag(I_6, 0_4),  B = [B11 0; 0 0] with B11 ~ N(0, 1)
//   optimum f* = -1/2 |B11|_F^2
//   stochastic gradient: grad f(X) + sigma * mean(s_1..s_batch) * diag(0_6, I_4),  s_i = +-1 equally likely

#include <cmath>
#include <cstdint>
#include <numbers>

#include <subspace/core/executor.hpp>
#include <subspace/core/rng.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/kernels/elementwise.hpp>
#include <subspace/optim/concepts.hpp>

namespace examples::golore {

inline constexpr std::int64_t dim = 10, active = 6;

/// B and the noise signs, both from the Philox stream of `seed`.
struct problem {
  subspace::host_tensor<float> b{{dim, dim}};
  std::uint64_t seed;
  float sigma;

  explicit problem(std::uint64_t s, float noise = 1.0f) : seed(s), sigma(noise) {
    for (std::int64_t i = 0; i < dim; ++i)
      for (std::int64_t j = 0; j < dim; ++j)
        b(i, j) = i < active && j < active ? subspace::rng::normal_at(seed, 0, std::uint64_t(i * dim + j)) : 0.0f;
  }
  double value(const subspace::host_tensor<float>& x) const {
    double f = 0;
    for (std::int64_t i = 0; i < dim; ++i)
      for (std::int64_t j = 0; j < dim; ++j) {
        const double xij = x(i, j);
        f += (i < active ? 0.5 * xij * xij : 0.0) + double(b(i, j)) * xij;
      }
    return f;
  }
  double optimum() const {
    double s = 0;
    for (std::int64_t i = 0; i < active; ++i)
      for (std::int64_t j = 0; j < active; ++j) s += double(b(i, j)) * double(b(i, j));
    return -0.5 * s;
  }
  /// The stochastic gradient of step t (1-based) averaged over `batch` samples of the noise sign.
  void gradient(const subspace::host_tensor<float>& x, std::int64_t t, int batch,
                subspace::host_tensor<float>& g) const {
    double mean_sign = 0;
    for (int k = 0; k < batch; ++k)
      mean_sign += subspace::rng::uniform_at(seed, 1, std::uint64_t(t) * 1024 + std::uint64_t(k)) < 0.5f ? -1.0 : 1.0;
    mean_sign /= batch;
    for (std::int64_t i = 0; i < dim; ++i)
      for (std::int64_t j = 0; j < dim; ++j) {
        float v = (i < active ? x(i, j) : 0.0f) + b(i, j);
        if (i >= active && i == j) v += float(sigma * mean_sign);
        g(i, j) = v;
      }
  }
};

/// f(X) after `steps` steps of optimizer `opt` from X = 0 with a cosine learning rate from peak_lr to 0.
template <class O>
double final_value(const O& opt, const problem& pb, std::int64_t steps, float peak_lr, int batch) {
  using namespace subspace;
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
  return pb.value(x);
}

}  // namespace examples::golore

// golore_counterexample: the problem on which GaLore stalls and GoLore converges (spec: shared/specs/
// galore-golore.md §2, from pkumelon/Golore), run through the library's optimizer policies on the host.
//
//   min_X f(X) = 1/2 |A X|_F^2 + <B, X>,  X 10 x 10,  A = diag(I_6, 0_4),  B = [B11 0; 0 0] with B11 ~ N(0, 1)
//   optimum f* = -1/2 |B11|_F^2
//   stochastic gradient: grad f(X) + sigma * mean(s_1..s_batch) * diag(0_6, I_4),  s_i = +-1 equally likely
//
// The noise is zero-mean and lives in coordinates f ignores, but its singular values (sigma) exceed those of the
// true gradient once X is near the optimum: from then on the top-r SVD subspace of a batch-1 gradient is pure
// noise and GaLore stops improving f, leaving a gap of up to 1/2 * 6 * sigma^2 = 3. A random projector keeps
// overlapping the true gradient (E[P^T P] = (r/n) I), so GoLore converges. Averaging the noise over a batch of
// 100 shrinks it tenfold, and with it GaLore's gap.
//
// Prints the final f and f - f* of full-rank AdamW, GaLore, GoLore, GoLore@50% and GaLore with batch 100, and
// exits 1 unless the spec's outcome holds (AdamW and the GoLores converge, GaLore stalls at 0.25 <= gap <= 3,
// batch-100 GaLore's gap is at least ten times smaller).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numbers>
#include <string>
#include <subspace/optim/adamw.hpp>
#include <subspace/optim/galore.hpp>
#include <subspace/optim/golore.hpp>

#include "common/cli.hpp"

namespace {

using namespace subspace;

struct options {
  int steps = 3000;
  float lr = 0.01f;
  int rank = 4;
  int period = 100;
  float sigma = 1.0f;
  int batch = 1;
  std::uint64_t seed = 1;
};

constexpr std::int64_t dim = 10, active = 6;

/// The problem: B and the noise signs, both from the Philox stream of `seed`.
struct problem {
  host_tensor<float> b{{dim, dim}};
  std::uint64_t seed;
  float sigma;

  problem(std::uint64_t s, float sg) : seed(s), sigma(sg) {
    for (std::int64_t i = 0; i < dim; ++i)
      for (std::int64_t j = 0; j < dim; ++j)
        b(i, j) = i < active && j < active ? rng::normal_at(seed, 0, std::uint64_t(i * dim + j)) : 0.0f;
  }
  double value(const host_tensor<float>& x) const {
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
  void gradient(const host_tensor<float>& x, std::int64_t t, int batch, host_tensor<float>& g) const {
    double mean_sign = 0;
    for (int k = 0; k < batch; ++k)
      mean_sign += rng::uniform_at(seed, 1, std::uint64_t(t) * 1024 + std::uint64_t(k)) < 0.5f ? -1.0 : 1.0;
    mean_sign /= batch;
    for (std::int64_t i = 0; i < dim; ++i)
      for (std::int64_t j = 0; j < dim; ++j) {
        float v = (i < active ? x(i, j) : 0.0f) + b(i, j);
        if (i >= active && i == j) v += float(sigma * mean_sign);
        g(i, j) = v;
      }
  }
};

/// Runs `steps` steps of optimizer `opt` from X = 0 with a cosine learning rate from lr to 0; returns f(X).
template <class O>
double run(const O& opt, const problem& pb, const options& o, int batch) {
  const exec::host ex{};
  const optim::param_info info{"x", {dim, dim}, false};
  host_tensor<float> x({dim, dim}), g({dim, dim});
  fill(ex, x.v(), 0.0f);
  auto st = opt.init(ex, info);
  for (std::int64_t t = 1; t <= o.steps; ++t) {
    pb.gradient(x, t, batch, g);
    const double lr = 0.5 * double(o.lr) * (1.0 + std::cos(std::numbers::pi * double(t - 1) / double(o.steps)));
    opt.step(ex, x.v(), view<const float, host_space>(g.v()), st, info, optim::step_context{float(lr), t});
  }
  return pb.value(x);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  examples::cli cli("golore_counterexample",
                    "GaLore stalls, GoLore converges: the counter-example of He et al. (ICML 2025) on the host.\n"
                    "min 1/2 |A X|^2 + <B, X> over 10 x 10 X with noise sigma in the coordinates f ignores.");
  cli.flag("steps", o.steps, "optimizer steps")
      .flag("lr", o.lr, "peak learning rate (cosine decay to 0)")
      .flag("rank", o.rank, "projection rank r")
      .flag("period", o.period, "projector refresh period tau")
      .flag("sigma", o.sigma, "noise level")
      .flag("batch", o.batch, "noise samples averaged per step (the extra GaLore run uses 100)")
      .flag("seed", o.seed, "seed of B and of the noise signs (GoLore's projectors use seed + 1)");
  try {
    if (!cli.parse(argc, argv)) return 0;
  } catch (const examples::cli_error& e) {
    std::fprintf(stderr, "golore_counterexample: %s\n", e.what());
    return 2;
  }

  try {
    const problem pb(o.seed, o.sigma);
    const double fstar = pb.optimum();
    const optim::adamw adam = optim::subspace_rule<optim::adamw>::reference();
    const optim::galore<> galore{
        .inner = adam, .rank = o.rank, .refresh_period = o.period, .target = &optim::any_matrix};
    const auto golore_at = [&](double percent) {
      return optim::golore<>{.inner = adam,
                             .rank = o.rank,
                             .refresh_period = o.period,
                             .random_percent = percent,
                             .total_steps = o.steps,
                             .seed = o.seed + 1,
                             .target = &optim::any_matrix};
    };

    std::printf("golore_counterexample: X 10 x 10, r = %d, tau = %d, sigma = %g, %d steps, lr %g (cosine)\n", o.rank,
                o.period, double(o.sigma), o.steps, double(o.lr));
    std::printf("f* = %.6f\n\n%-26s %14s %14s\n", fstar, "optimizer", "final f", "f - f*");
    struct result {
      const char* name;
      double f;
    };
    const result results[] = {
        {"AdamW (full rank)", run(adam, pb, o, o.batch)},  {"GaLore", run(galore, pb, o, o.batch)},
        {"GoLore", run(golore_at(100.0), pb, o, o.batch)}, {"GoLore@50%", run(golore_at(50.0), pb, o, o.batch)},
        {"GaLore, batch 100", run(galore, pb, o, 100)},
    };
    for (const result& r : results) std::printf("%-26s %14.6f %14.6f\n", r.name, r.f, r.f - fstar);

    const double adam_gap = results[0].f - fstar, galore_gap = results[1].f - fstar, golore_gap = results[2].f - fstar,
                 golore50_gap = results[3].f - fstar, big_batch_gap = results[4].f - fstar;
    const bool ok = adam_gap <= 1e-2 && galore_gap >= 0.25 && galore_gap <= 3.0 && golore_gap <= 5e-2 &&
                    golore50_gap <= 5e-2 && big_batch_gap * 10.0 <= galore_gap;
    std::printf(
        "\n%s: AdamW gap <= 1e-2, GaLore stalls with 0.25 <= gap <= 3, GoLore and GoLore@50%% gaps <= 5e-2, "
        "batch-100 GaLore gap at least 10x smaller than batch-1 GaLore's\n",
        ok ? "reproduced" : "NOT reproduced");
    return ok ? 0 : 1;
  } catch (const subspace::error& e) {
    std::fprintf(stderr, "golore_counterexample: %s\n", e.what());
    return 2;
  }
}

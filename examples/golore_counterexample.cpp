// golore_counterexample: the problem on which GaLore stalls and GoLore converges (He et al., ICML 2025, from
// pkumelon/Golore; docs/galore.md), run through the library's optimizer policies on the host.
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
// exits 1 unless the expected outcome holds (AdamW and the GoLores converge, GaLore stalls at 0.25 <= gap <= 3,
// batch-100 GaLore's gap is at least ten times smaller).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <subspace/optim/adamw.hpp>
#include <subspace/optim/galore.hpp>
#include <subspace/optim/golore.hpp>

#include "common/cli.hpp"
#include "common/device.hpp"
#include "common/flag_checks.hpp"
#include "common/golore_problem.hpp"

namespace {

using namespace subspace;
namespace golore = examples::golore;

struct options {
  int steps = 3000;
  float lr = 0.01f;
  int rank = 4;
  int period = 100;
  float sigma = 1.0f;
  int batch = 1;
  std::uint64_t seed = 1;
};

/// f(X) of `opt` on the problem with the run's steps and learning rate.
template <class O>
double run(const O& opt, const golore::problem& pb, const options& o, int batch) {
  return golore::final_value(opt, pb, o.steps, o.lr, batch);
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
  return examples::guarded_main("golore_counterexample", [&] {
    if (!cli.parse(argc, argv)) return 0;
    examples::need(o.steps >= 1 && o.rank >= 1 && o.period >= 1 && o.batch >= 1,
                   "--steps, --rank, --period and --batch must be >= 1");
    examples::need(std::isfinite(o.lr) && o.lr > 0, "--lr must be a positive number");
    examples::need_finite_non_negative("sigma", o.sigma);
    const golore::problem pb(o.seed, o.sigma);
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
  });
}

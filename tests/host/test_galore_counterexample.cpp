// The GoLore counter-example (He et al., ICML 2025; docs/galore.md) through the optimizer policies:
// GaLore stalls, GoLore and GoLore@50% converge, full AdamW converges, and averaging the noise over a batch of
// 100 shrinks GaLore's gap more than tenfold. The problem is examples/common/golore_problem.hpp, as in the example.
#include <doctest/doctest.h>

#include <cstdint>
#include <subspace/optim/adamw.hpp>
#include <subspace/optim/galore.hpp>
#include <subspace/optim/golore.hpp>

#include "../../examples/common/golore_problem.hpp"

using namespace subspace;

namespace {

using examples::golore::problem;

constexpr int steps = 3000;
constexpr float peak_lr = 0.01f;

/// f(X) - f* after `steps` steps from X = 0, cosine learning rate from peak_lr to 0.
template <class O>
double gap(const O& opt, const problem& pb, int batch) {
  return examples::golore::final_value(opt, pb, steps, peak_lr, batch) - pb.optimum();
}

}  // namespace

TEST_CASE("counter-example: GaLore stalls on noise-dominated SVD subspaces, GoLore converges (r = 4, tau = 100)") {
  const problem pb(1);  // a fixed seed; the outcome holds for seeds 1..30, see the example
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

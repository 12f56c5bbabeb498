// adjoint::selective_ssm trained on real text: the BPTT and exact-adjoint engines follow the same loss curve for
// 200 steps (fp64), the sharded engine's curve is recorded beside them; train::trainer trains the model (fp32),
// and its checkpoints (config.json of the SSM's own) resume bit for bit and refuse another model.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <adjoint/selective_ssm.hpp>
#include <subspace/io/struct_config.hpp>
#include <subspace/optim/adamw.hpp>
#include <subspace/policies.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>
#include <subspace/train/trainer.hpp>

#include "support/named_tensors.hpp"
#include "support/numeric.hpp"

namespace {

using namespace subspace;

adjoint::ssm_config small_text_model() {
  adjoint::ssm_config c = adjoint::presets::tiny();
  c.name = "text";
  c.d_model = 8;
  c.state = 4;
  c.layers = 2;
  c.init_std = 0.1f;
  return c;
}

/// The losses of `steps` plain SGD steps (fp64) of `engine` from `seed` on the Genesis training batches.
template <class Engine>
std::vector<double> sgd_curve(const testing::genesis_data& text, Engine engine, std::uint64_t seed, int steps) {
  adjoint::selective_ssm<exec::host, double, Engine> model(small_text_model(), exec::host{1}, engine);
  model.init(seed);
  auto data = text.train(2, 32);
  host_tensor<std::int32_t> tokens({2, 32}), targets({2, 32});
  std::vector<double> losses;
  for (int s = 0; s < steps; ++s) {
    data.next(tokens.v(), targets.v());
    model.zero_grad();
    losses.push_back(model.forward(tokens.v(), targets.v()));
    model.backward();
    const auto w = model.parameters().flat_values();
    const auto g = model.parameters().flat_grads();
    for (std::int64_t i = 0; i < w.numel(); ++i) w.data()[i] -= 0.5 * g.data()[i];
  }
  return losses;
}

double mean_of(const std::vector<double>& v, std::size_t first, std::size_t last) {
  double s = 0;
  for (std::size_t i = first; i < last; ++i) s += v[i];
  return s / double(last - first);
}

}  // namespace

TEST_CASE("ssm on real text: bptt and exact adjoint give one loss curve over 200 steps (fp64, 1e-10)") {
  const testing::genesis_data text;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::vector<double> reference = sgd_curve(text, adjoint::bptt{}, seed, 200);
  const std::vector<double> exact = sgd_curve(text, adjoint::exact_adjoint{}, seed, 200);
  const std::vector<double> sharded = sgd_curve(text, adjoint::sharded_adjoint{}, seed, 200);
  double worst = 0;
  for (std::size_t i = 0; i < reference.size(); ++i)
    worst = std::max(worst, std::abs(exact[i] - reference[i]) / reference[i]);
  CAPTURE(worst);
  CHECK(worst <= 1e-10);
  // The model learns: the last 20 steps' mean loss is well below the first 20's.
  CHECK(mean_of(reference, 180, 200) < mean_of(reference, 0, 20) - 0.5);
  MESSAGE("mean loss, steps 180-199: bptt " << mean_of(reference, 180, 200) << ", exact " << mean_of(exact, 180, 200)
                                            << ", sharded " << mean_of(sharded, 180, 200));
  for (const double l : sharded) REQUIRE(std::isfinite(l));
}

TEST_CASE("ssm with train::trainer: a resumed run is bit-identical, and another model's checkpoint is refused") {
  using model = adjoint::selective_ssm<exec::host, float>;
  const testing::genesis_data text;
  const testing::scratch_dir dir;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const adjoint::ssm_config cfg = small_text_model();
  const auto stack = subspace::stack{.scheduler = schedule::gradient_accumulation{2}, .optimizer = optim::adamw{}};
  train::trainer_options o;
  o.schedule.peak_lr = 3e-3f;
  o.schedule.warmup_steps = 2;
  o.schedule.total_steps = 8;
  const int stop = 3, total = 6;

  train::trainer straight(model(cfg, exec::host{2}), stack, o);
  straight.init(seed);
  const auto init_view = straight.model().parameters().flat_values();
  const std::vector<float> initial(init_view.data(), init_view.data() + init_view.numel());
  auto data = text.train(2, 16);
  double last = 0;
  for (int s = 0; s < total; ++s) last = straight.step(data).loss;
  // Six steps on batches of 32 tokens move the loss by less than the batches differ, so check that it trained.
  CHECK(std::isfinite(last));
  const auto trained = straight.model().parameters().flat_values();
  CHECK_FALSE(std::equal(initial.begin(), initial.end(), trained.data()));

  {
    train::trainer t(model(cfg, exec::host{2}), stack, o);
    t.init(seed);
    auto d = text.train(2, 16);
    for (int s = 0; s < stop; ++s) t.step(d);
    t.save(dir.path / "ckpt", d.position(), seed);
  }
  train::trainer resumed(model(cfg, exec::host{2}), stack, o);
  resumed.init(seed + 1);
  auto d = text.train(2, 16);
  resumed.resume(dir.path / "ckpt", d);
  for (int s = stop; s < total; ++s) resumed.step(d);
  const auto a = straight.model().parameters().flat_values();
  const auto b = resumed.model().parameters().flat_values();
  REQUIRE(a.numel() == b.numel());
  CHECK(std::equal(a.data(), a.data() + a.numel(), b.data()));

  adjoint::ssm_config wider = cfg;
  wider.state = 5;
  train::trainer other(model(wider, exec::host{2}), stack, o);
  CHECK_THROWS_WITH_AS(other.resume(dir.path / "ckpt", d), doctest::Contains("state"), invalid_argument);
}

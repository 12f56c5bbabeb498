// Nothing above nn/ assumes a Llama: a small model of another architecture (tests/support/toy_model.hpp) passes
// its gradient check, trains through train::trainer on real text, and checkpoints and resumes exactly, its
// configuration written and compared through Boost.Hana (io/struct_config.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include <subspace/io/struct_config.hpp>
#include <subspace/train/trainer.hpp>

#include "support/genesis.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"
#include "support/toy_model.hpp"

using namespace subspace;
using testing::toy_config;
using testing::toy_model;

namespace {

toy_config small() { return toy_config{256, 16, 0.3f}; }

train::trainer_options options(std::int64_t steps) {
  train::trainer_options o;
  o.clip = 1.0;
  o.schedule = {3e-2f, 3e-3f, 5, steps, optim::decay_kind::cosine};
  return o;
}

}  // namespace

TEST_CASE("toy model: gradients match central finite differences (double)") {
  toy_model<double> m(toy_config{11, 5, 0.5f});
  m.init(testing::fresh_seed());
  host_tensor<std::int32_t> tokens({2, 6}), targets({2, 6});
  for (std::int64_t i = 0; i < 12; ++i) {
    tokens.data()[i] = std::int32_t((i * 7 + 3) % 11);
    targets.data()[i] = i % 5 == 0 ? -1 : std::int32_t((i * 5 + 1) % 11);
  }
  m.parameters().zero_grad(exec::host{});
  m.forward(0, {tokens.v(), targets.v(), {}, {}}, 1.0f);
  m.backward(0, {}, {}, [](std::size_t, std::size_t) {});
  auto& store = m.parameters();
  for (std::size_t t = 0; t < store.size(); ++t) {
    CAPTURE(store.info(t).name);
    const auto value = store.value(t), grad = store.grad(t);
    for (std::int64_t j = 0; j < value.numel(); j += 3) {
      const double keep = value.data()[j], h = 1e-5;
      value.data()[j] = keep + h;
      const double up = m.evaluate(tokens.v(), targets.v());
      value.data()[j] = keep - h;
      const double down = m.evaluate(tokens.v(), targets.v());
      value.data()[j] = keep;
      CHECK(grad.data()[j] == doctest::Approx((up - down) / (2 * h)).epsilon(1e-6).scale(1e-9));
    }
  }
}

TEST_CASE("toy model: trains through train::trainer and resumes bit-identically from a checkpoint") {
  testing::scratch_dir dir;
  testing::genesis_shards(dir.path / "data");
  const std::int64_t steps = 30, stop = 12, batch = 4, seq = 32;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto stack = subspace::stack{.scheduler = schedule::gradient_accumulation{2}};

  train::trainer straight(toy_model<float>(small()), stack, options(steps));
  straight.init(seed);
  auto val = testing::loader_for(dir.path / "data", "val", batch, seq, false);
  const double before = straight.evaluate(val, 4);
  auto data = testing::loader_for(dir.path / "data", "train", batch, seq, true, seed);
  std::vector<double> losses;
  for (std::int64_t s = 0; s < steps; ++s) losses.push_back(straight.step(data).loss);
  const double after = straight.evaluate(val, 4);
  CAPTURE(before);
  CAPTURE(after);
  CHECK(after < before - 0.5);  // ln 256 = 5.55 at the start; bigram statistics are quickly learned

  {
    train::trainer first(toy_model<float>(small()), stack, options(steps));
    first.init(seed);
    auto d = testing::loader_for(dir.path / "data", "train", batch, seq, true, seed);
    for (std::int64_t s = 0; s < stop; ++s) first.step(d);
    first.save(dir.path / "ckpt", d.position(), seed);
  }
  train::trainer resumed(toy_model<float>(small()), stack, options(steps));
  resumed.init(seed + 1);
  auto d = testing::loader_for(dir.path / "data", "train", batch, seq, true, seed);
  CHECK(resumed.resume(dir.path / "ckpt", d).step == stop);
  for (std::int64_t s = stop; s < steps; ++s) CHECK(resumed.step(d).loss == losses[std::size_t(s)]);
  const auto a = straight.model().parameters().flat_values(), b = resumed.model().parameters().flat_values();
  CHECK(std::equal(a.data(), a.data() + a.numel(), b.data()));

  // The configuration is part of the checkpoint: a wider model is refused, naming the field.
  auto wider = small();
  wider.d_model = 32;
  train::trainer other(toy_model<float>(wider), stack, options(steps));
  CHECK_THROWS_WITH_AS(other.resume(dir.path / "ckpt", d), doctest::Contains("d_model 16 vs 32"), invalid_argument);
}

TEST_CASE("io::config_io from Boost.Hana: a config.json with a missing or mistyped field is refused naming it") {
  const io::json good = io::config_io<toy_config>::to_json(small(), {});
  CHECK(good.at("d_model").as_int() == 16);
  CHECK(io::config_io<toy_config>::from_json(good, "x").init_std == 0.3f);
  io::json bad = good;
  bad.set("vocab", io::json("many"));
  CHECK_THROWS_WITH_AS(io::config_io<toy_config>::from_json(bad, "cfg.json"),
                       doctest::Contains("cfg.json: \"vocab\" must be an integer"), invalid_argument);
  // A negative integer is in range for a signed field: reading keeps it, the model's validation judges it.
  io::json negative = good;
  negative.set("d_model", io::json(-3));
  CHECK(io::config_io<toy_config>::from_json(negative, "cfg.json").d_model == -3);
  io::json missing = io::json::object({{"vocab", io::json(3)}});
  CHECK_THROWS_WITH_AS(io::config_io<toy_config>::from_json(missing, "cfg.json"),
                       doctest::Contains("missing field \"d_model\""), invalid_argument);
}

// context::context_trainer on in-process ranks (comm::local): context-parallel training computes exactly what one
// device computes — the step's loss and every gradient (fp64; 2 and 4 ranks per sequence, both placements, both
// exchanges), context × data parallel equals data parallel alone, fp32 steps track train::trainer with the weights
// identical on every rank, evaluation, exact resume from the checkpoint, and clear errors.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/compress/identity.hpp>
#include <subspace/context/context_trainer.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>
#include <subspace/train/engine.hpp>
#include <subspace/train/trainer.hpp>

#include "support/genesis.hpp"
#include "support/named_tensors.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"
#include "support/whole_model.hpp"

namespace {

using namespace subspace;

/// The micro preset with a byte vocabulary (the corpus's), 3 layers and room for 32-token sequences.
nn::llama_config small() {
  nn::llama_config c = nn::presets::micro();
  c.vocab = 256;
  c.n_layers = 3;
  c.max_seq = 32;
  return c;
}

/// Runs body(trainer, rank) on every rank of a world of C · replicas ranks.
template <class Model, class Body>
void on_context(const nn::llama_config& cfg, int replicas, int m, std::uint64_t seed, const context::trainer_options& o,
                Body&& body) {
  const int world = o.context_ranks * replicas;
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(60);
  comm::local::run_ranks(
      world,
      [&](comm::local& c) {
        auto stack = subspace::stack{.communicator = c,
                                     .compressor = compress::identity{},
                                     .scheduler = schedule::gradient_accumulation{m, world},
                                     .optimizer = optim::adamw{}};
        context::context_trainer<Model, decltype(stack)> t(cfg, std::move(stack), o, exec::host{1});
        t.init(seed);
        body(t, c.rank());
      },
      lo);
}

context::trainer_options options_for(int c, std::int64_t seq, context::placement p, context::exchange e) {
  context::trainer_options o;
  o.context_ranks = c;
  o.seq = seq;
  o.layout = p;
  o.kv_exchange = e;
  return o;
}

}  // namespace

TEST_CASE("context trainer: 2 and 4 ranks per sequence equal one device (fp64 loss and every gradient)") {
  const testing::genesis_data text;
  const nn::llama_config cfg = small();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 32;
  const int m = 2;
  testing::named_tensors whole;
  auto reference_data = text.train(batch, seq);
  const double whole_loss =
      testing::whole_model_gradients<nn::llama<exec::host, double>>(cfg, seed, reference_data, m, whole);

  for (const int c : {2, 4})
    for (const auto p : {context::placement::contiguous, context::placement::zigzag})
      for (const auto e : {context::exchange::ring, context::exchange::all_gather}) {
        CAPTURE(c);
        CAPTURE(context::to_string(p));
        CAPTURE(context::to_string(e));
        std::mutex mu;
        std::vector<testing::named_tensors> grads(std::size_t(c), testing::named_tensors{});
        std::vector<double> losses;
        on_context<nn::llama<exec::host, double>>(cfg, 1, m, seed, options_for(c, seq, p, e), [&](auto& t, int r) {
          auto data = text.train(batch, seq);
          const double loss = t.compute_gradients(data);
          std::lock_guard lock(mu);
          grads[std::size_t(r)].add(t.model().parameters());
          losses.push_back(loss);
        });
        for (const double l : losses) CHECK(std::abs(l - whole_loss) <= 1e-12 * std::abs(whole_loss));
        for (const auto& [name, g] : whole.grads) {
          CAPTURE(name);
          for (const auto& rank : grads) CHECK(testing::rel_diff(rank.grads.at(name), g) <= 1e-12);
        }
      }
}

TEST_CASE("context trainer: 2 ranks per sequence x 2 replicas equal 1 x 2 (fp64 gradients), evaluation too") {
  const testing::genesis_data text;
  const nn::llama_config cfg = small();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 32;
  const int m = 2;
  const auto run = [&](int c, std::vector<double>& loss_and_eval) {
    std::mutex mu;
    testing::named_tensors out;
    on_context<nn::llama<exec::host, double>>(
        cfg, 2, m, seed, options_for(c, seq, context::placement::zigzag, context::exchange::ring), [&](auto& t, int r) {
          // Each replica its own shard order; the ranks of a group the same.
          auto data = testing::loader_for(text.dir.path, "train", batch, seq, true, 7 + std::uint64_t(t.replica()));
          auto val = text.val(batch, seq);
          const double loss = t.compute_gradients(data);
          const double eval = t.evaluate(val, 3);
          std::lock_guard lock(mu);
          if (r == 0) {
            out.add(t.model().parameters());
            loss_and_eval = {loss, eval};
          }
        });
    return out;
  };
  std::vector<double> cp_le, dp_le;
  const testing::named_tensors cp = run(2, cp_le), dp = run(1, dp_le);
  CHECK(std::abs(cp_le[0] - dp_le[0]) <= 1e-12 * std::abs(dp_le[0]));
  CHECK(std::abs(cp_le[1] - dp_le[1]) <= 1e-12 * std::abs(dp_le[1]));
  for (const auto& [name, g] : dp.grads) {
    CAPTURE(name);
    CHECK(testing::rel_diff(cp.grads.at(name), g) <= 1e-12);
  }
}

TEST_CASE("context trainer: fp32 steps track train::trainer, every rank holds the same weights, exact resume") {
  const testing::genesis_data text;
  const nn::llama_config cfg = small();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 32, steps = 3;
  const int m = 2;
  context::trainer_options o = options_for(4, seq, context::placement::zigzag, context::exchange::all_gather);
  o.clip = 0.5;
  o.schedule = {1e-3f, 1e-4f, 1, steps * 2, optim::decay_kind::cosine};

  // One device.
  std::vector<double> reference;
  {
    train::trainer t(nn::llama<exec::host, float>(cfg, exec::host{1}),
                     subspace::stack{.scheduler = schedule::gradient_accumulation{m}, .optimizer = optim::adamw{}}, o);
    t.init(seed);
    auto data = text.train(batch, seq);
    for (std::int64_t s = 0; s < steps; ++s) reference.push_back(t.step(data).loss);
  }

  const testing::scratch_dir dir;
  std::mutex mu;
  std::vector<std::vector<double>> losses(4), resumed(4);
  std::vector<testing::named_tensors> weights(4);
  on_context<nn::llama<exec::host, float>>(cfg, 1, m, seed, o, [&](auto& t, int r) {
    auto data = text.train(batch, seq);
    for (std::int64_t s = 0; s < steps; ++s) {
      losses[std::size_t(r)].push_back(t.step(data).loss);
      if (s == 0) t.save(dir.path / "ckpt", data.position(), seed);
    }
    std::lock_guard lock(mu);
    weights[std::size_t(r)].add(t.model().parameters());
  });
  on_context<nn::llama<exec::host, float>>(cfg, 1, m, seed + 1, o, [&](auto& t, int r) {
    auto data = text.train(batch, seq);
    const io::trainer_state ts = t.resume(dir.path / "ckpt", data);
    CHECK(ts.step == 1);
    for (std::int64_t s = 1; s < steps; ++s) resumed[std::size_t(r)].push_back(t.step(data).loss);
  });
  for (int r = 0; r < 4; ++r) {
    CAPTURE(r);
    for (std::int64_t s = 0; s < steps; ++s) {
      CAPTURE(s);
      CHECK(std::abs(losses[std::size_t(r)][std::size_t(s)] - reference[std::size_t(s)]) <=
            1e-5 * std::abs(reference[std::size_t(s)]));
      if (s > 0) CHECK(resumed[std::size_t(r)][std::size_t(s - 1)] == losses[std::size_t(r)][std::size_t(s)]);
    }
    for (const auto& [name, v] : weights[0].values) {
      CAPTURE(name);
      CHECK(weights[std::size_t(r)].values.at(name) == v);  // bitwise
    }
  }
}

TEST_CASE("context trainer: 2 ranks per sequence x 2 replicas resume exactly, each replica at its own data position") {
  const testing::genesis_data text;
  const nn::llama_config cfg = small();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 32;
  const int m = 2;
  context::trainer_options o = options_for(2, seq, context::placement::zigzag, context::exchange::ring);
  o.schedule = {1e-3f, 1e-3f, 0, 8, optim::decay_kind::constant};
  testing::scratch_dir dir;
  std::mutex mu;
  std::vector<double> straight(4), resumed(4);
  std::vector<data::loader_position> saved(4), restored(4);
  // Each replica shuffles with its own seed, as the examples' replicas do.
  const auto data_of = [&](const auto& t) {
    return testing::loader_for(text.dir.path, "train", batch, seq, true, 7 + std::uint64_t(t.replica()));
  };
  on_context<nn::llama<exec::host, float>>(cfg, 2, m, seed, o, [&](auto& t, int r) {
    auto data = data_of(t);
    for (int s = 0; s < 2; ++s) t.step(data);
    saved[std::size_t(r)] = data.position();
    t.save(dir.path / "ckpt", data.position(), seed);
    double last = 0;
    for (int s = 0; s < 2; ++s) last = t.step(data).loss;
    std::lock_guard lock(mu);
    straight[std::size_t(r)] = last;
  });
  on_context<nn::llama<exec::host, float>>(cfg, 2, m, seed + 1, o, [&](auto& t, int r) {
    auto data = data_of(t);
    CHECK(t.resume(dir.path / "ckpt", data).step == 2);
    restored[std::size_t(r)] = data.position();
    double last = 0;
    for (int s = 0; s < 2; ++s) last = t.step(data).loss;
    std::lock_guard lock(mu);
    resumed[std::size_t(r)] = last;
  });
  CHECK(saved[0] != saved[2]);  // the replicas are at different positions
  for (int r = 0; r < 4; ++r) {
    CAPTURE(r);
    CHECK(restored[std::size_t(r)] == saved[std::size_t(r)]);
    CHECK(std::isfinite(straight[std::size_t(r)]));
    CHECK(resumed[std::size_t(r)] == straight[std::size_t(r)]);  // bitwise
  }
}

TEST_CASE("context trainer: clear errors for a layout the world or the loader cannot hold") {
  const testing::genesis_data text;
  const nn::llama_config cfg = small();
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(20);
  const auto make = [&](int world, context::trainer_options o) {
    comm::local::run_ranks(
        world,
        [&](comm::local& c) {
          auto stack = subspace::stack{.communicator = c,
                                       .compressor = compress::identity{},
                                       .scheduler = schedule::gradient_accumulation{1, world},
                                       .optimizer = optim::adamw{}};
          context::context_trainer<nn::llama<exec::host, float>, decltype(stack)> t(cfg, std::move(stack), o);
          auto data = text.train(2, 16);
          t.step(data);
        },
        lo);
  };
  CHECK_THROWS_WITH_AS(make(3, options_for(2, 32, context::placement::zigzag, context::exchange::ring)),
                       doctest::Contains("context_ranks 2 must divide the communicator's 3 ranks"), invalid_argument);
  CHECK_THROWS_WITH_AS(make(2, options_for(2, 64, context::placement::zigzag, context::exchange::ring)),
                       doctest::Contains("exceeds max_seq 32"), invalid_argument);
  CHECK_THROWS_WITH_AS(make(2, options_for(2, 30, context::placement::zigzag, context::exchange::ring)),
                       doctest::Contains("multiple of 4"), invalid_argument);
  CHECK_THROWS_WITH_AS(make(1, options_for(1, 32, context::placement::zigzag, context::exchange::ring)),
                       doctest::Contains("the loader reads sequences of 16 tokens"), invalid_argument);
}

TEST_CASE("context trainer: sync_every = 4 averages the weights every 4 steps; per-rank checkpoints resume exactly") {
  const testing::genesis_data text;
  const nn::llama_config cfg = small();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 32;
  context::trainer_options o = options_for(2, seq, context::placement::zigzag, context::exchange::ring);
  o.sync_every = 4;
  o.schedule = {2e-3f, 2e-4f, 1, 10, optim::decay_kind::cosine};
  const testing::scratch_dir dir;
  std::mutex mu;
  // weights[s][r]: rank r's tensors after step s + 1.
  std::vector<std::vector<testing::named_tensors>> weights(8, std::vector<testing::named_tensors>(2));
  std::vector<std::vector<double>> losses(2), resumed(2);
  on_context<nn::llama<exec::host, float>>(cfg, 1, 1, seed, o, [&](auto& t, int r) {
    auto data = text.train(batch, seq);
    for (int s = 0; s < 8; ++s) {
      losses[std::size_t(r)].push_back(t.step(data).loss);
      if (s + 1 == 4) t.save(dir.path / "ckpt", data.position(), seed);
      std::lock_guard lock(mu);
      weights[std::size_t(s)][std::size_t(r)].add(t.model().parameters());
    }
  });
  for (int s = 0; s < 8; ++s) {
    CAPTURE(s + 1);
    bool same = true;
    for (const auto& [name, v] : weights[std::size_t(s)][0].values)
      same = same && weights[std::size_t(s)][1].values.at(name) == v;
    CHECK(same == ((s + 1) % 4 == 0));  // equal right after each average, apart between them
  }
  CHECK(std::filesystem::exists(dir.path / "ckpt" / "rank-1" / "model.safetensors"));
  on_context<nn::llama<exec::host, float>>(cfg, 1, 1, seed + 1, o, [&](auto& t, int r) {
    auto data = text.train(batch, seq);
    CHECK(t.resume(dir.path / "ckpt", data).step == 4);
    for (int s = 4; s < 8; ++s) resumed[std::size_t(r)].push_back(t.step(data).loss);
  });
  for (int r = 0; r < 2; ++r)
    for (int s = 4; s < 8; ++s)
      CHECK(resumed[std::size_t(r)][std::size_t(s - 4)] == losses[std::size_t(r)][std::size_t(s)]);
}

// pipeline::pipeline_trainer with compress::identity on in-process ranks (comm::local): a plain pipeline must
// compute exactly what the whole model computes on one device — the loss and every gradient of the step's
// micro-batches (fp64, GPipe, 1F1B and interleaved over 2, 3 and 4 stages), evaluation, fp32 training steps,
// pipeline × data parallel, the bytes on the wire, exact resume from per-stage checkpoints, and clear errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/comm/throttled.hpp>
#include <subspace/compress/identity.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/pipeline/gpipe.hpp>
#include <subspace/pipeline/interleaved.hpp>
#include <subspace/pipeline/layout.hpp>
#include <subspace/pipeline/one_f_one_b.hpp>
#include <subspace/pipeline/pipeline_trainer.hpp>
#include <subspace/pipeline/zero_bubble.hpp>
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

/// The micro preset with 8 layers and a byte vocabulary (the corpus's).
nn::llama_config eight_layers() {
  nn::llama_config c = nn::presets::micro();
  c.vocab = 256;
  c.n_layers = 8;
  return c;
}

/// Runs body(trainer, loader) on every rank of a P-stage pipeline of `cfg` (v chunks per rank, D replicas) with
/// `scheduler`; the trainer is initialised from `seed`.
template <class Model, class Scheduler, class Body>
void on_pipeline(const nn::llama_config& cfg, Scheduler scheduler, int v, int replicas, std::uint64_t seed,
                 const pipeline::trainer_options& o, Body&& body) {
  const int p = scheduler.world_size();
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(60);
  comm::local::run_ranks(
      p * replicas,
      [&](comm::local& world) {
        const int stage = world.rank() % p;
        pipeline::pipeline_trainer t(pipeline::llama_chunks<Model>(cfg, exec::host{1}, p, v, stage),
                                     subspace::stack{.communicator = world,
                                                     .compressor = compress::identity{},
                                                     .scheduler = scheduler,
                                                     .optimizer = optim::adamw{}},
                                     o);
        t.init(seed);
        body(t);
      },
      lo);
}

}  // namespace

TEST_CASE(
    "pipeline (identity): GPipe, 1F1B and interleaved over 2-4 stages equal the whole model (fp64 loss and "
    "every gradient)") {
  using model = nn::llama<exec::host, double>;
  const testing::genesis_data text;
  const nn::llama_config cfg = eight_layers();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 16;
  const int m = 4;
  testing::named_tensors whole;
  auto reference_data = text.train(batch, seq);
  const double whole_loss = testing::whole_model_gradients<model>(cfg, seed, reference_data, m, whole);

  // `what` as a string_view: doctest CAPTUREs a const char* as a pointer.
  const auto check = [&](auto scheduler, int v, std::string_view what) {
    CAPTURE(what);
    CAPTURE(scheduler.world_size());
    std::mutex mu;
    testing::named_tensors piped;
    std::vector<double> losses;
    on_pipeline<model>(cfg, scheduler, v, 1, seed, {}, [&](auto& t) {
      auto data = text.train(batch, seq);
      const double loss = t.compute_gradients(data);
      std::lock_guard lock(mu);
      piped.add(t.chunks()[0].parameters());
      losses.push_back(loss);
    });
    for (const double l : losses) CHECK(std::abs(l - whole_loss) <= 1e-12 * std::abs(whole_loss));
    REQUIRE(piped.grads.size() == whole.grads.size());  // the stages hold every tensor once
    for (const auto& [name, g] : whole.grads) {
      CAPTURE(name);
      CHECK(testing::rel_diff(piped.values.at(name), whole.values.at(name)) == 0.0);  // the same initial weights
      CHECK(testing::rel_diff(piped.grads.at(name), g) <= 1e-12);
    }
  };
  for (const int p : {2, 3, 4}) {
    check(pipeline::gpipe{m, p}, 1, "gpipe");
    check(pipeline::one_f_one_b{m, p}, 1, "1f1b");
    check(pipeline::zero_bubble_h1{m, p}, 1, "zero bubble (split backward)");
  }
  check(pipeline::interleaved_1f1b{m, 2, 2}, 2, "interleaved, 2 ranks x 2 chunks");
  check(pipeline::interleaved_1f1b{m, 4, 2}, 2, "interleaved, 4 ranks x 2 chunks");
}

TEST_CASE("pipeline (identity): evaluation equals the whole model's, fp32 steps track train::trainer") {
  using model = nn::llama<exec::host, float>;
  const testing::genesis_data text;
  const nn::llama_config cfg = eight_layers();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 16, steps = 3;
  const int m = 2;
  pipeline::trainer_options o;
  o.clip = 0.5;  // binding: the global norm across stages must match the whole model's
  o.schedule = {3e-3f, 3e-3f, 0, steps, optim::decay_kind::constant};

  train::trainer whole(model(cfg, exec::host{1}),
                       subspace::stack{.scheduler = schedule::gradient_accumulation{m}, .optimizer = optim::adamw{}},
                       o);
  whole.init(seed);
  auto data = text.train(batch, seq);
  auto val = text.val(batch, seq);
  std::vector<train::step_result> want;
  for (std::int64_t s = 0; s < steps; ++s) want.push_back(whole.step(data));
  const double want_val = whole.evaluate(val, 3);
  testing::named_tensors whole_tensors;
  whole_tensors.add(whole.model().parameters());

  std::mutex mu;
  testing::named_tensors piped;
  on_pipeline<model>(cfg, pipeline::one_f_one_b{m, 4}, 1, 1, seed, o, [&](auto& t) {
    auto d = text.train(batch, seq);
    auto v = text.val(batch, seq);
    for (std::int64_t s = 0; s < steps; ++s) {
      const train::step_result r = t.step(d);
      CHECK(r.step == s + 1);
      CHECK(r.tokens == batch * seq * m);
      CHECK(std::abs(r.loss - want[std::size_t(s)].loss) <= 1e-5 * want[std::size_t(s)].loss);
      CHECK(std::abs(r.grad_norm - want[std::size_t(s)].grad_norm) <= 1e-5 * want[std::size_t(s)].grad_norm);
    }
    const double got_val = t.evaluate(v, 3);
    CHECK(std::abs(got_val - want_val) <= 1e-5 * want_val);
    std::lock_guard lock(mu);
    piped.add(t.chunks()[0].parameters());
  });
  for (const auto& [name, w] : whole_tensors.values) {
    CAPTURE(name);
    CHECK(testing::rel_diff(piped.values.at(name), w) <= 1e-5);
  }
}

TEST_CASE("pipeline x data parallel: 2 stages x 2 replicas equal the mean of the pipeline on each replica's data") {
  using model = nn::llama<exec::host, double>;
  const testing::genesis_data text;
  const nn::llama_config cfg = eight_layers();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 16;
  const int m = 2;
  // Replica r reads the train split with shuffle seed 7 + r: two different streams of batches.
  const auto data_of = [&](int replica) {
    return testing::loader_for(text.dir.path, "train", batch, seq, true, std::uint64_t(7 + replica));
  };
  std::vector<testing::named_tensors> single(2);
  std::vector<double> single_loss(2, 0.0);
  for (int r = 0; r < 2; ++r) {
    std::mutex mu;
    on_pipeline<model>(cfg, pipeline::one_f_one_b{m, 2}, 1, 1, seed, {}, [&](auto& t) {
      auto d = data_of(r);
      const double loss = t.compute_gradients(d);
      std::lock_guard lock(mu);
      single[std::size_t(r)].add(t.chunks()[0].parameters());
      single_loss[std::size_t(r)] = loss;
    });
  }
  std::mutex mu;
  std::vector<testing::named_tensors> both(2);
  pipeline::trainer_options o;
  o.bucket_bytes = 2000;  // several buckets, launched as the backward goes
  on_pipeline<model>(cfg, pipeline::one_f_one_b{m, 2}, 1, 2, seed, o, [&](auto& t) {
    CHECK(t.replicas() == 2);
    auto d = data_of(t.replica());
    const double loss = t.compute_gradients(d);
    CHECK(std::abs(loss - 0.5 * (single_loss[0] + single_loss[1])) <= 1e-12 * loss);
    std::lock_guard lock(mu);
    both[std::size_t(t.replica())].add(t.chunks()[0].parameters());
  });
  for (const auto& [name, g0] : single[0].grads) {
    CAPTURE(name);
    std::vector<double> mean(g0.size());
    for (std::size_t i = 0; i < g0.size(); ++i) mean[i] = 0.5 * (g0[i] + single[1].grads.at(name)[i]);
    CHECK(testing::rel_diff(both[0].grads.at(name), mean) <= 1e-12);
    CHECK(both[0].grads.at(name) == both[1].grads.at(name));  // every replica holds the mean
  }
}

TEST_CASE(
    "pipeline (identity): every boundary carries B*S*d values each way per micro-batch, in the wire type; a step "
    "makes one pipeline collective") {
  using model = nn::llama<exec::host, float>;
  const testing::genesis_data text;
  const nn::llama_config cfg = eight_layers();
  const std::int64_t batch = 2, seq = 16;
  const int m = 3, p = 4;
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(60);
  std::vector<comm::local> world = comm::local::world(p, lo);
  std::vector<comm::throttled<comm::local>> links;
  for (comm::local& c : world) links.emplace_back(std::move(c), comm::network{});
  std::vector<std::uint64_t> sent(p);
  pipeline::trainer_options o;
  SUBCASE("as the boundary type") {}
  SUBCASE("as bf16") { o.wire_values = pipeline::wire_format::values_as::bf16; }
  comm::local::run_ranks(links, [&](comm::throttled<comm::local>& c) {
    pipeline::pipeline_trainer t(pipeline::llama_chunks<model>(cfg, exec::host{1}, p, 1, c.rank()),
                                 subspace::stack{.communicator = c,
                                                 .compressor = compress::identity{},
                                                 .scheduler = pipeline::one_f_one_b{m, p},
                                                 .optimizer = optim::adamw{}},
                                 o);
    t.init(1);
    const std::uint64_t before = c.metrics()[comm::op_kind::send].bytes_sent;
    auto d = text.train(batch, seq);
    CHECK(std::isfinite(t.compute_gradients(d)));
    sent[std::size_t(c.rank())] = c.metrics()[comm::op_kind::send].bytes_sent - before;
    // A training step sums the gradient norm's squares and the loss in one collective (a slow link's latency
    // once); compute_gradients, which does not clip, sums the loss alone.
    const std::uint64_t reductions = c.metrics()[comm::op_kind::all_reduce].calls;
    auto more = text.train(batch, seq);
    const auto r = t.step(more);
    CHECK(std::isfinite(r.loss));
    CHECK(std::isfinite(r.grad_norm));
    CHECK(c.metrics()[comm::op_kind::all_reduce].calls == reductions + 1);
  });
  const std::size_t value_bytes = o.wire_values ? 2 : sizeof(float);
  const std::uint64_t boundary = std::uint64_t(batch * seq * cfg.d_model) * value_bytes * std::uint64_t(m);
  // Interior stages send activations forward and gradients backward; the ends one direction each. The scalars
  // of the loss and norm reductions are collectives, counted apart from the point-to-point bytes below.
  CHECK(sent[0] == boundary);
  CHECK(sent[1] == 2 * boundary);
  CHECK(sent[2] == 2 * boundary);
  CHECK(sent[3] == boundary);
}

TEST_CASE("pipeline: a checkpoint of every stage resumes exactly, each data replica at its own data position") {
  using model = nn::llama<exec::host, float>;
  const testing::genesis_data text;
  const nn::llama_config cfg = eight_layers();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 16;
  const int m = 2, p = 2;
  pipeline::trainer_options o;
  o.schedule = {3e-3f, 3e-3f, 0, 10, optim::decay_kind::constant};
  for (const int replicas : {1, 2}) {
    CAPTURE(replicas);
    testing::scratch_dir dir;
    std::mutex mu;
    testing::named_tensors straight, resumed;
    // Each replica shuffles with its own seed, as the examples' replicas do.
    const auto data_of = [&](const auto& t) {
      return testing::loader_for(text.dir.path, "train", batch, seq, true, 7 + std::uint64_t(t.replica()));
    };
    on_pipeline<model>(cfg, pipeline::one_f_one_b{m, p}, 1, replicas, seed, o, [&](auto& t) {
      auto d = data_of(t);
      for (int s = 0; s < 2; ++s) t.step(d);
      t.save(dir.path, d.position(), seed);
      for (int s = 0; s < 2; ++s) t.step(d);
      std::lock_guard lock(mu);
      if (t.replica() == 0) straight.add(t.chunks()[0].parameters());
    });
    CHECK(std::filesystem::exists(dir.path / "stage-0" / "model.safetensors"));
    CHECK(std::filesystem::exists(dir.path / "stage-1" / "model.safetensors"));
    on_pipeline<model>(cfg, pipeline::one_f_one_b{m, p}, 1, replicas, seed + 1, o, [&](auto& t) {
      auto d = data_of(t);
      const io::trainer_state ts = t.resume(dir.path, d);
      CHECK(ts.step == 2);
      CHECK(t.steps_done() == 2);
      for (int s = 0; s < 2; ++s) t.step(d);
      std::lock_guard lock(mu);
      if (t.replica() == 0) resumed.add(t.chunks()[0].parameters());
    });
    REQUIRE(!straight.values.empty());
    for (const auto& [name, w] : straight.values) {
      CAPTURE(name);
      CHECK(resumed.values.at(name) == w);
    }
  }
}

TEST_CASE("pipeline: a checkpoint is published whole, and stages of two saves are refused") {
  using model = nn::llama<exec::host, float>;
  const testing::genesis_data text;
  const nn::llama_config cfg = eight_layers();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  pipeline::trainer_options o;
  o.schedule = {3e-3f, 3e-3f, 0, 10, optim::decay_kind::constant};
  testing::scratch_dir dir;
  const std::filesystem::path ckpt = dir / "step", later = dir / "later";
  on_pipeline<model>(cfg, pipeline::one_f_one_b{2, 2}, 1, 1, seed, o, [&](auto& t) {
    auto d = text.train(2, 16);
    t.step(d);
    t.save(ckpt, d.position(), seed);
    t.step(d);
    t.save(ckpt, d.position(), seed);  // a re-save of the same directory replaces it whole
    t.save(later, d.position(), seed);
  });
  CHECK(dir.listing() == std::vector<std::string>{"later", "step"});
  // Stage 1 of another save (each stage's files are consistent in themselves): every rank refuses.
  std::filesystem::remove_all(later / "stage-1");
  on_pipeline<model>(cfg, pipeline::one_f_one_b{2, 2}, 1, 1, seed, o, [&](auto& t) {
    auto d = text.train(2, 16);
    t.step(d);
    t.save(dir / "earlier", d.position(), seed);
  });
  std::filesystem::rename(dir / "earlier" / "stage-1", later / "stage-1");
  std::mutex mu;
  std::vector<std::string> errors;
  on_pipeline<model>(cfg, pipeline::one_f_one_b{2, 2}, 1, 1, seed, o, [&](auto& t) {
    auto d = text.train(2, 16);
    try {
      t.resume(later, d);
    } catch (const subspace::invalid_argument& e) {
      std::lock_guard lock(mu);
      errors.push_back(e.what());
    }
  });
  REQUIRE(errors.size() == 2);
  for (const auto& e : errors) CHECK(e.find("the stages' checkpoints are of different saves") != std::string::npos);
}

TEST_CASE("pipeline: bad layouts fail clearly") {
  using model = nn::llama<exec::host, float>;
  const nn::llama_config cfg = eight_layers();
  CHECK_THROWS_WITH_AS(pipeline::even_cuts(3, 4), doctest::Contains("4 stages for 3 layers"), invalid_argument);
  CHECK(pipeline::even_cuts(8, 3) == std::vector<std::int64_t>{3, 6});
  CHECK_THROWS_WITH_AS(pipeline::llama_chunks<model>(cfg, exec::host{1}, 4, 3, 0),
                       doctest::Contains("need at least 12 layers"), invalid_argument);
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(20);
  comm::local::run_ranks(
      3,
      [&](comm::local& world) {
        const auto make = [&] {
          pipeline::pipeline_trainer t(pipeline::llama_chunks<model>(cfg, exec::host{1}, 2, 1, world.rank() % 2),
                                       subspace::stack{.communicator = world,
                                                       .compressor = compress::identity{},
                                                       .scheduler = pipeline::gpipe{2, 2},
                                                       .optimizer = optim::adamw{}},
                                       pipeline::trainer_options{});
        };
        CHECK_THROWS_WITH_AS(make(), doctest::Contains("must divide the communicator's 3 ranks"), invalid_argument);
      },
      lo);
}

// context::context_trainer with compress::kv_subspace_mixture on in-process ranks: dense warm-up steps equal the
// uncompressed trainer's bit for bit, the switch installs the same tables on every rank (U_0 orthonormal), the
// following steps compress and train, the weights stay identical on every rank, and a run resumed from a
// checkpoint inside the PCA window or after the switch repeats the uninterrupted losses bit for bit.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/compress/identity.hpp>
#include <subspace/compress/kv_subspace_mixture.hpp>
#include <subspace/context/context_trainer.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>

#include "support/genesis.hpp"
#include "support/named_tensors.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"

namespace {

using namespace subspace;

nn::llama_config small() {
  nn::llama_config c = nn::presets::micro();
  c.vocab = 256;
  c.n_layers = 3;
  c.max_seq = 32;
  return c;
}

compress::kv_subspace_options mos(const nn::llama_config& cfg) {
  compress::kv_subspace_options o;
  o.layers = cfg.n_layers;
  o.kv_dim = cfg.kv_dim();
  o.rank_k = 2;
  o.rank_v = 3;
  o.warmup_steps = 2;
  o.pca_steps = 2;
  return o;
}

context::trainer_options options(std::int64_t sync_every = 1) {
  context::trainer_options o;
  o.sync_every = sync_every;
  o.context_ranks = 2;
  o.seq = 32;
  o.layout = context::placement::zigzag;
  o.kv_exchange = context::exchange::ring;
  o.schedule = {3e-3f, 3e-4f, 1, 6, optim::decay_kind::cosine};
  return o;
}

/// What one rank saw: its losses, its tables' hashes and U_0 defects after the run, and its tensors.
struct rank_run {
  std::vector<double> losses;
  std::vector<std::uint64_t> hashes;
  double u0_defect = 0;
  testing::named_tensors tensors;
  bool compressing_after_warmup = false;
};

/// Trains `steps` steps (from `resume` when given; saving at `save_at` into `save_dir`) on 2 ranks, the weights
/// averaged every `sync_every` steps.
template <class Compressor>
std::vector<rank_run> train_on_two(const nn::llama_config& cfg, Compressor compressor, std::uint64_t seed, int steps,
                                   const testing::genesis_data& text, const std::filesystem::path& save_dir = {},
                                   int save_at = 0, const std::filesystem::path& resume = {},
                                   std::int64_t sync_every = 1) {
  std::vector<rank_run> out(2);
  std::mutex mu;
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(60);
  comm::local::run_ranks(
      2,
      [&](comm::local& c) {
        auto stack = subspace::stack{.communicator = c,
                                     .compressor = compressor,
                                     .scheduler = schedule::gradient_accumulation{2, 2},
                                     .optimizer = optim::adamw{}};
        context::context_trainer<nn::llama<exec::host, float>, decltype(stack)> t(cfg, std::move(stack),
                                                                                  options(sync_every), exec::host{1});
        auto data = text.train(2, 32);
        if (resume.empty()) t.init(seed);
        else t.resume(resume, data);
        rank_run run;
        while (t.steps_done() < steps) {
          run.losses.push_back(t.step(data).loss);
          if (t.steps_done() == 2) run.compressing_after_warmup = t.compressing_kv();
          if (t.steps_done() == save_at) t.save(save_dir, data.position(), seed);
        }
        context::for_each_mos_codec(t.model(), [&](auto& codec) {
          for (const auto p : {compress::kv_part::key, compress::kv_part::value}) {
            const compress::kv_tables& tab = codec.tables(p);
            run.hashes.push_back(tab.hash());
            for (std::int64_t i = 0; i < tab.r; ++i)
              for (std::int64_t j = 0; j < tab.r; ++j) {
                double s = 0;
                for (std::int64_t x = 0; x < tab.d; ++x) s += double(tab.u0()[x * tab.r + i]) * tab.u0()[x * tab.r + j];
                run.u0_defect = std::max(run.u0_defect, std::abs(s - (i == j ? 1.0 : 0.0)));
              }
          }
        });
        run.tensors.add(t.model().parameters());
        std::lock_guard lock(mu);
        out[std::size_t(c.rank())] = std::move(run);
      },
      lo);
  return out;
}

}  // namespace

TEST_CASE("context trainer with Mixture of Subspaces: dense warm-up, the switch, compressed steps, weights equal") {
  const testing::genesis_data text;
  const nn::llama_config cfg = small();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::vector<rank_run> dense = train_on_two(cfg, compress::identity{}, seed, 5, text);
  const std::vector<rank_run> mixed = train_on_two(cfg, compress::kv_subspace_mixture(mos(cfg)), seed, 5, text);
  for (int r = 0; r < 2; ++r) {
    CAPTURE(r);
    const rank_run& m = mixed[std::size_t(r)];
    REQUIRE(m.losses.size() == 5);
    CHECK(m.losses[0] == dense[std::size_t(r)].losses[0]);  // the warm-up is dense CP, bit for bit
    CHECK(m.losses[1] == dense[std::size_t(r)].losses[1]);
    CHECK(m.compressing_after_warmup);
    for (int s = 2; s < 5; ++s) {
      CAPTURE(s);
      CHECK(std::isfinite(m.losses[std::size_t(s)]));
      CHECK(m.losses[std::size_t(s)] != dense[std::size_t(r)].losses[std::size_t(s)]);  // compressed now
      CHECK(std::abs(m.losses[std::size_t(s)] - dense[std::size_t(r)].losses[std::size_t(s)]) <
            0.05 * dense[std::size_t(r)].losses[std::size_t(s)]);
    }
    CHECK(m.hashes.size() == 4);  // two compressed layers, K and V
    CHECK(m.hashes == mixed[0].hashes);
    CHECK(m.u0_defect < 1e-5);
    for (const auto& [name, v] : mixed[0].tensors.values) {
      CAPTURE(name);
      CHECK(m.tensors.values.at(name) == v);  // bitwise
    }
  }
  CHECK(mixed[0].tensors.values.count("model.layers.0.self_attn.k_subspace.psi.weight") == 1);
  CHECK(mixed[0].tensors.values.count("model.layers.2.self_attn.k_subspace.psi.weight") == 0);  // the last layer
}

TEST_CASE("context trainer with Mixture of Subspaces: exact resume inside the PCA window and after the switch") {
  const testing::genesis_data text;
  const nn::llama_config cfg = small();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const compress::kv_subspace_mixture c(mos(cfg));
  const testing::scratch_dir dir;
  const std::vector<rank_run> whole = train_on_two(cfg, c, seed, 5, text, dir.path / "at1", 1);
  train_on_two(cfg, c, seed, 5, text, dir.path / "at3", 3);
  for (const int at : {1, 3}) {
    CAPTURE(at);
    const std::vector<rank_run> resumed =
        train_on_two(cfg, c, seed + 1, 5, text, {}, 0, dir.path / (at == 1 ? "at1" : "at3"));
    for (int r = 0; r < 2; ++r) {
      REQUIRE(resumed[std::size_t(r)].losses.size() == std::size_t(5 - at));
      for (int s = at; s < 5; ++s)
        CHECK(resumed[std::size_t(r)].losses[std::size_t(s - at)] == whole[std::size_t(r)].losses[std::size_t(s)]);
      CHECK(resumed[std::size_t(r)].hashes == whole[std::size_t(r)].hashes);
    }
  }
}

TEST_CASE("context trainer with Mixture of Subspaces and sync_every = 2: per-rank checkpoints resume exactly") {
  const testing::genesis_data text;
  const nn::llama_config cfg = small();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const compress::kv_subspace_mixture c(mos(cfg));
  const testing::scratch_dir dir;
  const std::vector<rank_run> whole = train_on_two(cfg, c, seed, 6, text, dir.path / "at1", 1, {}, 2);
  train_on_two(cfg, c, seed, 6, text, dir.path / "at4", 4, {}, 2);
  for (const int at : {1, 4}) {
    CAPTURE(at);
    const std::vector<rank_run> resumed =
        train_on_two(cfg, c, seed + 1, 6, text, {}, 0, dir.path / (at == 1 ? "at1" : "at4"), 2);
    for (int r = 0; r < 2; ++r) {
      REQUIRE(resumed[std::size_t(r)].losses.size() == std::size_t(6 - at));
      for (int s = at; s < 6; ++s)
        CHECK(resumed[std::size_t(r)].losses[std::size_t(s - at)] == whole[std::size_t(r)].losses[std::size_t(s)]);
      CHECK(resumed[std::size_t(r)].hashes == whole[std::size_t(r)].hashes);
    }
  }
}

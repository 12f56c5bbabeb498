// train::trainer on the host: training on real text lowers the loss clearly; a resumed run is bit-identical to an
// uninterrupted one (AdamW, GaLore and GoLore states included); accumulation equals one large batch; bad resumes
// fail clearly.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <subspace/data/loader.hpp>
#include <subspace/data/text.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/optim/galore.hpp>
#include <subspace/optim/golore.hpp>
#include <subspace/train/trainer.hpp>

#include "support/genesis.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"

namespace {

using namespace subspace;
using host_llama = nn::llama<exec::host, float>;

using testing::genesis_shards;
using testing::loader_for;

nn::llama_config small_config(std::int64_t d, std::int64_t layers, std::int64_t seq) {
  nn::llama_config cfg;
  cfg.name = "test";
  cfg.vocab = 256;
  cfg.d_model = d;
  cfg.n_layers = layers;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.ffn_hidden = 3 * d;
  cfg.max_seq = seq;
  return cfg;
}

/// Every parameter value and every optimizer-state tensor of t, as bytes, by name.
template <class Trainer>
std::map<std::string, std::vector<std::byte>> snapshot(Trainer& t) {
  std::map<std::string, std::vector<std::byte>> out;
  const auto keep = [&](const std::string& name, auto v) {
    std::vector<std::byte> bytes(std::size_t(v.numel()) * sizeof(typename decltype(v)::element_type));
    std::memcpy(bytes.data(), v.data(), bytes.size());
    out[name] = std::move(bytes);
  };
  std::size_t i = 0;
  t.model().parameters().for_each([&](const std::string& name, auto value, auto, const parameter_info&) {
    keep(name, value);
    io::for_each_state_tensor(t.states()[i++], [&](const std::string& s, auto v) { keep(name + "." + s, v); });
  });
  return out;
}

}  // namespace

TEST_CASE("trainer: on real text (Genesis, byte-level) the validation loss falls well below the unigram entropy") {
  testing::scratch_dir dir;
  const auto shards = genesis_shards(dir.path);
  const std::int64_t seq = 64, batch = 8, steps = 300;

  // The entropy of the training bytes' unigram distribution: what a model that ignores context can reach.
  std::vector<double> counts(256, 0.0);
  double total = 0;
  for (const auto& path : shards.train) {
    const data::token_file f(path);
    std::vector<std::int32_t> tokens(f.size());
    f.read(0, tokens.size(), tokens.data(), 256);
    for (const auto t : tokens) counts[std::size_t(t)] += 1;
    total += double(tokens.size());
  }
  double unigram = 0;
  for (const double c : counts)
    if (c > 0) unigram -= c / total * std::log(c / total);

  train::trainer_options o;
  o.clip = 1.0;
  o.schedule = {3e-3f, 3e-4f, 20, steps, optim::decay_kind::cosine};
  train::trainer t(host_llama(small_config(64, 2, seq), exec::host{}), subspace::stack{}, o);
  t.init(testing::fresh_seed());
  auto train_data = loader_for(dir.path, "train", batch, seq, true, testing::fresh_seed());
  auto val_data = loader_for(dir.path, "val", batch, seq, false);

  const double before = t.evaluate(val_data, 8);
  train::step_result last;
  for (std::int64_t s = 0; s < steps; ++s) last = t.step(train_data);
  const double after = t.evaluate(val_data, 8);
  CAPTURE(before);
  CAPTURE(after);
  CAPTURE(unigram);
  MESSAGE("Genesis validation loss " << before << " -> " << after << " nats/byte (unigram entropy " << unigram << ")");
  CHECK(std::abs(before - std::log(256.0)) < 0.5);  // starts near uniform
  CHECK(after < unigram - 0.5);                     // uses context, not just letter frequencies
  CHECK(after < before - 2.5);
  CHECK(last.step == steps);
  CHECK(t.tokens_done() == steps * batch * seq);
  CHECK(std::isfinite(last.grad_norm));
  CHECK_FALSE(last.skipped);
}

TEST_CASE_TEMPLATE("trainer: a resumed run is bit-identical to an uninterrupted one", Optimizer, optim::adamw,
                   optim::galore<>, optim::golore<>) {
  testing::scratch_dir dir;
  genesis_shards(dir.path / "data");
  const std::int64_t seq = 32, batch = 4, steps = 7, stop = 3;
  const auto cfg = small_config(32, 2, seq);
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);

  Optimizer opt{};
  if constexpr (!std::is_same_v<Optimizer, optim::adamw>) {
    opt.rank = 8;            // the 32 x 32 attention and 96 x 32 MLP matrices are projected
    opt.refresh_period = 2;  // refreshes before and after the resume point
  }
  if constexpr (std::is_same_v<Optimizer, optim::golore<>>) {
    opt.random_percent = 50;  // GaLore's SVD projectors first, random ones after the switch
    opt.total_steps = steps;
    opt.seed = seed;
  }
  const auto stack = subspace::stack{.scheduler = schedule::gradient_accumulation{2}, .optimizer = opt};
  train::trainer_options o;
  o.clip = 0.5;  // clipping active
  o.schedule = {1e-3f, 1e-4f, 2, steps, optim::decay_kind::cosine};

  const auto fresh = [&] {
    train::trainer t(host_llama(cfg, exec::host{2}), stack, o);
    t.init(seed);
    return t;
  };

  // Uninterrupted.
  auto straight = fresh();
  auto straight_data = loader_for(dir.path / "data", "train", batch, seq, true, seed);
  std::vector<double> straight_losses;
  for (std::int64_t s = 0; s < steps; ++s) straight_losses.push_back(straight.step(straight_data).loss);

  // Stopped at `stop`, saved, and continued by a new trainer from the checkpoint.
  {
    auto first = fresh();
    auto data = loader_for(dir.path / "data", "train", batch, seq, true, seed);
    for (std::int64_t s = 0; s < stop; ++s) first.step(data);
    first.save(dir.path / "ckpt", data.position(), seed);
  }
  train::trainer resumed(host_llama(cfg, exec::host{2}), stack, o);
  resumed.init(seed + 1);  // different weights: the checkpoint must replace all of them
  auto data = loader_for(dir.path / "data", "train", batch, seq, true, seed);
  const io::trainer_state ts = resumed.resume(dir.path / "ckpt", data);
  CHECK(ts.step == stop);
  CHECK(resumed.steps_done() == stop);
  CHECK(resumed.tokens_done() == stop * 2 * batch * seq);
  for (std::int64_t s = stop; s < steps; ++s) {
    const double loss = resumed.step(data).loss;
    CHECK(testing::same_bits(loss, straight_losses[std::size_t(s)]));
  }

  const auto a = snapshot(straight), b = snapshot(resumed);
  REQUIRE(a.size() == b.size());
  std::size_t differing = 0;
  for (const auto& [name, bytes] : a) {
    const auto it = b.find(name);
    REQUIRE(it != b.end());
    if (it->second != bytes) {
      ++differing;
      MESSAGE("differs after resume: " << name);
    }
  }
  CHECK(differing == 0);
  CHECK(data.position() == straight_data.position());
}

TEST_CASE_TEMPLATE("trainer: a clipped step equals the gradients scaled in memory and an unscaled optimizer step",
                   Optimizer, optim::adamw, optim::galore<>) {
  // AdamW applies the clipping factor as it reads each gradient (step_context::grad_scale); GaLore gets gradients
  // scaled in memory by the replica. Either way the step is bit for bit the one clip_grad_norm's scaling gives.
  testing::scratch_dir dir;
  genesis_shards(dir.path);
  const std::int64_t seq = 32, batch = 4;
  const auto cfg = small_config(32, 2, seq);
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  Optimizer opt{};
  if constexpr (!std::is_same_v<Optimizer, optim::adamw>) opt.rank = 8;
  const auto stack = subspace::stack{.optimizer = opt};
  train::trainer_options o;
  o.clip = 1e-3;  // far below the gradient norm: the step clips
  o.schedule = {1e-3f, 1e-3f, 0, 1, optim::decay_kind::constant};

  train::trainer folded(host_llama(cfg, exec::host{}), stack, o);
  folded.init(seed);
  auto data = loader_for(dir.path, "train", batch, seq, false);
  const train::step_result r = folded.step(data);
  REQUIRE(r.grad_norm > 10 * o.clip);

  train::trainer by_hand(host_llama(cfg, exec::host{}), stack, o);
  by_hand.init(seed);
  auto again = loader_for(dir.path, "train", batch, seq, false);
  const data::token_batch b = again.next();
  auto& model = by_hand.model();
  model.zero_grad();
  model.forward(b.tokens.v(), b.targets.v());
  model.backward();
  auto& store = model.parameters();
  const std::vector<view<float, host_space>> grads{store.flat_grads()};  // one range, as the trainer sums it
  CHECK(testing::same_bits(optim::clip_grad_norm(exec::host{}, grads, o.clip), r.grad_norm));
  for (std::size_t i = 0; i < store.size(); ++i)
    by_hand.optimizer().step(exec::host{}, store.value(i), view<const float, host_space>(store.grad(i)),
                             by_hand.states()[i], store.info(i), optim::step_context{r.lr, 1});

  const auto want = snapshot(by_hand), got = snapshot(folded);
  REQUIRE(want.size() == got.size());
  for (const auto& [name, bytes] : want) {
    CAPTURE(name);
    CHECK(got.at(name) == bytes);
  }
}

TEST_CASE("trainer: accumulating two micro-batches of 4 equals one batch of 8") {
  testing::scratch_dir dir;
  genesis_shards(dir.path);
  const std::int64_t seq = 32;
  const auto cfg = small_config(32, 2, seq);
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  train::trainer_options o;
  o.clip = 0;
  o.schedule = {1e-3f, 1e-3f, 0, 1, optim::decay_kind::constant};

  // SGD-like comparison: read the gradients the one step used through AdamW's first moment, m = (1 - beta1) g.
  const auto first_moments = [&](std::int64_t batch, std::int64_t accumulation) {
    train::trainer t(host_llama(cfg, exec::host{}),
                     subspace::stack{.scheduler = schedule::gradient_accumulation{int(accumulation)}}, o);
    t.init(seed);
    auto data = loader_for(dir.path, "train", batch, seq, false);
    const double loss = t.step(data).loss;
    std::vector<host_tensor<float>> m;
    for (auto& s : t.states()) {
      m.emplace_back(s.m.shape());
      copy(exec::host{}, view<const float, host_space>(s.m.v()), m.back().v());
    }
    return std::make_pair(loss, std::move(m));
  };
  const auto [loss_big, m_big] = first_moments(8, 1);
  const auto [loss_acc, m_acc] = first_moments(4, 2);
  CHECK(std::abs(loss_big - loss_acc) <= 1e-5 * loss_big);
  REQUIRE(m_big.size() == m_acc.size());
  for (std::size_t i = 0; i < m_big.size(); ++i) CHECK(testing::rel_error(m_acc[i], m_big[i]) < 1e-5);
}

TEST_CASE("trainer: resuming with another optimizer or model fails with a clear message") {
  testing::scratch_dir dir;
  genesis_shards(dir.path / "data");
  const std::int64_t seq = 32;
  const auto cfg = small_config(32, 2, seq);
  train::trainer_options o;
  o.schedule = {1e-3f, 1e-4f, 0, 10, optim::decay_kind::cosine};
  {
    train::trainer t(host_llama(cfg, exec::host{}), subspace::stack{}, o);
    t.init(1);
    auto data = loader_for(dir.path / "data", "train", 4, seq, true);
    t.step(data);
    t.save(dir.path / "ckpt", data.position(), 1);
  }
  auto data = loader_for(dir.path / "data", "train", 4, seq, true);
  optim::galore<> galore;
  galore.rank = 8;
  train::trainer g(host_llama(cfg, exec::host{}), subspace::stack{.optimizer = galore}, o);
  CHECK_THROWS_WITH_AS(g.resume(dir.path / "ckpt", data), doctest::Contains("q_proj.weight.exp_avg' in"),
                       invalid_argument);

  auto other = cfg;
  other.d_model = 64;
  train::trainer wider(host_llama(other, exec::host{}), subspace::stack{}, o);
  CHECK_THROWS_WITH_AS(wider.resume(dir.path / "ckpt", data), doctest::Contains("hidden_size"), invalid_argument);

  auto unshuffled = loader_for(dir.path / "data", "train", 4, seq, false);
  train::trainer same(host_llama(cfg, exec::host{}), subspace::stack{}, o);
  CHECK_THROWS_WITH_AS(same.resume(dir.path / "ckpt", unshuffled), doctest::Contains("shuffled"), invalid_argument);
}

TEST_CASE("trainer: bad options are rejected naming the field") {
  train::trainer_options o;
  CHECK_THROWS_WITH_AS(schedule::gradient_accumulation{0}, doctest::Contains("needs at least 1 micro-batch per step"),
                       invalid_argument);
  o.schedule.warmup_steps = 5;
  o.schedule.total_steps = 2;
  CHECK_THROWS_WITH_AS(train::trainer(host_llama(nn::presets::micro(), exec::host{}), subspace::stack{}, o),
                       doctest::Contains("warmup_steps"), invalid_argument);
}

TEST_CASE("trainer: a model given as three local stages (one store, identity boundaries) trains like the whole") {
  testing::scratch_dir dir;
  genesis_shards(dir.path);
  const std::int64_t seq = 32, batch = 4, steps = 4;
  const auto cfg = small_config(32, 3, seq);
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  train::trainer_options o;
  o.clip = 0.5;
  o.schedule = {2e-3f, 2e-4f, 1, steps, optim::decay_kind::cosine};
  const auto stack = subspace::stack{.scheduler = schedule::gradient_accumulation{2}};

  train::trainer whole(host_llama(cfg, exec::host{1}), stack, o);
  whole.init(seed);
  auto store = std::make_shared<host_llama::store_type>();
  std::vector<host_llama> stages;
  for (const auto& s : nn::llama_stage::split(cfg, {1, 2})) stages.emplace_back(cfg, exec::host{1}, s, store);
  train::trainer staged(std::move(stages), stack, o);
  staged.init(seed);
  REQUIRE(staged.stages().size() == 3);

  auto a = loader_for(dir.path, "train", batch, seq, true, seed);
  auto b = loader_for(dir.path, "train", batch, seq, true, seed);
  for (std::int64_t s = 0; s < steps; ++s) {
    const train::step_result x = whole.step(a), y = staged.step(b);
    CAPTURE(s);
    CHECK(x.loss == y.loss);
    CHECK(x.grad_norm == y.grad_norm);
  }
  const auto va = whole.model().parameters().flat_values(), vb = staged.model().parameters().flat_values();
  REQUIRE(va.numel() == vb.numel());
  CHECK(std::equal(va.data(), va.data() + va.numel(), vb.data()));
  auto val_a = loader_for(dir.path, "val", batch, seq, false), val_b = loader_for(dir.path, "val", batch, seq, false);
  CHECK(whole.evaluate(val_a, 3) == staged.evaluate(val_b, 3));
}

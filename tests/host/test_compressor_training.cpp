// A compressor with a trainable tensor, end to end: a per-token gain applied on both sides of a boundary (the
// receiver reads the token ids from the payload) passes the Compressor conformance suite; its gradient through a
// two-stage chain on the plan engine matches central differences in double; it trains through
// dist::data_parallel_trainer on two ranks (its gradient all-reduced, every rank ending with the same gain) and
// through decent::gossip_trainer; and a checkpoint holds it and restores it bit for bit.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <decent/gossip_trainer.hpp>
#include <decent/topology.hpp>
#include <subspace/comm/local.hpp>
#include <subspace/comm/self.hpp>
#include <subspace/compress/concepts.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/data/text.hpp>
#include <subspace/dist/data_parallel_trainer.hpp>
#include <subspace/io/safetensors.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/train/engine.hpp>
#include <subspace/train/trainer.hpp>

#include "conformance.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"

namespace {

using namespace subspace;

/// One trainable tensor, the gain g [vocab]: the sender scales row r of x by g[token r] (the token ids beside x),
/// the receiver scales row r of the payload by g[token r] again, reading the ids the payload carries. Linear in x
/// and in the payload values; both backward functions accumulate into g's gradient. Host memory, any element
/// types; views must be contiguous.
struct token_gain {
  static constexpr bool is_linear = true;
  static constexpr bool sends_tokens = true;
  static constexpr const char* name = "compress.token_gain";

  std::int64_t vocab = 0;
  std::size_t index = 0;  // the gain's store index

  shape payload_shape(const shape& x) const { return x; }
  std::size_t wire_bytes(const shape& x, std::size_t element_bytes) const {
    return std::size_t(x.numel()) * element_bytes + sizeof(std::int32_t) * std::size_t(compress::rows(x));
  }
  template <class Store>
  void declare_parameters(Store& store) {
    index = store.add(parameter_info{name, shape{vocab}, false, parameter_init{0.0f, 1.0f, 0}});
  }

  template <class In, class T, class P>
  void encode(const exec::host&, compress::boundary<In, host_space> in, compress::payload<T, host_space> out,
              P& params) const {
    same_shape(in.x, out.values, "encode", "payload values");
    check_tokens(in.tokens, in.x.shape(), "encode", "the boundary's tokens");
    check_tokens(out.tokens, in.x.shape(), "encode", "the payload's tokens", false);
    std::copy(in.tokens.data(), in.tokens.data() + in.tokens.numel(), out.tokens.data());
    scale(params, in.x, in.tokens, out.values);
  }
  template <class In, class T, class P>
  void decode(const exec::host&, compress::payload<In, host_space> in, view<T, host_space> x_hat, P& params) const {
    same_shape(in.values, x_hat, "decode", "x_hat");
    check_tokens(in.tokens, x_hat.shape(), "decode", "the payload's tokens");
    scale(params, in.values, in.tokens, x_hat);
  }
  template <class Fwd, class In, class T, class P>
  void decode_backward(const exec::host&, compress::payload<Fwd, host_space> in, view<In, host_space> grad_x_hat,
                       view<T, host_space> grad_payload, P& params) const {
    same_shape(grad_x_hat, grad_payload, "decode_backward", "grad_payload");
    same_shape(in.values, grad_payload, "decode_backward", "the payload");
    check_tokens(in.tokens, grad_payload.shape(), "decode_backward", "the payload's tokens");
    scale(params, grad_x_hat, in.tokens, grad_payload);
    accumulate(params, in.values, grad_x_hat, in.tokens);
  }
  template <class Fwd, class In, class T, class P>
  void encode_backward(const exec::host&, compress::boundary<Fwd, host_space> in, view<In, host_space> grad_payload,
                       view<T, host_space> grad_x, P& params) const {
    same_shape(grad_payload, grad_x, "encode_backward", "grad_x");
    same_shape(in.x, grad_x, "encode_backward", "x");
    check_tokens(in.tokens, grad_x.shape(), "encode_backward", "the boundary's tokens");
    scale(params, grad_payload, in.tokens, grad_x);
    accumulate(params, in.x, grad_payload, in.tokens);
  }

 private:
  template <class A, class B>
  static void same_shape(view<A, host_space> a, view<B, host_space> b, const char* op, const char* what) {
    require(a.shape() == b.shape(), [&] {
      return std::string("token_gain::") + op + ": " + what + " has shape " + to_string(b.shape()) + ", expected " +
             to_string(a.shape());
    });
  }
  /// One token id per row of x; ids in [0, vocab) unless the view is an output (`ids` false).
  template <class I>
  void check_tokens(view<I, host_space> tokens, const shape& x, const char* op, const char* what,
                    bool ids = true) const {
    require(!tokens.empty() && tokens.numel() == compress::rows(x) && tokens.is_contiguous(), [&] {
      return std::string("token_gain::") + op + ": " + what + " has shape " + to_string(tokens.shape()) +
             ", expected [" + std::to_string(compress::rows(x)) + "] (one per row of " + to_string(x) + ")";
    });
    for (std::int64_t r = 0; ids && r < tokens.numel(); ++r)
      require(0 <= tokens.data()[r] && tokens.data()[r] < vocab, [&] {
        return std::string("token_gain::") + op + ": token id " + std::to_string(tokens.data()[r]) + " outside [0, " +
               std::to_string(vocab) + ")";
      });
  }
  /// out[r, :] = g[tokens[r]] · in[r, :].
  template <class P, class In, class T>
  void scale(P& params, view<In, host_space> in, view<const std::int32_t, host_space> tokens,
             view<T, host_space> out) const {
    const auto g = params.value(index);
    const std::int64_t rows = tokens.numel(), cols = rows > 0 ? in.numel() / rows : 0;
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t j = 0; j < cols; ++j)
        out.data()[r * cols + j] = T(double(g.data()[tokens.data()[r]]) * double(in.data()[r * cols + j]));
  }
  /// grad g[tokens[r]] += <a[r, :], b[r, :]>.
  template <class P, class A, class B>
  void accumulate(P& params, view<A, host_space> a, view<B, host_space> b,
                  view<const std::int32_t, host_space> tokens) const {
    const auto grad = params.grad(index);
    using G = typename decltype(grad)::value_type;
    const std::int64_t rows = tokens.numel(), cols = rows > 0 ? a.numel() / rows : 0;
    for (std::int64_t r = 0; r < rows; ++r) {
      double s = 0;
      for (std::int64_t j = 0; j < cols; ++j) s += double(a.data()[r * cols + j]) * double(b.data()[r * cols + j]);
      grad.data()[tokens.data()[r]] = G(double(grad.data()[tokens.data()[r]]) + s);
    }
  }
};

static_assert(Compressor<token_gain>);

struct token_gain_fixture {
  using compressor = token_gain;
  static constexpr bool lossless = false;
  static constexpr std::int32_t vocab = 11;
  static token_gain make(std::uint64_t) { return token_gain{vocab}; }
  static std::vector<shape> shapes() { return {{3, 5}, {8, 16}, {2, 3, 4}}; }
};

/// nn::presets::micro() (d 16, 2 layers, max_seq 16) with the byte vocabulary.
nn::llama_config byte_micro() {
  nn::llama_config c = nn::presets::micro();
  c.vocab = 256;
  return c;
}

/// The two stages of `cfg` split after layer 1, on one new store.
template <class Model>
std::vector<Model> two_stages(const nn::llama_config& cfg) {
  auto store = std::make_shared<typename Model::store_type>();
  std::vector<Model> stages;
  for (const auto& s : nn::llama_stage::split(cfg, {1})) stages.emplace_back(cfg, exec::host{1}, s, store);
  return stages;
}

/// A fixed batch, every micro-batch.
struct fixed_source {
  host_tensor<std::int32_t> tokens, targets;
  void next(view<std::int32_t, host_space> t, view<std::int32_t, host_space> y) {
    std::copy(tokens.data(), tokens.data() + tokens.numel(), t.data());
    std::copy(targets.data(), targets.data() + targets.numel(), y.data());
  }
  shape batch_shape() const { return tokens.shape(); }
};

/// Genesis (KJV, public domain) as byte-level shards in a scratch directory.
struct corpus {
  testing::scratch_dir dir;
  data::token_dataset train;

  corpus() {
    data::text_to_shards_options o;
    o.prefix = "genesis";
    o.val_fraction = 0.1;
    data::text_to_shards({std::filesystem::path(SUBSPACE_TEST_DATA_DIR) / "kjv_genesis.txt"}, dir.path, o);
    train = data::token_dataset::open((dir.path / "genesis_train_*.bin").string());
  }
  /// Rank r's own shard of n.
  data::token_dataset shard(int r, int n) const {
    const std::uint64_t t = train.tokens();
    return train.slice(t * std::uint64_t(r) / std::uint64_t(n), t * std::uint64_t(r + 1) / std::uint64_t(n));
  }
};

data::batch_loader loader(data::token_dataset d, std::int64_t batch, std::int64_t seq) {
  data::loader_options o;
  o.batch = batch;
  o.seq = seq;
  o.vocab = 256;
  o.shuffle = false;
  return data::batch_loader(std::move(d), o);
}

/// The gain's values in a store, copied out.
template <class Store>
std::vector<float> gain_of(Store& store) {
  const auto i = store.find(token_gain::name);
  REQUIRE(i.has_value());
  const auto v = store.value(*i);
  return std::vector<float>(v.data(), v.data() + v.numel());
}
template <class Store>
std::vector<float> gain_grad_of(Store& store) {
  const auto i = store.find(token_gain::name);
  REQUIRE(i.has_value());
  const auto g = store.grad(*i);
  return std::vector<float>(g.data(), g.data() + g.numel());
}

}  // namespace

TYPE_TO_STRING(token_gain_fixture);
TEST_CASE_TEMPLATE_APPLY(compressor_conformance, std::tuple<token_gain_fixture>);

TEST_CASE("compressor training: the gain's gradient through a two-stage chain matches central differences (fp64)") {
  using dmodel = nn::llama<exec::host, double>;
  const nn::llama_config cfg = nn::presets::micro();  // vocab 32
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const exec::host ex{1};
  std::vector<dmodel> stages = two_stages<dmodel>(cfg);
  auto& store = stages[0].parameters();
  token_gain gain{cfg.vocab};
  const compress::parameter_range declared = compress::declare(gain, store);
  REQUIRE(declared.size() == 1);
  CHECK(declared.first == stages[1].last_parameter());  // after the stages' tensors
  store.allocate(ex);
  for (dmodel& m : stages) m.init(seed);
  store.init(ex, seed, declared.first, declared.last);
  const auto g = store.value(gain.index);
  CHECK(std::all_of(g.data(), g.data() + g.numel(), [](double v) { return v == 1.0; }));  // parameter_init
  const host_tensor<double> noise = testing::random_tensor<double>({cfg.vocab}, seed + 1, 0.0f, 0.2f);
  for (std::int64_t t = 0; t < cfg.vocab; ++t) g.data()[t] += noise.data()[t];

  // Tokens from a few ids, so each gain entry collects gradient from several rows; id 31 never occurs.
  const std::int64_t batch = 2, seq = 8;
  fixed_source source{host_tensor<std::int32_t>({batch, seq}), host_tensor<std::int32_t>({batch, seq})};
  for (std::int64_t i = 0; i < batch * seq; ++i) {
    source.tokens.data()[i] = std::int32_t((i * 5 + 3) % 7);
    source.targets.data()[i] = std::int32_t((i * 3 + 1) % 9);
  }

  train::plan_engine<dmodel, token_gain> engine(stages, gain, declared);
  std::vector<bool> reported(store.size(), false);
  int gain_reports = 0;
  store.zero_grad(ex);
  const double loss = engine.run(
      schedule::gradient_accumulation{1}.plan(0, 0), source,
      [&](std::size_t first, std::size_t last) {
        for (std::size_t i = first; i < last; ++i) reported[i] = true;
        gain_reports += first <= gain.index && gain.index < last;
      },
      [] {});
  CHECK(std::all_of(reported.begin(), reported.end(), [](bool r) { return r; }));
  CHECK(gain_reports == 1);
  CHECK(std::abs(engine.evaluate(source.tokens.v(), source.targets.v()) - loss) <= 1e-12 * loss);

  const auto grad = store.grad(gain.index);
  CHECK(grad.data()[31] == 0.0);
  const double h = 1e-5;
  for (const std::int32_t t : {0, 3, 6}) {
    CAPTURE(t);
    const double saved = g.data()[t];
    g.data()[t] = saved + h;
    const double plus = engine.evaluate(source.tokens.v(), source.targets.v());
    g.data()[t] = saved - h;
    const double minus = engine.evaluate(source.tokens.v(), source.targets.v());
    g.data()[t] = saved;
    const double fd = (plus - minus) / (2 * h), an = grad.data()[t];
    CAPTURE(fd);
    CAPTURE(an);
    CHECK(std::abs(an) > 1e-6);
    CHECK(std::abs(fd - an) <= 1e-6 * std::abs(an) + 1e-10);
  }
}

TEST_CASE("compressor training: the gain trains through dist::data_parallel_trainer on two ranks (all-reduced)") {
  using model = nn::llama<exec::host, float>;
  const corpus text;
  const int n = 2;
  const std::int64_t batch = 2, seq = 16, steps = 3;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  dist::trainer_options o;
  o.clip = 1.0;
  o.schedule = {1e-2f, 1e-2f, 0, steps, optim::decay_kind::constant};

  comm::local_options lo;
  lo.timeout = std::chrono::seconds(60);
  std::vector<comm::local> comms = comm::local::world(n, lo);
  std::vector<std::vector<float>> initial(n), grads(n), trained(n);
  std::vector<int> in_plan(n, 0);
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const auto r = std::size_t(c.rank());
    dist::data_parallel_trainer t(two_stages<model>(byte_micro()),
                                  subspace::stack{.communicator = c,
                                                  .compressor = token_gain{256},
                                                  .scheduler = schedule::gradient_accumulation{1, n},
                                                  .optimizer = optim::adamw{}},
                                  o);
    auto& store = t.model().parameters();
    for (const auto& e : t.buckets().tensors()) in_plan[r] += e.name == token_gain::name;
    t.init(seed + r);  // rank 0's weights win
    initial[r] = gain_of(store);

    auto data = loader(text.shard(c.rank(), n), batch, seq);
    t.compute_gradients(data);
    grads[r] = gain_grad_of(store);
    for (std::int64_t k = 0; k < steps; ++k) {
      const train::step_result s = t.step(data);
      CHECK(std::isfinite(s.loss));
    }
    trained[r] = gain_of(store);
  });
  for (std::size_t r = 0; r < std::size_t(n); ++r) {
    CAPTURE(r);
    CHECK(in_plan[r] == 1);  // the gain is cut into a bucket
    CHECK(std::all_of(initial[r].begin(), initial[r].end(), [](float v) { return v == 1.0f; }));
    CHECK(grads[r] == grads[0]);      // the mean over the ranks
    CHECK(trained[r] == trained[0]);  // every rank steps the same gain
  }
  CHECK(std::any_of(grads[0].begin(), grads[0].end(), [](float v) { return v != 0.0f; }));
  CHECK(trained[0] != initial[0]);
}

TEST_CASE("compressor training: the all-reduced gain gradient is the mean of the ranks' own gradients") {
  using model = nn::llama<exec::host, float>;
  const corpus text;
  const int n = 2;
  const std::int64_t batch = 2, seq = 16;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  dist::trainer_options o;

  // Each rank's own gradient: one rank, its shard.
  std::vector<std::vector<float>> own(n);
  for (int r = 0; r < n; ++r) {
    dist::data_parallel_trainer t(two_stages<model>(byte_micro()),
                                  subspace::stack{.communicator = comm::self{},
                                                  .compressor = token_gain{256},
                                                  .scheduler = schedule::gradient_accumulation{1, 1},
                                                  .optimizer = optim::adamw{}},
                                  o);
    t.init(seed);
    auto data = loader(text.shard(r, n), batch, seq);
    t.compute_gradients(data);
    own[std::size_t(r)] = gain_grad_of(t.model().parameters());
  }
  std::vector<std::vector<float>> reduced(n);
  comm::local::run_ranks(n, [&](comm::local& c) {
    dist::data_parallel_trainer t(two_stages<model>(byte_micro()),
                                  subspace::stack{.communicator = c,
                                                  .compressor = token_gain{256},
                                                  .scheduler = schedule::gradient_accumulation{1, n},
                                                  .optimizer = optim::adamw{}},
                                  o);
    t.init(seed);
    auto data = loader(text.shard(c.rank(), n), batch, seq);
    t.compute_gradients(data);
    reduced[std::size_t(c.rank())] = gain_grad_of(t.model().parameters());
  });
  REQUIRE(own[0] != own[1]);  // the shards differ
  double err = 0, scale = 0;
  for (std::size_t t = 0; t < own[0].size(); ++t) {
    const double mean = (double(own[0][t]) + double(own[1][t])) / 2;
    err = std::max(err, std::abs(double(reduced[0][t]) - mean));
    scale = std::max(scale, std::abs(mean));
  }
  CHECK(scale > 0);
  CHECK(err <= 1e-6 * scale);
}

TEST_CASE("compressor training: a checkpoint holds the gain and resume restores it bit for bit") {
  using model = nn::llama<exec::host, float>;
  const corpus text;
  testing::scratch_dir dir;
  const std::int64_t batch = 2, seq = 16;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  train::trainer_options o;
  o.schedule = {1e-2f, 1e-2f, 0, 4, optim::decay_kind::constant};
  const auto stack = subspace::stack{.compressor = token_gain{256}, .optimizer = optim::adamw{}};

  train::trainer a(two_stages<model>(byte_micro()), stack, o);
  a.init(seed);
  const std::vector<float> initial = gain_of(a.model().parameters());
  CHECK(std::all_of(initial.begin(), initial.end(), [](float v) { return v == 1.0f; }));
  auto data_a = loader(text.train, batch, seq);
  for (int k = 0; k < 2; ++k) a.step(data_a);
  const std::vector<float> saved = gain_of(a.model().parameters());
  CHECK(std::any_of(saved.begin(), saved.end(), [](float v) { return v != 1.0f; }));
  a.save(dir.path, data_a.position(), seed);

  const io::safetensors_file file(dir.path / io::model_file_name);
  const io::st_tensor* t = file.find(token_gain::name);
  REQUIRE(t != nullptr);
  CHECK(t->to_shape() == shape{256});
  const host_tensor<float> on_disk = file.read<float>(token_gain::name);
  CHECK(std::memcmp(on_disk.data(), saved.data(), saved.size() * sizeof(float)) == 0);

  train::trainer b(two_stages<model>(byte_micro()), stack, o);
  b.init(seed + 1);
  auto data_b = loader(text.train, batch, seq);
  b.resume(dir.path, data_b);
  const std::vector<float> restored = gain_of(b.model().parameters());
  CHECK(std::memcmp(restored.data(), saved.data(), saved.size() * sizeof(float)) == 0);

  // The resumed run continues exactly as the uninterrupted one.
  const train::step_result x = a.step(data_a), y = b.step(data_b);
  CHECK(x.loss == y.loss);
  CHECK(gain_of(a.model().parameters()) == gain_of(b.model().parameters()));
}

TEST_CASE("compressor training: decent::gossip_trainer steps and mixes the gain with the model") {
  using model = nn::llama<exec::host, float>;
  const corpus text;
  const int n = 2;
  const std::int64_t batch = 2, seq = 16, steps = 3;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  decent::gossip_options o;
  o.schedule = {1e-2f, 1e-2f, 0, steps, optim::decay_kind::constant};

  std::vector<std::vector<float>> initial(n), stepped(n), finished(n);
  comm::local::run_ranks(n, [&](comm::local& c) {
    const auto r = std::size_t(c.rank());
    decent::gossip_trainer t(two_stages<model>(byte_micro()),
                             subspace::stack{.communicator = c,
                                             .compressor = token_gain{256},
                                             .scheduler = decent::complete(n),
                                             .optimizer = optim::adamw{}},
                             o);
    t.init(seed);
    initial[r] = gain_of(t.model().parameters());
    auto data = loader(text.shard(c.rank(), n), batch, seq);
    for (std::int64_t k = 0; k < steps; ++k) CHECK(std::isfinite(t.step(data).loss));
    stepped[r] = gain_of(t.model().parameters());
    t.finish();
    finished[r] = gain_of(t.model().parameters());
  });
  CHECK(std::all_of(initial[0].begin(), initial[0].end(), [](float v) { return v == 1.0f; }));
  CHECK(stepped[0] != initial[0]);
  CHECK(stepped[0] != stepped[1]);    // each rank's last local step used its own gradient
  CHECK(finished[0] == finished[1]);  // the average
}

// adjoint::selective_ssm and its three gradient engines on the host (docs/ssm.md): BPTT against finite
// differences, the exact adjoint against BPTT, the scans against their explicit sums, the sharded engine against
// the paper's literal double sums (and where it is exact), sharding over in-process ranks, long sequences, memory
// against the formulas, and training.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <adjoint/selective_ssm.hpp>
#include <subspace/comm/local.hpp>
#include <subspace/comm/throttled.hpp>
#include <subspace/compress/identity.hpp>
#include <subspace/io/struct_config.hpp>
#include <subspace/optim/adamw.hpp>
#include <subspace/pipeline/gpipe.hpp>
#include <subspace/pipeline/pipeline_trainer.hpp>
#include <subspace/pipeline/zero_bubble.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>
#include <subspace/train/engine.hpp>
#include <subspace/train/trainer.hpp>

#include "support/named_tensors.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"
#include "support/token_batch.hpp"

namespace {

using namespace subspace;

template <class Engine, class T = double>
using ssm = adjoint::selective_ssm<exec::host, T, Engine>;
static_assert(nn::check_model<ssm<adjoint::bptt>>());
static_assert(nn::check_model<ssm<adjoint::exact_adjoint, float>>());
static_assert(nn::check_model<ssm<adjoint::sharded_adjoint, float>>());

adjoint::ssm_config sized(std::int64_t layers, std::int64_t vocab = 11, std::int64_t P = 3, std::int64_t N = 4) {
  adjoint::ssm_config c = adjoint::presets::micro();
  c.layers = layers;
  c.vocab = vocab;
  c.d_model = P;
  c.state = N;
  return c;
}

/// The loss and every gradient of one forward/backward of `model` (initialised from `seed`) on `batch`.
template <class Model>
double gradients(Model& model, std::uint64_t seed, const testing::token_batch& batch, testing::named_tensors& out) {
  model.init(seed);
  model.zero_grad();
  const double loss = model.forward(batch.tok(), batch.tgt());
  model.backward();
  out.add(model.parameters());
  return loss;
}

template <class Engine>
testing::named_tensors gradients_of(const adjoint::ssm_config& cfg, Engine engine, std::uint64_t seed,
                                    const testing::token_batch& batch, double* loss = nullptr) {
  ssm<Engine> model(cfg, exec::host{1}, engine);
  testing::named_tensors out;
  const double l = gradients(model, seed, batch, out);
  if (loss) *loss = l;
  return out;
}

/// One step's gradients of every rank's stage, the model's layers sharded over `ranks` in-process ranks and
/// trained by pipeline::pipeline_trainer under `scheduler`.
template <class Engine, class Scheduler>
testing::named_tensors stage_gradients(const testing::genesis_data& text, const adjoint::ssm_config& cfg, Engine engine,
                                       int ranks, Scheduler scheduler, std::uint64_t seed, std::int64_t batch,
                                       std::int64_t seq) {
  testing::named_tensors grads;
  std::mutex mu;
  comm::local::run_ranks(ranks, [&](comm::local& world) {
    std::vector<ssm<Engine>> chunks;
    chunks.emplace_back(cfg, exec::host{1}, engine, adjoint::ssm_stage::shard(cfg, ranks)[std::size_t(world.rank())]);
    pipeline::pipeline_trainer t(std::move(chunks),
                                 subspace::stack{.communicator = world,
                                                 .compressor = compress::identity{},
                                                 .scheduler = scheduler,
                                                 .optimizer = optim::adamw{}},
                                 pipeline::trainer_options{});
    t.init(seed);
    auto data = text.train(batch, seq);
    t.compute_gradients(data);
    std::lock_guard lock(mu);
    grads.add(t.chunks()[0].parameters());
  });
  return grads;
}

std::string layer_prefix(std::int64_t k) { return "layers." + std::to_string(k) + "."; }

}  // namespace

TEST_CASE("ssm bptt: every gradient matches five-point finite differences (fp64, K 2, T 8, N 4, P 3, V 11)") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const adjoint::ssm_config cfg = sized(2);
  const testing::token_batch batch(2, 8, cfg.vocab, seed + 1);
  ssm<adjoint::bptt> model(cfg, exec::host{1});
  testing::named_tensors analytic;
  gradients(model, seed, batch, analytic);
  auto& store = model.parameters();
  const double h = 1e-4;  // five-point: truncation ~h⁴, rounding ~1e-16 / h
  for (std::size_t i = 0; i < store.size(); ++i) {
    CAPTURE(store.info(i).name);
    const auto v = store.value(i);
    std::vector<double> fd(static_cast<std::size_t>(v.numel()));
    for (std::int64_t e = 0; e < v.numel(); ++e) {
      const double x0 = v.data()[e];
      const auto at = [&](double dx) {
        v.data()[e] = x0 + dx;
        return model.evaluate(batch.tok(), batch.tgt());
      };
      fd[std::size_t(e)] = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h);
      v.data()[e] = x0;
    }
    CHECK(testing::rel_diff(analytic.grads.at(store.info(i).name), fd) <= 1e-7);
  }
}

TEST_CASE("ssm exact adjoint equals bptt: every gradient to 1e-12 (fp64, K in 1 2 4, T in 1 7 64 1024)") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const std::int64_t K : {1, 2, 4})
    for (const std::int64_t T : {1, 7, 64, 1024}) {
      CAPTURE(K);
      CAPTURE(T);
      const adjoint::ssm_config cfg = sized(K);
      const testing::token_batch batch(T < 64 ? 3 : 1, T, cfg.vocab, seed + std::uint64_t(K * T));
      double reference_loss = 0, loss = 0, recomputed_loss = 0;
      const auto reference = gradients_of(cfg, adjoint::bptt{}, seed, batch, &reference_loss);
      const auto exact = gradients_of(cfg, adjoint::exact_adjoint{}, seed, batch, &loss);
      const auto recomputed =
          gradients_of(cfg, adjoint::exact_adjoint{.recompute_c = true}, seed, batch, &recomputed_loss);
      CHECK(std::abs(loss - reference_loss) <= 1e-13 * reference_loss);
      CHECK(recomputed_loss == loss);
      for (const auto& [name, g] : reference.grads) {
        CAPTURE(name);
        CHECK(testing::rel_diff(exact.grads.at(name), g) <= 1e-12);
        CHECK(testing::rel_diff(recomputed.grads.at(name), exact.grads.at(name)) == 0.0);
      }
    }
}

TEST_CASE("ssm scans equal their explicit sums and products (fp64, windows 1, 5, S and none)") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t seqs = 2, S = 37, N = 3, n = seqs * S;
  host_tensor<double> a = testing::random_tensor<double>({n, N}, seed),
                      w = testing::random_tensor<double>({n, N}, seed + 1);
  for (std::int64_t i = 0; i < a.numel(); ++i) a.data()[i] = 1 / (1 + std::exp(-a.data()[i]));  // in (0, 1)
  host_tensor<double> h({n, N}), mu({n, N});
  adjoint::scan_forward(exec::host{}, a.v(), w.v(), h.v(), S);
  adjoint::scan_reverse(exec::host{}, a.v(), w.v(), mu.v(), S);
  const auto A = [&](std::int64_t s, std::int64_t t, std::int64_t c) { return a.data()[(s * S + t) * N + c]; };
  const auto W = [&](std::int64_t s, std::int64_t t, std::int64_t c) { return w.data()[(s * S + t) * N + c]; };
  const auto explicit_mu = [&](std::int64_t s, std::int64_t i, std::int64_t c, std::int64_t window) {
    double total = 0;
    for (std::int64_t t = i; t < S && (window == 0 || t - i < window); ++t) {
      double prod = 1;
      for (std::int64_t j = i + 1; j <= t; ++j) prod *= A(s, j, c);
      total += W(s, t, c) * prod;
    }
    return total;
  };
  host_tensor<double> h_ref({n, N}), mu_ref({n, N});
  for (std::int64_t s = 0; s < seqs; ++s)
    for (std::int64_t t = 0; t < S; ++t)
      for (std::int64_t c = 0; c < N; ++c) {
        double x = 0;  // h_t = Σ_{i ≤ t} x_i Π_{j=i+1}^{t} a_j
        for (std::int64_t i = 0; i <= t; ++i) {
          double prod = 1;
          for (std::int64_t j = i + 1; j <= t; ++j) prod *= A(s, j, c);
          x += W(s, i, c) * prod;
        }
        h_ref.data()[(s * S + t) * N + c] = x;
        mu_ref.data()[(s * S + t) * N + c] = explicit_mu(s, t, c, 0);
      }
  CHECK(testing::rel_error(h, h_ref) <= 1e-12);
  CHECK(testing::rel_error(mu, mu_ref) <= 1e-12);
  for (const std::int64_t window : {std::int64_t(1), std::int64_t(5), S, 4 * S}) {
    CAPTURE(window);
    host_tensor<double> got({n, N}), want({n, N});
    adjoint::scan_window(exec::host{}, a.v(), w.v(), got.v(), S, window);
    for (std::int64_t s = 0; s < seqs; ++s)
      for (std::int64_t t = 0; t < S; ++t)
        for (std::int64_t c = 0; c < N; ++c) want.data()[(s * S + t) * N + c] = explicit_mu(s, t, c, window);
    CHECK(testing::rel_error(got, want) <= 1e-12);
    if (window == 1) CHECK(testing::rel_error(got, w) == 0.0);  // only the i = t terms
    if (window >= S) CHECK(testing::rel_error(got, mu) <= 1e-12);
  }
}

TEST_CASE("ssm sharded adjoint equals the paper's literal double sums and counts their vjps (fp64, windows)") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const adjoint::ssm_config cfg = sized(3);
  const std::int64_t T = 24, P = cfg.d_model, N = cfg.state;
  const testing::token_batch batch(1, T, cfg.vocab, seed + 1);
  for (const std::int64_t window : {std::int64_t(0), std::int64_t(1), std::int64_t(5), T, 3 * T}) {
    CAPTURE(window);
    ssm<adjoint::sharded_adjoint> model(cfg, exec::host{1}, adjoint::sharded_adjoint{.window = window});
    testing::named_tensors engine;
    gradients(model, seed, batch, engine);
    const double* g = model.handed_down().data();  // g = dl/dy_K, [T, P]
    for (std::int64_t k = 0; k < cfg.layers; ++k) {
      CAPTURE(k);
      const auto kept = model.kept(0, k);
      std::vector<double> dWa(static_cast<std::size_t>(N * P)), dba(static_cast<std::size_t>(N)),
          dWb(static_cast<std::size_t>(N * P * P)), dbb(static_cast<std::size_t>(N * P)),
          dWc(static_cast<std::size_t>(P * N * P)), dbc(static_cast<std::size_t>(P * N));
      std::int64_t vjps_a = 0, vjps_b = 0, vjps_c = 0;
      const double *yh = kept.yhat.data(), *a = kept.a.data(), *h = kept.h.data(), *C = kept.c.data();
      for (std::int64_t t = 0; t < T; ++t) {
        std::vector<double> v(std::size_t(N), 0.0), prod(std::size_t(N), 1.0);  // v = g^t C^t
        for (std::int64_t p = 0; p < P; ++p)
          for (std::int64_t c = 0; c < N; ++c) v[std::size_t(c)] += g[t * P + p] * C[t * P * N + p * N + c];
        const std::int64_t lo = window > 0 ? std::max<std::int64_t>(0, t - window + 1) : 0;
        for (std::int64_t i = t; i >= lo; --i) {
          std::vector<double> lam(static_cast<std::size_t>(N));  // g^t λ^{t,i} = v ⊙ Π_{j=i+1}^{t} a^j
          for (std::int64_t c = 0; c < N; ++c) lam[std::size_t(c)] = v[std::size_t(c)] * prod[std::size_t(c)];
          ++vjps_a;  // the gate map at ŷ^i, cotangent λ ⊙ h^{i−1}
          for (std::int64_t c = 0; c < N; ++c) {
            const double ai = a[i * N + c], prev = i > 0 ? h[(i - 1) * N + c] : 0.0;
            const double du = lam[std::size_t(c)] * prev * ai * (1 - ai);
            dba[std::size_t(c)] += du;
            for (std::int64_t q = 0; q < P; ++q) dWa[std::size_t(c * P + q)] += du * yh[i * P + q];
          }
          ++vjps_b;  // the B map at ŷ^i, cotangent λᵀ ŷ^{iᵀ}
          for (std::int64_t c = 0; c < N; ++c)
            for (std::int64_t j = 0; j < P; ++j) {
              const double db = lam[std::size_t(c)] * yh[i * P + j];
              dbb[std::size_t(c * P + j)] += db;
              for (std::int64_t q = 0; q < P; ++q) dWb[std::size_t((c * P + j) * P + q)] += db * yh[i * P + q];
            }
          for (std::int64_t c = 0; c < N; ++c) prod[std::size_t(c)] *= a[i * N + c];
        }
        ++vjps_c;  // the C map at ŷ^t, cotangent g^{tᵀ} h^{tᵀ}
        for (std::int64_t p = 0; p < P; ++p)
          for (std::int64_t c = 0; c < N; ++c) {
            const double dc = g[t * P + p] * h[t * N + c];
            dbc[std::size_t(p * N + c)] += dc;
            for (std::int64_t q = 0; q < P; ++q) dWc[std::size_t((p * N + c) * P + q)] += dc * yh[t * P + q];
          }
      }
      const std::string pre = layer_prefix(k);
      CHECK(testing::rel_diff(engine.grads.at(pre + "a_proj.weight"), dWa) <= 1e-12);
      CHECK(testing::rel_diff(engine.grads.at(pre + "a_proj.bias"), dba) <= 1e-12);
      CHECK(testing::rel_diff(engine.grads.at(pre + "b_proj.weight"), dWb) <= 1e-12);
      CHECK(testing::rel_diff(engine.grads.at(pre + "b_proj.bias"), dbb) <= 1e-12);
      CHECK(testing::rel_diff(engine.grads.at(pre + "c_proj.weight"), dWc) <= 1e-12);
      CHECK(testing::rel_diff(engine.grads.at(pre + "c_proj.bias"), dbc) <= 1e-12);
      CHECK(vjps_a == adjoint::literal_vjps(T, window));
      CHECK(vjps_b == adjoint::literal_vjps(T, window));
      CHECK(vjps_c == T);
    }
  }
  // The paper's example: T̄ = 2000 at T = 10K removes 64% of the vjps.
  CHECK(std::abs(1.0 - double(adjoint::literal_vjps(10000, 2000)) / double(adjoint::literal_vjps(10000, 0)) - 0.64) <
        0.005);
}

TEST_CASE("ssm sharded adjoint is exact for K = 1 (all but the embedding) and for the top layer of any K") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const std::int64_t K : {1, 3}) {
    CAPTURE(K);
    const adjoint::ssm_config cfg = sized(K);
    const testing::token_batch batch(2, 16, cfg.vocab, seed + std::uint64_t(K));
    const auto reference = gradients_of(cfg, adjoint::bptt{}, seed, batch);
    const auto sharded = gradients_of(cfg, adjoint::sharded_adjoint{}, seed, batch);
    for (const auto& [name, g] : reference.grads) {
      CAPTURE(name);
      const bool top = name.rfind(layer_prefix(K - 1), 0) == 0 || name == "norm.weight" || name == "head.weight";
      if (top) CHECK(testing::rel_diff(sharded.grads.at(name), g) <= 1e-12);
      else if (K > 1) CHECK(testing::rel_diff(sharded.grads.at(name), g) > 1e-6);  // cross-layer paths dropped
    }
  }
}

TEST_CASE("ssm stages: exact and sharded engines over 1, 2 and 4 in-process ranks give bitwise-equal gradients") {
  const testing::genesis_data text;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const adjoint::ssm_config cfg = sized(8, 256, 4, 3);
  const std::int64_t batch = 2, seq = 16;
  const auto check = [&](auto engine) {
    using model = ssm<decltype(engine)>;
    testing::named_tensors whole;
    {
      std::vector<model> stages = train::as_stages(model(cfg, exec::host{1}, engine));
      compress::identity none;
      train::plan_engine<model, compress::identity> run(stages, none, {});
      stages[0].init(seed);
      auto data = text.train(batch, seq);
      run.run(
          schedule::gradient_accumulation{1}.plan(0, 0), train::loader_source{data}, [](std::size_t, std::size_t) {},
          [] {});
      whole.add(stages[0].parameters());
    }
    for (const int ranks : {2, 4}) {
      CAPTURE(ranks);
      const testing::named_tensors sharded =
          stage_gradients(text, cfg, engine, ranks, pipeline::gpipe{1, ranks}, seed, batch, seq);
      REQUIRE(sharded.grads.size() == whole.grads.size());
      for (const auto& [name, g] : whole.grads) {
        CAPTURE(name);
        CHECK(testing::rel_diff(sharded.grads.at(name), g) == 0.0);
      }
    }
  };
  check(adjoint::exact_adjoint{});
  check(adjoint::sharded_adjoint{});
  check(adjoint::sharded_adjoint{.window = 5});
}

TEST_CASE("ssm stages: the sharded engine's split backward (zero-bubble schedule) equals GPipe's bit for bit") {
  const testing::genesis_data text;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const adjoint::ssm_config cfg = sized(8, 256, 4, 3);
  const std::int64_t batch = 4, seq = 16;
  const auto gradients = [&](auto engine, int ranks, auto scheduler) {
    return stage_gradients(text, cfg, engine, ranks, scheduler, seed, batch, seq);
  };
  static_assert(ssm<adjoint::sharded_adjoint>::splits_backward && !ssm<adjoint::exact_adjoint>::splits_backward);
  for (const adjoint::sharded_adjoint engine : {adjoint::sharded_adjoint{}, adjoint::sharded_adjoint{.window = 5}})
    for (const int ranks : {2, 4}) {
      CAPTURE(ranks);
      CAPTURE(engine.window);
      // Four micro-batches: on rank r the schedule runs r + 1 backward_input halves before the first backward_weight.
      const testing::named_tensors plain = gradients(engine, ranks, pipeline::gpipe{4, ranks});
      const testing::named_tensors split = gradients(engine, ranks, pipeline::zero_bubble_h1{4, ranks});
      REQUIRE(split.grads.size() == plain.grads.size());
      for (const auto& [name, g] : plain.grads) {
        CAPTURE(name);
        CHECK(std::any_of(g.begin(), g.end(), [](double v) { return v != 0.0; }));  // nothing vacuous
        CHECK(testing::rel_diff(split.grads.at(name), g) == 0.0);
      }
    }
  // The exact engine's layers need the δ of the layers above: it cannot split, and says so.
  CHECK_THROWS_WITH_AS(gradients(adjoint::exact_adjoint{}, 2, pipeline::zero_bubble_h1{2, 2}),
                       doctest::Contains("splits the backward, which this model cannot"), subspace::error);
}

TEST_CASE("ssm stages: the wire carries y forward and δ or g backward, P values per token and boundary") {
  const testing::genesis_data text;
  const adjoint::ssm_config cfg = sized(8, 256, 4, 3);
  const std::int64_t batch = 2, seq = 16;
  const int ranks = 4;
  const auto check = [&](auto engine) {
    using model = ssm<decltype(engine), float>;
    comm::local_options lo;
    lo.timeout = std::chrono::seconds(60);
    std::vector<comm::local> world = comm::local::world(ranks, lo);
    std::vector<comm::throttled<comm::local>> links;
    for (comm::local& c : world) links.emplace_back(std::move(c), comm::network{});
    std::vector<std::uint64_t> sent(ranks);
    comm::local::run_ranks(links, [&](comm::throttled<comm::local>& c) {
      std::vector<model> chunks;
      chunks.emplace_back(cfg, exec::host{1}, engine, adjoint::ssm_stage::shard(cfg, ranks)[std::size_t(c.rank())]);
      pipeline::pipeline_trainer t(std::move(chunks),
                                   subspace::stack{.communicator = c,
                                                   .compressor = compress::identity{},
                                                   .scheduler = pipeline::gpipe{1, ranks},
                                                   .optimizer = optim::adamw{}},
                                   pipeline::trainer_options{});
      t.init(1);
      const std::uint64_t before = c.metrics()[comm::op_kind::send].bytes_sent;
      auto d = text.train(batch, seq);
      CHECK(std::isfinite(t.compute_gradients(d)));
      sent[std::size_t(c.rank())] = c.metrics()[comm::op_kind::send].bytes_sent - before;
    });
    // fp32 on the host: y_k forward at each boundary, δ (exact) or g (sharded) backward, 4P bytes per token each.
    const std::uint64_t boundary = std::uint64_t(batch * seq * cfg.d_model) * sizeof(float);
    CHECK(sent[0] == boundary);  // y up; nothing comes back from the embedding
    for (int r = 1; r + 1 < ranks; ++r) CHECK(sent[std::size_t(r)] == 2 * boundary);
    CHECK(sent[ranks - 1] == boundary);  // the cotangent down
  };
  check(adjoint::exact_adjoint{});
  check(adjoint::sharded_adjoint{});
}

TEST_CASE("ssm: no engine produces NaN or Inf at T = 100000 (fp32, random tokens)") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const adjoint::ssm_config cfg = sized(2, 64, 8, 4);
  const testing::token_batch batch(1, 100000, cfg.vocab, seed + 1);
  const auto finite = [&](auto engine) {
    ssm<decltype(engine), float> model(cfg, exec::host{}, engine);
    model.init(seed);
    model.zero_grad();
    const double loss = model.forward(batch.tok(), batch.tgt());
    model.backward();
    CHECK(std::isfinite(loss));
    const auto g = model.parameters().flat_grads();
    bool ok = true;
    for (std::int64_t i = 0; i < g.numel(); ++i) ok = ok && std::isfinite(g.data()[i]);
    CHECK(ok);
  };
  finite(adjoint::bptt{});
  finite(adjoint::exact_adjoint{});
  finite(adjoint::sharded_adjoint{});
  finite(adjoint::sharded_adjoint{.window = 64});
}

TEST_CASE("ssm: each engine's activation bytes are within 5% of its formula (K 8, P 32, N 8, T 16384)") {
  const adjoint::ssm_config cfg = sized(8, 64, 32, 8);
  const std::int64_t T = 16384;
  const testing::token_batch batch(1, T, cfg.vocab, testing::fresh_seed());
  const auto check = [&](auto engine) {
    ssm<decltype(engine), float> model(cfg, exec::host{}, engine);
    model.init(1);
    model.forward(batch.tok(), batch.tgt());
    model.backward();
    const double formula = adjoint::activation_values(engine, T, cfg.layers, cfg.d_model, cfg.state) * sizeof(float);
    const double measured = double(model.activation_bytes());
    const std::string engine_name = decltype(engine)::name;
    CAPTURE(engine_name);
    CAPTURE(measured / formula);
    CHECK(std::abs(measured / formula - 1.0) <= 0.05);
  };
  check(adjoint::bptt{});
  check(adjoint::exact_adjoint{});
  check(adjoint::sharded_adjoint{});
}

// nn::llama as pipeline stages: a configuration cut into 2, 3 and 4 stages and chained by hand reproduces the
// whole model's loss and every gradient in fp64 (relative 1e-12), with two micro-batches in flight in different
// activation slots; stages share one parameter store or keep their own; a stage initialises exactly the whole
// model's tensors; bad stage layouts and boundary shapes fail clearly.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <subspace/kernels/elementwise.hpp>
#include <subspace/kernels/random.hpp>
#include <subspace/nn/llama.hpp>

#include "support/numeric.hpp"
#include "support/token_batch.hpp"

using namespace subspace;

namespace {

using model_t = nn::llama<exec::host, double>;

using batch = testing::token_batch;

/// Weights far from the initialisation (every path matters), the same for every tensor name.
void randomize(nn::parameter_store<double, double, host_space>& store, std::uint64_t seed) {
  store.for_each([&](const std::string& name, auto value, auto, const parameter_info& info) {
    std::uint64_t stream = 0;
    for (const char c : name) stream = stream * 131 + std::uint64_t(c);
    const double std = info.shape.rank == 1                  ? 0.2
                       : name == "model.embed_tokens.weight" ? 1.0
                                                             : 1.0 / std::sqrt(double(info.shape[1]));
    fill_normal(exec::host{}, value, seed, stream, info.shape.rank == 1 ? 1.0f : 0.0f, float(std));
  });
}

std::map<std::string, std::vector<double>> gradients(nn::parameter_store<double, double, host_space>& store) {
  std::map<std::string, std::vector<double>> out;
  store.for_each([&](const std::string& name, auto, auto grad, const parameter_info&) {
    out[name].assign(grad.data(), grad.data() + grad.numel());
  });
  return out;
}

double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
  return std::sqrt(num / den);
}

}  // namespace

TEST_CASE("llama stages: 2, 3 and 4 chained stages equal the whole model (loss and every gradient, fp64)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  auto cfg = nn::presets::micro();
  cfg.n_layers = 4;
  const std::int64_t B = 2, S = 7;
  const batch first(B, S, cfg.vocab, seed + 1), second(B, S, cfg.vocab, seed + 2);

  model_t whole(cfg);
  randomize(whole.parameters(), seed);
  whole.zero_grad();
  const double loss_a = whole.forward(first.tokens.v(), first.targets.v(), 1.0f);
  whole.backward();
  const double loss_b = whole.forward(second.tokens.v(), second.targets.v(), 0.5f);
  whole.backward();
  const auto want = gradients(whole.parameters());

  for (const auto& cuts : std::vector<std::vector<std::int64_t>>{{2}, {1, 3}, {1, 2, 3}}) {
    for (const bool shared : {false, true}) {
      CAPTURE(cuts.size() + 1);
      CAPTURE(shared);
      const auto layout = nn::llama_stage::split(cfg, cuts);
      auto store = shared ? std::make_shared<model_t::store_type>() : nullptr;
      std::vector<model_t> stages;
      for (const auto& st : layout) stages.emplace_back(cfg, exec::host{}, st, store);
      for (auto& m : stages) randomize(m.parameters(), seed);  // by name: the whole model's values
      if (shared) CHECK(stages[0].parameters().size() == whole.parameters().size());

      // Boundaries: out of stage k is in of stage k + 1; one buffer pair per micro-batch in flight.
      const std::size_t P = stages.size();
      std::vector<host_tensor<double>> acts, grads;
      for (std::size_t k = 0; k + 1 < P; ++k) {
        for (int mb = 0; mb < 2; ++mb) {
          acts.emplace_back(shape{B * S, cfg.d_model});
          grads.emplace_back(shape{B * S, cfg.d_model});
        }
      }
      const auto act = [&](std::size_t k, int mb) { return acts[2 * k + std::size_t(mb)].v(); };
      const auto grad = [&](std::size_t k, int mb) { return grads[2 * k + std::size_t(mb)].v(); };
      for (auto& m : stages) m.zero_grad();

      // Both micro-batches forward (slots 0 and 1), then backward in reverse order (1F1B's steady state).
      double losses[2] = {0, 0};
      const batch* data[2] = {&first, &second};
      const float scales[2] = {1.0f, 0.5f};
      for (int mb = 0; mb < 2; ++mb)
        for (std::size_t k = 0; k < P; ++k) {
          const model_t::stage_io io{
              data[mb]->tokens.v(), data[mb]->targets.v(),
              k > 0 ? view<const double, host_space>(act(k - 1, mb)) : view<const double, host_space>{},
              k + 1 < P ? act(k, mb) : view<double, host_space>{}};
          losses[mb] += stages[k].forward(std::size_t(mb), io, scales[mb]);
        }
      for (int mb = 1; mb >= 0; --mb)
        for (std::size_t k = P; k-- > 0;) {
          stages[k].backward(std::size_t(mb),
                             k + 1 < P ? view<const double, host_space>(grad(k, mb)) : view<const double, host_space>{},
                             k > 0 ? grad(k - 1, mb) : view<double, host_space>{}, [](std::size_t, std::size_t) {});
        }
      CHECK(std::abs(losses[0] - loss_a) <= 1e-12 * std::abs(loss_a));
      CHECK(std::abs(losses[1] - loss_b) <= 1e-12 * std::abs(loss_b));

      std::map<std::string, std::vector<double>> got;
      if (shared) {
        got = gradients(stages[0].parameters());
      } else {
        for (auto& m : stages) got.merge(gradients(m.parameters()));
      }
      REQUIRE(got.size() == want.size());
      for (const auto& [name, g] : want) {
        CAPTURE(name);
        REQUIRE(got.count(name) == 1);
        CHECK(rel(got[name], g) < 1e-12);
      }
    }
  }
}

TEST_CASE("llama stages: a stage initialises exactly the whole model's tensors, its ready ranges cover its own") {
  auto cfg = nn::presets::micro();
  cfg.n_layers = 3;
  nn::llama<exec::host, float> whole(cfg);
  whole.init(11);
  nn::llama<exec::host, float> middle(cfg, exec::host{}, nn::llama_stage{1, 2});
  middle.init(11);
  CHECK(!middle.has_embedding());
  CHECK(!middle.has_head());
  REQUIRE(middle.parameters().size() == 9);
  for (std::size_t i = 0; i < middle.parameters().size(); ++i) {
    const auto& name = middle.parameters().info(i).name;
    CAPTURE(name);
    CHECK(name.rfind("model.layers.1.", 0) == 0);
    const auto j = whole.parameters().find(name);
    REQUIRE(j);
    const auto a = middle.parameters().value(i), b = whole.parameters().value(*j);
    CHECK(std::vector<float>(a.data(), a.data() + a.numel()) == std::vector<float>(b.data(), b.data() + b.numel()));
  }
}

TEST_CASE("llama stages: bad layouts and boundaries fail clearly") {
  auto cfg = nn::presets::micro();
  const auto message = [](auto&& f) {
    try {
      f();
    } catch (const invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("(no exception)");
  };
  CHECK(message([&] {
          nn::llama<exec::host, float>(cfg, exec::host{}, nn::llama_stage{1, 1});
        }).find("must be a non-empty range") != std::string::npos);
  CHECK(message([&] { nn::llama_stage::split(cfg, {0}); }).find("cut 0 must lie in") != std::string::npos);
  auto tied = cfg;
  tied.tied_embeddings = true;
  CHECK(message([&] {
          nn::llama<exec::host, float>(tied, exec::host{}, nn::llama_stage{0, 1});
        }).find("both must be on one stage") != std::string::npos);

  nn::llama<exec::host, float> last(cfg, exec::host{}, nn::llama_stage{1, 2});
  last.init(1);
  const batch data(2, 4, cfg.vocab, 3);
  host_tensor<float> wrong({2 * 4, cfg.d_model + 1});
  CHECK(message([&] {
          last.forward(0, {data.tokens.v(), data.targets.v(), view<const float, host_space>(wrong.v()), {}}, 1.0f);
        }).find("in has shape [8, 17], expected [8, 16]") != std::string::npos);
  CHECK(message([&] { last.forward(data.tokens.v(), data.targets.v()); }).find("this model is a stage") !=
        std::string::npos);
  CHECK(message([&] {
          last.backward(3, {}, {}, [](std::size_t, std::size_t) {});
        }).find("call forward() on this slot") != std::string::npos);
}

TEST_CASE("llama stages: backward_input then backward_weight accumulate exactly what backward does") {
  const auto check = [&](auto tag) {
    using T = typename decltype(tag)::type;
    using model = nn::llama<exec::host, T>;
    nn::llama_config cfg = nn::presets::micro();
    cfg.vocab = 256;
    cfg.n_layers = 4;
    const std::uint64_t seed = testing::fresh_seed();
    CAPTURE(seed);
    const testing::token_batch b(2, 8, cfg.vocab, seed + 1);
    const auto stages_of = [&] {
      auto store = std::make_shared<typename model::store_type>();
      std::vector<model> st;
      for (const auto& s : nn::llama_stage::split(cfg, {2})) st.emplace_back(cfg, exec::host{1}, s, store);
      for (auto& s : st) s.init(seed);
      st[0].zero_grad();
      return st;
    };
    std::vector<model> fused = stages_of(), split = stages_of();
    static_assert(model::splits_backward);
    const auto none = [](std::size_t, std::size_t) {};
    host_tensor<T> x({16, cfg.d_model}), g({16, cfg.d_model}), xs({16, cfg.d_model}), gs({16, cfg.d_model});
    // Two micro-batches in flight on the split stages: the weight halves run after both input halves.
    fused[0].forward(0, {b.tok(), b.tgt(), {}, x.v()}, 1.0f);
    fused[1].forward(0, {b.tok(), b.tgt(), x.v(), {}}, 1.0f);
    fused[1].backward(0, {}, g.v(), none);
    fused[0].backward(0, g.v(), {}, none);
    split[0].forward(0, {b.tok(), b.tgt(), {}, xs.v()}, 1.0f);
    split[1].forward(0, {b.tok(), b.tgt(), xs.v(), {}}, 1.0f);
    std::vector<std::pair<std::size_t, std::size_t>> reported;
    const auto note = [&](std::size_t first, std::size_t last) { reported.emplace_back(first, last); };
    split[1].backward_input(0, {}, gs.v(), note);
    split[0].backward_input(0, gs.v(), {}, note);
    CHECK_THROWS_WITH_AS(split[1].backward_input(0, {}, gs.v(), note), doctest::Contains("call forward()"),
                         invalid_argument);
    split[1].backward_weight(0, note);
    split[0].backward_weight(0, note);
    CHECK_THROWS_WITH_AS(split[0].backward_weight(0, note),
                         doctest::Contains("call backward_input() on this slot first"), invalid_argument);
    std::vector<bool> seen(split[0].parameters().size(), false);
    for (const auto& [first, last] : reported)
      for (std::size_t i = first; i < last; ++i) seen[i] = true;
    CHECK(std::all_of(seen.begin(), seen.end(), [](bool v) { return v; }));
    const auto a = fused[0].parameters().flat_grads(), c = split[0].parameters().flat_grads();
    CHECK(std::equal(a.data(), a.data() + a.numel(), c.data()));
    CHECK(std::equal(g.data(), g.data() + g.numel(), gs.data()));
  };
  check(std::type_identity<float>{});
  check(std::type_identity<double>{});
}

// Text generation (nn/generate.hpp) on the host model: greedy decoding equals the argmax of logits recomputed
// step by step over the same window; the sliding max_seq window; seeds reproduce and differ; top_k = 1 is greedy;
// the sampled frequencies follow softmax(logits / temperature) restricted to the top k; the errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <subspace/kernels/elementwise.hpp>
#include <subspace/kernels/random.hpp>
#include <subspace/nn/generate.hpp>
#include <subspace/nn/llama.hpp>

#include "support/numeric.hpp"

using namespace subspace;

namespace {

using host_model = nn::llama<exec::host, float>;

/// Weights that give logits of order one and attention far from uniform, so every token of the window matters:
/// matrices N(0, 1/in), the embedding N(0, 1), norm gains N(1, 0.2^2).
void randomize(host_model& m, std::uint64_t seed) {
  std::uint64_t offset = 0;
  m.parameters().for_each([&](const std::string&, auto value, auto, const parameter_info& info) {
    float mean = 0.0f, std = 1.0f;
    if (info.shape.rank == 1) mean = 1.0f, std = 0.2f;
    else if (info.name != "model.embed_tokens.weight") std = float(1.0 / std::sqrt(double(info.shape[1])));
    fill_normal(exec::host{}, value, seed, offset++, mean, std);
  });
}

std::vector<std::int32_t> random_tokens(std::int64_t n, std::int64_t vocab, std::uint64_t seed) {
  std::vector<std::int32_t> out(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    out[std::size_t(i)] = std::int32_t(rng::bits4(seed, 7, std::uint64_t(i)).v[0] % std::uint32_t(vocab));
  return out;
}

/// Greedy decoding written out: logits of the last max_seq tokens, first index of the largest value.
std::vector<std::int32_t> greedy_by_hand(host_model& m, std::vector<std::int32_t> context, std::int64_t n) {
  const auto& cfg = m.config();
  host_tensor<float> logits({1, cfg.vocab});
  std::vector<std::int32_t> out;
  for (std::int64_t step = 0; step < n; ++step) {
    const auto window = std::min<std::int64_t>(std::int64_t(context.size()), cfg.max_seq);
    m.logits(
        view<const std::int32_t, host_space>(context.data() + context.size() - std::size_t(window), shape{1, window}),
        logits.v());
    std::int32_t best = 0;
    for (std::int32_t v = 1; v < cfg.vocab; ++v)
      if (logits.data()[v] > logits.data()[best]) best = v;
    out.push_back(best);
    context.push_back(best);
  }
  return out;
}

}  // namespace

TEST_CASE("generate: greedy decoding is the argmax of the logits, recomputed over the sliding window") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto cfg = nn::presets::micro();  // vocab 32, max_seq 16
  host_model m(cfg);
  randomize(m, seed);
  const auto prompt = random_tokens(5, cfg.vocab, seed + 1);
  const std::int64_t n = 20;  // 5 + 20 > max_seq: the window slides for the last tokens
  const auto expected = greedy_by_hand(m, prompt, n);

  const auto got = nn::generate(m, prompt, n, nn::sampling{0.0f, 0, 0});
  REQUIRE(got.size() == std::size_t(n));
  CHECK(got == expected);
  for (const auto t : got) CHECK((t >= 0 && t < cfg.vocab));
  // Greedy ignores the seed.
  CHECK(nn::generate(m, prompt, n, nn::sampling{0.0f, 0, seed}) == expected);
}

TEST_CASE("generate: a prompt longer than max_seq conditions on its last max_seq tokens only") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto cfg = nn::presets::micro();
  host_model m(cfg);
  randomize(m, seed);
  const auto long_prompt = random_tokens(cfg.max_seq + 7, cfg.vocab, seed + 1);
  const std::vector<std::int32_t> tail(long_prompt.end() - cfg.max_seq, long_prompt.end());
  const nn::sampling s{1.0f, 0, seed + 2};
  CHECK(nn::generate(m, long_prompt, 12, s) == nn::generate(m, tail, 12, s));
  CHECK(nn::generate(m, long_prompt, 12, nn::sampling{0.0f, 0, 0}) == greedy_by_hand(m, long_prompt, 12));
}

TEST_CASE("generate: the same seed gives the same tokens, different seeds different ones") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto cfg = nn::presets::micro();
  host_model m(cfg);
  randomize(m, seed);
  const auto prompt = random_tokens(4, cfg.vocab, seed + 1);
  const std::int64_t n = 40;
  const nn::sampling a{1.0f, 0, 11}, b{1.0f, 0, 12};
  const auto first = nn::generate(m, prompt, n, a);
  CHECK(first.size() == std::size_t(n));
  CHECK(nn::generate(m, prompt, n, a) == first);
  // Forty draws from distributions over 32 tokens with logits of order one: equal samples would mean the seed
  // is ignored.
  CHECK(nn::generate(m, prompt, n, b) != first);
  // So does the top-k path.
  const nn::sampling ka{1.0f, 5, 11}, kb{1.0f, 5, 12};
  CHECK(nn::generate(m, prompt, n, ka) == nn::generate(m, prompt, n, ka));
  CHECK(nn::generate(m, prompt, n, ka) != nn::generate(m, prompt, n, kb));
}

TEST_CASE("generate: top_k = 1 is greedy at any temperature") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto cfg = nn::presets::micro();
  host_model m(cfg);
  randomize(m, seed);
  const auto prompt = random_tokens(6, cfg.vocab, seed + 1);
  const auto greedy = nn::generate(m, prompt, 15, nn::sampling{0.0f, 0, 0});
  for (const float t : {0.5f, 1.0f, 5.0f}) {
    CAPTURE(t);
    CHECK(nn::generate(m, prompt, 15, nn::sampling{t, 1, seed}) == greedy);
  }
  CHECK(nn::generate(m, prompt, 0, nn::sampling{}).empty());
}

TEST_CASE("sample_token: frequencies follow softmax(logits / temperature) over the top k") {
  // Token i has weight i + 1 at temperature 1: probabilities 0.1, 0.2, 0.3, 0.4.
  const std::vector<double> logits{std::log(1.0), std::log(2.0), std::log(3.0), std::log(4.0)};
  const auto frequencies = [&](const nn::sampling& s) {
    constexpr int draws = 40000;
    std::vector<double> f(logits.size(), 0.0);
    for (int i = 0; i < draws; ++i) f[std::size_t(nn::sample_token(logits, s, std::uint64_t(i)))] += 1.0 / draws;
    return f;
  };
  // One frequency of 40000 draws has a standard deviation below 0.0025: 0.012 is about five of them.
  const double tol = 0.012;
  {
    const auto f = frequencies({1.0f, 0, 3});
    for (std::size_t i = 0; i < 4; ++i) CHECK(std::abs(f[i] - double(i + 1) / 10.0) < tol);
  }
  {
    const auto f = frequencies({1.0f, 2, 3});  // tokens 2 and 3 only: 3/7 and 4/7
    CHECK(f[0] == 0.0);
    CHECK(f[1] == 0.0);
    CHECK(std::abs(f[2] - 3.0 / 7.0) < tol);
    CHECK(std::abs(f[3] - 4.0 / 7.0) < tol);
  }
  {
    const auto f = frequencies({2.0f, 0, 3});  // weights sqrt(i + 1)
    double z = 0.0;
    for (int i = 1; i <= 4; ++i) z += std::sqrt(double(i));
    for (std::size_t i = 0; i < 4; ++i) CHECK(std::abs(f[i] - std::sqrt(double(i + 1)) / z) < tol);
  }
  {
    const auto f = frequencies({1.0f, 100, 3});  // top_k beyond the vocabulary: all of it
    for (std::size_t i = 0; i < 4; ++i) CHECK(std::abs(f[i] - double(i + 1) / 10.0) < tol);
  }
}

TEST_CASE("sample_token: ties go to the lower token id, for greedy and for the top-k set") {
  const std::vector<double> tied{1.0, 2.0, 2.0, 2.0, 0.5};
  CHECK(nn::sample_token(tied, {0.0f, 0, 0}, 0) == 1);
  for (std::uint64_t i = 0; i < 200; ++i) {
    const std::int32_t t = nn::sample_token(tied, {1.0f, 2, 9}, i);
    CHECK((t == 1 || t == 2));
    CHECK(nn::sample_token(tied, {3.0f, 1, 9}, i) == 1);
  }
  // The draw depends on (logits, sampling, index) only.
  CHECK(nn::sample_token(tied, {1.0f, 0, 5}, 17) == nn::sample_token(tied, {1.0f, 0, 5}, 17));
}

TEST_CASE("generate: errors name the problem") {
  const auto cfg = nn::presets::micro();
  host_model m(cfg);
  m.init(1);
  const std::vector<std::int32_t> prompt{1, 2, 3};
  const std::vector<std::int32_t> empty;
  CHECK_THROWS_WITH_AS(nn::generate(m, empty, 3), doctest::Contains("prompt is empty"), invalid_argument);
  const std::vector<std::int32_t> too_big{1, 32, 2}, negative{-1};
  CHECK_THROWS_WITH_AS(nn::generate(m, too_big, 3), doctest::Contains("token 32 at position 1 is outside"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(nn::generate(m, negative, 3), doctest::Contains("token -1 at position 0"), invalid_argument);
  CHECK_THROWS_WITH_AS(nn::generate(m, prompt, -1), doctest::Contains("new_tokens must be >= 0"), invalid_argument);
  CHECK_THROWS_WITH_AS(nn::generate(m, prompt, 3, nn::sampling{-0.5f, 0, 0}),
                       doctest::Contains("temperature must be a finite number >= 0"), invalid_argument);
  CHECK_THROWS_WITH_AS(nn::generate(m, prompt, 3, nn::sampling{std::numeric_limits<float>::quiet_NaN(), 0, 0}),
                       doctest::Contains("temperature"), invalid_argument);
  CHECK_THROWS_WITH_AS(nn::generate(m, prompt, 3, nn::sampling{1.0f, -2, 0}), doctest::Contains("top_k must be >= 0"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(nn::sample_token(std::span<const double>{}, {}, 0), doctest::Contains("no logits"),
                       invalid_argument);
  const std::vector<double> nan_logit{0.0, std::numeric_limits<double>::quiet_NaN()};
  CHECK_THROWS_WITH_AS(nn::sample_token(nan_logit, {}, 0), doctest::Contains("logit of token 1"), invalid_argument);

  // A diverged model (NaN weights) is reported, not sampled from.
  m.parameters().for_each([](const std::string& name, auto value, auto, const parameter_info&) {
    if (name == "lm_head.weight") fill(exec::host{}, value, std::numeric_limits<float>::quiet_NaN());
  });
  CHECK_THROWS_WITH_AS(nn::generate(m, prompt, 2), doctest::Contains("has the model diverged"), invalid_argument);
}

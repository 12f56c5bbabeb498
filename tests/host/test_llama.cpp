// The Llama model on the host: Hugging Face names, shapes and decay flags; initialisation; the loss at init; a
// whole-model gradient check in double (every parameter tensor, sampled elements, against central finite
// differences of evaluate()); accumulation and loss_scale; tied embeddings; last-position logits; the policy
// seams; the errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <subspace/kernels/elementwise.hpp>
#include <subspace/kernels/random.hpp>
#include <subspace/nn/llama.hpp>

#include "support/numeric.hpp"
#include "support/token_batch.hpp"

using namespace subspace;

namespace {

template <class T>
using host_model = nn::llama<exec::host, T>;

using batch = testing::token_batch;

/// Weights that make every path of the model matter (attention far from uniform, logits of order one): matrices
/// N(0, 1/in), the embedding N(0, 1), norm gains N(1, 0.2^2).
template <class Model>
void randomize(Model& m, std::uint64_t seed) {
  std::uint64_t offset = 100;
  m.parameters().for_each([&](const std::string&, auto value, auto, const parameter_info& info) {
    float mean = 0.0f, std = 1.0f;
    if (info.shape.rank == 1) mean = 1.0f, std = 0.2f;
    else if (info.name != "model.embed_tokens.weight") std = float(1.0 / std::sqrt(double(info.shape[1])));
    fill_normal(exec::host{}, value, seed, offset++, mean, std);
  });
}

/// Copies of every gradient, by name, in double.
template <class Model>
std::map<std::string, host_tensor<double>> gradients(Model& m) {
  std::map<std::string, host_tensor<double>> out;
  m.parameters().for_each([&](const std::string& name, auto, auto grad, const parameter_info&) {
    host_tensor<double> g(grad.shape());
    cast(exec::host{}, view<const typename decltype(grad)::value_type, host_space>(grad), g.v());
    out.emplace(name, std::move(g));
  });
  return out;
}

}  // namespace

TEST_CASE("llama: parameters carry Hugging Face names, shapes and decay flags, in HF order") {
  const auto cfg = nn::presets::micro();  // vocab 32, d 16, 2 layers, 4 heads / 2 KV heads, ffn 24
  host_model<float> m(cfg);
  std::vector<std::string> names;
  std::map<std::string, std::pair<shape, bool>> seen;
  m.parameters().for_each([&](const std::string& name, auto value, auto grad, const parameter_info& info) {
    names.push_back(name);
    CHECK(info.name == name);
    CHECK(value.shape() == info.shape);
    CHECK(grad.shape() == info.shape);
    seen[name] = {info.shape, info.decay};
  });
  const std::vector<std::string> layer = {
      "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
      "self_attn.o_proj.weight", "mlp.gate_proj.weight",    "mlp.up_proj.weight",
      "mlp.down_proj.weight",    "input_layernorm.weight",  "post_attention_layernorm.weight"};
  std::vector<std::string> want = {"model.embed_tokens.weight"};
  for (int l = 0; l < 2; ++l)
    for (const auto& n : layer) want.push_back("model.layers." + std::to_string(l) + "." + n);
  want.push_back("model.norm.weight");
  want.push_back("lm_head.weight");
  CHECK(names == want);

  const auto expect = [&](const std::string& name, shape s, bool decay) {
    CAPTURE(name);
    REQUIRE(seen.count(name) == 1);
    CHECK(seen[name].first == s);
    CHECK(seen[name].second == decay);
  };
  expect("model.embed_tokens.weight", {32, 16}, false);
  expect("model.layers.1.self_attn.q_proj.weight", {16, 16}, true);
  expect("model.layers.1.self_attn.k_proj.weight", {8, 16}, true);  // 2 KV heads x head dim 4
  expect("model.layers.1.self_attn.v_proj.weight", {8, 16}, true);
  expect("model.layers.1.self_attn.o_proj.weight", {16, 16}, true);
  expect("model.layers.0.mlp.gate_proj.weight", {24, 16}, true);
  expect("model.layers.0.mlp.up_proj.weight", {24, 16}, true);
  expect("model.layers.0.mlp.down_proj.weight", {16, 24}, true);
  expect("model.layers.0.input_layernorm.weight", {16}, false);
  expect("model.layers.0.post_attention_layernorm.weight", {16}, false);
  expect("model.norm.weight", {16}, false);
  expect("lm_head.weight", {32, 16}, true);

  std::int64_t total = 0;
  m.parameters().for_each([&](const std::string&, auto v, auto, const parameter_info&) { total += v.numel(); });
  CHECK(total == cfg.parameters());
  CHECK(m.parameter_count() == cfg.parameters());

  auto tied_cfg = cfg;
  tied_cfg.tied_embeddings = true;
  host_model<float> tied(tied_cfg);
  std::vector<std::string> tied_names;
  tied.parameters().for_each([&](const std::string& n, auto, auto, const parameter_info&) { tied_names.push_back(n); });
  want.pop_back();
  CHECK(tied_names == want);
  CHECK(tied.parameter_count() == tied_cfg.parameters());
}

TEST_CASE("llama: init draws N(0, 0.02^2) (output projections / sqrt(2L)), norms 1, the same for every T") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  auto cfg = nn::presets::micro();
  cfg.n_layers = 3;
  host_model<float> mf(cfg);
  host_model<double> md(cfg);
  mf.init(seed);
  md.init(seed);
  std::map<std::string, host_tensor<double>> from_float;
  mf.parameters().for_each([&](const std::string& name, auto value, auto, const parameter_info&) {
    host_tensor<double> t(value.shape());
    cast(exec::host{}, view<const float, host_space>(value), t.v());
    from_float.emplace(name, std::move(t));
  });
  const auto& specs = md.parameters().infos();
  std::size_t i = 0;
  md.parameters().for_each([&](const std::string& name, auto value, auto, const parameter_info& info) {
    CAPTURE(name);
    const auto& spec = specs[i++];
    CHECK(spec.name == name);
    // Both models hold the same fp32 draws.
    const view<const double, host_space> got(value), want_values(from_float.at(name).v());
    CHECK(testing::rel_error(got, want_values) == 0.0);
    if (info.shape.rank == 1) {
      for (std::int64_t j = 0; j < value.numel(); ++j) REQUIRE(value(j) == 1.0);
      return;
    }
    const bool output = name.find("o_proj") != std::string::npos || name.find("down_proj") != std::string::npos;
    const double want = output ? 0.02 / std::sqrt(6.0) : 0.02;
    CHECK(spec.init.std == doctest::Approx(want));
    const double rms =
        std::sqrt(double(squared_norm(exec::host{}, view<const double, host_space>(value))) / double(value.numel()));
    CHECK(rms == doctest::Approx(want).epsilon(0.35));  // >= 128 draws per tensor
    // fill_initial reproduces the draws in another element type (an optimizer's fp32 master copy).
    host_tensor<float> master(value.shape());
    nn::fill_initial(exec::host{}, master.v(), spec, seed);
    for (std::int64_t j = 0; j < value.numel(); ++j) REQUIRE(double(master.data()[j]) == value.data()[j]);
  });

  // A different seed gives different weights.
  host_model<double> other(cfg);
  other.init(seed + 1);
  double diff = 0;
  other.parameters().for_each([&](const std::string& name, auto value, auto, const parameter_info& info) {
    const view<const double, host_space> got(value), first(from_float.at(name).v());
    if (info.shape.rank == 2) diff += testing::rel_error(got, first);
  });
  CHECK(diff > 1.0);
}

TEST_CASE("llama: the loss at initialisation is close to ln(vocab)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const bool tied : {false, true}) {
    auto cfg = nn::presets::micro();
    cfg.tied_embeddings = tied;
    host_model<float> m(cfg);
    m.init(seed);
    const batch data(3, 16, cfg.vocab, seed + 1);
    const double loss = m.evaluate(data.tok(), data.tgt());
    CAPTURE(tied);
    CHECK(std::isfinite(loss));
    CHECK(std::abs(loss - std::log(double(cfg.vocab))) < 0.05);
  }
}

TEST_CASE("llama: whole-model gradient check in double on presets::micro() (every tensor, sampled elements)") {
  for (const bool tied : {false, true}) {
    const auto seed = testing::fresh_seed();
    CAPTURE(seed);
    CAPTURE(tied);
    auto cfg = nn::presets::micro();
    cfg.tied_embeddings = tied;
    host_model<double> m(cfg, exec::host{1});
    randomize(m, seed);
    const batch data(2, 7, cfg.vocab, seed + 1);
    // grad_scale = loss_scale / (targets counted) reaches the loss kernel as a float: pick loss_scale so that it
    // is exactly 1/16, and the check measures the model's arithmetic alone.
    std::int64_t counted = 0;
    for (std::int64_t i = 0; i < data.targets.numel(); ++i) counted += data.targets.data()[i] != -1;
    const float loss_scale = float(counted) / 16.0f;

    m.zero_grad();
    const double loss = m.forward(data.tok(), data.tgt(), loss_scale);
    m.backward();
    CHECK(loss == doctest::Approx(m.evaluate(data.tok(), data.tgt())).epsilon(1e-12));
    auto grads = gradients(m);

    // Five-point differences of loss_scale * evaluate() on sampled elements of every tensor (truncation ~h^4:
    // two-point differences at h = 1e-5 left ~1e-8 of truncation and rounding on small sampled gradients).
    const double h = 1e-3;
    std::uint64_t draw = 0;
    const view<const std::int32_t, host_space> tokens = data.tok().flat();
    m.parameters().for_each([&](const std::string& name, auto value, auto, const parameter_info&) {
      CAPTURE(name);
      const auto& g = grads.at(name);
      // Untied, the input embedding's rows of tokens the batch lacks get no gradient (checked whole here): its
      // samples come from the rows the batch uses, or a draw of only unused rows would measure rounding noise.
      const bool input_rows = !tied && name == "model.embed_tokens.weight";
      const std::int32_t* const used = tokens.data() + tokens.numel();
      for (std::int64_t row = 0; input_rows && row < value.dim(0); ++row) {
        if (std::find(tokens.data(), used, std::int32_t(row)) != used) continue;
        const double* const first = g.data() + row * value.dim(1);
        CAPTURE(row);
        CHECK(std::all_of(first, first + value.dim(1), [](double x) { return x == 0.0; }));
      }
      const auto sample = [&](std::int64_t k) {
        const auto bits = rng::bits4(seed, 11, draw++);
        if (value.numel() <= 10) return k;
        if (!input_rows) return std::int64_t(bits.v[0] % std::uint32_t(value.numel()));
        const std::int64_t row = tokens.data()[bits.v[0] % std::uint32_t(tokens.numel())];
        return row * value.dim(1) + std::int64_t(bits.v[1] % std::uint32_t(value.dim(1)));
      };
      const std::int64_t samples = std::min<std::int64_t>(value.numel(), 10);
      double num = 0, den = 0;
      for (std::int64_t k = 0; k < samples; ++k) {
        const std::int64_t i = sample(k);
        double& w = value.data()[i];
        const double keep = w;
        const auto at = [&](double dx) {
          w = keep + dx;
          return m.evaluate(data.tok(), data.tgt());
        };
        const double fd = double(loss_scale) * (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h);
        w = keep;
        num += (fd - g.data()[i]) * (fd - g.data()[i]);
        den += fd * fd;
      }
      CHECK(den > 0);
      CHECK(std::sqrt(num / den) < 1e-8);
    });
  }
}

TEST_CASE("llama: gradients accumulate over forward/backward pairs, evaluate() leaves them alone") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto cfg = nn::presets::micro();
  host_model<double> m(cfg);
  randomize(m, seed);
  const batch a(2, 5, cfg.vocab, seed + 1), b(2, 5, cfg.vocab, seed + 2);

  m.zero_grad();
  m.forward(a.tok(), a.tgt(), 0.5f);
  m.backward();
  const auto ga = gradients(m);
  m.zero_grad();
  m.forward(b.tok(), b.tgt(), 0.5f);
  m.backward();
  const auto gb = gradients(m);

  m.zero_grad();
  m.forward(a.tok(), a.tgt(), 0.5f);
  m.backward();
  (void)m.evaluate(b.tok(), b.tgt());  // no gradient work
  m.forward(b.tok(), b.tgt(), 0.5f);
  m.backward();
  const auto sum = gradients(m);
  for (const auto& [name, g] : sum) {
    CAPTURE(name);
    host_tensor<double> want(g.shape());
    for (std::int64_t i = 0; i < g.numel(); ++i) want.data()[i] = ga.at(name).data()[i] + gb.at(name).data()[i];
    CHECK(testing::rel_error(g, want) < 1e-13);
  }

  // backward() needs a forward() of its own.
  CHECK_THROWS_AS(m.backward(), invalid_argument);
  (void)m.evaluate(a.tok(), a.tgt());
  CHECK_THROWS_AS(m.backward(), invalid_argument);
}

TEST_CASE("llama: last-position logits agree with the loss, float follows double") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto cfg = nn::presets::micro();
  host_model<double> md(cfg);
  host_model<float> mf(cfg);
  randomize(md, seed);
  randomize(mf, seed);
  const std::int64_t B = 3, S = 9;
  batch data(B, S, cfg.vocab, seed + 1, false);
  host_tensor<double> logits({B, cfg.vocab});
  md.logits(data.tok(), logits.v());

  // Only the last position has a target: the loss is the mean of logsumexp - logit[target] over the rows.
  for (std::int64_t i = 0; i < B * S; ++i)
    if (i % S != S - 1) data.targets.data()[i] = -1;
  double want = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    double m = -1e300, z = 0;
    for (std::int64_t v = 0; v < cfg.vocab; ++v) m = std::max(m, logits(b, v));
    for (std::int64_t v = 0; v < cfg.vocab; ++v) z += std::exp(logits(b, v) - m);
    want += m + std::log(z) - logits(b, data.targets(b, S - 1));
  }
  want /= double(B);
  CHECK(md.evaluate(data.tok(), data.tgt()) == doctest::Approx(want).epsilon(1e-12));

  // RoPE scores depend on relative positions only: a position offset leaves a causal chunk's loss unchanged.
  md.set_position_offset(cfg.max_seq - S);
  CHECK(md.evaluate(data.tok(), data.tgt()) == doctest::Approx(want).epsilon(1e-12));
  md.set_position_offset(0);

  host_tensor<float> logits_f({B, cfg.vocab});
  mf.logits(data.tok(), logits_f.v());
  CHECK(testing::rel_error(logits_f, logits) < 1e-4);
  CHECK(mf.evaluate(data.tok(), data.tgt()) == doctest::Approx(want).epsilon(1e-4));
}

namespace {

/// A projection policy that counts its calls and otherwise is dense_projection: the seam is used.
struct counting_projection : nn::dense_projection {
  int* forwards = nullptr;
  int* backwards = nullptr;
  template <class Exec, class T>
  void forward(const Exec& ex, std::type_identity_t<view<const T, nn::space_t<Exec>>> x,
               std::type_identity_t<view<const T, nn::space_t<Exec>>> w, view<T, nn::space_t<Exec>> y) const {
    if (forwards) ++*forwards;
    nn::dense_projection::forward<Exec, T>(ex, x, w, y);
  }
  template <class Exec, class T, class G>
  void backward(const Exec& ex, std::type_identity_t<view<const T, nn::space_t<Exec>>> x,
                std::type_identity_t<view<const T, nn::space_t<Exec>>> w,
                std::type_identity_t<view<const T, nn::space_t<Exec>>> dy, view<T, nn::space_t<Exec>> dx,
                view<G, nn::space_t<Exec>> dw) const {
    if (backwards) ++*backwards;
    nn::dense_projection::backward<Exec, T, G>(ex, x, w, dy, dx, dw);
  }
  /// The down projection's backward comes in halves (the block recomputes SwiGLU's output for the second).
  template <class Exec, class T>
  void backward_input(const Exec& ex, std::type_identity_t<view<const T, nn::space_t<Exec>>> x,
                      std::type_identity_t<view<const T, nn::space_t<Exec>>> w,
                      std::type_identity_t<view<const T, nn::space_t<Exec>>> dy, view<T, nn::space_t<Exec>> dx) const {
    if (backwards) ++*backwards;
    nn::dense_projection::backward_input<Exec, T>(ex, x, w, dy, dx);
  }
};

/// An attention policy that counts its calls and otherwise is dense_attention.
struct counting_attention : nn::dense_attention {
  int calls = 0;
  template <class Exec, class T>
  void forward(const Exec& ex, const nn::attention_forward_args<T, nn::space_t<Exec>>& a) {
    ++calls;
    nn::dense_attention::forward<Exec, T>(ex, a);
  }
};

/// The factory of the counting policies.
struct counting_blocks : nn::dense_blocks {
  template <class Store>
  counting_attention attention(const nn::block_site<Store>&) const {
    return {};
  }
  template <class Store>
  counting_projection projection(const nn::block_site<Store>&, nn::projection_site) const {
    return {};
  }
};

struct not_a_projection {};

}  // namespace

static_assert(nn::ProjectionPolicy<nn::dense_projection, exec::host, double, double>);
static_assert(nn::AttentionPolicy<nn::dense_attention, exec::host, float>);
static_assert(!nn::ProjectionPolicy<not_a_projection, exec::host, float, float>);
static_assert(!nn::AttentionPolicy<not_a_projection, exec::host, float>);

TEST_CASE("llama: the attention and output projections are replaceable policies made by the block factory") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto cfg = nn::presets::micro();
  nn::llama<exec::host, double, counting_blocks> custom(cfg);
  host_model<double> dense(cfg);
  randomize(custom, seed);
  randomize(dense, seed);
  int forwards = 0, backwards = 0;
  for (std::int64_t l = 0; l < cfg.n_layers; ++l) {
    for (auto* p : {&custom.block(l).o_projection, &custom.block(l).down_projection}) {
      p->forwards = &forwards;
      p->backwards = &backwards;
    }
  }
  const batch data(2, 6, cfg.vocab, seed + 1);
  const double a = custom.forward(data.tok(), data.tgt());
  custom.backward();
  const double b = dense.forward(data.tok(), data.tgt());
  dense.backward();
  CHECK(a == b);
  CHECK(forwards == 2 * cfg.n_layers);
  CHECK(backwards == 2 * cfg.n_layers);
  for (std::int64_t l = 0; l < cfg.n_layers; ++l) CHECK(custom.block(l).attention.calls == 1);
  const auto ga = gradients(custom), gb = gradients(dense);
  for (const auto& [name, g] : ga) {
    CAPTURE(name);
    CHECK(testing::rel_error(g, gb.at(name)) == 0.0);
  }
}

TEST_CASE("llama: bad batches are rejected with clear messages") {
  const auto cfg = nn::presets::micro();
  host_model<float> m(cfg);
  m.init(1);
  batch data(2, 4, cfg.vocab, 5);
  data.targets(1, 2) = 32;
  const auto message = [&](auto&& f) {
    try {
      f();
    } catch (const invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("(no exception)");
  };
  auto msg = message([&] { m.forward(data.tok(), data.tgt()); });
  CHECK(msg.find("target 32 at position 6") != std::string::npos);
  data.targets(1, 2) = -1;
  data.tokens(0, 1) = 40;
  msg = message([&] { m.forward(data.tok(), data.tgt()); });
  CHECK(msg.find("token 40 at position 1") != std::string::npos);
  const batch long_batch(1, cfg.max_seq + 1, cfg.vocab, 6);
  msg = message([&] { m.evaluate(long_batch.tok(), long_batch.tgt()); });
  CHECK(msg.find("exceeds max_seq") != std::string::npos);
  const batch other(2, 3, cfg.vocab, 7);
  msg = message([&] { m.evaluate(data.tok(), other.tgt()); });
  CHECK(msg.find("targets have shape [2, 3]") != std::string::npos);
}

TEST_CASE("llama: backward's ready hook reports parameter ranges in reverse storage order, each already final") {
  for (const bool tied : {false, true}) {
    CAPTURE(tied);
    auto cfg = nn::presets::micro();
    cfg.tied_embeddings = tied;
    nn::llama<exec::host, double> model(cfg);
    model.init(testing::fresh_seed());
    const batch data(2, 8, cfg.vocab, testing::fresh_seed());
    model.zero_grad();
    model.forward(data.tok(), data.tgt());

    const std::size_t count = model.parameters().size();
    const auto flat = model.parameters().flat_grads();
    REQUIRE(flat.numel() == model.parameters().offset(count));
    std::vector<std::pair<std::size_t, std::size_t>> calls;
    std::vector<std::vector<double>> seen;  // the gradients of each reported range, at the time of the call
    model.backward([&](std::size_t first, std::size_t last) {
      REQUIRE(first < last);
      calls.emplace_back(first, last);
      const std::int64_t a = model.parameters().offset(first), b = model.parameters().offset(last);
      seen.emplace_back(flat.data() + a, flat.data() + b);
    });
    // The final norm (and untied head), each layer from the last, the embedding: together every tensor once.
    const std::size_t L = std::size_t(cfg.n_layers);
    std::vector<std::pair<std::size_t, std::size_t>> expected{{1 + 9 * L, count}};
    for (std::size_t l = L; l-- > 0;) expected.emplace_back(1 + 9 * l, 1 + 9 * (l + 1));
    expected.emplace_back(0, 1);
    CHECK(calls == expected);
    for (std::size_t c = 0; c < calls.size(); ++c) {
      const std::int64_t a = model.parameters().offset(calls[c].first), b = model.parameters().offset(calls[c].second);
      CHECK(std::vector<double>(flat.data() + a, flat.data() + b) == seen[c]);
    }
    // Padding between tensors is zero in values and gradients.
    const auto values = model.parameters().flat_values();
    for (std::size_t i = 0; i < count; ++i)
      for (std::int64_t j = model.parameters().offset(i) + model.parameters().infos()[i].shape.numel();
           j < model.parameters().offset(i + 1); ++j) {
        REQUIRE(values.data()[j] == 0.0);
        REQUIRE(flat.data()[j] == 0.0);
      }
  }
}

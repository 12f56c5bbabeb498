// The Llama model on CUDA (bf16 weights and activations, fp32 weight gradients) against the host model in double
// on the same weights (rounded to bf16 for both) and the same tokens: the loss, the last-position logits and every
// gradient tensor, within bf16 tolerance. Also: CUDA init equals the host init rounded to bf16.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <string>

#include <subspace/kernels/elementwise.hpp>
#include <subspace/kernels/random.hpp>
#include <subspace/nn/llama.hpp>

#include "support/cuda.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

using device_model = nn::llama<exec::cuda, bf16>;
using host_model = nn::llama<exec::host, double>;

/// Head dim 32 (a size the CUDA attention supports), two layers, grouped queries, a vocabulary that is not a
/// multiple of the loss kernel's chunks.
nn::llama_config gpu_check_config(bool tied) {
  nn::llama_config cfg;
  cfg.name = "gpu-check";
  cfg.vocab = 331;
  cfg.d_model = 128;
  cfg.n_layers = 2;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.ffn_hidden = 352;
  cfg.max_seq = 128;
  cfg.tied_embeddings = tied;
  cfg.rope.theta = 10000.0f;
  return cfg;
}

struct batch {
  host_tensor<std::int32_t> tokens, targets;
  batch(std::int64_t b, std::int64_t s, std::int64_t vocab, std::uint64_t seed) : tokens({b, s}), targets({b, s}) {
    for (std::int64_t i = 0; i < b * s; ++i) {
      const auto r = rng::bits4(seed, 3, std::uint64_t(i));
      tokens.data()[i] = std::int32_t(r.v[0] % std::uint32_t(vocab));
      targets.data()[i] = r.v[2] % 7 == 0 ? -1 : std::int32_t(r.v[1] % std::uint32_t(vocab));
    }
  }
  view<const std::int32_t, host_space> tok() const { return tokens.v(); }
  view<const std::int32_t, host_space> tgt() const { return targets.v(); }
};

/// Gives both models the same weights: draws that make every path matter (matrices N(0, 1/in), the embedding
/// N(0, 1), norm gains N(1, 0.2^2)), rounded to bf16.
void same_random_weights(const exec::cuda& ex, device_model& dm, host_model& hm, std::uint64_t seed) {
  std::map<std::string, view<bf16, device_space>> device_values;
  dm.parameters().for_each(
      [&](const std::string& name, auto value, auto, const parameter_info&) { device_values.emplace(name, value); });
  std::uint64_t offset = 100;
  hm.parameters().for_each([&](const std::string& name, auto value, auto, const parameter_info& info) {
    float mean = 0.0f, std = 1.0f;
    if (info.shape.rank == 1) mean = 1.0f, std = 0.2f;
    else if (name != "model.embed_tokens.weight") std = float(1.0 / std::sqrt(double(info.shape[1])));
    host_tensor<bf16> rounded(info.shape);
    fill_normal(exec::host{}, rounded.v(), seed, offset++, mean, std);
    cast(exec::host{}, view<const bf16, host_space>(rounded.v()), value);
    copy(ex, view<const bf16, host_space>(rounded.v()), device_values.at(name));
    ex.synchronize();
  });
}

template <class Model>
std::map<std::string, host_tensor<double>> host_gradients(Model& m) {
  std::map<std::string, host_tensor<double>> out;
  m.parameters().for_each([&](const std::string& name, auto, auto grad, const parameter_info&) {
    host_tensor<double> g(grad.shape());
    copy(exec::host{}, view<const double, host_space>(grad), g.v());
    out.emplace(name, std::move(g));
  });
  return out;
}

std::map<std::string, host_tensor<double>> device_gradients(const exec::cuda& ex, device_model& m) {
  std::map<std::string, host_tensor<double>> out;
  m.parameters().for_each([&](const std::string& name, auto, auto grad, const parameter_info&) {
    const auto g = to_host(ex, view<const float, device_space>(grad));
    host_tensor<double> d(g.shape());
    cast(exec::host{}, g.v(), d.v());
    out.emplace(name, std::move(d));
  });
  return out;
}

}  // namespace

TEST_CASE("llama (CUDA): init draws the host's values, rounded to bf16") {
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto cfg = gpu_check_config(false);
  device_model dm(cfg, ex);
  nn::llama<exec::host, float> hm(cfg);
  dm.init(seed);
  hm.init(seed);
  std::map<std::string, host_tensor<bf16>> from_device;
  dm.parameters().for_each([&](const std::string& name, auto value, auto, const parameter_info&) {
    from_device.emplace(name, to_host(ex, view<const bf16, device_space>(value)));
  });
  hm.parameters().for_each([&](const std::string& name, auto value, auto, const parameter_info&) {
    CAPTURE(name);
    host_tensor<bf16> want(value.shape());
    cast(exec::host{}, view<const float, host_space>(value), want.v());
    CHECK(testing::first_difference(from_device.at(name), want) == -1);
  });
}

TEST_CASE("llama (CUDA): loss, logits and every gradient tensor match the host model in double") {
  for (const bool tied : {false, true}) {
    testing::stream_guard sg;
    const exec::cuda ex{sg.stream};
    const auto seed = testing::fresh_seed();
    CAPTURE(seed);
    CAPTURE(tied);
    const auto cfg = gpu_check_config(tied);
    device_model dm(cfg, ex);
    host_model hm(cfg);
    same_random_weights(ex, dm, hm, seed);
    const std::int64_t B = 2, S = 96;
    const batch data(B, S, cfg.vocab, seed + 1);

    dm.zero_grad();
    hm.zero_grad();
    const double loss_d = dm.forward(data.tok(), data.tgt(), 0.5f);
    dm.backward();
    const double loss_h = hm.forward(data.tok(), data.tgt(), 0.5f);
    hm.backward();
    CAPTURE(loss_d);
    CAPTURE(loss_h);
    CHECK(std::isfinite(loss_d));
    CHECK(std::abs(loss_d - loss_h) <= 1e-2 * std::abs(loss_h));
    CHECK(dm.evaluate(data.tok(), data.tgt()) == doctest::Approx(loss_d).epsilon(1e-6));

    device_tensor<float> logits_d({B, cfg.vocab});
    host_tensor<double> logits_h({B, cfg.vocab});
    dm.logits(data.tok(), logits_d.v());
    hm.logits(data.tok(), logits_h.v());
    const auto ld = to_host(ex, view<const float, device_space>(logits_d.v()));
    CHECK(testing::rel_error(ld, logits_h) < 2e-2);

    const auto gd = device_gradients(ex, dm);
    const auto gh = host_gradients(hm);
    REQUIRE(gd.size() == gh.size());
    for (const auto& [name, g] : gh) {
      CAPTURE(name);
      const double err = testing::rel_error(gd.at(name), g);
      MESSAGE(name << ": relative error " << err);
      CHECK(err < 3e-2);
    }
  }
}

TEST_CASE("llama (CUDA): a config whose head dim the CUDA attention does not take fails when the model is built") {
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  const auto build = [&](const nn::llama_config& c) { device_model model(c, ex); };
  auto cfg = gpu_check_config(false);        // d_model 128
  for (const std::int64_t heads : {2, 8}) {  // head dims 64 and 16
    cfg.n_heads = heads;
    CHECK_NOTHROW(build(cfg));
  }
  cfg.n_heads = 32;  // head dim 4
  CHECK_THROWS_WITH_AS(build(cfg), doctest::Contains("head dim 4 (d_model 128 / n_heads 32)"), invalid_argument);
  CHECK_THROWS_WITH_AS(build(nn::presets::micro()), doctest::Contains("llama_config 'micro': head dim 4"),
                       invalid_argument);
  CHECK_NOTHROW(nn::llama<exec::host, float>(nn::presets::micro()));  // the host kernels take any head dim
}

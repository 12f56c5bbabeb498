// adjoint::selective_ssm on CUDA against the host model on the same weights and tokens: the loss and every
// parameter gradient of each engine (the exact adjoint with C stored and recomputed, the sharded adjoint with and
// without a window, and bptt, which on the device walks its stored graph layer by layer) against the fp64 host
// model, for fp32 (1e-5) and bf16 (3e-2) storage; logits; and a few fp32-master training steps that lower the loss.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include <adjoint/selective_ssm.hpp>
#include <subspace/optim/adamw.hpp>
#include <subspace/policies.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>
#include <subspace/train/trainer.hpp>

#include "support/cuda.hpp"
#include "support/named_tensors.hpp"
#include "support/numeric.hpp"
#include "support/token_batch.hpp"

using namespace subspace;

namespace {

adjoint::ssm_config test_model() {
  adjoint::ssm_config c = adjoint::presets::micro();
  c.vocab = 37;
  c.d_model = 24;
  c.state = 6;
  c.layers = 3;
  c.init_std = 0.2f;
  return c;
}

/// The flat storage of a device store, as double on the host.
template <class U>
std::vector<double> device_values(const exec::cuda& ex, view<U, device_space> flat) {
  host_tensor<std::remove_const_t<U>> h(flat.shape());
  copy(ex, view<const std::remove_const_t<U>, device_space>(flat), h.v());
  ex.synchronize();
  std::vector<double> out(static_cast<std::size_t>(h.numel()));
  for (std::int64_t i = 0; i < h.numel(); ++i) out[std::size_t(i)] = double(float(h.data()[i]));
  return out;
}

/// Per-tensor gradients of a store whose flat gradients are `grads` (host doubles).
template <class Store>
std::map<std::string, std::vector<double>> by_name(const Store& store, const std::vector<double>& flat) {
  std::map<std::string, std::vector<double>> out;
  for (std::size_t i = 0; i < store.size(); ++i) {
    const auto first = flat.begin() + store.offset(i);
    out[store.info(i).name].assign(first, first + store.info(i).shape.numel());
  }
  return out;
}

// `what` as a string_view: doctest CAPTUREs a const char* as a pointer.
template <class T, class Engine>
void compare(Engine engine, std::string_view what, std::uint64_t seed) {
  CAPTURE(what);
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  const adjoint::ssm_config cfg = test_model();
  const testing::token_batch batch(2, 96, cfg.vocab, seed + 1);
  adjoint::selective_ssm<exec::cuda, T, Engine> device(cfg, ex, engine);
  device.init(seed);
  device.zero_grad();
  const double loss = device.forward(batch.tok(), batch.tgt());
  device.backward();
  // The host reference in fp64 on the device's (rounded) weights.
  adjoint::selective_ssm<exec::host, double, Engine> host(cfg, exec::host{}, engine);
  const std::vector<double> weights = device_values(ex, device.parameters().flat_values());
  std::copy(weights.begin(), weights.end(), host.parameters().flat_values().data());
  host.zero_grad();
  const double host_loss = host.forward(batch.tok(), batch.tgt());
  host.backward();
  // bf16: the stored activations and the cotangents between kernels are bf16 (as in the Llama's test, 3e-2). The
  // bottom layer's gradients sit near that bound, and a bias gradient, a sum over every token of rounded terms
  // that largely cancel, has been seen 5.5% off on a fresh seed: 6e-2 for weights, 1.5e-1 for biases. (fp32
  // cotangents between kernels left the tail as it was: 4.9% and 6.0% worst over 25 seeds; docs/ssm.md.)
  const double tol = std::is_same_v<T, float> ? 1e-5 : 3e-2;
  CHECK(std::abs(loss - host_loss) <= tol * std::abs(host_loss));
  const auto got = by_name(device.parameters(), device_values(ex, device.parameters().flat_grads()));
  testing::named_tensors want;
  want.add(host.parameters());
  for (const auto& [name, g] : want.grads) {
    CAPTURE(name);
    const bool bias = name.ends_with(".bias");
    CHECK(testing::rel_diff(got.at(name), g) <= (std::is_same_v<T, float> ? tol : bias ? 1.5e-1 : 6e-2));
  }
}

}  // namespace

TEST_CASE_TEMPLATE("ssm (CUDA): every engine's loss and gradients equal the fp64 host model's", T, float, bf16) {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  compare<T>(adjoint::exact_adjoint{}, "exact", seed);
  compare<T>(adjoint::exact_adjoint{.recompute_c = true}, "exact, C recomputed", seed);
  compare<T>(adjoint::sharded_adjoint{}, "sharded", seed);
  compare<T>(adjoint::sharded_adjoint{.window = 5}, "sharded, window 5", seed);
  compare<T>(adjoint::bptt{}, "bptt (the graph, layer by layer)", seed);
}

TEST_CASE("ssm (CUDA): logits equal the host's, and bf16 training steps with fp32 masters lower the loss") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  const adjoint::ssm_config cfg = test_model();
  const testing::token_batch batch(3, 40, cfg.vocab, seed + 1, false);
  adjoint::selective_ssm<exec::cuda, float> device(cfg, ex);
  device.init(seed);
  adjoint::selective_ssm<exec::host, double> host(cfg, exec::host{});
  const std::vector<double> weights = device_values(ex, device.parameters().flat_values());
  std::copy(weights.begin(), weights.end(), host.parameters().flat_values().data());
  tensor<float, device_space> logits({3, cfg.vocab});
  host_tensor<double> want({3, cfg.vocab});
  device.logits(batch.tok(), logits.v());
  host.logits(batch.tok(), want.v());
  const std::vector<double> got = device_values(ex, logits.v());
  std::vector<double> ref(want.data(), want.data() + want.numel());
  CHECK(testing::rel_diff(got, ref) <= 1e-5);

  // bf16 weights with fp32 masters through train::trainer, on real text: the loss falls.
  const testing::genesis_data text;
  adjoint::ssm_config byte_model = cfg;
  byte_model.vocab = 256;
  train::trainer_options o;
  o.schedule.peak_lr = 3e-3f;
  o.schedule.warmup_steps = 3;
  o.schedule.total_steps = 30;
  train::trainer t(adjoint::selective_ssm<exec::cuda, bf16>(byte_model, ex),
                   subspace::stack{.scheduler = schedule::gradient_accumulation{1}, .optimizer = optim::adamw{}}, o);
  t.init(seed);
  auto data = text.train(4, 64);
  double first = 0, tail = 0;
  for (int s = 0; s < 30; ++s) {
    const double l = t.step(data).loss;
    REQUIRE(std::isfinite(l));
    if (s == 0) first = l;
    if (s >= 25) tail += l / 5;
  }
  CHECK(tail < first - 0.5);
}

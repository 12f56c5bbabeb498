// optim::adamw: the fused CUDA kernel against the host step on the same random weights, gradients and state.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>

#include <subspace/optim/adamw.hpp>
#include <subspace/subspace.hpp>

#include "support/numeric.hpp"

using namespace subspace;

namespace {

template <class T>
std::int64_t differing_bits(const host_tensor<T>& a, const host_tensor<T>& b) {
  std::int64_t n = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) n += std::memcmp(&a.data()[i], &b.data()[i], sizeof(T)) != 0;
  return n;
}

/// Random moments: m ~ N(0, 0.01^2), v = (N(0, 0.01^2))^2, as after some training.
void randomise_state(optim::adamw::state<host_space>& st, std::uint64_t seed) {
  auto m = testing::random_tensor<float>(st.m.shape(), seed, 0.0f, 1e-2f);
  auto r = testing::random_tensor<float>(st.v.shape(), seed + 1, 0.0f, 1e-2f);
  copy(exec::host{}, m.v(), st.m.v());
  for (std::int64_t i = 0; i < r.numel(); ++i) st.v.data()[i] = r.data()[i] * r.data()[i];
}

}  // namespace

TEST_CASE_TEMPLATE("optim::adamw: the fused CUDA step equals the host step over several steps", G, float, bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  CAPTURE(dtype_name<G>());
  cudaStream_t stream = nullptr;
  cuda_check(cudaStreamCreate(&stream));
  const exec::cuda dev{stream};
  const exec::host host{};
  const optim::adamw opt{};

  // Sizes cover a single partial block, an odd size and several grid-stride passes.
  for (const shape s : {shape{1}, shape{37, 29}, shape{1024, 1031}}) {
    for (const bool decay : {true, false}) {
      CAPTURE(to_string(s));
      CAPTURE(decay);
      const optim::param_info info{"w", s, decay};

      auto master_h = testing::random_tensor<float>(s, seed);
      auto state_h = opt.init(host, info);
      randomise_state(state_h, seed + 100);

      auto master_d = to_device(dev, master_h.v());
      auto state_d = opt.init(dev, info);
      copy(dev, state_h.m.v(), state_d.m.v());
      copy(dev, state_h.v.v(), state_d.v.v());
      device_tensor<bf16> working_d(s);
      host_tensor<bf16> working_h(s);

      for (int t = 1; t <= 4; ++t) {
        CAPTURE(t);
        const auto grad_h = testing::random_tensor<G>(s, seed + std::uint64_t(t), 0.0f, 0.05f * float(t));
        const auto grad_d = to_device(dev, grad_h.v());
        const optim::step_context ctx{1e-2f / float(t), 10 + t};  // resume mid-training: bias correction at t+10
        opt.step(host, master_h.v(), grad_h.v(), state_h, info, ctx, working_h.v());
        opt.step(dev, master_d.v(), grad_d.v(), state_d, info, ctx, working_d.v());

        const auto master = to_host(dev, master_d.v());
        const auto m = to_host(dev, state_d.m.v());
        const auto v = to_host(dev, state_d.v.v());
        const auto working = to_host(dev, working_d.v());
        CHECK(testing::rel_error(master, master_h) <= 1e-6);
        CHECK(testing::rel_error(m, state_h.m) <= 1e-6);
        CHECK(testing::rel_error(v, state_h.v) <= 1e-6);
        // The working copy is bf16 of the device's own master weights, bit for bit.
        host_tensor<bf16> expected(s);
        for (std::int64_t i = 0; i < expected.numel(); ++i) expected.data()[i] = bf16(master.data()[i]);
        CHECK(differing_bits(working, expected) == 0);
        // Host and device share the element function, so they are expected to agree bit for bit.
        const std::int64_t differ = differing_bits(master, master_h);
        if (differ != 0) MESSAGE("master weights differing in bits from the host: " << differ << " of " << s.numel());
      }
    }
  }
  cuda_check(cudaStreamDestroy(stream));
}

TEST_CASE("optim::adamw: device state starts at zero and the step without a working copy leaves it alone") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const exec::cuda dev{};
  const optim::adamw opt{};
  const auto info = optim::param_info_for("w", {300, 7});
  const auto st = opt.init(dev, info);
  const auto m = to_host(dev, st.m.v());
  const auto v = to_host(dev, st.v.v());
  bool zero = true;
  for (std::int64_t i = 0; i < m.numel(); ++i) zero = zero && m.data()[i] == 0.0f && v.data()[i] == 0.0f;
  CHECK(zero);
  CHECK(opt.state_bytes(st) == std::size_t(2 * 300 * 7) * sizeof(float));

  // Same step on both executors, no working copy.
  auto master_h = testing::random_tensor<float>(info.shape, seed);
  const auto grad_h = testing::random_tensor<bf16>(info.shape, seed + 1);
  auto master_d = to_device(dev, master_h.v());
  const auto grad_d = to_device(dev, grad_h.v());
  auto state_h = opt.init(exec::host{}, info);
  auto state_d = opt.init(dev, info);
  opt.step(exec::host{}, master_h.v(), grad_h.v(), state_h, info, optim::step_context{1e-3f, 1});
  opt.step(dev, master_d.v(), grad_d.v(), state_d, info, optim::step_context{1e-3f, 1});
  CHECK(testing::rel_error(to_host(dev, master_d.v()), master_h) <= 1e-6);
}

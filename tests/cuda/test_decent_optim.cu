// decent::decent_adam(w) and decent::accum_adam(w): the fused CUDA kernels against the host step on the same
// random weights, gradients (fp32 and bf16), mixed points and state, with the bf16 working copy.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>

#include <decent/accum_adam.hpp>
#include <decent/decent_adam.hpp>
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

/// Random state as after some training: m ~ N(0, 0.01^2), v = (N(0, 0.01^2))^2, AccumAdam's Acc ~ N(0, 0.01^2).
template <class State>
void randomise_state(State& st, std::uint64_t seed) {
  auto m = testing::random_tensor<float>(st.m.shape(), seed, 0.0f, 1e-2f);
  auto r = testing::random_tensor<float>(st.v.shape(), seed + 1, 0.0f, 1e-2f);
  copy(exec::host{}, view<const float, host_space>(m.v()), st.m.v());
  for (std::int64_t i = 0; i < r.numel(); ++i) st.v.data()[i] = r.data()[i] * r.data()[i];
  if constexpr (requires { st.acc; }) {
    auto a = testing::random_tensor<float>(st.acc.shape(), seed + 2, 0.0f, 1e-2f);
    copy(exec::host{}, view<const float, host_space>(a.v()), st.acc.v());
  }
}

/// The device state as a copy of the host state.
template <class O>
auto device_copy(const exec::cuda& dev, const O& opt, const typename O::template state<host_space>& h,
                 const optim::param_info& info) {
  auto d = opt.init(dev, info);
  copy(dev, h.m.v(), d.m.v());
  copy(dev, h.v.v(), d.v.v());
  if constexpr (requires { h.acc; }) copy(dev, h.acc.v(), d.acc.v());
  return d;
}

/// Six steps on both executors from the same inputs, resuming mid-training (ctx.step 11..16), alternating the
/// plain step and the fused step from a separate mixed point; compares everything after each step.
template <class G, class O>
void check_cuda_against_host(const O& opt, std::uint64_t seed, cudaStream_t stream) {
  const exec::cuda dev{stream};
  const exec::host host{};
  // Sizes cover a single partial block, an odd size and several grid-stride passes.
  for (const shape s : {shape{1}, shape{37, 29}, shape{1024, 1031}}) {
    for (const bool decay : {true, false}) {
      CAPTURE(to_string(s));
      CAPTURE(decay);
      const optim::param_info info{"w", s, decay};
      auto master_h = testing::random_tensor<float>(s, seed);
      auto state_h = opt.init(host, info);
      randomise_state(state_h, seed + 100);
      auto master_d = to_device(dev, view<const float, host_space>(master_h.v()));
      auto state_d = device_copy(dev, opt, state_h, info);
      device_tensor<bf16> working_d(s);
      host_tensor<bf16> working_h(s);

      for (int t = 1; t <= 6; ++t) {
        CAPTURE(t);
        const auto grad_h = testing::random_tensor<G>(s, seed + std::uint64_t(t), 0.0f, 0.05f * float(t));
        const auto grad_d = to_device(dev, grad_h.v());
        const optim::step_context ctx{1e-2f / float(t), 10 + t};
        if (t % 2 == 1) {
          opt.step(host, master_h.v(), grad_h.v(), state_h, info, ctx, working_h.v());
          opt.step(dev, master_d.v(), grad_d.v(), state_d, info, ctx, working_d.v());
        } else {
          const auto mixed_h = testing::random_tensor<float>(s, seed + 1000 + std::uint64_t(t));
          const auto mixed_d = to_device(dev, mixed_h.v());
          opt.step_from_mixed(host, mixed_h.v(), master_h.v(), grad_h.v(), state_h, info, ctx, working_h.v());
          opt.step_from_mixed(dev, mixed_d.v(), master_d.v(), grad_d.v(), state_d, info, ctx, working_d.v());
        }
        const auto master = to_host(dev, master_d.v());
        CHECK(testing::rel_error(master, master_h) <= 1e-6);
        CHECK(testing::rel_error(to_host(dev, state_d.m.v()), state_h.m) <= 1e-6);
        CHECK(testing::rel_error(to_host(dev, state_d.v.v()), state_h.v) <= 1e-6);
        if constexpr (requires { state_h.acc; }) {
          const auto acc = to_host(dev, state_d.acc.v());
          if (opt.closes_window(ctx.step)) CHECK(differing_bits(acc, state_h.acc) == 0);  // both zero
          else CHECK(testing::rel_error(acc, state_h.acc) <= 1e-6);
        }
        // The working copy is bf16 of the device's own master weights, bit for bit.
        const auto working = to_host(dev, working_d.v());
        host_tensor<bf16> expected(s);
        for (std::int64_t i = 0; i < expected.numel(); ++i) expected.data()[i] = bf16(master.data()[i]);
        CHECK(differing_bits(working, expected) == 0);
        // Host and device share the element functions, so they are expected to agree bit for bit.
        const std::int64_t differ = differing_bits(master, master_h);
        if (differ != 0) MESSAGE("master weights differing in bits from the host: " << differ << " of " << s.numel());
      }
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("decent_adam and decent_adamw: the fused CUDA step equals the host step", G, float, bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  CAPTURE(dtype_name<G>());
  cudaStream_t stream = nullptr;
  cuda_check(cudaStreamCreate(&stream));
  check_cuda_against_host<G>(decent::decent_adam{.weight_decay = 0.05f}, seed, stream);
  check_cuda_against_host<G>(decent::decent_adamw{}, seed, stream);
  cuda_check(cudaStreamDestroy(stream));
}

TEST_CASE_TEMPLATE("accum_adam and accum_adamw: the fused CUDA step equals the host step across windows", G, float,
                   bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  CAPTURE(dtype_name<G>());
  cudaStream_t stream = nullptr;
  cuda_check(cudaStreamCreate(&stream));
  // K = 3 with steps 11..16: windows close at 12 and 15.
  check_cuda_against_host<G>(decent::accum_adam{.accum_iter = 3, .weight_decay = 0.05f}, seed, stream);
  check_cuda_against_host<G>(decent::accum_adamw{.accum_iter = 3}, seed, stream);
  check_cuda_against_host<G>(decent::accum_adamw{.accum_iter = 1}, seed, stream);
  cuda_check(cudaStreamDestroy(stream));
}

TEST_CASE("decent optimizers: device state starts at zero, and the step without a working copy matches the host") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const exec::cuda dev{};
  const decent::accum_adamw opt{.accum_iter = 2};
  const auto info = optim::param_info_for("w", {300, 7});
  const auto st = opt.init(dev, info);
  bool zero = true;
  for (const auto* t : {&st.m, &st.v, &st.acc}) {
    const auto h = to_host(dev, t->v());
    for (std::int64_t i = 0; i < h.numel(); ++i) zero = zero && h.data()[i] == 0.0f;
  }
  CHECK(zero);
  CHECK(opt.state_bytes(st) == std::size_t(3 * 300 * 7) * sizeof(float));
  CHECK(decent::decent_adam{}.state_bytes(decent::decent_adam{}.init(dev, info)) ==
        std::size_t(2 * 300 * 7) * sizeof(float));

  auto master_h = testing::random_tensor<float>(info.shape, seed);
  const auto grad_h = testing::random_tensor<bf16>(info.shape, seed + 1);
  auto master_d = to_device(dev, view<const float, host_space>(master_h.v()));
  const auto grad_d = to_device(dev, grad_h.v());
  auto state_h = opt.init(exec::host{}, info);
  auto state_d = opt.init(dev, info);
  for (int s = 1; s <= 3; ++s) {
    opt.step(exec::host{}, master_h.v(), grad_h.v(), state_h, info, optim::step_context{1e-3f, s});
    opt.step(dev, master_d.v(), grad_d.v(), state_d, info, optim::step_context{1e-3f, s});
  }
  CHECK(testing::rel_error(to_host(dev, master_d.v()), master_h) <= 1e-6);
}

// decent::gossip_trainer and dist::data_parallel_trainer on one GPU: 2 to 4 comm::local ranks as threads, each
// with its own stream (the model's executor stream is the rank's communication stream), device memory,
// llama<exec::cuda, bf16> with fp32 masters — against the same trainers on the host (llama<exec::host, float>,
// comm::local on host memory) for a few steps on the same data: losses, master weights and their updates within
// bf16 tolerance, and the trainers' invariants (data parallel: every rank equal; gossip: the ranks differ).
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include <decent/accum_adam.hpp>
#include <decent/decent_adam.hpp>
#include <decent/gossip_trainer.hpp>
#include <decent/topology.hpp>
#include <subspace/comm/local.hpp>
#include <subspace/core/parallel.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/data/tokens.hpp>
#include <subspace/dist/data_parallel_trainer.hpp>
#include <subspace/subspace.hpp>

#include "support/cuda.hpp"
#include "support/gpu_llama.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"

using namespace subspace;

namespace {

using device_model = nn::llama<exec::cuda, bf16>;
using host_model = nn::llama<exec::host, float>;

nn::llama_config config() { return testing::gpu_check_config("decent-gpu-check"); }

/// Streams owned by the test, one per rank.
struct rank_streams {
  std::vector<cudaStream_t> s;
  explicit rank_streams(int n) : s(static_cast<std::size_t>(n)) {
    for (auto& x : s) cuda_check(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking));
  }
  ~rank_streams() {
    for (auto x : s) {
      cudaStreamSynchronize(x);
      cudaStreamDestroy(x);
    }
  }
  rank_streams(const rank_streams&) = delete;
  rank_streams& operator=(const rank_streams&) = delete;
};

/// Runs body(r) on n threads (device 0 current on each) and fails with the first rank's error.
template <class Body>
void run_ranks(int n, Body body) {
  std::vector<std::string> errors(static_cast<std::size_t>(n));
  run_concurrently(n, [&](int r) {
    try {
      cuda_check(cudaSetDevice(0));
      body(r);
    } catch (const std::exception& e) {
      errors[std::size_t(r)] = e.what();
    }
  });
  for (int r = 0; r < n; ++r) {
    CAPTURE(r);
    REQUIRE_MESSAGE(errors[std::size_t(r)].empty(), errors[std::size_t(r)]);
  }
}

data::token_dataset token_data(const testing::scratch_dir& dir, std::uint64_t seed) {
  return testing::text_like_tokens(dir.path / "tokens_train_000000.bin", seed, 60'000);
}

data::batch_loader loader(const data::token_dataset& all, int r, int n, std::uint64_t seed) {
  data::loader_options o;
  o.batch = 2;
  o.seq = 32;
  o.vocab = 256;
  o.shuffle = true;
  o.seed = seed + std::uint64_t(r);
  const std::uint64_t t = all.tokens(), un = std::uint64_t(n), ur = std::uint64_t(r);
  return data::batch_loader(all.slice(t * ur / un, t * (ur + 1) / un), o);
}

decent::gossip_options options(std::int64_t bucket_bytes) {
  decent::gossip_options o;
  o.bucket_bytes = bucket_bytes;
  o.accumulation = 2;
  o.clip = 1.0;
  o.schedule = {1e-3f, 1e-4f, 1, 4, optim::decay_kind::cosine};
  return o;
}

/// What a run leaves on each rank: its fp32 masters and its step losses.
struct rank_result {
  std::vector<float> masters;
  std::vector<double> losses;
};

std::vector<float> host_copy(view<float, host_space> v) { return std::vector<float>(v.data(), v.data() + v.numel()); }
std::vector<float> host_copy(const exec::cuda& ex, view<float, device_space> v) {
  const host_tensor<float> h = to_host(ex, view<const float, device_space>(v));
  return std::vector<float>(h.data(), h.data() + h.numel());
}

/// Runs `steps` steps of the trainer make(model, comm, r) on n host ranks or n device ranks.
template <bool Device, class Make>
std::vector<rank_result> run(int n, std::int64_t steps, const data::token_dataset& data, std::uint64_t seed,
                             Make make) {
  std::vector<rank_result> out(static_cast<std::size_t>(n));
  rank_streams streams(n);
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(120);
  if constexpr (Device) lo.streams.assign(streams.s.begin(), streams.s.end());
  auto comms = comm::local::world(n, lo);
  run_ranks(n, [&](int r) {
    const auto ur = std::size_t(r);
    auto loaded = loader(data, r, n, seed);
    if constexpr (Device) {
      const exec::cuda ex{streams.s[ur]};
      auto t = make(device_model(config(), ex), comms[ur]);
      t.init(seed);
      for (std::int64_t k = 0; k < steps; ++k) out[ur].losses.push_back(t.step(loaded).loss);
      out[ur].masters = host_copy(ex, t.master_values());
    } else {
      auto t = make(host_model(config(), exec::host{1}), comms[ur]);
      t.init(seed);
      for (std::int64_t k = 0; k < steps; ++k) out[ur].losses.push_back(t.step(loaded).loss);
      out[ur].masters = host_copy(t.master_values());
    }
  });
  return out;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  return testing::rel_error(view<const float, host_space>(a.data(), {std::int64_t(a.size())}),
                            view<const float, host_space>(b.data(), {std::int64_t(b.size())}));
}

std::vector<float> minus(const std::vector<float>& a, const std::vector<float>& b) {
  std::vector<float> d(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

/// Device against host: every rank's losses, masters and update from the initial weights, within bf16 tolerance.
void compare(const std::vector<rank_result>& device, const std::vector<rank_result>& host, std::uint64_t seed) {
  host_model initial(config(), exec::host{1});
  initial.init(seed);
  const std::vector<float> x0 = host_copy(initial.parameters().flat_values());
  for (std::size_t r = 0; r < host.size(); ++r) {
    CAPTURE(r);
    for (std::size_t k = 0; k < host[r].losses.size(); ++k) {
      CAPTURE(k);
      CHECK(std::isfinite(device[r].losses[k]));
      CHECK(std::abs(device[r].losses[k] - host[r].losses[k]) <= 2e-2 * host[r].losses[k]);
    }
    // The weights are mostly their (identical) initial values; the update from them is what the trainers did.
    CHECK(rel(device[r].masters, host[r].masters) <= 3e-2);
    const double update_error = rel(minus(device[r].masters, x0), minus(host[r].masters, x0));
    CAPTURE(update_error);
    CHECK(update_error <= 0.25);  // bf16 gradients; Adam's early steps are sign-like where gradients are tiny
  }
}

}  // namespace

TEST_CASE("decent::gossip_trainer (CUDA): 3 and 4 ranks on one GPU match the host trainer in bf16 tolerance") {
  testing::scratch_dir dir;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const data::token_dataset data = token_data(dir, seed);
  const std::int64_t steps = 4;
  const std::int64_t bucket_bytes = 60'000;  // several buckets
  const auto check = [&](auto topology, auto optimizer) {
    const int n = topology.world_size();
    CAPTURE(n);
    const auto make = [&](auto model, comm::local& c) {
      return decent::gossip_trainer(std::move(model),
                                    subspace::stack{.communicator = c, .scheduler = topology, .optimizer = optimizer},
                                    options(bucket_bytes));
    };
    const auto device = run<true>(n, steps, data, seed, make);
    const auto host = run<false>(n, steps, data, seed, make);
    compare(device, host, seed);
    CHECK(device[0].masters != device[1].masters);  // gossip: local gradients, local moments
  };
  check(decent::ring(4), decent::decent_adam{});
  decent::accum_adamw accum{};
  accum.accum_iter = 2;
  check(decent::complete(3), accum);
}

TEST_CASE("dist::data_parallel_trainer (CUDA): 2 and 3 ranks on one GPU match the host trainer in bf16 tolerance") {
  testing::scratch_dir dir;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const data::token_dataset data = token_data(dir, seed);
  for (const int n : {2, 3}) {
    CAPTURE(n);
    const auto make = [&](auto model, comm::local& c) {
      const decent::gossip_options o = options(60'000);
      return dist::data_parallel_trainer(
          std::move(model),
          subspace::stack{.communicator = c,
                          .scheduler = schedule::gradient_accumulation{int(o.accumulation), c.size()}},
          dist::trainer_options(o));
    };
    const auto device = run<true>(n, 4, data, seed, make);
    const auto host = run<false>(n, 4, data, seed, make);
    compare(device, host, seed);
    for (int r = 1; r < n; ++r) CHECK(device[std::size_t(r)].masters == device[0].masters);  // one global step
  }
}

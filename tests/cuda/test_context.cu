// context::context_trainer on one GPU: 2 and 4 comm::local ranks as threads, each with its own stream (the
// model's executor stream is the rank's communication stream), a llama<exec::cuda, bf16> whose 64-token sequences
// are spread over the ranks (zigzag and contiguous, ring and all-gather; the block attention is the library's
// flash kernel at global positions, merged by log-sum-exp) against the same model on one device on the host in
// double with the device's bf16 weights: the loss and every gradient within bf16 tolerance. And the same with
// Mixture of Subspaces (compress::kv_subspace_mixture's CUDA codec) against the compressed host model.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/compress/identity.hpp>
#include <subspace/compress/kv_subspace_mixture.hpp>
#include <subspace/context/context_trainer.hpp>
#include <subspace/core/parallel.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/kernels/linalg.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>
#include <subspace/train/engine.hpp>

#include "support/cuda.hpp"
#include "support/gpu_llama.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"

using namespace subspace;

namespace {

using host_model = nn::llama<exec::host, double>;

data::batch_loader loader(const data::token_dataset& all) {
  data::loader_options o;
  o.batch = 2;
  o.seq = 64;
  o.vocab = 256;
  o.shuffle = true;
  o.seed = 5;
  return data::batch_loader(all, o);
}

/// Values and gradients by name, on the host.
struct named {
  std::map<std::string, host_tensor<double>> values;
  std::map<std::string, host_tensor<double>> grads;
};

void check_against_host(int p, context::placement placement, context::exchange how, const data::token_dataset& data,
                        std::uint64_t seed) {
  const nn::llama_config cfg = testing::gpu_check_config("context-gpu-check");
  const int m = 2;
  std::vector<cudaStream_t> streams(p);
  for (auto& s : streams) cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(120);
  lo.streams.assign(streams.begin(), streams.end());
  auto world = comm::local::world(p, lo);
  named device;
  double device_loss = 0;
  std::mutex mu;
  std::vector<std::string> errors(p);
  run_concurrently(p, [&](int r) {
    try {
      cuda_check(cudaSetDevice(0));
      const exec::cuda ex{streams[std::size_t(r)]};
      context::trainer_options o;
      o.context_ranks = p;
      o.seq = 64;
      o.layout = placement;
      o.kv_exchange = how;
      auto stack = subspace::stack{.communicator = world[std::size_t(r)],
                                   .compressor = compress::identity{},
                                   .scheduler = schedule::gradient_accumulation{m, p},
                                   .optimizer = optim::adamw{}};
      context::context_trainer<nn::llama<exec::cuda, bf16>, decltype(stack)> t(cfg, std::move(stack), o, ex);
      t.init(seed);
      auto d = loader(data);
      const double loss = t.compute_gradients(d);
      auto& store = t.model().parameters();
      std::lock_guard lock(mu);
      if (r == 0) device_loss = loss;
      for (std::size_t i = 0; i < store.size(); ++i) {
        const auto v = to_host(ex, view<const bf16, device_space>(store.value(i)));
        const auto g = to_host(ex, view<const float, device_space>(store.grad(i)));
        host_tensor<double> hv(v.shape()), hg(g.shape());
        cast(exec::host{}, view<const bf16, host_space>(v.v()), hv.v());
        cast(exec::host{}, view<const float, host_space>(g.v()), hg.v());
        device.values.insert_or_assign(store.info(i).name, std::move(hv));
        device.grads.insert_or_assign(store.info(i).name, std::move(hg));
      }
    } catch (const std::exception& e) {
      errors[std::size_t(r)] = e.what();
    }
  });
  for (auto s : streams) cudaStreamDestroy(s);
  for (int r = 0; r < p; ++r) REQUIRE_MESSAGE(errors[std::size_t(r)].empty(), errors[std::size_t(r)]);

  // The whole model on the host, in double, with the device's weights.
  std::vector<host_model> whole = train::as_stages(host_model(cfg, exec::host{1}));
  auto& store = whole[0].parameters();
  store.allocate(exec::host{});
  REQUIRE(store.size() == device.values.size());
  for (std::size_t i = 0; i < store.size(); ++i)
    copy(exec::host{}, view<const double, host_space>(device.values.at(store.info(i).name).v()), store.value(i));
  whole[0].zero_grad();
  compress::identity none;
  train::plan_engine<host_model, compress::identity> engine(whole, none, {});
  auto d = loader(data);
  const double host_loss = engine.run(
      schedule::gradient_accumulation{m}.plan(0, 0), train::loader_source{d}, [](std::size_t, std::size_t) {}, [] {});
  CAPTURE(device_loss);
  CAPTURE(host_loss);
  CHECK(std::isfinite(device_loss));
  CHECK(std::abs(device_loss - host_loss) <= 1e-2 * host_loss);
  for (std::size_t i = 0; i < store.size(); ++i) {
    const std::string& name = store.info(i).name;
    CAPTURE(name);
    host_tensor<double> want(store.grad(i).shape());
    copy(exec::host{}, view<const double, host_space>(store.grad(i)), want.v());
    const double err = testing::rel_error(device.grads.at(name), want);
    MESSAGE(name << ": relative error " << err);
    CHECK(err < 3e-2);
  }
}

}  // namespace

TEST_CASE(
    "context parallel (CUDA): 2 and 4 ranks on one GPU, zigzag and contiguous, ring and all-gather, match the host "
    "model in double") {
  testing::scratch_dir dir;
  const auto data = testing::text_like_tokens(dir.path / "tokens_train_000000.bin", 9, 40'000);
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const int p : {2, 4})
    for (const auto placement : {context::placement::zigzag, context::placement::contiguous})
      for (const auto how : {context::exchange::ring, context::exchange::all_gather}) {
        CAPTURE(p);
        CAPTURE(context::to_string(placement));
        CAPTURE(context::to_string(how));
        check_against_host(p, placement, how, data, seed);
      }
}

namespace {

/// A random orthonormal [d, r] basis (double), seeded.
host_tensor<double> random_basis(std::int64_t d, std::int64_t r, std::uint64_t seed) {
  host_tensor<double> g(shape{d, r}), q(shape{d, r});
  fill_normal(exec::host{}, g.v(), seed, 0, 0.0f, 1.0f);
  orthonormalize(exec::host{1}, view<const double, host_space>(g.v()), q.v());
  return q;
}

/// The same tables (per layer) and ψ values (bf16-representable) for every copy of the model, compression on.
template <class Model, class Exec>
void compress_for_test(Model& model, const compress::kv_subspace_options& o, std::uint64_t seed, const Exec& ex) {
  for (std::int64_t l = 0; l < model.config().n_layers; ++l) {
    auto& codec = model.block(l).attention.codec();
    if (!codec.is_final()) {
      codec.set_tables(
          compress::kv_tables::from_basis(random_basis(o.kv_dim, o.k_rank(), seed + 10 * std::uint64_t(l)).v(),
                                          o.generators, o.generator_seed, l, compress::kv_part::key),
          compress::kv_tables::from_basis(random_basis(o.kv_dim, o.v_rank(), seed + 10 * std::uint64_t(l) + 1).v(),
                                          o.generators, o.generator_seed, l, compress::kv_part::value));
      for (const auto part : {compress::kv_part::key, compress::kv_part::value})
        for (const bool bias : {false, true}) {
          auto x = model.parameters().value(codec.psi_index(part, bias));
          host_tensor<float> r(x.shape());
          fill_normal(exec::host{}, r.v(), seed + 100 + std::uint64_t(l), bias ? 1 : 0, 0.0f, 0.05f);
          host_tensor<bf16> rb(x.shape());
          cast(exec::host{}, view<const float, host_space>(r.v()), rb.v());
          if constexpr (std::is_same_v<Exec, exec::host>) cast(exec::host{}, view<const bf16, host_space>(rb.v()), x);
          else copy(ex, view<const bf16, host_space>(rb.v()), x);
        }
    }
    codec.begin_step(o.warmup_steps + 1);
  }
}

}  // namespace

TEST_CASE("context parallel (CUDA): Mixture of Subspaces over 2 ranks on one GPU matches the compressed host model") {
  using comm_t = comm::local;
  using blocks_t = context::blocks<comm_t, compress::kv_subspace_mixture>;
  const nn::llama_config cfg = testing::gpu_check_config("context-mos-gpu-check");
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  compress::kv_subspace_options o;
  o.layers = cfg.n_layers;
  o.kv_dim = cfg.kv_dim();
  o.rank_k = 4;
  o.rank_v = 6;
  o.generators = 2;
  o.warmup_steps = 1;
  o.pca_steps = 1;
  const int d = 2;
  const std::int64_t batch = 2, seq = 64;
  const context::layout lay(seq, d, context::placement::zigzag);
  host_tensor<std::int32_t> tokens(shape{batch, seq}), targets(shape{batch, seq});
  for (std::int64_t i = 0; i < tokens.numel(); ++i) {
    const auto r = rng::bits4(seed, 5, std::uint64_t(i));
    tokens.data()[i] = std::int32_t(r.v[0] % 256u);
    targets.data()[i] = std::int32_t(r.v[1] % 256u);
  }

  std::vector<cudaStream_t> streams(d);
  for (auto& s : streams) cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(120);
  lo.streams.assign(streams.begin(), streams.end());
  auto world = comm::local::world(d, lo);
  named device;
  double device_loss = 0;
  std::mutex mu;
  std::vector<std::string> errors(d);
  run_concurrently(d, [&](int r) {
    try {
      cuda_check(cudaSetDevice(0));
      const exec::cuda ex{streams[std::size_t(r)]};
      blocks_t blocks(context::exchange::ring, compress::kv_subspace_mixture(o));
      nn::llama<exec::cuda, bf16, blocks_t> model(cfg, ex, nn::llama_stage{}, nullptr, blocks);
      blocks.connect(world[std::size_t(r)], lay);
      model.set_positions(lay.positions(r));
      model.init(seed);
      compress_for_test(model, o, seed, ex);
      model.zero_grad();
      host_tensor<std::int32_t> tok(shape{batch, lay.rows_per_rank()}), tgt(tok.shape());
      lay.take<std::int32_t>(r, tokens.v(), tok.v());
      lay.take<std::int32_t>(r, targets.v(), tgt.v());
      const double loss = model.forward(tok.v(), tgt.v());
      model.backward();
      auto& store = model.parameters();
      std::lock_guard lock(mu);
      device_loss += loss / d;
      for (std::size_t i = 0; i < store.size(); ++i) {
        const auto v = to_host(ex, view<const bf16, device_space>(store.value(i)));
        const auto g = to_host(ex, view<const float, device_space>(store.grad(i)));
        host_tensor<double> hv(v.shape()), hg(g.shape());
        cast(exec::host{}, view<const bf16, host_space>(v.v()), hv.v());
        cast(exec::host{}, view<const float, host_space>(g.v()), hg.v());
        const std::string& name = store.info(i).name;
        device.values.insert_or_assign(name, std::move(hv));
        auto it = device.grads.find(name);
        if (it == device.grads.end()) {
          scale(exec::host{}, 1.0f / float(d), hg.v());
          device.grads.emplace(name, std::move(hg));
        } else {
          axpy(exec::host{}, 1.0f / float(d), view<const double, host_space>(hg.v()), it->second.v());
        }
      }
    } catch (const std::exception& e) {
      errors[std::size_t(r)] = e.what();
    }
  });
  for (auto s : streams) cudaStreamDestroy(s);
  for (int r = 0; r < d; ++r) REQUIRE_MESSAGE(errors[std::size_t(r)].empty(), errors[std::size_t(r)]);

  // The compressed model on the host in double, one rank holding every chunk (the same chunks), the device's
  // weights, the same tables and ψ.
  auto one = comm::local::world(1);  // host memory: no streams
  blocks_t blocks(context::exchange::ring, compress::kv_subspace_mixture(o));
  nn::llama<exec::host, double, blocks_t> host(cfg, exec::host{1}, nn::llama_stage{}, nullptr, blocks);
  const context::layout whole(seq, 1, context::placement::contiguous, lay.chunk_rows());
  blocks.connect(one[0], whole);
  host.set_positions(whole.positions(0));
  auto& store = host.parameters();
  store.allocate(exec::host{});
  compress_for_test(host, o, seed, exec::host{});
  for (std::size_t i = 0; i < store.size(); ++i)
    copy(exec::host{}, view<const double, host_space>(device.values.at(store.info(i).name).v()), store.value(i));
  host.zero_grad();
  const double host_loss = host.forward(tokens.v(), targets.v());
  host.backward();
  CAPTURE(device_loss);
  CAPTURE(host_loss);
  CHECK(std::isfinite(device_loss));
  CHECK(std::abs(device_loss - host_loss) <= 1e-2 * host_loss);
  for (std::size_t i = 0; i < store.size(); ++i) {
    const std::string& name = store.info(i).name;
    CAPTURE(name);
    host_tensor<double> want(store.grad(i).shape());
    copy(exec::host{}, view<const double, host_space>(store.grad(i)), want.v());
    const double err = testing::rel_error(device.grads.at(name), want);
    MESSAGE(name << ": relative error " << err);
    CHECK(err < 5e-2);
  }
}

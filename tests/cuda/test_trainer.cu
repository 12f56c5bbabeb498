// train::trainer on CUDA (llama<exec::cuda, bf16>, fp32 masters and AdamW state on the device) against the host
// reference (llama<exec::host, float>) from the same initial weights on the same batches: the losses of a few
// steps, the master weights' updates, and a checkpoint written on the device resuming on the host.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <subspace/subspace.hpp>

#include "support/cuda.hpp"
#include "support/gpu_llama.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"

using namespace subspace;

namespace {

nn::llama_config config() { return testing::gpu_check_config("trainer-gpu-check"); }

/// Text-like bytes (a repeating pattern with Philox noise) in a shard, read in order (the same batches everywhere).
data::batch_loader loader(const testing::scratch_dir& dir, std::uint64_t seed) {
  const data::token_dataset tokens = testing::text_like_tokens(dir.path / "tokens_train_000000.bin", seed, 40'000);
  data::loader_options o;
  o.batch = 4;
  o.seq = 32;
  o.vocab = 256;
  return data::batch_loader(tokens, o);
}

/// Two micro-batches per step, AdamW.
subspace::stack<> two_microbatches() { return subspace::stack{.scheduler = schedule::gradient_accumulation{2}}; }

train::trainer_options options() {
  train::trainer_options o;
  o.clip = 1.0;
  o.schedule = {2e-3f, 2e-4f, 2, 6, optim::decay_kind::cosine};
  return o;
}

}  // namespace

TEST_CASE("train::trainer: CUDA (bf16, fp32 masters) follows the host reference over six steps") {
  testing::scratch_dir dir;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  train::trainer host(nn::llama<exec::host, float>(config(), exec::host{}), two_microbatches(), options());
  train::trainer device(nn::llama<exec::cuda, bf16>(config(), exec::cuda{}), two_microbatches(), options());
  host.init(seed);
  device.init(seed);
  CHECK(device.master_bytes() > 0);
  CHECK(host.master_bytes() == 0);

  // The initial masters, as the device's checkpoint holds them.
  const testing::scratch_dir ckpt;
  auto host_data = loader(dir, seed), device_data = loader(dir, seed);
  device.save(ckpt.path / "init", device_data.position(), seed);
  const auto initial = io::safetensors_file(ckpt.path / "init" / io::model_file_name);

  for (int s = 0; s < 6; ++s) {
    const auto h = host.step(host_data);
    const auto d = device.step(device_data);
    CAPTURE(s);
    CHECK(std::abs(d.loss - h.loss) <= 2e-2 * std::abs(h.loss));
    CHECK(std::abs(d.grad_norm - h.grad_norm) <= 5e-2 * h.grad_norm);
    CHECK(d.lr == h.lr);
    CHECK(d.tokens == h.tokens);
  }

  // The masters' updates (final minus initial) agree to bf16 accuracy: the device's checkpoint holds its fp32
  // masters; the host's are its model values.
  device.save(ckpt.path / "final", device_data.position(), seed);
  const auto final_file = io::safetensors_file(ckpt.path / "final" / io::model_file_name);
  double num = 0, den = 0;
  host.model().parameters().for_each([&](const std::string& name, auto value, auto, const parameter_info&) {
    const host_tensor<float> a = initial.read<float>(name), b = final_file.read<float>(name);
    REQUIRE(a.numel() == value.numel());
    for (std::int64_t k = 0; k < value.numel(); ++k) {
      const double dh = double(value.data()[k]) - double(a.data()[k]), dd = double(b.data()[k]) - double(a.data()[k]);
      REQUIRE(std::isfinite(dd));
      num += (dd - dh) * (dd - dh);
      den += dh * dh;
    }
  });
  CAPTURE(num);
  CAPTURE(den);
  CHECK(den > 0);
  CHECK(std::sqrt(num / den) < 0.25);

  // The device checkpoint resumes on the host: the same step count, and its next loss close to the device's.
  train::trainer resumed(nn::llama<exec::host, float>(config(), exec::host{}), two_microbatches(), options());
  auto resumed_data = loader(dir, seed);
  CHECK(resumed.resume(ckpt.path / "final", resumed_data).step == 6);
  CHECK(resumed_data.position() == device_data.position());
  const double next_host = resumed.evaluate(resumed_data, 2), next_device = device.evaluate(device_data, 2);
  CHECK(std::abs(next_host - next_device) <= 2e-2 * next_host);
}

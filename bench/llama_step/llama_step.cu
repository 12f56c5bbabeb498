// bench_llama_step: one full training step of our Llama on CUDA — forward, backward, global gradient-norm clipping
// and AdamW on the fp32 masters writing the bf16 working copy — through train::trainer<nn::llama<exec::cuda, bf16>,
// optim::adamw>, i.e. exactly the step examples/train_llama runs.
//
//   bench_llama_step [--configs 124m,1b,2b] [--steps N] [--warmup N] [--peak-tflops X] [--out FILE.json]
//                    [--commit SHA]
//
// Configs (issue 4's numbers; the model sizes are nn::presets): 124m at batch 16 x T 1024, 1b at 8 x 2048, 2b at
// 8 x 1024. The tokens are uniform random ids below the vocabulary, written to a temporary llm.c shard with exactly
// enough windows for the warm-up and timed steps (no wrap-around) and read back by a data::batch_loader, so each
// step pays the loader and the host-to-device token copies as a training run does.
//
// After --warmup untimed steps, --steps steps are timed with CUDA events on the executor's stream (one after each
// step, no extra synchronisation between steps); tokens/s is B·T over the mean step time, model TFLOP/s uses
// FLOP/token = llama_config::flops_per_token(T) = 6 N_non-embedding (LM head included) + 12 L d T, and MFU is that
// over --peak-tflops. Peak memory is the device memory in use after the timed steps minus the memory in use before
// the model was created (cudaMemGetInfo, the stream-ordered pool trimmed both times), plus the high-water mark of
// the stream-ordered pool (the per-step scratch of the loss, attention and reductions). The final loss on random
// tokens is about ln(vocab) ≈ 10.83; a non-finite loss (or a skipped update) fails the config.
//
// A config that throws (out of memory above all) is recorded as {"config", "error"} and the next one runs; the
// exit status is then non-zero.
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include <subspace/core/rng.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/data/tokens.hpp>
#include <subspace/kernels/gemm.hpp>
#include <subspace/nn/config.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/optim/adamw.hpp>
#include <subspace/optim/schedule.hpp>
#include <subspace/train/trainer.hpp>

#include "common/bench.hpp"

using namespace subspace;
namespace fs = std::filesystem;

namespace {

using model_t = nn::llama<exec::cuda, bf16>;
using trainer_t = train::trainer<model_t, subspace::stack<>>;

/// A benchmark configuration: a model preset and the batch geometry of issue 4.
struct bench_config {
  std::string name;
  std::int64_t batch = 0, seq = 0;
};

const std::vector<bench_config>& known_configs() {
  static const std::vector<bench_config> all{{"124m", 16, 1024}, {"1b", 8, 2048}, {"2b", 8, 1024}};
  return all;
}

// The step's hyperparameters: those of bench/llama_step/torch_reference.py (AdamW's defaults are 0.9 / 0.95 /
// 1e-8 / weight decay 0.1 on the matrices).
constexpr float learning_rate = 3e-4f;  // constant
constexpr double clip_norm = 1.0;
constexpr std::uint64_t seed = 1234;  // the weights' and the tokens' Philox streams

struct options {
  std::vector<bench_config> configs = known_configs();
  int steps = 10;
  int warmup = 3;
  double peak_tflops = 989.4;  // H100 SXM, bf16 dense
  std::string out;
  std::string commit = "unknown";
};

/// Device memory of one config, in bytes.
struct memory_report {
  std::size_t resident = 0;            // in use after the timed steps minus before the model (pool trimmed)
  std::size_t pool_reserved_high = 0;  // stream-ordered pool: high-water mark of its reserved memory
  std::size_t pool_used_high = 0;      // ... and of the memory handed out from it
  std::size_t weights = 0, grads = 0, masters = 0, optimizer_state = 0, activations = 0;
  std::size_t peak() const { return resident + pool_reserved_high; }
};

struct result {
  bench_config c;
  std::string error;  // empty: measured and sane
  bool out_of_memory = false;
  bool measured = false;  // the timings and memory below are valid
  std::int64_t parameters = 0, non_embedding_parameters = 0;
  double flop_per_token = 0, ln_vocab = 0;
  double step_ms = 0, step_ms_median = 0, step_ms_min = 0, step_ms_max = 0, wall_step_ms = 0;
  double tok_per_s = 0, model_tflops = 0, mfu = 0;
  double first_loss = 0, final_loss = 0, final_grad_norm = 0;
  memory_report mem;
};

std::vector<bench_config> parse_configs(const std::string& list) {
  std::vector<bench_config> out;
  for (const std::string& item : bench::split_list("configs", list)) {
    const auto& all = known_configs();
    const auto it = std::find_if(all.begin(), all.end(), [&](const bench_config& c) { return c.name == item; });
    if (it == all.end()) throw bench::cli_error("--configs: unknown config '" + item + "' (known: 124m, 1b, 2b)");
    out.push_back(*it);
  }
  return out;
}

double gib(std::size_t bytes) { return double(bytes) / double(std::size_t(1) << 30); }

bool is_out_of_memory(const std::string& what) {
  return what.find("cudaErrorMemoryAllocation") != std::string::npos ||
         what.find("CUBLAS_STATUS_ALLOC_FAILED") != std::string::npos;
}

// ---- Device memory ----------------------------------------------------------------------------------------------

/// The current device's stream-ordered pool (what cudaMallocAsync draws from: the kernels' per-step scratch).
cudaMemPool_t device_pool() {
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  cudaMemPool_t pool = nullptr;
  cuda_check(cudaDeviceGetMemPool(&pool, device));
  return pool;
}

std::size_t pool_attribute(cudaMemPool_t pool, cudaMemPoolAttr attr) {
  std::uint64_t value = 0;  // cuuint64_t
  cuda_check(cudaMemPoolGetAttribute(pool, attr, &value));
  return std::size_t(value);
}

/// Restarts the pool's high-water marks from its current use.
void reset_pool_high_water(cudaMemPool_t pool) {
  std::uint64_t zero = 0;
  cuda_check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero));
  cuda_check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero));
}

/// Device memory in use (total - free) once every stream is idle and the pool has handed back what it holds.
std::size_t device_bytes_in_use(cudaMemPool_t pool) {
  cuda_check(cudaDeviceSynchronize());
  cuda_check(cudaMemPoolTrimTo(pool, 0));
  std::size_t free = 0, total = 0;
  cuda_check(cudaMemGetInfo(&free, &total));
  return total - free;
}

/// Creates what every config shares and keeps for the life of the process — the CUDA context, the cuBLASLt handle
/// and the GEMM workspace of the stream — so that it is in each config's baseline, not in the first config's use.
void create_process_state(const exec::cuda& ex) {
  device_tensor<bf16> a({16, 16}), b({16, 16}), c({16, 16});
  fill(ex, a.v(), bf16(0.0f));
  fill(ex, b.v(), bf16(0.0f));
  gemm(ex, op::none, op::none, 1.0f, a.v(), b.v(), 0.0f, c.v());
  ex.synchronize();
}

// ---- Data -------------------------------------------------------------------------------------------------------

/// CUDA events, destroyed with the list (also when a step throws).
class event_list {
 public:
  explicit event_list(std::size_t n) : events_(n, nullptr) {
    for (auto& e : events_) cuda_check(cudaEventCreate(&e));
  }
  ~event_list() {
    for (auto e : events_)
      if (e) cudaEventDestroy(e);
  }
  event_list(const event_list&) = delete;
  event_list& operator=(const event_list&) = delete;
  cudaEvent_t operator[](std::size_t i) const { return events_[i]; }
  /// Milliseconds between events i and j (both completed).
  double ms(std::size_t i, std::size_t j) const {
    float t = 0;
    cuda_check(cudaEventElapsedTime(&t, events_[i], events_[j]));
    return double(t);
  }

 private:
  std::vector<cudaEvent_t> events_;
};

// ---- One config -------------------------------------------------------------------------------------------------

result run_config(const options& o, const bench_config& c, cudaMemPool_t pool) {
  result r;
  r.c = c;
  nn::llama_config cfg = nn::presets::by_name(c.name);
  cfg.max_seq = std::max(cfg.max_seq, c.seq);  // the presets already cover the issue's T
  r.parameters = cfg.parameters();
  r.non_embedding_parameters = cfg.non_embedding_parameters();
  r.flop_per_token = cfg.flops_per_token(c.seq);
  r.ln_vocab = std::log(double(cfg.vocab));

  // Exactly warm-up + timed batches of windows: the loader never wraps to a second epoch.
  const std::int64_t total_steps = std::int64_t(o.warmup) + o.steps;
  const auto windows = std::uint64_t(total_steps * c.batch);
  const bench::random_shard shard("llama_step." + c.name, windows * std::uint64_t(c.seq) + 1, cfg.vocab, seed);
  data::batch_loader loader(data::token_dataset(std::vector<fs::path>{shard.path()}),
                            data::loader_options{c.batch, c.seq, cfg.vocab, false, seed, true, "bench"});
  require(loader.batches_per_epoch() >= std::uint64_t(total_steps), [&] {
    return "bench_llama_step: the random shard holds " + std::to_string(loader.batches_per_epoch()) +
           " batches, the run needs " + std::to_string(total_steps);
  });

  const std::size_t before = device_bytes_in_use(pool);
  reset_pool_high_water(pool);

  const exec::cuda ex{};  // the legacy default stream, as examples/train_llama
  train::trainer_options to;
  to.clip = clip_norm;
  to.schedule = optim::lr_schedule{learning_rate, learning_rate, 0, total_steps, optim::decay_kind::constant};
  trainer_t t(model_t(cfg, ex), subspace::stack<>{}, to);
  t.init(seed);

  const auto check = [&](const train::step_result& s) {
    if (s.skipped && r.error.empty())
      r.error = "step " + std::to_string(s.step) + ": gradient norm " + std::to_string(s.grad_norm) +
                " is not finite (the update was skipped)";
  };
  for (int i = 0; i < o.warmup; ++i) {
    const train::step_result s = t.step(loader);
    if (i == 0) r.first_loss = s.loss;
    check(s);
  }
  ex.synchronize();

  // One event before the first timed step and one after each; the step itself synchronises when it reads the loss
  // and the gradient norm, and the optimizer's kernels of the last step finish before the last event.
  event_list events(std::size_t(o.steps) + 1);
  train::step_result last;
  const auto wall0 = std::chrono::steady_clock::now();
  cuda_check(cudaEventRecord(events[0], ex.stream));
  for (int i = 0; i < o.steps; ++i) {
    last = t.step(loader);
    cuda_check(cudaEventRecord(events[std::size_t(i) + 1], ex.stream));
    if (o.warmup == 0 && i == 0) r.first_loss = last.loss;
    check(last);
  }
  cuda_check(cudaEventSynchronize(events[std::size_t(o.steps)]));
  const double wall_s = bench::seconds_since(wall0);

  std::vector<double> step_ms;
  for (std::size_t i = 0; i < std::size_t(o.steps); ++i) step_ms.push_back(events.ms(i, i + 1));
  r.step_ms = events.ms(0, std::size_t(o.steps)) / double(o.steps);
  r.step_ms_median = bench::median(step_ms);
  r.step_ms_min = *std::min_element(step_ms.begin(), step_ms.end());
  r.step_ms_max = *std::max_element(step_ms.begin(), step_ms.end());
  r.wall_step_ms = 1e3 * wall_s / double(o.steps);
  r.tok_per_s = double(c.batch * c.seq) / (r.step_ms * 1e-3);
  r.model_tflops = r.tok_per_s * r.flop_per_token / 1e12;
  r.mfu = r.model_tflops / o.peak_tflops;
  r.final_loss = last.loss;
  r.final_grad_norm = last.grad_norm;

  // The pool's high-water marks first: measuring the resident memory trims the pool.
  r.mem.pool_reserved_high = pool_attribute(pool, cudaMemPoolAttrReservedMemHigh);
  r.mem.pool_used_high = pool_attribute(pool, cudaMemPoolAttrUsedMemHigh);
  const std::size_t after = device_bytes_in_use(pool);
  r.mem.resident = after > before ? after - before : 0;
  const auto n = std::size_t(t.model().parameter_count());
  r.mem.weights = n * sizeof(bf16);
  r.mem.grads = n * sizeof(model_t::grad_type);
  r.mem.masters = t.master_bytes();
  r.mem.optimizer_state = t.optimizer_state_bytes();
  r.mem.activations = t.model().activation_bytes();
  r.measured = true;

  if (!std::isfinite(r.final_loss) && r.error.empty())
    r.error = "final loss " + std::to_string(r.final_loss) +
              " is not finite (expected about ln(vocab) = " + std::to_string(r.ln_vocab) + " on random tokens)";
  return r;
}

// ---- Output -----------------------------------------------------------------------------------------------------

void print_result(std::size_t i, std::size_t n, const result& r) {
  std::printf("[%zu/%zu] %-4s B %lld x T %lld: ", i + 1, n, r.c.name.c_str(), (long long)r.c.batch, (long long)r.c.seq);
  if (!r.measured) {
    std::printf("%s: %s\n", r.out_of_memory ? "OUT OF MEMORY" : "FAILED", r.error.c_str());
    std::fflush(stdout);
    return;
  }
  std::printf("%.2f ms/step (median %.2f, min %.2f, max %.2f; wall %.2f), %.1fk tok/s, %.1f TFLOP/s, MFU %.1f%%\n",
              r.step_ms, r.step_ms_median, r.step_ms_min, r.step_ms_max, r.wall_step_ms, r.tok_per_s / 1e3,
              r.model_tflops, 100.0 * r.mfu);
  const memory_report& m = r.mem;
  std::printf(
      "         memory: peak %.2f GiB = resident %.2f + step scratch %.2f (pool used high %.2f); "
      "weights %.2f, grads %.2f, masters %.2f, AdamW state %.2f, activations %.2f GiB\n",
      gib(m.peak()), gib(m.resident), gib(m.pool_reserved_high), gib(m.pool_used_high), gib(m.weights), gib(m.grads),
      gib(m.masters), gib(m.optimizer_state), gib(m.activations));
  std::printf("         loss: first %.4f, final %.4f (ln vocab %.4f), final grad norm %.4f\n", r.first_loss,
              r.final_loss, r.ln_vocab, r.final_grad_norm);
  if (!r.error.empty()) std::printf("         FAILED: %s\n", r.error.c_str());
  std::fflush(stdout);
}

io::json result_json(const result& r) {
  io::json j = io::json::object({{"config", r.c.name}, {"mode", "subspace"}, {"batch", r.c.batch}, {"seq", r.c.seq}});
  if (!r.error.empty()) {
    j.set("error", r.error);
    j.set("out_of_memory", r.out_of_memory);
  }
  if (!r.measured) return j;
  const memory_report& m = r.mem;
  j.set("tokens_per_step", r.c.batch * r.c.seq);
  j.set("parameters", r.parameters);
  j.set("non_embedding_parameters", r.non_embedding_parameters);
  j.set("flop_per_token", r.flop_per_token);
  j.set("step_ms", r.step_ms);
  j.set("step_ms_median", r.step_ms_median);
  j.set("step_ms_min", r.step_ms_min);
  j.set("step_ms_max", r.step_ms_max);
  j.set("wall_step_ms", r.wall_step_ms);
  j.set("tok_per_s", r.tok_per_s);
  j.set("model_tflops", r.model_tflops);
  j.set("mfu", r.mfu);
  j.set("peak_mem_gib", gib(m.peak()));
  j.set("memory_bytes", io::json::object({{"peak", m.peak()},
                                          {"resident", m.resident},
                                          {"pool_reserved_high", m.pool_reserved_high},
                                          {"pool_used_high", m.pool_used_high},
                                          {"weights", m.weights},
                                          {"grads", m.grads},
                                          {"masters", m.masters},
                                          {"optimizer_state", m.optimizer_state},
                                          {"activations", m.activations}}));
  j.set("first_loss", r.first_loss);
  j.set("final_loss", r.final_loss);
  j.set("ln_vocab", r.ln_vocab);
  j.set("final_grad_norm", r.final_grad_norm);
  return j;
}

void write_json(const options& o, const std::string& device, const std::vector<result>& results) {
  const optim::adamw adamw{};
  io::json names = io::json::array();
  for (const auto& c : o.configs) names.push_back(c.name);
  io::json out = io::json::array();
  for (const auto& r : results) out.push_back(result_json(r));
  io::json doc = bench::document("llama_step", device, o.commit);
  doc.set("config",
          io::json::object({{"steps", o.steps},
                            {"warmup", o.warmup},
                            {"peak_tflops", o.peak_tflops},
                            {"model",
                             "nn::llama<exec::cuda, bf16> through train::trainer: bf16 weights and activations, fp32 "
                             "gradients, fp32 masters and AdamW state"},
                            {"optimizer", io::json::object({{"name", "adamw"},
                                                            {"beta1", adamw.beta1},
                                                            {"beta2", adamw.beta2},
                                                            {"eps", adamw.eps},
                                                            {"weight_decay", adamw.weight_decay},
                                                            {"lr", learning_rate},
                                                            {"schedule", "constant"},
                                                            {"clip", clip_norm},
                                                            {"accumulation", 1}})},
                            {"data",
                             "uniform random token ids below vocab, a temporary llm.c shard read by data::batch_loader "
                             "(sequential, no wrap-around)"},
                            {"flop_per_token", "6 N_non_embedding (LM head included) + 12 L d T"},
                            {"timing",
                             "CUDA events on the executor's stream around each timed step after the warm-up; step_ms "
                             "is the mean (tok_per_s uses it)"},
                            {"peak_memory",
                             "device memory in use after the timed steps minus before the model (cudaMemGetInfo, "
                             "stream-ordered pool trimmed) + the pool's reserved-memory high-water mark (per-step "
                             "scratch)"},
                            {"configs", names}}));
  doc.set("results", out);
  bench::write_document(o.out, doc);
}

int run(int argc, char** argv) {
  options o;
  std::string configs = "124m,1b,2b";
  bench::cli cli("bench_llama_step",
                 "one training step of nn::llama<exec::cuda, bf16> through train::trainer with AdamW\n(forward, "
                 "backward, clipping, update of the fp32 masters and the bf16 copy) on random tokens");
  cli.flag("configs", configs, "comma-separated, from 124m (batch 16, T 1024), 1b (8, 2048), 2b (8, 1024)")
      .flag("steps", o.steps, "timed steps per config")
      .flag("warmup", o.warmup, "untimed steps first (0 allowed)")
      .flag("peak-tflops", o.peak_tflops, "the device's peak bf16 dense TFLOP/s for MFU (H100 SXM by default)");
  bench::output_flags(cli, o.out, o.commit);
  if (!cli.parse(argc, argv)) return 0;
  bench::check_range("steps", o.steps, 1, 100000);
  bench::check_range("warmup", o.warmup, 0, 100000);
  bench::check_positive("peak-tflops", o.peak_tflops);
  o.configs = parse_configs(configs);

  int devices = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&devices); e != cudaSuccess || devices == 0)
    throw std::runtime_error(std::string("no CUDA device (") +
                             (e != cudaSuccess ? cudaGetErrorString(e) : "none found") + ")");
  const cudaDeviceProp prop = bench::device_properties();
  std::printf(
      "bench_llama_step on %s (sm_%d%d): %d timed steps after %d warm-up steps, AdamW lr %g, clip %g, "
      "MFU against %.1f TFLOP/s\n",
      prop.name, prop.major, prop.minor, o.steps, o.warmup, double(learning_rate), clip_norm, o.peak_tflops);
  std::fflush(stdout);

  create_process_state(exec::cuda{});
  const cudaMemPool_t pool = device_pool();
  std::vector<result> results;
  bool failed = false;
  for (std::size_t i = 0; i < o.configs.size(); ++i) {
    result r;
    try {
      r = run_config(o, o.configs[i], pool);
    } catch (const std::exception& e) {  // subspace::error (cuda_error: out of memory above all), std::bad_alloc
      r = result{};
      r.c = o.configs[i];
      r.error = e.what();
      r.out_of_memory = is_out_of_memory(r.error) || dynamic_cast<const std::bad_alloc*>(&e) != nullptr;
      (void)cudaGetLastError();  // an allocation failure is not sticky: clear it for the next config
    }
    failed = failed || !r.error.empty();
    print_result(i, o.configs.size(), r);
    results.push_back(std::move(r));
  }

  std::printf("\n%-6s %-11s %10s %11s %9s %7s %10s %10s\n", "config", "B x T", "ms/step", "tok/s", "TFLOP/s", "MFU",
              "peak GiB", "loss");
  for (const result& r : results) {
    const std::string shape = std::to_string(r.c.batch) + " x " + std::to_string(r.c.seq);
    if (r.measured)
      std::printf("%-6s %-11s %10.2f %10.1fk %9.1f %6.1f%% %10.2f %10.4f%s\n", r.c.name.c_str(), shape.c_str(),
                  r.step_ms, r.tok_per_s / 1e3, r.model_tflops, 100.0 * r.mfu, gib(r.mem.peak()), r.final_loss,
                  r.error.empty() ? "" : "  FAILED");
    else
      std::printf("%-6s %-11s %s\n", r.c.name.c_str(), shape.c_str(),
                  r.out_of_memory ? "out of memory" : "failed (see above)");
  }
  if (!o.out.empty()) write_json(o, prop.name, results);
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::guarded_main("bench_llama_step", [&] { return run(argc, argv); });
}

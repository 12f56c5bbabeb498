// train_ssm: trains the selective state-space language model (adjoint::selective_ssm, docs/ssm.md) on the host
// (fp32) or a CUDA GPU (bf16 weights and activations, fp32 masters), with the gradient engine chosen by --engine:
//
//   exact    the exact adjoint (default): one reverse scan per layer, the maps' gradients as GEMMs; equals bptt
//   bptt     the reference: token-by-token forward and backward over every stored intermediate
//   sharded  the paper's adjoint sharding: every layer driven by the head's cotangent alone (--window T̄ truncates)
//
// --ranks R shards the layers over R ranks — threads of this process (comm::local), or with --launcher nccl one
// process per GPU (comm::nccl; torchrun or mpirun sets the ranks) — and trains them with the pipeline trainer: the
// exact engine hands δ down from rank to rank, the sharded one hands g down unchanged and each rank computes its
// layers' gradients on its own. Data, schedule, checkpoints (--checkpoint-dir, --resume), metrics JSONL and the
// progress line follow train_llama; the progress line adds the activation memory, measured beside the engine's formula.
// Samples at the end (--ranks 1).
//
// --max-context (CUDA) trains nothing: it finds the longest sequence (batch 1) one forward and backward of the
// chosen engine fits in the GPU's memory at this model size, doubling from 4096 tokens and then bisecting.
//
// This file compiles as C++ (host only) or, in a CUDA build, as CUDA (host and --device cuda).
#include <adjoint/adjoint.hpp>
#include <subspace/pipeline/one_f_one_b.hpp>
#include <subspace/pipeline/pipeline_trainer.hpp>
#include <subspace/pipeline/zero_bubble.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "common/checkpoints.hpp"
#include "common/cli.hpp"
#include "common/device.hpp"
#include "common/flag_checks.hpp"
#include "common/format.hpp"
#include "common/llama_data.hpp"
#include "common/ranks.hpp"

namespace {

using namespace subspace;
namespace fs = std::filesystem;
using examples::human;

struct options : examples::data_flags {
  std::string preset = "tiny";
  std::int64_t d_model = 0, state = 0, layers = 0, vocab = 0;
  std::string engine = "exact";
  std::int64_t window = 0;
  bool recompute_c = false;
  int ranks = 1;
  std::int64_t seq = 256, batch = 8, steps = 200, stop_at = 0, warmup = 20;
  int accumulation = 1;  // an int, as the scheduler takes it: a larger value fails at parsing
  float lr = 3e-3f, min_lr = -1.0f, weight_decay = 0.1f, clip = 1.0f;
  std::string decay = "cosine";
  std::int64_t eval_every = 50, eval_batches = 10, checkpoint_every = 0, keep_checkpoints = 2, log_every = 1;
  std::string checkpoint_dir, resume, metrics;
  std::int64_t samples = 2, sample_tokens = 200;
  std::string prompt = "And God said";
  float temperature = 0.8f;
  std::string device = "auto", launcher = "local";
  double comm_timeout = 300;
  bool max_context = false;
  std::int64_t max_context_limit = std::int64_t(1) << 24;
  int threads = 0;
  std::uint64_t seed = 1;
};

adjoint::ssm_config model_config(const options& o) {
  adjoint::ssm_config c = adjoint::presets::by_name(o.preset);
  if (o.d_model) c.d_model = o.d_model;
  if (o.state) c.state = o.state;
  if (o.layers) c.layers = o.layers;
  if (o.vocab) c.vocab = o.vocab;
  c.validate();
  return c;
}

/// The step loop shared by one device and every rank of a sharded run; `lead` prints and writes the metrics.
template <class Trainer, class Model>
int train_loop(Trainer& t, Model& model, const options& o, data::batch_loader& train,
               std::optional<data::batch_loader>& val, bool lead, double formula_bytes) {
  if (!o.resume.empty()) {
    const fs::path from = examples::resolve_resume(o.resume);
    const io::trainer_state ts = t.resume(from, train);
    if (lead) std::printf("resumed from %s at step %lld\n", from.c_str(), (long long)ts.step);
    // The schedule follows --steps: only the saving run's --steps continues its learning-rate curve exactly.
    if (const io::json* planned = ts.extra.find("steps");
        lead && planned && planned->is_int() && planned->as_int() != o.steps)
      std::printf(
          "note: not an exact continuation: the learning-rate schedule is re-planned to end at step %lld "
          "(the checkpoint's run planned %lld; --steps %lld continues it exactly)\n",
          (long long)o.steps, (long long)planned->as_int(), (long long)planned->as_int());
  } else {
    t.init(o.seed);
  }
  const std::int64_t first = t.steps_done() + 1, last = o.stop_at > 0 ? std::min(o.stop_at, o.steps) : o.steps;
  if (first > last)
    throw examples::cli_error("--steps " + std::to_string(o.steps) + ": the checkpoint is already at step " +
                              std::to_string(first - 1));
  std::optional<io::metrics_writer> metrics;
  if (lead && !o.metrics.empty()) {
    // The interrupted run may have logged steps after the checkpoint (and torn its last line): they come again.
    if (!o.resume.empty()) io::truncate_metrics_after(o.metrics, t.steps_done());
    metrics.emplace(o.metrics,
                    o.resume.empty() ? io::metrics_writer::open_mode::truncate : io::metrics_writer::open_mode::append);
  }
  const auto save = [&](std::int64_t step) {
    const fs::path dir = fs::path(o.checkpoint_dir) / examples::checkpoint_name(step);
    t.save(dir, train.position(), o.seed,
           io::json::object({{"engine", io::json(o.engine)}, {"steps", io::json(o.steps)}}));
    if (!lead) return;
    examples::keep_newest_checkpoints(o.checkpoint_dir, o.keep_checkpoints);
    std::printf("saved checkpoint %s\n", dir.c_str());
  };
  const auto start = std::chrono::steady_clock::now();
  const auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  double last_val = NAN, timed = 0;
  std::int64_t timed_tokens = 0;
  for (std::int64_t step = first; step <= last; ++step) {
    const double t0 = seconds();
    const train::step_result r = t.step(train);
    const double dt = seconds() - t0;
    if (!std::isfinite(r.loss) || r.skipped) {
      if (lead)
        std::fprintf(stderr, "train_ssm: step %lld: loss %g, gradient norm %g — training diverged (lower --lr)\n",
                     (long long)step, r.loss, r.grad_norm);
      return 1;
    }
    if (step > first || last == first) {
      timed += dt;
      timed_tokens += r.tokens;
    }
    const double tok_s = timed_tokens > 0 ? double(timed_tokens) / timed : double(r.tokens) / dt;
    std::optional<double> v;
    if (val && (step % o.eval_every == 0 || step == last)) v = last_val = t.evaluate(*val, o.eval_batches);
    if (lead && (step % o.log_every == 0 || step == first || step == last || v)) {
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "step %lld/%lld | loss %.4f | lr %.2e | norm %.3f | %s tok/s | act %sB (formula %sB)",
                    (long long)step, (long long)o.steps, r.loss, double(r.lr), r.grad_norm, human(tok_s).c_str(),
                    human(double(model.activation_bytes())).c_str(), human(formula_bytes).c_str());
      std::string line = buf;
      if (v) {
        std::snprintf(buf, sizeof buf, " | val %.4f", *v);
        line += buf;
      }
      std::printf("%s | ETA %s\n", line.c_str(),
                  examples::duration(double(last - step) * double(r.tokens) / tok_s).c_str());
      std::fflush(stdout);
    }
    if (metrics)
      metrics->write(io::metrics_record{step, r.loss, v, double(r.lr), t.tokens_done(), tok_s, seconds(), r.grad_norm},
                     {{"step_ms", 1e3 * dt}, {"activation_bytes", double(model.activation_bytes())}});
    if (!o.checkpoint_dir.empty() && o.checkpoint_every > 0 && step % o.checkpoint_every == 0 && step < last)
      save(step);
  }
  if (!o.checkpoint_dir.empty()) save(t.steps_done());
  if (lead)
    std::printf("done: %lld steps, %s tokens, %s; final val loss %.4f\n", (long long)t.steps_done(),
                human(double(t.tokens_done())).c_str(), examples::duration(seconds()).c_str(), last_val);
  return 0;
}

/// Whether one forward and backward of batch 1 and `seq` tokens fits (false when the device runs out of memory).
template <class Exec, class Engine>
bool fits(const Exec& ex, const adjoint::ssm_config& cfg, Engine engine, std::int64_t seq) {
  using T = std::conditional_t<std::is_same_v<Exec, exec::host>, float, bf16>;
  try {
    adjoint::selective_ssm<Exec, T, Engine> model(cfg, ex, engine);
    model.init(1);
    host_tensor<std::int32_t> tokens({1, seq});
    for (std::int64_t i = 0; i < seq; ++i) tokens.data()[i] = std::int32_t(i % cfg.vocab);
    model.forward(tokens.v(), tokens.v());
    model.backward();
    ex.synchronize();
    return true;
  } catch (const std::exception& e) {
    if (std::string(e.what()).find("out of memory") == std::string::npos) throw;
#if defined(__CUDACC__)
    cudaGetLastError();  // the failed allocation leaves the device usable
#endif
    return false;
  }
}

/// --max-context: doubling from 4096 tokens, then bisecting to within 1%.
template <class Exec, class Engine>
int probe(const Exec& ex, const options& o, Engine engine, const std::string& device_name) {
  const adjoint::ssm_config cfg = model_config(o);
  std::printf("model '%s': %s parameters (P %lld, N %lld, %lld layers) | engine %s | %s\n", cfg.name.c_str(),
              human(double(cfg.parameters())).c_str(), (long long)cfg.d_model, (long long)cfg.state,
              (long long)cfg.layers, o.engine.c_str(), device_name.c_str());
  std::int64_t good = 0, bad = 0;
  for (std::int64_t T = 4096; T <= o.max_context_limit; T *= 2) {
    const bool ok = fits(ex, cfg, engine, T);
    std::printf("  %lld tokens: %s\n", (long long)T, ok ? "fits" : "out of memory");
    std::fflush(stdout);
    if (!ok) {
      bad = T;
      break;
    }
    good = T;
  }
  while (bad > 0 && good > 0 && double(bad - good) > 0.01 * double(good)) {
    const std::int64_t mid = (good + bad) / 2;
    (fits(ex, cfg, engine, mid) ? good : bad) = mid;
  }
  if (bad == 0) std::printf("longest context: at least %lld tokens (the --max-context-limit)\n", (long long)good);
  else if (good == 0) std::printf("longest context: below 4096 tokens (4096 do not fit)\n");
  else
    std::printf("longest context: %lld tokens (activations %.1f GiB by the formula)\n", (long long)good,
                adjoint::activation_values(engine, good, cfg.layers, cfg.d_model, cfg.state) * 2 / 1073741824.0);
  return 0;
}

/// The run's banner: model, data, device and batch.
void print_header(const options& o, const adjoint::ssm_config& cfg, const examples::data_source& src,
                  const data::token_dataset& train_tokens, const data::token_dataset& val_tokens,
                  const std::string& device_name, bool nccl) {
  std::printf("model '%s': %s parameters (P %lld, N %lld, %lld layers, vocab %lld) | engine %s%s%s\n", cfg.name.c_str(),
              human(double(cfg.parameters())).c_str(), (long long)cfg.d_model, (long long)cfg.state,
              (long long)cfg.layers, (long long)cfg.vocab, o.engine.c_str(),
              o.window > 0 ? (", window " + std::to_string(o.window)).c_str() : "",
              o.recompute_c ? ", C recomputed" : "");
  std::printf("data: %s — %s train / %s val tokens\n", examples::describe_data(src, train_tokens, val_tokens).c_str(),
              human(double(train_tokens.tokens())).c_str(), human(double(val_tokens.tokens())).c_str());
  std::printf("%s, %d rank%s | batch %lld x %lld x %lld accumulation = %lld tokens/step | %lld steps\n",
              device_name.c_str(), o.ranks,
              o.ranks == 1 ? "" : (nccl ? "s (layers sharded, NCCL processes)" : "s (layers sharded, in-process)"),
              (long long)o.batch, (long long)o.seq, (long long)o.accumulation,
              (long long)(o.batch * o.seq * o.accumulation), (long long)o.steps);
  std::fflush(stdout);
}

/// This process's place in an NCCL launch (--launcher nccl), or nothing (the ranks are threads here).
#if defined(__CUDACC__)
using nccl_launch = examples::nccl_process;
#else
struct nccl_launch {};
#endif

int launch_rank([[maybe_unused]] nccl_launch* launch) {
#if defined(__CUDACC__)
  if (launch) return launch->info.rank;
#endif
  return 0;
}
void launch_barrier([[maybe_unused]] nccl_launch* launch) {
#if defined(__CUDACC__)
  if (launch) launch->stats.barrier().wait();
#endif
}

template <class Exec, class Engine>
int train_with(const Exec& ex, const options& o, Engine engine, const std::string& device_name,
               nccl_launch* launch = nullptr) {
  if (o.max_context) return probe(ex, o, engine, device_name);
  using T = std::conditional_t<std::is_same_v<Exec, exec::host>, float, bf16>;
  using model = adjoint::selective_ssm<Exec, T, Engine>;
  const adjoint::ssm_config cfg = model_config(o);
  // In an NCCL launch, rank 0 converts --text into the shard cache before the others read it.
  const bool lead_process = launch_rank(launch) == 0;
  if (!lead_process) launch_barrier(launch);
  if (lead_process) examples::clean_before_run(o.checkpoint_dir, o.resume);  // before any rank reads checkpoints
  const examples::data_source src = examples::choose_data(o, cfg.vocab);
  if (lead_process) launch_barrier(launch);
  if (o.ranks > cfg.layers)
    throw examples::cli_error("--ranks " + std::to_string(o.ranks) + ": the model has " + std::to_string(cfg.layers) +
                              " layers (at most one rank per layer)");
  auto [train_tokens, val_tokens] = examples::open_tokens(src, o.val_fraction);
  const data::loader_options lo{o.batch, o.seq, cfg.vocab, o.shuffle, o.seed, true, "train"};
  const auto loaders = [&] {
    std::pair<data::batch_loader, std::optional<data::batch_loader>> l{data::batch_loader(train_tokens, lo), {}};
    if (!val_tokens.empty()) {
      data::loader_options vo = lo;
      vo.shuffle = false;
      vo.name = "val";
      l.second.emplace(val_tokens, vo);
    }
    return l;
  };
  train::trainer_options to;
  to.clip = o.clip;
  to.schedule = {o.lr, o.min_lr >= 0 ? o.min_lr : o.lr / 10, std::min(o.warmup, o.steps), o.steps,
                 optim::parse_decay(o.decay)};
  optim::adamw adam;
  adam.weight_decay = o.weight_decay;
  const std::int64_t per_rank = (cfg.layers / o.ranks) + (cfg.layers % o.ranks);  // the last rank's share
  const double formula =
      adjoint::activation_values(engine, o.batch * o.seq, o.ranks > 1 ? per_rank : cfg.layers, cfg.d_model, cfg.state) *
      sizeof(T);

  if (lead_process) print_header(o, cfg, src, train_tokens, val_tokens, device_name, launch != nullptr);
  const auto rank_executor = [&](int ranks) {
    if constexpr (std::is_same_v<Exec, exec::host>) return exec::host{std::max(1, o.threads / ranks)};
    else return ex;  // in-process ranks share the GPU (and its stream: they take turns)
  };
  // One rank of the sharded model: its stage on the pipeline trainer over `world`.
  const auto run_rank = [&](auto& world, const auto& rank_ex) {
    const std::vector<adjoint::ssm_stage> stages = adjoint::ssm_stage::shard(cfg, o.ranks);
    auto [train_data, val_data] = loaders();
    std::vector<model> chunk;
    chunk.emplace_back(cfg, rank_ex, engine, stages[std::size_t(world.rank())]);
    pipeline::trainer_options po;
    static_cast<train::trainer_options&>(po) = to;
    // The sharded engine splits its backward: under the zero-bubble schedule each rank hands g on first, so every
    // rank works on its layers' gradients at once. The exact engine's backward is one chain, as in 1F1B.
    const auto scheduler = [&] {
      if constexpr (model::splits_backward) return pipeline::zero_bubble_h1{int(o.accumulation), o.ranks};
      else return pipeline::one_f_one_b{int(o.accumulation), o.ranks};
    }();
    pipeline::pipeline_trainer t(
        std::move(chunk),
        subspace::stack{
            .communicator = world, .compressor = compress::identity{}, .scheduler = scheduler, .optimizer = adam},
        po);
    return train_loop(t, t.chunks()[0], o, train_data, val_data, world.rank() == 0, formula);
  };
#if defined(__CUDACC__)
  if (launch != nullptr) {
    const int rc = run_rank(launch->world, ex);
    cuda_check(cudaStreamSynchronize(launch->stream));
    return rc;
  }
#endif
  if (o.ranks == 1) {
    auto [train_data, val_data] = loaders();
    train::trainer t(
        model(cfg, ex, engine),
        subspace::stack{.scheduler = schedule::gradient_accumulation{int(o.accumulation)}, .optimizer = adam}, to);
    if (const int rc = train_loop(t, t.model(), o, train_data, val_data, true, formula); rc != 0) return rc;
    if (o.samples > 0 && o.sample_tokens > 0 && src.decodes()) {
      const std::vector<std::int32_t> prompt = src.tokenizer.encode(o.prompt, "--prompt");
      for (std::int64_t i = 0; i < o.samples; ++i) {
        nn::sampling s;
        s.temperature = o.temperature;
        s.seed = o.seed + std::uint64_t(i);
        const std::vector<std::int32_t> out = nn::generate(t.model(), prompt, o.sample_tokens, s);
        std::printf("--- sample %lld ---\n%s%s\n", (long long)i + 1, o.prompt.c_str(),
                    src.tokenizer.printable(out).c_str());
      }
    }
    return 0;
  }
  // Layers sharded over in-process ranks: one stage each, the pipeline trainer hands the cotangent down.
  std::vector<int> codes(std::size_t(o.ranks), 0);
  comm::local::run_ranks(
      o.ranks, [&](comm::local& world) { codes[std::size_t(world.rank())] = run_rank(world, rank_executor(o.ranks)); });
  if (o.samples > 0) std::printf("(samples: run with --ranks 1)\n");
  for (const int c : codes)
    if (c != 0) return c;
  return 0;
}

void check(const options& o) {
  const auto need = [](bool ok, const std::string& what) {
    if (!ok) throw examples::cli_error(what);
  };
  need(o.steps >= 1, "--steps must be >= 1, got " + std::to_string(o.steps));
  need(o.stop_at >= 0, "--stop-at must be >= 0 (0: run to --steps)");
  need(o.seq >= 1, "--seq must be >= 1, got " + std::to_string(o.seq));
  need(o.batch >= 1 && o.accumulation >= 1, "--batch and --accumulation must be >= 1");
  need(o.warmup >= 0, "--warmup must be >= 0, got " + std::to_string(o.warmup));
  need(std::isfinite(o.lr) && o.lr > 0, "--lr must be a positive number");
  need(o.min_lr < 0 || o.min_lr <= o.lr, "--min-lr must not exceed --lr");
  need(o.window >= 0, "--window must be >= 0 (0: no truncation), got " + std::to_string(o.window));
  need(o.window == 0 || o.engine == "sharded", "--window truncates the sharded engine only (use --engine sharded)");
  need(!o.recompute_c || o.engine != "bptt", "--recompute-c applies to the exact and sharded engines (bptt stores C)");
  need(o.ranks >= 1, "--ranks must be >= 1, got " + std::to_string(o.ranks));
  need(o.ranks == 1 || o.engine != "bptt", "--ranks > 1 shards the exact or sharded engine (bptt runs on one rank)");
  need(o.eval_every >= 1 && o.eval_batches >= 1 && o.log_every >= 1,
       "--eval-every, --eval-batches and --log-every must be >= 1");
  need(o.checkpoint_every >= 0 && o.keep_checkpoints >= 0, "--checkpoint-every and --keep-checkpoints must be >= 0");
  need(o.val_fraction > 0 && o.val_fraction < 1, "--val-fraction must lie in (0, 1)");
  need(o.samples >= 0 && o.sample_tokens >= 0, "--samples and --sample-tokens must be >= 0");
  examples::need_sampling(o.temperature, o.prompt, o.samples, o.sample_tokens);
  examples::need_finite_non_negative("weight-decay", o.weight_decay);
  need(!std::isnan(o.clip), "--clip must be a number (<= 0: off)");
  need(o.val_data.empty() || !o.data.empty(), "--val-data needs --data");
  need(o.text.empty() || o.data.empty(), "--text and --data exclude each other");
  need(o.threads >= 0, "--threads must be >= 0");
  need(o.max_context_limit >= 4096, "--max-context-limit must be >= 4096");
  need(std::isfinite(o.comm_timeout) && o.comm_timeout > 0, "--comm-timeout must be a positive number of seconds");
  need(o.launcher == "local" || !o.max_context, "--max-context runs in one process (--launcher local)");
  // Last, as they create directories: every path the run writes.
  if (!o.checkpoint_dir.empty()) examples::need_writable_directory("checkpoint-dir", o.checkpoint_dir);
  if (!o.metrics.empty()) examples::need_writable_file("metrics", o.metrics);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  examples::cli cli("train_ssm",
                    "Trains a selective state-space language model on the host (fp32) or a GPU (bf16, fp32 masters)\n"
                    "with the chosen gradient engine, printing a progress line per step (with the activation memory\n"
                    "beside its formula), the validation loss every --eval-every steps and text samples at the end.\n"
                    "With no data flags it trains on the King James Bible (Debian bible-kjv-text), byte-tokenized.");
  cli.flag("preset", o.preset, "model preset (micro, tiny, bench, paper); the size flags below override it",
           adjoint::presets::names())
      .flag("d-model", o.d_model, "residual width P (0: the preset's)")
      .flag("state", o.state, "state size N per layer (0: the preset's)")
      .flag("layers", o.layers, "SSM layers K (0: the preset's)")
      .flag("vocab", o.vocab, "vocabulary size, > every token id (0: the preset's; byte-level text needs >= 256)");
  examples::declare_data_flags(cli, o);
  cli.flag("engine", o.engine, "gradient engine: exact adjoint, bptt reference, or the paper's sharded adjoint",
           {"exact", "bptt", "sharded"})
      .flag("window", o.window, "sharded engine: keep only token pairs less than T̄ apart in the adjoint (0: all)")
      .toggle("recompute-c", o.recompute_c, "exact/sharded: recompute C in the backward instead of storing it")
      .flag("ranks", o.ranks, "shard the layers over this many ranks (exact or sharded engine)")
      .flag("launcher", o.launcher,
            "local: the ranks as threads of this process; nccl (CUDA): this process is one rank of a torchrun or "
            "mpirun launch of --ranks processes, one GPU each",
            {"local", "nccl"})
      .flag("comm-timeout", o.comm_timeout, "seconds a rank waits for the others before failing")
      .flag("seq", o.seq, "tokens per sequence")
      .flag("batch", o.batch, "sequences per micro-batch")
      .flag("accumulation", o.accumulation, "micro-batches per optimizer step")
      .flag("steps", o.steps, "optimizer steps to train to (a resumed run continues to this step)")
      .flag("stop-at", o.stop_at, "end this run after this step (saving a checkpoint); resume later (0: --steps)")
      .flag("lr", o.lr, "peak learning rate")
      .flag("min-lr", o.min_lr, "final learning rate of the decay (negative: --lr / 10)")
      .flag("warmup", o.warmup, "linear warm-up steps")
      .flag("decay", o.decay, "learning-rate decay after warm-up", {"cosine", "linear", "constant"})
      .flag("weight-decay", o.weight_decay, "AdamW weight decay, on the projection matrices and the head")
      .flag("clip", o.clip, "global gradient-norm clip (<= 0: off)")
      .flag("eval-every", o.eval_every, "validation loss every N steps (and at the end)")
      .flag("eval-batches", o.eval_batches, "validation batches per evaluation (the same ones each time)")
      .flag("checkpoint-dir", o.checkpoint_dir, "save checkpoints to DIR/step_NNNNNNNNN (and at the end)")
      .flag("checkpoint-every", o.checkpoint_every, "save every N steps (0: only at the end)")
      .flag("keep-checkpoints", o.keep_checkpoints, "keep the newest N checkpoints (0: all)")
      .flag("resume", o.resume,
            "continue from a checkpoint (or the newest one in a --checkpoint-dir); exactly with the saving run's "
            "--steps, else with the learning-rate schedule re-planned to end at --steps")
      .flag("log-every", o.log_every, "print a progress line every N steps (and at evaluations)")
      .flag("metrics", o.metrics, "write one JSON line per step to this file (appended to on --resume)")
      .flag("samples", o.samples, "text samples to print at the end (--ranks 1)")
      .flag("sample-tokens", o.sample_tokens, "tokens per sample")
      .flag("prompt", o.prompt, "prompt of the samples")
      .flag("temperature", o.temperature, "sampling temperature (0: greedy)")
      .flag("device", o.device, "where to train: auto picks cuda when a GPU is present", {"auto", "host", "cuda"})
      .toggle("max-context", o.max_context,
              "train nothing: find the longest sequence (batch 1) this engine fits on the GPU at this model size")
      .flag("max-context-limit", o.max_context_limit, "the longest sequence --max-context tries")
      .flag("threads", o.threads, "host worker threads (0: all cores)")
      .flag("seed", o.seed, "seed of the initial weights, the data order and the samples");
  return examples::guarded_main("train_ssm", [&] {
    if (!cli.parse(argc, argv)) return 0;
    check(o);
    const examples::device_choice d = examples::choose_device(o.device);
    if (o.max_context && !d.cuda)
      throw examples::cli_error("--max-context probes a GPU's memory: it needs --device cuda (or auto with a GPU)");
    const auto with = [&](const auto& ex, const std::string& name, nccl_launch* launch) {
      if (o.engine == "bptt") return train_with(ex, o, adjoint::bptt{}, name, launch);
      if (o.engine == "sharded")
        return train_with(ex, o, adjoint::sharded_adjoint{o.window, o.recompute_c}, name, launch);
      return train_with(ex, o, adjoint::exact_adjoint{o.recompute_c}, name, launch);
    };
    if (o.launcher == "nccl") {
#if defined(__CUDACC__)
      examples::nccl_process proc = examples::nccl_process::connect(o.comm_timeout);
      if (proc.info.world_size != o.ranks)
        throw examples::cli_error("--ranks " + std::to_string(o.ranks) + ", but the launcher (" + proc.info.launcher +
                                  ") started " + std::to_string(proc.info.world_size) + " processes");
      try {
        return with(exec::cuda{proc.stream}, proc.device_name, &proc);
      } catch (const std::exception& e) {
        proc.abort("rank " + std::to_string(proc.info.rank) + " failed: " + e.what());
        throw;
      }
#else
      throw examples::cli_error("--launcher nccl: this build has no CUDA path (configure with the cuda preset)");
#endif
    }
#if defined(__CUDACC__)
    if (d.cuda) return with(exec::cuda{}, d.name, nullptr);
#endif
    return with(exec::host{o.threads}, d.name, nullptr);
  });
}

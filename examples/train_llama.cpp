// train_llama: trains a Llama 3 model on one device — the host (fp32, the readable reference) or a CUDA GPU (bf16
// weights and activations, fp32 masters and optimizer state) — with train::trainer.
//
// Data: by default the King James Bible (public domain; Debian bible-kjv-text, installed by scripts/setup.sh),
// byte-tokenized into llm.c shards once and cached; --text names another plain-text file, --data token shards
// (llm.c v1/v7 or nanoGPT .bin; a file, glob or directory). Every step prints a progress line; every
// --eval-every steps the validation loss; --metrics writes one JSON line per step; --checkpoint-dir saves
// Hugging Face-loadable checkpoints (plus optimizer state for --resume); at the end it prints text samples.
//
// This file compiles as C++ (host only) or, in a CUDA build, as CUDA (host and --device cuda).
#include <subspace/subspace.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "common/checkpoints.hpp"
#include "common/cli.hpp"
#include "common/device.hpp"
#include "common/flag_checks.hpp"
#include "common/format.hpp"
#include "common/llama_data.hpp"
#include "common/subspace_flags.hpp"

namespace {

using namespace subspace;
namespace fs = std::filesystem;

using examples::data_source;
using examples::duration;
using examples::human;

// The model (--preset and the size flags) and data (--text, --data, ...) flags are shared with gossip_llama:
// common/llama_data.hpp.
struct options : examples::model_flags, examples::data_flags, examples::subspace_flags {
  // batch and schedule
  std::int64_t seq = 0, batch = 8, steps = 300, stop_at = 0, warmup = 30;
  int accumulation = 1;  // an int, as the scheduler takes it: a larger value fails at parsing
  float lr = 3e-3f, min_lr = -1.0f, weight_decay = 0.1f, clip = 1.0f;
  std::string decay = "cosine";
  // optimizer
  std::string optimizer = "adamw";  // GaLore/GoLore flags: examples::subspace_flags
  // evaluation, checkpoints, output
  std::int64_t eval_every = 50, eval_batches = 20, checkpoint_every = 0, keep_checkpoints = 2, log_every = 1;
  std::string checkpoint_dir, resume, init_from, metrics, summary;
  std::int64_t samples = 2, sample_tokens = 240;
  std::string prompt = "And God said";
  float temperature = 0.8f;
  // execution
  std::string device = "auto";
  int threads = 0;
  std::uint64_t seed = 1;
  double peak_tflops = 0;
};

/// `described`: the optimizer as the header names it (GaLore/GoLore: with what they project).
template <class Optimizer, class Exec>
int train(const Exec& ex, const options& o, const Optimizer& optimizer, const std::string& described,
          const std::string& device_name) {
  using T = std::conditional_t<std::is_same_v<Exec, exec::host>, float, bf16>;
  const nn::llama_config cfg = examples::model_config(o, o.seq);
  const std::int64_t seq = o.seq ? o.seq : std::min<std::int64_t>(cfg.max_seq, 256);
  const data_source src = examples::choose_data(o, cfg.vocab);

  auto [train_tokens, val_tokens] = examples::open_tokens(src, o.val_fraction);
  data::loader_options lo{o.batch, seq, cfg.vocab, o.shuffle, o.seed, true, "train"};
  data::batch_loader train_data(train_tokens, lo);
  std::optional<data::batch_loader> val_data;
  if (!val_tokens.empty()) {
    lo.shuffle = false;
    lo.name = "val";
    val_data.emplace(val_tokens, lo);
  }

  train::trainer_options to;
  to.clip = o.clip;
  to.schedule = {o.lr, o.min_lr >= 0 ? o.min_lr : o.lr / 10, std::min(o.warmup, o.steps), o.steps,
                 optim::parse_decay(o.decay)};
  train::trainer t(
      nn::llama<Exec, T>(cfg, ex),
      subspace::stack{.scheduler = schedule::gradient_accumulation{int(o.accumulation)}, .optimizer = optimizer}, to);

  if (!o.resume.empty()) {
    const fs::path from = examples::resolve_resume(o.resume);
    const io::trainer_state ts = t.resume(from, train_data);
    std::printf("resumed from %s at step %lld\n", from.c_str(), (long long)ts.step);
    // The interrupted run may have logged steps after this checkpoint (and torn its last line): they come again.
    if (!o.metrics.empty()) io::truncate_metrics_after(o.metrics, ts.step);
    // The schedule follows --steps: only the saving run's --steps continues its learning-rate curve exactly.
    if (const io::json* planned = ts.extra.find("steps"); planned && planned->is_int() && planned->as_int() != o.steps)
      std::printf(
          "note: not an exact continuation: the learning-rate schedule is re-planned to end at step %lld "
          "(the checkpoint's run planned %lld; --steps %lld continues it exactly)\n",
          (long long)o.steps, (long long)planned->as_int(), (long long)planned->as_int());
  } else if (!o.init_from.empty()) {
    t.load_weights(o.init_from);
    std::printf("initial weights from %s\n", o.init_from.c_str());
  } else {
    t.init(o.seed);
  }
  const std::int64_t first = t.steps_done() + 1;
  const std::int64_t last = o.stop_at > 0 ? std::min(o.stop_at, o.steps) : o.steps;
  if (first > last)
    throw examples::cli_error("--steps " + std::to_string(o.steps) +
                              (o.stop_at > 0 ? " --stop-at " + std::to_string(o.stop_at) : "") +
                              ": the checkpoint is already at step " + std::to_string(first - 1));

  const double flop_per_token = cfg.flops_per_token(seq);
  const double peak = (o.peak_tflops > 0 ? o.peak_tflops : examples::peak_tflops_of(device_name)) * 1e12;
  const bool on_gpu = !std::is_same_v<Exec, exec::host>;
  std::printf("model '%s': %s parameters (d %lld, %lld layers, %lld/%lld heads, FFN %lld, vocab %lld)\n",
              cfg.name.c_str(), human(double(cfg.parameters())).c_str(), (long long)cfg.d_model,
              (long long)cfg.n_layers, (long long)cfg.n_heads, (long long)cfg.n_kv_heads, (long long)cfg.ffn_hidden,
              (long long)cfg.vocab);
  std::printf("data: %s — %s train / %s val tokens\n", examples::describe_data(src, train_tokens, val_tokens).c_str(),
              human(double(train_tokens.tokens())).c_str(), human(double(val_tokens.tokens())).c_str());
  std::printf("device %s | %s | batch %lld x %lld x %lld accumulation = %lld tokens/step | %lld steps\n",
              device_name.c_str(), described.c_str(), (long long)o.batch, (long long)seq, (long long)o.accumulation,
              (long long)(o.batch * seq * o.accumulation), (long long)o.steps);
  std::printf("optimizer state %s bytes%s\n", human(double(t.optimizer_state_bytes())).c_str(),
              t.master_bytes() ? (", fp32 masters " + human(double(t.master_bytes())) + " bytes").c_str() : "");
  std::fflush(stdout);

  std::optional<io::metrics_writer> metrics;
  if (!o.metrics.empty())
    metrics.emplace(o.metrics,
                    o.resume.empty() ? io::metrics_writer::open_mode::truncate : io::metrics_writer::open_mode::append);

  const auto save = [&](std::int64_t step) {
    const fs::path dir = fs::path(o.checkpoint_dir) / examples::checkpoint_name(step);
    t.save(dir, train_data.position(), o.seed,
           io::json::object({{"device", io::json(device_name)}, {"steps", io::json(o.steps)}}));
    examples::keep_newest_checkpoints(o.checkpoint_dir, o.keep_checkpoints);
    std::printf("saved checkpoint %s\n", dir.c_str());
  };

  const auto start = std::chrono::steady_clock::now();
  const auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  double last_val = NAN, train_time = 0;
  std::int64_t timed_tokens = 0;
  for (std::int64_t step = first; step <= last; ++step) {
    const double t0 = seconds();
    const train::step_result r = t.step(train_data);
    const double dt = seconds() - t0;
    if (!std::isfinite(r.loss) || r.skipped) {
      std::fprintf(stderr,
                   "train_llama: step %lld: loss %g, gradient norm %g — training diverged (lower --lr or "
                   "--clip); the last checkpoint is kept\n",
                   (long long)step, r.loss, r.grad_norm);
      return 1;
    }
    if (step > first || last == first) {  // the first step includes one-time set-up
      train_time += dt;
      timed_tokens += r.tokens;
    }
    const double tok_s = timed_tokens > 0 ? double(timed_tokens) / train_time : double(r.tokens) / dt;
    std::optional<double> val;
    if (val_data && (step % o.eval_every == 0 || step == last)) val = last_val = t.evaluate(*val_data, o.eval_batches);

    if (step % o.log_every == 0 || step == first || step == last || val) {
      const double eta = double(last - step) * double(r.tokens) / tok_s;
      std::string line = "step " + std::to_string(step) + "/" + std::to_string(o.steps);
      char buf[160];
      std::snprintf(buf, sizeof buf, " | loss %.4f | lr %.2e | norm %.3f | %s tok/s", r.loss, double(r.lr), r.grad_norm,
                    human(tok_s).c_str());
      line += buf;
      if (on_gpu && peak > 0) {
        std::snprintf(buf, sizeof buf, " | MFU %.1f%%", 100.0 * flop_per_token * tok_s / peak);
        line += buf;
      }
      if (val) {
        std::snprintf(buf, sizeof buf, " | val %.4f", *val);
        line += buf;
      }
      line += " | ETA " + duration(eta);
      std::printf("%s\n", line.c_str());
      std::fflush(stdout);
    }
    if (metrics) {
      io::metrics_record m{step, r.loss, val, double(r.lr), t.tokens_done(), tok_s, seconds(), r.grad_norm};
      std::vector<std::pair<std::string, double>> extra{{"step_ms", 1e3 * dt}};
      if (on_gpu && peak > 0) extra.emplace_back("mfu", flop_per_token * tok_s / peak);
      metrics->write(m, extra);
    }
    if (!o.checkpoint_dir.empty() && o.checkpoint_every > 0 && step % o.checkpoint_every == 0 && step < last)
      save(step);
  }
  if (!o.checkpoint_dir.empty()) save(t.steps_done());
  std::printf("done: %lld steps, %s tokens, %s; final val loss %.4f\n", (long long)t.steps_done(),
              human(double(t.tokens_done())).c_str(), duration(seconds()).c_str(), last_val);
  if (!o.summary.empty()) {
    const double tok_s = train_time > 0 ? double(timed_tokens) / train_time : 0.0;
    io::json j =
        io::json::object({{"device", io::json(device_name)},
                          {"model", io::json(cfg.name)},
                          {"parameters", io::json(cfg.parameters())},
                          {"optimizer", io::json(o.optimizer)},
                          {"steps", io::json(t.steps_done())},
                          {"tokens", io::json(t.tokens_done())},
                          {"batch", io::json(o.batch)},
                          {"seq", io::json(seq)},
                          {"accumulation", io::json(o.accumulation)},
                          {"lr", io::json(double(o.lr))},
                          {"final_val_loss", std::isfinite(last_val) ? io::json(last_val) : io::json(nullptr)},
                          {"optimizer_state_bytes", io::json(std::int64_t(t.optimizer_state_bytes()))},
                          {"master_bytes", io::json(std::int64_t(t.master_bytes()))},
                          {"tok_per_s", io::json(tok_s)},
                          {"step_ms", io::json(tok_s > 0 ? 1e3 * double(o.batch * seq * o.accumulation) / tok_s : 0.0)},
                          {"wall_s", io::json(seconds())}});
    if (o.optimizer != "adamw")
      j.set("subspace",
            io::json::object({{"rank", io::json(o.rank)},
                              {"refresh", io::json(o.refresh)},
                              {"scale", io::json(double(o.galore_scale))},
                              {"golore_percent", io::json(o.optimizer == "golore" ? o.golore_percent : 0.0)}}));
    io::atomic_write_text(o.summary, j.dump(2) + "\n");
  }

  // Samples, from the same prompt with different seeds.
  if (o.samples > 0 && o.sample_tokens > 0) {
    const std::vector<std::int32_t> prompt = src.tokenizer.encode(o.prompt, "--prompt");
    for (std::int64_t i = 0; i < o.samples; ++i) {
      nn::sampling s;
      s.temperature = o.temperature;
      s.seed = o.seed + std::uint64_t(i);
      const std::vector<std::int32_t> out = nn::generate(t.model(), prompt, o.sample_tokens, s);
      if (src.decodes()) {
        std::printf("--- sample %lld ---\n%s%s\n", (long long)i + 1, o.prompt.c_str(),
                    src.tokenizer.printable(out).c_str());
      } else {
        std::printf("--- sample %lld (token ids) ---\n", (long long)i + 1);
        for (const auto id : out) std::printf("%d ", id);
        std::printf("\n");
      }
    }
  }
  return 0;
}

template <class Exec>
int train_with(const Exec& ex, const options& o, const std::string& device_name) {
  optim::adamw adam;
  adam.weight_decay = o.weight_decay;
  if (o.optimizer == "adamw") return train(ex, o, adam, o.optimizer, device_name);
  const auto with_projection = [&](const auto& opt) {
    const std::string projected = examples::projection_of(opt, o, examples::model_config(o, o.seq));
    return train(ex, o, opt, o.optimizer + " (" + projected + ")", device_name);
  };
  if (o.optimizer == "galore") return with_projection(examples::galore_from(o, adam));
  return with_projection(examples::golore_from(o, adam, o.steps, o.seed));
}

void check(const options& o) {
  const auto need = [](bool ok, const std::string& what) {
    if (!ok) throw examples::cli_error(what);
  };
  need(o.steps >= 1, "--steps must be >= 1, got " + std::to_string(o.steps));
  need(o.stop_at >= 0, "--stop-at must be >= 0 (0: run to --steps)");
  need(o.batch >= 1 && o.accumulation >= 1, "--batch and --accumulation must be >= 1");
  need(o.seq >= 0, "--seq must be >= 1 (or 0 for the preset's context, at most 256)");
  need(o.warmup >= 0, "--warmup must be >= 0, got " + std::to_string(o.warmup));
  need(std::isfinite(o.lr) && o.lr > 0, "--lr must be a positive number");
  need(o.min_lr < 0 || o.min_lr <= o.lr, "--min-lr must not exceed --lr");
  need(o.eval_every >= 1 && o.eval_batches >= 1 && o.log_every >= 1,
       "--eval-every, --eval-batches and --log-every must be >= 1");
  need(o.checkpoint_every >= 0 && o.keep_checkpoints >= 0, "--checkpoint-every and --keep-checkpoints must be >= 0");
  need(o.val_fraction > 0 && o.val_fraction < 1, "--val-fraction must lie in (0, 1)");
  need(o.samples >= 0 && o.sample_tokens >= 0, "--samples and --sample-tokens must be >= 0");
  examples::need_sampling(o.temperature, o.prompt, o.samples, o.sample_tokens);
  examples::need_finite_non_negative("weight-decay", o.weight_decay);
  need(!std::isnan(o.clip), "--clip must be a number (<= 0: off)");
  examples::check_subspace_flags(o);
  examples::need_finite_non_negative("peak-tflops", o.peak_tflops);
  need(o.resume.empty() || o.init_from.empty(), "--resume and --init-from exclude each other");
  need(o.val_data.empty() || !o.data.empty(), "--val-data needs --data");
  need(o.text.empty() || o.data.empty(), "--text and --data exclude each other");
  need(o.threads >= 0, "--threads must be >= 0");
  // Last, as they create directories: every path the run writes.
  if (!o.checkpoint_dir.empty()) examples::need_writable_directory("checkpoint-dir", o.checkpoint_dir);
  if (!o.metrics.empty()) examples::need_writable_file("metrics", o.metrics);
  if (!o.summary.empty()) examples::need_writable_file("summary", o.summary);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  examples::cli cli("train_llama",
                    "Trains a Llama 3 model on one device (host fp32, or CUDA bf16 with fp32 masters), printing a "
                    "progress line\nper step, the validation loss every --eval-every steps and text samples at the "
                    "end. With no\ndata flags it trains on the King James Bible (Debian bible-kjv-text), "
                    "byte-tokenized.");
  examples::declare_model_flags(cli, o);
  examples::declare_data_flags(cli, o);
  cli.flag("seq", o.seq, "tokens per sequence (0: the preset's context, at most 256)")
      .flag("batch", o.batch, "sequences per micro-batch")
      .flag("accumulation", o.accumulation, "micro-batches per optimizer step (gradient accumulation)")
      .flag("steps", o.steps, "optimizer steps to train to (a resumed run continues to this step)")
      .flag("stop-at", o.stop_at,
            "end this run after this step (saving a checkpoint) while the schedule still "
            "plans --steps; resume later (0: run to --steps)")
      .flag("lr", o.lr, "peak learning rate")
      .flag("min-lr", o.min_lr, "final learning rate of the decay (negative: --lr / 10)")
      .flag("warmup", o.warmup, "linear warm-up steps")
      .flag("decay", o.decay, "learning-rate decay after warm-up", {"cosine", "linear", "constant"})
      .flag("weight-decay", o.weight_decay, "AdamW weight decay, on the projection matrices and an untied LM head")
      .flag("clip", o.clip, "global gradient-norm clip (<= 0: off)")
      .flag("optimizer", o.optimizer, "adamw, or AdamW in a low-rank gradient subspace: GaLore (SVD) or GoLore@x%",
            {"adamw", "galore", "golore"});
  examples::declare_subspace_flags(cli, o);
  cli.flag("eval-every", o.eval_every, "validation loss every N steps (and at the end)")
      .flag("eval-batches", o.eval_batches, "validation batches per evaluation (the same ones each time)")
      .flag("checkpoint-dir", o.checkpoint_dir, "save checkpoints to DIR/step_NNNNNNNNN (and at the end)")
      .flag("checkpoint-every", o.checkpoint_every, "save every N steps (0: only at the end)")
      .flag("keep-checkpoints", o.keep_checkpoints, "keep the newest N checkpoints (0: all)")
      .flag("resume", o.resume,
            "continue from a checkpoint (or the newest one in a --checkpoint-dir); exactly with the saving run's "
            "--steps, else with the learning-rate schedule re-planned to end at --steps")
      .flag("init-from", o.init_from, "initial weights from a checkpoint or Hugging Face Llama directory")
      .flag("log-every", o.log_every, "print a progress line every N steps (and at evaluations)")
      .flag("metrics", o.metrics, "write one JSON line per step to this file (appended to on --resume)")
      .flag("summary", o.summary, "write a JSON summary of the run here at the end (val loss, memory, speed)")
      .flag("samples", o.samples, "text samples to print at the end")
      .flag("sample-tokens", o.sample_tokens, "tokens per sample")
      .flag("prompt", o.prompt, "prompt of the samples")
      .flag("temperature", o.temperature, "sampling temperature (0: greedy)")
      .flag("device", o.device, "where to train: auto picks cuda when a GPU is present", {"auto", "host", "cuda"})
      .flag("threads", o.threads, "host worker threads (0: all cores)")
      .flag("seed", o.seed, "seed of the initial weights, the data order, GoLore and the samples")
      .flag("peak-tflops", o.peak_tflops, "GPU peak TFLOP/s for MFU (0: from the device name)");
  return examples::guarded_main("train_llama", [&] {
    if (!cli.parse(argc, argv)) return 0;
    check(o);
    examples::clean_before_run(o.checkpoint_dir, o.resume);
    const examples::device_choice d = examples::choose_device(o.device);
#if defined(__CUDACC__)
    if (d.cuda) return train_with(exec::cuda{}, o, d.name);
#endif
    return train_with(exec::host{o.threads}, o, d.name);
  });
}

#pragma once
// pipeline_llama's options and plan: the flags, their checks, and what every rank shares, decided before the ranks
// start (model, subspace codec, Mixture-of-Subspaces options, data), with the header the run prints. The training
// itself is in pipeline_llama.cpp.

#include <subspace/context/pipeline_context.hpp>
#include <subspace/nn/subspace_blocks.hpp>
#include <subspace/pipeline/any_schedule.hpp>
#include <subspace/pipeline/layout.hpp>
#include <subspace/subspace.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/cli.hpp"
#include "common/context_flags.hpp"
#include "common/flag_checks.hpp"
#include "common/format.hpp"
#include "common/llama_data.hpp"
#include "common/ranks.hpp"

namespace examples::pipeline_llama {

using namespace subspace;

struct options : model_flags, data_flags, network_flags, context_flags {
  int stages = 4, dp = 1, virtual_stages = 2;
  std::string schedule = "1f1b", compressor = "subspace", variant = "reparam", wire = "fp32";
  std::string kv_compressor = "identity";
  std::int64_t k = 0;
  std::int64_t seq = 0, batch = 4, steps = 200, warmup = 20;
  int microbatches = 8;  // an int, as the scheduler takes it: a larger value fails at parsing
  float lr = 3e-3f, min_lr = -1.0f, clip = 1.0f;
  std::string decay = "cosine";
  std::int64_t eval_every = 50, eval_batches = 10, log_every = 1, checkpoint_every = 0;
  std::string metrics, summary, checkpoint_dir, resume, export_hf;
  std::int64_t samples = 1, sample_tokens = 200;
  std::string prompt = "And God said";
  float temperature = 0.8f;
  std::string device = "auto";
  int threads = 0;
  std::uint64_t seed = 1;
};

/// The schedule --schedule names (pipeline::any_schedule), or the flags that named a bad one.
inline pipeline::any_schedule chosen_schedule(const options& o) {
  const int v = o.schedule == "interleaved" ? o.virtual_stages : 1;
  try {
    return pipeline::any_schedule(o.schedule, int(o.microbatches), o.stages, v);
  } catch (const subspace::invalid_argument& e) {
    throw cli_error("--schedule " + o.schedule + " --stages " + std::to_string(o.stages) + " --microbatches " +
                    std::to_string(o.microbatches) +
                    (v > 1 ? " --virtual-stages " + std::to_string(v) : std::string()) + ": " +
                    without_location(e.what()));
  }
}

/// Everything the ranks share, decided before they start.
struct setup {
  int ranks = 1, chunks = 1;
  comm::network net;
  bool modelled = false;
  nn::llama_config cfg;
  std::int64_t seq = 0;
  std::optional<compress::subspace_projection> codec;  // --compressor subspace
  std::int64_t unconstrained_from = 0;                 // the first layer of the last stage
  std::optional<compress::kv_subspace_options> mos;    // --kv-compressor mos
  data_source src;
  data::token_dataset train, val;
  std::string device_name, where;
  int threads_per_rank = 0;
};

inline void check(const options& o) {
  const auto need = [](bool ok, const std::string& what) {
    if (!ok) throw cli_error(what);
  };
  need(o.stages >= 1 && o.stages <= 64, "--stages must lie in [1, 64], got " + std::to_string(o.stages));
  need(o.dp >= 1 && o.cp >= 1 && o.stages * o.cp * o.dp <= 256,
       "--cp and --dp must be >= 1 with --stages x --cp x --dp <= 256 ranks");
  need(o.kv_compressor == "identity" || o.cp >= 2,
       "--kv-compressor mos compresses the K/V that context parallelism exchanges: it needs --cp >= 2");
  need(o.virtual_stages >= 1, "--virtual-stages must be >= 1");
  need(o.k >= 0, "--k must be >= 1 (or 0: d/50, d/100 from d 4096 on, at least 8)");
  need(o.microbatches >= 1 && o.batch >= 1, "--microbatches and --batch must be >= 1");
  need(o.steps >= 1, "--steps must be >= 1, got " + std::to_string(o.steps));
  need(o.seq >= 0, "--seq must be >= 1 (or 0 for the preset's context, at most 256)");
  need(o.warmup >= 0, "--warmup must be >= 0");
  need(std::isfinite(o.lr) && o.lr > 0, "--lr must be a positive number");
  need(o.min_lr < 0 || o.min_lr <= o.lr, "--min-lr must not exceed --lr");
  need(o.eval_every >= 1 && o.eval_batches >= 1 && o.log_every >= 1,
       "--eval-every, --eval-batches and --log-every must be >= 1");
  need(o.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0: only at the end)");
  need(o.checkpoint_every == 0 || !o.checkpoint_dir.empty(), "--checkpoint-every needs --checkpoint-dir");
  need(o.val_fraction > 0 && o.val_fraction < 1, "--val-fraction must lie in (0, 1)");
  need(o.samples >= 0 && o.sample_tokens >= 0, "--samples and --sample-tokens must be >= 0");
  need_sampling(o.temperature, o.prompt, o.samples, o.sample_tokens);
  need(!std::isnan(o.clip), "--clip must be a number (<= 0: off)");
  need(o.text.empty() || o.data.empty(), "--text and --data exclude each other");
  need(std::isfinite(o.comm_timeout) && o.comm_timeout > 0, "--comm-timeout must be a positive number of seconds");
  need(o.threads >= 0, "--threads must be >= 0");
  need(o.schedule == "interleaved" || o.virtual_stages == 2 || o.virtual_stages == 1,
       "--virtual-stages applies to --schedule interleaved only");
  parse_bandwidth(o.bandwidth);
  (void)chosen_schedule(o);  // --schedule's own rules (e.g. interleaved needs --microbatches a multiple of --stages)
  // Last, as they create directories: every path the run writes.
  if (!o.checkpoint_dir.empty()) need_writable_directory("checkpoint-dir", o.checkpoint_dir);
  if (!o.metrics.empty()) need_writable_file("metrics", o.metrics);
  if (!o.summary.empty()) need_writable_file("summary", o.summary);
  if (!o.export_hf.empty()) need_writable_directory("export-hf", o.export_hf);
}

inline setup decide(const options& o, int ranks) {
  setup s;
  s.ranks = ranks;
  s.chunks = o.schedule == "interleaved" ? o.virtual_stages : 1;
  const modelled_network m = network_of(o);
  s.net = m.net;
  s.modelled = m.modelled;
  s.cfg = model_config(o, o.seq);
  s.seq = o.seq ? o.seq : std::min<std::int64_t>(s.cfg.max_seq, 256);
  if (o.cp > 1) check_context_flags(o, s.seq, o.steps, o.kv_compressor == "mos");
  if (o.kv_compressor == "mos") s.mos = mos_options(o, s.cfg, o.seed, "--kv-compressor mos");
  const std::int64_t parts = std::int64_t(o.stages) * s.chunks;
  if (parts > s.cfg.n_layers)
    throw cli_error("--stages " + std::to_string(o.stages) +
                    (s.chunks > 1 ? " x --virtual-stages " + std::to_string(s.chunks) : std::string()) + ": " +
                    std::to_string(parts) + " stages need at least as many layers; '" + s.cfg.name + "' has " +
                    std::to_string(s.cfg.n_layers) + " (--layers)");
  s.unconstrained_from = parts == 1 ? 0 : pipeline::even_cuts(s.cfg.n_layers, parts).back();
  if (o.compressor == "subspace") {
    if (o.k >= s.cfg.d_model)
      throw cli_error("--k " + std::to_string(o.k) + ": the subspace must be smaller than d_model " +
                      std::to_string(s.cfg.d_model) + " (the boundary would carry no fewer values)");
    s.codec.emplace(compress::subspace_projection_options{
        s.cfg.d_model, s.cfg.vocab, o.k, o.seed * 2 + 101, o.seed * 2 + 102,
        o.wire == "bf16" ? compress::wire_dtype::bf16 : compress::wire_dtype::fp32, false});
  }
  return s;
}

inline void load_data(const options& o, setup& s) {
  if (o.data.empty() && s.cfg.vocab < 256)
    throw cli_error("--vocab " + std::to_string(s.cfg.vocab) + " (--preset " + o.preset +
                    "): byte-level text needs a vocabulary of at least 256");
  s.src = choose_data(o, s.cfg.vocab);
  std::tie(s.train, s.val) = open_tokens(s.src, o.val_fraction);
}

/// Bytes one token puts on a boundary, forward and backward: the dense stream (bf16 on the GPU, fp32 on the host)
/// or k coefficients in the wire type plus the token id.
inline std::pair<double, double> boundary_bytes_per_token(const setup& s, std::size_t activation_bytes) {
  const double d = double(s.cfg.d_model);
  if (!s.codec) return {d * double(activation_bytes), d * double(activation_bytes)};
  const double k = double(s.codec->k()), w = double(s.codec->wire_element_bytes(4));
  return {k * w + double(s.codec->token_id_bytes()), k * w};
}

inline void print_header(const options& o, const setup& s, std::size_t activation_bytes) {
  const nn::llama_config& cfg = s.cfg;
  std::printf("model '%s': %s parameters (d %lld, %lld layers, %lld/%lld heads, FFN %lld, vocab %lld)\n",
              cfg.name.c_str(), human(double(cfg.parameters())).c_str(), (long long)cfg.d_model,
              (long long)cfg.n_layers, (long long)cfg.n_heads, (long long)cfg.n_kv_heads, (long long)cfg.ffn_hidden,
              (long long)cfg.vocab);
  std::printf("data: %s — %s train / %s val tokens; replica q reads train shard q of %d\n",
              describe_data(s.src, s.train, s.val).c_str(), human(double(s.train.tokens())).c_str(),
              human(double(s.val.tokens())).c_str(), o.dp);
  const std::int64_t parts = std::int64_t(o.stages) * s.chunks;
  const std::vector<std::int64_t> cuts =
      parts > 1 ? pipeline::even_cuts(cfg.n_layers, parts) : std::vector<std::int64_t>{};
  std::string layout;
  std::int64_t first = 0;
  for (std::int64_t p = 0; p < parts; ++p) {
    const std::int64_t last = p + 1 < parts ? cuts[std::size_t(p)] : cfg.n_layers;
    layout += (p ? " | " : "") + std::string("[") + std::to_string(first) + "," + std::to_string(last) + ")";
    first = last;
  }
  const pipeline::any_schedule sched = chosen_schedule(o);
  std::printf("pipeline: %d stages%s x %d replica%s = %d ranks (%s) on %s | layers %s\n", o.stages,
              s.chunks > 1 ? (" x " + std::to_string(s.chunks) + " virtual").c_str() : "", o.dp, o.dp == 1 ? "" : "s",
              s.ranks, s.where.c_str(), s.device_name.c_str(), layout.c_str());
  if (o.cp > 1) {
    std::printf("context: every stage's sequences over %d ranks, %s placement (%lld rows per rank), %s exchange\n",
                o.cp, o.layout.c_str(), (long long)(s.seq / o.cp), o.attention.c_str());
    if (s.mos)
      std::printf(
          "K/V compressor: Mixture of Subspaces, r_K %lld, r_V %lld, m %lld: dense for %lld warm-up steps (the last "
          "%lld gather the K/V second moments), the last layer dense\n",
          (long long)s.mos->k_rank(), (long long)s.mos->v_rank(), (long long)s.mos->generators,
          (long long)s.mos->warmup_steps, (long long)s.mos->pca_steps);
    else std::printf("K/V compressor: identity (dense K/V blocks)\n");
  }
  std::printf("schedule %s, %lld micro-batches of %lld x %lld tokens per step: closed-form bubble %.3f\n",
              o.schedule.c_str(), (long long)o.microbatches, (long long)o.batch, (long long)s.seq, sched.bubble());
  const auto [fwd, bwd] = boundary_bytes_per_token(s, activation_bytes);
  const double dense = double(cfg.d_model) * double(activation_bytes);
  if (s.codec)
    std::printf(
        "compressor: subspace, k %lld (%s variant), %s wire, %d-byte token ids: %.0f B/token forward, %.0f "
        "backward per boundary (dense: %.0f each way, %.1fx / %.1fx fewer); layers [0,%lld) constrained\n",
        (long long)s.codec->k(), o.variant.c_str(), o.wire.c_str(), int(s.codec->token_id_bytes()), fwd, bwd, dense,
        dense / fwd, dense / bwd, (long long)s.unconstrained_from);
  else std::printf("compressor: identity (the dense stream, %.0f B/token each way per boundary)\n", dense);
  if (s.modelled)
    std::printf("network: every link %s, %s mode\n", link_text(s.net.default_link).c_str(),
                s.net.mode == comm::throttle_mode::enforce ? "enforce" : "account");
  else std::printf("network: not modelled (--bandwidth none; bytes are still counted)\n");
  std::fflush(stdout);
}

/// Declares pipeline_llama's own flags (the shared ones come from common/).
inline void declare_flags(cli& c, options& o) {
  c.flag("stages", o.stages, "pipeline stages (ranks per pipeline)")
      .flag("schedule", o.schedule,
            "gpipe: all forwards, then all backwards; 1f1b: one forward one backward "
            "(memory of <= stages micro-batches); interleaved: 1f1b over --virtual-stages chunks per rank (bubble / "
            "virtual stages; --microbatches a multiple of --stages); zb: zero bubble (ZB-H1), the backward split "
            "into its input and weight halves, the weight halves filling the bubbles",
            {"gpipe", "1f1b", "interleaved", "zb"})
      .flag("virtual-stages", o.virtual_stages, "model chunks per rank with --schedule interleaved")
      .flag("microbatches", o.microbatches, "micro-batches per optimizer step")
      .flag("compressor", o.compressor,
            "identity: the dense stream crosses each boundary; subspace: k coefficients "
            "and the token id (Subspace Networks; every layer before the last stage is constrained to span(U))",
            {"identity", "subspace"})
      .flag("k", o.k, "subspace dimension (0: d/50, or d/100 from d 4096 on, at least 8; must be below d)")
      .flag("variant", o.variant,
            "reparam: constrained projections are factors Z (y = x Zᵀ Uᵀ); projected: full W "
            "re-projected onto span(U) after each step",
            {"reparam", "projected"})
      .flag("wire", o.wire, "element type of the coefficients on the wire", {"fp32", "bf16"})
      .flag("dp", o.dp, "data-parallel replicas of the whole pipeline (gradients averaged per stage)")
      .flag("cp", o.cp,
            "ranks per sequence in every stage (context parallelism: each holds --layout's rows of every sequence "
            "and the attention exchanges K/V among them; gradients averaged over the --cp x --dp ranks of a stage)")
      .flag("kv-compressor", o.kv_compressor,
            "with --cp >= 2: identity: K and V cross the wire as they are; mos: Mixture of Subspaces, each chunk's "
            "K and V in a learned rotation of a shared low-rank basis (after --warmup-pca dense steps; the last "
            "layer dense), at once with --compressor subspace between the stages",
            {"identity", "mos"});
  declare_context_flags(c, o, "--kv-compressor mos");
  declare_network_flags(c, o);
  declare_model_flags(c, o);
  declare_data_flags(c, o);
  c.flag("seq", o.seq, "tokens per sequence (0: the preset's context, at most 256)")
      .flag("batch", o.batch, "sequences per micro-batch")
      .flag("steps", o.steps, "optimizer steps (a resumed run continues to this step)")
      .flag("lr", o.lr, "peak learning rate")
      .flag("min-lr", o.min_lr, "final learning rate of the decay (negative: --lr / 10)")
      .flag("warmup", o.warmup, "linear warm-up steps")
      .flag("decay", o.decay, "learning-rate decay after warm-up", {"cosine", "linear", "constant"})
      .flag("clip", o.clip, "clip of the global gradient norm over every stage (<= 0: off)")
      .flag("eval-every", o.eval_every, "validation loss every N steps (and at the end)")
      .flag("eval-batches", o.eval_batches, "validation batches per evaluation (the same ones each time)")
      .flag("log-every", o.log_every, "print a progress line every N steps (and at evaluations)")
      .flag("metrics", o.metrics, "write one JSON line per step to this file")
      .flag("summary", o.summary, "write a JSON summary of the run here at the end")
      .flag("checkpoint-dir", o.checkpoint_dir,
            "save every stage's checkpoint to DIR/step_NNNNNNNNN/stage-S (and at "
            "the end)")
      .flag("checkpoint-every", o.checkpoint_every, "save every N steps (0: only at the end)")
      .flag("resume", o.resume,
            "continue from a checkpoint saved with the same layout (DIR/step_N); exactly with the saving run's "
            "--steps, else with the learning-rate schedule re-planned to end at --steps")
      .flag("export-hf", o.export_hf,
            "at the end, write the model as a plain Hugging Face Llama directory (a "
            "Subspace Network's E_fix + E Uᵀ and U Z multiplied out; --launcher local)")
      .flag("samples", o.samples, "text samples to print at the end (--launcher local)")
      .flag("sample-tokens", o.sample_tokens, "tokens per sample")
      .flag("prompt", o.prompt, "prompt of the samples")
      .flag("temperature", o.temperature, "sampling temperature (0: greedy)")
      .flag("device", o.device,
            "where in-process ranks train: host, or one GPU shared by all ranks (cuda); auto "
            "picks cuda when a GPU is present",
            {"auto", "host", "cuda"})
      .flag("threads", o.threads, "host worker threads per rank (0: the cores divided among the ranks)")
      .flag("seed", o.seed,
            "seed of the initial weights, the subspace tables, the data order (+ replica) and the "
            "samples");
}

}  // namespace examples::pipeline_llama

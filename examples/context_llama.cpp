// context_llama: trains a Llama 3 model on sequences spread over the ranks of a context group
// (context::context_trainer; docs/context.md): every attention layer exchanges K/V forward and dK/dV backward
// within the group, by a ring or an all-gather, with the chunks of each sequence placed contiguously or zigzag.
//
// Ranks: --cp C ranks per sequence × --dp D replicas = C·D ranks.
//   --launcher local (default)  the ranks as threads of this process through comm::local: on the host (fp32) or,
//                               in a CUDA build, on one GPU (bf16 weights, fp32 masters; each rank its own stream).
//   --launcher nccl (CUDA)      one process per GPU through comm::nccl; the launcher's environment names the ranks
//                               (RANK / WORLD_SIZE / LOCAL_RANK, or mpirun's OMPI_COMM_WORLD_*, and MASTER_ADDR /
//                               MASTER_PORT; see the README's "Communicators and launching"). Every rank's
// communicator is wrapped in comm::throttled: --bandwidth models the links (account mode adds the modelled time to
// a virtual clock; enforce mode also delays completion), and its counters give the bytes sent.
//
// Data: as train_llama (default corpus, --text or --data). Replica q reads slice q of D of the training tokens
// (shuffle seed --seed + q); the ranks of a group read the same sequences and keep their rows of each.
//
// Each step rank 0 prints the loss, learning rate, tokens/s, the K/V bytes the busiest rank sent (per step and per
// layer), its gradient all-reduce bytes and the modelled communication time. --metrics writes one JSON line per
// step; --checkpoint-dir saves the whole model's checkpoint (DIR/step_N) for --resume, which any --cp can resume.
//
// --compressor mos sends each chunk's K and V in a learned rotation of a shared low-rank basis (Mixture of
// Subspaces, compress::kv_subspace_mixture): dense for --warmup-pca steps, whose last
// --pca-steps give the basis, then compressed on every layer but the last.
//
// This file compiles as C++ (host only) or, in a CUDA build, as CUDA (host, one GPU, and NCCL).
#include <subspace/subspace.hpp>

#include <subspace/compress/kv_subspace_mixture.hpp>
#include <subspace/context/context_trainer.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checkpoints.hpp"
#include "common/cli.hpp"
#include "common/context_flags.hpp"
#include "common/device.hpp"
#include "common/flag_checks.hpp"
#include "common/format.hpp"
#include "common/llama_data.hpp"
#include "common/ranks.hpp"

namespace {

using namespace subspace;
using examples::duration;
using examples::human;
namespace fs = std::filesystem;

struct options : examples::model_flags, examples::data_flags, examples::network_flags, examples::context_flags {
  options() { cp = 4; }
  int dp = 1;
  std::int64_t sync_every = 1;
  std::string compressor = "identity";
  std::int64_t seq = 1024, batch = 1, steps = 100, warmup = 10;
  int microbatches = 1;  // an int, as the scheduler takes it: a larger value fails at parsing
  float lr = 3e-3f, min_lr = -1.0f, clip = 1.0f;
  std::string decay = "cosine";
  std::int64_t eval_every = 50, eval_batches = 4, log_every = 1, checkpoint_every = 0;
  std::string metrics, checkpoint_dir, resume;
  std::string device = "auto";
  int threads = 0;
  std::uint64_t seed = 1;
};

/// Everything the ranks share, decided before they start.
struct setup {
  int ranks = 1;
  comm::network net;
  bool modelled = false;
  nn::llama_config cfg;
  std::optional<compress::kv_subspace_options> mos;  // --compressor mos
  examples::data_source src;
  data::token_dataset train, val;
  std::string device_name, where;
  int threads_per_rank = 0;
};

void check(const options& o) {
  const auto need = [](bool ok, const std::string& what) {
    if (!ok) throw examples::cli_error(what);
  };
  need(o.dp >= 1 && o.cp * o.dp <= 256, "--dp must be >= 1 with --cp x --dp <= 256 ranks");
  need(o.seq >= 1, "--seq must be >= 1, got " + std::to_string(o.seq));
  need(o.microbatches >= 1 && o.batch >= 1, "--microbatches and --batch must be >= 1");
  need(o.steps >= 1, "--steps must be >= 1, got " + std::to_string(o.steps));
  need(o.warmup >= 0, "--warmup must be >= 0");
  need(std::isfinite(o.lr) && o.lr > 0, "--lr must be a positive number");
  need(!std::isnan(o.clip), "--clip must be a number (<= 0: off)");
  need(o.min_lr < 0 || o.min_lr <= o.lr, "--min-lr must not exceed --lr");
  need(o.eval_every >= 1 && o.eval_batches >= 1 && o.log_every >= 1,
       "--eval-every, --eval-batches and --log-every must be >= 1");
  need(o.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0: only at the end)");
  need(o.checkpoint_every == 0 || !o.checkpoint_dir.empty(), "--checkpoint-every needs --checkpoint-dir");
  need(o.val_fraction > 0 && o.val_fraction < 1, "--val-fraction must lie in (0, 1)");
  need(o.text.empty() || o.data.empty(), "--text and --data exclude each other");
  need(std::isfinite(o.comm_timeout) && o.comm_timeout > 0, "--comm-timeout must be a positive number of seconds");
  need(o.threads >= 0, "--threads must be >= 0");
  need(o.sync_every >= 1, "--sync-every must be >= 1, got " + std::to_string(o.sync_every));
  examples::check_context_flags(o, o.seq, o.steps, o.compressor == "mos");
  examples::parse_bandwidth(o.bandwidth);
  // Last, as they create directories: every path the run writes.
  if (!o.checkpoint_dir.empty()) examples::need_writable_directory("checkpoint-dir", o.checkpoint_dir);
  if (!o.metrics.empty()) examples::need_writable_file("metrics", o.metrics);
}

setup decide(const options& o) {
  setup s;
  s.ranks = o.cp * o.dp;
  const examples::modelled_network m = examples::network_of(o);
  s.net = m.net;
  s.modelled = m.modelled;
  s.cfg = examples::model_config(o, o.seq);
  if (o.compressor == "mos") s.mos = examples::mos_options(o, s.cfg, o.seed, "--compressor mos");
  return s;
}

void load_data(const options& o, setup& s) {
  if (o.data.empty() && s.cfg.vocab < 256)
    throw examples::cli_error("--vocab " + std::to_string(s.cfg.vocab) + " (--preset " + o.preset +
                              "): byte-level text needs a vocabulary of at least 256");
  s.src = examples::choose_data(o, s.cfg.vocab);
  std::tie(s.train, s.val) = examples::open_tokens(s.src, o.val_fraction);
  if (s.train.tokens() < std::uint64_t(o.seq + 1))
    throw examples::cli_error("--seq " + std::to_string(o.seq) + ": the training tokens (" +
                              std::to_string(s.train.tokens()) + ") hold no sequence that long");
}

/// K/V bytes one rank sends per layer and micro-batch, forward and backward: (C − 1) blocks of its rows' K and V
/// each way; compressed, (C − 1) payloads of n (r_K + r_V) coefficients per chunk and 2m fp32 rotation coefficients.
double kv_bytes_per_layer(const options& o, const setup& s, std::size_t element_bytes, bool compressed) {
  const double rows = double(o.batch) * double(o.seq / o.cp);
  if (!compressed) return 2.0 * double(o.cp - 1) * 2.0 * rows * double(s.cfg.kv_dim()) * double(element_bytes);
  const double chunks = double(o.batch) * (o.layout == "zigzag" ? 2.0 : 1.0);
  const double payload = rows * double(s.mos->k_rank() + s.mos->v_rank()) * double(element_bytes) +
                         chunks * 2.0 * double(s.mos->generators) * 4.0;
  return 2.0 * double(o.cp - 1) * payload;
}

void print_header(const options& o, const setup& s, std::size_t element_bytes) {
  const nn::llama_config& cfg = s.cfg;
  std::printf("model '%s': %s parameters (d %lld, %lld layers, %lld/%lld heads, FFN %lld, vocab %lld)\n",
              cfg.name.c_str(), human(double(cfg.parameters())).c_str(), (long long)cfg.d_model,
              (long long)cfg.n_layers, (long long)cfg.n_heads, (long long)cfg.n_kv_heads, (long long)cfg.ffn_hidden,
              (long long)cfg.vocab);
  std::printf("data: %s — %s train / %s val tokens; replica q reads train shard q of %d\n",
              examples::describe_data(s.src, s.train, s.val).c_str(), human(double(s.train.tokens())).c_str(),
              human(double(s.val.tokens())).c_str(), o.dp);
  std::printf("context: %d ranks per sequence x %d replica%s = %d ranks (%s) on %s\n", o.cp, o.dp, o.dp == 1 ? "" : "s",
              s.ranks, s.where.c_str(), s.device_name.c_str());
  std::printf("sequence %lld tokens, %s placement (%lld rows per rank), %s exchange; %lld x %lld sequences per step\n",
              (long long)o.seq, o.layout.c_str(), (long long)(o.seq / o.cp), o.attention.c_str(),
              (long long)o.microbatches, (long long)o.batch);
  const double dense = kv_bytes_per_layer(o, s, element_bytes, false);
  std::printf("K/V on the wire: %sB per rank per layer and micro-batch (forward + backward)\n", human(dense).c_str());
  if (s.mos) {
    const double mixed = kv_bytes_per_layer(o, s, element_bytes, true);
    std::printf(
        "compressor: Mixture of Subspaces, r_K %lld, r_V %lld, m %lld: dense for %lld warm-up steps (the last %lld "
        "gather the K/V second moments), then %sB per compressed layer (%.1f%% fewer), the last layer dense%s\n",
        (long long)s.mos->k_rank(), (long long)s.mos->v_rank(), (long long)s.mos->generators,
        (long long)s.mos->warmup_steps, (long long)s.mos->pca_steps, human(mixed).c_str(), 100.0 * (1 - mixed / dense),
        s.mos->unplug_at_step ? (", dense again from step " + std::to_string(s.mos->unplug_at_step)).c_str() : "");
  }
  if (s.modelled)
    std::printf("network: every link %s, %s mode\n", examples::link_text(s.net.default_link).c_str(),
                s.net.mode == comm::throttle_mode::enforce ? "enforce" : "account");
  else std::printf("network: not modelled (--bandwidth none; bytes are still counted)\n");
  std::fflush(stdout);
}

/// What each rank reports after each step (gathered through the unthrottled communicator).
enum field : int { f_kv_bytes, f_grad_bytes, f_comm_s, f_count };

/// Trains rank `world.rank()`; rank 0 prints. Returns the exit status (the same on every rank).
template <class Model, class Exec, class Comm, class Compressor>
int run_rank(const Exec& ex, Comm world, Comm stats, Compressor compressor, const options& o, const setup& s,
             io::metrics_writer* metrics) {
  const int rank = world.rank(), n = world.size(), replica = rank / o.cp;
  const bool lead = rank == 0;
  context::trainer_options to;
  to.clip = o.clip;
  to.schedule = {o.lr, o.min_lr >= 0 ? o.min_lr : o.lr / 10, std::min(o.warmup, o.steps), o.steps,
                 optim::parse_decay(o.decay)};
  to.context_ranks = o.cp;
  to.seq = o.seq;
  to.layout = o.placement();
  to.kv_exchange = o.exchange();
  to.sync_every = o.sync_every;
  auto stack = subspace::stack{.communicator = comm::throttled<Comm>(std::move(world), s.net),
                               .compressor = std::move(compressor),
                               .scheduler = schedule::gradient_accumulation{int(o.microbatches), n},
                               .optimizer = optim::adamw{}};
  context::context_trainer<Model, decltype(stack)> t(s.cfg, std::move(stack), to, ex);

  data::batch_loader train_data(
      s.train.shard(replica, o.dp),
      data::loader_options{o.batch, o.seq, s.cfg.vocab, o.shuffle, o.seed + std::uint64_t(replica), true,
                           "train, replica " + std::to_string(replica) + " of " + std::to_string(o.dp)});
  std::optional<data::batch_loader> val_data;
  if (s.val.tokens() > std::uint64_t(o.seq))
    val_data.emplace(s.val, data::loader_options{o.batch, o.seq, s.cfg.vocab, false, o.seed, true, "val"});
  if (!o.resume.empty()) {
    const io::trainer_state ts = t.resume(o.resume, train_data);
    if (lead) std::printf("resumed from %s at step %lld\n", o.resume.c_str(), (long long)ts.step);
  } else {
    t.init(o.seed);
  }
  const auto save = [&](std::int64_t step) {
    const std::string name = examples::checkpoint_name(step);
    t.save(fs::path(o.checkpoint_dir) / name, train_data.position(), o.seed);
    if (lead) std::printf("saved checkpoint %s\n", (fs::path(o.checkpoint_dir) / name).c_str());
  };

  const auto start = std::chrono::steady_clock::now();
  const auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  std::vector<double> all(std::size_t(n) * f_count);
  double last_val = NAN, train_time = 0, kv_total = 0, comm_total = 0;
  std::int64_t timed_tokens = 0, tokens_done = 0;
  const std::int64_t first_step = t.steps_done() + 1;
  const auto kv_sent = [](const comm::traffic& x) {
    return double(x[comm::op_kind::send].bytes_sent + x[comm::op_kind::all_gather].bytes_sent +
                  x[comm::op_kind::reduce_scatter].bytes_sent);
  };
  for (std::int64_t step = first_step; step <= o.steps; ++step) {
    const double t0 = seconds();
    const comm::traffic before = t.communicator().metrics();
    const bool compressed = t.compressing_kv();
    const train::step_result r = t.step(train_data);
    const comm::traffic& after = t.communicator().metrics();
    const double dt = seconds() - t0;
    std::array<double, f_count> mine{};
    mine[f_kv_bytes] = kv_sent(after) - kv_sent(before);
    mine[f_grad_bytes] =
        double(after[comm::op_kind::all_reduce].bytes_sent - before[comm::op_kind::all_reduce].bytes_sent);
    mine[f_comm_s] = s.modelled ? after.seconds - before.seconds : 0.0;
    stats
        .all_gather(view<const double, host_space>(mine.data(), {f_count}),
                    view<double, host_space>(all.data(), {n, f_count}))
        .wait();
    if (!std::isfinite(r.loss) || r.skipped) {  // every rank has the same loss and norm
      if (lead)
        std::fprintf(stderr,
                     "context_llama: step %lld: loss %g, gradient norm %g — training diverged (lower --lr or --clip)\n",
                     (long long)step, r.loss, r.grad_norm);
      return 1;
    }
    double kv_max = 0, grad_max = 0, comm_max = 0;
    for (int p = 0; p < n; ++p) {
      kv_max = std::max(kv_max, all[std::size_t(p) * f_count + f_kv_bytes]);
      grad_max = std::max(grad_max, all[std::size_t(p) * f_count + f_grad_bytes]);
      comm_max = std::max(comm_max, all[std::size_t(p) * f_count + f_comm_s]);
    }
    tokens_done += r.tokens;
    kv_total += kv_max;
    comm_total += comm_max;
    if (step > first_step || o.steps == first_step) {  // the first step includes one-time set-up
      train_time += dt;
      timed_tokens += r.tokens;
    }
    const double tok_s = timed_tokens > 0 ? double(timed_tokens) / train_time : double(r.tokens) / dt;
    std::optional<double> val;
    if (val_data && (step % o.eval_every == 0 || step == o.steps))
      val = last_val = t.evaluate(*val_data, o.eval_batches);
    if (!o.checkpoint_dir.empty() && o.checkpoint_every > 0 && step % o.checkpoint_every == 0 && step != o.steps)
      save(step);
    if (!lead) continue;
    const double per_layer = kv_max / double(s.cfg.n_layers) / double(o.microbatches);
    if (step % o.log_every == 0 || step == 1 || step == o.steps || val) {
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "step %lld/%lld | loss %.4f | lr %.2e | norm %.3f | %s tok/s | K/V %sB/rank (%sB/layer) | "
                    "grads %sB/rank",
                    (long long)step, (long long)o.steps, r.loss, double(r.lr), r.grad_norm, human(tok_s).c_str(),
                    human(kv_max).c_str(), human(per_layer).c_str(), human(grad_max).c_str());
      std::string line = buf;
      if (s.modelled) {
        if (comm_max < 1) std::snprintf(buf, sizeof buf, " | comm %.3gms", 1e3 * comm_max);
        else std::snprintf(buf, sizeof buf, " | comm %.2fs", comm_max);
        line += buf;
      }
      if (val) {
        std::snprintf(buf, sizeof buf, " | val %.4f", *val);
        line += buf;
      }
      line += " | ETA " + duration(double(o.steps - step) * double(r.tokens) / tok_s);
      std::printf("%s\n", line.c_str());
      std::fflush(stdout);
    }
    if (!compressed && t.compressing_kv())
      std::printf(
          "switched to Mixture of Subspaces after step %lld (loss %.4f): U_0 from the K/V of the last %lld "
          "warm-up steps, the same tables on every rank\n",
          (long long)step, r.loss, (long long)s.mos->pca_steps);
    if (metrics) {
      io::json j = io::json::object({{"step", io::json(step)}, {"loss", io::json(r.loss)}});
      if (val) j.set("val_loss", io::json(*val));
      j.set("lr", io::json(double(r.lr)));
      j.set("tokens", io::json(tokens_done));
      j.set("tok_per_s", io::json(tok_s));
      j.set("step_ms", io::json(1e3 * dt));
      j.set("grad_norm", io::json(r.grad_norm));
      io::json kv = io::json::array();
      for (int p = 0; p < n; ++p) kv.push_back(io::json(std::int64_t(all[std::size_t(p) * f_count + f_kv_bytes])));
      j.set("kv_bytes_sent", kv);
      j.set("kv_bytes_per_layer", io::json(per_layer));
      j.set("grad_bytes_sent", io::json(grad_max));
      j.set("kv_compressed", io::json(compressed));
      j.set("comm_model_s", io::json(comm_max));
      metrics->write(j);
    }
  }
  if (!o.checkpoint_dir.empty()) save(t.steps_done());
  if (!lead) return 0;
  std::printf("done: %lld steps, %s tokens, %s; final val loss %.4f\n", (long long)o.steps,
              human(double(tokens_done)).c_str(), duration(seconds()).c_str(), last_val);
  std::printf("K/V sent %sB per rank in all (the most of any rank per step, summed)", human(kv_total).c_str());
  if (s.modelled) std::printf(", modelled communication %.2f s", comm_total);
  std::printf("\n");
  std::fflush(stdout);
  return 0;
}

/// The ranks as threads, through comm::local (host memory, or device memory on one GPU).
template <class Exec>
int run_local(const options& o, setup& s) {
  using T = std::conditional_t<std::is_same_v<Exec, exec::host>, float, bf16>;
  const examples::local_ranks<Exec> ranks(s.ranks, o.comm_timeout, s.threads_per_rank);
  std::optional<io::metrics_writer> metrics;
  if (!o.metrics.empty()) metrics.emplace(o.metrics, examples::metrics_mode(o.metrics, o.resume));
  std::vector<comm::local> world = ranks.world(), stats = ranks.stats_world();
  const auto run = [&](auto compressor) {
    return examples::on_threads(
        s.ranks,
        [&](int r) {
          return run_rank<nn::llama<Exec, T>>(ranks.exec(r), world[std::size_t(r)], stats[std::size_t(r)], compressor,
                                              o, s, r == 0 && metrics ? &*metrics : nullptr);
        },
        world, stats);
  };
  if (!s.mos) return run(compress::identity{});
  return run(compress::kv_subspace_mixture(*s.mos));
}

#if defined(__CUDACC__)
/// --launcher nccl: this process is one rank of the launcher's world, on GPU LOCAL_RANK.
int run_nccl(const options& o, setup& s) {
  examples::nccl_process proc = examples::nccl_process::connect(o.comm_timeout);
  const comm::launch_info& li = proc.info;
  if (li.world_size != s.ranks)
    throw examples::cli_error("--cp " + std::to_string(o.cp) + " x --dp " + std::to_string(o.dp) + " = " +
                              std::to_string(s.ranks) + " ranks, but the launcher (" + li.launcher + ") started " +
                              std::to_string(li.world_size));
  try {
    if (li.rank == 0) {  // rank 0 converts --text into the shard cache and cleans the checkpoints first
      load_data(o, s);
      examples::clean_before_run(o.checkpoint_dir, o.resume);
    }
    proc.stats.barrier().wait();
    if (li.rank != 0) load_data(o, s);
    s.device_name = proc.device_name;
    s.where = "NCCL processes, " + li.launcher + " launch";
    if (li.rank == 0) print_header(o, s, sizeof(bf16));
    std::optional<io::metrics_writer> metrics;
    if (li.rank == 0 && !o.metrics.empty()) metrics.emplace(o.metrics, examples::metrics_mode(o.metrics, o.resume));
    const auto run = [&](auto compressor) {
      return run_rank<nn::llama<exec::cuda, bf16>>(exec::cuda{proc.stream}, proc.world, proc.stats, compressor, o, s,
                                                   metrics ? &*metrics : nullptr);
    };
    const int status = s.mos ? run(compress::kv_subspace_mixture(*s.mos)) : run(compress::identity{});
    cuda_check(cudaStreamSynchronize(proc.stream));
    return status;
  } catch (const std::exception& e) {
    proc.abort(std::string("rank ") + std::to_string(li.rank) + " failed: " + e.what());
    throw;
  }
}
#endif

}  // namespace

int main(int argc, char** argv) {
  options o;
  examples::cli cli(
      "context_llama",
      "Trains a Llama 3 model with context parallelism: every sequence is spread over --cp ranks, and\n"
      "each attention layer exchanges K/V (forward) and dK/dV (backward) within the group by a ring or an\n"
      "all-gather. --cp x --dp ranks run as threads (comm::local) on the host or one GPU; every rank's\n"
      "traffic goes through comm::throttled. With no data flags it trains on the King James Bible,\n"
      "byte-tokenized.");
  cli.flag("cp", o.cp, "ranks per sequence (the context group)")
      .flag("dp", o.dp, "data-parallel replicas of the context group (gradients averaged over all ranks)")
      .flag("sync-every", o.sync_every,
            "1: gradients averaged over every rank each step; c > 1: each rank steps on its own rows' gradient "
            "and the weights are averaged every c steps (checkpoints then hold one directory per rank)")
      .flag("compressor", o.compressor,
            "identity: K and V cross the wire as they are; mos: Mixture of Subspaces, each chunk's K and V in a "
            "learned rotation of a shared low-rank basis (after --warmup-pca dense steps; the last layer stays "
            "dense)",
            {"identity", "mos"});
  examples::declare_context_flags(cli, o, "--compressor mos");
  examples::declare_network_flags(cli, o);
  examples::declare_model_flags(cli, o);
  examples::declare_data_flags(cli, o);
  cli.flag("seq", o.seq, "tokens per sequence, spread over the --cp ranks (raises the preset's context if longer)")
      .flag("batch", o.batch, "sequences per micro-batch")
      .flag("microbatches", o.microbatches, "micro-batches per optimizer step")
      .flag("steps", o.steps, "optimizer steps (a resumed run continues to this step)")
      .flag("lr", o.lr, "peak learning rate")
      .flag("min-lr", o.min_lr, "final learning rate of the decay (negative: --lr / 10)")
      .flag("warmup", o.warmup, "linear warm-up steps")
      .flag("decay", o.decay, "learning-rate decay after warm-up", {"cosine", "linear", "constant"})
      .flag("clip", o.clip, "clip of the global gradient norm (<= 0: off)")
      .flag("eval-every", o.eval_every, "validation loss every N steps (and at the end)")
      .flag("eval-batches", o.eval_batches, "validation batches per evaluation (the same ones each time)")
      .flag("log-every", o.log_every, "print a progress line every N steps (and at evaluations)")
      .flag("metrics", o.metrics, "write one JSON line per step to this file")
      .flag("checkpoint-dir", o.checkpoint_dir, "save the model's checkpoint to DIR/step_NNNNNNNNN (and at the end)")
      .flag("checkpoint-every", o.checkpoint_every, "save every N steps (0: only at the end)")
      .flag("resume", o.resume,
            "continue from a checkpoint DIR/step_N (any --cp and --layout; with --sync-every > 1 the ranks that "
            "saved it); the learning-rate schedule follows --steps, so the saving run's --steps continues it")
      .flag("device", o.device,
            "where the in-process ranks train: host, or one GPU shared by all ranks (cuda); auto picks cuda "
            "when a GPU is present",
            {"auto", "host", "cuda"})
      .flag("threads", o.threads, "host worker threads per rank (0: the cores divided among the ranks)")
      .flag("seed", o.seed, "seed of the initial weights and the data order (+ replica)");
  return examples::guarded_main("context_llama", [&] {
    if (!cli.parse(argc, argv)) return 0;
    check(o);
    if (o.launcher == "local") examples::clean_before_run(o.checkpoint_dir, o.resume);
    setup s = decide(o);
    if (o.launcher == "nccl") {
#if defined(__CUDACC__)
      return run_nccl(o, s);
#else
      throw examples::cli_error("--launcher nccl: this build has no CUDA path (configure with the cuda preset)");
#endif
    }
    const examples::device_choice d = examples::choose_device(o.device);
#if defined(__CUDACC__)
    if (d.cuda) {
      load_data(o, s);
      s.device_name = d.name;
      s.where = "threads sharing one GPU, comm::local";
      print_header(o, s, sizeof(bf16));
      return run_local<exec::cuda>(o, s);
    }
#endif
    load_data(o, s);
    const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
    s.threads_per_rank = o.threads ? o.threads : std::max(1, cores / s.ranks);
    s.device_name = "host";
    s.where = "threads, comm::local, " + std::to_string(s.threads_per_rank) + " worker thread" +
              (s.threads_per_rank == 1 ? "" : "s") + " each";
    print_header(o, s, sizeof(float));
    return run_local<exec::host>(o, s);
  });
}

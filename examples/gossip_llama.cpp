// gossip_llama: trains a Llama 3 model on N ranks with gossip data parallelism (Decent-DP: decent::gossip_trainer
// over a topology) or with the all-reduce baseline (dist::data_parallel_trainer), and reports what crosses the
// (modelled) network. Guide: docs/decent.md.
//
// Ranks:
//   --launcher local (default)  N ranks as threads of this process, through comm::local: on the host (fp32) or,
//                               in a CUDA build, on one GPU (bf16 weights, fp32 masters; each rank its own stream).
//   --launcher nccl (CUDA)      one process per GPU through comm::nccl; the launcher's environment names the ranks
//                               (RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE, or mpirun's OMPI_COMM_WORLD_*,
//                               and MASTER_ADDR / MASTER_PORT; see the README's "Communicators and launching").
// Every rank's communicator is wrapped in comm::throttled: --bandwidth models the links (account mode adds the
// modelled time to a virtual clock; enforce mode also delays completion), and its counters give the bytes each
// rank sent. With --bandwidth none the bytes are still counted and no time is modelled.
//
// Data: as train_llama (default corpus, --text or --data; common/llama_data.hpp). The training tokens are cut into
// N contiguous slices of (nearly) equal length: rank r reads slice r, tokens [r·T/N, (r+1)·T/N), through its own
// batch_loader whose shuffle seed is --seed + r, so the ranks see disjoint windows in different orders (the
// heterogeneous shards of decentralised training). Validation is the shared held-out part, read by rank 0.
//
// Each step rank 0 prints the mean loss over the ranks, the learning rate, the global tokens/s, the bytes each
// rank sent in the step (the most of any rank) and the modelled communication time; at evaluation steps the
// consensus distance mean_i ||x_i - x̄|| / ||x̄|| (gossip) and the validation loss of the global average (gossip:
// global_average, evaluate, revert_global_average). --metrics writes one JSON line per step. After each step the
// ranks exchange these few numbers through a second, unthrottled communicator (not counted in bytes_sent).
//
// This file compiles as C++ (host only) or, in a CUDA build, as CUDA (host, one GPU, and NCCL).
#include <subspace/subspace.hpp>
#if defined(__CUDACC__)
#include <subspace/comm/nccl.cuh>
#endif

#include <decent/decent.hpp>
#include <decent/gossip_trainer.hpp>
#include <subspace/dist/data_parallel_trainer.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cli.hpp"
#include "common/device.hpp"
#include "common/flag_checks.hpp"
#include "common/format.hpp"
#include "common/llama_data.hpp"
#include "common/ranks.hpp"
#include "common/subspace_flags.hpp"

namespace {

using namespace subspace;
using examples::duration;
using examples::human;
using examples::link_text;
using examples::on_threads;
using examples::parse_bandwidth;
using examples::without_location;

struct options : examples::model_flags, examples::data_flags, examples::network_flags, examples::subspace_flags {
  // ranks, topology, network
  int ranks = 0;  // 0: 4 with --launcher local, WORLD_SIZE with --launcher nccl
  std::string topology = "alternating_exp_ring";
  int local_ranks = 0;  // 0: 1 with --launcher local, LOCAL_WORLD_SIZE with nccl
  double bucket_mb = 25.0;
  // optimizer
  std::string optimizer = "auto";
  int accum_window = 8;  // an int, as the scheduler takes it: a larger value fails at parsing
  float weight_decay = -1.0f, beta1 = -1.0f, beta2 = -1.0f;
  // (GaLore/GoLore's flags: examples::subspace_flags)
  // batch and schedule
  std::int64_t seq = 0, batch = 8, steps = 300, warmup = 30;
  int accumulation = 1;  // an int, as the scheduler takes it: a larger value fails at parsing
  float lr = 3e-3f, min_lr = -1.0f, clip = 1.0f;
  std::string decay = "cosine";
  // evaluation and output
  std::int64_t eval_every = 50, eval_batches = 20, log_every = 1;
  std::string metrics, summary;
  std::int64_t samples = 1, sample_tokens = 240;
  std::string prompt = "And God said";
  float temperature = 0.8f;
  // execution
  std::string device = "auto";
  int threads = 0;
  std::uint64_t seed = 1;
};

const std::vector<std::string> topologies = {"complete", "ring", "one_peer_exp", "alternating_exp_ring", "allreduce"};
// GaLore and GoLore run on both: the gossip trainer steps any Optimizer from the mixed point.
const std::vector<std::string> gossip_optimizers = {"decent_adam", "decent_adamw", "accum_adam",
                                                    "accum_adamw", "galore",       "golore"};
const std::vector<std::string> allreduce_optimizers = {"adamw", "galore", "golore"};

bool one_of(const std::string& x, const std::vector<std::string>& list) {
  return std::find(list.begin(), list.end(), x) != list.end();
}

/// The topology as the group_schedule every decent topology is; raises cli_error naming the flags and the rule.
decent::group_schedule make_schedule(const options& o, int ranks, int local_ranks) {
  try {
    if (o.topology == "complete") return decent::complete(ranks);
    if (o.topology == "ring") return decent::ring(ranks);
    if (o.topology == "one_peer_exp") return decent::one_peer_exp(ranks);
    return decent::alternating_exp_ring(ranks, local_ranks);
  } catch (const subspace::invalid_argument& e) {
    std::string flags = "--ranks " + std::to_string(ranks) + " --topology " + o.topology;
    if (o.topology == "alternating_exp_ring") flags += " --local-ranks " + std::to_string(local_ranks);
    throw examples::cli_error(flags + ": " + without_location(e.what()));
  }
}

/// Everything the ranks share, decided before they start.
struct setup {
  int ranks = 1, local_ranks = 1;
  bool gossip = true;
  std::string optimizer;                           // resolved (no "auto")
  std::optional<decent::group_schedule> schedule;  // gossip only
  comm::network net;
  bool modelled = false;  // --bandwidth other than none
  nn::llama_config cfg;
  std::int64_t seq = 0;
  examples::data_source src;
  data::token_dataset train, val;
  std::string device_name;  // "host", or the GPU's name
  std::string where;        // how the ranks run, for the header
  std::string projected;    // GaLore/GoLore: what they project ("projected 28 of 30 matrices at rank 16-32, ...")
  int threads_per_rank = 0;
};

/// Flag checks that need no data and no launcher (exit 2 on failure).
void check(const options& o) {
  const auto need = [](bool ok, const std::string& what) {
    if (!ok) throw examples::cli_error(what);
  };
  need(o.ranks >= 0, "--ranks must be >= 1 (or 0: 4 in-process ranks, or WORLD_SIZE under --launcher nccl)");
  need(o.ranks <= 64, "--ranks must be <= 64, got " + std::to_string(o.ranks));
  need(o.local_ranks >= 0, "--local-ranks must be >= 1 (or 0: the launcher's)");
  need(std::isfinite(o.bucket_mb) && o.bucket_mb > 0, "--bucket-mb must be a positive number of megabytes");
  need(std::isfinite(o.comm_timeout) && o.comm_timeout > 0, "--comm-timeout must be a positive number of seconds");
  need(o.accum_window >= 1, "--accum-window must be >= 1, got " + std::to_string(o.accum_window));
  need(o.steps >= 1, "--steps must be >= 1, got " + std::to_string(o.steps));
  need(o.batch >= 1 && o.accumulation >= 1, "--batch and --accumulation must be >= 1");
  need(o.seq >= 0, "--seq must be >= 1 (or 0 for the preset's context, at most 256)");
  need(o.warmup >= 0, "--warmup must be >= 0, got " + std::to_string(o.warmup));
  need(std::isfinite(o.lr) && o.lr > 0, "--lr must be a positive number");
  need(o.min_lr < 0 || o.min_lr <= o.lr, "--min-lr must not exceed --lr");
  need(o.beta1 < 1 && o.beta2 < 1, "--beta1 and --beta2 must be below 1 (negative: the optimizer's default)");
  need(o.eval_every >= 1 && o.eval_batches >= 1 && o.log_every >= 1,
       "--eval-every, --eval-batches and --log-every must be >= 1");
  need(o.val_fraction > 0 && o.val_fraction < 1, "--val-fraction must lie in (0, 1)");
  need(o.samples >= 0 && o.sample_tokens >= 0, "--samples and --sample-tokens must be >= 0");
  examples::need_sampling(o.temperature, o.prompt, o.samples, o.sample_tokens);
  need(std::isfinite(o.weight_decay), "--weight-decay must be a finite number (negative: the optimizer's default)");
  need(!std::isnan(o.clip), "--clip must be a number (<= 0: off)");
  examples::check_subspace_flags(o);
  need(o.val_data.empty() || !o.data.empty(), "--val-data needs --data");
  need(o.text.empty() || o.data.empty(), "--text and --data exclude each other");
  need(o.threads >= 0, "--threads must be >= 0");
  const bool gossip = o.topology != "allreduce";
  if (gossip)
    need(o.optimizer == "auto" || one_of(o.optimizer, gossip_optimizers),
         "--optimizer " + o.optimizer + " with --topology " + o.topology +
             ": a gossip topology takes decent_adam, decent_adamw, accum_adam, accum_adamw, galore or golore (the "
             "optimizer steps from the mixed point); " +
             o.optimizer + " belongs to --topology allreduce (decent_adamw is AdamW from the mixed point)");
  else
    need(o.optimizer == "auto" || one_of(o.optimizer, allreduce_optimizers),
         "--optimizer " + o.optimizer +
             " with --topology allreduce: the all-reduce baseline takes adamw, galore or "
             "golore; " +
             o.optimizer + " needs a gossip topology (complete, ring, one_peer_exp, alternating_exp_ring)");
  parse_bandwidth(o.bandwidth);
  // Last, as they create directories: every path the run writes.
  if (!o.metrics.empty()) examples::need_writable_file("metrics", o.metrics);
  if (!o.summary.empty()) examples::need_writable_file("summary", o.summary);
}

/// The shared part of the setup once the world size and local size are known: topology, optimizer, network.
setup decide(const options& o, int ranks, int local_ranks) {
  setup s;
  s.ranks = ranks;
  s.local_ranks = local_ranks;
  s.gossip = o.topology != "allreduce";
  s.optimizer = o.optimizer != "auto" ? o.optimizer : s.gossip ? "accum_adamw" : "adamw";
  if (s.gossip) s.schedule.emplace(make_schedule(o, ranks, local_ranks));
  const examples::modelled_network m = examples::network_of(o);  // none: counted, never delayed
  s.net = m.net;
  s.modelled = m.modelled;
  return s;
}

/// Model and data (after decide): the configuration, the data source, the token datasets.
void load_model_and_data(const options& o, setup& s) {
  s.cfg = examples::model_config(o, o.seq);
  s.seq = o.seq ? o.seq : std::min<std::int64_t>(s.cfg.max_seq, 256);
  s.src = examples::choose_data(o, s.cfg.vocab);
  std::tie(s.train, s.val) = examples::open_tokens(s.src, o.val_fraction);
  // GaLore/GoLore: what they project of this model, refused before any rank starts when nothing would be.
  if (s.optimizer == "galore") s.projected = examples::projection_of(examples::galore_from(o, {}), o, s.cfg);
  if (s.optimizer == "golore")
    s.projected = examples::projection_of(examples::golore_from(o, {}, o.steps, o.seed), o, s.cfg);
}

void print_header(const options& o, const setup& s) {
  const nn::llama_config& cfg = s.cfg;
  std::printf("model '%s': %s parameters (d %lld, %lld layers, %lld/%lld heads, FFN %lld, vocab %lld)\n",
              cfg.name.c_str(), human(double(cfg.parameters())).c_str(), (long long)cfg.d_model,
              (long long)cfg.n_layers, (long long)cfg.n_heads, (long long)cfg.n_kv_heads, (long long)cfg.ffn_hidden,
              (long long)cfg.vocab);
  std::printf(
      "data: %s — %s train / %s val tokens; rank r reads train slice r of %d (~%s tokens each), shuffle "
      "seed %llu + r\n",
      examples::describe_data(s.src, s.train, s.val).c_str(), human(double(s.train.tokens())).c_str(),
      human(double(s.val.tokens())).c_str(), s.ranks, human(double(s.train.tokens()) / s.ranks).c_str(),
      (unsigned long long)o.seed);
  std::string topo;
  if (s.gossip) {
    topo = "gossip, topology " + o.topology + " (period " + std::to_string(s.schedule->period());
    if (o.topology == "alternating_exp_ring")
      topo += ", " + std::to_string(s.ranks / s.local_ranks) + " nodes of " + std::to_string(s.local_ranks) +
              (s.local_ranks == 1 ? " rank" : " ranks");
    topo += ")";
  } else {
    topo = "all-reduce data parallel (bucketed gradient all-reduce)";
  }
  std::string opt = s.optimizer;
  if (s.optimizer.rfind("accum_", 0) == 0) opt += " (K = " + std::to_string(o.accum_window) + ")";
  if (!s.projected.empty()) opt += " (" + s.projected + ")";
  std::printf("%d ranks (%s) on %s | %s | %s\n", s.ranks, s.where.c_str(), s.device_name.c_str(), topo.c_str(),
              opt.c_str());
  if (s.modelled)
    std::printf("network: every link %s, %s mode\n", link_text(s.net.default_link).c_str(),
                s.net.mode == comm::throttle_mode::enforce ? "enforce" : "account");
  else std::printf("network: not modelled (--bandwidth none; bytes are still counted)\n");
  const std::int64_t per_rank = o.batch * s.seq * o.accumulation;
  std::printf("batch %lld x %lld x %lld accumulation = %lld tokens/step per rank, %lld globally | %lld steps\n",
              (long long)o.batch, (long long)s.seq, (long long)o.accumulation, (long long)per_rank,
              (long long)(per_rank * s.ranks), (long long)o.steps);
  std::fflush(stdout);
}

// ---- optimizers ----------------------------------------------------------------------------------------------

/// Calls f(std::bool_constant<gossip>{}, optimizer) with the optimizer --optimizer names (resolved in setup);
/// only the pairs check() accepts are instantiated.
template <class F>
int with_optimizer(const options& o, const setup& s, F&& f) {
  const auto on_topology = [&](const auto& opt) {
    return s.gossip ? f(std::true_type{}, opt) : f(std::false_type{}, opt);
  };
  const auto betas = [&](auto& opt) {
    if (o.beta1 >= 0) opt.beta1 = o.beta1;
    if (o.beta2 >= 0) opt.beta2 = o.beta2;
    if (o.weight_decay >= 0) opt.weight_decay = o.weight_decay;
  };
  const std::string& name = s.optimizer;
  if (name == "decent_adam") {
    decent::decent_adam d;
    betas(d);
    return f(std::true_type{}, d);
  }
  if (name == "decent_adamw") {
    decent::decent_adamw d;
    betas(d);
    return f(std::true_type{}, d);
  }
  if (name == "accum_adam") {
    decent::accum_adam d;
    d.accum_iter = int(o.accum_window);
    betas(d);
    return f(std::true_type{}, d);
  }
  if (name == "accum_adamw") {
    decent::accum_adamw d;
    d.accum_iter = int(o.accum_window);
    betas(d);
    return f(std::true_type{}, d);
  }
  optim::adamw inner;
  betas(inner);
  if (name == "adamw") return f(std::false_type{}, inner);
  if (name == "galore") return on_topology(examples::galore_from(o, inner));
  return on_topology(examples::golore_from(o, inner, o.steps, o.seed));
}

// ---- one rank ------------------------------------------------------------------------------------------------

/// Rank r's training loader: slice r of N of the training tokens, shuffled with seed + r.
data::batch_loader rank_loader(const options& o, const setup& s, int rank) {
  data::loader_options lo{o.batch,
                          s.seq,
                          s.cfg.vocab,
                          o.shuffle,
                          o.seed + std::uint64_t(rank),
                          true,
                          "train, rank " + std::to_string(rank) + " of " + std::to_string(s.ranks)};
  return data::batch_loader(s.train.shard(rank, s.ranks), lo);
}

/// A rank's validation loader: the shared held-out tokens, in order (none without them). Evaluation is
/// collective: every rank evaluates the same batches and the trainer averages over the ranks.
std::optional<data::batch_loader> val_loader(const options& o, const setup& s) {
  std::optional<data::batch_loader> v;
  if (!s.val.empty()) v.emplace(s.val, data::loader_options{o.batch, s.seq, s.cfg.vocab, false, o.seed, true, "val"});
  return v;
}

/// What each rank reports after each step (gathered on every rank through the unthrottled communicator).
enum field : int { f_loss, f_norm, f_bad, f_tokens, f_bytes, f_comm_s, f_lr, f_count };

/// Trains on this rank; rank 0 prints and writes the metrics (`metrics`: rank 0's --metrics file, opened before
/// the ranks start, or null). Returns the exit status (the same on every rank).
template <bool Gossip, class Exec, class Opt, class Comm>
int run_rank(const Exec& ex, Comm world, Comm stats, const Opt& opt, const options& o, const setup& s,
             data::batch_loader train_data, std::optional<data::batch_loader> val_data, io::metrics_writer* metrics) {
  using T = std::conditional_t<std::is_same_v<Exec, exec::host>, float, bf16>;
  using model_t = nn::llama<Exec, T>;
  const int rank = world.rank(), n = world.size();
  const bool lead = rank == 0;

  const bool evaluating = val_data.has_value();                       // the same on every rank
  const std::int64_t rank_tokens = o.batch * s.seq * o.accumulation;  // per rank and step

  decent::gossip_options to;
  to.accumulation = o.accumulation;
  to.clip = o.clip;
  to.schedule = {o.lr, o.min_lr >= 0 ? o.min_lr : o.lr / 10, std::min(o.warmup, o.steps), o.steps,
                 optim::parse_decay(o.decay)};
  to.bucket_bytes = std::int64_t(std::llround(o.bucket_mb * 1e6));
  comm::throttled<Comm> wire(std::move(world), s.net);
  auto t = [&] {
    if constexpr (Gossip)
      return decent::gossip_trainer(
          model_t(s.cfg, ex),
          subspace::stack{.communicator = std::move(wire), .scheduler = *s.schedule, .optimizer = opt}, to);
    else
      return dist::data_parallel_trainer(
          model_t(s.cfg, ex),
          subspace::stack{.communicator = std::move(wire),
                          .scheduler = schedule::gradient_accumulation{int(o.accumulation), n},
                          .optimizer = opt},
          dist::trainer_options(to));
  }();
  t.init(o.seed);
  if (lead) {
    std::printf("%zu bucket%s of up to %s bytes | optimizer state %s bytes per rank\n", t.buckets().size(),
                t.buckets().size() == 1 ? "" : "s", human(double(to.bucket_bytes)).c_str(),
                human(double(t.optimizer_state_bytes())).c_str());
    std::fflush(stdout);
  }

  const auto start = std::chrono::steady_clock::now();
  const auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  std::vector<double> all(std::size_t(n) * f_count);
  double last_val = NAN, last_consensus = NAN, train_time = 0, bytes_total = 0, comm_total = 0;
  std::int64_t timed_tokens = 0, tokens_done = 0;
  for (std::int64_t step = 1; step <= o.steps; ++step) {
    const double t0 = seconds();
    const comm::traffic before = t.communicator().metrics();
    const train::step_result r = t.step(train_data);
    const comm::traffic& after = t.communicator().metrics();
    std::array<double, f_count> mine{};
    mine[f_loss] = r.loss;
    mine[f_norm] = r.grad_norm;
    mine[f_bad] = !std::isfinite(r.loss) || r.skipped ? 1.0 : 0.0;
    mine[f_tokens] = double(rank_tokens);
    mine[f_bytes] = double(after.bytes_sent() - before.bytes_sent());
    mine[f_comm_s] = s.modelled ? after.seconds - before.seconds : 0.0;
    mine[f_lr] = double(r.lr);
    stats
        .all_gather(view<const double, host_space>(mine.data(), {f_count}),
                    view<double, host_space>(all.data(), {n, f_count}))
        .wait();
    const double dt = seconds() - t0;
    const auto at = [&](int q, field f) { return all[std::size_t(q) * f_count + f]; };

    double loss = 0, norm = 0, step_tokens = 0, bytes_max = 0, bytes_sum = 0, comm_max = 0;
    int bad = -1;
    for (int q = 0; q < n; ++q) {
      loss += at(q, f_loss) / n;
      norm += at(q, f_norm) / n;
      step_tokens += at(q, f_tokens);
      bytes_max = std::max(bytes_max, at(q, f_bytes));
      bytes_sum += at(q, f_bytes);
      comm_max = std::max(comm_max, at(q, f_comm_s));
      if (bad < 0 && at(q, f_bad) != 0) bad = q;
    }
    if (bad >= 0) {  // every rank sees the same numbers, so every rank stops here
      if (lead)
        std::fprintf(stderr,
                     "gossip_llama: step %lld: loss %g, gradient norm %g on rank %d — training diverged "
                     "(lower --lr or --clip)\n",
                     (long long)step, at(bad, f_loss), at(bad, f_norm), bad);
      return 1;
    }
    tokens_done += std::int64_t(step_tokens);
    bytes_total += bytes_max;
    comm_total += comm_max;
    if (step > 1 || o.steps == 1) {  // the first step includes one-time set-up
      train_time += dt;
      timed_tokens += std::int64_t(step_tokens);
    }
    const double tok_s = timed_tokens > 0 ? double(timed_tokens) / train_time : step_tokens / dt;

    std::optional<double> val, consensus;
    if (evaluating && (step % o.eval_every == 0 || step == o.steps)) {
      if constexpr (Gossip) {
        consensus = last_consensus = t.consensus_distance();
        t.global_average();
        val = t.evaluate(*val_data, o.eval_batches);
        t.revert_global_average();
      } else {
        val = t.evaluate(*val_data, o.eval_batches);
      }
      if (val) last_val = *val;
    }
    if (!lead) continue;

    if (step % o.log_every == 0 || step == 1 || step == o.steps || val) {
      const double eta = double(o.steps - step) * step_tokens / tok_s;
      std::string line = "step " + std::to_string(step) + "/" + std::to_string(o.steps);
      char buf[200];
      std::snprintf(buf, sizeof buf, " | loss %.4f | lr %.2e | norm %.3f | %s tok/s | sent %sB/rank", loss, at(0, f_lr),
                    norm, human(tok_s).c_str(), human(bytes_max).c_str());
      line += buf;
      if (s.modelled) {
        if (comm_max < 1) std::snprintf(buf, sizeof buf, " | comm %.3gms", 1e3 * comm_max);
        else std::snprintf(buf, sizeof buf, " | comm %.2fs", comm_max);
        line += buf;
      }
      if (consensus) {
        std::snprintf(buf, sizeof buf, " | consensus %.2e", *consensus);
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
      io::json j = io::json::object({{"step", io::json(step)}, {"loss", io::json(loss)}});
      if (val) j.set("val_loss", io::json(*val));
      j.set("lr", io::json(at(0, f_lr)));
      j.set("tokens", io::json(tokens_done));
      j.set("tok_per_s", io::json(tok_s));
      j.set("wall_s", io::json(seconds()));
      j.set("grad_norm", io::json(norm));
      j.set("step_ms", io::json(1e3 * dt));
      io::json per_rank = io::json::array();
      for (int q = 0; q < n; ++q) per_rank.push_back(io::json(std::int64_t(at(q, f_bytes))));
      j.set("bytes_sent", per_rank);
      j.set("bytes_sent_max", io::json(std::int64_t(bytes_max)));
      j.set("bytes_sent_mean", io::json(bytes_sum / n));
      j.set("comm_model_s", io::json(comm_max));
      if (consensus) j.set("consensus", io::json(*consensus));
      io::json losses = io::json::array();
      for (int q = 0; q < n; ++q) losses.push_back(io::json(at(q, f_loss)));
      j.set("loss_ranks", losses);
      metrics->write(j);
    }
  }
  if constexpr (Gossip) t.finish();  // every rank ends on the global average
  if (!lead) return 0;

  std::printf("done: %lld steps, %s tokens, %s; final val loss %.4f", (long long)o.steps,
              human(double(tokens_done)).c_str(), duration(seconds()).c_str(), last_val);
  if constexpr (Gossip) std::printf(", final consensus distance %.3e (before the final average)", last_consensus);
  std::printf("\nsent %sB per rank in all (the most of any rank per step, summed)", human(bytes_total).c_str());
  if (s.modelled) std::printf(", modelled communication %.2f s", comm_total);
  std::printf("\n");
  if (!o.summary.empty()) {
    const double tok_s = train_time > 0 ? double(timed_tokens) / train_time : 0.0;
    io::json j = io::json::object(
        {{"device", io::json(s.device_name)},
         {"model", io::json(s.cfg.name)},
         {"parameters", io::json(s.cfg.parameters())},
         {"ranks", io::json(n)},
         {"topology", io::json(o.topology)},
         {"local_ranks", io::json(s.local_ranks)},
         {"optimizer", io::json(s.optimizer)},
         {"accum_window", io::json(o.accum_window)},
         {"bandwidth", io::json(o.bandwidth)},
         {"throttle", io::json(o.throttle)},
         {"bucket_bytes", io::json(to.bucket_bytes)},
         {"buckets", io::json(std::int64_t(t.buckets().size()))},
         {"steps", io::json(o.steps)},
         {"tokens", io::json(tokens_done)},
         {"batch_per_rank", io::json(o.batch)},
         {"seq", io::json(s.seq)},
         {"accumulation", io::json(o.accumulation)},
         {"lr", io::json(double(o.lr))},
         {"final_val_loss", std::isfinite(last_val) ? io::json(last_val) : io::json(nullptr)},
         {"final_consensus", std::isfinite(last_consensus) ? io::json(last_consensus) : io::json(nullptr)},
         {"tok_per_s", io::json(tok_s)},
         {"bytes_sent_per_rank", io::json(bytes_total)},
         {"comm_model_s", io::json(comm_total)},
         {"optimizer_state_bytes", io::json(std::int64_t(t.optimizer_state_bytes()))},
         {"wall_s", io::json(seconds())}});
    io::atomic_write_text(o.summary, j.dump(2) + "\n");
  }
  // Samples from rank 0's model: the global average for gossip (after finish), the common weights for all-reduce.
  if (o.samples > 0 && o.sample_tokens > 0) {
    const std::vector<std::int32_t> prompt = s.src.tokenizer.encode(o.prompt, "--prompt");
    for (std::int64_t i = 0; i < o.samples; ++i) {
      nn::sampling smp;
      smp.temperature = o.temperature;
      smp.seed = o.seed + std::uint64_t(i);
      const std::vector<std::int32_t> out = nn::generate(t.model(), prompt, o.sample_tokens, smp);
      if (s.src.decodes()) {
        std::printf("--- sample %lld ---\n%s%s\n", (long long)i + 1, o.prompt.c_str(),
                    s.src.tokenizer.printable(out).c_str());
      } else {
        std::printf("--- sample %lld (token ids) ---\n", (long long)i + 1);
        for (const auto id : out) std::printf("%d ", id);
        std::printf("\n");
      }
    }
  }
  std::fflush(stdout);
  return 0;
}

// ---- launchers -----------------------------------------------------------------------------------------------

/// --launcher local: the ranks as threads, through comm::local (host memory, or device memory on one GPU).
template <class Exec>
int run_local(const options& o, setup& s) {
  const examples::local_ranks<Exec> ranks(s.ranks, o.comm_timeout, s.threads_per_rank);
  // The loaders and the metrics file first, here, so that a shard too small for one batch or an unwritable file
  // fails before any rank starts.
  std::optional<io::metrics_writer> metrics;
  if (!o.metrics.empty()) metrics.emplace(o.metrics);
  std::vector<data::batch_loader> train;
  std::vector<std::optional<data::batch_loader>> val;
  for (int r = 0; r < s.ranks; ++r) {
    train.push_back(rank_loader(o, s, r));
    val.push_back(val_loader(o, s));
  }
  std::vector<comm::local> world = ranks.world(), stats = ranks.stats_world();
  return with_optimizer(o, s, [&](auto gossip, const auto& opt) {
    return on_threads(
        s.ranks,
        [&](int r) {
          return run_rank<decltype(gossip)::value>(ranks.exec(r), world[std::size_t(r)], stats[std::size_t(r)], opt, o,
                                                   s, std::move(train[std::size_t(r)]), std::move(val[std::size_t(r)]),
                                                   r == 0 && metrics ? &*metrics : nullptr);
        },
        world, stats);
  });
}

#if defined(__CUDACC__)
/// --launcher nccl: this process is one rank of the launcher's world, on GPU LOCAL_RANK.
int run_nccl(const options& o) {
  examples::nccl_process proc = examples::nccl_process::connect(o.comm_timeout);
  const comm::launch_info& li = proc.info;
  if (o.ranks != 0 && o.ranks != li.world_size)
    throw examples::cli_error("--ranks " + std::to_string(o.ranks) + " differs from the launcher's world of " +
                              std::to_string(li.world_size) + " ranks (" + li.launcher + "); leave --ranks at 0");
  setup s = decide(o, li.world_size, o.local_ranks ? o.local_ranks : li.local_world_size);
  try {
    // Rank 0 converts --text into the shard cache first; the others then find it there.
    if (li.rank == 0) load_model_and_data(o, s);
    proc.stats.barrier().wait();
    if (li.rank != 0) load_model_and_data(o, s);
    s.device_name = proc.device_name;
    s.where = "NCCL processes, " + li.launcher + " launch";
    if (li.rank == 0) print_header(o, s);
    std::optional<io::metrics_writer> metrics;
    if (li.rank == 0 && !o.metrics.empty()) metrics.emplace(o.metrics);
    const int status = with_optimizer(o, s, [&](auto gossip, const auto& opt) {
      return run_rank<decltype(gossip)::value>(exec::cuda{proc.stream}, proc.world, proc.stats, opt, o, s,
                                               rank_loader(o, s, li.rank), val_loader(o, s),
                                               metrics ? &*metrics : nullptr);
    });
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
  examples::cli cli("gossip_llama",
                    "Trains a Llama 3 model on N ranks with gossip data parallelism (Decent-DP) or the all-reduce\n"
                    "baseline: in-process threads on the host or on one GPU (comm::local), or one process per GPU\n"
                    "(comm::nccl). Every rank's traffic goes through comm::throttled: the progress line and the\n"
                    "metrics give the bytes each rank sends and the modelled communication time. Rank r trains on\n"
                    "slice r of N of the training tokens (shuffle seed --seed + r). With no data flags it trains on\n"
                    "the King James Bible (Debian bible-kjv-text), byte-tokenized.");
  cli.flag("ranks", o.ranks, "ranks (0: 4 in-process ranks; under --launcher nccl the launcher's WORLD_SIZE)")
      .flag("launcher", o.launcher,
            "local: ranks as threads of this process (comm::local); nccl: one process per "
            "GPU, ranks from RANK/WORLD_SIZE/LOCAL_RANK or OMPI_COMM_WORLD_* (CUDA builds)",
            {"local", "nccl"})
      .flag("topology", o.topology,
            "gossip topology, or allreduce for the all-reduce data-parallel baseline "
            "(ring: even --ranks; one_peer_exp: a power of two; alternating_exp_ring: a power-of-two node count)",
            topologies)
      .flag("local-ranks", o.local_ranks,
            "ranks per node for alternating_exp_ring (0: 1 under --launcher local, "
            "LOCAL_WORLD_SIZE under nccl)")
      .flag("optimizer", o.optimizer,
            "auto: accum_adamw for gossip, adamw for allreduce. Gossip: decent_adam, "
            "decent_adamw, accum_adam, accum_adamw; allreduce: adamw; both: galore, golore",
            {"auto", "adamw", "decent_adam", "decent_adamw", "accum_adam", "accum_adamw", "galore", "golore"})
      .flag("accum-window", o.accum_window, "AccumAdam(W) window K: the moments see the mean gradient of K steps");
  examples::declare_link_flags(cli, o);
  cli.flag("bucket-mb", o.bucket_mb, "bucket size in MB (1e6 bytes) of the bucketed all-reduce / gossip")
      .flag("comm-timeout", o.comm_timeout, "seconds a rank waits for its peers before failing");
  examples::declare_model_flags(cli, o);
  examples::declare_data_flags(cli, o);
  cli.flag("seq", o.seq, "tokens per sequence (0: the preset's context, at most 256)")
      .flag("batch", o.batch, "sequences per micro-batch, per rank")
      .flag("accumulation", o.accumulation, "micro-batches per optimizer step (gradient accumulation), per rank")
      .flag("steps", o.steps, "optimizer steps")
      .flag("lr", o.lr, "peak learning rate")
      .flag("min-lr", o.min_lr, "final learning rate of the decay (negative: --lr / 10)")
      .flag("warmup", o.warmup, "linear warm-up steps")
      .flag("decay", o.decay, "learning-rate decay after warm-up", {"cosine", "linear", "constant"})
      .flag("weight-decay", o.weight_decay,
            "weight decay, on the projection matrices and an untied LM head "
            "(negative: the optimizer's default: 0.1 for adamw, decent_adamw, accum_adamw; 0 for decent_adam, "
            "accum_adam)")
      .flag("beta1", o.beta1, "Adam beta1 (negative: the optimizer's default, 0.9)")
      .flag("beta2", o.beta2,
            "Adam beta2 (negative: the optimizer's default: adamw 0.95, decent_adam(w) 0.999, "
            "accum_adam(w) 0.98)")
      .flag("clip", o.clip, "gradient-norm clip (<= 0: off); all-reduce: the global norm, gossip: per bucket");
  examples::declare_subspace_flags(cli, o);
  cli.flag("eval-every", o.eval_every,
           "validation loss (of the global average) and consensus distance every N "
           "steps (and at the end)")
      .flag("eval-batches", o.eval_batches, "validation batches per evaluation (the same ones each time)")
      .flag("log-every", o.log_every, "print a progress line every N steps (and at evaluations)")
      .flag("metrics", o.metrics, "write one JSON line per step to this file (rank 0)")
      .flag("summary", o.summary, "write a JSON summary of the run here at the end")
      .flag("samples", o.samples, "text samples to print at the end (from the final global average)")
      .flag("sample-tokens", o.sample_tokens, "tokens per sample")
      .flag("prompt", o.prompt, "prompt of the samples")
      .flag("temperature", o.temperature, "sampling temperature (0: greedy)")
      .flag("device", o.device,
            "where in-process ranks train: host, or one GPU shared by all ranks (cuda); auto "
            "picks cuda when a GPU is present. --launcher nccl always uses the GPUs",
            {"auto", "host", "cuda"})
      .flag("threads", o.threads, "host worker threads per rank (0: the cores divided among the ranks)")
      .flag("seed", o.seed,
            "seed of the initial weights (rank 0's, broadcast), the data orders (+ rank) and the "
            "samples");
  return examples::guarded_main("gossip_llama", [&] {
    if (!cli.parse(argc, argv)) return 0;
    check(o);
    if (o.launcher == "nccl") {
#if defined(__CUDACC__)
      if (o.device == "host")
        throw examples::cli_error(
            "--launcher nccl --device host: NCCL ranks train on their GPUs (use --launcher "
            "local for host ranks)");
      return run_nccl(o);
#else
      throw examples::cli_error("--launcher nccl: this build has no CUDA path (configure with the cuda preset)");
#endif
    }
    const int ranks = o.ranks ? o.ranks : 4;
    setup s = decide(o, ranks, o.local_ranks ? o.local_ranks : 1);
    const examples::device_choice d = examples::choose_device(o.device);
#if defined(__CUDACC__)
    if (d.cuda) {
      load_model_and_data(o, s);
      s.device_name = d.name;
      s.where = "threads of one process sharing the GPU, comm::local";
      print_header(o, s);
      return run_local<exec::cuda>(o, s);
    }
#endif
    load_model_and_data(o, s);
    const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
    s.threads_per_rank = o.threads ? o.threads : std::max(1, cores / ranks);
    s.device_name = "host";
    s.where = "threads of one process, comm::local, " + std::to_string(s.threads_per_rank) + " worker thread" +
              (s.threads_per_rank == 1 ? "" : "s") + " each";
    print_header(o, s);
    return run_local<exec::host>(o, s);
  });
}

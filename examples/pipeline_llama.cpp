// pipeline_llama: trains a Llama 3 model split into pipeline stages (pipeline::pipeline_trainer), plain or as a
// Subspace Network whose stage boundaries carry k coefficients and a token id per token instead of d activations
// (compress::subspace_projection + nn::subspace_blocks). Guide: docs/pipeline.md.
//
// Ranks: --stages P pipeline stages × --cp C ranks per sequence × --dp D replicas = P·C·D ranks; rank r is stage
// r % P at place (r / P) % C of replica r / (P·C). With --cp C > 1 every stage is context parallel
// (context::pipeline_context): its C ranks hold the rows of each sequence that --layout gives them, exchange K/V in
// the attention (--attention), with --kv-compressor mos compressed by Mixture of Subspaces — at once with the
// Subspace Network's boundary between the stages (docs/context.md, "Pipeline × context parallelism").
//   --launcher local (default)  the ranks as threads of this process through comm::local: on the host (fp32) or,
//                               in a CUDA build, on one GPU (bf16 weights, fp32 masters; each rank its own stream).
//   --launcher nccl (CUDA)      one process per GPU through comm::nccl; the launcher's environment names the ranks
//                               (RANK / WORLD_SIZE / LOCAL_RANK, or mpirun's OMPI_COMM_WORLD_*, and MASTER_ADDR /
//                               MASTER_PORT; see the README's "Communicators and launching").
// Every rank's communicator is wrapped in comm::throttled: --bandwidth models the links (account mode adds the
// modelled time to a virtual clock; enforce mode also delays completion), and its counters give the bytes sent.
//
// Data: as train_llama (default corpus, --text or --data). Replica q reads slice q of D of the training tokens
// (shuffle seed --seed + q); every stage of a replica reads the same batches (the first stage needs the tokens,
// the last the targets). Validation: the held-out tokens, every stage the same batches.
//
// Each step rank 0 prints the loss, learning rate, tokens/s, the bytes the busiest rank sent, the modelled
// communication time and the fraction of the step the stages waited for a neighbour (bubbles plus unhidden
// transfers). --metrics writes one JSON line per step; --summary a JSON summary; --checkpoint-dir saves every
// stage's checkpoint (DIR/step_N/stage-s) for --resume. At the end (local launcher) the stages' tensors are
// gathered into the whole model, which prints text samples.
//
// The flags, their checks and the plan every rank shares are in pipeline_llama_plan.hpp; the ranks' training is here.
// This file compiles as C++ (host only) or, in a CUDA build, as CUDA (host, one GPU, and NCCL).
#include <subspace/subspace.hpp>
#if defined(__CUDACC__)
#include <subspace/comm/nccl.cuh>
#endif

#include <subspace/context/pipeline_context.hpp>
#include <subspace/nn/subspace_blocks.hpp>
#include <subspace/pipeline/any_schedule.hpp>
#include <subspace/pipeline/layout.hpp>
#include <subspace/pipeline/pipeline_trainer.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
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
#include "pipeline_llama_plan.hpp"

namespace {

using namespace subspace;
using examples::duration;
using examples::human;
namespace fs = std::filesystem;

using namespace examples::pipeline_llama;

/// What each rank reports after each step (gathered through the unthrottled communicator).
enum field : int { f_loss, f_norm, f_bytes, f_comm_s, f_wait_s, f_step_s, f_lr, f_count };

/// The stages' tensors by name on the host, gathered for the samples (local launcher).
struct gathered {
  std::mutex mu;
  std::map<std::string, host_tensor<float>> tensors;
};

data::batch_loader replica_loader(const options& o, const setup& s, int replica) {
  data::loader_options lo{o.batch,
                          s.seq,
                          s.cfg.vocab,
                          o.shuffle,
                          o.seed + std::uint64_t(replica),
                          true,
                          "train, replica " + std::to_string(replica) + " of " + std::to_string(o.dp)};
  return data::batch_loader(s.train.shard(replica, o.dp), lo);
}

/// v as fp32 host values.
template <class Exec, class T, class S>
void to_host_float(const Exec& ex, view<T, S> v, view<float, host_space> out) {
  if constexpr (std::is_same_v<S, host_space>) {
    cast(exec::host{}, view<const T, host_space>(v), out);
  } else {
    const auto h = to_host(ex, view<const T, S>(v));
    cast(exec::host{}, view<const T, host_space>(h.v()), out);
  }
}

/// Trains rank `world.rank()` with the blocks and Sequences policy of `parts` (a pair made for this rank: the
/// context-parallel blocks hold the rank's group); rank 0 prints. Returns the exit status (the same on every rank).
template <class Model, class Compressor, class Parts, class Exec, class Comm>
int run_rank(const Exec& ex, Comm world, Comm stats, Compressor compressor, Parts parts, const options& o,
             const setup& s, gathered* out, io::metrics_writer* metrics) {
  auto& [blocks, sequences] = parts;
  const int rank = world.rank(), n = world.size(), stage = rank % o.stages, replica = rank / (o.stages * o.cp);
  const bool lead = rank == 0;
  pipeline::trainer_options to;
  to.clip = o.clip;
  to.schedule = {o.lr, o.min_lr >= 0 ? o.min_lr : o.lr / 10, std::min(o.warmup, o.steps), o.steps,
                 optim::parse_decay(o.decay)};
  if constexpr (std::is_same_v<Compressor, compress::identity> && std::is_same_v<typename Model::value_type, bf16>)
    to.wire_values = pipeline::wire_format::values_as::bf16;  // the dense bf16 stream, without loss
  pipeline::pipeline_trainer t(pipeline::llama_chunks<Model>(s.cfg, ex, o.stages, s.chunks, stage, blocks),
                               subspace::stack{.communicator = comm::throttled<Comm>(std::move(world), s.net),
                                               .compressor = std::move(compressor),
                                               .scheduler = chosen_schedule(o),
                                               .optimizer = optim::adamw{}},
                               to, sequences);
  data::batch_loader train_data = replica_loader(o, s, replica);
  std::optional<data::batch_loader> val_data;
  if (!s.val.empty())
    val_data.emplace(s.val, data::loader_options{o.batch, s.seq, s.cfg.vocab, false, o.seed, true, "val"});
  if (!o.resume.empty()) {
    const io::trainer_state ts = t.resume(o.resume, train_data);
    if (lead) std::printf("resumed from %s at step %lld\n", o.resume.c_str(), (long long)ts.step);
  } else {
    t.init(o.seed);
  }
  if (lead) {
    std::printf("optimizer state %s bytes on rank 0\n", human(double(t.optimizer_state_bytes())).c_str());
    std::fflush(stdout);
  }
  const auto save = [&](std::int64_t step) {
    const std::string name = examples::checkpoint_name(step);
    t.save(fs::path(o.checkpoint_dir) / name, train_data.position(), o.seed);
    if (lead) std::printf("saved checkpoint %s\n", (fs::path(o.checkpoint_dir) / name).c_str());
  };

  const auto start = std::chrono::steady_clock::now();
  const auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  std::vector<double> all(std::size_t(n) * f_count);
  double last_val = NAN, train_time = 0, bytes_total = 0, comm_total = 0, wait_total = 0;
  std::int64_t timed_tokens = 0, tokens_done = 0;
  const std::int64_t first_step = t.steps_done() + 1;
  for (std::int64_t step = first_step; step <= o.steps; ++step) {
    const double t0 = seconds(), w0 = t.waited_seconds();
    const comm::traffic before = t.communicator().metrics();
    const train::step_result r = t.step(train_data);
    const comm::traffic& after = t.communicator().metrics();
    const double dt = seconds() - t0;
    std::array<double, f_count> mine{};
    mine[f_loss] = r.loss;
    mine[f_norm] = r.grad_norm;
    mine[f_bytes] = double(after[comm::op_kind::send].bytes_sent - before[comm::op_kind::send].bytes_sent);
    mine[f_comm_s] = s.modelled ? after.seconds - before.seconds : 0.0;
    mine[f_wait_s] = t.waited_seconds() - w0;
    mine[f_step_s] = dt;
    mine[f_lr] = double(r.lr);
    stats
        .all_gather(view<const double, host_space>(mine.data(), {f_count}),
                    view<double, host_space>(all.data(), {n, f_count}))
        .wait();
    const auto at = [&](int q, field f) { return all[std::size_t(q) * f_count + f]; };
    if (!std::isfinite(r.loss) || r.skipped) {  // every rank has the same loss and norm
      if (lead)
        std::fprintf(stderr,
                     "pipeline_llama: step %lld: loss %g, gradient norm %g — training diverged (lower --lr "
                     "or --clip)\n",
                     (long long)step, r.loss, r.grad_norm);
      return 1;
    }
    double bytes_max = 0, comm_max = 0, wait = 0;
    for (int q = 0; q < n; ++q) {
      bytes_max = std::max(bytes_max, at(q, f_bytes));
      comm_max = std::max(comm_max, at(q, f_comm_s));
      wait += at(q, f_wait_s) / std::max(at(q, f_step_s), 1e-12) / n;
    }
    tokens_done += r.tokens;
    bytes_total += bytes_max;
    comm_total += comm_max;
    wait_total += wait;
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
    if (step % o.log_every == 0 || step == 1 || step == o.steps || val) {
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "step %lld/%lld | loss %.4f | lr %.2e | norm %.3f | %s tok/s | sent %sB/rank | "
                    "waited %.0f%%",
                    (long long)step, (long long)o.steps, r.loss, double(r.lr), r.grad_norm, human(tok_s).c_str(),
                    human(bytes_max).c_str(), 100 * wait);
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
    if (metrics) {
      io::json j = io::json::object({{"step", io::json(step)}, {"loss", io::json(r.loss)}});
      if (val) j.set("val_loss", io::json(*val));
      j.set("lr", io::json(double(r.lr)));
      j.set("tokens", io::json(tokens_done));
      j.set("tok_per_s", io::json(tok_s));
      j.set("step_ms", io::json(1e3 * dt));
      j.set("grad_norm", io::json(r.grad_norm));
      io::json per_rank = io::json::array();
      for (int q = 0; q < n; ++q) per_rank.push_back(io::json(std::int64_t(at(q, f_bytes))));
      j.set("bytes_sent", per_rank);
      j.set("comm_model_s", io::json(comm_max));
      j.set("waited_fraction", io::json(wait));
      metrics->write(j);
    }
  }
  if (!o.checkpoint_dir.empty()) save(t.steps_done());
  if (out && replica == 0 && t.place() == 0) {  // the stages' tensors for the samples
    std::lock_guard lock(out->mu);
    auto& store = t.chunks()[0].parameters();
    for (std::size_t i = 0; i < store.size(); ++i) {
      host_tensor<float> h(store.info(i).shape);
      to_host_float(ex, store.value(i), h.v());
      out->tensors.insert_or_assign(store.info(i).name, std::move(h));
    }
  }
  if (!lead) return 0;
  const std::int64_t done_steps = std::max<std::int64_t>(1, o.steps - first_step + 1);
  std::printf("done: %lld steps, %s tokens, %s; final val loss %.4f\n", (long long)o.steps,
              human(double(tokens_done)).c_str(), duration(seconds()).c_str(), last_val);
  std::printf("sent %sB per rank in all (the most of any rank per step, summed)", human(bytes_total).c_str());
  if (s.modelled) std::printf(", modelled communication %.2f s", comm_total);
  std::printf("; stages waited %.0f%% of the step on average\n", 100 * wait_total / double(done_steps));
  if (!o.summary.empty()) {
    const double tok_s = train_time > 0 ? double(timed_tokens) / train_time : 0.0;
    const auto [fwd, bwd] = boundary_bytes_per_token(s, sizeof(typename Model::value_type));
    io::json j = io::json::object({{"device", io::json(s.device_name)},
                                   {"model", io::json(s.cfg.name)},
                                   {"parameters", io::json(s.cfg.parameters())},
                                   {"stages", io::json(o.stages)},
                                   {"virtual_stages", io::json(s.chunks)},
                                   {"replicas", io::json(o.dp)},
                                   {"schedule", io::json(o.schedule)},
                                   {"microbatches", io::json(o.microbatches)},
                                   {"compressor", io::json(o.compressor)},
                                   {"k", io::json(s.codec ? s.codec->k() : std::int64_t(0))},
                                   {"wire", io::json(o.wire)},
                                   {"boundary_bytes_per_token_forward", io::json(fwd)},
                                   {"boundary_bytes_per_token_backward", io::json(bwd)},
                                   {"bandwidth", io::json(o.bandwidth)},
                                   {"throttle", io::json(o.throttle)},
                                   {"steps", io::json(o.steps)},
                                   {"tokens", io::json(tokens_done)},
                                   {"seq", io::json(s.seq)},
                                   {"batch", io::json(o.batch)},
                                   {"final_val_loss", std::isfinite(last_val) ? io::json(last_val) : io::json(nullptr)},
                                   {"tok_per_s", io::json(tok_s)},
                                   {"bytes_sent_per_rank", io::json(bytes_total)},
                                   {"comm_model_s", io::json(comm_total)},
                                   {"waited_fraction", io::json(wait_total / double(done_steps))},
                                   {"wall_s", io::json(seconds())}});
    io::atomic_write_text(o.summary, j.dump(2) + "\n");
  }
  std::fflush(stdout);
  return 0;
}

/// The whole model from the gathered stage tensors (the same blocks, on the host): --export-hf writes it as a plain
/// Llama (a Subspace Network's constrained tensors multiplied out, nn::export_dense), then it samples text.
template <class Blocks>
void finish(const options& o, const setup& s, const Blocks& blocks, gathered& g) {
  if (o.export_hf.empty() && (o.samples == 0 || o.sample_tokens == 0)) return;
  const exec::host ex{s.threads_per_rank ? s.threads_per_rank : 1};
  nn::llama<exec::host, float, Blocks> whole(s.cfg, ex, nn::llama_stage{}, nullptr, blocks);
  auto& store = whole.parameters();
  store.allocate(ex);
  for (std::size_t i = 0; i < store.size(); ++i)
    copy(ex, view<const float, host_space>(g.tensors.at(store.info(i).name).v()), store.value(i));
  if (!o.export_hf.empty()) {
    if constexpr (std::is_same_v<Blocks, nn::subspace_blocks>) {
      nn::llama<exec::host, float> plain(s.cfg, ex);
      plain.parameters().allocate(ex);
      nn::export_dense(ex, blocks, store, plain.parameters());
      io::save_model(ex, o.export_hf, s.cfg, plain);
    } else {
      io::save_model(ex, o.export_hf, s.cfg, whole);
    }
    std::printf("exported the model as a Hugging Face Llama to %s\n", o.export_hf.c_str());
  }
  if (o.samples == 0 || o.sample_tokens == 0) return;
  const std::vector<std::int32_t> prompt = s.src.tokenizer.encode(o.prompt, "--prompt");
  for (std::int64_t i = 0; i < o.samples; ++i) {
    nn::sampling smp;
    smp.temperature = o.temperature;
    smp.seed = o.seed + std::uint64_t(i);
    const std::vector<std::int32_t> out = nn::generate(whole, prompt, o.sample_tokens, smp);
    if (s.src.decodes())
      std::printf("--- sample %lld ---\n%s%s\n", (long long)i + 1, o.prompt.c_str(),
                  s.src.tokenizer.printable(out).c_str());
    else {
      std::printf("--- sample %lld (token ids) ---\n", (long long)i + 1);
      for (const auto id : out) std::printf("%d ", id);
      std::printf("\n");
    }
  }
}

/// Calls f(model tag, compressor, make_parts, base blocks) for --compressor and, with --cp > 1, the
/// context-parallel attention over the stage's context groups of Comm with --kv-compressor: make_parts() gives a
/// rank its blocks and Sequences policy (context-parallel blocks share their group between copies, so each rank
/// makes its own); the base blocks are the same model with single-device attention, for the samples.
template <class Exec, class Comm, class F>
int with_compressor(const options& o, const setup& s, F&& f) {
  using T = std::conditional_t<std::is_same_v<Exec, exec::host>, float, bf16>;
  using trainer_comm = comm::throttled<Comm>;
  const auto with_context = [&](const auto& compressor, const auto& base) {
    using base_type = std::remove_cvref_t<decltype(base)>;
    if (o.cp == 1)
      return f(
          std::type_identity<nn::llama<Exec, T, base_type>>{}, compressor,
          [&] { return std::pair(base, pipeline::whole_sequences{}); }, base);
    const context::layout layout(s.seq, o.cp, o.placement());
    const auto context_parallel = [&](auto kv) {
      using blocks_type = context::blocks<trainer_comm, decltype(kv), base_type>;
      const auto make_parts = [&] {
        const blocks_type blocks(o.exchange(), kv, base);
        return std::pair(blocks, context::pipeline_context(blocks, layout));
      };
      return f(std::type_identity<nn::llama<Exec, T, blocks_type>>{}, compressor, make_parts, base);
    };
    if (s.mos) return context_parallel(compress::kv_subspace_mixture(*s.mos));
    return context_parallel(compress::identity{});
  };
  if (s.codec) {
    const nn::subspace_blocks blocks(
        *s.codec, s.unconstrained_from,
        o.variant == "projected" ? nn::subspace_variant::projected : nn::subspace_variant::reparameterised);
    return with_context(*s.codec, blocks);
  }
  return with_context(compress::identity{}, nn::dense_blocks{});
}

/// --launcher local: the ranks as threads, through comm::local (host memory, or device memory on one GPU).
template <class Exec>
int run_local(const options& o, setup& s) {
  const examples::local_ranks<Exec> ranks(s.ranks, o.comm_timeout, s.threads_per_rank);
  std::optional<io::metrics_writer> metrics;
  if (!o.metrics.empty()) metrics.emplace(o.metrics, examples::metrics_mode(o.metrics, o.resume));
  gathered g;
  std::vector<comm::local> world = ranks.world(), stats = ranks.stats_world();
  return with_compressor<Exec, comm::local>(
      o, s, [&](auto model_tag, const auto& compressor, const auto& make_parts, const auto& base) {
        using model_t = typename decltype(model_tag)::type;
        const int status = examples::on_threads(
            s.ranks,
            [&](int r) {
              return run_rank<model_t>(ranks.exec(r), world[std::size_t(r)], stats[std::size_t(r)], compressor,
                                       make_parts(), o, s, &g, r == 0 && metrics ? &*metrics : nullptr);
            },
            world, stats);
        if (status == 0) finish(o, s, base, g);
        return status;
      });
}

#if defined(__CUDACC__)
/// --launcher nccl: this process is one rank of the launcher's world, on GPU LOCAL_RANK.
int run_nccl(const options& o) {
  examples::nccl_process proc = examples::nccl_process::connect(o.comm_timeout);
  const comm::launch_info& li = proc.info;
  if (li.world_size != o.stages * o.cp * o.dp)
    throw examples::cli_error("--stages " + std::to_string(o.stages) + " x --cp " + std::to_string(o.cp) + " x --dp " +
                              std::to_string(o.dp) + " = " + std::to_string(o.stages * o.cp * o.dp) +
                              " ranks, but the launcher (" + li.launcher + ") started " +
                              std::to_string(li.world_size));
  setup s = decide(o, li.world_size);
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
    const exec::cuda ex{proc.stream};
    const int status = with_compressor<exec::cuda, comm::nccl>(
        o, s, [&](auto model_tag, const auto& compressor, const auto& make_parts, const auto&) {
          using model_t = typename decltype(model_tag)::type;
          return run_rank<model_t>(ex, proc.world, proc.stats, compressor, make_parts(), o, s, nullptr,
                                   metrics ? &*metrics : nullptr);
        });
    if (li.rank == 0 && (o.samples > 0 || !o.export_hf.empty()))
      std::printf("(samples and --export-hf: run with --launcher local)\n");
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
      "pipeline_llama",
      "Trains a Llama 3 model split into pipeline stages, plain (--compressor identity) or as a Subspace\n"
      "Network (--compressor subspace: every stage boundary carries k coefficients and a token id per\n"
      "token, exactly, instead of d activations). --cp C > 1 spreads every stage's sequences over C ranks\n"
      "(context parallelism; --kv-compressor mos compresses their K/V exchange). Stages x --cp x replicas\n"
      "ranks run as threads (comm::local) on the host or one GPU, or one process per GPU (comm::nccl);\n"
      "every rank's traffic goes through comm::throttled. With no data flags it trains on the King James\n"
      "Bible, byte-tokenized.");
  examples::pipeline_llama::declare_flags(cli, o);
  return examples::guarded_main("pipeline_llama", [&] {
    if (!cli.parse(argc, argv)) return 0;
    check(o);
    if (o.launcher == "nccl") {
#if defined(__CUDACC__)
      return run_nccl(o);
#else
      throw examples::cli_error("--launcher nccl: this build has no CUDA path (configure with the cuda preset)");
#endif
    }
    examples::clean_before_run(o.checkpoint_dir, o.resume);
    const int ranks = o.stages * o.cp * o.dp;
    setup s = decide(o, ranks);
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
    s.threads_per_rank = o.threads ? o.threads : std::max(1, cores / ranks);
    s.device_name = "host";
    s.where = "threads, comm::local, " + std::to_string(s.threads_per_rank) + " worker thread" +
              (s.threads_per_rank == 1 ? "" : "s") + " each";
    print_header(o, s, sizeof(float));
    return run_local<exec::host>(o, s);
  });
}

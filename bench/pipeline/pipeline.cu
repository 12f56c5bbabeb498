// bench_pipeline: a pipeline of Llama stages on one GPU over modelled links, plain (compress::identity: the bf16
// stream crosses each boundary, sent as bf16) against Subspace Networks (compress::subspace_projection: k
// coefficients and a token id per token), in the same run.
//
// --stages ranks (default 4) are threads of this process sharing the GPU through comm::local, each with its own
// stream, each wrapped in comm::throttled at every --bandwidths link in --throttle mode (enforce by default: every
// transfer completes only when the modelled link would have delivered it, so the step time includes the network).
// Each rank trains its stage of llama<exec::cuda, bf16> with pipeline::pipeline_trainer (1F1B by default; --schedules
// compares e.g. 1f1b,zb), AdamW, on uniform random tokens (a temporary llm.c shard).
//
// Reported per (config, compressor, bandwidth):
//   * step_s: host clock per step, mean over --steps after --warmup (ranks start each step together);
//   * bytes per step on boundary 0|1: forward (what rank 0 sends) and backward (what rank 1 sends to rank 0),
//     measured by comm::throttled, against the formula (tokens × d × 2 B dense; tokens × (k·w + id) / tokens × k·w
//     subspace);
//   * comm_model_s: the modelled network time of the busiest rank per step;
//   * ratios: dense / subspace step time and bytes at each bandwidth, and subspace at each bandwidth against dense
//     at the fastest.
// --bytes-only measures only the bytes (account mode, one step) — e.g. at the width of the 2B config with one layer
// per stage, since a boundary's bytes depend on d, k, the vocabulary and the tokens alone.
//
//   bench_pipeline [--configs 124m,1b] [--layers 0] [--stages 4] [--microbatches 4] [--batch 1] [--seq 1024]
//                  [--bandwidths mbit80,gbit1,gbit100] [--throttle enforce] [--k 0] [--wires fp32]
//                  [--steps 3] [--warmup 1] [--bytes-only] [--out FILE.json] [--commit SHA]
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <subspace/nn/subspace_blocks.hpp>
#include <subspace/pipeline/any_schedule.hpp>
#include <subspace/pipeline/layout.hpp>
#include <subspace/pipeline/pipeline_trainer.hpp>
#include <subspace/subspace.hpp>

#include "common/bench.hpp"
#include "common/ranks.hpp"

using namespace subspace;

namespace {

struct options {
  std::string configs = "124m,1b", bandwidths = "mbit80,gbit1,gbit100", wires = "fp32", throttle = "enforce";
  std::string ks = "0";
  std::string schedules = "1f1b";
  std::int64_t layers = 0, microbatches = 4, batch = 1, seq = 1024;
  int stages = 4, steps = 3, warmup = 1;
  bool bytes_only = false;
  std::string out, commit = "unknown";
};

struct measured {
  double step_s = 0, comm_model_s = 0, tok_per_s = 0;
  std::uint64_t forward_bytes = 0, backward_bytes = 0;
  double loss = 0;
};

constexpr std::uint64_t seed = 4321;

/// Rank r's share of a scenario: trains its stage, then reports its timing and the bytes it sent to each neighbour.
template <class Model, class Compressor, class Blocks>
measured run_rank(const options& o, const pipeline::any_schedule& schedule, const nn::llama_config& cfg,
                  const Compressor& compressor, const Blocks& blocks, const comm::network& net,
                  const bench::random_shard& shard, comm::local world, cudaStream_t stream, std::barrier<>& sync) {
  const int p = o.stages, r = world.rank();
  const int steps = o.bytes_only ? 1 : o.steps, warmup = o.bytes_only ? 0 : o.warmup;
  cuda_check(cudaSetDevice(0));
  const exec::cuda ex{stream};
  pipeline::trainer_options to;
  to.schedule = {3e-4f, 3e-4f, 0, steps + warmup, optim::decay_kind::constant};
  if constexpr (std::is_same_v<Compressor, compress::identity>)
    to.wire_values = pipeline::wire_format::values_as::bf16;  // the dense bf16 stream, without loss
  pipeline::pipeline_trainer t(pipeline::llama_chunks<Model>(cfg, ex, p, 1, r, blocks),
                               subspace::stack{.communicator = comm::throttled<comm::local>(std::move(world), net),
                                               .compressor = compressor,
                                               .scheduler = schedule,
                                               .optimizer = optim::adamw{}},
                               to);
  t.init(seed);
  data::batch_loader loader(data::token_dataset::open(shard.path().string()),
                            data::loader_options{o.batch, o.seq, cfg.vocab, false, seed, true, "random"});
  measured m;
  for (int s = 0; s < warmup; ++s) t.step(loader);
  ex.synchronize();
  sync.arrive_and_wait();
  const comm::traffic before = t.communicator().metrics();
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) m.loss = t.step(loader).loss;
  ex.synchronize();
  sync.arrive_and_wait();
  m.step_s = bench::seconds_since(t0) / steps;
  const comm::traffic& after = t.communicator().metrics();
  m.comm_model_s = (after.seconds - before.seconds) / steps;
  const auto sent_to = [&](int peer) -> std::uint64_t {
    const auto was = before.by_peer.find(peer), now = after.by_peer.find(peer);
    const std::uint64_t b = was == before.by_peer.end() ? 0 : was->second.bytes_sent;
    return now == after.by_peer.end() ? 0 : (now->second.bytes_sent - b) / std::uint64_t(steps);
  };
  if (r == 0) m.forward_bytes = sent_to(1);
  if (r == 1) m.backward_bytes = sent_to(0);
  return m;
}

/// One scenario: `stages` ranks of the model on the GPU with `compressor` at the boundaries.
template <class Model, class Compressor, class Blocks>
measured run(const options& o, const pipeline::any_schedule& schedule, const nn::llama_config& cfg,
             const Compressor& compressor, const Blocks& blocks, const comm::network& net,
             const bench::random_shard& shard) {
  const int p = o.stages;
  std::vector<cudaStream_t> streams(static_cast<std::size_t>(p), nullptr);
  for (auto& st : streams) cuda_check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(1800);
  lo.streams.assign(streams.begin(), streams.end());
  std::vector<comm::local> world = comm::local::world(p, lo);
  std::vector<measured> per_rank(static_cast<std::size_t>(p));
  std::barrier<> sync(p);
  bench::on_ranks(p, [&](int r) {
    per_rank[std::size_t(r)] = run_rank<Model>(o, schedule, cfg, compressor, blocks, net, shard,
                                               std::move(world[std::size_t(r)]), streams[std::size_t(r)], sync);
  });
  for (auto st : streams) cudaStreamDestroy(st);
  measured out = per_rank[0];
  out.backward_bytes = per_rank[1].backward_bytes;
  out.loss = per_rank[std::size_t(p - 1)].loss;
  for (const measured& m : per_rank) {
    out.step_s = std::max(out.step_s, m.step_s);
    out.comm_model_s = std::max(out.comm_model_s, m.comm_model_s);
  }
  out.tok_per_s = double(o.batch * o.seq * o.microbatches) / out.step_s;
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  bench::cli c("bench_pipeline",
               "A Llama pipeline on one GPU over modelled links: dense boundaries against Subspace "
               "Networks (see the top of bench/pipeline/pipeline.cu).");
  c.flag("configs", o.configs, "Llama presets, comma-separated (nn::presets)")
      .flag("layers", o.layers, "layers of each config (0: the preset's; boundary bytes do not depend on it)")
      .flag("stages", o.stages, "pipeline stages (ranks on the GPU)")
      .flag("microbatches", o.microbatches, "micro-batches per step")
      .flag("batch", o.batch, "sequences per micro-batch")
      .flag("seq", o.seq, "tokens per sequence")
      .flag("bandwidths", o.bandwidths,
            "links, comma-separated: mbit80, mbit300, gbit1, gbit25, gbit100 or "
            "<number><kbit|mbit|gbit>[@latency]")
      .flag("throttle", o.throttle,
            "enforce: transfers complete when the link would deliver them; account: only "
            "the virtual clock",
            {"enforce", "account"})
      .flag("k", o.ks,
            "subspace dimensions, comma-separated (0: the default rule, d/50 or d/100 from d 4096); each "
            "runs against the same dense run")
      .flag("wires", o.wires, "subspace wire types, comma-separated: fp32, bf16")
      .flag("schedules", o.schedules, "pipeline schedules, comma-separated: gpipe, 1f1b, zb (zero bubble)")
      .flag("steps", o.steps, "timed steps per scenario")
      .flag("warmup", o.warmup, "untimed steps per scenario")
      .toggle("bytes-only", o.bytes_only, "one step in account mode per scenario: the bytes, not the time");
  bench::output_flags(c, o.out, o.commit);
  return bench::guarded_main("bench_pipeline", [&] {
    if (!c.parse(argc, argv)) return 0;
    bench::check_range("stages", o.stages, 2, 16);
    bench::check_range("steps", o.steps, 1);
    bench::check_range("warmup", o.warmup, 0);
    const cudaDeviceProp prop = bench::device_properties();
    io::json doc = bench::document("pipeline", prop.name, o.commit);
    io::json results = io::json::array();
    const auto mode =
        o.throttle == "enforce" && !o.bytes_only ? comm::throttle_mode::enforce : comm::throttle_mode::account;
    for (const std::string& name : bench::split_list("configs", o.configs)) {
      nn::llama_config cfg = nn::presets::by_name(name);
      if (o.layers) cfg.n_layers = o.layers;
      if (o.seq > cfg.max_seq) cfg.max_seq = o.seq;
      const std::uint64_t tokens = std::uint64_t(o.batch * o.seq * o.microbatches);
      const bench::random_shard shard("pipeline." + name, tokens * std::uint64_t(o.steps + o.warmup + 1) + 1, cfg.vocab,
                                      seed);
      const std::int64_t uf = pipeline::even_cuts(cfg.n_layers, o.stages).back();
      for (const std::string& schedule_name : bench::split_list("schedules", o.schedules)) {
        const pipeline::any_schedule schedule(schedule_name, int(o.microbatches), o.stages);
        double dense_fastest = 0;
        for (const std::string& bw : bench::split_list("bandwidths", o.bandwidths)) {
          const comm::network net(*examples::parse_bandwidth(bw), mode);
          const measured d =
              run<nn::llama<exec::cuda, bf16>>(o, schedule, cfg, compress::identity{}, nn::dense_blocks{}, net, shard);
          dense_fastest = dense_fastest == 0 ? d.step_s : std::min(dense_fastest, d.step_s);
          const auto report = [&](const char* compressor, const std::string& wire, std::int64_t k, const measured& m,
                                  double formula_fwd, double formula_bwd) {
            std::printf(
                "%-5s %-5s %-8s %-9s %-5s k %-3lld step %8.3f s  %9.0f tok/s  fwd %11llu B  bwd %11llu B  comm %8.3f s"
                "  loss %.4f\n",
                name.c_str(), schedule_name.c_str(), bw.c_str(), compressor, wire.c_str(), (long long)k, m.step_s,
                m.tok_per_s, (unsigned long long)m.forward_bytes, (unsigned long long)m.backward_bytes, m.comm_model_s,
                m.loss);
            std::fflush(stdout);
            io::json j =
                io::json::object({{"config", io::json(name)},
                                  {"schedule", io::json(schedule_name)},
                                  {"bubble_closed_form", io::json(schedule.bubble())},
                                  {"d_model", io::json(cfg.d_model)},
                                  {"layers", io::json(cfg.n_layers)},
                                  {"bandwidth", io::json(bw)},
                                  {"compressor", io::json(compressor)},
                                  {"wire", io::json(wire)},
                                  {"k", io::json(k)},
                                  {"step_s", io::json(m.step_s)},
                                  {"tok_per_s", io::json(m.tok_per_s)},
                                  {"boundary_bytes_forward_per_step", io::json(std::int64_t(m.forward_bytes))},
                                  {"boundary_bytes_backward_per_step", io::json(std::int64_t(m.backward_bytes))},
                                  {"formula_bytes_forward_per_step", io::json(formula_fwd)},
                                  {"formula_bytes_backward_per_step", io::json(formula_bwd)},
                                  {"comm_model_s_per_step", io::json(m.comm_model_s)},
                                  {"final_loss", io::json(m.loss)}});
            return j;
          };
          const double dense_bytes = double(tokens) * double(cfg.d_model) * 2;
          results.push_back(report("identity", "bf16", 0, d, dense_bytes, dense_bytes));
          for (const std::string& wire : bench::split_list("wires", o.wires))
            for (const std::int64_t k : bench::split_ints("k", o.ks)) {
              const compress::subspace_projection codec(
                  {cfg.d_model, cfg.vocab, k, seed + 1, seed + 2,
                   wire == "bf16" ? compress::wire_dtype::bf16 : compress::wire_dtype::fp32, false});
              const measured sm = run<nn::llama<exec::cuda, bf16, nn::subspace_blocks>>(
                  o, schedule, cfg, codec, nn::subspace_blocks(codec, uf), net, shard);
              const double w = double(codec.wire_element_bytes(2)), kk = double(codec.k());
              io::json j = report("subspace", wire, codec.k(), sm,
                                  double(tokens) * (kk * w + double(codec.token_id_bytes())), double(tokens) * kk * w);
              j.set("bytes_ratio_forward", io::json(double(d.forward_bytes) / double(sm.forward_bytes)));
              j.set("bytes_ratio_backward", io::json(double(d.backward_bytes) / double(sm.backward_bytes)));
              j.set("step_speedup_vs_dense_same_link", io::json(d.step_s / sm.step_s));
              results.push_back(j);
            }
        }
        // Subspace at each link against dense at the fastest link (the claim: slow links compressed ≈ fast dense).
        for (io::json& j : results.as_array())
          if (j.at("config").as_string() == name && j.at("schedule").as_string() == schedule_name &&
              j.at("compressor").as_string() == "subspace")
            j.set("step_ratio_vs_dense_fastest_link", io::json(j.at("step_s").as_double() / dense_fastest));
      }
    }
    doc.set("config", io::json::object({{"stages", io::json(o.stages)},
                                        {"schedules", io::json(o.schedules)},
                                        {"microbatches", io::json(o.microbatches)},
                                        {"batch", io::json(o.batch)},
                                        {"seq", io::json(o.seq)},
                                        {"throttle", io::json(o.bytes_only ? "account" : o.throttle)},
                                        {"steps", io::json(o.bytes_only ? 1 : o.steps)},
                                        {"warmup", io::json(o.bytes_only ? 0 : o.warmup)},
                                        {"model", io::json("nn::llama<exec::cuda, bf16>: bf16 weights and activations, "
                                                           "fp32 masters; stages as threads on one GPU (comm::local)")},
                                        {"data", io::json("uniform random token ids (a temporary llm.c shard)")}}));
    doc.set("results", results);
    if (!o.out.empty()) bench::write_document(o.out, doc);
    return 0;
  });
}

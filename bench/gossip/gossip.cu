// bench_gossip: the communication of one training step of data parallelism (a bucketed ring all-reduce of the
// gradients, then one AdamW step) against gossip (each bucket: wait for last step's mixing, mix and AccumAdamW
// step fused, copy the bucket pre-scaled into its communication block, launch its all-reduce in the next round's
// group) for each decent topology, with buckets shaped like a Llama config (default nn::presets::llama_124m()).
//
// No model compute: each rank holds the config's parameters in one flat fp32 allocation laid out as nn::llama lays
// out its storage (every tensor padded to 128 elements), fp32 gradients filled once with random values, fp32
// masters with their bf16 working copy, and the optimizer states; dist::bucket_plan cuts them into buckets in
// gradient-ready order, exactly as the trainers do. A step runs, per bucket in that order, what the trainers run
// from the backward's ready hook, with the same kernels and the same communicator calls:
//   * allreduce (dist::data_parallel_trainer): all_reduce(avg) of every bucket's gradients, launched in ready
//     order; wait for all; global-norm clipping; optim::adamw per tensor (bf16 working copy written).
//   * gossip (decent::gossip_trainer): per bucket, wait for the bucket's exchange of the previous step; per-bucket
//     norm clipping (a host read per bucket, as the trainer does); decent::accum_adamw::step_from_mixed per
//     tensor from the communication block; comm_b ← x_b · 1/|R| for the group R of the next round; all_reduce(sum)
//     on that group's communicator (one world.split per phase, made before timing).
// Not measured: the trainers' all-reduce of the step's loss (one double) in data_parallel_trainer.
//
// --ranks ranks (default 8) are threads of this process on one GPU through comm::local (each rank its own stream,
// the communicator ordered on it; --device host runs them on the CPU instead, the fallback without a GPU and a
// quick check of the bytes with a small --config), each wrapped in comm::throttled in account mode at every
// --bandwidths link (default gbit1,gbit25: comm::links::gbit1 = 1 Gbit/s with 100 us, gbit25 = 25 Gbit/s with 10 us).
// With
// --local-ranks L > 1, links between ranks of one node (L consecutive ranks) are --intra-link instead.
//
// Reported per scenario (allreduce and each topology, per bandwidth):
//   * wall_ms_per_step: host clock over --steps steps after --warmup untimed ones, from a barrier of all ranks to
//     the barrier after every rank's stream is idle: the time the GPU needs for the step of all ranks together
//     (their kernels and the comm::local data movement share one GPU);
//   * comm_model_s_per_step: the modelled network time per step (throttled's virtual clock), the slowest rank and
//     the mean over ranks;
//   * bytes_sent_per_step per rank (mean over the timed steps), against the plan: Σ over timed steps t and buckets b
//     of plan(t + 1, rank).bytes_sent(4 · numel_b) for gossip and of complete(n).plan(0, rank).bytes_sent(4 · numel_b)
//     (the ring all-reduce of the whole world) for all-reduce; bytes_exact says the totals are equal on every rank;
//   * ratios against allreduce at the same bandwidth (wall time, modelled time, bytes).
// --steps should be a multiple of every topology's period so each phase counts equally (default 12: periods 1, 2,
// 3 and 6 with 8 ranks).
//
//   bench_gossip [--config 124m] [--ranks 8] [--local-ranks 1] [--intra-link gbit100] [--bandwidths gbit1,gbit25]
//                [--topologies complete,ring,one_peer_exp,alternating_exp_ring] [--bucket-mb 25] [--steps 12]
//                [--warmup 2] [--device auto] [--threads 1] [--out FILE.json] [--commit SHA]
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <decent/decent.hpp>
#include <subspace/dist/bucket.hpp>
#include <subspace/subspace.hpp>

#include "common/bench.hpp"

using namespace subspace;

namespace {

struct options {
  std::string config = "124m";
  int ranks = 8;
  int local_ranks = 1;
  std::string intra_link = "gbit100";
  std::vector<std::string> bandwidths, topologies;  // from the comma-separated flags
  double bucket_mb = 25.0;
  int steps = 12;
  int warmup = 2;
  std::string device = "auto";  // auto: cuda when a GPU is present
  int threads = 1;              // host worker threads per rank (--device host)
  std::string out;
  std::string commit = "unknown";
};

struct scenario {
  std::string name;       // "allreduce" or a topology
  std::string bandwidth;  // as given
  int period = 1;
  double wall_ms_per_step = 0;
  double comm_model_s_max = 0, comm_model_s_mean = 0;        // per step
  std::vector<double> bytes_per_step;                        // per rank, mean over the timed steps
  std::vector<std::uint64_t> bytes_measured, bytes_planned;  // per rank, totals over the timed steps
  bool bytes_exact = false;
  double ratio_wall = 1, ratio_comm = 1, ratio_bytes = 1;  // against allreduce at the same bandwidth
};

std::string human_bytes(double b) {
  char buf[32];
  if (b >= 1e9) std::snprintf(buf, sizeof buf, "%.3f GB", b / 1e9);
  else if (b >= 1e6) std::snprintf(buf, sizeof buf, "%.2f MB", b / 1e6);
  else std::snprintf(buf, sizeof buf, "%.1f kB", b / 1e3);
  return buf;
}

/// cli_error unless `text` reads as a comm::link.
void check_link(const char* flag, const std::string& text) {
  try {
    comm::link::parse(text);
  } catch (const std::exception& e) {
    throw bench::cli_error(std::string("--") + flag + ": " + e.what());
  }
}

decent::group_schedule make_topology(const std::string& name, int n, int local) {
  if (name == "complete") return decent::complete(n);
  if (name == "ring") return decent::ring(n);
  if (name == "one_peer_exp") return decent::one_peer_exp(n);
  if (name == "alternating_exp_ring") return decent::alternating_exp_ring(n, local);
  throw bench::cli_error("--topologies: unknown topology '" + name +
                         "' (expected complete, ring, one_peer_exp, alternating_exp_ring)");
}

/// The parameters of `cfg` declared as nn::llama declares them, in a store that is never allocated: its offsets
/// are those of the model's flat storage.
using layout = nn::parameter_store<float, float, host_space>;

layout layout_of(const nn::llama_config& cfg) {
  layout l;
  for (const parameter_info& info : nn::llama_parameter_infos(cfg)) l.add(info);
  return l;
}

using wire = comm::throttled<comm::local>;

/// Waits until the executor's work is done (the host executor is synchronous).
void synchronize(const exec::host&) {}
void synchronize(const exec::cuda& ex) { cuda_check(cudaStreamSynchronize(ex.stream)); }

/// One rank's state: flat masters, gradients, communication block and bf16 working copy, per-tensor optimizer
/// states, in the executor's memory (on the GPU: ordered on the rank's stream).
template <class Exec, class Optimizer>
struct rank_state {
  using space = space_of_t<Exec>;
  using fview = view<float, space>;
  using cview = view<const float, space>;
  Exec ex;
  const layout& l;
  Optimizer opt;
  tensor<float, space> master, grad, comm;
  tensor<bf16, space> working;
  std::vector<optim::param_info> infos;
  std::vector<optim::state_t<Optimizer, Exec>> states;

  rank_state(Exec e, const layout& lay, Optimizer o, int rank, bool with_comm)
      : ex(e), l(lay), opt(o), master(shape{lay.total()}), grad(shape{lay.total()}), working(shape{lay.total()}) {
    fill_normal(ex, master.v(), 17, std::uint64_t(rank), 0.0f, 0.02f);
    fill_normal(ex, grad.v(), 29, std::uint64_t(rank), 0.0f, 1e-3f);
    cast(ex, cview(master.v()), working.v());
    if (with_comm) {
      comm = tensor<float, space>(shape{lay.total()});
      fill(ex, comm.v(), 0.0f);
    }
    for (const parameter_info& s : lay.infos()) {
      infos.push_back(s);
      states.push_back(opt.init(ex, infos.back()));
    }
  }
  template <class T>
  view<T, space> at(tensor<T, space>& flat, std::size_t i) {
    return view<T, space>(flat.data() + l.offset(i), infos[i].shape);
  }
  std::vector<fview> grads(std::size_t first, std::size_t last) {
    std::vector<fview> g;
    for (std::size_t i = first; i < last; ++i) g.push_back(at(grad, i));
    return g;
  }
};

constexpr float lr = 1e-4f, clip = 1.0f;

/// All ranks run `per_rank(rank, wire&, barrier&, timed)` where timed(first_step, steps, fn) runs fn(t) for the
/// warm-up and the timed steps; collects the figures of one scenario.
struct measurement {
  std::vector<std::uint64_t> bytes;  // per rank, over the timed steps
  std::vector<double> seconds;       // per rank, modelled, over the timed steps
  double wall_s = 0;                 // rank 0: timed steps, barrier to barrier
};

comm::network network_of(const options& o, const comm::link& l) {
  comm::network net(l, comm::throttle_mode::account);
  if (o.local_ranks > 1) {
    const comm::link intra = comm::link::parse(o.intra_link);
    for (int a = 0; a < o.ranks; ++a)
      for (int b = a + 1; b < o.ranks; ++b)
        if (a / o.local_ranks == b / o.local_ranks) net.set_both(a, b, intra);
  }
  return net;
}

/// Times `step(t)` on every rank: `warmup` untimed steps, then `steps` timed ones; `drain()` after the timing.
/// setup(rank, executor, communicator) makes the rank's {step(t), drain()}.
template <class Exec, class Setup>
measurement run_ranks(const options& o, const comm::network& net, Setup&& setup) {
  measurement m;
  m.bytes.assign(std::size_t(o.ranks), 0);
  m.seconds.assign(std::size_t(o.ranks), 0.0);
  std::vector<Exec> execs;
  comm::local_options lo;
  if constexpr (std::is_same_v<Exec, exec::cuda>) {
    for (int r = 0; r < o.ranks; ++r) {
      cudaStream_t s = nullptr;
      cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      execs.push_back(exec::cuda{s});
      lo.streams.push_back(s);  // the communicator ordered on the rank's stream, as the trainers require
    }
  } else {
    execs.assign(std::size_t(o.ranks), exec::host{o.threads});
  }
  {
    std::vector<comm::local> world = comm::local::world(o.ranks, lo);
    std::barrier sync(o.ranks);
    bench::on_ranks(o.ranks, [&](int r) {
      const Exec& ex = execs[std::size_t(r)];
      wire c(world[std::size_t(r)], net);
      auto rank = setup(r, ex, c);
      synchronize(ex);
      sync.arrive_and_wait();
      for (int t = 0; t < o.warmup; ++t) rank.step(t);
      synchronize(ex);
      sync.arrive_and_wait();
      const std::uint64_t bytes0 = c.metrics().bytes_sent();
      const double seconds0 = c.metrics().seconds;
      const auto t0 = std::chrono::steady_clock::now();
      for (int t = o.warmup; t < o.warmup + o.steps; ++t) rank.step(t);
      synchronize(ex);
      sync.arrive_and_wait();
      if (r == 0) m.wall_s = bench::seconds_since(t0);
      m.bytes[std::size_t(r)] = c.metrics().bytes_sent() - bytes0;
      m.seconds[std::size_t(r)] = c.metrics().seconds - seconds0;
      rank.drain();
      synchronize(ex);
      sync.arrive_and_wait();  // no rank frees buffers a peer's exchange still reads
    });
  }
  if constexpr (std::is_same_v<Exec, exec::cuda>)
    for (const auto& e : execs) cuda_check(cudaStreamDestroy(e.stream));
  return m;
}

/// The data-parallel step of dist::data_parallel_trainer without the model.
template <class Exec>
struct allreduce_rank {
  using cview = typename rank_state<Exec, optim::adamw>::cview;
  rank_state<Exec, optim::adamw> st;
  wire& c;
  const dist::bucket_plan& plan;
  std::vector<wire::request> pending;

  void step(int t) {
    for (const dist::bucket& b : plan)  // launched in ready order, as from the backward's hook
      pending.push_back(c.all_reduce(st.grad.v().slice(b.begin, b.end), comm::reduce_op::avg));
    for (auto& q : pending) q.wait();
    pending.clear();
    const double norm = optim::clip_grad_norm(st.ex, st.grads(0, st.infos.size()), clip);
    if (!std::isfinite(norm)) throw std::runtime_error("allreduce: non-finite gradient norm");
    const optim::step_context ctx{lr, t + 1};
    for (std::size_t i = 0; i < st.infos.size(); ++i)
      st.opt.step(st.ex, st.at(st.master, i), cview(st.at(st.grad, i)), st.states[i], st.infos[i], ctx,
                  st.at(st.working, i));
  }
  void drain() {}
};

/// The gossip step of decent::gossip_trainer without the model.
template <class Exec>
struct gossip_rank {
  using state = rank_state<Exec, decent::accum_adamw>;
  using cview = typename state::cview;
  state st;
  wire& c;
  const dist::bucket_plan& plan;
  const decent::group_schedule& topo;
  std::vector<wire> groups;  // by phase
  std::vector<std::optional<wire::request>> in_flight;
  std::vector<bool> holds_mix;

  gossip_rank(state s, wire& w, const dist::bucket_plan& p, const decent::group_schedule& g)
      : st(std::move(s)), c(w), plan(p), topo(g), in_flight(p.size()), holds_mix(p.size(), false) {
    for (int q = 0; q < topo.period(); ++q) groups.push_back(c.split(topo.plan(q, c.rank()).group_id, c.rank()));
  }

  void step(int t) {
    const decent::gossip_plan next = topo.plan(t + 1, c.rank());
    const optim::step_context ctx{lr, t + 1};
    for (std::size_t k = 0; k < plan.size(); ++k) {
      const dist::bucket& b = plan[k];
      if (in_flight[k]) {  // 1. the mixing launched in the previous step
        in_flight[k]->wait();
        in_flight[k].reset();
      }
      const double norm = optim::clip_grad_norm(st.ex, st.grads(b.first, b.last), clip);  // 2-3
      if (!std::isfinite(norm)) throw std::runtime_error("gossip: non-finite gradient norm");
      for (std::size_t i = b.first; i < b.last; ++i) {
        const cview g(st.at(st.grad, i));
        if (holds_mix[k])
          st.opt.step_from_mixed(st.ex, cview(st.at(st.comm, i)), st.at(st.master, i), g, st.states[i], st.infos[i],
                                 ctx, st.at(st.working, i));
        else st.opt.step(st.ex, st.at(st.master, i), g, st.states[i], st.infos[i], ctx, st.at(st.working, i));
      }
      holds_mix[k] = next.op != decent::mix_op::none;  // 4. the mixing of the next round
      if (!holds_mix[k]) continue;
      const typename state::fview cb = st.comm.v().slice(b.begin, b.end);
      copy(st.ex, cview(st.master.v().slice(b.begin, b.end)), cb);
      scale(st.ex, float(next.weight()), cb);
      in_flight[k] = groups[std::size_t(next.phase)].all_reduce(cb, comm::reduce_op::sum);
    }
  }
  void drain() {
    for (auto& q : in_flight)
      if (q) {
        q->wait();
        q.reset();
      }
  }
};

/// Bytes the plan says rank r sends over timed steps [warmup, warmup + steps).
std::uint64_t planned_bytes(const options& o, const dist::bucket_plan& plan, const decent::group_schedule& topo, int r,
                            bool allreduce) {
  std::uint64_t total = 0;
  for (int t = o.warmup; t < o.warmup + o.steps; ++t) {
    const decent::gossip_plan p = topo.plan(allreduce ? 0 : t + 1, r);
    for (const dist::bucket& b : plan) total += p.bytes_sent(b.bytes());
  }
  return total;
}

template <class Exec>
scenario measure(const options& o, const std::string& name, const std::string& bandwidth, const comm::network& net,
                 const layout& l, const dist::bucket_plan& plan) {
  scenario s;
  s.name = name;
  s.bandwidth = bandwidth;
  const bool allreduce = name == "allreduce";
  const decent::group_schedule topo =
      allreduce ? decent::group_schedule(decent::complete(o.ranks)) : make_topology(name, o.ranks, o.local_ranks);
  s.period = allreduce ? 1 : topo.period();
  measurement m;
  if (allreduce) {
    m = run_ranks<Exec>(o, net, [&](int r, const Exec& ex, wire& c) {
      return allreduce_rank<Exec>{rank_state<Exec, optim::adamw>(ex, l, optim::adamw{}, r, false), c, plan, {}};
    });
  } else {
    m = run_ranks<Exec>(o, net, [&](int r, const Exec& ex, wire& c) {
      return gossip_rank<Exec>(rank_state<Exec, decent::accum_adamw>(ex, l, decent::accum_adamw{}, r, true), c, plan,
                               topo);
    });
  }
  s.wall_ms_per_step = 1e3 * m.wall_s / o.steps;
  s.bytes_exact = true;
  for (int r = 0; r < o.ranks; ++r) {
    const std::uint64_t want = planned_bytes(o, plan, topo, r, allreduce);
    s.bytes_measured.push_back(m.bytes[std::size_t(r)]);
    s.bytes_planned.push_back(want);
    s.bytes_exact = s.bytes_exact && want == m.bytes[std::size_t(r)];
    s.bytes_per_step.push_back(double(m.bytes[std::size_t(r)]) / o.steps);
    s.comm_model_s_max = std::max(s.comm_model_s_max, m.seconds[std::size_t(r)] / o.steps);
    s.comm_model_s_mean += m.seconds[std::size_t(r)] / o.steps / o.ranks;
  }
  return s;
}

double max_of(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }
double mean_of(const std::vector<double>& v) {
  double x = 0;
  for (double y : v) x += y;
  return x / double(v.size());
}

io::json scenario_json(const scenario& s) {
  io::json per_rank = io::json::array(), measured = io::json::array(), planned = io::json::array();
  for (std::size_t r = 0; r < s.bytes_per_step.size(); ++r) {
    per_rank.push_back(io::json(s.bytes_per_step[r]));
    measured.push_back(io::json(s.bytes_measured[r]));
    planned.push_back(io::json(s.bytes_planned[r]));
  }
  return io::json::object({{"trainer", io::json(s.name == "allreduce" ? "data_parallel" : "gossip")},
                           {"topology", io::json(s.name)},
                           {"bandwidth", io::json(s.bandwidth)},
                           {"period", io::json(s.period)},
                           {"wall_ms_per_step", io::json(s.wall_ms_per_step)},
                           {"comm_model_s_per_step_max", io::json(s.comm_model_s_max)},
                           {"comm_model_s_per_step_mean", io::json(s.comm_model_s_mean)},
                           {"bytes_sent_per_step_max", io::json(max_of(s.bytes_per_step))},
                           {"bytes_sent_per_step_mean", io::json(mean_of(s.bytes_per_step))},
                           {"bytes_sent_per_step", per_rank},
                           {"bytes_sent_timed", measured},
                           {"bytes_planned_timed", planned},
                           {"bytes_exact", io::json(s.bytes_exact)},
                           {"ratio_vs_allreduce", io::json::object({{"wall", io::json(s.ratio_wall)},
                                                                    {"comm_model", io::json(s.ratio_comm)},
                                                                    {"bytes", io::json(s.ratio_bytes)}})}});
}

void write_json(const options& o, const std::string& device, const nn::llama_config& cfg, const layout& l,
                const dist::bucket_plan& plan, const std::vector<scenario>& results) {
  io::json bws = io::json::array(), topos = io::json::array(), buckets = io::json::array(), out = io::json::array();
  for (const auto& b : o.bandwidths) {
    const comm::link k = comm::link::parse(b);
    bws.push_back(io::json::object({{"name", io::json(b)},
                                    {"bits_per_second", io::json(k.bits_per_second)},
                                    {"latency_s", io::json(k.latency_seconds)}}));
  }
  for (const auto& t : o.topologies) topos.push_back(io::json(t));
  for (const auto& b : plan) buckets.push_back(io::json(std::int64_t(b.numel())));
  for (const auto& s : results) out.push_back(scenario_json(s));
  const decent::accum_adamw aa{};
  const optim::adamw ad{};
  char beta2[32];
  std::snprintf(beta2, sizeof beta2, "%g", double(ad.beta2));
  io::json doc = bench::document("gossip", device, o.commit);
  doc.set("config",
          io::json::object(
              {{"model", io::json(cfg.name)},
               {"parameters", io::json(cfg.parameters())},
               {"flat_elements", io::json(l.total())},
               {"ranks", io::json(o.ranks)},
               {"local_ranks", io::json(o.local_ranks)},
               {"intra_link", io::json(o.local_ranks > 1 ? o.intra_link : std::string("none"))},
               {"bandwidths", bws},
               {"throttle", io::json("account")},
               {"topologies", topos},
               {"bucket_bytes", io::json(plan.bucket_bytes())},
               {"bucket_elements", buckets},
               {"steps", io::json(o.steps)},
               {"warmup", io::json(o.warmup)},
               {"executor",
                io::json(device == "host" ? "exec::host, " + std::to_string(o.threads) + " worker thread(s) per rank"
                                          : std::string("exec::cuda, one stream per rank"))},
               {"allreduce", io::json("all_reduce(avg) of each bucket's fp32 gradients in ready order, wait, "
                                      "global-norm clip, optim::adamw per tensor (beta2 " +
                                      std::string(beta2) + ")")},
               {"gossip", io::json("per bucket: wait last step's exchange, per-bucket clip, decent::accum_adamw (K " +
                                   std::to_string(aa.accum_iter) +
                                   ") step_from_mixed per tensor, comm block = x / |R|, "
                                   "all_reduce(sum) on the next round's group communicator")},
               {"lr", io::json(lr)},
               {"clip", io::json(clip)},
               {"timing", io::json(std::string("host clock, barrier of all ranks to barrier after every rank's stream "
                                               "is idle, over the timed steps; all ranks share ") +
                                   (device == "host" ? "the host's cores" : "one GPU"))},
               {"not_measured", io::json("model compute; data_parallel_trainer's all-reduce of the step loss (one "
                                         "double)")}}));
  doc.set("results", out);
  bench::write_document(o.out, doc);
}

int run(int argc, char** argv) {
  options o;
  std::string bandwidths = "gbit1,gbit25", topologies = "complete,ring,one_peer_exp,alternating_exp_ring";
  bench::cli cli("bench_gossip",
                 "per-step time and bytes of data-parallel all-reduce against gossip (each decent topology),\n"
                 "ranks as threads on one GPU through comm::local under comm::throttled (account mode), buckets of a "
                 "Llama\nconfig cut by dist::bucket_plan; no model compute (see bench/gossip/README.md)");
  cli.flag("config", o.config, "Llama preset whose parameters are bucketed")
      .flag("ranks", o.ranks, "ranks (2 to 64)")
      .flag("local-ranks", o.local_ranks,
            "ranks per node for alternating_exp_ring; L > 1 also makes links inside a node --intra-link (1: every "
            "rank its own node, every link the same)")
      .flag("intra-link", o.intra_link, "link inside a node when --local-ranks > 1")
      .flag("bandwidths", bandwidths,
            "modelled links, comma-separated: " + comm::links::preset_names() +
                " or <number><kbit|mbit|gbit>[@<latency><s|ms|us>] (latency 0 unless given)")
      .flag("topologies", topologies,
            "gossip topologies, comma-separated; allreduce always runs first, as the reference of the ratios")
      .flag("bucket-mb", o.bucket_mb, "bucket size in MB of fp32")
      .flag("steps", o.steps, "timed steps per scenario (the default is a multiple of every period with 8 ranks)")
      .flag("warmup", o.warmup, "untimed steps first")
      .flag("device", o.device,
            "cuda (the GPU), host (the CPU: the fallback, and a quick check with a small --config) or auto: cuda "
            "when a GPU is present",
            {"auto", "cuda", "host"})
      .flag("threads", o.threads, "host worker threads per rank with --device host");
  bench::output_flags(cli, o.out, o.commit);
  if (!cli.parse(argc, argv)) return 0;
  bench::check_range("ranks", o.ranks, 2, 64);
  bench::check_range("local-ranks", o.local_ranks, 1, 100000);
  bench::check_range("steps", o.steps, 1, 100000);
  bench::check_range("warmup", o.warmup, 0, 100000);
  bench::check_range("threads", o.threads, 1, 100000);
  bench::check_positive("bucket-mb", o.bucket_mb);
  o.bandwidths = bench::split_list("bandwidths", bandwidths);
  o.topologies = bench::split_list("topologies", topologies);
  for (const std::string& link : o.bandwidths) check_link("bandwidths", link);
  check_link("intra-link", o.intra_link);
  for (const auto& t : o.topologies) make_topology(t, o.ranks, o.local_ranks);  // size errors before any work

  const nn::llama_config cfg = nn::presets::by_name(o.config);
  const layout l = layout_of(cfg);
  const dist::bucket_plan plan = dist::bucket_plan::of(l, std::int64_t(std::llround(o.bucket_mb * 1e6)));
  const examples::device_choice device = examples::choose_device(o.device);
  const bool on_gpu = device.cuda;
  const std::string& device_name = device.name;
  std::printf(
      "bench_gossip on %s: Llama %s (%lld parameters, %lld flat fp32 elements = %s), %zu buckets of up to "
      "%s, %d ranks (threads, comm::local on %s)%s, %d timed steps after %d warm-up\n",
      device_name.c_str(), cfg.name.c_str(), (long long)cfg.parameters(), (long long)l.total(),
      human_bytes(4.0 * double(l.total())).c_str(), plan.size(), human_bytes(double(plan.bucket_bytes())).c_str(),
      o.ranks, on_gpu ? "one GPU" : "the host",
      o.local_ranks > 1 ? (", nodes of " + std::to_string(o.local_ranks) + " ranks linked by " + o.intra_link).c_str()
                        : "",
      o.steps, o.warmup);
  std::fflush(stdout);

  std::vector<std::string> names{"allreduce"};
  names.insert(names.end(), o.topologies.begin(), o.topologies.end());
  std::vector<scenario> results;
  for (const auto& bw : o.bandwidths) {
    const comm::network net = network_of(o, comm::link::parse(bw));
    std::printf("\n%s links (account mode)\n%-22s %6s %12s %14s %14s %16s %7s %8s %8s %8s\n", bw.c_str(), "scenario",
                "period", "wall ms/step", "comm s/step", "(mean rank)", "bytes/step/rank", "exact", "x wall", "x comm",
                "x bytes");
    std::fflush(stdout);
    std::size_t reference = results.size();
    for (const auto& name : names) {
      scenario s =
          on_gpu ? measure<exec::cuda>(o, name, bw, net, l, plan) : measure<exec::host>(o, name, bw, net, l, plan);
      const scenario& ref = name == "allreduce" ? s : results[reference];
      s.ratio_wall = s.wall_ms_per_step / ref.wall_ms_per_step;
      s.ratio_comm = ref.comm_model_s_max > 0 ? s.comm_model_s_max / ref.comm_model_s_max : 0.0;
      s.ratio_bytes = max_of(s.bytes_per_step) / max_of(ref.bytes_per_step);
      std::printf("%-22s %6d %12.2f %14.4f %14.4f %16s %7s %8.3f %8.3f %8.3f\n", s.name.c_str(), s.period,
                  s.wall_ms_per_step, s.comm_model_s_max, s.comm_model_s_mean,
                  human_bytes(max_of(s.bytes_per_step)).c_str(), s.bytes_exact ? "yes" : "NO", s.ratio_wall,
                  s.ratio_comm, s.ratio_bytes);
      std::fflush(stdout);
      results.push_back(std::move(s));
    }
  }
  bool exact = true;
  for (const auto& s : results) exact = exact && s.bytes_exact;
  if (!o.out.empty()) write_json(o, device_name, cfg, l, plan, results);
  if (!exact) {
    std::fprintf(stderr,
                 "bench_gossip: the bytes sent differ from the plan's bytes_sent in some scenario (exact: NO)\n");
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::guarded_main("bench_gossip", [&] { return run(argc, argv); });
}

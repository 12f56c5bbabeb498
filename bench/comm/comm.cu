// bench_comm: how fast the communicators move bytes on one GPU, against the device's own copy in the same run.
//
//   * comm::local, device to device: rank 0 sends to rank 1 (threads of this process, one stream each); the
//     achieved bandwidth bytes / time against cudaMemcpyAsync device-to-device of the same size, timed the same
//     way (a batch of back-to-back transfers, host clock, until the streams are idle).
//   * comm::local all_reduce on --ranks ranks: algorithm bandwidth (buffer bytes / time), bus bandwidth
//     (x 2(n-1)/n, as nccl-tests reports), and the memory traffic of the reduction kernel (it reads n buffers
//     and writes n buffers: 2 n bytes / time) against the copy's (reads and writes: 2 bytes / time).
//   * comm::nccl with a world of one: the latency of each operation (issue + wait on the host), median and
//     spread over --latency-reps calls, rendezvous on 127.0.0.1.
//
//   bench_comm [--sizes 64KiB,1MiB,16MiB,64MiB,256MiB] [--ranks 4] [--reps 50] [--warmup 5]
//              [--latency-reps 200] [--no-nccl] [--out FILE.json] [--commit SHA]
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/comm/nccl.cuh>
#include <subspace/subspace.hpp>

#include "common/bench.hpp"

using namespace subspace;

namespace {

struct config {
  std::vector<std::int64_t> sizes;
  int ranks = 4;
  int reps = 50;
  int warmup = 5;
  int latency_reps = 200;
  bool nccl = true;
  std::string out;
  std::string commit = "unknown";
};

struct bandwidth_row {
  std::int64_t bytes;
  double copy_gbps, p2p_gbps;  // bytes per second / 1e9
};
struct all_reduce_row {
  std::int64_t bytes;
  double algbw_gbps, busbw_gbps, memory_gbps, copy_memory_gbps;
};
struct latency_row {
  std::string op;
  std::int64_t bytes;
  double median_us, p10_us, p90_us;
};

std::vector<std::int64_t> parse_sizes(const std::string& list) {
  std::vector<std::int64_t> out;
  for (const std::string& item : bench::split_list("sizes", list)) {
    char* end = nullptr;
    const double v = std::strtod(item.c_str(), &end);
    const std::string unit(end);
    double scale = 0;
    if (unit.empty() || unit == "B") scale = 1;
    else if (unit == "KiB" || unit == "K") scale = 1024.0;
    else if (unit == "MiB" || unit == "M") scale = 1024.0 * 1024.0;
    else if (unit == "GiB" || unit == "G") scale = 1024.0 * 1024.0 * 1024.0;
    if (end == item.c_str() || scale == 0 || !(v > 0))
      throw bench::cli_error("--sizes: cannot read '" + item + "' (expected e.g. 4096, 64KiB, 1MiB, 1GiB)");
    const auto bytes = std::int64_t(v * scale);
    out.push_back(std::max<std::int64_t>(4, bytes / 4 * 4));  // whole floats
  }
  return out;
}

std::string human(std::int64_t bytes) {
  char buf[32];
  if (bytes >= (1 << 30)) std::snprintf(buf, sizeof buf, "%.0fGiB", double(bytes) / double(1 << 30));
  else if (bytes >= (1 << 20)) std::snprintf(buf, sizeof buf, "%.0fMiB", double(bytes) / double(1 << 20));
  else if (bytes >= 1024) std::snprintf(buf, sizeof buf, "%.0fKiB", double(bytes) / 1024.0);
  else std::snprintf(buf, sizeof buf, "%lldB", static_cast<long long>(bytes));
  return buf;
}

double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * double(v.size() - 1);
  const auto lo = std::size_t(pos);
  const auto hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - double(lo)) * (v[hi] - v[lo]);
}

/// Device-to-device copies of `bytes`, `count` back to back on one stream: seconds per copy.
double copy_seconds(float* dst, const float* src, std::int64_t bytes, int count, cudaStream_t s) {
  cuda_check(cudaStreamSynchronize(s));
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < count; ++i)
    cuda_check(cudaMemcpyAsync(dst, src, std::size_t(bytes), cudaMemcpyDeviceToDevice, s));
  cuda_check(cudaStreamSynchronize(s));
  return bench::seconds_since(t0) / count;
}

/// comm::local sends of `bytes` from rank 0 to rank 1, `count` back to back: seconds per transfer.
double p2p_seconds(std::vector<comm::local>& comms, float* src, float* dst, std::int64_t bytes, int count) {
  std::barrier sync(2);
  double seconds = 0;
  const std::int64_t n = bytes / 4;
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    cudaStream_t s = comm::stream_of(c);
    cuda_check(cudaStreamSynchronize(s));
    sync.arrive_and_wait();
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<comm::local::request> q;
    q.reserve(std::size_t(count));
    for (int i = 0; i < count; ++i)
      q.push_back(r == 0 ? c.send(view<const float, device_space>(src, {n}), 1)
                         : c.recv(view<float, device_space>(dst, {n}), 0));
    for (auto& x : q) x.wait();
    cuda_check(cudaStreamSynchronize(s));
    sync.arrive_and_wait();
    if (r == 1) seconds = bench::seconds_since(t0) / count;
  });
  return seconds;
}

/// comm::local all_reduce of `bytes` per rank on every rank, `count` back to back: seconds per all_reduce.
double all_reduce_seconds(std::vector<comm::local>& comms, std::vector<float*>& bufs, std::int64_t bytes, int count) {
  const int n = int(comms.size());
  std::barrier sync(n);
  double seconds = 0;
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    cudaStream_t s = comm::stream_of(c);
    cuda_check(cudaStreamSynchronize(s));
    sync.arrive_and_wait();
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<comm::local::request> q;
    for (int i = 0; i < count; ++i)
      q.push_back(c.all_reduce(view<float, device_space>(bufs[std::size_t(r)], {bytes / 4}), comm::reduce_op::sum));
    for (auto& x : q) x.wait();
    cuda_check(cudaStreamSynchronize(s));
    sync.arrive_and_wait();
    if (r == 0) seconds = bench::seconds_since(t0) / count;
  });
  return seconds;
}

template <class F>
latency_row latency(const std::string& op, std::int64_t bytes, int reps, F&& call) {
  for (int i = 0; i < std::max(5, reps / 10); ++i) call();
  std::vector<double> us;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    call();
    us.push_back(bench::seconds_since(t0) * 1e6);
  }
  return latency_row{op, bytes, quantile(us, 0.5), quantile(us, 0.1), quantile(us, 0.9)};
}

void write_json(const config& cfg, const std::string& device, const std::vector<bandwidth_row>& bw,
                const std::vector<all_reduce_row>& ar, const std::vector<latency_row>& lat) {
  io::json sizes = io::json::array(), p2p = io::json::array(), all_reduce = io::json::array(),
           nccl_rows = io::json::array();
  for (const std::int64_t s : cfg.sizes) sizes.push_back(s);
  for (const bandwidth_row& b : bw)
    p2p.push_back(io::json::object({{"bytes", b.bytes},
                                    {"local_gbps", b.p2p_gbps},
                                    {"device_copy_gbps", b.copy_gbps},
                                    {"ratio", b.p2p_gbps / b.copy_gbps}}));
  for (const all_reduce_row& a : ar)
    all_reduce.push_back(io::json::object({{"bytes", a.bytes},
                                           {"ranks", cfg.ranks},
                                           {"algbw_gbps", a.algbw_gbps},
                                           {"busbw_gbps", a.busbw_gbps},
                                           {"memory_gbps", a.memory_gbps},
                                           {"device_copy_memory_gbps", a.copy_memory_gbps},
                                           {"ratio", a.memory_gbps / a.copy_memory_gbps}}));
  for (const latency_row& l : lat)
    nccl_rows.push_back(io::json::object(
        {{"op", l.op}, {"bytes", l.bytes}, {"median_us", l.median_us}, {"p10_us", l.p10_us}, {"p90_us", l.p90_us}}));
  io::json doc = bench::document("comm", device, cfg.commit);
  doc.set("config", io::json::object({{"ranks", cfg.ranks},
                                      {"reps", cfg.reps},
                                      {"warmup", cfg.warmup},
                                      {"latency_reps", cfg.latency_reps},
                                      {"nccl", cfg.nccl},
                                      {"timing",
                                       "host clock over a batch of back-to-back operations until the "
                                       "streams are idle; latency: median of single issue+wait calls"},
                                      {"sizes", sizes}}));
  doc.set("results",
          io::json::object({{"local_p2p", p2p}, {"local_all_reduce", all_reduce}, {"nccl_world1_latency", nccl_rows}}));
  bench::write_document(cfg.out, doc);
}

int run(int argc, char** argv) {
  config cfg;
  std::string sizes = "64KiB,1MiB,16MiB,64MiB,256MiB";
  bool no_nccl = false;
  bench::cli cli("bench_comm",
                 "comm::local device-to-device bandwidth against the device copy, and comm::nccl world-1 latency");
  cli.flag("sizes", sizes, "message sizes, comma-separated, e.g. 4KiB,1MiB,256MiB")
      .flag("ranks", cfg.ranks, "comm::local ranks for the all_reduce (2 to 64; the transfers use ranks 0 -> 1)")
      .flag("reps", cfg.reps, "timed transfers per size")
      .flag("warmup", cfg.warmup, "untimed transfers first")
      .flag("latency-reps", cfg.latency_reps, "NCCL calls per latency figure")
      .toggle("no-nccl", no_nccl, "skip the NCCL latencies");
  bench::output_flags(cli, cfg.out, cfg.commit);
  if (!cli.parse(argc, argv)) return 0;
  bench::check_range("ranks", cfg.ranks, 2, 64);
  bench::check_range("reps", cfg.reps, 1);
  bench::check_range("warmup", cfg.warmup, 0);
  bench::check_range("latency-reps", cfg.latency_reps, 1);
  cfg.nccl = !no_nccl;
  cfg.sizes = parse_sizes(sizes);
  const std::int64_t largest = *std::max_element(cfg.sizes.begin(), cfg.sizes.end());

  const cudaDeviceProp prop = bench::device_properties();
  std::printf("bench_comm on %s (sm_%d%d): %d reps after %d warm-up, sizes", prop.name, prop.major, prop.minor,
              cfg.reps, cfg.warmup);
  for (auto s : cfg.sizes) std::printf(" %s", human(s).c_str());
  std::printf("\n");
  std::fflush(stdout);

  // Buffers: two for the transfers and the copy, one per rank for the all_reduce (zeros: sums stay finite).
  std::vector<device_tensor<float>> owned;
  for (int i = 0; i < std::max(2, cfg.ranks); ++i) {
    owned.emplace_back(shape{largest / 4});
    cuda_check(cudaMemset(owned.back().data(), 0, owned.back().bytes()));
  }
  cudaStream_t copy_stream = nullptr;
  cuda_check(cudaStreamCreateWithFlags(&copy_stream, cudaStreamNonBlocking));

  std::vector<bandwidth_row> bw;
  std::vector<all_reduce_row> ar;
  std::vector<latency_row> lat;
  {
    auto pair = comm::local::world(2);
    auto world = comm::local::world(cfg.ranks);
    std::vector<float*> bufs;
    for (int r = 0; r < cfg.ranks; ++r) bufs.push_back(owned[std::size_t(r)].data());
    for (std::size_t i = 0; i < cfg.sizes.size(); ++i) {
      const std::int64_t bytes = cfg.sizes[i];
      if (cfg.warmup > 0) {
        copy_seconds(owned[1].data(), owned[0].data(), bytes, cfg.warmup, copy_stream);
        p2p_seconds(pair, owned[0].data(), owned[1].data(), bytes, cfg.warmup);
        all_reduce_seconds(world, bufs, bytes, cfg.warmup);
      }
      const double tc = copy_seconds(owned[1].data(), owned[0].data(), bytes, cfg.reps, copy_stream);
      const double tp = p2p_seconds(pair, owned[0].data(), owned[1].data(), bytes, cfg.reps);
      const double ta = all_reduce_seconds(world, bufs, bytes, cfg.reps);
      const double copy_gbps = double(bytes) / tc / 1e9, p2p_gbps = double(bytes) / tp / 1e9;
      bw.push_back({bytes, copy_gbps, p2p_gbps});
      const int n = cfg.ranks;
      const double alg = double(bytes) / ta / 1e9;
      ar.push_back({bytes, alg, alg * 2.0 * (n - 1) / n, 2.0 * n * double(bytes) / ta / 1e9, 2.0 * copy_gbps});
      std::printf(
          "[%zu/%zu] %-7s device copy %8.1f GB/s | local send->recv %8.1f GB/s (%.3fx) | local all_reduce "
          "x%d: algbw %7.1f GB/s, busbw %7.1f GB/s, memory %8.1f GB/s (%.3fx copy)\n",
          i + 1, cfg.sizes.size(), human(bytes).c_str(), copy_gbps, p2p_gbps, p2p_gbps / copy_gbps, n, alg,
          ar.back().busbw_gbps, ar.back().memory_gbps, ar.back().memory_gbps / ar.back().copy_memory_gbps);
      std::fflush(stdout);
    }
  }

  if (cfg.nccl) {
    std::printf("comm::nccl, world of 1 (rendezvous on 127.0.0.1): latency of issue + wait, %d calls each\n",
                cfg.latency_reps);
    std::fflush(stdout);
    comm::launch_info li;
    li.master_addr = "127.0.0.1";
    li.master_port = li.rendezvous_port = 0;
    comm::nccl_options o;
    o.timeout = std::chrono::seconds(60);
    auto c = comm::nccl::connect(li, o);
    float* a = owned[0].data();
    float* b = owned[1].data();
    for (const std::int64_t bytes : {std::int64_t(4), std::int64_t(1) << 20}) {
      const std::int64_t n = bytes / 4;
      const view<float, device_space> va(a, {n}), vb(b, {n});
      const int reps = cfg.latency_reps;
      lat.push_back(latency("all_reduce", bytes, reps, [&] { c.all_reduce(va, comm::reduce_op::sum).wait(); }));
      lat.push_back(latency("all_gather", bytes, reps, [&] { c.all_gather(va, vb).wait(); }));
      lat.push_back(
          latency("reduce_scatter", bytes, reps, [&] { c.reduce_scatter(va, vb, comm::reduce_op::sum).wait(); }));
      lat.push_back(latency("broadcast", bytes, reps, [&] { c.broadcast(va, 0).wait(); }));
      lat.push_back(latency("send_recv_grouped", bytes, reps, [&] {
        c.group_start();
        auto s = c.send(va, 0);
        auto r = c.recv(vb, 0);
        c.group_end();
        s.wait();
        r.wait();
      }));
      if (bytes == 4) lat.push_back(latency("barrier", 0, reps, [&] { c.barrier().wait(); }));
    }
    for (const auto& l : lat)
      std::printf("  %-18s %8s  median %7.1f us  (p10 %7.1f, p90 %7.1f)\n", l.op.c_str(), human(l.bytes).c_str(),
                  l.median_us, l.p10_us, l.p90_us);
    std::fflush(stdout);
  }

  cuda_check(cudaStreamDestroy(copy_stream));
  if (!cfg.out.empty()) write_json(cfg, prop.name, bw, ar, lat);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::guarded_main("bench_comm", [&] { return run(argc, argv); });
}

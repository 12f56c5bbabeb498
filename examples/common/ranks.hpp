#pragma once
// What the multi-rank examples (gossip_llama, pipeline_llama, context_llama) share: the network flags and the
// --bandwidth presets, a link printed for people, library messages without their source location, running one
// body per rank on threads, the executors and communicator options of in-process ranks, and (CUDA builds) this
// process's rank of an NCCL launch.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/comm/throttled.hpp>
#include <subspace/core/executor.hpp>
#include <subspace/core/parallel.hpp>
#if defined(__CUDACC__)
#include <subspace/comm/nccl.cuh>
#include <subspace/core/cuda/error.cuh>
#endif

#include "cli.hpp"

namespace examples {

/// A library message without its leading "file:line: ".
inline std::string without_location(std::string m) {
  const auto colon = m.find(": ");
  if (colon != std::string::npos) {
    const std::string head = m.substr(0, colon);
    const auto last = head.rfind(':');
    if (last != std::string::npos && last + 1 < head.size() &&
        head.find_first_not_of("0123456789", last + 1) == std::string::npos && head.find(' ') == std::string::npos)
      return m.substr(colon + 2);
  }
  return m;
}

/// --bandwidth: none (nullopt), or what comm::link::parse reads: a comm::links preset by the name of its constant
/// (gbit1 is comm::links::gbit1) or <number><kbit|mbit|gbit>[@<latency>].
inline std::optional<subspace::comm::link> parse_bandwidth(const std::string& b) {
  if (b == "none") return std::nullopt;
  try {
    return subspace::comm::link::parse(b);
  } catch (const subspace::invalid_argument&) {
    throw cli_error("--bandwidth: got '" + b + "', expected none, " + subspace::comm::links::preset_names() +
                    " or <number><kbit|mbit|gbit>[@<number><s|ms|us>] (e.g. 2.5gbit@50us)");
  }
}

/// "80 Mbit/s, 10000 us latency".
inline std::string link_text(const subspace::comm::link& l) {
  char buf[96];
  const double bps = l.bits_per_second;
  if (bps >= 1e9) std::snprintf(buf, sizeof buf, "%g Gbit/s", bps / 1e9);
  else if (bps >= 1e6) std::snprintf(buf, sizeof buf, "%g Mbit/s", bps / 1e6);
  else std::snprintf(buf, sizeof buf, "%g kbit/s", bps / 1e3);
  std::string s = buf;
  std::snprintf(buf, sizeof buf, ", %g us latency", l.latency_seconds * 1e6);
  return s + buf;
}

/// How a multi-rank example starts its ranks and which network it models: --launcher, --bandwidth, --throttle,
/// --comm-timeout.
struct network_flags {
  std::string launcher = "local", bandwidth = "none", throttle = "account";
  double comm_timeout = 300.0;
};

/// Declares --bandwidth and --throttle alone (for an example that orders its flags otherwise).
inline void declare_link_flags(cli& c, network_flags& n) {
  c.flag("bandwidth", n.bandwidth,
         "modelled link of every pair of ranks: none, " + subspace::comm::links::preset_names() +
             " (the comm::links presets, with their latencies) or <number><kbit|mbit|gbit>[@<latency><s|ms|us>] "
             "(latency 0 unless given)")
      .flag("throttle", n.throttle,
            "account: add the modelled time to a virtual clock; enforce: also delay each operation's completion "
            "until then",
            {"account", "enforce"});
}

/// Declares --launcher, --bandwidth, --throttle and --comm-timeout.
inline void declare_network_flags(cli& c, network_flags& n) {
  c.flag("launcher", n.launcher,
         "local: ranks as threads of this process (comm::local); nccl: one process per GPU, ranks from "
         "RANK/WORLD_SIZE/LOCAL_RANK or OMPI_COMM_WORLD_* (CUDA builds)",
         {"local", "nccl"});
  declare_link_flags(c, n);
  c.flag("comm-timeout", n.comm_timeout, "seconds a rank waits for its peers before failing");
}

/// The network --bandwidth and --throttle model (comm::throttled's): with --bandwidth none, a link so fast that
/// nothing is delayed (the bytes are still counted) and modelled = false.
struct modelled_network {
  subspace::comm::network net;
  bool modelled = false;
};
inline modelled_network network_of(const network_flags& n) {
  const std::optional<subspace::comm::link> l = parse_bandwidth(n.bandwidth);
  const auto mode =
      n.throttle == "enforce" && l ? subspace::comm::throttle_mode::enforce : subspace::comm::throttle_mode::account;
  return {subspace::comm::network(l ? *l : subspace::comm::link{1e30, 0.0}, mode), l.has_value()};
}

/// Runs body(r) on a thread per rank; returns the highest exit status, or rethrows the first failure (in time) with
/// the rank named. A rank that throws aborts the `worlds` (vectors of comm::local handles, one per rank), so its
/// peers stop at once instead of waiting out the communicator's timeout.
template <class Body, class... Worlds>
int on_threads(int n, Body&& body, Worlds&... worlds) {
  std::vector<int> status(static_cast<std::size_t>(n), 0);
  std::string first;
  std::mutex first_mutex;
  subspace::run_concurrently(n, [&](int r) {
    try {
      status[std::size_t(r)] = body(r);
    } catch (const std::exception& e) {
      status[std::size_t(r)] = -1;
      {
        const std::lock_guard lock(first_mutex);  // before the abort that makes the peers fail too
        if (first.empty()) first = "rank " + std::to_string(r) + ": " + e.what();
      }
      (worlds[std::size_t(r)].abort(std::string("it failed: ") + e.what()), ...);
    }
  });
  if (!first.empty()) throw std::runtime_error(first);
  return *std::max_element(status.begin(), status.end());
}

/// The executors of n in-process ranks and the comm::local options that go with them: host executors of `threads`
/// workers each, or, on one GPU, a stream per rank on which the rank computes and its communicator orders its
/// operations (the data moves on the world's streams, so communication still overlaps computation). The streams
/// are destroyed with this.
template <class Exec>
class local_ranks {
 public:
  local_ranks(int n, double timeout_seconds, int threads) {
    options_.timeout = std::chrono::milliseconds(std::int64_t(timeout_seconds * 1e3));
    for (int r = 0; r < n; ++r) {
      if constexpr (std::is_same_v<Exec, subspace::exec::host>) {
        execs_.push_back(subspace::exec::host{threads});
      } else {
#if defined(__CUDACC__)
        cudaStream_t st = nullptr;
        subspace::cuda_check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
        execs_.push_back(subspace::exec::cuda{st});
        options_.streams.push_back(st);
#endif
      }
    }
  }
  ~local_ranks() {
#if defined(__CUDACC__)
    for (void* st : options_.streams) cudaStreamDestroy(static_cast<cudaStream_t>(st));
#endif
  }
  local_ranks(const local_ranks&) = delete;
  local_ranks& operator=(const local_ranks&) = delete;

  const Exec& exec(int r) const { return execs_[std::size_t(r)]; }
  /// A world of the ranks (device operations on their streams).
  std::vector<subspace::comm::local> world() const {
    return subspace::comm::local::world(int(execs_.size()), options_);
  }
  /// A second world for the few host numbers the examples exchange after each step (not throttled).
  std::vector<subspace::comm::local> stats_world() const {
    subspace::comm::local_options o;
    o.timeout = options_.timeout;
    return subspace::comm::local::world(int(execs_.size()), o);
  }

 private:
  subspace::comm::local_options options_;
  std::vector<Exec> execs_;
};

#if defined(__CUDACC__)
/// This process as one rank of a launcher's world (torchrun / mpirun variables): GPU LOCAL_RANK, a stream that
/// the models and both communicators share (kept until the process exits: the communicators use it to their end),
/// the world and a second communicator for statistics. abort(why) gives both up, so the peers fail fast.
struct nccl_process {
  subspace::comm::launch_info info;
  cudaStream_t stream = nullptr;
  subspace::comm::nccl world, stats;
  std::string device_name;

  static nccl_process connect(double timeout_seconds) {
    const subspace::comm::launch_info li = subspace::comm::launch_from_env();
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
      throw cli_error("--launcher nccl: no CUDA device is present");
    subspace::cuda_check(cudaSetDevice(li.local_rank % devices));
    cudaStream_t st = nullptr;
    subspace::cuda_check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    subspace::comm::nccl_options no;
    no.timeout = std::chrono::milliseconds(std::int64_t(timeout_seconds * 1e3));
    no.stream = st;
    subspace::comm::nccl world = subspace::comm::nccl::connect(li, no);
    subspace::comm::nccl stats = world.split(0, world.rank());
    cudaDeviceProp prop{};
    subspace::cuda_check(cudaGetDeviceProperties(&prop, world.device()));
    return nccl_process{li, st, std::move(world), std::move(stats), prop.name};
  }
  void abort(const std::string& why) {
    stats.abort(why);
    world.abort(why);
  }
};
#endif

}  // namespace examples

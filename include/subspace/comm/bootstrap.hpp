#pragma once
// Bootstrapping a world of processes: who this process is (launch_info, read from the launcher's environment).
// comm::nccl (comm/nccl.cuh) joins the world it describes through a TCP rendezvous (comm/detail/rendezvous.hpp).
//
// Environments understood, in this order:
//   torchrun style   RANK, WORLD_SIZE (both required once either is set), LOCAL_RANK, LOCAL_WORLD_SIZE
//   mpirun (Open MPI) OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK,
//                    OMPI_COMM_WORLD_LOCAL_SIZE
//   neither          one process: rank 0 of 1
// and, for every launcher, MASTER_ADDR (default 127.0.0.1 when every rank runs on this host, else required) and
// MASTER_PORT (default 29500). The rendezvous listens at MASTER_ADDR:MASTER_PORT, except that
// SUBSPACE_RENDEZVOUS_PORT overrides the port, and under torchrun with an agent store
// (TORCHELASTIC_USE_AGENT_STORE=True: torchrun's own store holds MASTER_PORT) it uses MASTER_PORT + 1.

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <string>

#include "../core/error.hpp"

namespace subspace::comm {

/// Where this process sits in a multi-process world.
struct launch_info {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;        // among the ranks of this host (picks the GPU)
  int local_world_size = 1;  // ranks on this host
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  int rendezvous_port = 29500;    // where rank 0's rendezvous listens (see the top of this file)
  std::string launcher = "none";  // "torchrun" (RANK/WORLD_SIZE), "mpirun" (OMPI_COMM_WORLD_*) or "none"
};

/// Looks up an environment variable (null when unset). Tests pass their own.
using env_lookup = std::function<const char*(const char*)>;

inline const char* process_environment(const char* name) { return std::getenv(name); }

namespace detail {

inline bool env_set(const env_lookup& env, const char* name) {
  const char* v = env(name);
  return v != nullptr && *v != '\0';
}

/// The integer in `name`, or `fallback` when unset; raises invalid_argument naming the variable otherwise.
inline int env_int(const env_lookup& env, const char* name, int fallback) {
  const char* v = env(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || errno != 0 || x < -2147483647L || x > 2147483647L)
    throw invalid_argument(std::string("comm::launch_from_env: ") + name + "='" + v + "' is not an integer");
  return int(x);
}

inline bool env_true(const env_lookup& env, const char* name) {
  const char* v = env(name);
  if (v == nullptr) return false;
  const std::string s(v);
  return s == "1" || s == "True" || s == "true" || s == "TRUE" || s == "yes";
}

}  // namespace detail

/// Reads launch_info from the environment (see the top of this file). Raises invalid_argument naming
/// the variable that is missing, unreadable or out of range.
inline launch_info launch_from_env(const env_lookup& env = process_environment) {
  using detail::env_int;
  using detail::env_set;
  launch_info li;
  std::string rank_var = "RANK", size_var = "WORLD_SIZE", local_var = "LOCAL_RANK";
  if (env_set(env, "RANK") || env_set(env, "WORLD_SIZE")) {
    li.launcher = "torchrun";
    for (const char* v : {"RANK", "WORLD_SIZE"})
      if (!env_set(env, v))
        throw invalid_argument(std::string("comm::launch_from_env: ") + v +
                               " is not set (a torchrun-style launch sets RANK and WORLD_SIZE together)");
    li.rank = env_int(env, "RANK", 0);
    li.world_size = env_int(env, "WORLD_SIZE", 1);
    li.local_world_size = env_int(env, "LOCAL_WORLD_SIZE", li.world_size);
    li.local_rank = env_int(env, "LOCAL_RANK", li.rank % std::max(1, li.local_world_size));
  } else if (env_set(env, "OMPI_COMM_WORLD_RANK")) {
    li.launcher = "mpirun";
    rank_var = "OMPI_COMM_WORLD_RANK";
    size_var = "OMPI_COMM_WORLD_SIZE";
    local_var = "OMPI_COMM_WORLD_LOCAL_RANK";
    if (!env_set(env, "OMPI_COMM_WORLD_SIZE"))
      throw invalid_argument("comm::launch_from_env: OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not");
    li.rank = env_int(env, "OMPI_COMM_WORLD_RANK", 0);
    li.world_size = env_int(env, "OMPI_COMM_WORLD_SIZE", 1);
    li.local_world_size = env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", li.world_size);
    li.local_rank = env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", li.rank % std::max(1, li.local_world_size));
  }
  const std::string pre = "comm::launch_from_env (" + li.launcher + "): ";
  if (li.world_size < 1) throw invalid_argument(pre + size_var + "=" + std::to_string(li.world_size) + " is below 1");
  if (li.rank < 0 || li.rank >= li.world_size)
    throw invalid_argument(pre + rank_var + "=" + std::to_string(li.rank) + " outside [0, " + size_var + "=" +
                           std::to_string(li.world_size) + ")");
  if (li.local_world_size < 1 || li.local_world_size > li.world_size)
    throw invalid_argument(pre + "the local world size " + std::to_string(li.local_world_size) + " is outside [1, " +
                           std::to_string(li.world_size) + "]");
  if (li.local_rank < 0 || li.local_rank >= li.local_world_size)
    throw invalid_argument(pre + local_var + "=" + std::to_string(li.local_rank) + " outside [0, " +
                           std::to_string(li.local_world_size) + ")");
  if (env_set(env, "MASTER_ADDR")) {
    li.master_addr = env("MASTER_ADDR");
  } else if (li.local_world_size < li.world_size) {
    throw invalid_argument(pre + "MASTER_ADDR is not set, and the world spans several hosts (" +
                           std::to_string(li.world_size) + " ranks, " + std::to_string(li.local_world_size) +
                           " on this host): set it to rank 0's host on every host");
  }
  li.master_port = env_int(env, "MASTER_PORT", 29500);
  const int lowest = li.world_size == 1 ? 0 : 1;  // port 0 (any free port) only makes sense alone
  if (li.master_port < lowest || li.master_port > 65535)
    throw invalid_argument(pre + "MASTER_PORT=" + std::to_string(li.master_port) + " outside [" +
                           std::to_string(lowest) + ", 65535]");
  li.rendezvous_port = li.master_port;
  if (env_set(env, "SUBSPACE_RENDEZVOUS_PORT")) {
    li.rendezvous_port = env_int(env, "SUBSPACE_RENDEZVOUS_PORT", li.master_port);
    if (li.rendezvous_port < lowest || li.rendezvous_port > 65535)
      throw invalid_argument(pre + "SUBSPACE_RENDEZVOUS_PORT=" + std::to_string(li.rendezvous_port) + " outside [" +
                             std::to_string(lowest) + ", 65535]");
  } else if (detail::env_true(env, "TORCHELASTIC_USE_AGENT_STORE") && li.master_port < 65535) {
    li.rendezvous_port = li.master_port + 1;
  }
  return li;
}

}  // namespace subspace::comm

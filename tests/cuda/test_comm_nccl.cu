// comm::nccl. World size 1 on one GPU (MASTER_ADDR 127.0.0.1 and a free port; a world of one skips the TCP
// exchange, which the host tests and the multi-process test exercise): the Communicator conformance suite (host
// views, staged), every operation on device views against direct values, split, the environment bootstrap,
// NVLink multicast left off, and a hung operation aborted after the timeout. Several GPUs: this binary starts
// itself once per GPU (torchrun-style environment, rendezvous on 127.0.0.1) and each process runs the worker
// test case below; skipped with fewer than 2 GPUs.
#include <doctest/doctest.h>

#include <cuda_runtime.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <subspace/comm/nccl.cuh>
#include <subspace/comm/throttled.hpp>
#include <subspace/subspace.hpp>

#include "host/conformance.hpp"
#include "support/numeric.hpp"

extern char** environ;

using namespace subspace;
using namespace std::chrono_literals;
using testing::conformance::filled;

namespace {

comm::launch_info alone() {
  comm::launch_info li;
  li.master_addr = "127.0.0.1";
  li.master_port = li.rendezvous_port = 0;  // any free port
  return li;
}

comm::nccl_options with_timeout(std::chrono::milliseconds t) {
  comm::nccl_options o;
  o.timeout = t;
  return o;
}

struct nccl_world_of_one {
  using communicator = comm::nccl;
  static std::vector<int> world_sizes() { return {1}; }
  static std::vector<comm::nccl> make(int n) {
    REQUIRE(n == 1);
    std::vector<comm::nccl> v;
    v.push_back(comm::nccl::connect(alone(), with_timeout(60s)));
    return v;
  }
};

template <class T>
host_tensor<T> values(std::uint64_t seed, const shape& s) {
  return testing::random_tensor<T>(s, seed);
}

template <class T>
bool same_bits(const host_tensor<T>& a, const host_tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

int free_port() {
  comm::detail::rendezvous_server probe("127.0.0.1", 0);
  return probe.port();
}

}  // namespace

TYPE_TO_STRING(nccl_world_of_one);
TEST_CASE_TEMPLATE_APPLY(communicator_conformance, std::tuple<nccl_world_of_one>);

TEST_CASE_TEMPLATE("comm::nccl, world of 1: every operation on device memory", T, float, bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  auto c = comm::nccl::connect(alone(), with_timeout(60s));
  REQUIRE(c.rank() == 0);
  REQUIRE(c.size() == 1);
  const exec::cuda ex{c.stream()};
  for (const std::int64_t m : {std::int64_t(1), std::int64_t(37), std::int64_t(100003)}) {
    CAPTURE(m);
    const auto x = values<T>(seed, {m});
    for (const auto op : {comm::reduce_op::sum, comm::reduce_op::avg, comm::reduce_op::max}) {
      auto d = to_device(ex, x.v());
      auto q = c.all_reduce(d.v(), op);
      q.wait();
      CHECK(q.test());
      CHECK(same_bits(to_host(ex, d.v()), x));  // over one rank every reduction is the identity
    }
    auto in = to_device(ex, x.v());
    device_tensor<T> gathered({1, m}), scattered({m}), got({m});
    c.all_gather(in.v(), gathered.v()).wait();
    CHECK(same_bits(to_host(ex, gathered.v().reshape({m})), x));
    c.reduce_scatter(in.v(), scattered.v(), comm::reduce_op::sum).wait();
    CHECK(same_bits(to_host(ex, scattered.v()), x));
    auto b = to_device(ex, x.v());
    c.broadcast(b.v(), 0).wait();
    CHECK(same_bits(to_host(ex, b.v()), x));
    c.group_start();
    auto s = c.send(in.v(), 0);
    auto r = c.recv(got.v(), 0);
    c.group_end();
    s.wait();
    r.wait();
    CHECK(same_bits(to_host(ex, got.v()), x));
    c.barrier().wait();
  }
  // Work enqueued on stream() after an operation sees its result without a wait.
  auto d = to_device(ex, filled<T>({5}, T(3.0f)).v());
  (void)c.all_reduce(d.v(), comm::reduce_op::sum);
  CHECK(float(to_host(ex, d.v())(4)) == 3.0f);
  // Split: a world of one again; a negative color leaves the rank out.
  auto sub = c.split(5, 0);
  CHECK(sub.size() == 1);
  CHECK(sub.rank() == 0);
  CHECK(sub.stream() == c.stream());
  auto e = to_device(ex, filled<T>({3}, T(2.0f)).v());
  sub.all_reduce(e.v(), comm::reduce_op::sum).wait();
  CHECK(float(to_host(ex, e.v())(0)) == 2.0f);
  auto none = c.split(-1, 0);
  CHECK_FALSE(none.member());
  CHECK(none.size() == 0);
  CHECK_THROWS_AS(none.barrier(), invalid_argument);
  // Arguments a rank checks alone, and waiting inside the group.
  CHECK_THROWS_AS(c.send(e.v(), 1), invalid_argument);
  CHECK_THROWS_AS(c.broadcast(e.v(), -1), invalid_argument);
  c.group_start();
  auto inside = c.barrier();
  CHECK_THROWS_AS(inside.wait(), invalid_argument);
  CHECK_FALSE(inside.test());
  c.group_end();
  inside.wait();
}

TEST_CASE("comm::nccl: bootstrap from a torchrun-style environment, NVLink multicast stays off") {
  const char* before = std::getenv("NCCL_NVLS_ENABLE");
  const std::string saved = before ? before : "";
  const int port = free_port();
  ::setenv("RANK", "0", 1);
  ::setenv("WORLD_SIZE", "1", 1);
  ::setenv("LOCAL_RANK", "0", 1);
  ::setenv("MASTER_ADDR", "127.0.0.1", 1);
  ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
  auto c = comm::nccl::from_env(with_timeout(60s));
  for (const char* v : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) ::unsetenv(v);
  CHECK(c.size() == 1);
  CHECK(c.device() == 0);
  const char* nvls = std::getenv("NCCL_NVLS_ENABLE");
  REQUIRE(nvls != nullptr);
  if (before == nullptr) CHECK(std::string(nvls) == "0");
  else CHECK(std::string(nvls) == saved);  // an explicit setting is left alone
  // throttled<nccl>: over one rank nothing crosses the network.
  comm::throttled<comm::nccl> t(c, comm::network{comm::links::mbit300});
  device_tensor<float> x({100});
  cuda_check(cudaMemsetAsync(x.data(), 0, x.bytes(), c.stream()));
  t.all_reduce(x.v(), comm::reduce_op::sum).wait();
  CHECK(t.metrics().bytes_sent() == 0);
  CHECK(t.metrics()[comm::op_kind::all_reduce].calls == 1);
}

TEST_CASE("comm::nccl: an operation that can never complete is aborted after the timeout, with a clear error") {
  // A recv from this very rank with no send: NCCL either refuses it or waits forever; either way the wait
  // must end within the timeout and leave the communicator aborted.
  auto c = comm::nccl::connect(alone(), with_timeout(2s));
  device_tensor<float> x({16});
  const auto t0 = std::chrono::steady_clock::now();
  std::string message;
  try {
    c.group_start();
    auto r = c.recv(x.v(), 0);
    c.group_end();
    r.wait();
  } catch (const error& e) {
    message = e.what();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  MESSAGE("lone recv: " << message << " after " << seconds << " s");
  CHECK_FALSE(message.empty());
  CHECK(seconds < 30.0);
  if (message.find("did not complete within") != std::string::npos) {
    CHECK(message.find("recv of 16 fp32 elements from rank 0 on rank 0 of nccl world") != std::string::npos);
    CHECK_THROWS_AS(c.barrier(), comm::aborted_error);
  }
  cuda_check(cudaDeviceSynchronize());
}

// --- several processes ------------------------------------------------------------------------------------------

namespace {

bool is_worker() { return std::getenv("SUBSPACE_NCCL_WORKER") != nullptr; }

/// Starts this executable once per rank with a torchrun-style environment, running only the worker test case;
/// returns each process's exit status (-1: killed after the deadline).
std::vector<int> spawn_world(int n, const std::string& mode, std::chrono::seconds deadline) {
  const int port = free_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < n; ++r) {
    std::vector<std::string> env;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string kv = *e;
      const std::string key = kv.substr(0, kv.find('='));
      if (key == "RANK" || key == "WORLD_SIZE" || key == "LOCAL_RANK" || key == "LOCAL_WORLD_SIZE" ||
          key == "MASTER_ADDR" || key == "MASTER_PORT" || key == "SUBSPACE_NCCL_WORKER")
        continue;
      env.push_back(kv);
    }
    env.push_back("RANK=" + std::to_string(r));
    env.push_back("WORLD_SIZE=" + std::to_string(n));
    env.push_back("LOCAL_RANK=" + std::to_string(r));
    env.push_back("LOCAL_WORLD_SIZE=" + std::to_string(n));
    env.push_back("MASTER_ADDR=127.0.0.1");
    env.push_back("MASTER_PORT=" + std::to_string(port));
    env.push_back("SUBSPACE_NCCL_WORKER=" + mode);
    if (std::getenv("NCCL_NVLS_ENABLE") == nullptr) env.push_back("NCCL_NVLS_ENABLE=0");
    std::vector<char*> envp;
    for (auto& s : env) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string exe = "/proc/self/exe", filter = "--test-case=comm::nccl worker*", quiet = "--no-intro=true";
    char* argv[] = {exe.data(), filter.data(), quiet.data(), nullptr};
    pid_t pid = 0;
    REQUIRE(::posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv, envp.data()) == 0);
    pids.push_back(pid);
  }
  std::vector<int> status(static_cast<std::size_t>(n), -2);
  const auto end = std::chrono::steady_clock::now() + deadline;
  int left = n;
  while (left > 0 && std::chrono::steady_clock::now() < end) {
    for (int r = 0; r < n; ++r) {
      if (status[std::size_t(r)] != -2) continue;
      int st = 0;
      if (::waitpid(pids[std::size_t(r)], &st, WNOHANG) == pids[std::size_t(r)]) {
        status[std::size_t(r)] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        --left;
      }
    }
    std::this_thread::sleep_for(50ms);
  }
  for (int r = 0; r < n; ++r)
    if (status[std::size_t(r)] == -2) {
      ::kill(pids[std::size_t(r)], SIGKILL);
      ::waitpid(pids[std::size_t(r)], nullptr, 0);
      status[std::size_t(r)] = -1;
    }
  return status;
}

int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

}  // namespace

TEST_CASE("comm::nccl: one process per GPU — every operation, split, and a missing rank (needs 2+ GPUs)") {
  if (is_worker()) return;  // the workers run only their own test case
  const int n = std::min(gpu_count(), 8);
  if (n < 2) {
    MESSAGE("skipped: " << n << " GPU(s); the multi-process test needs at least 2");
    return;
  }
  const auto ok = spawn_world(n, "all", 300s);
  for (int r = 0; r < n; ++r) {
    CAPTURE(r);
    CHECK(ok[std::size_t(r)] == 0);
  }
  const auto missing = spawn_world(n, "missing", 120s);
  for (int r = 0; r < n; ++r) {
    CAPTURE(r);
    CHECK(missing[std::size_t(r)] == 0);
  }
}

TEST_CASE("comm::nccl worker: one rank of the multi-process test (runs only when spawned)") {
  if (!is_worker()) return;
  const std::string mode = std::getenv("SUBSPACE_NCCL_WORKER");
  auto c = comm::nccl::from_env(with_timeout(mode == "missing" ? 10s : 120s));
  const int n = c.size(), r = c.rank();
  REQUIRE(n >= 2);
  const exec::cuda ex{c.stream()};
  if (mode == "missing") {
    // The last rank leaves; the others' all_reduce must fail within the timeout, naming the operation.
    c.barrier().wait();
    if (r == n - 1) return;
    auto x = to_device(ex, filled<float>({1000}, 1.0f).v());
    const auto t0 = std::chrono::steady_clock::now();
    std::string message;
    try {
      c.all_reduce(x.v(), comm::reduce_op::sum).wait();
    } catch (const error& e) {
      message = e.what();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    MESSAGE("rank " << r << ": " << message);
    CHECK(message.find("all_reduce(sum) of 1000 fp32 elements") != std::string::npos);
    CHECK(seconds < 60.0);
    return;
  }
  for (const std::int64_t m : {std::int64_t(1), std::int64_t(37), std::int64_t(100003)}) {
    CAPTURE(m);
    // rank q's element i is q + 1 + i mod 7: exact sums
    const auto val = [](int q, std::int64_t i) { return float(q + 1 + int(i % 7)); };
    host_tensor<float> mine({m}), big({std::int64_t(n) * m});
    for (std::int64_t i = 0; i < m; ++i) mine(i) = val(r, i);
    for (std::int64_t i = 0; i < n * m; ++i) big(i) = val(r, i);
    for (const auto op : {comm::reduce_op::sum, comm::reduce_op::avg, comm::reduce_op::max}) {
      auto d = to_device(ex, mine.v());
      c.all_reduce(d.v(), op).wait();
      const auto h = to_host(ex, d.v());
      for (std::int64_t i = 0; i < m; ++i) {
        float s = 0, mx = 0;
        for (int q = 0; q < n; ++q) {
          s += val(q, i);
          mx = std::max(mx, val(q, i));
        }
        const float want = op == comm::reduce_op::sum ? s : op == comm::reduce_op::avg ? s / float(n) : mx;
        REQUIRE(std::abs(h(i) - want) <= 1e-6f * std::abs(want));
      }
    }
    auto in = to_device(ex, mine.v());
    device_tensor<float> gathered({n, m}), scattered({m}), got({m});
    c.all_gather(in.v(), gathered.v()).wait();
    const auto g = to_host(ex, gathered.v());
    for (int q = 0; q < n; ++q)
      for (std::int64_t i = 0; i < m; ++i) REQUIRE(g(q, i) == val(q, i));
    auto bigd = to_device(ex, big.v());
    c.reduce_scatter(bigd.v(), scattered.v(), comm::reduce_op::sum).wait();
    const auto sc = to_host(ex, scattered.v());
    for (std::int64_t i = 0; i < m; ++i) {
      float s = 0;
      for (int q = 0; q < n; ++q) s += val(q, std::int64_t(r) * m + i);
      REQUIRE(sc(i) == s);
    }
    auto b = to_device(ex, mine.v());
    c.broadcast(b.v(), n - 1).wait();
    const auto bh = to_host(ex, b.v());
    for (std::int64_t i = 0; i < m; ++i) REQUIRE(bh(i) == val(n - 1, i));
    c.group_start();
    auto s = c.send(in.v(), (r + 1) % n);
    auto q = c.recv(got.v(), (r + n - 1) % n);
    c.group_end();
    s.wait();
    q.wait();
    const auto gh = to_host(ex, got.v());
    for (std::int64_t i = 0; i < m; ++i) REQUIRE(gh(i) == val((r + n - 1) % n, i));
  }
  // Host views (staged) and split into even and odd ranks, ranked by reversed keys.
  host_tensor<float> hx = filled<float>({3}, float(r));
  c.all_reduce(hx.v(), comm::reduce_op::max).wait();
  CHECK(hx(2) == float(n - 1));
  auto sub = c.split(r % 2, -r);
  int expected_size = 0, expected_rank = 0;
  for (int q = 0; q < n; ++q)
    if (q % 2 == r % 2) {
      ++expected_size;
      if (q > r) ++expected_rank;
    }
  CHECK(sub.size() == expected_size);
  CHECK(sub.rank() == expected_rank);
  auto one = to_device(ex, filled<float>({1}, 1.0f).v());
  sub.all_reduce(one.v(), comm::reduce_op::sum).wait();
  CHECK(to_host(ex, one.v())(0) == float(expected_size));
  // throttled<nccl> counts the ring's bytes on real NCCL.
  comm::throttled<comm::nccl> t(c, comm::network{comm::links::gbit100});
  auto tx = to_device(ex, filled<float>({std::int64_t(n) * 10}, 1.0f).v());
  t.all_reduce(tx.v(), comm::reduce_op::sum).wait();
  CHECK(t.metrics()[comm::op_kind::all_reduce].bytes_sent == std::uint64_t(2 * (n - 1) * 10 * 4));
  c.barrier().wait();
}

// Bootstrapping multi-process worlds: launch_info from torchrun-style, mpirun and empty environments (and the
// errors that name the variable at fault); the TCP rendezvous on the loopback interface with ranks as threads,
// its timeouts naming the missing ranks, and its refusals of mismatched worlds.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <map>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <subspace/comm/bootstrap.hpp>
#include <subspace/comm/detail/rendezvous.hpp>  // the rendezvous is comm::nccl's detail; tested here on the host
#include <subspace/core/parallel.hpp>

#include "support/numeric.hpp"

using namespace subspace;
using namespace std::chrono_literals;

namespace {

comm::env_lookup env_of(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const char* name) -> const char* {
    const auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
}

std::vector<std::byte> random_bytes(std::uint64_t seed, std::size_t n) {
  std::vector<std::byte> b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = std::byte((seed >> (8 * (i % 8))) ^ (i * 131));
  return b;
}

/// Runs f(rank) on a thread per rank (run_concurrently); returns the exception each rank threw (null: none).
template <class F>
std::vector<std::exception_ptr> on_threads(int n, F f) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  run_concurrently(n, [&](int r) {
    try {
      f(r);
    } catch (...) {
      errors[std::size_t(r)] = std::current_exception();
    }
  });
  return errors;
}

template <class E>
std::string message_of(const std::exception_ptr& e) {
  try {
    if (e) std::rethrow_exception(e);
  } catch (const std::exception& x) {
    if constexpr (std::is_same_v<E, std::exception>) {
      return x.what();
    } else {
      if (dynamic_cast<const E*>(&x) != nullptr) return x.what();
    }
    return std::string("unexpected exception: ") + x.what();
  }
  return "no exception";
}

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

TEST_CASE("comm::launch_from_env: torchrun-style, mpirun and no launcher") {
  SUBCASE("torchrun") {
    const auto li = comm::launch_from_env(env_of({{"RANK", "5"},
                                                  {"WORLD_SIZE", "8"},
                                                  {"LOCAL_RANK", "1"},
                                                  {"LOCAL_WORLD_SIZE", "4"},
                                                  {"MASTER_ADDR", "node0"},
                                                  {"MASTER_PORT", "29600"}}));
    CHECK(li.launcher == "torchrun");
    CHECK(li.rank == 5);
    CHECK(li.world_size == 8);
    CHECK(li.local_rank == 1);
    CHECK(li.local_world_size == 4);
    CHECK(li.master_addr == "node0");
    CHECK(li.master_port == 29600);
    CHECK(li.rendezvous_port == 29600);
  }
  SUBCASE("torchrun with its agent store on MASTER_PORT, and an explicit rendezvous port") {
    auto vars = std::map<std::string, std::string>{
        {"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}};
    auto li = comm::launch_from_env(env_of(vars));
    CHECK(li.master_addr == "127.0.0.1");  // one host: the default
    CHECK(li.master_port == 29500);
    CHECK(li.rendezvous_port == 29501);
    vars["SUBSPACE_RENDEZVOUS_PORT"] = "31000";
    li = comm::launch_from_env(env_of(vars));
    CHECK(li.rendezvous_port == 31000);
  }
  SUBCASE("mpirun") {
    const auto li = comm::launch_from_env(env_of({{"OMPI_COMM_WORLD_RANK", "3"},
                                                  {"OMPI_COMM_WORLD_SIZE", "4"},
                                                  {"OMPI_COMM_WORLD_LOCAL_RANK", "3"},
                                                  {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}}));
    CHECK(li.launcher == "mpirun");
    CHECK(li.rank == 3);
    CHECK(li.world_size == 4);
    CHECK(li.local_rank == 3);
    CHECK(li.master_addr == "127.0.0.1");
    CHECK(li.master_port == 29500);
  }
  SUBCASE("no launcher: one process") {
    const auto li = comm::launch_from_env(env_of({}));
    CHECK(li.launcher == "none");
    CHECK(li.rank == 0);
    CHECK(li.world_size == 1);
    CHECK(li.local_rank == 0);
  }
}

TEST_CASE("comm::launch_from_env: a missing, unreadable or out-of-range variable is named") {
  const auto fails = [](std::map<std::string, std::string> vars, const char* needle) {
    CAPTURE(needle);
    CHECK_THROWS_WITH_AS(comm::launch_from_env(env_of(std::move(vars))), doctest::Contains(needle), invalid_argument);
  };
  fails({{"RANK", "1"}}, "WORLD_SIZE is not set");
  fails({{"RANK", "x"}, {"WORLD_SIZE", "2"}}, "RANK='x' is not an integer");
  fails({{"RANK", "2"}, {"WORLD_SIZE", "2"}}, "RANK=2 outside [0, WORLD_SIZE=2)");
  fails({{"RANK", "0"}, {"WORLD_SIZE", "0"}}, "WORLD_SIZE=0 is below 1");
  fails({{"RANK", "0"}, {"WORLD_SIZE", "8"}, {"LOCAL_WORLD_SIZE", "4"}}, "MASTER_ADDR is not set");
  fails({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}}, "MASTER_PORT=70000 outside [1, 65535]");
  fails({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "2"}}, "LOCAL_RANK=2 outside [0, 2)");
  fails({{"OMPI_COMM_WORLD_RANK", "0"}}, "OMPI_COMM_WORLD_SIZE is not");
  fails({{"OMPI_COMM_WORLD_RANK", "4"}, {"OMPI_COMM_WORLD_SIZE", "4"}}, "OMPI_COMM_WORLD_RANK=4 outside");
  fails({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"SUBSPACE_RENDEZVOUS_PORT", "0"}}, "SUBSPACE_RENDEZVOUS_PORT=0");
}

TEST_CASE("comm::rendezvous: every rank gets rank 0's bytes, on 1, 2, 4 and 8 ranks, whoever starts first") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const int n : {1, 2, 4, 8}) {
    CAPTURE(n);
    comm::detail::rendezvous_server server("127.0.0.1", 0);
    const int port = server.port();
    CHECK(port > 0);
    const auto payload = random_bytes(seed, 128);
    std::vector<std::vector<std::byte>> got(static_cast<std::size_t>(n));
    const auto errors = on_threads(n, [&](int r) {
      if (r == 0) {
        std::this_thread::sleep_for(20ms);  // the others connect before serve() starts
        server.serve(n, payload, 5s);
        got[0] = payload;
      } else {
        got[std::size_t(r)] = comm::detail::rendezvous_fetch("127.0.0.1", port, r, n, 5s);
      }
    });
    for (int r = 0; r < n; ++r) {
      CAPTURE(r);
      CHECK(message_of<std::exception>(errors[std::size_t(r)]) == "no exception");
      CHECK(got[std::size_t(r)] == payload);
    }
  }
}

TEST_CASE("comm::rendezvous: launch_info drives both sides, and clients retry until rank 0 listens") {
  int port = 0;
  {
    comm::detail::rendezvous_server probe("127.0.0.1", 0);  // a port that was free a moment ago
    port = probe.port();
  }
  const int n = 3;
  const auto payload = random_bytes(42, 16);
  std::vector<std::vector<std::byte>> got(n);
  const auto errors = on_threads(n, [&](int r) {
    comm::launch_info li;
    li.rank = r;
    li.world_size = n;
    li.local_rank = r;
    li.local_world_size = n;
    li.master_addr = "127.0.0.1";
    li.master_port = li.rendezvous_port = port;
    if (r == 0) std::this_thread::sleep_for(100ms);  // the clients are refused, and retry
    got[std::size_t(r)] = comm::detail::rendezvous(li, r == 0 ? payload : std::vector<std::byte>{}, 5s);
  });
  for (int r = 0; r < n; ++r) {
    CHECK(message_of<std::exception>(errors[std::size_t(r)]) == "no exception");
    CHECK(got[std::size_t(r)] == payload);
  }
  // A world of one needs no network: a port somebody else holds does not matter.
  comm::detail::rendezvous_server busy("127.0.0.1", 0);
  comm::launch_info alone;
  alone.master_port = alone.rendezvous_port = busy.port();
  CHECK(comm::detail::rendezvous(alone, payload, 100ms) == payload);
  CHECK(comm::detail::rendezvous_listen_address("127.0.0.1") == "127.0.0.1");
  CHECK(comm::detail::rendezvous_listen_address("localhost") == "localhost");
  CHECK(comm::detail::rendezvous_listen_address("node0") == "0.0.0.0");
  CHECK(comm::detail::rendezvous_listen_address("10.1.2.3") == "0.0.0.0");
}

TEST_CASE("comm::rendezvous: a missing rank times out on rank 0 and on the ranks that came, naming it") {
  comm::detail::rendezvous_server server("127.0.0.1", 0);
  const int port = server.port();
  const auto t0 = std::chrono::steady_clock::now();
  const auto errors = on_threads(2, [&](int r) {
    if (r == 0) server.serve(3, random_bytes(1, 8), 300ms);
    else (void)comm::detail::rendezvous_fetch("127.0.0.1", port, 1, 3, 5s);
  });
  CHECK(since(t0) < 3.0);
  const std::string root = message_of<comm::timeout_error>(errors[0]);
  CHECK(root.find("rank 0 waited 0.300 s at 127.0.0.1:" + std::to_string(port)) != std::string::npos);
  CHECK(root.find("rank(s) 2 never reported") != std::string::npos);
  CHECK(message_of<comm::timeout_error>(errors[1]) == root);  // rank 1 learns why
}

TEST_CASE("comm::rendezvous: nobody listening times out naming the address") {
  int port = 0;
  {
    comm::detail::rendezvous_server probe("127.0.0.1", 0);
    port = probe.port();
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::string m;
  try {
    (void)comm::detail::rendezvous_fetch("127.0.0.1", port, 2, 4, 200ms);
  } catch (const comm::timeout_error& e) {
    m = e.what();
  }
  CHECK(since(t0) < 2.0);
  CHECK(m.find("rank 2 of 4 could not reach rank 0 at 127.0.0.1:" + std::to_string(port) + " within 0.200 s") !=
        std::string::npos);
}

TEST_CASE("comm::rendezvous: another world size, a rank claimed twice, and strangers") {
  SUBCASE("world size") {
    comm::detail::rendezvous_server server("127.0.0.1", 0);
    const int port = server.port();
    const auto errors = on_threads(2, [&](int r) {
      if (r == 0) server.serve(2, random_bytes(1, 8), 5s);
      else (void)comm::detail::rendezvous_fetch("127.0.0.1", port, 1, 3, 5s);
    });
    const std::string m = message_of<comm::mismatch_error>(errors[0]);
    CHECK(m.find("rank 1 was launched with a world of 3 ranks, but rank 0 with 2") != std::string::npos);
    CHECK(message_of<comm::mismatch_error>(errors[1]) == m);
  }
  SUBCASE("a rank claimed twice") {
    comm::detail::rendezvous_server server("127.0.0.1", 0);
    const int port = server.port();
    const auto errors = on_threads(3, [&](int r) {
      if (r == 0) server.serve(3, random_bytes(1, 8), 5s);
      else (void)comm::detail::rendezvous_fetch("127.0.0.1", port, 1, 3, 5s);
    });
    CHECK(message_of<comm::mismatch_error>(errors[0]).find("two processes claim rank 1") != std::string::npos);
  }
  SUBCASE("a connection that does not speak the protocol is ignored") {
    comm::detail::rendezvous_server server("127.0.0.1", 0);
    const int port = server.port();
    const auto payload = random_bytes(7, 32);
    std::vector<std::byte> got;
    const auto errors = on_threads(3, [&](int r) {
      if (r == 0) {
        server.serve(2, payload, 5s);
      } else if (r == 1) {
        std::this_thread::sleep_for(50ms);
        got = comm::detail::rendezvous_fetch("127.0.0.1", port, 1, 2, 5s);
      } else {
        const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_port = htons(std::uint16_t(port));
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
          const char junk[] = "GET / HTTP/1.0\r\n\r\n";
          (void)::send(fd, junk, sizeof junk, MSG_NOSIGNAL);
          std::this_thread::sleep_for(200ms);
        }
        ::close(fd);
      }
    });
    CHECK(message_of<std::exception>(errors[0]) == "no exception");
    CHECK(message_of<std::exception>(errors[1]) == "no exception");
    CHECK(got == payload);
  }
}

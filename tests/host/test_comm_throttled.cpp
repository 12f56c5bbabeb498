// comm::throttled<C>: the conformance suite over throttled<local> and throttled<self>; exact byte counts per peer
// and per kind for every operation against the formulas of comm/throttled.hpp, computed here; modelled times on
// uniform and uneven links; groups; split keeping the network's ranks; enforce mode delaying completion.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/comm/self.hpp>
#include <subspace/comm/throttled.hpp>

#include "conformance.hpp"

using namespace subspace;
using namespace std::chrono_literals;
using comm::op_kind;
using testing::conformance::filled;

namespace {

using tlocal = comm::throttled<comm::local>;
static_assert(Communicator<tlocal>);
static_assert(Communicator<comm::throttled<comm::self>>);

std::vector<tlocal> throttled_world(int n, const comm::network& net, std::chrono::milliseconds timeout = 20s) {
  comm::local_options o;
  o.timeout = timeout;
  auto ranks = comm::local::world(n, o);
  std::vector<tlocal> out;
  for (auto& r : ranks) out.emplace_back(std::move(r), net);
  return out;
}

struct throttled_local_fixture {
  using communicator = tlocal;
  static std::vector<int> world_sizes() { return {1, 2, 3, 4, 8}; }
  static std::vector<tlocal> make(int n) { return throttled_world(n, comm::network{comm::links::mbit300}); }
};

struct throttled_self_fixture {
  using communicator = comm::throttled<comm::self>;
  static std::vector<int> world_sizes() { return {1}; }
  static std::vector<communicator> make(int) {
    std::vector<communicator> v;
    v.emplace_back(comm::self{}, comm::network{});
    return v;
  }
};

/// Relative closeness for modelled seconds (the model sums the same terms in another order).
bool close(double a, double b) { return std::abs(a - b) <= 1e-12 * std::max(1.0, std::abs(b)); }

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace

TYPE_TO_STRING(throttled_local_fixture);
TYPE_TO_STRING(throttled_self_fixture);
TEST_CASE_TEMPLATE_APPLY(communicator_conformance, std::tuple<throttled_local_fixture, throttled_self_fixture>);

TEST_CASE("comm::link: presets and parsing") {
  CHECK(comm::links::mbit80.bits_per_second == 80e6);
  CHECK(comm::links::mbit300.bits_per_second == 300e6);
  CHECK(comm::links::gbit1.bits_per_second == 1e9);
  CHECK(comm::links::gbit25.bits_per_second == 25e9);
  CHECK(comm::links::gbit100.bits_per_second == 100e9);
  // One vocabulary: the presets parse by the names of their constants.
  for (const auto& p : comm::links::presets) CHECK(comm::link::parse(p.name) == p.value);
  CHECK(comm::link::parse("mbit300") == comm::links::mbit300);
  CHECK(comm::link::parse("gbit1") == comm::links::gbit1);
  CHECK(comm::links::preset_names() == "mbit80, mbit300, gbit1, gbit25, gbit100");
  const auto same = [](comm::link x, comm::link y) {
    return close(x.bits_per_second, y.bits_per_second) && close(x.latency_seconds, y.latency_seconds);
  };
  CHECK(same(comm::link::parse("2.5gbit@50us"), comm::link{2.5e9, 50e-6}));
  CHECK(same(comm::link::parse("10mbit@0.1s"), comm::link{10e6, 0.1}));
  CHECK(same(comm::link::parse("512kbit@3ms"), comm::link{512e3, 3e-3}));
  // A number is exactly that link: latency 0 unless given (the preset gbit1 has 100 us).
  CHECK(comm::link::parse("1gbit") == comm::link{1e9, 0.0});
  CHECK_THROWS_WITH_AS(comm::link::parse("fast"),
                       doctest::Contains("cannot read 'fast' (expected mbit80, mbit300, gbit1, gbit25, gbit100 or"),
                       invalid_argument);
  CHECK_THROWS_AS(comm::link::parse("10mbps"), invalid_argument);
  CHECK_THROWS_AS(comm::link::parse("0gbit"), invalid_argument);
  CHECK_THROWS_AS(comm::link::parse("1gbit@5min"), invalid_argument);
  // 1 MB at 80 Mbit/s: 0.1 s plus the latency.
  CHECK(close(comm::links::mbit80.seconds(1'000'000), 0.1 + 20e-3));
}

TEST_CASE("comm::throttled: exact bytes per peer and per kind, and modelled time, for every operation") {
  const comm::link L{1e9, 1e-4};
  const double a = L.latency_seconds, b = L.bits_per_second;
  for (const int n : {1, 2, 3, 4, 5, 8}) {
    for (const std::int64_t m : {std::int64_t(1), std::int64_t(7), std::int64_t(37), std::int64_t(1001)}) {
      CAPTURE(n);
      CAPTURE(m);
      comm::network net{L};
      net.broadcast_chunk_bytes = 64;  // several chunks for the larger sizes
      auto comms = throttled_world(n, net);
      const int root = n / 2;
      std::vector<comm::traffic> t(static_cast<std::size_t>(n));
      comm::local::run_ranks(comms, [&](tlocal& c) {
        const int r = c.rank();
        host_tensor<float> x = filled<float>({m}, 1.0f), g = filled<float>({n, m}, 0.0f);
        host_tensor<float> big = filled<float>({n * m}, 1.0f);
        host_tensor<double> d = filled<double>({m}, 1.0);
        c.all_reduce(x.v(), comm::reduce_op::sum).wait();
        c.all_gather(x.v(), g.v()).wait();
        c.reduce_scatter(big.v(), x.v(), comm::reduce_op::avg).wait();
        c.broadcast(d.v(), root).wait();
        c.barrier().wait();
        const int next = (r + 1) % n, prev = (r + n - 1) % n;
        host_tensor<float> y({m});
        host_tensor<double> e({m});
        c.group_start();
        auto s = c.send(x.v(), next);
        auto s2 = c.send(d.v(), next);  // another element size: its own time
        auto q = c.recv(y.v(), prev);
        auto q2 = c.recv(e.v(), prev);
        c.group_end();
        s.wait();
        q.wait();
        s2.wait();
        q2.wait();
        t[std::size_t(r)] = c.metrics();
      });
      const std::uint64_t s4 = 4, s8 = 8;
      const auto chunk = [&](int k) { return std::uint64_t(m / n + (k < m % n ? 1 : 0)); };
      double clock = 0;
      for (int r = 0; r < n; ++r) {
        CAPTURE(r);
        const comm::traffic& tr = t[std::size_t(r)];
        const int next = (r + 1) % n, prev = (r + n - 1) % n;
        // all_reduce: s (2m - c_{r+1} - c_{r+2}) to the next rank, what the previous rank sends from it
        const auto& ar = tr[op_kind::all_reduce];
        const std::uint64_t ar_sent =
            n == 1 ? 0 : s4 * (2 * std::uint64_t(m) - chunk((r + 1) % n) - chunk((r + 2) % n));
        const std::uint64_t ar_recv = n == 1 ? 0 : s4 * (2 * std::uint64_t(m) - chunk(r) - chunk((r + 1) % n));
        CHECK(ar.calls == 1);
        CHECK(ar.bytes_sent == ar_sent);
        CHECK(ar.bytes_received == ar_recv);
        CHECK(ar.messages_sent == std::uint64_t(2 * (n - 1)));
        const double ar_t = 2.0 * (n - 1) * (a + 8.0 * double(s4 * std::uint64_t(ceil_div(m, n))) / b);
        CHECK(close(ar.seconds, ar_t));
        if (m % n == 0) CHECK(double(ar.bytes_sent) == 2.0 * (n - 1) / n * double(s4 * std::uint64_t(m)));
        // all_gather and reduce_scatter: (n - 1) blocks of m elements each way
        for (const op_kind k : {op_kind::all_gather, op_kind::reduce_scatter}) {
          CAPTURE(comm::to_string(k));
          CHECK(tr[k].bytes_sent == std::uint64_t(n - 1) * std::uint64_t(m) * s4);
          CHECK(tr[k].bytes_received == std::uint64_t(n - 1) * std::uint64_t(m) * s4);
          CHECK(close(tr[k].seconds, (n - 1) * (a + 8.0 * double(std::uint64_t(m) * s4) / b)));
        }
        // broadcast: a chain from the root, in chunks of 64 bytes
        const std::uint64_t B = std::uint64_t(m) * s8, C = 64, k = std::max<std::uint64_t>(1, (B + C - 1) / C);
        const int pos = (r - root + n) % n;
        const auto& bc = tr[op_kind::broadcast];
        CHECK(bc.bytes_sent == (n > 1 && pos + 1 < n ? B : 0));
        CHECK(bc.bytes_received == (n > 1 && pos > 0 ? B : 0));
        CHECK(bc.messages_sent == (n > 1 && pos + 1 < n ? k : 0));
        const double bc_t =
            n == 1 ? 0.0 : double(k) * a + 8.0 * double(B) / b + (n - 2) * (a + 8.0 * double(std::min(B, C)) / b);
        CHECK(close(bc.seconds, bc_t));
        // barrier: ceil(log2 n) empty messages
        const auto& br = tr[op_kind::barrier];
        const int rounds = n == 1 ? 0 : int(std::ceil(std::log2(double(n))));
        CHECK(br.bytes_sent == 0);
        CHECK(br.messages_sent == std::uint64_t(rounds));
        CHECK(close(br.seconds, rounds * a));
        // the grouped ring exchange: two messages each way, concurrent
        const double t4 = L.seconds(std::uint64_t(m) * s4), t8 = L.seconds(std::uint64_t(m) * s8);
        if (n > 1) {
          CHECK(tr[op_kind::send].bytes_sent == std::uint64_t(m) * (s4 + s8));
          CHECK(tr[op_kind::recv].bytes_received == std::uint64_t(m) * (s8 + s4));
          CHECK(close(tr[op_kind::send].seconds, t4 + t8));
          // per peer: everything to next and from prev (n = 2: the same peer)
          std::uint64_t to_next = ar_sent + tr[op_kind::all_gather].bytes_sent +
                                  tr[op_kind::reduce_scatter].bytes_sent + bc.bytes_sent + std::uint64_t(m) * (s4 + s8);
          std::uint64_t from_prev = ar_recv + tr[op_kind::all_gather].bytes_received +
                                    tr[op_kind::reduce_scatter].bytes_received + bc.bytes_received +
                                    std::uint64_t(m) * (s4 + s8);
          std::uint64_t peer_sent = 0, peer_recv = 0;
          for (const auto& [p, c] : tr.by_peer) {
            peer_sent += c.bytes_sent;
            peer_recv += c.bytes_received;
          }
          CHECK(tr.by_peer.at(next).bytes_sent == to_next);
          CHECK(tr.by_peer.at(prev).bytes_received == from_prev);
          CHECK(peer_sent == tr.bytes_sent());
          CHECK(peer_recv == tr.bytes_received());
        } else {
          CHECK(tr.bytes_sent() == 0);
          CHECK(tr.by_peer.empty());
        }
        const double group = n > 1 ? std::max(t4, t8) : 0.0;
        const double total =
            ar_t + tr[op_kind::all_gather].seconds + tr[op_kind::reduce_scatter].seconds + bc_t + rounds * a + group;
        CHECK(close(tr.seconds, total));
        if (r == 0) clock = tr.seconds;
        CHECK(close(tr.seconds, clock));  // every rank models the same time
      }
    }
  }
}

TEST_CASE("comm::throttled: uneven links — the slowest message sets each step, a slow hop paces the broadcast") {
  const comm::link fast{1e9, 1e-5}, slow{1e6, 2e-3};
  SUBCASE("ring all_reduce: link 0 -> 1 carries a chunk in every step") {
    comm::network net{fast};
    net.set(0, 1, slow);
    auto comms = throttled_world(3, net);
    std::vector<double> seconds(3);
    comm::local::run_ranks(comms, [&](tlocal& c) {
      const int r = c.rank();
      host_tensor<float> x = filled<float>({6}, 1.0f);
      c.all_reduce(x.v(), comm::reduce_op::sum).wait();
      seconds[std::size_t(r)] = c.metrics().seconds;
    });
    for (double s : seconds) CHECK(close(s, 4 * slow.seconds(8)));
  }
  SUBCASE("pipelined broadcast: two hops, three chunks") {
    for (const bool slow_first : {true, false}) {
      CAPTURE(slow_first);
      comm::network net{fast};
      net.broadcast_chunk_bytes = 1000;
      if (slow_first) net.set(0, 1, slow);
      else net.set(1, 2, slow);
      auto comms = throttled_world(3, net);
      std::vector<double> seconds(3);
      comm::local::run_ranks(comms, [&](tlocal& c) {
        const int r = c.rank();
        host_tensor<std::uint8_t> x({3000});
        c.broadcast(x.v(), 0).wait();
        seconds[std::size_t(r)] = c.metrics().seconds;
      });
      const double ts = slow.seconds(1000), tf = fast.seconds(1000);
      // A two-machine flow shop with three identical jobs: 3 t1 + t2 when hop 1 is slower, else t1 + 3 t2.
      const double expected = slow_first ? 3 * ts + tf : tf + 3 * ts;
      for (double s : seconds) CHECK(close(s, expected));
    }
  }
}

TEST_CASE("comm::throttled: split keeps naming links and peers by the ranks of the first world") {
  comm::network net{comm::links::gbit25};
  net.set_both(1, 3, comm::links::mbit80);
  auto comms = throttled_world(4, net);
  std::vector<comm::traffic> t(4);
  std::vector<int> network_rank(4);
  comm::local::run_ranks(comms, [&](tlocal& c) {
    const int r = c.rank();
    tlocal sub = c.split(r % 2, -r);  // {2, 0} and {3, 1}
    network_rank[std::size_t(r)] = sub.network_rank();
    host_tensor<float> x = filled<float>({1000}, 1.0f);
    sub.all_reduce(x.v(), comm::reduce_op::sum).wait();
    CHECK(x(0) == 2.0f);
    t[std::size_t(r)] = c.metrics();  // shared with the split
  });
  for (int r = 0; r < 4; ++r) CHECK(network_rank[std::size_t(r)] == r);
  // two ranks, 1000 floats: 2 steps of 500 floats each way
  CHECK(close(t[1].seconds, 2 * comm::links::mbit80.seconds(2000)));
  CHECK(close(t[0].seconds, 2 * comm::links::gbit25.seconds(2000)));
  CHECK(t[1].by_peer.at(3).bytes_sent == 4000);
  CHECK(t[0].by_peer.at(2).bytes_received == 4000);
  CHECK(t[0].by_peer.count(1) == 0);
  CHECK(t[1][op_kind::all_reduce].calls == 1);
}

TEST_CASE("comm::throttled: account mode never sleeps; in enforce mode back-to-back messages overlap their latency") {
  const comm::link l{8e6, 0.2};  // 10 kB: 0.01 s on the wire, 0.2 s in flight
  const double t = l.seconds(10'000), wire = t - l.latency_seconds;
  for (const auto mode : {comm::throttle_mode::account, comm::throttle_mode::enforce}) {
    CAPTURE(int(mode));
    auto comms = throttled_world(2, comm::network{l, mode});
    std::vector<double> first(2), second(2), clock(2);
    bool early_test = true;
    const auto t0 = std::chrono::steady_clock::now();  // one origin for both ranks: before either can send
    comm::local::run_ranks(comms, [&](tlocal& c) {
      const int r = c.rank();
      host_tensor<std::uint8_t> a({10'000}), b({10'000});
      const auto since = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
      auto q1 = r == 0 ? c.send(a.v(), 1) : c.recv(a.v(), 0);
      auto q2 = r == 0 ? c.send(b.v(), 1) : c.recv(b.v(), 0);
      if (r == 1 && mode == comm::throttle_mode::enforce) {
        std::this_thread::sleep_for(5ms);
        early_test = q1.test();  // the data is there, the modelled message is still in flight
      }
      q1.wait();
      first[std::size_t(r)] = since();
      q2.wait();
      second[std::size_t(r)] = since();
      clock[std::size_t(r)] = c.metrics().seconds;
    });
    for (int r = 0; r < 2; ++r) {
      CAPTURE(r);
      CHECK(close(clock[std::size_t(r)], 2 * t));  // the clock sums the operations' times in both modes
      if (mode == comm::throttle_mode::account) CHECK(second[std::size_t(r)] < t);  // nothing slept
    }
    if (mode == comm::throttle_mode::enforce) {
      // The sender is done once its bytes are on the wire, one message after the other.
      CHECK(first[0] >= wire - 1e-3);
      CHECK(second[0] >= 2 * wire - 1e-3);
      CHECK(second[0] < t);
      // The receiver gets the first at t and the second one wire time later, not a latency later.
      CHECK(first[1] >= t - 1e-3);
      CHECK(second[1] >= t + wire - 1e-3);
      CHECK(second[1] < 2 * t - 0.1);
      CHECK_FALSE(early_test);
    }
  }
}

TEST_CASE("comm::throttled: in enforce mode a message arrives a link's time after it is sent, however late received") {
  using clock = std::chrono::steady_clock;
  const comm::link l{8e6, 0.2};  // 1 kB: 0.201 s (the late receive has t / 2 of slack on a loaded machine)
  const double t = l.seconds(1000);
  const auto seconds = [](clock::duration d) { return std::chrono::duration<double>(d).count(); };
  // Over a world of two, and over the pairs {0, 1} and {2, 3} split from a world of four: the members of a split
  // agree on its id, so its messages are timed from their sends too.
  for (const bool split : {false, true}) {
    CAPTURE(split);
    const int n = split ? 4 : 2;
    auto comms = throttled_world(n, comm::network{l, comm::throttle_mode::enforce});
    // Per receiving world rank: when the late receive was posted and completed, when the early message was sent and
    // received.
    std::vector<clock::time_point> late_posted(n), late_done(n), early_sent(n), early_done(n);
    comm::local::run_ranks(comms, [&](tlocal& world) {
      const int me = world.rank();
      std::optional<tlocal> pair;
      if (split) pair.emplace(world.split(me / 2, me));
      tlocal& c = split ? *pair : world;
      const int partner = me + (c.rank() == 0 ? 1 : -1);
      host_tensor<std::uint8_t> x({1000});
      // The late receive: posted three link times after its message left.
      if (c.rank() == 0) {
        c.send(x.v(), 1).wait();
      } else {
        std::this_thread::sleep_for(std::chrono::duration<double>(3 * t));
        late_posted[std::size_t(me)] = clock::now();
        c.recv(x.v(), 0).wait();
        late_done[std::size_t(me)] = clock::now();
      }
      c.barrier().wait();
      // The early receive: posted before its message is sent.
      if (c.rank() == 0) {
        std::this_thread::sleep_for(std::chrono::duration<double>(2 * t));
        early_sent[std::size_t(partner)] = clock::now();
        c.send(x.v(), 1).wait();
      } else {
        c.recv(x.v(), 0).wait();
        early_done[std::size_t(me)] = clock::now();
      }
    });
    for (int q = 1; q < n; q += 2) {
      const auto i = std::size_t(q);
      CAPTURE(q);
      CHECK(seconds(late_done[i] - late_posted[i]) < t / 2);      // it arrived long ago
      CHECK(seconds(early_done[i] - early_sent[i]) >= t - 1e-3);  // not when the data is there: a link time later
    }
  }
}

TEST_CASE("comm::throttled: a group's operations overlap in the clock, metrics reset and print") {
  const comm::link l{1e9, 1e-3};
  auto comms = throttled_world(2, comm::network{l});
  std::vector<double> grouped(2), serial(2);
  std::string summary;
  comm::local::run_ranks(comms, [&](tlocal& c) {
    const int r = c.rank();
    host_tensor<float> x = filled<float>({100}, 1.0f), y = filled<float>({100}, 0.0f);
    const int other = 1 - r;
    c.group_start();
    auto s = c.send(x.v(), other);
    auto q = c.recv(y.v(), other);
    c.group_end();
    s.wait();
    q.wait();
    grouped[std::size_t(r)] = c.metrics().seconds;
    c.reset_metrics();
    if (r == 0) {
      c.send(x.v(), 1).wait();
      c.recv(y.v(), 1).wait();
    } else {
      c.recv(y.v(), 0).wait();
      c.send(x.v(), 0).wait();
    }
    serial[std::size_t(r)] = c.metrics().seconds;
    if (r == 0) summary = c.metrics().summary();
    CHECK_THROWS_AS(c.group_end(), invalid_argument);
  });
  for (int r = 0; r < 2; ++r) {
    CHECK(close(grouped[std::size_t(r)], l.seconds(400)));
    CHECK(close(serial[std::size_t(r)], 2 * l.seconds(400)));
  }
  CHECK(summary.find("send: 1 calls, 400 B sent") != std::string::npos);
  CHECK(summary.find("recv: 1 calls, 0 B sent, 400 B received") != std::string::npos);
  CHECK(summary.find("modelled network time") != std::string::npos);
}

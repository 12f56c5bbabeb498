// comm::local on host memory: the Communicator conformance suite over 1, 2, 3, 4 and 8 ranks; every operation
// against values computed directly here (odd sizes, several element types, strided views); matching in any
// posting order; split groups; an operation in flight while its rank computes; and the error paths (timeouts,
// mismatched sizes, types, kinds and roots, abandoned operations, abort), each within the world's timeout; run_ranks
// (a rank that throws aborts the world).
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <subspace/comm/local.hpp>

#include "conformance.hpp"
#include "support/numeric.hpp"

using namespace subspace;
using namespace std::chrono_literals;
using testing::conformance::filled;

namespace {

comm::local_options with_timeout(std::chrono::milliseconds timeout) {
  comm::local_options o;
  o.timeout = timeout;
  return o;
}

std::vector<comm::local> make_world(int n, std::chrono::milliseconds timeout = 20s) {
  return comm::local::world(n, with_timeout(timeout));
}

struct local_fixture {
  using communicator = comm::local;
  static std::vector<int> world_sizes() { return {1, 2, 3, 4, 8}; }
  static std::vector<comm::local> make(int n) { return make_world(n); }
};

/// Small integers (exact in every element type tested, and in their sums over 8 ranks): rank r's element i.
int value(std::uint64_t seed, int r, std::int64_t i) {
  std::uint64_t x =
      seed ^ (0x9E3779B97F4A7C15ull * std::uint64_t(r + 1)) ^ (0xBF58476D1CE4E5B9ull * std::uint64_t(i + 7));
  x ^= x >> 31;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 29;
  return int(x % 17) - 8;  // in [-8, 8]
}

template <class T>
host_tensor<T> rank_values(std::uint64_t seed, int r, const shape& s) {
  host_tensor<T> t(s);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = T(float(value(seed, r, i)));
  return t;
}

template <class T>
double as_double(T x) {
  return double(float(x));
}
template <>
double as_double<double>(double x) {
  return x;
}
template <>
double as_double<std::int32_t>(std::int32_t x) {
  return double(x);
}

/// What rank r's element i must be after a reduction of the ranks' values, computed directly.
template <class T>
double reduced(std::uint64_t seed, int n, std::int64_t i, comm::reduce_op op) {
  if (op == comm::reduce_op::max) {
    int m = value(seed, 0, i);
    for (int r = 1; r < n; ++r) m = std::max(m, value(seed, r, i));
    return m;
  }
  int sum = 0;
  for (int r = 0; r < n; ++r) sum += value(seed, r, i);
  if (op == comm::reduce_op::sum) return sum;
  if constexpr (std::is_integral_v<T>) {
    return double(sum / n);
  } else if constexpr (std::is_same_v<T, double>) {
    return double(sum) / double(n);
  } else {
    return as_double(T(float(sum) / float(n)));  // float accumulation, one rounding into T
  }
}

template <class T>
bool all_equal(const host_tensor<T>& t, double x) {
  for (std::int64_t i = 0; i < t.numel(); ++i)
    if (as_double(t.data()[i]) != x) return false;
  return true;
}

}  // namespace

TYPE_TO_STRING(local_fixture);
TEST_CASE_TEMPLATE_APPLY(communicator_conformance, std::tuple<local_fixture>);

TEST_CASE_TEMPLATE("comm::local: every collective on 1, 2, 3, 4 and 8 ranks and odd sizes equals the direct values", T,
                   float, double, bf16, std::int32_t) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const int n : {1, 2, 3, 4, 8}) {
    for (const std::int64_t m : {std::int64_t(1), std::int64_t(7), std::int64_t(37), std::int64_t(1001)}) {
      CAPTURE(n);
      CAPTURE(m);
      auto comms = make_world(n);
      const auto nz = std::size_t(n);
      std::vector<host_tensor<T>> sum(nz), avg(nz), mx(nz), gathered(nz), scattered(nz), bcast(nz);
      std::vector<host_tensor<T>> ins(nz), big(nz);
      for (int r = 0; r < n; ++r) {
        const auto ru = std::size_t(r);
        sum[ru] = rank_values<T>(seed, r, {m});
        avg[ru] = rank_values<T>(seed, r, {m});
        mx[ru] = rank_values<T>(seed, r, {m});
        ins[ru] = rank_values<T>(seed, r, {m});
        gathered[ru] = host_tensor<T>({n, m});
        big[ru] = rank_values<T>(seed, r, {n * m});
        scattered[ru] = host_tensor<T>({m});
        bcast[ru] = rank_values<T>(seed + 1, r, {m});
      }
      const int root = (n - 1) / 2;
      comm::local::run_ranks(comms, [&](comm::local& c) {
        const int r = c.rank();
        const auto ru = std::size_t(r);
        // Everything issued first, then waited on in reverse: posting never blocks.
        std::vector<comm::local::request> reqs;
        reqs.push_back(c.all_reduce(sum[ru].v(), comm::reduce_op::sum));
        reqs.push_back(c.all_reduce(avg[ru].v(), comm::reduce_op::avg));
        reqs.push_back(c.all_reduce(mx[ru].v(), comm::reduce_op::max));
        reqs.push_back(c.all_gather(ins[ru].v(), gathered[ru].v()));
        reqs.push_back(c.reduce_scatter(big[ru].v(), scattered[ru].v(), comm::reduce_op::sum));
        reqs.push_back(c.broadcast(bcast[ru].v(), root));
        std::reverse(reqs.begin(), reqs.end());
        for (auto& q : reqs) q.wait();
      });
      for (int r = 0; r < n; ++r) {
        CAPTURE(r);
        const auto ru = std::size_t(r);
        for (std::int64_t i = 0; i < m; ++i) {
          REQUIRE(as_double(sum[ru](i)) == reduced<T>(seed, n, i, comm::reduce_op::sum));
          REQUIRE(as_double(avg[ru](i)) == reduced<T>(seed, n, i, comm::reduce_op::avg));
          REQUIRE(as_double(mx[ru](i)) == reduced<T>(seed, n, i, comm::reduce_op::max));
          REQUIRE(as_double(bcast[ru](i)) == double(value(seed + 1, root, i)));
          for (int q = 0; q < n; ++q) REQUIRE(as_double(gathered[ru](q, i)) == double(value(seed, q, i)));
          int s = 0;
          for (int q = 0; q < n; ++q) s += value(seed, q, std::int64_t(r) * m + i);
          REQUIRE(as_double(scattered[ru](i)) == double(s));
        }
      }
    }
  }
}

TEST_CASE("comm::local::run_ranks: n ranks of a new world on n threads, the first failure reaches the caller") {
  std::vector<float> sums(4, 0.0f);
  comm::local::run_ranks(4, [&](comm::local& c) {
    host_tensor<float> x = filled<float>({3}, float(c.rank() + 1));
    c.all_reduce(x.v(), comm::reduce_op::sum).wait();
    sums[std::size_t(c.rank())] = x(2);
  });
  for (const float s : sums) CHECK(s == 10.0f);

  // Rank 1 fails at once; its exception aborts the world, so the others' all_reduce fails at once (not after the
  // 20 s timeout) naming it, and rank 1's exception, the cause, reaches the caller once every rank has returned.
  std::atomic<int> returned{0};
  struct count_return {
    std::atomic<int>& n;
    ~count_return() { ++n; }
  };
  std::vector<std::string> peers(3);
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(comm::local::run_ranks(
                           3,
                           [&](comm::local& c) {
                             const count_return on_return{returned};
                             if (c.rank() == 1) throw invalid_argument("rank 1 gives up");
                             host_tensor<float> x = filled<float>({2}, 1.0f);
                             try {
                               c.all_reduce(x.v(), comm::reduce_op::sum).wait();
                             } catch (const comm::aborted_error& e) {
                               peers[std::size_t(c.rank())] = e.what();
                               throw;
                             }
                           },
                           with_timeout(20s)),
                       "rank 1 gives up", invalid_argument);
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(returned == 3);
  for (const int r : {0, 2}) {
    CAPTURE(peers[std::size_t(r)]);
    CHECK(peers[std::size_t(r)].find("rank " + std::to_string(r) + "'s all_reduce(sum) of 2 fp32 elements") !=
          std::string::npos);
    CHECK(peers[std::size_t(r)].find("cannot complete: rank 1 of world (3 ranks) aborted it: it threw \"rank 1 gives "
                                     "up\"") != std::string::npos);
  }
}

TEST_CASE("comm::local: strided views, in-place gathers and reshaped messages move the right elements") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const int n = 3;
  auto comms = make_world(n);
  std::vector<host_tensor<float>> mats, gathered, got;
  for (int r = 0; r < n; ++r) {
    mats.push_back(rank_values<float>(seed, r, {5, 7}));
    gathered.push_back(filled<float>({n, 5}, NAN));
    got.push_back(filled<float>({7 * 5}, NAN));
  }
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    const auto ru = std::size_t(r);
    auto t = mats[ru].v().transposed();  // [7, 5], strided
    c.all_reduce(t, comm::reduce_op::sum).wait();
    // In place: rank r's input is row r of its own output.
    auto out = gathered[ru].v();
    for (int j = 0; j < 5; ++j) out(r, j) = float(10 * r + j);
    c.all_gather(out[r], out).wait();
    // A strided send into a flat recv of the same count.
    const int next = (r + 1) % n, prev = (r + n - 1) % n;
    c.group_start();
    auto s = c.send(mats[ru].v().transposed(), next);
    auto q = c.recv(got[ru].v(), prev);
    c.group_end();
    s.wait();
    q.wait();
  });
  for (int r = 0; r < n; ++r) {
    const auto ru = std::size_t(r);
    for (int i = 0; i < 5; ++i)
      for (int j = 0; j < 7; ++j) {
        int s = 0;
        for (int q = 0; q < n; ++q) s += value(seed, q, i * 7 + j);
        REQUIRE(mats[ru](i, j) == float(s));
      }
    for (int q = 0; q < n; ++q)
      for (int j = 0; j < 5; ++j) REQUIRE(gathered[ru](q, j) == float(10 * q + j));
    // got = transpose of prev's (already reduced, identical on every rank) matrix, row-major
    for (int a = 0; a < 7; ++a)
      for (int b = 0; b < 5; ++b) REQUIRE(got[ru](a * 5 + b) == mats[ru](b, a));
  }
}

TEST_CASE("comm::local: every pair exchanges several messages, posted and waited in random orders") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const int n : {1, 2, 3, 4, 8}) {
    CAPTURE(n);
    auto comms = make_world(n);
    const int messages = 3;
    // msg(a, b, k): k-th message from a to b has 2k + 1 + a elements (odd sizes), values from (a, b, k).
    const auto len = [](int a, int k) { return std::int64_t(2 * k + 1 + a); };
    const auto val = [&](int a, int b, int k, std::int64_t i) { return float(value(seed, a * 64 + b * 8 + k, i)); };
    std::vector<std::vector<host_tensor<float>>> out(static_cast<std::size_t>(n)), in(static_cast<std::size_t>(n));
    comm::local::run_ranks(comms, [&](comm::local& c) {
      const int r = c.rank();
      std::mt19937 gen(unsigned(seed) + unsigned(r));
      auto& o = out[std::size_t(r)];
      auto& i_ = in[std::size_t(r)];
      struct item {
        bool is_send;
        int peer, k;
      };
      std::vector<item> items;
      for (int p = 0; p < n; ++p)
        for (int k = 0; k < messages; ++k) {
          items.push_back({true, p, k});
          items.push_back({false, p, k});
        }
      std::shuffle(items.begin(), items.end(), gen);
      // Keep the per-peer order of sends and of recvs (that is what matches), shuffle across peers and kinds.
      std::vector<std::vector<int>> next_k(2, std::vector<int>(std::size_t(n), 0));
      std::vector<comm::local::request> reqs;
      o.reserve(items.size());
      i_.reserve(items.size());
      for (const item& it : items) {
        const int k = next_k[it.is_send][std::size_t(it.peer)]++;
        if (it.is_send) {
          host_tensor<float> t({len(r, k)});
          for (std::int64_t e = 0; e < t.numel(); ++e) t(e) = val(r, it.peer, k, e);
          o.push_back(std::move(t));
          reqs.push_back(c.send(o.back().v(), it.peer));
        } else {
          i_.push_back(filled<float>({len(it.peer, k)}, NAN));
          reqs.push_back(c.recv(i_.back().v(), it.peer));
        }
      }
      std::shuffle(reqs.begin(), reqs.end(), gen);
      for (auto& q : reqs) q.wait();
    });
    // Recompute what each recv buffer must hold, in the same shuffled order.
    for (int r = 0; r < n; ++r) {
      std::mt19937 gen(unsigned(seed) + unsigned(r));
      struct item {
        bool is_send;
        int peer, k;
      };
      std::vector<item> items;
      for (int p = 0; p < n; ++p)
        for (int k = 0; k < messages; ++k) {
          items.push_back({true, p, k});
          items.push_back({false, p, k});
        }
      std::shuffle(items.begin(), items.end(), gen);
      std::vector<int> next_k(std::size_t(n), 0);
      std::size_t j = 0;
      for (const item& it : items) {
        if (it.is_send) continue;
        const int k = next_k[std::size_t(it.peer)]++;
        const auto& t = in[std::size_t(r)][j++];
        REQUIRE(t.numel() == len(it.peer, k));
        for (std::int64_t e = 0; e < t.numel(); ++e) REQUIRE(t(e) == val(it.peer, r, k, e));
      }
    }
  }
}

TEST_CASE("comm::local: split forms groups by color ordered by key, which work alone and beside the parent") {
  for (const int n : {1, 2, 3, 4, 8}) {
    CAPTURE(n);
    auto comms = make_world(n);
    const auto nz = static_cast<std::size_t>(n);
    std::vector<int> sub_rank(nz), sub_size(nz), pair_rank(nz);
    std::vector<std::vector<float>> members(static_cast<std::size_t>(n));
    std::vector<float> parent_sum(static_cast<std::size_t>(n)), left_out(static_cast<std::size_t>(n));
    comm::local::run_ranks(comms, [&](comm::local& c) {
      const int r = c.rank();
      const auto ru = std::size_t(r);
      comm::local sub = c.split(r % 3, -r);  // keys reversed
      sub_rank[ru] = sub.rank();
      sub_size[ru] = sub.size();
      CHECK(sub.name().find("split(color " + std::to_string(r % 3) + ")") != std::string::npos);
      // Sub-group and parent collectives interleave freely.
      host_tensor<float> mine = filled<float>({1}, float(r));
      host_tensor<float> all = filled<float>({sub.size()}, NAN);
      auto g = sub.all_gather(mine.v(), all.v());
      host_tensor<float> total = filled<float>({1}, float(r + 1));
      c.all_reduce(total.v(), comm::reduce_op::sum).wait();
      g.wait();
      members[ru].assign(all.data(), all.data() + all.numel());
      parent_sum[ru] = total(0);
      // A nested split of the sub-group into pairs, and a rank left out (negative color).
      comm::local pair = sub.split(sub.rank() / 2, sub.rank());
      pair_rank[ru] = pair.rank();
      comm::local none = c.split(r == 0 ? -1 : 0, r);
      left_out[ru] = none.member() ? float(none.size()) : -1.0f;
      if (none.member()) {
        host_tensor<float> one = filled<float>({1}, 1.0f);
        none.all_reduce(one.v(), comm::reduce_op::sum).wait();
        CHECK(one(0) == float(n - 1));
      } else {
        CHECK(none.size() == 0);
        host_tensor<float> x = filled<float>({1}, 0.0f);
        CHECK_THROWS_AS(none.all_reduce(x.v(), comm::reduce_op::sum), invalid_argument);
      }
    });
    for (int r = 0; r < n; ++r) {
      CAPTURE(r);
      const auto ru = std::size_t(r);
      std::vector<int> group;
      for (int q = n - 1; q >= 0; --q)
        if (q % 3 == r % 3) group.push_back(q);  // ordered by key -q
      const auto pos = int(std::find(group.begin(), group.end(), r) - group.begin());
      CHECK(sub_size[ru] == int(group.size()));
      CHECK(sub_rank[ru] == pos);
      REQUIRE(members[ru].size() == group.size());
      for (std::size_t k = 0; k < group.size(); ++k) CHECK(members[ru][k] == float(group[k]));
      CHECK(parent_sum[ru] == float(n * (n + 1) / 2));
      CHECK(pair_rank[ru] == pos % 2);
      CHECK(left_out[ru] == (r == 0 ? -1.0f : float(n - 1)));
    }
  }
}

TEST_CASE("comm::local: an operation stays in flight while its rank computes, and completes without wait()") {
  const int n = 4;
  auto comms = make_world(n);
  std::vector<host_tensor<float>> bufs;
  for (int r = 0; r < n; ++r) bufs.push_back(filled<float>({1000}, float(r + 1)));
  host_tensor<float> got = filled<float>({3}, NAN), payload = filled<float>({3}, 42.0f);
  std::atomic<bool> others_may_go{false};
  double compute = 0;
  long polls = 0;
  bool completed_before_peers = true, recv_done_early = true;
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    if (r == 0) {
      auto all = c.all_reduce(bufs[0].v(), comm::reduce_op::sum);
      auto msg = c.recv(got.v(), 3);
      completed_before_peers = all.test();  // nobody else has called it yet
      recv_done_early = msg.test();
      others_may_go = true;
      // Compute while the peers catch up: the request completes under us.
      while (!all.test()) {
        for (int i = 0; i < 1000; ++i) compute += std::sqrt(double(i));
        ++polls;
      }
      CHECK(msg.test());  // the peers sent before joining the all_reduce... or soon after
      msg.wait();
      all.wait();
      return;
    }
    while (!others_may_go) std::this_thread::yield();
    std::this_thread::sleep_for(20ms);
    if (r == 3) c.send(payload.v(), 0).wait();
    c.all_reduce(bufs[std::size_t(r)].v(), comm::reduce_op::sum).wait();
  });
  CHECK_FALSE(completed_before_peers);
  CHECK_FALSE(recv_done_early);
  CHECK(polls > 0);
  CHECK(compute > 0);
  for (int r = 0; r < n; ++r) CHECK(all_equal(bufs[std::size_t(r)], 10.0));
  CHECK(all_equal(got, 42.0));
}

// --- error paths -----------------------------------------------------------------------------------------------

namespace {

constexpr auto short_timeout = 150ms;

/// Runs f and returns the seconds it took.
template <class F>
double timed(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

TEST_CASE("comm::local: a recv with no send, or a send with no recv, times out naming the ranks and the operation") {
  auto comms = make_world(2, short_timeout);
  host_tensor<float> x = filled<float>({5}, 1.0f);
  std::string recv_message, send_message;
  double recv_seconds = 0;
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    if (r == 1) {
      auto q = c.recv(x.v(), 0);
      recv_seconds = timed([&] {
        try {
          q.wait();
        } catch (const comm::timeout_error& e) {
          recv_message = e.what();
        }
      });
      CHECK_THROWS_AS(q.wait(), comm::timeout_error);  // the failure stays
    } else {
      auto s = c.send(x.v(), 0);  // to itself, never received
      try {
        s.wait();
      } catch (const comm::timeout_error& e) {
        send_message = e.what();
      }
    }
  });
  CHECK(recv_seconds >= 0.14);
  CHECK(recv_seconds < 2.0);
  CHECK(recv_message.find("rank 1's recv #1 from rank 0 (5 fp32 elements)") != std::string::npos);
  CHECK(recv_message.find("rank 0 has issued 0 send(s) to rank 1") != std::string::npos);
  CHECK(recv_message.find("timed out after 0.150 s") != std::string::npos);
  CHECK(send_message.find("rank 0's send #1 to rank 0") != std::string::npos);
  CHECK(send_message.find("no matching recv") != std::string::npos);
}

TEST_CASE("comm::local: an abandoned operation fails its late partner instead of writing into a dead buffer") {
  auto comms = make_world(2, short_timeout);
  std::string late;
  std::atomic<bool> gave_up{false};
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    host_tensor<float> x = filled<float>({3}, float(r));
    if (r == 1) {
      CHECK_THROWS_AS(c.recv(x.v(), 0).wait(), comm::timeout_error);
      gave_up = true;
    } else {
      while (!gave_up) std::this_thread::yield();
      try {
        c.send(x.v(), 1).wait();
      } catch (const comm::aborted_error& e) {
        late = e.what();
      }
    }
  });
  CHECK(late.find("rank 0's send #1 to rank 1") != std::string::npos);
  CHECK(late.find("abandoned") != std::string::npos);
}

TEST_CASE(
    "comm::local: abort() fails every pending and later operation, in the world and in the worlds split from "
    "it, on every rank") {
  // 4 ranks, split into pairs {0, 1} and {2, 3}. Rank 3 aborts the world while rank 0 waits on a recv from rank 1,
  // rank 1 on an all_reduce of its pair, and rank 2 on a world all_reduce; every one fails at once (the timeout is
  // 20 s), and so does each operation posted after the abort. What completed before it stays complete.
  auto comms = make_world(4);
  std::vector<std::string> pending(4), later(4), sub_later(4);
  std::atomic<int> waiting{0};
  const auto start = std::chrono::steady_clock::now();
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    comm::local pair = c.split(r / 2, r);
    host_tensor<float> x = filled<float>({3}, float(r + 1));
    pair.all_reduce(x.v(), comm::reduce_op::sum).wait();  // completes before the abort
    CHECK(x(0) == (r < 2 ? 3.0f : 7.0f));
    comm::local::request q;
    if (r == 0) q = c.recv(x.v(), 1);
    if (r == 1) q = pair.all_reduce(x.v(), comm::reduce_op::sum);
    if (r == 2) q = c.all_reduce(x.v(), comm::reduce_op::sum);
    ++waiting;
    if (r == 3) {
      while (waiting < 4) std::this_thread::yield();
      c.abort("rank 3 saw a NaN");
      c.abort("a second reason");  // the first one stays
    } else {
      try {
        q.wait();
      } catch (const comm::aborted_error& e) {
        pending[std::size_t(r)] = e.what();
      }
    }
    try {
      c.barrier().wait();
    } catch (const comm::aborted_error& e) {
      later[std::size_t(r)] = e.what();
    }
    try {
      pair.send(x.v(), 1 - r % 2).wait();
    } catch (const comm::aborted_error& e) {
      sub_later[std::size_t(r)] = e.what();
    }
  });
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  const std::string why = "cannot complete: rank 3 of world (4 ranks) aborted it: rank 3 saw a NaN";
  CHECK(pending[0].find("rank 0's recv #1 from rank 1 (3 fp32 elements) in world (4 ranks) " + why) !=
        std::string::npos);
  CHECK(pending[1].find("rank 1's all_reduce(sum) of 3 fp32 elements (collective #2) in world/split(color 0) (2 "
                        "ranks) " +
                        why) != std::string::npos);
  CHECK(pending[2].find("rank 2's all_reduce(sum) of 3 fp32 elements (collective #2) in world (4 ranks) " + why) !=
        std::string::npos);
  for (int r = 0; r < 4; ++r) {
    CAPTURE(r);
    CHECK(later[std::size_t(r)].find("barrier") != std::string::npos);
    CHECK(later[std::size_t(r)].find(why) != std::string::npos);
    CHECK(sub_later[std::size_t(r)].find("send #1") != std::string::npos);
    CHECK(sub_later[std::size_t(r)].find(why) != std::string::npos);
  }
}

TEST_CASE("comm::local: aborting a split world leaves its parent and its sibling working") {
  auto comms = make_world(4);
  std::vector<float> sums(4, 0.0f);
  std::vector<std::string> failed(4);
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    comm::local pair = c.split(r / 2, r);
    host_tensor<float> x = filled<float>({2}, float(r + 1));
    if (r == 0) pair.abort();
    if (r < 2) {
      try {
        pair.all_reduce(x.v(), comm::reduce_op::sum).wait();
      } catch (const comm::aborted_error& e) {
        failed[std::size_t(r)] = e.what();
      }
    } else {
      pair.all_reduce(x.v(), comm::reduce_op::sum).wait();
    }
    c.all_reduce(x.v(), comm::reduce_op::sum).wait();
    sums[std::size_t(r)] = x(1);
  });
  CHECK(failed[0].find("rank 0 of world/split(color 0) (2 ranks) aborted it: abort() called") != std::string::npos);
  CHECK(failed[1].find("rank 0 of world/split(color 0) (2 ranks) aborted it") != std::string::npos);
  // Ranks 0 and 1 kept their own values (1, 2); ranks 2 and 3 hold their pair's sum (7 each): 1 + 2 + 7 + 7.
  for (const float s : sums) CHECK(s == 17.0f);
}

TEST_CASE("comm::local: mismatched point-to-point messages fail on both ranks with a size or type error") {
  auto comms = make_world(2, short_timeout);
  std::vector<std::string> messages(2), type_messages(2);
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    host_tensor<float> five = filled<float>({5}, 1.0f), four = filled<float>({4}, 0.0f);
    host_tensor<double> d = filled<double>({5}, 0.0);
    auto q = r == 0 ? c.send(five.v(), 1) : c.recv(four.v(), 0);
    try {
      q.wait();
    } catch (const comm::mismatch_error& e) {
      messages[std::size_t(r)] = e.what();
    }
    auto t = r == 0 ? c.send(five.v(), 1) : c.recv(d.v(), 0);
    try {
      t.wait();
    } catch (const comm::mismatch_error& e) {
      type_messages[std::size_t(r)] = e.what();
    }
  });
  for (const auto& m : messages) {
    CHECK(m.find("rank 0's send #1 to rank 1 (5 fp32 elements)") != std::string::npos);
    CHECK(m.find("rank 1's recv #1 from rank 0 (4 fp32 elements)") != std::string::npos);
    CHECK(m.find("element counts differ (5 vs 4)") != std::string::npos);
  }
  for (const auto& m : type_messages) CHECK(m.find("element types differ (fp32 vs fp64)") != std::string::npos);
}

TEST_CASE("comm::local: collectives that differ across ranks fail on every rank naming each rank's call") {
  const int n = 3;
  SUBCASE("element counts") {
    auto comms = make_world(n, short_timeout);
    std::vector<std::string> m(n);
    comm::local::run_ranks(comms, [&](comm::local& c) {
      const int r = c.rank();
      host_tensor<float> x = filled<float>({r == 2 ? 36 : 37}, 1.0f);
      try {
        c.all_reduce(x.v(), comm::reduce_op::sum).wait();
      } catch (const comm::mismatch_error& e) {
        m[std::size_t(r)] = e.what();
      }
    });
    for (const auto& s : m) {
      CHECK(s.find("collective #1 of world (3 ranks) does not match") != std::string::npos);
      CHECK(s.find("rank 1 called all_reduce(sum) of 37 fp32 elements") != std::string::npos);
      CHECK(s.find("rank 2 called all_reduce(sum) of 36 fp32 elements") != std::string::npos);
    }
  }
  SUBCASE("kinds, reductions and roots") {
    auto comms = make_world(n, short_timeout);
    std::vector<std::string> kind(n), rop(n), root(n);
    comm::local::run_ranks(comms, [&](comm::local& c) {
      const int r = c.rank();
      host_tensor<float> x = filled<float>({4}, 1.0f);
      try {
        if (r == 1) c.broadcast(x.v(), 0).wait();
        else c.all_reduce(x.v(), comm::reduce_op::sum).wait();
      } catch (const comm::mismatch_error& e) {
        kind[std::size_t(r)] = e.what();
      }
      try {
        c.all_reduce(x.v(), r == 0 ? comm::reduce_op::max : comm::reduce_op::sum).wait();
      } catch (const comm::mismatch_error& e) {
        rop[std::size_t(r)] = e.what();
      }
      try {
        c.broadcast(x.v(), r).wait();
      } catch (const comm::mismatch_error& e) {
        root[std::size_t(r)] = e.what();
      }
      c.barrier().wait();  // the world still works afterwards
    });
    for (int r = 0; r < n; ++r) {
      CHECK(kind[std::size_t(r)].find("rank 1 called broadcast from root 0 of 4 fp32 elements") != std::string::npos);
      CHECK(rop[std::size_t(r)].find("rank 0 called all_reduce(max)") != std::string::npos);
      CHECK(root[std::size_t(r)].find("rank 2 called broadcast from root 2") != std::string::npos);
    }
  }
}

TEST_CASE("comm::local: a rank missing from a collective or a split makes the others time out, naming it") {
  const int n = 3;
  auto comms = make_world(n, short_timeout);
  std::vector<std::string> m(n), s(n);
  std::vector<double> seconds(n, 0);
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    if (r == 2) return;  // never calls anything
    host_tensor<float> x = filled<float>({4}, 1.0f);
    seconds[std::size_t(r)] = timed([&] {
      try {
        c.all_reduce(x.v(), comm::reduce_op::sum).wait();
      } catch (const comm::timeout_error& e) {
        m[std::size_t(r)] = e.what();
      }
    });
    try {
      (void)c.split(0, r);
    } catch (const comm::timeout_error& e) {
      s[std::size_t(r)] = e.what();
    }
  });
  for (int r = 0; r < 2; ++r) {
    CAPTURE(r);
    CHECK(seconds[std::size_t(r)] < 2.0);
    CHECK(m[std::size_t(r)].find("all_reduce(sum) of 4 fp32 elements (collective #1)") != std::string::npos);
    CHECK(m[std::size_t(r)].find("rank(s) 0, 1 called it; rank(s) 2 did not (rank 2 has issued 0 collective(s))") !=
          std::string::npos);
    CHECK(s[std::size_t(r)].find("split (collective #2)") != std::string::npos);
  }
}

TEST_CASE("comm::local: waiting inside the group that issued an operation, or bad arguments, are errors") {
  auto comms = make_world(2, short_timeout);
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    host_tensor<float> x = filled<float>({2}, 1.0f), y = filled<float>({2}, 0.0f);
    const int other = 1 - r;
    c.group_start();
    auto s = c.send(x.v(), other);
    auto q = c.recv(y.v(), other);
    CHECK_THROWS_WITH_AS(q.wait(), doctest::Contains("inside the group_start()/group_end() that issued it"),
                         invalid_argument);
    c.group_end();
    s.wait();
    q.wait();
    CHECK(y(0) == 1.0f);
    CHECK_THROWS_AS(c.group_end(), invalid_argument);
    CHECK_THROWS_WITH_AS(c.send(x.v(), 2), doctest::Contains("peer 2 outside [0, 2)"), invalid_argument);
    CHECK_THROWS_WITH_AS(c.broadcast(x.v(), -1), doctest::Contains("root -1 outside [0, 2)"), invalid_argument);
  });
  CHECK_THROWS_AS(comm::local::world(0), invalid_argument);
  CHECK_THROWS_AS(comm::local::world(2, with_timeout(0ms)), invalid_argument);
  auto one_stream = with_timeout(1s);
  one_stream.streams = {nullptr};
  CHECK_THROWS_AS(comm::local::world(2, one_stream), invalid_argument);
}

// decent topologies (include/decent/topology.hpp): the Scheduler conformance suite; every topology's groups
// against the table of docs/decent.md ("Topologies"), written out here; W(t) symmetric and doubly stochastic;
// exact averaging over one period (product of the W's == J/n in double); mean preservation; the errors for invalid
// sizes; bytes per step against the formula and against comm::throttled's own count of a mixing round done as the
// plans say.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <decent/plan.hpp>
#include <decent/topology.hpp>
#include <subspace/comm/local.hpp>
#include <subspace/comm/throttled.hpp>

#include "conformance.hpp"
#include "support/numeric.hpp"

using namespace subspace;
using decent::group_schedule;
using groups_t = group_schedule::partition;

namespace {

struct complete_fixture {
  using scheduler = decent::complete;
  static std::vector<scheduler> make() { return {scheduler(1), scheduler(2), scheduler(5), scheduler(8)}; }
};
struct ring_fixture {
  using scheduler = decent::ring;
  static std::vector<scheduler> make() { return {scheduler(2), scheduler(6), scheduler(8)}; }
};
struct one_peer_exp_fixture {
  using scheduler = decent::one_peer_exp;
  static std::vector<scheduler> make() { return {scheduler(1), scheduler(2), scheduler(8)}; }
};
struct alternating_exp_ring_fixture {
  using scheduler = decent::alternating_exp_ring;
  static std::vector<scheduler> make() { return {scheduler(4, 4), scheduler(8, 2), scheduler(12, 3)}; }
};

/// Every topology the tests below sweep over, as group_schedule values.
std::vector<group_schedule> all_topologies() {
  std::vector<group_schedule> out;
  for (int n : {1, 2, 3, 5, 8}) out.push_back(decent::complete(n));
  for (int n : {2, 4, 6, 8, 10}) out.push_back(decent::ring(n));
  for (int n : {1, 2, 4, 8, 16}) out.push_back(decent::one_peer_exp(n));
  for (int nodes : {1, 2, 4, 8})
    for (int local : {1, 2, 3, 4}) out.push_back(decent::alternating_exp_ring(nodes * local, local));
  return out;
}

/// C = A B for n x n matrices, in double.
host_tensor<double> matmul(const host_tensor<double>& a, const host_tensor<double>& b) {
  const std::int64_t n = a.dim(0);
  host_tensor<double> c({n, n});
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (std::int64_t k = 0; k < n; ++k) s += a(i, k) * b(k, j);
      c(i, j) = s;
    }
  return c;
}

/// W^{period-1} ... W^1 W^0: the map from x^0 to x^period.
host_tensor<double> period_product(const group_schedule& s) {
  host_tensor<double> p = decent::mixing_matrix(s, 0);
  for (int t = 1; t < s.period(); ++t) p = matmul(decent::mixing_matrix(s, t), p);
  return p;
}

/// One mixing round done as the plans say: rank r's new vector is the weighted sum over its group.
std::vector<std::vector<double>> mix(const group_schedule& s, std::int64_t t,
                                     const std::vector<std::vector<double>>& x) {
  std::vector<std::vector<double>> out(x.size(), std::vector<double>(x[0].size(), 0.0));
  for (int r = 0; r < s.world_size(); ++r)
    for (const decent::mix_weight& e : s.plan(t, r).group)
      for (std::size_t i = 0; i < x[0].size(); ++i) out[std::size_t(r)][i] += e.weight * x[std::size_t(e.rank)][i];
  return out;
}

/// Random replicas, one per rank (N(1, 1) draws: a mean well away from zero).
std::vector<std::vector<double>> random_replicas(int n, std::int64_t dim, std::uint64_t seed) {
  std::vector<std::vector<double>> x;
  for (int r = 0; r < n; ++r) {
    const auto t = testing::random_tensor<float>({dim}, seed + std::uint64_t(r), 1.0f, 1.0f);
    x.emplace_back(t.data(), t.data() + dim);
  }
  return x;
}

host_tensor<double> mean_of(const std::vector<std::vector<double>>& x) {
  host_tensor<double> m({std::int64_t(x[0].size())});
  for (std::size_t i = 0; i < x[0].size(); ++i) {
    double s = 0;
    for (const auto& xr : x) s += xr[i];
    m.data()[i] = s / double(x.size());
  }
  return m;
}

host_tensor<double> as_tensor(const std::vector<double>& v) {
  host_tensor<double> t({std::int64_t(v.size())});
  std::copy(v.begin(), v.end(), t.data());
  return t;
}

void check_groups(const group_schedule& s, std::int64_t t, const groups_t& expected) {
  CAPTURE(s.name());
  CAPTURE(t);
  CHECK(s.groups_at(t) == expected);
}

}  // namespace

TYPE_TO_STRING(complete_fixture);
TYPE_TO_STRING(ring_fixture);
TYPE_TO_STRING(one_peer_exp_fixture);
TYPE_TO_STRING(alternating_exp_ring_fixture);
TEST_CASE_TEMPLATE_APPLY(
    scheduler_conformance,
    std::tuple<complete_fixture, ring_fixture, one_peer_exp_fixture, alternating_exp_ring_fixture>);

TEST_CASE("decent::complete: one group of all ranks, weight 1/n, period 1") {
  for (int n : {1, 2, 3, 8}) {
    CAPTURE(n);
    const decent::complete s(n);
    CHECK(s.period() == 1);
    CHECK(s.name() == "complete");
    for (std::int64_t t : {0, 1, 7})
      for (int r = 0; r < n; ++r) {
        const auto p = s.plan(t, r);
        CHECK(p.phase == 0);
        CHECK(p.size() == n);
        CHECK(p.group_rank == r);
        CHECK(p.weight() == 1.0 / n);
        CHECK(p.op == (n == 1 ? decent::mix_op::none : n == 2 ? decent::mix_op::exchange : decent::mix_op::all_reduce));
        for (int j = 0; j < n; ++j) CHECK(p.group[std::size_t(j)] == decent::mix_weight{j, 1.0 / n});
      }
  }
}

TEST_CASE("decent::ring: pairs (2i, 2i+1) in even rounds, (2i+1, 2i+2 mod n) in odd rounds") {
  check_groups(decent::ring(6), 0, {{0, 1}, {2, 3}, {4, 5}});
  check_groups(decent::ring(6), 1, {{0, 5}, {1, 2}, {3, 4}});
  check_groups(decent::ring(6), 4, {{0, 1}, {2, 3}, {4, 5}});
  check_groups(decent::ring(2), 1, {{0, 1}});
  for (int n : {2, 4, 8, 10}) {
    CAPTURE(n);
    const decent::ring s(n);
    CHECK(s.period() == 2);
    for (std::int64_t t = 0; t < 6; ++t)
      for (int r = 0; r < n; ++r) {
        CAPTURE(t);
        CAPTURE(r);
        const auto p = s.plan(t, r);
        CHECK(p.op == decent::mix_op::exchange);
        CHECK(p.weight() == 0.5);
        // Even rounds: the partner differs in the lowest bit; odd rounds: the neighbour across the odd edge.
        const int expected = t % 2 == 0 ? (r ^ 1) : (r % 2 == 1 ? (r + 1) % n : (r + n - 1) % n);
        CHECK(p.peer() == expected);
      }
  }
}

TEST_CASE("decent::one_peer_exp: rank j pairs with j XOR 2^(t mod Q), period Q = log2 n") {
  check_groups(decent::one_peer_exp(8), 2, {{0, 4}, {1, 5}, {2, 6}, {3, 7}});
  for (int q = 0; q <= 4; ++q) {
    const int n = 1 << q;
    CAPTURE(n);
    const decent::one_peer_exp s(n);
    CHECK(s.period() == (n == 1 ? 1 : q));
    for (std::int64_t t = 0; t < 3 * s.period(); ++t)
      for (int r = 0; r < n; ++r) {
        const auto p = s.plan(t, r);
        if (n == 1) {
          CHECK(p.op == decent::mix_op::none);
          CHECK(p.group == std::vector<decent::mix_weight>{{0, 1.0}});
          continue;
        }
        CHECK(p.op == decent::mix_op::exchange);
        CHECK(p.peer() == (r ^ (1 << (t % q))));
        CHECK(p.phase == t % q);
      }
  }
}

TEST_CASE("decent::alternating_exp_ring: the 4-node schedule with 2 ranks per node, written out") {
  const decent::alternating_exp_ring s(8, 2);
  CHECK(s.nodes() == 4);
  CHECK(s.local_world_size() == 2);
  CHECK(s.period() == 4);
  // Round 0 pairs nodes (0,1) [π 0] and (2,3) [π 1]; round 1 pairs (0,2) [π 0] and (1,3) [π 1]. Pair π crosses
  // in phase 2q + π mod 2 and stays inside its nodes in the round's other phase.
  check_groups(s, 0, {{0, 1, 2, 3}, {4, 5}, {6, 7}});
  check_groups(s, 1, {{0, 1}, {2, 3}, {4, 5, 6, 7}});
  check_groups(s, 2, {{0, 1, 4, 5}, {2, 3}, {6, 7}});
  check_groups(s, 3, {{0, 1}, {2, 3, 6, 7}, {4, 5}});
  check_groups(s, 5, {{0, 1}, {2, 3}, {4, 5, 6, 7}});
  const auto p = s.plan(2, 4);
  CHECK(p.ranks() == std::vector<int>{0, 1, 4, 5});
  CHECK(p.group_rank == 2);
  CHECK(p.weight() == 0.25);
  CHECK(p.op == decent::mix_op::all_reduce);
  CHECK(s.plan(0, 4).weight() == 0.5);
  // Two nodes of one rank: the cross phase is a pair, the inside phase leaves each rank alone.
  check_groups(decent::alternating_exp_ring(2, 1), 0, {{0, 1}});
  check_groups(decent::alternating_exp_ring(2, 1), 1, {{0}, {1}});
  CHECK(decent::alternating_exp_ring(2, 1).plan(1, 0).op == decent::mix_op::none);
}

TEST_CASE("decent::alternating_exp_ring: hypercube node pairs, each crossing once per round, half of them per phase") {
  for (int nodes : {2, 4, 8, 16})
    for (int local : {1, 2, 3}) {
      CAPTURE(nodes);
      CAPTURE(local);
      const decent::alternating_exp_ring s(nodes * local, local);
      int rounds = 0;  // Q = log2(nodes)
      while ((1 << rounds) < nodes) ++rounds;
      REQUIRE(s.period() == 2 * rounds);
      const auto node_of = [&](int rank) { return rank / local; };
      for (int q = 0; q < rounds; ++q) {
        std::vector<int> crossings(std::size_t(nodes), 0);  // per lower node of a pair
        for (int phase : {2 * q, 2 * q + 1}) {
          CAPTURE(phase);
          int crossing_pairs = 0;
          for (const auto& g : s.groups_at(phase)) {
            const int a = node_of(g.front()), b = node_of(g.back());
            if (a == b) {
              CHECK(int(g.size()) == local);  // one whole node
              CHECK(g.front() == a * local);
            } else {
              CHECK(int(g.size()) == 2 * local);  // two whole nodes, partners in round q
              CHECK(b == (a ^ (1 << q)));
              ++crossings[std::size_t(a)];
              ++crossing_pairs;
            }
          }
          CHECK(crossing_pairs == (nodes == 2 ? 1 - phase % 2 : nodes / 4));
        }
        for (int a = 0; a < nodes; ++a)
          if ((a & (1 << q)) == 0) CHECK(crossings[std::size_t(a)] == 1);
      }
    }
}

TEST_CASE("decent::alternating_exp_ring with a single node is complete over the node's ranks") {
  for (int local : {1, 3, 4}) {
    const decent::alternating_exp_ring aer(local, local);
    const decent::complete all(local);
    CHECK(aer.period() == 1);
    for (std::int64_t t = 0; t < 3; ++t)
      for (int r = 0; r < local; ++r) CHECK(aer.plan(t, r) == all.plan(t, r));
  }
}

TEST_CASE("decent topologies: plans agree across the ranks of a group, and group ids name rank sets") {
  for (const group_schedule& s : all_topologies()) {
    CAPTURE(s.name());
    CAPTURE(s.world_size());
    for (std::int64_t t = 0; t < 2 * s.period() + 1; ++t) {
      CAPTURE(t);
      std::vector<int> seen(std::size_t(s.world_size()), 0);
      for (const auto& g : s.groups_at(t))
        for (int r : g) ++seen[std::size_t(r)];
      for (int count : seen) CHECK(count == 1);  // each rank in exactly one group
      for (int r = 0; r < s.world_size(); ++r) {
        const auto p = s.plan(t, r);
        CHECK(p.phase == t % s.period());
        CHECK(p.group[std::size_t(p.group_rank)].rank == r);
        CHECK(s.groups()[std::size_t(p.group_id)] == p.ranks());
        for (const auto& e : p.group) {
          const auto other = s.plan(t, e.rank);
          CHECK(other.group == p.group);
          CHECK(other.group_id == p.group_id);
          CHECK(e.weight == 1.0 / double(p.size()));
        }
      }
    }
  }
}

TEST_CASE("decent topologies: W(t) is symmetric and doubly stochastic with non-negative entries") {
  for (const group_schedule& s : all_topologies()) {
    CAPTURE(s.name());
    const int n = s.world_size();
    CAPTURE(n);
    for (std::int64_t t = 0; t < s.period(); ++t) {
      CAPTURE(t);
      const auto w = decent::mixing_matrix(s, t);
      bool symmetric = true, non_negative = true;
      for (int i = 0; i < n; ++i) {
        double row = 0, col = 0;
        for (int j = 0; j < n; ++j) {
          symmetric = symmetric && w(i, j) == w(j, i);
          non_negative = non_negative && w(i, j) >= 0.0;
          row += w(i, j);
          col += w(j, i);
        }
        CHECK(std::abs(row - 1.0) <= 1e-15);
        CHECK(std::abs(col - 1.0) <= 1e-15);
      }
      CHECK(symmetric);
      CHECK(non_negative);
    }
  }
}

TEST_CASE("decent::one_peer_exp: one full period on 8 ranks is the exact average") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (int n : {2, 4, 8}) {
    CAPTURE(n);
    const decent::one_peer_exp s(n);
    const auto p = period_product(s);
    bool exact = true;
    for (std::int64_t i = 0; i < p.numel(); ++i) exact = exact && p.data()[i] == 1.0 / n;
    CHECK(exact);  // == J/n in double, not just close

    // Distinct random replicas all reach their initial mean after one period.
    auto x = random_replicas(n, 33, seed);
    const auto mean = mean_of(x);
    for (int t = 0; t < s.period(); ++t) x = mix(s, t, x);
    for (int r = 0; r < n; ++r) CHECK(testing::rel_error(as_tensor(x[std::size_t(r)]), mean) <= 1e-15);
  }
}

TEST_CASE("decent::alternating_exp_ring: one full period is the exact average (2, 4, 8 nodes of 1, 2, 4 ranks)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (int nodes : {2, 4, 8})
    for (int local : {1, 2, 4}) {
      CAPTURE(nodes);
      CAPTURE(local);
      const int n = nodes * local;
      const decent::alternating_exp_ring s(n, local);
      const auto p = period_product(s);
      bool exact = true;
      for (std::int64_t i = 0; i < p.numel(); ++i) exact = exact && p.data()[i] == 1.0 / n;
      CHECK(exact);
      auto x = random_replicas(n, 33, seed);
      const auto mean = mean_of(x);
      for (int t = 0; t < s.period(); ++t) x = mix(s, t, x);
      for (int r = 0; r < n; ++r) CHECK(testing::rel_error(as_tensor(x[std::size_t(r)]), mean) <= 1e-15);
    }
}

TEST_CASE("decent topologies: every mixing round keeps the mean over ranks") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const group_schedule& s : all_topologies()) {
    CAPTURE(s.name());
    CAPTURE(s.world_size());
    auto x = random_replicas(s.world_size(), 17, seed);
    for (std::int64_t t = 0; t < s.period() + 1; ++t) {
      CAPTURE(t);
      const auto before = mean_of(x);
      x = mix(s, t, x);
      CHECK(testing::rel_error(mean_of(x), before) <= 1e-15);  // a few roundings of the weighted sums
    }
  }
}

TEST_CASE("decent topologies: invalid world sizes are refused at construction, naming topology, value and rule") {
  const auto fails = [](auto make, std::vector<std::string> texts) {
    for (const auto& text : texts) {
      CAPTURE(text);
      CHECK_THROWS_WITH_AS(make(), doctest::Contains(text.c_str()), invalid_argument);
    }
  };
  fails([] { return decent::ring(5); }, {"decent::ring", "must be even", "got world_size = 5"});
  fails([] { return decent::ring(0); }, {"decent::ring", "got world_size = 0"});
  fails([] { return decent::one_peer_exp(6); }, {"decent::one_peer_exp", "power of two", "got world_size = 6"});
  fails([] { return decent::one_peer_exp(0); }, {"decent::one_peer_exp", "got world_size = 0"});
  fails([] { return decent::alternating_exp_ring(12, 4); },
        {"decent::alternating_exp_ring", "node count", "power of two",
         "got 3 nodes (world_size = 12, local_world_size = 4)"});
  fails([] { return decent::alternating_exp_ring(10, 4); },
        {"decent::alternating_exp_ring", "whole number of nodes", "world_size = 10, local_world_size = 4"});
  fails([] { return decent::alternating_exp_ring(8, 0); }, {"local_world_size (ranks per node) must be >= 1, got 0"});
  fails([] { return decent::complete(0); }, {"decent::complete", "got 0"});
  // A hand-written cycle must partition the ranks in every phase.
  fails([] { return group_schedule("mine", 3, {{{0, 1}, {1, 2}}}); }, {"decent::mine", "rank 1 in more than one"});
  fails([] { return group_schedule("mine", 3, {{{0, 1}}}); }, {"phase 0 leaves rank 2 out"});
  fails([] { return group_schedule("mine", 2, {{{0, 2}}}); }, {"names rank 2 outside [0, 2)"});
  fails([] { return group_schedule("mine", 2, {}); }, {"at least one phase"});
  CHECK_THROWS_WITH_AS((void)decent::complete(3).plan(0, 0).peer(), doctest::Contains("only a pair"), invalid_argument);
  // The factory passes the node layout to AER only.
  CHECK(decent::make_topology<decent::alternating_exp_ring>(8, 4).nodes() == 2);
  CHECK(decent::make_topology<decent::ring>(8, 4).world_size() == 8);
  CHECK_THROWS_AS(decent::make_topology<decent::alternating_exp_ring>(24, 8), invalid_argument);
}

TEST_CASE("decent::gossip_plan::bytes_sent: pairs send the bucket, groups of g the ring all-reduce's 2(g-1)/g") {
  const std::uint64_t B = 4 * 1000;  // 1000 fp32 parameters
  CHECK(decent::ring(8).plan(3, 5).bytes_sent(B) == B);
  CHECK(decent::one_peer_exp(8).plan(1, 2).bytes_sent(B) == B);
  CHECK(decent::complete(1).plan(0, 0).bytes_sent(B) == 0);
  for (int r = 0; r < 4; ++r) CHECK(decent::complete(4).plan(0, r).bytes_sent(B) == 2 * 3 * B / 4);
  // AER with 2 ranks per node: 2L = 4 ranks across nodes, L = 2 inside, alone with L = 1.
  const decent::alternating_exp_ring aer(8, 2);
  CHECK(aer.plan(0, 0).bytes_sent(B) == 2 * 3 * B / 4);
  CHECK(aer.plan(0, 4).bytes_sent(B) == B);
  CHECK(decent::alternating_exp_ring(4, 1).plan(1, 0).bytes_sent(B) == 0);
  // 10 elements over 3 ranks: chunks 4, 3, 3; group rank k sends 2m - c_{k+1} - c_{k+2} elements.
  const decent::complete three(3);
  CHECK(three.plan(0, 0).bytes_sent(40) == 4 * (20 - 3 - 3));
  CHECK(three.plan(0, 1).bytes_sent(40) == 4 * (20 - 3 - 4));
  CHECK(three.plan(0, 2).bytes_sent(40) == 4 * (20 - 4 - 3));
  CHECK(three.plan(0, 0).bytes_sent(20, 2) == 2 * (20 - 3 - 3));  // bf16 payload
  CHECK_THROWS_WITH_AS((void)three.plan(0, 0).bytes_sent(42), doctest::Contains("whole elements of 4 bytes"),
                       invalid_argument);
}

TEST_CASE("decent topologies: a mixing round done as the plan says gives W(t) x and the bytes comm::throttled counts") {
  using tlocal = comm::throttled<comm::local>;
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t m = 1001;  // not a multiple of any group size above 1: uneven all-reduce chunks
  std::vector<group_schedule> cases{decent::complete(6),
                                    decent::ring(8),
                                    decent::one_peer_exp(8),
                                    decent::alternating_exp_ring(8, 2),
                                    decent::alternating_exp_ring(12, 3),
                                    decent::alternating_exp_ring(4, 1)};
  for (const group_schedule& s : cases) {
    CAPTURE(s.name());
    const int n = s.world_size();
    CAPTURE(n);
    std::vector<tlocal> comms;
    for (auto& c : comm::local::world(n)) comms.emplace_back(std::move(c), comm::network{comm::links::gbit25});
    for (std::int64_t t = 0; t < s.period(); ++t) {
      CAPTURE(t);
      std::vector<host_tensor<float>> x;
      for (int r = 0; r < n; ++r)
        x.push_back(testing::random_tensor<float>({m}, seed + 1000 * std::uint64_t(t) + std::uint64_t(r)));
      const auto w = decent::mixing_matrix(s, t);
      std::vector<host_tensor<double>> expected;
      for (int i = 0; i < n; ++i) {
        host_tensor<double> e({m});
        for (std::int64_t k = 0; k < m; ++k) {
          double sum = 0;
          for (int j = 0; j < n; ++j) sum += w(i, j) * double(x[std::size_t(j)].data()[k]);
          e.data()[k] = sum;
        }
        expected.push_back(std::move(e));
      }
      std::vector<std::uint64_t> sent(static_cast<std::size_t>(n), 0);
      comm::local::run_ranks(comms, [&](tlocal& c) {
        const int r = c.rank();
        const decent::gossip_plan p = s.plan(t, r);
        host_tensor<float>& xr = x[std::size_t(r)];
        const std::uint64_t before = c.metrics().bytes_sent();
        // Every rank joins the split (a collective); the pair path below uses the world communicator instead.
        tlocal group = c.split(p.group_id, r);
        host_tensor<float> buf({m});
        for (std::int64_t k = 0; k < m; ++k) buf.data()[k] = float(p.weight()) * xr.data()[k];
        if (p.op == decent::mix_op::exchange) {
          host_tensor<float> theirs({m});
          c.group_start();
          auto sreq = c.send(view<const float, host_space>(buf.v()), p.peer());
          auto rreq = c.recv(theirs.v(), p.peer());
          c.group_end();
          sreq.wait();
          rreq.wait();
          for (std::int64_t k = 0; k < m; ++k) xr.data()[k] = buf.data()[k] + theirs.data()[k];
        } else if (p.op == decent::mix_op::all_reduce) {
          CHECK(group.rank() == p.group_rank);
          group.all_reduce(buf.v(), comm::reduce_op::sum).wait();
          copy(exec::host{}, view<const float, host_space>(buf.v()), xr.v());
        }
        sent[std::size_t(r)] = c.metrics().bytes_sent() - before;
      });
      for (int r = 0; r < n; ++r) {
        CAPTURE(r);
        CHECK(sent[std::size_t(r)] == s.plan(t, r).bytes_sent(std::uint64_t(4 * m)));
        CHECK(testing::rel_error(x[std::size_t(r)], expected[std::size_t(r)]) <= 1e-6);
      }
    }
  }
}

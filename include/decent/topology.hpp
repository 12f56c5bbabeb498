#pragma once
// The gossip topologies of Decent-DP (docs/decent.md, "Topologies") as Scheduler policies. Each is a
// group_schedule (plan.hpp): a fixed cycle of partitions of the ranks, uniform weights inside each group.
//
//   topology                          constraint                period  groups in phase q               weight
//   complete(n)                       n >= 1                    1       all n ranks                     1/n
//   ring(n)                           n even                    2       q = 0: (2i, 2i+1)               1/2
//                                                                       q = 1: (2i+1, (2i+2) mod n)
//   one_peer_exp(n)                   n = 2^Q                   Q       (j, j XOR 2^q)                  1/2
//   alternating_exp_ring(n, L)        N = n / L nodes = 2^Q     2Q      a node pair (2L ranks) or one   1/(2L),
//                                                                       node (L ranks), see below       1/L
//
// alternating_exp_ring (AER): a node is L consecutive ranks (L = local_world_size, the ranks of one machine).
// Round q = 0 .. Q-1 pairs node a with node a XOR 2^q; the pairs of a round are numbered π = 0, 1, ... by their
// lower node id. Pair π mixes across its two nodes (one group of 2L ranks) in phase 2q + (π mod 2) and inside
// each of its nodes (two groups of L ranks) in the round's other phase. So in every phase about half of the
// node pairs use the inter-node links while the rest stay on intra-node links. With one node (N = 1) AER is
// `complete` over the node's ranks (the library's choice).
//
// one_peer_exp with n = 1 is the rank alone (period 1), the library's choice: the period Q = 0 that n = 2^Q gives
// has no phase to play.
//
// Over one period both one_peer_exp and AER multiply to the exact average (1/n) 1 1^T: a hypercube all-reduce.
// Invalid sizes raise subspace::invalid_argument at construction, naming the topology, the value and what it
// expects. make_topology<T>(world_size, local_world_size) builds any of them from the launch layout.

#include <string>
#include <type_traits>
#include <vector>

#include <subspace/core/error.hpp>
#include <subspace/schedule/concepts.hpp>

#include "plan.hpp"

namespace decent {

namespace detail {

inline bool is_power_of_two(int n) { return n >= 1 && (n & (n - 1)) == 0; }

/// Q with 2^Q == n, for a power of two n.
inline int log2_exact(int n) {
  int q = 0;
  while ((1 << q) < n) ++q;
  return q;
}

/// The ranks [first, first + count), as one group.
inline std::vector<int> consecutive(int first, int count) {
  std::vector<int> g;
  for (int r = first; r < first + count; ++r) g.push_back(r);
  return g;
}

inline std::vector<group_schedule::partition> complete_phases(int n) { return {{consecutive(0, n)}}; }

inline std::vector<group_schedule::partition> ring_phases(int n) {
  group_schedule::partition even, odd;
  for (int i = 0; i < n / 2; ++i) {
    even.push_back({2 * i, 2 * i + 1});
    odd.push_back({2 * i + 1, (2 * i + 2) % n});
  }
  return {even, odd};
}

inline std::vector<group_schedule::partition> one_peer_exp_phases(int n) {
  if (n == 1) return {{{0}}};
  std::vector<group_schedule::partition> phases;
  for (int bit = 1; bit < n; bit <<= 1) {
    group_schedule::partition p;
    for (int j = 0; j < n; ++j)
      if ((j & bit) == 0) p.push_back({j, j ^ bit});
    phases.push_back(p);
  }
  return phases;
}

inline std::vector<group_schedule::partition> alternating_exp_ring_phases(int nodes, int local) {
  if (nodes == 1) return complete_phases(local);
  std::vector<group_schedule::partition> phases(std::size_t(2 * log2_exact(nodes)));
  int q = 0;
  for (int bit = 1; bit < nodes; bit <<= 1, ++q) {
    int pair = 0;  // π: the pairs of round q, by their lower node id
    for (int a = 0; a < nodes; ++a) {
      if ((a & bit) != 0) continue;
      const int b = a ^ bit;
      const int cross = 2 * q + pair % 2;
      const int inside = 2 * q + 1 - pair % 2;
      std::vector<int> both = consecutive(a * local, local);
      const std::vector<int> node_b = consecutive(b * local, local);
      both.insert(both.end(), node_b.begin(), node_b.end());
      phases[std::size_t(cross)].push_back(both);
      phases[std::size_t(inside)].push_back(consecutive(a * local, local));
      phases[std::size_t(inside)].push_back(node_b);
      ++pair;
    }
  }
  return phases;
}

}  // namespace detail

/// Every rank averages with every other rank each round: W = (1/n) 1 1^T, period 1.
class complete : public group_schedule {
 public:
  explicit complete(int world_size) : group_schedule("complete", world_size, phases(world_size)) {}

 private:
  static std::vector<partition> phases(int n) {
    subspace::require(n >= 1, [&] { return "decent::complete: world_size must be >= 1, got " + std::to_string(n); });
    return detail::complete_phases(n);
  }
};

/// Pairs on a ring of an even number of ranks, alternating between the (2i, 2i+1) and the (2i+1, 2i+2 mod n)
/// pairings; period 2.
class ring : public group_schedule {
 public:
  explicit ring(int world_size) : group_schedule("ring", world_size, phases(world_size)) {}

 private:
  static std::vector<partition> phases(int n) {
    subspace::require(n >= 2 && n % 2 == 0, [&] {
      return "decent::ring: world_size must be even (>= 2): every rank needs a partner in both pairings "
             "(2i, 2i+1) and (2i+1, 2i+2 mod n); got world_size = " +
             std::to_string(n);
    });
    return detail::ring_phases(n);
  }
};

/// One peer per round on the hypercube: rank j pairs with j XOR 2^q in phase q; n = 2^Q ranks, period Q.
class one_peer_exp : public group_schedule {
 public:
  explicit one_peer_exp(int world_size) : group_schedule("one_peer_exp", world_size, phases(world_size)) {}

 private:
  static std::vector<partition> phases(int n) {
    subspace::require(detail::is_power_of_two(n), [&] {
      return "decent::one_peer_exp: world_size must be a power of two (1, 2, 4, 8, ...): rank j pairs "
             "with j XOR 2^q; got world_size = " +
             std::to_string(n);
    });
    return detail::one_peer_exp_phases(n);
  }
};

/// AER: node pairs of the hypercube over nodes of local_world_size consecutive ranks, each round split into a
/// cross-node phase and an intra-node phase that alternate between neighbouring pairs; 2^Q nodes, period 2Q
/// (1 with a single node, where it is `complete`).
class alternating_exp_ring : public group_schedule {
 public:
  alternating_exp_ring(int world_size, int local_world_size)
      : group_schedule("alternating_exp_ring", world_size, phases(world_size, local_world_size)),
        local_world_size_(local_world_size) {}

  /// L, the ranks per node.
  int local_world_size() const { return local_world_size_; }
  /// N = world_size / L.
  int nodes() const { return world_size() / local_world_size_; }

  friend bool operator==(const alternating_exp_ring&, const alternating_exp_ring&) = default;

 private:
  static std::vector<partition> phases(int n, int local) {
    const std::string who = "decent::alternating_exp_ring: ";
    subspace::require(n >= 1, [&] { return who + "world_size must be >= 1, got " + std::to_string(n); });
    subspace::require(local >= 1, [&] {
      return who + "local_world_size (ranks per node) must be >= 1, got " + std::to_string(local);
    });
    subspace::require(n % local == 0, [&] {
      return who +
             "world_size must be a whole number of nodes of local_world_size "
             "ranks; got world_size = " +
             std::to_string(n) + ", local_world_size = " + std::to_string(local);
    });
    subspace::require(detail::is_power_of_two(n / local), [&] {
      return who +
             "the node count (world_size / local_world_size) must be a power of two (1, 2, 4, 8, "
             "...): node a pairs with node a XOR 2^q; got " +
             std::to_string(n / local) + " nodes (world_size = " + std::to_string(n) +
             ", local_world_size = " + std::to_string(local) + ")";
    });
    return detail::alternating_exp_ring_phases(n / local, local);
  }

  int local_world_size_ = 1;
};

static_assert(subspace::check_scheduler<complete>());
static_assert(subspace::check_scheduler<ring>());
static_assert(subspace::check_scheduler<one_peer_exp>());
static_assert(subspace::check_scheduler<alternating_exp_ring>());

/// Builds topology T for `world_size` ranks in nodes of `local_world_size` ranks (the launcher's layout); only
/// alternating_exp_ring looks at the nodes.
template <class T>
T make_topology(int world_size, int local_world_size = 1) {
  static_assert(std::is_base_of_v<group_schedule, T>, "decent::make_topology: T must be a decent topology");
  if constexpr (std::is_constructible_v<T, int, int>) return T(world_size, local_world_size);
  else return T(world_size);
}

}  // namespace decent

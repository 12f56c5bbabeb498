#pragma once
// The plan of one gossip step, and group_schedule: a gossip topology given as one partition of the ranks per
// phase (docs/decent.md, "Mixing" and "Topologies").
//
// Every topology of topology.hpp mixes in groups: in mixing round t each rank belongs to exactly one group R and
// takes the plain average of the group's parameters (W^t_ij = 1/|R| for i, j in R, 0 elsewhere), so W^t is
// symmetric, doubly stochastic and block-diagonal. Round t uses phase t mod period of a fixed cycle of
// partitions; nothing is random.
//
// plan(t, r) is W^t's row r in the form a trainer acts on: the members of r's group with their weights, and how
// to realise the average with the Communicator operations (comm/concepts.hpp):
//
//   op == mix_op::none        |R| = 1: x stays as it is; nothing is sent.
//   op == mix_op::exchange    |R| = 2: send x/2 to peer(), receive the peer's x/2, add; or all_reduce (below)
//                             on the pair's communicator. Both send the bucket once: B bytes.
//   op == mix_op::all_reduce  |R| >= 3: comm <- x/|R|, all_reduce(comm, sum) on the group's communicator,
//                             x <- comm. The group's communicator is the world split with color = group_id and
//                             key = rank, so its rank order is `group` order (group_rank is this rank's place).
//
// group_id names a rank set over the whole schedule: plans with equal ids have equal groups, whatever the
// phase. groups() lists the distinct sets by id, so a trainer can create each group's communicator once (one
// split per phase that brings a new set, colored by group id, on every rank alike: the schedule is the same
// pure function everywhere) and look it up by id each step.
//
// bytes_sent(B) is what one rank sends to mix a bucket of B bytes, under the algorithms comm::throttled models
// (comm/throttled.hpp): the pair's one message of B bytes, or the ring all-reduce, which sends
// s·(2m − c_{(k+1) mod g} − c_{(k+2) mod g}) bytes from group rank k (m = B/s elements of s bytes, chunk j of
// c_j = floor(m/g) + (j < m mod g) elements); that is 2(g−1)/g·B when g divides m.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <subspace/core/error.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/schedule/concepts.hpp>

namespace decent {

/// How a rank realises its group's average in one mixing round; see the top of this file.
enum class mix_op {
  none,        // alone: nothing to do
  exchange,    // a pair: one send and one receive with peer() (or an all_reduce on the pair's communicator)
  all_reduce,  // three or more ranks: all_reduce(sum) of x/|R| on the group's communicator
};

inline constexpr std::string_view to_string(mix_op op) {
  switch (op) {
    case mix_op::none: return "none";
    case mix_op::exchange: return "exchange";
    case mix_op::all_reduce: return "all_reduce";
  }
  return "?";
}

/// One entry of a row of W^t: rank `rank` enters the mix with weight `weight`.
struct mix_weight {
  int rank = 0;
  double weight = 0.0;

  friend bool operator==(const mix_weight&, const mix_weight&) = default;
};

/// Rank r's part of mixing round t: row r of W^t, and how to realise it. The default value (no group) is the
/// plan of no rank.
struct gossip_plan {
  std::int64_t phase = 0;         // t mod period: the entry of the schedule's cycle
  int group_id = -1;              // the group's rank set, numbered over the whole schedule (see groups())
  int group_rank = 0;             // this rank's index in `group`: its rank in the group's communicator
  std::vector<mix_weight> group;  // the group in ascending rank order, this rank included, weights 1/|R|
  mix_op op = mix_op::none;

  /// |R|, the number of ranks mixing together (this one included).
  int size() const { return int(group.size()); }
  /// The uniform weight 1/|R|: every member's weight, and the factor a bucket is scaled by before the sum.
  double weight() const { return group.empty() ? 0.0 : group.front().weight; }
  /// The other rank of a pair (op == exchange).
  int peer() const {
    subspace::require(op == mix_op::exchange, [&] {
      return "decent::gossip_plan::peer: only a pair has one peer; this group has " + std::to_string(size()) +
             " ranks (use group)";
    });
    return group[std::size_t(1 - group_rank)].rank;
  }
  /// The ranks of the group, ascending.
  std::vector<int> ranks() const {
    std::vector<int> out;
    out.reserve(group.size());
    for (const mix_weight& w : group) out.push_back(w.rank);
    return out;
  }
  /// Bytes this rank sends to mix a bucket of `bucket_bytes` bytes of elements of `element_bytes` bytes (fp32
  /// parameters by default), as comm::throttled counts them; see the top of this file.
  std::uint64_t bytes_sent(std::uint64_t bucket_bytes, std::size_t element_bytes = sizeof(float)) const {
    subspace::require(element_bytes > 0 && bucket_bytes % element_bytes == 0, [&] {
      return "decent::gossip_plan::bytes_sent: a bucket of " + std::to_string(bucket_bytes) +
             " bytes does not hold whole elements of " + std::to_string(element_bytes) + " bytes";
    });
    const auto g = std::uint64_t(size());
    if (g <= 1) return 0;
    const std::uint64_t m = bucket_bytes / element_bytes;
    const auto chunk = [&](std::uint64_t j) { return m / g + (j < m % g ? 1 : 0); };
    const auto k = std::uint64_t(group_rank);
    return element_bytes * (2 * m - chunk((k + 1) % g) - chunk((k + 2) % g));
  }

  friend bool operator==(const gossip_plan&, const gossip_plan&) = default;
};

/// A gossip schedule given by its cycle of partitions: phase q of the cycle splits the ranks into disjoint groups
/// that each average uniformly. The four topologies of topology.hpp derive from it; it also takes any other
/// cycle of partitions a user writes down. Satisfies subspace::Scheduler with plan_type = gossip_plan.
class group_schedule {
 public:
  using plan_type = gossip_plan;
  /// One phase: disjoint groups of ranks that together hold every rank of [0, world_size) once.
  using partition = std::vector<std::vector<int>>;

  /// `phases` (at least one) partition [0, world_size) each; `name` appears in messages.
  group_schedule(std::string name, int world_size, const std::vector<partition>& phases)
      : name_(std::move(name)), world_size_(world_size), period_(int(phases.size())) {
    const std::string who = "decent::" + name_ + ": ";
    subspace::require(world_size >= 1,
                      [&] { return who + "world_size must be >= 1, got " + std::to_string(world_size); });
    subspace::require(!phases.empty(), [&] { return who + "a schedule needs at least one phase"; });
    group_of_.assign(std::size_t(period_) * std::size_t(world_size), -1);
    for (int q = 0; q < period_; ++q)
      for (std::vector<int> g : phases[std::size_t(q)]) {
        std::sort(g.begin(), g.end());
        subspace::require(!g.empty(), [&] { return who + "phase " + std::to_string(q) + " has an empty group"; });
        int id = find_group(g);
        if (id < 0) {
          id = int(groups_.size());
          groups_.push_back(g);
        }
        for (const int r : g) {
          subspace::require(0 <= r && r < world_size, [&] {
            return who + "phase " + std::to_string(q) + " names rank " + std::to_string(r) + " outside [0, " +
                   std::to_string(world_size) + ")";
          });
          int& slot = group_of_[index(q, r)];
          subspace::require(slot < 0, [&] {
            return who + "phase " + std::to_string(q) + " puts rank " + std::to_string(r) + " in more than one group";
          });
          slot = id;
        }
      }
    for (int q = 0; q < period_; ++q)
      for (int r = 0; r < world_size; ++r)
        subspace::require(group_of_[index(q, r)] >= 0, [&] {
          return who + "phase " + std::to_string(q) + " leaves rank " + std::to_string(r) + " out";
        });
  }

  /// The topology's name ("ring", ...), as in messages.
  const std::string& name() const { return name_; }
  int world_size() const { return world_size_; }
  /// The length of the cycle: round t uses phase t mod period().
  int period() const { return period_; }
  /// The distinct rank sets of the whole schedule, each ascending, indexed by gossip_plan::group_id.
  const std::vector<std::vector<int>>& groups() const { return groups_; }

  /// Row `rank` of W^step (step = 0, 1, ...: the mixing round) and how to realise it.
  gossip_plan plan(std::int64_t step, int rank) const {
    subspace::require(step >= 0,
                      [&] { return "decent::" + name_ + "::plan: step must be >= 0, got " + std::to_string(step); });
    subspace::require(0 <= rank && rank < world_size_, [&] {
      return "decent::" + name_ + "::plan: rank " + std::to_string(rank) + " outside [0, " +
             std::to_string(world_size_) + ")";
    });
    gossip_plan p;
    p.phase = step % period_;
    p.group_id = group_of_[index(int(p.phase), rank)];
    const std::vector<int>& g = groups_[std::size_t(p.group_id)];
    const double w = 1.0 / double(g.size());
    for (std::size_t i = 0; i < g.size(); ++i) {
      p.group.push_back({g[i], w});
      if (g[i] == rank) p.group_rank = int(i);
    }
    p.op = g.size() == 1 ? mix_op::none : g.size() == 2 ? mix_op::exchange : mix_op::all_reduce;
    return p;
  }

  /// The groups of round `step`, ordered by their lowest rank: the partition W^step is built from.
  partition groups_at(std::int64_t step) const {
    subspace::require(
        step >= 0, [&] { return "decent::" + name_ + "::groups_at: step must be >= 0, got " + std::to_string(step); });
    partition out;
    const int q = int(step % period_);
    for (int r = 0; r < world_size_; ++r) {
      const std::vector<int>& g = groups_[std::size_t(group_of_[index(q, r)])];
      if (g.front() == r) out.push_back(g);
    }
    return out;
  }

  friend bool operator==(const group_schedule&, const group_schedule&) = default;

 private:
  std::size_t index(int phase, int rank) const {
    return std::size_t(phase) * std::size_t(world_size_) + std::size_t(rank);
  }
  int find_group(const std::vector<int>& g) const {
    for (std::size_t i = 0; i < groups_.size(); ++i)
      if (groups_[i] == g) return int(i);
    return -1;
  }

  std::string name_;
  int world_size_ = 1;
  int period_ = 1;
  std::vector<std::vector<int>> groups_;  // distinct rank sets, by id
  std::vector<int> group_of_;             // [phase * world_size + rank] -> group id
};

static_assert(subspace::check_scheduler<group_schedule>());

/// W^step of a schedule as an n x n matrix in double (row i: the weights rank i mixes with), built from the
/// plans of every rank. For tests and documentation; trainers act on plan().
inline subspace::host_tensor<double> mixing_matrix(const group_schedule& s, std::int64_t step) {
  const int n = s.world_size();
  subspace::host_tensor<double> w({n, n});
  std::fill(w.data(), w.data() + w.numel(), 0.0);
  for (int i = 0; i < n; ++i)
    for (const mix_weight& e : s.plan(step, i).group) w(i, e.rank) = e.weight;
  return w;
}

}  // namespace decent

#pragma once
// A discrete-event simulator of pipeline plans (include/subspace/pipeline/plan.hpp): runs the plans of one step on
// all ranks together, reports every way they break the plan format, and measures time and activation memory.
//
// Time: a computation takes its cost from pipeline_costs; a send takes no time and never blocks; a receive waits
// until its send was issued, plus `latency`. Between two ranks the k-th send meets the k-th receive, as
// Communicators match them, so a receive that meets another message than the one it expects is a problem, not
// a reordering.

#include <algorithm>
#include <cstddef>
#include <deque>
#include <string>
#include <vector>

#include <subspace/pipeline/plan.hpp>
#include <subspace/schedule/concepts.hpp>

namespace subspace::testing {

struct pipeline_costs {
  double forward = 1;
  double backward = 2;
  double backward_input = 1;
  double backward_weight = 1;
  double latency = 0;  // from a send's issue to the earliest end of its receive
};

struct pipeline_rank_stats {
  double busy = 0;         // time spent computing
  double finish = 0;       // when its last action ended
  int peak_in_flight = 0;  // (micro-batch, chunk)s forwarded whose backward or backward_input has not run
  int peak_held = 0;       // ... whose backward or backward_weight has not run (W still needs their inputs)
};

struct pipeline_run {
  std::vector<std::string> problems;  // empty when the plans keep the format
  double makespan = 0;
  std::vector<pipeline_rank_stats> ranks;

  /// Idle over busy time on `rank`.
  double bubble(int rank) const {
    const auto& r = ranks[std::size_t(rank)];
    return (makespan - r.busy) / r.busy;
  }
};

namespace detail {

/// What ran of one (micro-batch, virtual stage): how often, where in its rank's plan, when (-1: not yet).
struct pass_record {
  int forwards = 0, backwards = 0, inputs = 0, weights = 0;
  std::ptrdiff_t forward_at = -1, input_at = -1;  // plan index on its rank
  double forward_start = -1, forward_end = -1, input_start = -1, input_end = -1;
};

struct message {
  bool gradient = false;
  int microbatch = -1;
  int from_stage = -1;
  double sent = 0;
};

inline bool is_compute(schedule::action_kind k) {
  using K = schedule::action_kind;
  return k == K::forward || k == K::backward || k == K::backward_input || k == K::backward_weight;
}

}  // namespace detail

/// Runs `plans` (rank r's plan at [r]) of a pipeline of plans.size() ranks with `chunks` model chunks each over
/// `microbatches` micro-batches.
inline pipeline_run simulate_pipeline(const std::vector<std::vector<schedule::action>>& plans, int microbatches,
                                      int chunks, const pipeline_costs& costs = {}) {
  using K = schedule::action_kind;
  using schedule::action;
  pipeline_run run;
  const int p = int(plans.size());
  const int stages = p * chunks;
  run.ranks.resize(plans.size());
  std::vector<detail::pass_record> passes(std::size_t(microbatches) * std::size_t(stages));
  const auto pass = [&](int mb, int stage) -> detail::pass_record& {
    return passes[std::size_t(mb) * std::size_t(stages) + std::size_t(stage)];
  };
  const auto rank_of = [&](int stage) { return stage % p; };
  const auto problem = [&](int r, std::size_t i, const std::string& what) {
    run.problems.push_back("rank " + std::to_string(r) + ", action " + std::to_string(i) + " '" +
                           schedule::to_string(plans[std::size_t(r)][i]) + "': " + what);
  };

  // --- the format, rank by rank -------------------------------------------------------------------------------
  for (int r = 0; r < p; ++r) {
    const auto& plan = plans[std::size_t(r)];
    std::vector<bool> attached(plan.size(), false);
    // The message the computation at plan index i needs at index j, directly before or after it.
    const auto expect = [&](std::size_t i, std::ptrdiff_t j, const action& wanted) {
      if (j >= 0 && std::size_t(j) < plan.size() && plan[std::size_t(j)] == wanted) {
        attached[std::size_t(j)] = true;
        return;
      }
      const char* where = j < std::ptrdiff_t(i) ? "' directly before it" : "' directly after it";
      problem(r, i, "needs '" + schedule::to_string(wanted) + where);
    };
    int steps = 0;
    for (std::size_t i = 0; i < plan.size(); ++i) {
      const action& a = plan[i];
      if (a.kind == K::optimizer_step) {
        ++steps;
        if (i + 1 != plan.size()) problem(r, i, "optimizer_step must be the last action");
        continue;
      }
      if (a.microbatch < 0 || a.microbatch >= microbatches || a.chunk < 0 || a.chunk >= chunks) {
        problem(r, i, "micro-batch or chunk out of range");
        continue;
      }
      if (!detail::is_compute(a.kind)) continue;  // checked by the computation it belongs to
      if (a.peer != -1) problem(r, i, "a computation has no peer");
      const int s = pipeline::virtual_stage(r, a.chunk, p);
      const auto at = std::ptrdiff_t(i);
      detail::pass_record& rec = pass(a.microbatch, s);
      switch (a.kind) {
        case K::forward:
          ++rec.forwards;
          rec.forward_at = at;
          if (s > 0) expect(i, at - 1, {K::recv_activation, a.microbatch, rank_of(s - 1), a.chunk});
          if (s < stages - 1) expect(i, at + 1, {K::send_activation, a.microbatch, rank_of(s + 1), a.chunk});
          break;
        case K::backward:
        case K::backward_input:
          ++(a.kind == K::backward ? rec.backwards : rec.inputs);
          rec.input_at = at;
          if (rec.forward_at < 0) problem(r, i, "runs before its forward");
          if (s < stages - 1) expect(i, at - 1, {K::recv_gradient, a.microbatch, rank_of(s + 1), a.chunk});
          if (s > 0) expect(i, at + 1, {K::send_gradient, a.microbatch, rank_of(s - 1), a.chunk});
          break;
        default:  // backward_weight
          ++rec.weights;
          if (rec.input_at < 0) problem(r, i, "runs before its backward_input");
      }
    }
    for (std::size_t i = 0; i < plan.size(); ++i)
      if (!detail::is_compute(plan[i].kind) && plan[i].kind != K::optimizer_step && !attached[i])
        problem(r, i, "is not directly before or after the computation it feeds or drains");
    if (steps != 1)
      run.problems.push_back("rank " + std::to_string(r) + ": " + std::to_string(steps) +
                             " optimizer_step actions, expected 1");
  }
  for (int mb = 0; mb < microbatches; ++mb)
    for (int s = 0; s < stages; ++s) {
      const detail::pass_record& rec = pass(mb, s);
      const bool whole = rec.backwards == 1 && rec.inputs == 0 && rec.weights == 0;
      const bool split = rec.backwards == 0 && rec.inputs == 1 && rec.weights == 1;
      if (rec.forwards != 1 || !(whole || split))
        run.problems.push_back("micro-batch " + std::to_string(mb) + " at virtual stage " + std::to_string(s) +
                               " (rank " + std::to_string(rank_of(s)) + "): " + std::to_string(rec.forwards) +
                               " forward(s), " + std::to_string(rec.backwards) + " backward(s), " +
                               std::to_string(rec.inputs) + " backward_input(s), " + std::to_string(rec.weights) +
                               " backward_weight(s); expected 1 forward and 1 backward, or 1 of each half");
    }
  if (!run.problems.empty()) return run;

  // --- execution: ranks advance until every plan is done or none can -------------------------------------------
  std::vector<std::deque<detail::message>> channels(std::size_t(p) * std::size_t(p));  // [from · p + to]
  const auto channel = [&](int from, int to) -> std::deque<detail::message>& {
    return channels[std::size_t(from) * std::size_t(p) + std::size_t(to)];
  };
  std::vector<std::size_t> next(plans.size(), 0);
  std::vector<double> clock(plans.size(), 0.0);
  std::vector<int> in_flight(plans.size(), 0), held(plans.size(), 0);
  for (bool progress = true; progress;) {
    progress = false;
    for (int r = 0; r < p; ++r) {
      const auto& plan = plans[std::size_t(r)];
      auto& stats = run.ranks[std::size_t(r)];
      double& now = clock[std::size_t(r)];
      for (std::size_t& i = next[std::size_t(r)]; i < plan.size(); ++i) {
        const action& a = plan[i];
        const int s = pipeline::virtual_stage(r, a.chunk, p);
        if (a.kind == K::recv_activation || a.kind == K::recv_gradient) {
          auto& from = channel(a.peer, r);
          if (from.empty()) break;  // blocked
          const detail::message got = from.front();
          from.pop_front();
          const bool gradient = a.kind == K::recv_gradient;
          const int expected_from = gradient ? s + 1 : s - 1;
          if (got.gradient != gradient || got.microbatch != a.microbatch || got.from_stage != expected_from)
            problem(r, i,
                    std::string("meets the ") + (got.gradient ? "gradient" : "activation") + " of micro-batch " +
                        std::to_string(got.microbatch) + " from virtual stage " + std::to_string(got.from_stage) +
                        " (messages between two ranks pair up in order)");
          now = std::max(now, got.sent + costs.latency);
        } else if (a.kind == K::send_activation || a.kind == K::send_gradient) {
          channel(r, a.peer).push_back({a.kind == K::send_gradient, a.microbatch, s, now});
        } else if (a.kind != K::optimizer_step) {
          const double cost = a.kind == K::forward          ? costs.forward
                              : a.kind == K::backward       ? costs.backward
                              : a.kind == K::backward_input ? costs.backward_input
                                                            : costs.backward_weight;
          detail::pass_record& rec = pass(a.microbatch, s);
          if (a.kind == K::forward) {
            rec.forward_start = now;
            rec.forward_end = now + cost;
            stats.peak_in_flight = std::max(stats.peak_in_flight, ++in_flight[std::size_t(r)]);
            stats.peak_held = std::max(stats.peak_held, ++held[std::size_t(r)]);
          } else {
            if (a.kind != K::backward_weight) {
              rec.input_start = now;
              rec.input_end = now + cost;
              --in_flight[std::size_t(r)];
            }
            if (a.kind != K::backward_input) --held[std::size_t(r)];
          }
          now += cost;
          stats.busy += cost;
        }
        progress = true;
      }
    }
  }
  for (int r = 0; r < p; ++r) {
    const std::size_t i = next[std::size_t(r)];
    if (i < plans[std::size_t(r)].size()) problem(r, i, "deadlock: waits for a message that never comes");
    run.ranks[std::size_t(r)].finish = clock[std::size_t(r)];
    run.makespan = std::max(run.makespan, clock[std::size_t(r)]);
  }
  for (int from = 0; from < p; ++from)
    for (int to = 0; to < p; ++to)
      for (const detail::message& m : channel(from, to))
        run.problems.push_back("rank " + std::to_string(from) + " sends the " +
                               (m.gradient ? "gradient" : "activation") + " of micro-batch " +
                               std::to_string(m.microbatch) + " from virtual stage " + std::to_string(m.from_stage) +
                               " to rank " + std::to_string(to) + ", which never receives it");
  if (!run.problems.empty()) return run;

  // --- the dependencies between stages, in time ----------------------------------------------------------------
  for (int mb = 0; mb < microbatches; ++mb)
    for (int s = 0; s < stages; ++s) {
      const detail::pass_record& rec = pass(mb, s);
      const std::string which = "micro-batch " + std::to_string(mb) + " at virtual stage " + std::to_string(s);
      if (s > 0 && rec.forward_start < pass(mb, s - 1).forward_end)
        run.problems.push_back(which + ": forward starts before the previous stage's forward ended");
      if (s + 1 < stages && rec.input_start < pass(mb, s + 1).input_end)
        run.problems.push_back(which + ": backward starts before the next stage's backward ended");
    }
  return run;
}

}  // namespace subspace::testing

#pragma once
// pipeline::gpipe: every micro-batch's forward, then every backward (GPipe).
//
// Rank r's plan: forward(0), ..., forward(m-1), backward(0), ..., backward(m-1), optimizer_step, with the
// messages of plan.hpp around them. The step takes (m + p - 1)(t_F + t_B): a bubble of
// (p - 1)/m of the busy time, and every rank holds all m micro-batches' activations at the turn. Backwards run
// in micro-batch order (not reversed) so gradients accumulate in the order of the other schedules.

#include <cstdint>
#include <vector>

#include "plan.hpp"

namespace subspace::pipeline {

class gpipe {
 public:
  /// A step's actions on one rank, in the order the pipeline trainer runs them (plan.hpp).
  using plan_type = std::vector<schedule::action>;

  /// `microbatches` >= 1 micro-batches per step through `stages` >= 1 ranks, one stage each.
  gpipe(int microbatches, int stages) : microbatches_(microbatches), stages_(stages) {
    detail::check_shape("pipeline::gpipe", microbatches, stages);
  }

  int microbatches() const { return microbatches_; }
  int stages() const { return stages_; }
  int chunks() const { return 1; }
  int world_size() const { return stages_; }

  /// The same plan every step; step and rank are checked.
  plan_type plan(std::int64_t step, int rank) const {
    detail::check_plan_arguments("pipeline::gpipe", step, rank, stages_);
    plan_builder b(stages_, 1, rank);
    for (int mb = 0; mb < microbatches_; ++mb) b.forward(mb);
    for (int mb = 0; mb < microbatches_; ++mb) b.backward(mb);
    return std::move(b).finish();
  }

  friend bool operator==(const gpipe&, const gpipe&) = default;

 private:
  int microbatches_ = 1;
  int stages_ = 1;
};

static_assert(Scheduler<gpipe>);

}  // namespace subspace::pipeline

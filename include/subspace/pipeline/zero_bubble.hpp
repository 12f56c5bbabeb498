#pragma once
// pipeline::zero_bubble_h1: 1F1B with the backward split in two (ZB-H1 of Qi et al., "Zero Bubble Pipeline
// Parallelism").
//
// backward_input (B) computes only the gradient a stage sends upstream; backward_weight (W) adds the stage's
// parameter gradients later. Only B lies on the path between stages, so gradients travel upstream faster, and
// the Ws, which nothing waits for, fill what would be bubbles. Rank r runs 1F1B's w = min(p - r - 1, m) warm-up
// forwards, then [forward(w + i) while any is left, B(i), W(i - r) once i >= r] for i = 0..m-1, then its last
// min(r, m) Ws. With t_F = t_B = t_W the step takes 3m + p - 1 units when m >= p: a bubble of (p - 1)/(3m) of
// the busy time, a third of 1F1B's. (With m < p it still lies below 1F1B's.)
//
// Memory: rank r holds at most min(p - r, m) micro-batches' activations for B, as in 1F1B; the inputs W needs
// stay r micro-batches longer, so every rank keeps at most min(p, m) of those: what 1F1B keeps on rank 0.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "plan.hpp"

namespace subspace::pipeline {

class zero_bubble_h1 {
 public:
  /// A step's actions on one rank, in the order the pipeline trainer runs them (plan.hpp).
  using plan_type = std::vector<schedule::action>;

  /// `microbatches` >= 1 micro-batches per step through `stages` >= 1 ranks, one stage each.
  zero_bubble_h1(int microbatches, int stages) : microbatches_(microbatches), stages_(stages) {
    detail::check_shape("pipeline::zero_bubble_h1", microbatches, stages);
  }

  int microbatches() const { return microbatches_; }
  int stages() const { return stages_; }
  int chunks() const { return 1; }
  int world_size() const { return stages_; }

  /// The same plan every step; step and rank are checked.
  plan_type plan(std::int64_t step, int rank) const {
    detail::check_plan_arguments("pipeline::zero_bubble_h1", step, rank, stages_);
    plan_builder b(stages_, 1, rank);
    const int warmup = std::min(stages_ - rank - 1, microbatches_);
    for (int mb = 0; mb < warmup; ++mb) b.forward(mb);
    for (int mb = 0; mb < microbatches_; ++mb) {
      if (warmup + mb < microbatches_) b.forward(warmup + mb);
      b.backward_input(mb);
      if (mb >= rank) b.backward_weight(mb - rank);
    }
    for (int mb = std::max(microbatches_ - rank, 0); mb < microbatches_; ++mb) b.backward_weight(mb);
    return std::move(b).finish();
  }

  friend bool operator==(const zero_bubble_h1&, const zero_bubble_h1&) = default;

 private:
  int microbatches_ = 1;
  int stages_ = 1;
};

static_assert(Scheduler<zero_bubble_h1>);

}  // namespace subspace::pipeline

#pragma once
// pipeline::one_f_one_b: one forward, one backward (1F1B with a flush, the PipeDream-flush order Megatron runs).
//
// Rank r runs w = min(p - r - 1, m) warm-up forwards, then alternates the next forward (while any is left) with
// the oldest backward, then drains the remaining backwards:
//   forward(0..w-1), [forward(w + i), backward(i)] for i = 0..m-1 (the forward only while w + i < m),
//   optimizer_step.
// The bubble is that of GPipe, (p - 1)/m of the busy time, but rank r holds at most min(p - r, m) micro-batches'
// activations instead of m.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "plan.hpp"

namespace subspace::pipeline {

class one_f_one_b {
 public:
  /// A step's actions on one rank, in the order the pipeline trainer runs them (plan.hpp).
  using plan_type = std::vector<schedule::action>;

  /// `microbatches` >= 1 micro-batches per step through `stages` >= 1 ranks, one stage each.
  one_f_one_b(int microbatches, int stages) : microbatches_(microbatches), stages_(stages) {
    detail::check_shape("pipeline::one_f_one_b", microbatches, stages);
  }

  int microbatches() const { return microbatches_; }
  int stages() const { return stages_; }
  int chunks() const { return 1; }
  int world_size() const { return stages_; }

  /// The same plan every step; step and rank are checked.
  plan_type plan(std::int64_t step, int rank) const {
    detail::check_plan_arguments("pipeline::one_f_one_b", step, rank, stages_);
    plan_builder b(stages_, 1, rank);
    const int warmup = std::min(stages_ - rank - 1, microbatches_);
    for (int mb = 0; mb < warmup; ++mb) b.forward(mb);
    for (int mb = 0; mb < microbatches_; ++mb) {
      if (warmup + mb < microbatches_) b.forward(warmup + mb);
      b.backward(mb);
    }
    return std::move(b).finish();
  }

  friend bool operator==(const one_f_one_b&, const one_f_one_b&) = default;

 private:
  int microbatches_ = 1;
  int stages_ = 1;
};

static_assert(Scheduler<one_f_one_b>);

}  // namespace subspace::pipeline

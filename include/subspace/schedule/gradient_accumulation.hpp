#pragma once
// schedule::gradient_accumulation: one optimizer step over several micro-batches on each rank.
//
// The plan of every step on every rank is
//   forward(0), backward(0), forward(1), backward(1), ..., forward(M-1), backward(M-1), optimizer_step
// so at most one micro-batch's activations are alive at a time. The trainer scales each micro-batch's loss by
// 1/M (or the accumulated gradient once) so the step sees the mean gradient. With world_size > 1 every rank runs
// the same plan (data parallelism; the trainer reduces the gradients before optimizer_step).

#include <cstdint>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "concepts.hpp"

namespace subspace::schedule {

class gradient_accumulation {
 public:
  /// A step's actions, in the order the trainer runs them.
  using plan_type = std::vector<action>;

  /// `microbatches` >= 1 micro-batches per optimizer step, on each of `world_size` >= 1 ranks.
  explicit gradient_accumulation(int microbatches = 1, int world_size = 1)
      : microbatches_(microbatches), world_size_(world_size) {
    require(microbatches >= 1, [&] {
      return "schedule::gradient_accumulation: needs at least 1 micro-batch per step, got " +
             std::to_string(microbatches);
    });
    require(world_size >= 1, [&] {
      return "schedule::gradient_accumulation: world_size must be >= 1, got " + std::to_string(world_size);
    });
  }

  int microbatches() const { return microbatches_; }
  int world_size() const { return world_size_; }

  /// The same plan for every step and rank; step and rank are checked.
  plan_type plan(std::int64_t step, int rank) const {
    require(step >= 0,
            [&] { return "schedule::gradient_accumulation::plan: step must be >= 0, got " + std::to_string(step); });
    require(0 <= rank && rank < world_size_, [&] {
      return "schedule::gradient_accumulation::plan: rank " + std::to_string(rank) + " outside [0, " +
             std::to_string(world_size_) + ")";
    });
    plan_type p;
    p.reserve(std::size_t(2 * microbatches_ + 1));
    for (int mb = 0; mb < microbatches_; ++mb) {
      p.push_back({action_kind::forward, mb, -1});
      p.push_back({action_kind::backward, mb, -1});
    }
    p.push_back({action_kind::optimizer_step, -1, -1});
    return p;
  }

  friend bool operator==(const gradient_accumulation&, const gradient_accumulation&) = default;

 private:
  int microbatches_ = 1;
  int world_size_ = 1;
};

static_assert(Scheduler<gradient_accumulation>);

}  // namespace subspace::schedule

#pragma once
// pipeline::interleaved_1f1b: 1F1B over v model chunks per rank (Megatron's interleaved schedule).
//
// The model is cut into v·p virtual stages; rank r holds chunks j = 0..v-1, chunk j being virtual stage j·p + r.
// A rank's m·v (micro-batch, chunk) passes are ordered in groups of p micro-batches: group g's micro-batches
// g·p .. g·p+p-1 through chunk 0, then chunk 1, ..., chunk v-1 for forwards; backwards take the chunks of a
// group in reverse (v-1 first). Rank r runs w = min(2(p - r - 1) + (v - 1)p, m·v) warm-up forwards, then
// alternates the next forward (while any is left) with the oldest backward, then drains the backwards; it holds
// at most min(w + 1, m·v) chunks' activations (a chunk is 1/v of the rank's layers).
//
// The bubble shrinks v-fold to (p - 1)/(v·m) of the busy time. Megatron's warm-up is p - r - 1 passes longer
// than the dependencies need (with free communication both give this bubble): the extra passes hide a send's
// latency, which then costs only the pipeline's fill and drain, 2(v·p - 1) latencies per step, as long as it is
// at most a forward's time.
//
// m must be a multiple of p, as in Megatron's original schedule: the order is made of whole groups of p
// micro-batches. With v = 1 this is 1F1B with the longer warm-up.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "plan.hpp"

namespace subspace::pipeline {

class interleaved_1f1b {
 public:
  /// A step's actions on one rank, in the order the pipeline trainer runs them (plan.hpp).
  using plan_type = std::vector<schedule::action>;

  /// `microbatches` >= 1 micro-batches per step, a multiple of `stages` >= 1 ranks holding `chunks` >= 1 model
  /// chunks each.
  interleaved_1f1b(int microbatches, int stages, int chunks)
      : microbatches_(microbatches), stages_(stages), chunks_(chunks) {
    detail::check_shape("pipeline::interleaved_1f1b", microbatches, stages, chunks);
    require(microbatches % stages == 0, [&] {
      return "pipeline::interleaved_1f1b: the micro-batch count m = " + std::to_string(microbatches) +
             " must be a multiple of the stage count p = " + std::to_string(stages);
    });
  }

  int microbatches() const { return microbatches_; }
  int stages() const { return stages_; }
  int chunks() const { return chunks_; }
  int world_size() const { return stages_; }

  /// The same plan every step; step and rank are checked.
  plan_type plan(std::int64_t step, int rank) const {
    detail::check_plan_arguments("pipeline::interleaved_1f1b", step, rank, stages_);
    plan_builder b(stages_, chunks_, rank);
    const int passes = microbatches_ * chunks_;
    const int warmup = std::min(2 * (stages_ - rank - 1) + (chunks_ - 1) * stages_, passes);
    for (int k = 0; k < warmup; ++k) b.forward(microbatch_of(k), forward_chunk_of(k));
    for (int k = 0; k < passes; ++k) {
      if (warmup + k < passes) b.forward(microbatch_of(warmup + k), forward_chunk_of(warmup + k));
      b.backward(microbatch_of(k), chunks_ - 1 - forward_chunk_of(k));
    }
    return std::move(b).finish();
  }

  friend bool operator==(const interleaved_1f1b&, const interleaved_1f1b&) = default;

 private:
  // The k-th forward (or backward) pass of a rank: group k / (p·v), chunk (k mod p·v) / p in that group.
  int microbatch_of(int k) const { return k / (stages_ * chunks_) * stages_ + k % stages_; }
  int forward_chunk_of(int k) const { return k % (stages_ * chunks_) / stages_; }

  int microbatches_ = 1;
  int stages_ = 1;
  int chunks_ = 1;
};

static_assert(Scheduler<interleaved_1f1b>);

}  // namespace subspace::pipeline

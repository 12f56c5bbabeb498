#pragma once
// The plans of the pipeline schedules (gpipe.hpp, one_f_one_b.hpp, interleaved.hpp, zero_bubble.hpp) and the
// plan_builder that writes them.
//
// The model is cut into v·p virtual stages s = 0 .. v·p-1; rank r of the p ranks holds v model chunks, chunk j
// being virtual stage s = j·p + r (v = 1 except in interleaved_1f1b), so stage s lives on rank s mod p. Rank r's
// plan of a step is a std::vector<schedule::action> in execution order: forward and backward (or backward_input,
// later backward_weight) of every (micro-batch mb, chunk j) once each, the messages around them, and one
// optimizer_step at the end:
//   recv_activation(mb, j, rank of s-1)   directly before forward(mb, j)                      if s > 0
//   send_activation(mb, j, rank of s+1)   directly after forward(mb, j)                       if s < v·p-1
//   recv_gradient(mb, j, rank of s+1)     directly before backward or backward_input(mb, j)   if s < v·p-1
//   send_gradient(mb, j, rank of s-1)     directly after backward or backward_input(mb, j)    if s > 0
// A message's chunk is that of the local computation it feeds or drains. Interleaved chunks wrap from rank p-1
// to rank 0; with p = 1 a rank sends to itself. Sends are asynchronous and buffered; a receive blocks until its
// send was issued; between two ranks the k-th send meets the k-th receive (as Communicators match them). Under
// this model every plan here is deadlock-free and matches each send with exactly one receive. Every schedule
// here runs a chunk's backwards (or weight gradients) in micro-batch order, so its parameter gradients
// accumulate in the same order whichever schedule runs.

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../schedule/concepts.hpp"

namespace subspace::pipeline {

/// The virtual stage of chunk `chunk` on rank `rank` of `stages` ranks.
constexpr int virtual_stage(int rank, int chunk, int stages) { return chunk * stages + rank; }

/// Writes one rank's plan: each computation with the messages the format above puts around it.
class plan_builder {
 public:
  /// Rank `rank` of `stages` ranks, each holding `chunks` model chunks.
  plan_builder(int stages, int chunks, int rank) : stages_(stages), chunks_(chunks), rank_(rank) {
    require(stages >= 1 && chunks >= 1 && 0 <= rank && rank < stages, [&] {
      return "pipeline::plan_builder: rank " + std::to_string(rank) + " of " + std::to_string(stages) +
             " stages with " + std::to_string(chunks) + " chunks each";
    });
  }

  void forward(int microbatch, int chunk = 0) {
    const int s = stage(chunk);
    if (s > 0) add(schedule::action_kind::recv_activation, microbatch, previous_rank(), chunk);
    add(schedule::action_kind::forward, microbatch, -1, chunk);
    if (s < last_stage()) add(schedule::action_kind::send_activation, microbatch, next_rank(), chunk);
  }
  void backward(int microbatch, int chunk = 0) { input_gradient(schedule::action_kind::backward, microbatch, chunk); }
  void backward_input(int microbatch, int chunk = 0) {
    input_gradient(schedule::action_kind::backward_input, microbatch, chunk);
  }
  void backward_weight(int microbatch, int chunk = 0) {
    check_chunk(chunk);
    add(schedule::action_kind::backward_weight, microbatch, -1, chunk);
  }

  /// The plan, closed by optimizer_step.
  std::vector<schedule::action> finish() && {
    add(schedule::action_kind::optimizer_step, -1, -1, 0);
    return std::move(plan_);
  }

 private:
  void input_gradient(schedule::action_kind kind, int microbatch, int chunk) {
    const int s = stage(chunk);
    if (s < last_stage()) add(schedule::action_kind::recv_gradient, microbatch, next_rank(), chunk);
    add(kind, microbatch, -1, chunk);
    if (s > 0) add(schedule::action_kind::send_gradient, microbatch, previous_rank(), chunk);
  }
  void check_chunk(int chunk) const {
    require(0 <= chunk && chunk < chunks_, [&] {
      return "pipeline::plan_builder: chunk " + std::to_string(chunk) + " outside [0, " + std::to_string(chunks_) + ")";
    });
  }
  int stage(int chunk) const {
    check_chunk(chunk);
    return virtual_stage(rank_, chunk, stages_);
  }
  int last_stage() const { return chunks_ * stages_ - 1; }
  int previous_rank() const { return (rank_ + stages_ - 1) % stages_; }
  int next_rank() const { return (rank_ + 1) % stages_; }
  void add(schedule::action_kind kind, int microbatch, int peer, int chunk) {
    plan_.push_back({kind, microbatch, peer, chunk});
  }

  int stages_ = 1;
  int chunks_ = 1;
  int rank_ = 0;
  std::vector<schedule::action> plan_;
};

namespace detail {

/// The constructor checks every pipeline schedule shares; `who` names the schedule.
inline void check_shape(std::string_view who, int microbatches, int stages, int chunks = 1) {
  require(microbatches >= 1, [&] {
    return std::string(who) + ": the micro-batch count must be >= 1, got " + std::to_string(microbatches);
  });
  require(stages >= 1,
          [&] { return std::string(who) + ": the stage count must be >= 1, got " + std::to_string(stages); });
  require(chunks >= 1,
          [&] { return std::string(who) + ": the chunk count per rank must be >= 1, got " + std::to_string(chunks); });
}

/// plan()'s checks, as schedule::gradient_accumulation makes them.
inline void check_plan_arguments(std::string_view who, std::int64_t step, int rank, int stages) {
  require(step >= 0, [&] { return std::string(who) + "::plan: step must be >= 0, got " + std::to_string(step); });
  require(0 <= rank && rank < stages, [&] {
    return std::string(who) + "::plan: rank " + std::to_string(rank) + " outside [0, " + std::to_string(stages) + ")";
  });
}

}  // namespace detail
}  // namespace subspace::pipeline

#pragma once
// context::pipeline_context: context parallelism inside every stage of a pipeline — the Sequences policy of
// pipeline::pipeline_trainer that spreads each sequence over C of the ranks holding a stage (docs/context.md,
// "Pipeline × context parallelism").
//
//   // rank r of P · C · D ranks: stage r % P, place (r / P) % C, replica r / (P · C)
//   context::blocks<comm::local, compress::kv_subspace_mixture, nn::subspace_blocks> blocks(
//       context::exchange::ring, compress::kv_subspace_mixture(mos), nn::subspace_blocks(ssn, last_stage_start));
//   pipeline::pipeline_trainer t(pipeline::llama_chunks<model>(cfg, ex, P, 1, r % P, blocks),
//                                subspace::stack{.communicator = world[r], .compressor = ssn, ...}, options,
//                                context::pipeline_context(blocks, context::layout(seq, C, placement::zigzag)));
//
// The trainer splits the C · D ranks holding a stage into context groups (the C ranks of one replica) and hands
// this policy its group: the chunks' context::attention exchanges K/V there, each chunk learns its rows' global
// positions, and every rank of a pipeline reads the same rows of each batch (context::layout::take), so the
// payloads between stages are of the same rows. The trainer averages gradients and losses over all C · D ranks
// holding a stage: each rank's gradient is that of the mean loss over its rows (the K/V gradients of other ranks'
// queries included), all hold as many rows, so the average is the mean over every token of every sequence.
//
// With compress::kv_subspace_mixture the policy runs its phases (context/kv_phases.hpp) per stage: the dense
// warm-up, the switch after it — each stage's Σ summed over the C · D ranks holding it, its tables from their rank
// 0 — and the codecs' state beside each stage's checkpoint.

#include <cstdint>
#include <filesystem>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../compress/identity.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "attention.hpp"
#include "kv_phases.hpp"
#include "layout.hpp"

namespace subspace::context {

/// The Sequences policy of pipeline::pipeline_trainer for a model built with `Blocks` (a context::blocks): each
/// sequence spread over the layout's ranks (see the top of this file).
template <class Blocks>
class pipeline_context {
 public:
  using communicator_type = typename Blocks::communicator_type;
  using compressor_type = typename Blocks::compressor_type;

  /// `blocks`: a copy of the factory the chunks were built with (copies share the group it connects);
  /// `layout`: the sequence over the C ranks of a context group.
  pipeline_context(Blocks blocks, context::layout layout) : blocks_(std::move(blocks)), layout_(std::move(layout)) {}

  const context::layout& layout() const { return layout_; }
  int ranks() const { return layout_.ranks(); }

  /// Collective-free: the chunks' attention exchanges over `group` (this rank at `place`), at their rows' global
  /// positions.
  template <class Chunks>
  void connect(communicator_type& group, int place, Chunks& chunks) {
    blocks_.connect(group, layout_);
    place_ = place;
    for (auto& chunk : chunks) {
      require(chunk.config().max_seq >= layout_.seq(), [&] {
        return "context::pipeline_context: seq " + std::to_string(layout_.seq()) + " exceeds max_seq " +
               std::to_string(chunk.config().max_seq) + " of '" + chunk.config().name + "'";
      });
      chunk.set_positions(layout_.positions(place));
    }
  }

  shape rows_shape(const shape& full) const {
    require(full.rank == 2 && full[1] == layout_.seq(), [&] {
      return "context::pipeline_context: the loader reads batches " + to_string(full) +
             "; the trainer spreads "
             "sequences of " +
             std::to_string(layout_.seq()) + " tokens over its context groups";
    });
    return shape{full[0], layout_.rows_per_rank()};
  }
  void rows(view<const std::int32_t, host_space> full, view<std::int32_t, host_space> local) const {
    layout_.take<std::int32_t>(place_, full, local);
  }

  template <class Chunks>
  void begin_step(Chunks& chunks, std::int64_t step) {
    begin_kv_step(chunks, step);
  }
  template <class Chunks>
  void end_step(Chunks& chunks) {
    end_kv_step(chunks);
  }
  /// After the last warm-up step the stage's codecs switch to compression, collectively over `stage_group` (every
  /// rank holding these layers).
  template <class Chunks>
  void after_step(Chunks& chunks, std::int64_t step, communicator_type& stage_group) {
    if constexpr (compressing)
      if (step == blocks_.compressor().options().warmup_steps)
        switch_to_compressed(chunks, stage_group, blocks_.compressor().options());
    set_kv_phase(chunks, step + 1);
  }

  /// The codecs' state in a stage's checkpoint directory: the tables (`lead`: one rank of the stage), each rank's
  /// partial second moments inside the PCA window (`rank` among the ranks holding the stage).
  template <class Chunks>
  void save(Chunks& chunks, const std::filesystem::path& dir, int rank, bool lead) {
    save_kv_state(chunks, dir, rank, lead);
  }
  template <class Chunks>
  void load(Chunks& chunks, const std::filesystem::path& dir, int rank, int ranks) {
    if constexpr (compressing) load_kv_state(chunks, dir, rank, ranks, true, blocks_.compressor().options());
  }

 private:
  static constexpr bool compressing = !std::is_same_v<compressor_type, compress::identity>;

  Blocks blocks_;
  context::layout layout_;
  int place_ = 0;
};

}  // namespace subspace::context

#pragma once
// Which layers each pipeline stage holds.
//
// A pipeline of P ranks with v virtual stages per rank cuts the model into P·v stages; rank r holds virtual
// stages r, r + P, ..., r + (v−1)·P (its chunks 0 .. v−1, in that order — the chunk index of the schedules'
// actions). The first virtual stage has the embedding, the last the final norm and the LM head.

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../nn/config.hpp"
#include "../nn/llama.hpp"

namespace subspace::pipeline {

/// The layers of `parts` consecutive stages of a model of `layers` layers, as evenly as possible (the first
/// layers % parts stages get one more): the stages' first layers after the first, for nn::llama_stage::split.
inline std::vector<std::int64_t> even_cuts(std::int64_t layers, std::int64_t parts) {
  require(parts >= 1 && parts <= layers, [&] {
    return "pipeline::even_cuts: " + std::to_string(parts) + " stages for " + std::to_string(layers) +
           " layers (every stage needs at least one layer)";
  });
  std::vector<std::int64_t> cuts;
  std::int64_t first = 0;
  for (std::int64_t s = 0; s + 1 < parts; ++s) {
    first += layers / parts + (s < layers % parts ? 1 : 0);
    cuts.push_back(first);
  }
  return cuts;
}

/// Rank `rank`'s chunks of a Llama cut evenly into stages·virtual_stages stages, on one shared parameter store.
template <class Model, class Blocks = nn::dense_blocks>
std::vector<Model> llama_chunks(const nn::llama_config& cfg, const typename Model::executor_type& ex, int stages,
                                int virtual_stages, int rank, const Blocks& blocks = {}) {
  require(stages >= 1 && virtual_stages >= 1 && 0 <= rank && rank < stages, [&] {
    return "pipeline::llama_chunks: rank " + std::to_string(rank) + " of " + std::to_string(stages) + " stages with " +
           std::to_string(virtual_stages) + " virtual stages each (expected 0 <= rank < stages, both counts >= 1)";
  });
  const std::int64_t parts = std::int64_t(stages) * virtual_stages;
  require(parts <= cfg.n_layers, [&] {
    return "pipeline::llama_chunks: " + std::to_string(stages) + " stages × " + std::to_string(virtual_stages) +
           " virtual stages need at least " + std::to_string(parts) + " layers; '" + cfg.name + "' has " +
           std::to_string(cfg.n_layers);
  });
  const std::vector<nn::llama_stage> all = nn::llama_stage::split(cfg, even_cuts(cfg.n_layers, parts));
  auto store = std::make_shared<typename Model::store_type>();
  std::vector<Model> chunks;
  for (int j = 0; j < virtual_stages; ++j)
    chunks.emplace_back(cfg, ex, all[std::size_t(j * stages + rank)], store, blocks);
  return chunks;
}

}  // namespace subspace::pipeline

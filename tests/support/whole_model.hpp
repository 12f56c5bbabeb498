#pragma once
// The reference the distributed trainers' tests compare against: the whole model's loss and gradients over M
// micro-batches of a loader, on one device through the plan engine.
#include <cstdint>
#include <vector>

#include <subspace/compress/identity.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/nn/config.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>
#include <subspace/train/engine.hpp>
#include <subspace/train/trainer.hpp>

#include "named_tensors.hpp"

namespace subspace::testing {

/// The loss of M micro-batches of `loader` through Model(cfg) initialised from `seed`; its gradients into `out`.
template <class Model>
double whole_model_gradients(const nn::llama_config& cfg, std::uint64_t seed, data::batch_loader& loader, int m,
                             named_tensors& out) {
  std::vector<Model> stages = train::as_stages(Model(cfg, exec::host{1}));
  stages[0].init(seed);
  stages[0].zero_grad();
  compress::identity none;
  train::plan_engine<Model, compress::identity> engine(stages, none, {});
  const double loss = engine.run(
      schedule::gradient_accumulation{m}.plan(0, 0), train::loader_source{loader}, [](std::size_t, std::size_t) {},
      [] {});
  out.add(stages[0].parameters());
  return loss;
}

}  // namespace subspace::testing

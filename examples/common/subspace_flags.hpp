#pragma once
// The GaLore/GoLore flags of train_llama and gossip_llama (--rank, --refresh, --galore-scale, --golore-percent,
// --allow-no-projection), the optimizers they configure, and the line saying what those project of the model.

#include <cstdint>
#include <string>

#include <subspace/nn/config.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/optim/adamw.hpp>
#include <subspace/optim/galore.hpp>
#include <subspace/optim/golore.hpp>

#include "cli.hpp"
#include "flag_checks.hpp"

namespace examples {

struct subspace_flags {
  std::int64_t rank = 0;  // 0: optim::auto_rank, a quarter of each matrix's short side
  std::int64_t refresh = 200;
  float galore_scale = 0.25f;
  double golore_percent = 20.0;
  bool allow_no_projection = false;
};

inline void declare_subspace_flags(cli& c, subspace_flags& f) {
  c.flag("rank", f.rank, "GaLore/GoLore projection rank r (0: a quarter of each matrix's short side)")
      .flag("refresh", f.refresh, "GaLore/GoLore projector refresh period (steps)")
      .flag("galore-scale", f.galore_scale, "GaLore/GoLore update scale alpha")
      .flag("golore-percent", f.golore_percent, "GoLore@x%: the last x% of steps use random projectors")
      .toggle("allow-no-projection", f.allow_no_projection,
              "GaLore/GoLore: train even when --rank leaves no matrix projected (plain AdamW under that name)");
}

inline void check_subspace_flags(const subspace_flags& f) {
  need_finite("galore-scale", f.galore_scale);
  need(f.rank >= 0, "--rank must be >= 1 (or 0: a quarter of each matrix's short side), got " + std::to_string(f.rank));
  need(f.refresh >= 1, "--refresh must be >= 1, got " + std::to_string(f.refresh));
  need(f.golore_percent >= 0 && f.golore_percent <= 100, "--golore-percent must lie in [0, 100]");
}

/// --optimizer galore around `inner`.
inline subspace::optim::galore<> galore_from(const subspace_flags& f, const subspace::optim::adamw& inner) {
  return {.inner = inner,
          .rank = f.rank,
          .refresh_period = f.refresh,
          .scale = f.galore_scale,
          .allow_no_projection = f.allow_no_projection};
}

/// --optimizer golore around `inner`, switching to random projectors within `steps` optimizer steps.
inline subspace::optim::golore<> golore_from(const subspace_flags& f, const subspace::optim::adamw& inner,
                                             std::int64_t steps, std::uint64_t seed) {
  return {.inner = inner,
          .rank = f.rank,
          .refresh_period = f.refresh,
          .scale = f.galore_scale,
          .random_percent = f.golore_percent,
          .total_steps = steps,
          .seed = seed,
          .allow_no_projection = f.allow_no_projection};
}

/// "projected 28 of 30 matrices at rank 16-32, AdamW steps the rest" for `opt` on a Llama of `cfg`; a cli_error
/// naming --rank when nothing would be projected (the run would be plain AdamW), unless --allow-no-projection.
template <class Optimizer>
std::string projection_of(const Optimizer& opt, const subspace_flags& f, const subspace::nn::llama_config& cfg) {
  const subspace::nn::llama<subspace::exec::host, float> model(cfg, subspace::exec::host{1});  // names and shapes
  const subspace::optim::projection_summary s = opt.summary(model.parameters());
  if (s.projected == 0 && !f.allow_no_projection)
    throw cli_error("--rank " + std::to_string(f.rank) + ": no matrix of model '" + cfg.name +
                    "' would be projected (" + std::to_string(s.targets) + " attention and MLP matrices, short sides " +
                    std::to_string(s.min_short_side) + " to " + std::to_string(s.max_short_side) +
                    ", none above the rank), so every parameter would train with plain AdamW; lower --rank, leave "
                    "it 0 (a quarter of each matrix's short side), or pass --allow-no-projection");
  return s.text() + (s.projected < std::int64_t(model.parameters().size()) ? ", AdamW steps the rest" : "");
}

}  // namespace examples

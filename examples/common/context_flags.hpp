#pragma once
// The context-parallel flags of context_llama and pipeline_llama (--layout, --attention and the Mixture of
// Subspaces flags --rank-k, --rank-v, --generators, --theta-max, --warmup-pca, --pca-steps, --unplug-at), their
// checks, and the compressor options they configure. Each program declares --cp and the flag that turns compression
// on itself.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include <subspace/compress/kv_subspace_mixture.hpp>
#include <subspace/context/attention.hpp>
#include <subspace/context/layout.hpp>
#include <subspace/nn/config.hpp>

#include "cli.hpp"
#include "flag_checks.hpp"
#include "ranks.hpp"

namespace examples {

struct context_flags {
  int cp = 1;  // ranks per sequence
  std::string layout = "zigzag", attention = "ring";
  std::int64_t rank_k = 0, rank_v = 0, generators = 1, warmup_pca = 50, pca_steps = 20, unplug_at = 0;
  double theta_max = 0.5;

  subspace::context::placement placement() const {
    return layout == "zigzag" ? subspace::context::placement::zigzag : subspace::context::placement::contiguous;
  }
  subspace::context::exchange exchange() const {
    return attention == "ring" ? subspace::context::exchange::ring : subspace::context::exchange::all_gather;
  }
};

/// --layout, --attention and the Mixture-of-Subspaces flags; `mos_flag` names the flag that turns it on.
inline void declare_context_flags(cli& c, context_flags& f, const std::string& mos_flag) {
  c.flag("layout", f.layout,
         "zigzag: rank i holds chunks i and 2C-1-i of 2C (balanced causal work; --seq a multiple of 2 x --cp); "
         "contiguous: rank i holds the i-th run of --seq / --cp positions",
         {"zigzag", "contiguous"})
      .flag("attention", f.attention,
            "ring: K/V blocks passed from rank to rank, each hop overlapped with attention to the previous "
            "block; all_gather: one all-gather forward, one reduce-scatter backward",
            {"ring", "all_gather"})
      .flag("rank-k", f.rank_k, "rank of the compressed K (0: 2% of the K/V width, at least 1; " + mos_flag + ")")
      .flag("rank-v", f.rank_v, "rank of the compressed V (0: 5% of the K/V width, at least 1; " + mos_flag + ")")
      .flag("generators", f.generators, "rotation coefficients per chunk (m)")
      .flag("theta-max", f.theta_max,
            "bound of each rotation coefficient, |theta| < it through tanh, where the rotation's Taylor form "
            "stays nearly orthogonal (0: unbounded)")
      .flag("warmup-pca", f.warmup_pca, "dense steps before compression starts (its basis comes from their K/V)")
      .flag("pca-steps", f.pca_steps, "the last warm-up steps whose K/V second moments give the basis")
      .flag("unplug-at", f.unplug_at, "from this step on send dense K/V again (0: never)");
}

/// The flags' own rules, before anything runs: --seq fits the layout, the ranks and steps are in range, and with
/// compression (`mos`) the warm-up ends before --steps.
inline void check_context_flags(const context_flags& f, std::int64_t seq, std::int64_t steps, bool mos) {
  need(f.cp >= 1 && f.cp <= 64, "--cp must lie in [1, 64], got " + std::to_string(f.cp));
  const std::int64_t unit = f.layout == "zigzag" ? 2 * std::int64_t(f.cp) : std::int64_t(f.cp);
  need(seq % unit == 0, "--seq " + std::to_string(seq) + " must be a multiple of " + std::to_string(unit) + " (" +
                            (f.layout == "zigzag" ? "2 x --cp: zigzag gives every rank two equal chunks"
                                                  : "--cp: every rank holds as many rows") +
                            ")");
  need(f.rank_k >= 0 && f.rank_v >= 0, "--rank-k and --rank-v must be >= 0 (0: 2% and 5% of the K/V width)");
  need(f.generators >= 1, "--generators must be >= 1");
  need(std::isfinite(f.theta_max) && f.theta_max >= 0,
       "--theta-max must be a finite number >= 0 (0: unbounded), got " + std::to_string(f.theta_max));
  need(f.warmup_pca >= 1 && f.pca_steps >= 1, "--warmup-pca and --pca-steps must be >= 1");
  need(f.unplug_at >= 0, "--unplug-at must be >= 0 (0: never)");
  need(!mos || f.warmup_pca < steps, "--warmup-pca " + std::to_string(f.warmup_pca) + " must be shorter than --steps " +
                                         std::to_string(steps) +
                                         " (compression starts after the uncompressed warm-up)");
}

/// The Mixture-of-Subspaces options of the flags for `cfg` (`mos_flag` names the flag in errors).
inline subspace::compress::kv_subspace_options mos_options(const context_flags& f,
                                                           const subspace::nn::llama_config& cfg, std::uint64_t seed,
                                                           const std::string& mos_flag) {
  subspace::compress::kv_subspace_options m;
  m.layers = cfg.n_layers;
  m.kv_dim = cfg.kv_dim();
  m.rank_k = f.rank_k;
  m.rank_v = f.rank_v;
  m.generators = f.generators;
  m.theta_max = f.theta_max;
  m.generator_seed = seed * 2 + 301;
  m.warmup_steps = f.warmup_pca;
  m.pca_steps = std::min(f.pca_steps, f.warmup_pca);
  m.unplug_at_step = f.unplug_at;
  if (m.k_rank() >= m.kv_dim || m.v_rank() >= m.kv_dim)
    throw cli_error("--rank-k " + std::to_string(m.k_rank()) + " / --rank-v " + std::to_string(m.v_rank()) +
                    ": each rank must be below the K/V width " + std::to_string(m.kv_dim) +
                    " (KV heads x head dim of '" + cfg.name + "')");
  if (cfg.n_layers < 2)
    throw cli_error(mos_flag + ": the last layer stays dense, so the model needs at least 2 layers");
  try {
    m.validate();
  } catch (const subspace::invalid_argument& e) {
    throw cli_error(mos_flag + ": " + without_location(e.what()));
  }
  return m;
}

}  // namespace examples

#pragma once
// The selective SSM's tensors and how its layers split into stages: ssm_parameter_infos (names, shapes, weight
// decay and initialisation, in store order) and ssm_stage (a contiguous range of layers; shard() cuts K layers
// over ranks as the paper does).

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <subspace/core/error.hpp>
#include <subspace/core/parameter.hpp>

#include "config.hpp"

namespace adjoint {

/// The parameters of `cfg` in store order, with shapes, decay flags and initialisation (see the top of the file).
inline std::vector<subspace::parameter_info> ssm_parameter_infos(const ssm_config& cfg) {
  cfg.validate();
  const std::int64_t V = cfg.vocab, P = cfg.d_model, N = cfg.state;
  const float std_out = float(double(cfg.init_std) / std::sqrt(2.0 * double(cfg.layers)));
  std::vector<subspace::parameter_info> infos;
  const auto add = [&](std::string name, subspace::shape s, bool decay, float init_std, float constant) {
    const auto stream = std::uint64_t(infos.size());
    infos.push_back({std::move(name), s, decay, subspace::parameter_init{init_std, constant, stream}});
  };
  add("embedding.weight", {V, P}, false, cfg.init_std, 0.0f);
  for (std::int64_t k = 0; k < cfg.layers; ++k) {
    const std::string p = "layers." + std::to_string(k) + ".";
    add(p + "a_proj.weight", {N, P}, true, cfg.init_std, 0.0f);
    add(p + "a_proj.bias", {N}, false, 0.0f, cfg.gate_bias);
    add(p + "b_proj.weight", {N * P, P}, true, cfg.init_std, 0.0f);
    add(p + "b_proj.bias", {N * P}, false, 0.0f, 0.0f);
    add(p + "c_proj.weight", {P * N, P}, true, std_out, 0.0f);
    add(p + "c_proj.bias", {P * N}, false, 0.0f, 0.0f);
  }
  add("norm.weight", {P}, false, 0.0f, 1.0f);
  add("head.weight", {V, P}, true, cfg.init_std, 0.0f);
  return infos;
}

/// Which layers a model instance computes.
struct ssm_stage {
  std::int64_t first_layer = 0;
  std::int64_t last_layer = -1;  // -1: every layer of the configuration

  /// The paper's sharding: `ranks` contiguous blocks of ⌊K / ranks⌋ layers, the last rank taking the remainder.
  static std::vector<ssm_stage> shard(const ssm_config& cfg, int ranks) {
    subspace::require(ranks > 0 && ranks <= cfg.layers, [&] {
      return "ssm_stage::shard: " + std::to_string(ranks) + " ranks for " + std::to_string(cfg.layers) +
             " layers (expected 1 to " + std::to_string(cfg.layers) + " ranks)";
    });
    const std::int64_t per = cfg.layers / ranks;
    std::vector<ssm_stage> out;
    for (int r = 0; r < ranks; ++r) out.push_back({r * per, r + 1 == ranks ? cfg.layers : (r + 1) * per});
    return out;
  }
};

}  // namespace adjoint

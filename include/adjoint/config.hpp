#pragma once
// adjoint::ssm_config: the selective state-space language model's sizes (docs/ssm.md), described once with
// Boost.Hana so checkpoints write, read and compare its config.json through io/struct_config.hpp.
//
//   vocab V, d_model P (the residual width), state N (per layer), layers K,
//   norm_eps (every RMSNorm), gate_bias (b^a's initial value: a = sigmoid(ln 9) = 0.9 at the start),
//   init_std (the projections' and embeddings' normal initialisation).

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include <subspace/core/checked.hpp>
#include <subspace/core/error.hpp>

namespace adjoint {

struct ssm_config {
  BOOST_HANA_DEFINE_STRUCT(ssm_config, (std::string, name), (std::int64_t, vocab), (std::int64_t, d_model),
                           (std::int64_t, state), (std::int64_t, layers), (float, norm_eps), (float, gate_bias),
                           (float, init_std));

  /// Throws invalid_argument naming the field and the expected value when the configuration is unusable,
  /// including sizes whose parameter counts pass subspace::max_elements (core/checked.hpp).
  void validate() const {
    const auto need = [&](bool ok, auto&& what) {  // what: a callable building the text, called on failure
      subspace::require(ok, [&] { return "ssm_config '" + name + "': " + what(); });
    };
    const auto positive = [&](const char* field, std::int64_t value) {
      need(value > 0, [&] { return std::string(field) + " must be positive, got " + std::to_string(value); });
    };
    positive("vocab", vocab);
    positive("d_model", d_model);
    positive("state", state);
    positive("layers", layers);
    const auto within = [&](std::optional<std::int64_t> elements, const char* what) {
      need(elements.has_value(), [&] { return std::string(what) + " exceeds 2^48 elements"; });
    };
    within(subspace::checked_product(vocab, d_model), "vocab · d_model");
    within(subspace::checked_product(state, d_model, d_model), "state · d_model²");
    within(subspace::checked_product(layers, 3, state, d_model, d_model + 1), "the layers' parameters");
    within(subspace::checked_add(2 * vocab * d_model + layers * layer_parameters(), d_model), "the parameters");
    need(std::isfinite(norm_eps) && norm_eps > 0, [] { return "norm_eps must be a positive number"; });
    need(std::isfinite(gate_bias), [] { return "gate_bias must be a finite number"; });
    need(std::isfinite(init_std) && init_std > 0, [] { return "init_std must be a positive number"; });
  }

  /// Parameters of one layer: the gate map P → N, the B map P → N·P and the C map P → P·N, with biases.
  std::int64_t layer_parameters() const { return (state + 2 * state * d_model) * (d_model + 1); }
  /// Every parameter: embedding, layers, final norm gain and the untied head.
  std::int64_t parameters() const { return 2 * vocab * d_model + layers * layer_parameters() + d_model; }
};

namespace presets {

/// Gradient checks in double: the smallest sizes that exercise every path.
inline ssm_config micro() { return {"micro", 11, 3, 4, 2, 1e-5f, 2.1972246f, 0.3f}; }
/// Byte-level vocabulary, small enough to train on two CPU cores in a few minutes.
inline ssm_config tiny() { return {"tiny", 256, 64, 16, 4, 1e-5f, 2.1972246f, 0.02f}; }
/// The memory benchmark's model: K 8, P 512, N 64.
inline ssm_config bench() { return {"bench", 256, 512, 64, 8, 1e-5f, 2.1972246f, 0.02f}; }
/// The paper's worked example: P 128, N 225 (8 layers, byte-level vocabulary).
inline ssm_config paper() { return {"paper", 256, 128, 225, 8, 1e-5f, 2.1972246f, 0.02f}; }

inline std::vector<std::string> names() { return {"micro", "tiny", "bench", "paper"}; }

/// The preset called `name`; invalid_argument listing the known names otherwise.
inline ssm_config by_name(const std::string& name) {
  for (const ssm_config& c : {micro(), tiny(), bench(), paper()})
    if (c.name == name) return c;
  std::string known;
  for (const auto& n : names()) known += (known.empty() ? "" : ", ") + n;
  throw subspace::invalid_argument("unknown SSM preset '" + name + "' (known: " + known + ")");
}

}  // namespace presets
}  // namespace adjoint

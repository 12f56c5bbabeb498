#pragma once
// The rotary position embedding's parameters, read by kernels/rope.hpp (rope_inv_freq) and carried by the model
// configuration (nn::llama_config::rope, where nn::rope_config names this type).

#include <cstdint>

namespace subspace {

/// Rotary position embedding. Pairs are (i, i + head_dim/2) — Hugging Face's layout, so HF q/k weights load
/// unpermuted. Optional Llama 3.1 frequency scaling.
struct rope_config {
  float theta = 500000.0f;
  bool llama31_scaling = false;
  float factor = 8.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  std::int64_t original_max_position = 8192;
};

}  // namespace subspace

#pragma once
// The one description of a trainable tensor, shared by the model layer (nn/parameters.hpp: where the tensor lives
// and how it starts), the optimizers (whether it decays) and the distributed trainers (bucket plans, checkpoints).

#include <cstdint>
#include <string>

#include "tensor.hpp"

namespace subspace {

/// How a parameter starts: N(0, std²) from the Philox stream (seed, stream) when std > 0, else `constant`.
struct parameter_init {
  float std = 0.0f;
  float constant = 1.0f;
  std::uint64_t stream = 0;
};

/// A trainable tensor: its name (a checkpoint key), its extents, whether weight decay applies, and its
/// initialisation.
struct parameter_info {
  std::string name;
  subspace::shape shape{};
  bool decay = false;
  parameter_init init{};
};

}  // namespace subspace

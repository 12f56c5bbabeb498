#pragma once
// Random tokens in [0, vocab) and random targets, with about one target in five set to -1 (ignored): the batches
// the host model tests feed the Llama.
#include <cstdint>

#include <subspace/core/rng.hpp>
#include <subspace/core/tensor.hpp>

namespace subspace::testing {

struct token_batch {
  host_tensor<std::int32_t> tokens, targets;
  token_batch(std::int64_t b, std::int64_t s, std::int64_t vocab, std::uint64_t seed, bool some_ignored = true)
      : tokens({b, s}), targets({b, s}) {
    for (std::int64_t i = 0; i < b * s; ++i) {
      const auto r = rng::bits4(seed, 3, std::uint64_t(i));
      tokens.data()[i] = std::int32_t(r.v[0] % std::uint32_t(vocab));
      targets.data()[i] = std::int32_t(r.v[1] % std::uint32_t(vocab));
      if (some_ignored && r.v[2] % 5 == 0) targets.data()[i] = -1;
    }
  }
  view<const std::int32_t, host_space> tok() const { return tokens.v(); }
  view<const std::int32_t, host_space> tgt() const { return targets.v(); }
};

}  // namespace subspace::testing

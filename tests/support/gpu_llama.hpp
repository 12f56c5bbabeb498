#pragma once
// What the CUDA trainer tests share: a small Llama configuration the CUDA kernels support, and a token shard of
// text-like bytes (so the loss has something to learn).

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <subspace/core/rng.hpp>
#include <subspace/data/tokens.hpp>
#include <subspace/nn/config.hpp>

namespace subspace::testing {

/// Head dim 32 (a size the CUDA attention supports), two layers, grouped queries, the byte vocabulary.
inline nn::llama_config gpu_check_config(std::string name) {
  nn::llama_config cfg;
  cfg.name = std::move(name);
  cfg.vocab = 256;
  cfg.d_model = 64;
  cfg.n_layers = 2;
  cfg.n_heads = 2;
  cfg.n_kv_heads = 1;
  cfg.ffn_hidden = 160;
  cfg.max_seq = 64;
  return cfg;
}

/// `count` text-like bytes (a repeating pattern with Philox noise) written to the llm.c shard `path` (once).
inline data::token_dataset text_like_tokens(const std::filesystem::path& path, std::uint64_t seed, std::size_t count) {
  if (!std::filesystem::exists(path)) {
    std::vector<std::int32_t> tokens(count);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const auto r = rng::bits4(seed, 11, std::uint64_t(i));
      tokens[i] = r.v[0] % 5 == 0 ? std::int32_t(r.v[1] % 256u) : std::int32_t(97 + (i * 7 + i / 13) % 26);
    }
    data::write_llmc_tokens(path, tokens);
  }
  return data::token_dataset::open(path.string());
}

}  // namespace subspace::testing

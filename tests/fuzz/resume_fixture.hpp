#pragma once
// The resume target's world: a tiny Llama (presets::micro) trained by train::trainer with AdamW for two steps
// over a small llm.c shard, and the checkpoint it saved. The seed corpus and the target build the same one.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include <subspace/core/executor.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/data/tokens.hpp>
#include <subspace/nn/config.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/policies.hpp>
#include <subspace/train/trainer.hpp>

namespace subspace::fuzz {

using resume_model = nn::llama<exec::host, float>;
using resume_trainer = train::trainer<resume_model, subspace::stack<>>;

inline resume_trainer make_resume_trainer() {
  return resume_trainer(resume_model(nn::presets::micro(), exec::host{1}), subspace::stack{}, {});
}

/// A loader over `shard`: two rows of eight tokens, shuffled.
inline data::batch_loader make_resume_loader(const std::filesystem::path& shard) {
  data::loader_options o;
  o.batch = 2;
  o.seq = 8;
  o.vocab = nn::presets::micro().vocab;
  o.shuffle = true;
  o.seed = 5;
  return data::batch_loader(data::token_dataset(std::vector<std::filesystem::path>{shard}), o);
}

/// Writes `dir`/tokens.bin and a checkpoint after two steps in `dir`/checkpoint; returns the checkpoint's files
/// (name and bytes), sorted by name: the target mutates one of them, chosen by its first input byte.
inline std::vector<std::pair<std::string, std::string>> write_resume_checkpoint(const std::filesystem::path& dir) {
  std::vector<std::int32_t> tokens(600);
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = std::int32_t((i * 7 + i / 13) % 32);
  data::write_llmc_tokens(dir / "tokens.bin", tokens);
  auto loader = make_resume_loader(dir / "tokens.bin");
  resume_trainer t = make_resume_trainer();
  t.init(11);
  t.step(loader);
  t.step(loader);
  t.save(dir / "checkpoint", loader.position(), 11);

  std::vector<std::pair<std::string, std::string>> files;
  for (const auto& e : std::filesystem::directory_iterator(dir / "checkpoint")) {
    if (!e.is_regular_file()) continue;
    std::ifstream in(e.path(), std::ios::binary);
    files.emplace_back(e.path().filename().string(), std::string(std::istreambuf_iterator<char>(in), {}));
  }
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace subspace::fuzz

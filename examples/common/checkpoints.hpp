#pragma once
// What the single-device training examples (train_llama, train_ssm) share about checkpoint directories:
// DIR/step_NNNNNNNNN, the newest of them for --resume.

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include <subspace/core/error.hpp>
#include <subspace/io/checkpoint.hpp>

namespace examples {

/// Whether `dir` holds a checkpoint: a single device's, or the stages' of a pipeline (stage-0 first).
inline bool is_checkpoint(const std::filesystem::path& dir) {
  return std::filesystem::exists(dir / subspace::io::state_json_file_name) ||
         std::filesystem::exists(dir / "stage-0" / subspace::io::state_json_file_name);
}

/// Checkpoint directories under `root` ("step_NNNNNNN"), oldest first.
inline std::vector<std::filesystem::path> checkpoints_in(const std::filesystem::path& root) {
  std::vector<std::filesystem::path> out;
  if (!std::filesystem::is_directory(root)) return out;
  for (const auto& e : std::filesystem::directory_iterator(root))
    if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0 && is_checkpoint(e.path()))
      out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

/// --resume names a checkpoint, or a --checkpoint-dir whose latest checkpoint is taken.
inline std::filesystem::path resolve_resume(const std::filesystem::path& p) {
  if (is_checkpoint(p)) return p;
  const auto all = checkpoints_in(p);
  subspace::require(!all.empty(), [&] {
    return "--resume " + p.string() + ": neither a checkpoint (no " + subspace::io::state_json_file_name +
           ") nor a directory of step_* checkpoints";
  });
  return all.back();
}

}  // namespace examples

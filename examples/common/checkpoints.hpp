#pragma once
// What the training examples share about a --checkpoint-dir: checkpoints DIR/step_NNNNNNNNN (a single device's,
// or one directory per pipeline stage or context rank inside), each published whole by the trainers
// (util/directory.hpp); the newest for --resume; cleaning up after an interrupted run and keeping the newest N.
//
// clean_checkpoint_dir runs in one process before any rank reads or writes the directory: it finishes or undoes
// the publications a kill -9 or a full disk interrupted (io::recover_directory_writes) and removes step
// directories that hold no complete checkpoint (left by a save that wrote in place).

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <subspace/core/error.hpp>
#include <subspace/io/checkpoint.hpp>
#include <subspace/io/metrics.hpp>
#include <subspace/util/directory.hpp>

#include "cli.hpp"

namespace examples {

/// The name of step `step`'s checkpoint: step_ and the step, zero-padded to 9 digits (more when larger).
inline std::string checkpoint_name(std::int64_t step) {
  std::string digits = std::to_string(step);
  if (digits.size() < 9) digits.insert(0, 9 - digits.size(), '0');
  return "step_" + digits;
}

/// The step a checkpoint directory's name gives ("step_" and decimal digits only), or nothing.
inline std::optional<std::int64_t> step_of(const std::filesystem::path& dir) {
  const std::string name = dir.filename().string();
  if (name.rfind("step_", 0) != 0 || name.size() == 5 || name.size() > 5 + 18) return std::nullopt;
  std::int64_t step = 0;
  for (std::size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    step = 10 * step + (name[i] - '0');
  }
  return step;
}

/// Whether `dir` holds a complete checkpoint: a sidecar, or subdirectories stage-0, stage-1, ... (a pipeline's) or
/// rank-0, rank-1, ... (per-rank context checkpoints) with no gap, each with its sidecar.
inline bool is_checkpoint(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  if (fs::exists(dir / subspace::io::state_json_file_name)) return true;
  if (!fs::is_directory(dir)) return false;
  std::map<std::string, std::vector<bool>> parts;  // "stage-" or "rank-" -> which indices hold a sidecar
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    for (const std::string prefix : {"stage-", "rank-"}) {
      if (!e.is_directory() || name.rfind(prefix, 0) != 0 || name.size() == prefix.size() || name.size() > 12 ||
          name.find_first_not_of("0123456789", prefix.size()) != std::string::npos)
        continue;
      const std::size_t index = std::stoul(name.substr(prefix.size()));
      std::vector<bool>& seen = parts[prefix];
      if (seen.size() <= index) seen.resize(index + 1, false);
      seen[index] = fs::exists(e.path() / subspace::io::state_json_file_name);
    }
  }
  return parts.size() == 1 && std::all_of(parts.begin()->second.begin(), parts.begin()->second.end(),
                                          [](bool complete) { return complete; });
}

/// Complete checkpoints under `root` (step_N), by step, oldest first.
inline std::vector<std::filesystem::path> checkpoints_in(const std::filesystem::path& root) {
  std::vector<std::pair<std::int64_t, std::filesystem::path>> found;
  if (!std::filesystem::is_directory(root)) return {};
  for (const auto& e : std::filesystem::directory_iterator(root))
    if (const auto step = step_of(e.path()); step && e.is_directory() && is_checkpoint(e.path()))
      found.emplace_back(*step, e.path());
  std::sort(found.begin(), found.end());
  std::vector<std::filesystem::path> out;
  for (auto& [step, path] : found) out.push_back(std::move(path));
  return out;
}

/// Cleans `root` after an interrupted run (see the top of this file); prints a line per change.
inline void clean_checkpoint_dir(const std::filesystem::path& root) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(root)) return;
  const auto is_step = [](const std::string& name) { return step_of(name).has_value(); };
  for (const std::string& line : subspace::io::recover_directory_writes(root, is_step))
    std::printf("checkpoint dir: %s\n", line.c_str());
  for (const auto& e : fs::directory_iterator(root)) {
    if (!step_of(e.path()) || !e.is_directory() || is_checkpoint(e.path())) continue;
    std::error_code ec;
    fs::remove_all(e.path(), ec);
    if (ec) throw tool_error("cannot remove the incomplete checkpoint " + e.path().string() + ": " + ec.message());
    std::printf("checkpoint dir: removed '%s' (an incomplete checkpoint)\n", e.path().c_str());
  }
}

/// Before a run, in one process: cleans --checkpoint-dir and the directory --resume takes its checkpoint from.
inline void clean_before_run(const std::filesystem::path& checkpoint_dir, const std::filesystem::path& resume) {
  if (!checkpoint_dir.empty()) clean_checkpoint_dir(checkpoint_dir);
  if (resume.empty()) return;
  const std::filesystem::path entry = resume.has_filename() ? resume : resume.parent_path();
  const std::filesystem::path root = step_of(entry) ? entry.parent_path() : entry;
  clean_checkpoint_dir(root.empty() ? std::filesystem::path(".") : root);
}

/// --keep-checkpoints: cleans `root`, then removes its oldest checkpoints beyond the newest `keep` (0: keeps all).
inline void keep_newest_checkpoints(const std::filesystem::path& root, std::int64_t keep) {
  clean_checkpoint_dir(root);
  auto all = checkpoints_in(root);
  while (keep > 0 && std::int64_t(all.size()) > keep) {
    std::filesystem::remove_all(all.front());
    all.erase(all.begin());
  }
}

/// The step of the checkpoint `dir`: its sidecar's, or its first stage's or rank's.
inline std::int64_t checkpoint_step(const std::filesystem::path& dir) {
  for (const char* part : {"stage-0", "rank-0"})
    if (std::filesystem::exists(dir / part / subspace::io::state_json_file_name))
      return subspace::io::read_trainer_state(dir / part).step;
  return subspace::io::read_trainer_state(dir).step;
}

/// How a run opens --metrics: a fresh run truncates the file; a run resumed from the checkpoint `resume` keeps the
/// lines up to the checkpoint's step (the interrupted run's later ones come again, and its last may be torn) and
/// appends.
inline subspace::io::metrics_writer::open_mode metrics_mode(const std::filesystem::path& metrics,
                                                            const std::filesystem::path& resume) {
  if (resume.empty()) return subspace::io::metrics_writer::open_mode::truncate;
  subspace::io::truncate_metrics_after(metrics, checkpoint_step(resume));
  return subspace::io::metrics_writer::open_mode::append;
}

/// --resume names a checkpoint, or a --checkpoint-dir whose latest checkpoint is taken.
inline std::filesystem::path resolve_resume(const std::filesystem::path& p) {
  if (is_checkpoint(p)) return p;
  const auto all = checkpoints_in(p);
  if (all.empty())
    throw tool_error("--resume " + p.string() + ": neither a checkpoint (no " + subspace::io::state_json_file_name +
                     ") nor a directory of step_* checkpoints");
  return all.back();
}

}  // namespace examples

#pragma once
// Directories published whole: a directory of files (a checkpoint) is built under a hidden sibling name, made
// durable, and renamed into place in one step, so that a reader finds the previous directory or the complete new
// one, never a mixture of the two, whatever kill -9 or a full disk interrupts.
//
//   atomic_write_directory(dir, fill)   one writer: fill(staging) writes the files, then they are published
//   prepare_staging(dir)                several writers (the ranks of a trainer): one prepares the empty staging
//   publish_staging(dir)                directory, every writer fills its part, then one publishes it
//
// The staging directory is <parent>/.<name>.partial. Publishing over an existing `dir` renames it aside to
// <parent>/.<name>.old, renames the staging directory to `dir`, then removes the old one (a directory cannot be
// renamed over a non-empty one). Interrupted anywhere, the parent holds `dir` complete (old or new), or no `dir`
// and a complete .<name>.old; recover_directory_writes(parent), run before anything reads the parent, renames
// such an .old back and removes every other staging and superseded directory.

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "../core/error.hpp"
#include "file.hpp"

namespace subspace::io {

namespace detail {

inline constexpr const char* staging_suffix = ".partial";
inline constexpr const char* superseded_suffix = ".old";

/// `dir` without a trailing separator; invalid_argument unless it names a directory entry.
inline std::filesystem::path entry_of(const std::filesystem::path& dir) {
  const std::filesystem::path d = dir.has_filename() ? dir : dir.parent_path();
  const std::string name = d.filename().string();
  require(!name.empty() && name != "." && name != "..",
          [&] { return "publishing a directory: " + quoted(dir) + " names no directory entry"; });
  return d;
}

inline std::filesystem::path sibling(const std::filesystem::path& dir, const char* suffix) {
  const std::filesystem::path d = entry_of(dir);
  return d.parent_path() / ("." + d.filename().string() + suffix);
}

/// fsync of a file or directory. A file's must succeed; a directory's is best effort (some filesystems refuse it).
inline void sync_entry(const std::filesystem::path& p, bool directory) {
  const int fd = ::open(p.empty() ? "." : p.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0));
  require(fd >= 0 || directory,
          [&, err = errno] { return "cannot open " + quoted(p) + " to make it durable: " + sys_reason(err); });
  if (fd < 0) return;
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  require(rc == 0 || directory, [&] { return "fsync of " + quoted(p) + " failed: " + sys_reason(err); });
}

/// Every file and directory under `root`, and `root`, on disk.
inline void sync_tree(const std::filesystem::path& root) {
  for (const auto& e : std::filesystem::recursive_directory_iterator(root))
    sync_entry(e.path(), e.is_directory() && !e.is_symlink());
  sync_entry(root, true);
}

inline void rename_entry(const std::filesystem::path& from, const std::filesystem::path& to) {
  std::error_code ec;
  std::filesystem::rename(from, to, ec);
  require(!ec, [&] { return "cannot rename " + quoted(from) + " to " + quoted(to) + ": " + ec.message(); });
}

inline void remove_tree(const std::filesystem::path& p) {
  std::error_code ec;
  std::filesystem::remove_all(p, ec);
  require(!ec, [&] { return "cannot remove " + quoted(p) + ": " + ec.message(); });
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace detail

/// Where `dir` is built before it is published: <parent>/.<name>.partial.
inline std::filesystem::path staging_directory(const std::filesystem::path& dir) {
  return detail::sibling(dir, detail::staging_suffix);
}
/// Where a published `dir` waits while its replacement is renamed in: <parent>/.<name>.old.
inline std::filesystem::path superseded_directory(const std::filesystem::path& dir) {
  return detail::sibling(dir, detail::superseded_suffix);
}

/// Creates the empty staging directory of `dir` (removing one an interrupted writer left) and returns it.
inline std::filesystem::path prepare_staging(const std::filesystem::path& dir) {
  const std::filesystem::path staging = staging_directory(dir);
  detail::remove_tree(staging);
  ensure_directory(staging);
  return staging;
}

/// Publishes the filled staging directory of `dir` as `dir` (see the top of this file).
inline void publish_staging(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const fs::path target = detail::entry_of(dir), staging = staging_directory(dir), old = superseded_directory(dir);
  require(fs::is_directory(staging),
          [&] { return "publishing " + detail::quoted(target) + ": no staging directory " + detail::quoted(staging); });
  detail::sync_tree(staging);
  // An .old from an interrupted publication: the previous `dir` when `dir` is missing, else superseded.
  if (fs::exists(old)) {
    if (fs::exists(target)) detail::remove_tree(old);
    else detail::rename_entry(old, target);
  }
  const bool replacing = fs::exists(target);
  if (replacing) detail::rename_entry(target, old);
  detail::rename_entry(staging, target);
  detail::sync_entry(target.parent_path(), true);
  if (replacing) detail::remove_tree(old);
}

/// Writes `dir` whole: fill(staging) writes the files into the staging directory, which is then published. If
/// `fill` throws, the staging directory is removed, `dir` keeps its previous content, and the exception propagates.
template <class Fill>
void atomic_write_directory(const std::filesystem::path& dir, Fill&& fill) {
  const std::filesystem::path staging = prepare_staging(dir);
  try {
    fill(staging);
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove_all(staging, ignored);
    throw;
  }
  publish_staging(dir);
}

/// Finishes or undoes the publications that kill -9 (or a full disk) interrupted in `parent`, of the directories
/// whose names `owned(name)` accepts: an .<name>.old without <name> is renamed back to <name>; every other
/// .<name>.old and every .<name>.partial is removed. Returns a line per change, for the caller to report. Only one
/// process may run it, while nobody writes there.
template <class Owned>
std::vector<std::string> recover_directory_writes(const std::filesystem::path& parent, Owned&& owned) {
  namespace fs = std::filesystem;
  std::vector<std::string> done;
  if (!fs::is_directory(parent)) return done;
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(parent))
    if (e.is_directory() && !e.is_symlink() && e.path().filename().string().rfind('.', 0) == 0)
      entries.push_back(e.path());
  for (const fs::path& p : entries) {
    const std::string name = p.filename().string();
    for (const std::string suffix : {detail::superseded_suffix, detail::staging_suffix}) {
      if (!detail::ends_with(name, suffix) || name.size() < suffix.size() + 2) continue;
      const fs::path target = parent / name.substr(1, name.size() - 1 - suffix.size());
      if (!owned(target.filename().string())) continue;
      if (suffix == detail::superseded_suffix && !fs::exists(target)) {
        detail::rename_entry(p, target);
        done.push_back("restored " + detail::quoted(target) + " (its replacement was interrupted)");
      } else {
        detail::remove_tree(p);
        done.push_back("removed " + detail::quoted(p) + " (left by an interrupted write)");
      }
    }
  }
  if (!done.empty()) detail::sync_entry(parent, true);
  return done;
}

}  // namespace subspace::io

#pragma once
// Checks every example makes on its flags before any work, so that a bad value fails at start (exit 2, naming the
// flag) and not after hours of training: numbers that must be finite or non-negative, the sampling flags (a sample
// of at most max_sample_tokens new tokens), and every path a run writes (created and probed now: a read-only or
// misspelled --checkpoint-dir fails before the first step, not at the first save).

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <system_error>

#include "cli.hpp"

namespace examples {

/// cli_error(what) unless ok.
inline void need(bool ok, const std::string& what) {
  if (!ok) throw cli_error(what);
}

/// --flag must be a finite number (the parser accepts inf and nan).
inline void need_finite(const std::string& flag, double value) {
  if (!std::isfinite(value)) throw cli_error("--" + flag + " must be a finite number, got " + std::to_string(value));
}

/// --flag must be a finite number >= 0.
inline void need_finite_non_negative(const std::string& flag, double value) {
  if (!std::isfinite(value) || value < 0)
    throw cli_error("--" + flag + " must be a finite number >= 0, got " + std::to_string(value));
}

/// The most tokens one sample may ask for: every new token runs the model over its window again (a recurrent
/// model's window is the whole text so far), so a longer sample is a typing mistake, not a request.
inline constexpr long long max_sample_tokens = 65536;

/// --flag, the new tokens of one sample, must lie in [0, max_sample_tokens].
inline void need_sample_tokens(const std::string& flag, long long tokens) {
  if (tokens < 0 || tokens > max_sample_tokens)
    throw cli_error("--" + flag + " must lie in [0, " + std::to_string(max_sample_tokens) +
                    "] (new tokens per sample), got " + std::to_string(tokens));
}

/// The sampling flags of a run that prints `samples` samples of `tokens` tokens each after training.
inline void need_sampling(double temperature, const std::string& prompt, long long samples, long long tokens) {
  need_finite_non_negative("temperature", temperature);
  need_sample_tokens("sample-tokens", tokens);
  if (samples > 0 && tokens > 0 && prompt.empty())
    throw cli_error("--prompt must not be empty (it is the text the samples continue; --samples 0 prints none)");
}

namespace detail {
/// Why the run cannot create files in `dir` (created with its parents when missing), or nothing.
inline std::string unwritable_directory(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir))
    return "cannot create the directory " + dir.string() + ": " + (ec ? ec.message() : "a file of that name exists");
  // Processes of one launch may probe one shared directory at once: a name of their own each.
  const std::filesystem::path probe =
      dir / (".write-probe." + std::to_string(::getpid()) + "." + std::to_string(std::random_device{}()));
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int err = errno;
    return "cannot write in the directory " + dir.string() + ": " + std::generic_category().message(err);
  }
  ::close(fd);
  std::filesystem::remove(probe, ec);
  return {};
}
}  // namespace detail

/// The run can create files in `dir` (created with its parents when missing).
inline void need_writable_directory(const std::string& flag, const std::filesystem::path& dir) {
  if (const std::string why = detail::unwritable_directory(dir); !why.empty())
    throw cli_error("--" + flag + " " + dir.string() + ": " + why);
}

/// The run can create or replace the file `path` (its directory created when missing).
inline void need_writable_file(const std::string& flag, const std::filesystem::path& path) {
  if (std::filesystem::is_directory(path)) throw cli_error("--" + flag + " " + path.string() + " is a directory");
  const std::filesystem::path parent = path.parent_path();
  if (const std::string why = detail::unwritable_directory(parent.empty() ? "." : parent); !why.empty())
    throw cli_error("--" + flag + " " + path.string() + ": " + why);
  if (std::filesystem::exists(path) && ::access(path.c_str(), W_OK) != 0) {
    const int err = errno;
    throw cli_error("--" + flag + " " + path.string() +
                    ": cannot write the file: " + std::generic_category().message(err));
  }
}

}  // namespace examples

#pragma once
// The default corpus of the example trainers: the King James Bible (public domain) from the Debian packages
// bible-kjv-text (the compressed text, /usr/lib/bible.data) and bible-kjv (the `bible` program that reads it).
// default_corpus_path() extracts it once into plain text, one verse per line without references (4.3 MB, 31102
// lines), under default_data_dir(), and returns that file; it names the apt-get command when the packages are
// missing. default_data_dir() is also where llama_data.hpp caches the byte-level shards of a text file.
//
// Example code, not library code: the library converts any text (data::text_to_shards); which text the examples
// train on by default, and where they cache it, is theirs to choose.

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <subspace/core/error.hpp>
#include <subspace/util/file.hpp>

#include "cli.hpp"

namespace examples {

/// Where derived data (the extracted default corpus) is kept: $SUBSPACE_DATA_DIR, else $XDG_CACHE_HOME/subspace,
/// else $HOME/.cache/subspace, else <temp>/subspace.
inline std::filesystem::path default_data_dir() {
  const auto env = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    return v ? std::string(v) : std::string();
  };
  if (const auto d = env("SUBSPACE_DATA_DIR"); !d.empty()) return d;
  if (const auto d = env("XDG_CACHE_HOME"); !d.empty()) return std::filesystem::path(d) / "subspace";
  if (const auto d = env("HOME"); !d.empty()) return std::filesystem::path(d) / ".cache" / "subspace";
  return std::filesystem::temp_directory_path() / "subspace";
}

/// The Debian packages that provide the default corpus, and where they put it.
inline constexpr const char* default_corpus_packages = "bible-kjv bible-kjv-text";
inline constexpr const char* default_corpus_data = "/usr/lib/bible.data";
inline constexpr std::uint64_t default_corpus_verses = 31102;

namespace detail {
/// The executable `name` on $PATH (then /usr/bin, /usr/games), or an empty path.
inline std::filesystem::path find_program(std::string_view name) {
  std::vector<std::filesystem::path> dirs;
  if (const char* path = std::getenv("PATH")) {
    std::string_view p(path);
    while (!p.empty()) {
      const std::size_t colon = std::min(p.find(':'), p.size());
      if (colon > 0) dirs.emplace_back(std::string(p.substr(0, colon)));
      p = p.substr(std::min(colon + 1, p.size()));
    }
  }
  dirs.emplace_back("/usr/bin");
  dirs.emplace_back("/usr/games");
  for (const auto& d : dirs) {
    const auto candidate = d / name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return {};
}
}  // namespace detail

/// The default corpus as a plain text file, extracted into cache_dir on first use; see the top of this file.
inline std::filesystem::path default_corpus_path(const std::filesystem::path& cache_dir = default_data_dir()) {
  namespace fs = std::filesystem;
  const fs::path text = cache_dir / "kjv.txt";
  if (fs::is_regular_file(text) && fs::file_size(text) > 0) return text;

  const std::string install = std::string("sudo apt-get install -y ") + default_corpus_packages;
  const fs::path program = detail::find_program("bible");
  if (program.empty() || !fs::exists(default_corpus_data))
    throw tool_error(std::string("default corpus: the King James Bible text comes from the Debian packages ") +
                     default_corpus_packages + ", which are not installed (missing " +
                     (program.empty() ? std::string("the `bible` program") : std::string(default_corpus_data)) +
                     "). Install them with: " + install + " (or name your own text file)");

  // `bible -f` prints one verse per line, "Ge1:1 In the beginning ...": keep the text after the reference.
  const std::string command = "'" + program.string() + "' -f Gen1:1-Rev22:21 2>/dev/null";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) throw tool_error("default corpus: cannot run " + command);
  std::string raw;
  char buf[1 << 16];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) raw.append(buf, n);
  const int status = ::pclose(pipe);
  std::string out;
  out.reserve(raw.size());
  std::uint64_t verses = 0;
  for (std::size_t at = 0; at < raw.size();) {
    const std::size_t eol = std::min(raw.find('\n', at), raw.size());
    const std::string_view line(raw.data() + at, eol - at);
    at = eol + 1;
    const std::size_t space = line.find(' ');
    if (line.empty() || space == std::string_view::npos || line.find(':') > space) continue;
    out.append(line.substr(space + 1));
    out += '\n';
    ++verses;
  }
  if (status != 0 || verses != default_corpus_verses)
    throw tool_error("default corpus: `" + command + "` exited with status " + std::to_string(status) +
                     " and printed " + std::to_string(verses) + " verses (expected " +
                     std::to_string(default_corpus_verses) + "); reinstall with: sudo apt-get install --reinstall -y " +
                     default_corpus_packages);
  subspace::io::atomic_write_text(text, out);
  return text;
}

}  // namespace examples

#pragma once
// Plain text to token shards (byte-level), and the default corpus.
//
// text_to_shards reads text files in order, encodes them with byte_tokenizer (optionally joined by a separator)
// and writes llm.c shards "<prefix>_train_NNNNNN.bin" and "<prefix>_val_NNNNNN.bin" into a directory: the last
// val_fraction of the tokens are the validation part; each shard holds at most shard_tokens tokens. Every
// shard is written atomically.
//
// The default corpus is the King James Bible (public domain) from the Debian packages bible-kjv-text (the
// compressed text, /usr/lib/bible.data) and bible-kjv (the `bible` program that reads it). default_corpus_path()
// extracts it once into plain text, one verse per line without references (4.3 MB, 31102 lines), under
// default_data_dir(), and returns that file; it names the apt-get command when the packages are missing.

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "../core/error.hpp"
#include "../util/file.hpp"
#include "tokenizer.hpp"
#include "tokens.hpp"

namespace subspace::data {

struct text_to_shards_options {
  std::string prefix = "corpus";              // file names: <prefix>_{train,val}_NNNNNN.bin
  std::int64_t shard_tokens = 100'000'000;    // at most this many tokens per shard
  double val_fraction = 0.1;                  // the last fraction of the tokens, 0 <= f < 1
  int version = 1;                            // llm.c version: 1 (uint16 tokens) or 7 (uint32)
  std::string separator;                      // inserted between consecutive input files
};

struct shards_written {
  std::vector<std::filesystem::path> train, val;
  std::uint64_t train_tokens = 0, val_tokens = 0;
};

/// Converts text files to byte-level llm.c shards in out_dir (created when missing); see the top of this file.
inline shards_written text_to_shards(const std::vector<std::filesystem::path>& inputs,
                                     const std::filesystem::path& out_dir, const text_to_shards_options& o = {}) {
  namespace fs = std::filesystem;
  require(!inputs.empty(), "text_to_shards: no input files");
  require(o.shard_tokens >= 1,
          [&] { return "text_to_shards: shard_tokens must be >= 1, got " + std::to_string(o.shard_tokens); });
  require(o.val_fraction >= 0.0 && o.val_fraction < 1.0,
          [&] { return "text_to_shards: val_fraction " + detail::show(o.val_fraction) + " (expected 0 <= f < 1)"; });
  require(o.version == 1 || o.version == 7, [&] {
    return "text_to_shards: version " + std::to_string(o.version) + " (expected 1 for uint16 or 7 for uint32 tokens)";
  });
  require(!o.prefix.empty() && o.prefix.find('/') == std::string::npos,
          [&] { return "text_to_shards: prefix '" + o.prefix + "' must be a non-empty file-name prefix"; });

  std::vector<io::read_file> files;
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    files.emplace_back(inputs[i], "text file");
    total += files.back().size() + (i ? o.separator.size() : 0);
  }
  require(total > 0, "text_to_shards: the input files hold no text");
  const auto val_tokens = std::uint64_t(std::llround(o.val_fraction * double(total)));
  const std::uint64_t train_end = total - val_tokens;
  require(train_end > 0, [&] {
    return "text_to_shards: val_fraction " + detail::show(o.val_fraction) + " leaves no training tokens out of " +
           std::to_string(total);
  });

  shards_written out;
  out.train_tokens = train_end;
  out.val_tokens = val_tokens;
  std::vector<std::int32_t> buf;
  bool in_val = false;
  const auto flush = [&] {
    if (buf.empty()) return;
    auto& list = in_val ? out.val : out.train;
    char name[32];
    std::snprintf(name, sizeof name, "_%s_%06zu.bin", in_val ? "val" : "train", list.size());
    const fs::path path = out_dir / (o.prefix + name);
    write_llmc_tokens(path, buf, o.version);
    list.push_back(path);
    buf.clear();
  };
  std::uint64_t at = 0;
  const auto push = [&](unsigned char byte) {
    if (at == train_end) {
      flush();
      in_val = true;
    }
    buf.push_back(std::int32_t(byte));
    ++at;
    if (buf.size() == std::size_t(o.shard_tokens)) flush();
  };
  std::string chunk;
  for (std::size_t i = 0; i < files.size(); ++i) {
    if (i)
      for (const char c : o.separator) push(static_cast<unsigned char>(c));
    for (std::uint64_t off = 0; off < files[i].size();) {
      const std::size_t n = std::size_t(std::min<std::uint64_t>(std::uint64_t(1) << 20, files[i].size() - off));
      chunk.resize(n);
      files[i].read(off, chunk.data(), n);
      for (const char c : chunk) push(static_cast<unsigned char>(c));
      off += n;
    }
  }
  flush();
  return out;
}

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
  require(!program.empty() && fs::exists(default_corpus_data), [&] {
    return std::string("default corpus: the King James Bible text comes from the Debian packages ") +
           default_corpus_packages + ", which are not installed (missing " +
           (program.empty() ? std::string("the `bible` program") : std::string(default_corpus_data)) +
           "). Install them with: " + install + " (or name your own text file)";
  });

  // `bible -f` prints one verse per line, "Ge1:1 In the beginning ...": keep the text after the reference.
  const std::string command = "'" + program.string() + "' -f Gen1:1-Rev22:21 2>/dev/null";
  FILE* pipe = ::popen(command.c_str(), "r");
  require(pipe != nullptr, [&] { return "default corpus: cannot run " + command; });
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
  require(status == 0 && verses == default_corpus_verses, [&] {
    return "default corpus: `" + command + "` exited with status " + std::to_string(status) + " and printed " +
           std::to_string(verses) + " verses (expected " + std::to_string(default_corpus_verses) +
           "); reinstall with: sudo apt-get install --reinstall -y " + default_corpus_packages;
  });
  io::atomic_write_text(text, out);
  return text;
}

}  // namespace subspace::data

#pragma once
// Token sources and the datasets made of them (docs/data.md).
//
// A token_source is where tokens live: a token_file on disk, or in_memory_tokens (an owning copy of a program's
// own tokens). A token_dataset is an ordered list of segments (a source and a token range in it): several shards
// named by a list or a glob, tokens or text given in memory, and train/validation splits and per-rank shards of
// them. The batch loader (loader.hpp) reads any dataset the same way.
//
// File formats (the caller names one; nothing is guessed):
//   llm.c shard   token_format::llmc, the default. A header of 256 little-endian int32: [0] magic, [1] version,
//                 [2] token count; then the tokens. magic 20240520 + version 1: uint16 tokens; magic 20240801 +
//                 version 7: uint32 tokens. The file holds exactly 1024 + count * width bytes.
//   raw uint16    token_format::raw_u16: nanoGPT's train.bin / val.bin, little-endian uint16 tokens, no header.
// A file that does not start with an llm.c magic is an error when llm.c is asked for, never raw tokens: one
// damaged header byte must not turn a shard (header included) into a run on garbage. Files are read with
// positioned reads (pread), shared between the datasets that use them: a file truncated while a run reads it is
// an error naming the file, not a SIGBUS as a memory map would give.
//
// Bad input throws invalid_argument naming the file (or the in-memory tokens) and what was expected: a missing
// file, a bad magic or version, a truncated (or overlong) file, a negative token, a token outside the vocabulary.

#include <glob.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../util/file.hpp"
#include "tokenizer.hpp"

namespace subspace::data {

inline constexpr std::int32_t llmc_magic_u16 = 20240520;  // version 1, uint16 tokens
inline constexpr std::int32_t llmc_magic_u32 = 20240801;  // version 7, uint32 tokens
inline constexpr std::size_t llmc_header_ints = 256;
inline constexpr std::size_t llmc_header_bytes = llmc_header_ints * 4;

enum class token_format { llmc, raw_u16 };

namespace detail {
inline std::string quoted(const std::filesystem::path& p) { return "'" + p.string() + "'"; }
/// The shortest decimal form of x, for messages.
inline std::string show(double x) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, x);
  return std::string(buf, r.ptr);
}
inline std::int32_t load_i32(const std::byte* p) {
  std::uint32_t u = 0;
  for (int i = 3; i >= 0; --i) u = (u << 8) | std::uint32_t(p[i]);
  return std::int32_t(u);
}
}  // namespace detail

/// Where a dataset's tokens live. The batch loader reads ranges through read(), which checks every token against
/// the model's vocabulary.
class token_source {
 public:
  virtual ~token_source() = default;
  /// Number of tokens.
  virtual std::uint64_t size() const = 0;
  /// Copies tokens [begin, begin + n) into out; invalid_argument naming the source and position for a token
  /// that is not below `vocab`.
  virtual void read(std::uint64_t begin, std::size_t n, std::int32_t* out, std::int64_t vocab) const = 0;
  /// Throws for the first token in [begin, min(end, size())) that is not below `vocab`.
  virtual void check_vocab(std::int64_t vocab, std::uint64_t begin, std::uint64_t end) const = 0;
  /// "'path'" for a file, "in-memory tokens 'name'" for tokens in memory: names the source in messages.
  virtual std::string name() const = 0;
  /// "llm.c version 1 (uint16 tokens)", "raw uint16 (headerless)" or "in memory": for the examples' data: line.
  virtual std::string format() const = 0;

 protected:
  /// The source at the start of an error message: "token file 'a.bin'", "in-memory tokens 'name'".
  virtual std::string where() const { return name(); }
  void require_within(std::uint64_t begin, std::size_t n) const {
    require(begin <= size() && n <= size() - begin, [&] {
      return where() + ": tokens [" + std::to_string(begin) + ", " + std::to_string(begin + n) + ") outside its " +
             std::to_string(size()) + " tokens";
    });
  }
  [[noreturn]] void token_outside_vocab(std::uint64_t at, std::int64_t token, std::int64_t vocab) const {
    throw invalid_argument(where() + ": token " + std::to_string(token) + " at position " + std::to_string(at) +
                           " is not below the vocabulary size " + std::to_string(vocab));
  }
};

/// One token file, validated at open and read with positioned reads.
class token_file final : public token_source {
 public:
  explicit token_file(std::filesystem::path path, token_format format = token_format::llmc)
      : file_(std::move(path), "token file") {
    const std::string where = "token file " + detail::quoted(file_.path());
    const std::uint64_t size = file_.size();
    if (format == token_format::raw_u16) {
      require(size % 2 == 0, [&] {
        return where + ": " + std::to_string(size) +
               " bytes is not a whole number of uint16 tokens (raw nanoGPT .bin expected)";
      });
      width_ = 2;
      offset_ = 0;
      count_ = size / 2;
      return;
    }
    require(size >= llmc_header_bytes, [&] {
      return where + ": " + std::to_string(size) +
             " bytes is shorter than the llm.c header (1024 bytes): truncated, or not an llm.c shard?";
    });
    std::byte header[12];
    file_.read(0, header, sizeof header);
    const std::int32_t magic = detail::load_i32(header), version = detail::load_i32(header + 4),
                       count = detail::load_i32(header + 8);
    if (magic == llmc_magic_u16) {
      require(version == 1, [&] {
        return where + ": magic 20240520 (uint16 tokens) needs version 1, the header says " + std::to_string(version);
      });
      width_ = 2;
    } else if (magic == llmc_magic_u32) {
      require(version == 7, [&] {
        return where + ": magic 20240801 (uint32 tokens) needs version 7, the header says " + std::to_string(version);
      });
      width_ = 4;
    } else {
      throw invalid_argument(where + ": bad magic " + std::to_string(magic) +
                             " in the llm.c header (int32 at byte 0; expected 20240520 for uint16 tokens or 20240801 "
                             "for uint32 tokens); a headerless nanoGPT file is read only as raw uint16 when asked "
                             "for (token_format::raw_u16; the examples' --data-format raw-u16)");
    }
    version_ = version;
    require(count >= 0, [&] { return where + ": negative token count " + std::to_string(count) + " in the header"; });
    count_ = std::uint64_t(count);
    offset_ = llmc_header_bytes;
    const std::uint64_t expected = llmc_header_bytes + count_ * width_;
    require(size == expected, [&] {
      return where + ": the header says " + std::to_string(count_) + " tokens of " + std::to_string(width_) +
             " bytes (" + std::to_string(expected) + " bytes with the header), the file has " + std::to_string(size) +
             " bytes" + (size < expected ? " (truncated)" : "");
    });
  }

  const std::filesystem::path& path() const { return file_.path(); }
  /// Number of tokens.
  std::uint64_t size() const override { return count_; }
  /// Bytes per token: 2 (uint16) or 4 (uint32).
  int width() const { return width_; }
  /// The llm.c version (1 or 7), or 0 for a raw uint16 file.
  int version() const { return version_; }
  std::string name() const override { return detail::quoted(path()); }
  std::string format() const override {
    if (version_ == 0) return "raw uint16 (headerless)";
    return "llm.c version " + std::to_string(version_) + (width_ == 2 ? " (uint16 tokens)" : " (uint32 tokens)");
  }

  /// Token i.
  std::uint32_t operator[](std::uint64_t i) const {
    std::uint32_t t = 0;
    for_each_token(i, i + 1, [&](std::uint64_t, std::uint32_t v) { t = v; });
    return t;
  }

  /// Copies tokens [begin, begin + n) into out; invalid_argument naming the file and position for a token
  /// that is not below `vocab`.
  void read(std::uint64_t begin, std::size_t n, std::int32_t* out, std::int64_t vocab) const override {
    require_within(begin, n);
    for_each_token(begin, begin + n, [&](std::uint64_t i, std::uint32_t t) {
      if (std::int64_t(t) >= vocab) token_outside_vocab(i, t, vocab);
      out[i - begin] = std::int32_t(t);
    });
  }
  /// Throws for the first token in [begin, end) that is not below `vocab`.
  void check_vocab(std::int64_t vocab, std::uint64_t begin = 0, std::uint64_t end = ~std::uint64_t(0)) const override {
    end = std::min(end, count_);
    if (begin >= end) return;
    for_each_token(begin, end, [&](std::uint64_t i, std::uint32_t t) {
      if (std::int64_t(t) >= vocab) token_outside_vocab(i, t, vocab);
    });
  }

 private:
  std::string where() const override { return "token file " + detail::quoted(path()); }
  /// Calls f(i, token i) for i in [begin, end), reading the file in chunks (a stack buffer: concurrent readers of
  /// one file need no lock).
  template <class F>
  void for_each_token(std::uint64_t begin, std::uint64_t end, F&& f) const {
    constexpr std::size_t chunk_bytes = 16384;
    std::byte buf[chunk_bytes];
    const auto width = std::uint64_t(width_);
    for (std::uint64_t at = begin; at < end;) {
      const std::uint64_t n = std::min<std::uint64_t>(end - at, chunk_bytes / width);
      file_.read(offset_ + at * width, buf, std::size_t(n * width));
      for (std::uint64_t k = 0; k < n; ++k) {
        const std::byte* p = buf + k * width;
        std::uint32_t t = std::uint32_t(p[0]) | (std::uint32_t(p[1]) << 8);
        if (width == 4) t |= (std::uint32_t(p[2]) << 16) | (std::uint32_t(p[3]) << 24);
        f(at + k, t);
      }
      at += n;
    }
  }

  io::read_file file_;
  std::uint64_t offset_ = 0, count_ = 0;
  int width_ = 2, version_ = 0;
};

/// Tokens held in memory: an owning copy, checked to be non-negative at construction and against the vocabulary
/// on every read, as a file's are.
class in_memory_tokens final : public token_source {
 public:
  /// `name` identifies the tokens in messages ("in-memory tokens 'name'").
  explicit in_memory_tokens(std::vector<std::int32_t> tokens, std::string name = "tokens")
      : tokens_(std::move(tokens)), name_(std::move(name)) {
    for (std::size_t i = 0; i < tokens_.size(); ++i)
      require(tokens_[i] >= 0, [&] {
        return this->name() + ": token " + std::to_string(tokens_[i]) + " at position " + std::to_string(i) +
               " is negative (token ids are >= 0)";
      });
  }

  std::uint64_t size() const override { return tokens_.size(); }
  std::span<const std::int32_t> tokens() const { return tokens_; }
  std::string name() const override { return "in-memory tokens '" + name_ + "'"; }
  std::string format() const override { return "in memory"; }

  void read(std::uint64_t begin, std::size_t n, std::int32_t* out, std::int64_t vocab) const override {
    require_within(begin, n);
    check_vocab(vocab, begin, begin + n);
    std::copy_n(tokens_.begin() + std::ptrdiff_t(begin), n, out);
  }
  void check_vocab(std::int64_t vocab, std::uint64_t begin = 0, std::uint64_t end = ~std::uint64_t(0)) const override {
    end = std::min<std::uint64_t>(end, tokens_.size());
    for (std::uint64_t i = begin; i < end; ++i)
      if (tokens_[i] >= vocab) token_outside_vocab(i, tokens_[i], vocab);
  }

 private:
  std::vector<std::int32_t> tokens_;
  std::string name_;
};

/// Writes an llm.c shard (version 1: uint16 tokens; version 7: uint32 tokens) atomically.
inline void write_llmc_tokens(const std::filesystem::path& path, std::span<const std::int32_t> tokens,
                              int version = 1) {
  require(version == 1 || version == 7, [&] {
    return "write_llmc_tokens " + detail::quoted(path) + ": version " + std::to_string(version) +
           " (expected 1 for uint16 tokens or 7 for uint32 tokens)";
  });
  require(tokens.size() <= std::size_t(INT32_MAX), [&] {
    return "write_llmc_tokens " + detail::quoted(path) + ": " + std::to_string(tokens.size()) +
           " tokens exceed the header's int32 count";
  });
  const std::uint32_t limit = version == 1 ? 65535u : 0xffffffffu;
  for (std::size_t i = 0; i < tokens.size(); ++i)
    require(tokens[i] >= 0 && std::uint32_t(tokens[i]) <= limit, [&] {
      return "write_llmc_tokens " + detail::quoted(path) + ": token " + std::to_string(tokens[i]) + " at position " +
             std::to_string(i) + " does not fit version " + std::to_string(version) +
             (version == 1 ? " (uint16: 0..65535; use version 7 for larger vocabularies)" : " (uint32)");
    });
  std::vector<std::int32_t> header(llmc_header_ints, 0);
  header[0] = version == 1 ? llmc_magic_u16 : llmc_magic_u32;
  header[1] = version;
  header[2] = std::int32_t(tokens.size());
  io::atomic_write(path, [&](io::file_sink& out) {
    unsigned char h[llmc_header_bytes];
    for (std::size_t i = 0; i < llmc_header_ints; ++i)
      for (int b = 0; b < 4; ++b)
        h[4 * i + std::size_t(b)] = static_cast<unsigned char>(std::uint32_t(header[i]) >> (8 * b));
    out.write(h, sizeof h);
    const int width = version == 1 ? 2 : 4;
    std::vector<unsigned char> buf;
    buf.reserve(std::size_t(1) << 20);
    for (const std::int32_t t : tokens) {
      for (int b = 0; b < width; ++b) buf.push_back(static_cast<unsigned char>(std::uint32_t(t) >> (8 * b)));
      if (buf.size() >= (std::size_t(1) << 20)) {
        out.write(buf.data(), buf.size());
        buf.clear();
      }
    }
    out.write(buf.data(), buf.size());
  });
}

/// Writes a raw uint16 token file (nanoGPT .bin) atomically.
inline void write_raw_u16_tokens(const std::filesystem::path& path, std::span<const std::int32_t> tokens) {
  std::vector<unsigned char> bytes;
  bytes.reserve(tokens.size() * 2);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    require(tokens[i] >= 0 && tokens[i] <= 65535, [&] {
      return "write_raw_u16_tokens " + detail::quoted(path) + ": token " + std::to_string(tokens[i]) + " at position " +
             std::to_string(i) + " does not fit uint16 (0..65535)";
    });
    bytes.push_back(static_cast<unsigned char>(tokens[i] & 0xff));
    bytes.push_back(static_cast<unsigned char>(tokens[i] >> 8));
  }
  io::atomic_write(path, [&](io::file_sink& out) { out.write(bytes.data(), bytes.size()); });
}

/// The files named by `spec`: comma-separated entries, each a file, a glob pattern (*, ?, [...]) or a directory
/// (its *.bin files). Glob and directory matches come sorted by name. invalid_argument when an entry matches
/// nothing.
inline std::vector<std::filesystem::path> expand_paths(std::string_view spec) {
  namespace fs = std::filesystem;
  std::vector<fs::path> out;
  std::size_t start = 0;
  require(!spec.empty(), "token files: empty list (expected a file, a glob pattern or a directory)");
  while (start <= spec.size()) {
    const std::size_t comma = std::min(spec.find(',', start), spec.size());
    const std::string entry(spec.substr(start, comma - start));
    start = comma + 1;
    if (entry.empty()) continue;
    if (entry.find_first_of("*?[") != std::string::npos) {
      ::glob_t g{};
      const int rc = ::glob(entry.c_str(), 0, nullptr, &g);
      std::vector<fs::path> matches;
      if (rc == 0)
        for (std::size_t i = 0; i < g.gl_pathc; ++i) matches.emplace_back(g.gl_pathv[i]);
      ::globfree(&g);
      require(!matches.empty(), [&] { return "token files: no file matches the pattern '" + entry + "'"; });
      std::sort(matches.begin(), matches.end());
      out.insert(out.end(), matches.begin(), matches.end());
    } else if (fs::is_directory(entry)) {
      std::vector<fs::path> matches;
      for (const auto& e : fs::directory_iterator(entry))
        if (e.is_regular_file() && e.path().extension() == ".bin") matches.push_back(e.path());
      require(!matches.empty(), [&] { return "token files: directory '" + entry + "' holds no .bin file"; });
      std::sort(matches.begin(), matches.end());
      out.insert(out.end(), matches.begin(), matches.end());
    } else {
      out.emplace_back(entry);
    }
  }
  require(!out.empty(), [&] { return "token files: '" + std::string(spec) + "' names no file"; });
  return out;
}

/// A contiguous range of tokens in one source.
struct token_segment {
  std::shared_ptr<const token_source> source;
  std::uint64_t begin = 0, end = 0;
  std::uint64_t size() const { return end - begin; }
};

/// A tokenizer that turns text into tokens: byte_tokenizer (tokenizer.hpp), bpe_tokenizer (bpe_tokenizer.hpp).
template <class T>
concept text_encoder = requires(const T& tokenizer, std::string_view text) {
  { tokenizer.encode(text) } -> std::convertible_to<std::vector<std::int32_t>>;
};

/// An ordered list of token segments: the tokens of one or more files or in-memory arrays, or a part of them.
class token_dataset {
 public:
  token_dataset() = default;
  explicit token_dataset(std::vector<token_segment> segments) : segments_(std::move(segments)) {}
  /// Every token of every file, in order.
  explicit token_dataset(const std::vector<std::filesystem::path>& files, token_format format = token_format::llmc) {
    for (const auto& f : files) add(std::make_shared<const token_file>(f, format));
  }
  /// The files named by expand_paths(spec).
  static token_dataset open(std::string_view spec, token_format format = token_format::llmc) {
    return token_dataset(expand_paths(spec), format);
  }
  /// A copy of `tokens` in memory, one segment; `name` identifies it in messages.
  static token_dataset from_tokens(std::vector<std::int32_t> tokens, std::string name = "tokens") {
    require(!tokens.empty(), [&] { return "token_dataset::from_tokens: in-memory tokens '" + name + "' are empty"; });
    token_dataset out;
    out.add(std::make_shared<const in_memory_tokens>(std::move(tokens), std::move(name)));
    return out;
  }
  static token_dataset from_tokens(std::span<const std::int32_t> tokens, std::string name = "tokens") {
    return from_tokens(std::vector<std::int32_t>(tokens.begin(), tokens.end()), std::move(name));
  }
  /// The tokens of `text` (byte-level by default, or a bpe_tokenizer's) in memory, one segment.
  template <text_encoder Tokenizer = byte_tokenizer>
  static token_dataset from_text(std::string_view text, const Tokenizer& tokenizer = {}, std::string name = "text") {
    require(!text.empty(), [&] { return "token_dataset::from_text: text '" + name + "' is empty"; });
    const std::string source = "in-memory text '" + name + "'";
    if constexpr (requires { tokenizer.encode(text, std::string_view(source)); })
      return from_tokens(tokenizer.encode(text, source), std::move(name));
    else return from_tokens(tokenizer.encode(text), std::move(name));
  }

  const std::vector<token_segment>& segments() const { return segments_; }
  std::uint64_t tokens() const {
    std::uint64_t n = 0;
    for (const auto& s : segments_) n += s.size();
    return n;
  }
  bool empty() const { return tokens() == 0; }

  /// Global tokens [begin, end) of the concatenation, as a dataset.
  token_dataset slice(std::uint64_t begin, std::uint64_t end) const {
    require(begin <= end && end <= tokens(), [&] {
      return "token_dataset::slice: [" + std::to_string(begin) + ", " + std::to_string(end) + ") outside " +
             std::to_string(tokens()) + " tokens";
    });
    std::vector<token_segment> out;
    std::uint64_t at = 0;
    for (const auto& s : segments_) {
      const std::uint64_t lo = std::max(begin, at), hi = std::min(end, at + s.size());
      if (lo < hi) out.push_back({s.source, s.begin + (lo - at), s.begin + (hi - at)});
      at += s.size();
    }
    return token_dataset(std::move(out));
  }
  /// {train, validation}: the last round(val_fraction * tokens) tokens are the validation part.
  std::pair<token_dataset, token_dataset> split(double val_fraction) const {
    require(val_fraction >= 0.0 && val_fraction < 1.0, [&] {
      return "token_dataset::split: val_fraction " + detail::show(val_fraction) + " (expected 0 <= f < 1)";
    });
    const std::uint64_t n = tokens();
    const auto val = std::uint64_t(std::llround(val_fraction * double(n)));
    return {slice(0, n - val), slice(n - val, n)};
  }
  /// Rank `rank`'s part of `world` contiguous parts of (nearly) equal length: the global tokens
  /// [floor(rank·T / world), floor((rank + 1)·T / world)) of the T tokens. The parts cover every token once.
  token_dataset shard(int rank, int world) const {
    require(world >= 1, [&] { return "token_dataset::shard: world " + std::to_string(world) + " (expected >= 1)"; });
    require(rank >= 0 && rank < world, [&] {
      return "token_dataset::shard: rank " + std::to_string(rank) + " outside the world of " + std::to_string(world) +
             " (expected 0 <= rank < " + std::to_string(world) + ")";
    });
    const std::uint64_t n = tokens(), w = std::uint64_t(world);
    require(n >= w, [&] {
      return "token_dataset::shard: " + describe() + " has " + std::to_string(n) + " tokens, fewer than the " +
             std::to_string(world) + " ranks to share them";
    });
    // floor(n·r / w) without the product n·r, which could overflow
    const auto part_begin = [&](std::uint64_t r) { return n / w * r + n % w * r / w; };
    return slice(part_begin(std::uint64_t(rank)), part_begin(std::uint64_t(rank) + 1));
  }

  /// Throws for the first token not below `vocab` (scans every token).
  void check_vocab(std::int64_t vocab) const {
    for (const auto& s : segments_) s.source->check_vocab(vocab, s.begin, s.end);
  }

  /// "'a.bin'", "3 files ('a.bin' ... 'c.bin')" or "in-memory tokens 'name'", for messages.
  std::string describe() const {
    std::vector<const token_source*> sources;
    bool files = true;
    for (const auto& s : segments_) {
      if (sources.empty() || sources.back() != s.source.get()) sources.push_back(s.source.get());
      files = files && dynamic_cast<const token_file*>(s.source.get()) != nullptr;
    }
    if (sources.empty()) return "an empty token dataset";
    if (sources.size() == 1) return sources[0]->name();
    return std::to_string(sources.size()) + (files ? " files (" : " token sources (") + sources.front()->name() +
           " ... " + sources.back()->name() + ")";
  }
  /// The formats of its sources, in order of first use, joined by " and ": "llm.c version 1 (uint16 tokens)".
  std::string formats() const {
    std::string out;
    std::vector<std::string> seen;
    for (const auto& s : segments_) {
      std::string f = s.source->format();
      if (std::find(seen.begin(), seen.end(), f) != seen.end()) continue;
      out += (seen.empty() ? "" : " and ") + f;
      seen.push_back(std::move(f));
    }
    return out;
  }

 private:
  void add(std::shared_ptr<const token_source> source) {
    const std::uint64_t n = source->size();
    segments_.push_back({std::move(source), 0, n});
  }

  std::vector<token_segment> segments_;
};

}  // namespace subspace::data

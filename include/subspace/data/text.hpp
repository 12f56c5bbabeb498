#pragma once
// Plain text to token shards.
//
// text_to_shards reads text files in order, encodes them byte-level (token = byte) or with a BPE tokenizer
// (data/bpe_tokenizer.hpp; each file and the separator between files encoded on their own, as documents), and
// writes llm.c shards "<prefix>_train_NNNNNN.bin" and "<prefix>_val_NNNNNN.bin" into a directory: the last
// val_fraction of the tokens are the validation part; each shard holds at most shard_tokens tokens. Every
// shard is written atomically. With a tokenizer the files are read twice (the token count first, for the split)
// and encoded a chunk at a time, each cut after a line where the cut changes no token (bpe_tokenizer::last_cut),
// so memory stays near chunk_bytes unless a file has no such line.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../util/file.hpp"
#include "bpe_tokenizer.hpp"
#include "tokenizer.hpp"
#include "tokens.hpp"

namespace subspace::data {

struct text_to_shards_options {
  std::string prefix = "corpus";             // file names: <prefix>_{train,val}_NNNNNN.bin
  std::int64_t shard_tokens = 100'000'000;   // at most this many tokens per shard
  double val_fraction = 0.1;                 // the last fraction of the tokens, 0 <= f < 1
  int version = 1;                           // llm.c version: 1 (uint16 tokens) or 7 (uint32)
  std::string separator;                     // inserted between consecutive input files
  const bpe_tokenizer* tokenizer = nullptr;  // none: byte-level
  std::size_t chunk_bytes = 1 << 20;         // text read (and, with a tokenizer, encoded) at a time
};

struct shards_written {
  std::vector<std::filesystem::path> train, val;
  std::uint64_t train_tokens = 0, val_tokens = 0;
};

namespace detail {
/// Calls sink(tokens) with the tokens of the files in order, joined by the separator's, a chunk at a time.
template <class Sink>
void tokenize_files(const std::vector<io::read_file>& files, const text_to_shards_options& o, Sink&& sink) {
  std::vector<std::int32_t> tokens, separator;
  if (o.tokenizer) separator = o.tokenizer->encode(o.separator, "text_to_shards separator");
  else
    for (const char c : o.separator) separator.push_back(std::int32_t(static_cast<unsigned char>(c)));
  std::string text;
  for (std::size_t i = 0; i < files.size(); ++i) {
    if (i && !separator.empty()) sink(std::span<const std::int32_t>(separator));
    const std::string source = "text file '" + files[i].path().string() + "'";
    std::uint64_t encoded = 0;  // bytes of this file encoded so far
    text.clear();
    for (std::uint64_t off = 0; off < files[i].size();) {
      const std::size_t n = std::size_t(std::min<std::uint64_t>(o.chunk_bytes, files[i].size() - off));
      const std::size_t kept = text.size();
      text.resize(kept + n);
      files[i].read(off, text.data() + kept, n);
      off += n;
      tokens.clear();
      std::size_t cut = text.size();
      if (!o.tokenizer) {
        for (const char c : text) tokens.push_back(std::int32_t(static_cast<unsigned char>(c)));
      } else {
        if (off < files[i].size()) cut = o.tokenizer->last_cut(text);
        if (cut == 0) continue;  // no cut yet: read on
        o.tokenizer->encode_into(std::string_view(text).substr(0, cut), tokens,
                                 {.source = source, .offset = encoded, .continues = encoded > 0});
      }
      encoded += cut;
      text.erase(0, cut);
      sink(std::span<const std::int32_t>(tokens));
    }
  }
}
}  // namespace detail

/// Converts text files to llm.c shards in out_dir (created when missing); see the top of this file.
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
  require(o.chunk_bytes >= 1, "text_to_shards: chunk_bytes must be >= 1");
  const std::int64_t vocab = o.tokenizer ? o.tokenizer->vocab_size() : 256;
  require(o.version == 7 || vocab <= 65536, [&] {
    return "text_to_shards: the tokenizer has " + std::to_string(vocab) +
           " tokens, more than version 1's uint16 holds (expected version 7)";
  });

  std::vector<io::read_file> files;
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    files.emplace_back(inputs[i], "text file");
    total += files.back().size() + (i ? o.separator.size() : 0);
  }
  if (o.tokenizer) {  // the token count, for the split
    total = 0;
    detail::tokenize_files(files, o, [&](std::span<const std::int32_t> tokens) { total += tokens.size(); });
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
  detail::tokenize_files(files, o, [&](std::span<const std::int32_t> tokens) {
    for (const std::int32_t t : tokens) {
      if (at == train_end) {
        flush();
        in_val = true;
      }
      buf.push_back(t);
      ++at;
      if (buf.size() == std::size_t(o.shard_tokens)) flush();
    }
  });
  flush();
  return out;
}

}  // namespace subspace::data

#pragma once
// --tokenizer: how the examples turn text into tokens and tokens back into text. With a Hugging Face
// tokenizer.json (byte-level BPE, data/tokenizer_json.hpp) text is encoded and samples are decoded with it;
// without one, text is byte-level (token = byte, vocabulary 256). The model's vocabulary must hold every token
// the tokenizer makes.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <subspace/data/tokenizer.hpp>
#include <subspace/data/tokenizer_json.hpp>

#include "cli.hpp"

namespace examples {

class text_tokenizer {
 public:
  /// Byte-level.
  text_tokenizer() = default;
  /// The tokenizer.json at `path`; byte-level when `path` is empty.
  explicit text_tokenizer(const std::string& path) : path_(path) {
    if (!path.empty()) bpe_ = subspace::data::load_bpe_tokenizer(path);
  }

  bool byte_level() const { return !bpe_; }
  const subspace::data::bpe_tokenizer* bpe() const { return bpe_ ? &*bpe_ : nullptr; }
  const std::string& path() const { return path_; }
  /// The smallest model vocabulary that holds every token: 256 byte-level, else one past the largest id.
  std::int64_t vocab_size() const { return bpe_ ? bpe_->vocab_size() : subspace::data::byte_tokenizer::vocab; }
  /// "byte-level" or "BPE tokenizer.json PATH (N tokens)", for the data: line.
  std::string described() const {
    if (!bpe_) return "byte-level";
    return "BPE " + path_ + " (" + std::to_string(bpe_->vocab_size()) + " tokens)";
  }

  /// The tokens of `text`; `what` (a flag such as --prompt) names it in an error.
  std::vector<std::int32_t> encode(std::string_view text, std::string_view what) const {
    if (!bpe_) return subspace::data::byte_tokenizer{}.encode(text);
    return bpe_->encode(text, what);
  }
  /// `tokens` as text safe to print; a token the tokenizer does not have shows as U+FFFD.
  std::string printable(std::span<const std::int32_t> tokens) const {
    if (!bpe_) return subspace::data::byte_tokenizer{}.printable(tokens);
    std::string bytes;
    for (const std::int32_t t : tokens) {
      const std::string* b = bpe_->bytes_of(t);
      bytes += b ? *b : std::string("\xff");  // never UTF-8: shows as U+FFFD
    }
    return subspace::data::printable(bytes);
  }

  /// cli_error unless a model vocabulary of `vocab` (set by `flag`) holds every token.
  void check_model_vocab(std::int64_t vocab, std::string_view flag = "--vocab") const {
    if (vocab >= vocab_size()) return;
    if (!bpe_)
      throw cli_error(std::string(flag) + " " + std::to_string(vocab) +
                      ": byte-level text needs a vocabulary of at least 256");
    throw cli_error(std::string(flag) + " " + std::to_string(vocab) + ": --tokenizer " + path_ +
                    " has token ids up to " + std::to_string(vocab_size() - 1) +
                    " (expected a vocabulary of at least " + std::to_string(vocab_size()) + ")");
  }

 private:
  std::string path_;
  std::optional<subspace::data::bpe_tokenizer> bpe_;
};

}  // namespace examples

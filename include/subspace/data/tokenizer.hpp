#pragma once
// byte_tokenizer: the 256-symbol byte-level tokenizer. Token t is the byte t; every text encodes, every token
// sequence below 256 decodes (the bytes may be invalid UTF-8 — printable() makes them safe to show). Byte-level
// BPE from a Hugging Face tokenizer.json is data/bpe_tokenizer.hpp; its decoded bytes print through printable() too.

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "../core/error.hpp"

namespace subspace::data {

/// Text safe to print: valid UTF-8 passes through; invalid bytes and control characters other than newline and
/// tab become U+FFFD.
inline std::string printable(std::string_view bytes) {
  static constexpr const char* replacement = "\xEF\xBF\xBD";
  std::string out;
  std::size_t i = 0;
  const auto at = [&](std::size_t k) { return static_cast<unsigned char>(bytes[k]); };
  while (i < bytes.size()) {
    const unsigned char c = at(i);
    if (c < 0x80) {
      if ((c >= 0x20 && c != 0x7f) || c == '\n' || c == '\t') out += char(c);
      else out += replacement;
      ++i;
      continue;
    }
    // A UTF-8 sequence: lead byte with 1..3 continuation bytes, no overlong or surrogate forms.
    const int len = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xc2 && c <= 0xdf ? 2 : 0;
    bool ok = len > 0 && i + std::size_t(len) <= bytes.size();
    for (int k = 1; ok && k < len; ++k) ok = at(i + std::size_t(k)) >= 0x80 && at(i + std::size_t(k)) <= 0xbf;
    if (ok && len == 3) ok = !(c == 0xe0 && at(i + 1) < 0xa0) && !(c == 0xed && at(i + 1) > 0x9f);
    if (ok && len == 4) ok = !(c == 0xf0 && at(i + 1) < 0x90) && !(c == 0xf4 && at(i + 1) > 0x8f);
    if (!ok) {
      out += replacement;
      ++i;
      continue;
    }
    out.append(bytes.substr(i, std::size_t(len)));
    i += std::size_t(len);
  }
  return out;
}

struct byte_tokenizer {
  static constexpr std::int64_t vocab = 256;

  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> out(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) out[i] = std::int32_t(static_cast<unsigned char>(text[i]));
    return out;
  }
  /// The bytes of `tokens`; invalid_argument naming the position of a token outside [0, 256).
  std::string decode(std::span<const std::int32_t> tokens) const {
    std::string out(tokens.size(), '\0');
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      require(tokens[i] >= 0 && tokens[i] < 256, [&] {
        return "byte_tokenizer::decode: token " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
               " is not a byte (expected 0..255)";
      });
      out[i] = char(static_cast<unsigned char>(tokens[i]));
    }
    return out;
  }
  /// Text safe to print (printable above); tokens >= 256 become U+FFFD.
  std::string printable(std::span<const std::int32_t> tokens) const {
    std::string bytes(tokens.size(), '\0');
    // 0xff is never UTF-8, so a token that is no byte shows as U+FFFD, as an invalid byte does.
    for (std::size_t i = 0; i < tokens.size(); ++i)
      bytes[i] = char(tokens[i] >= 0 && tokens[i] < 256 ? static_cast<unsigned char>(tokens[i]) : 0xff);
    return data::printable(bytes);
  }
};

}  // namespace subspace::data

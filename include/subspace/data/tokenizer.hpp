#pragma once
// byte_tokenizer: the 256-symbol byte-level tokenizer. Token t is the byte t; every text encodes, every token
// sequence below 256 decodes (the bytes may be invalid UTF-8 — printable() makes them safe to show).

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "../core/error.hpp"

namespace subspace::data {

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
  /// Text safe to print: valid UTF-8 passes through; invalid bytes, tokens >= 256 and control characters other
  /// than newline and tab become U+FFFD.
  std::string printable(std::span<const std::int32_t> tokens) const {
    static constexpr const char* replacement = "\xEF\xBF\xBD";
    std::string out;
    std::size_t i = 0;
    while (i < tokens.size()) {
      const std::int32_t t = tokens[i];
      if (t < 0 || t > 255) {
        out += replacement;
        ++i;
        continue;
      }
      const auto c = static_cast<unsigned char>(t);
      if (c < 0x80) {
        if ((c >= 0x20 && c != 0x7f) || c == '\n' || c == '\t') out += char(c);
        else out += replacement;
        ++i;
        continue;
      }
      // A UTF-8 sequence: lead byte with 1..3 continuation bytes, no overlong or surrogate forms.
      const int len = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c <= 0xdf ? 2 : 0;
      bool ok = len > 0 && i + std::size_t(len) <= tokens.size();
      for (int k = 1; ok && k < len; ++k) {
        const std::int32_t u = tokens[i + std::size_t(k)];
        ok = u >= 0x80 && u <= 0xbf;
      }
      if (ok && len == 3) {
        const std::int32_t u = tokens[i + 1];
        ok = !(c == 0xe0 && u < 0xa0) && !(c == 0xed && u > 0x9f);
      }
      if (ok && len == 4) {
        const std::int32_t u = tokens[i + 1];
        ok = !(c == 0xf0 && u < 0x90) && !(c == 0xf4 && u > 0x8f);
      }
      if (!ok) {
        out += replacement;
        ++i;
        continue;
      }
      for (int k = 0; k < len; ++k) out += char(static_cast<unsigned char>(tokens[i + std::size_t(k)]));
      i += std::size_t(len);
    }
    return out;
  }
};

}  // namespace subspace::data

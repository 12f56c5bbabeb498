#pragma once
// The regex splits of byte-level BPE tokenizers, as hand-written scanners: text in, pieces out, each piece then
// encoded by BPE on its own. A general regex engine would backtrack; these scan each code point a bounded
// number of times, so the cost is linear in the text.
//
//   split_pattern::gpt2     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//                           (GPT-2, RoBERTa, GPT-NeoX: the ByteLevel pre-tokenizer's own split)
//   split_pattern::llama3   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//                           ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+   (Llama 3)
//   split_pattern::qwen2    the Llama 3 pattern with \p{N} in place of \p{N}{1,3}
//
// Letters, numbers and whitespace are the classes of detail/unicode_classes.hpp. The text must be valid UTF-8:
// anything else is invalid_argument naming the source and the byte offset (the offset of the piece in the whole
// text is passed in, so the message counts from the start of what the caller encodes).

#include <cstddef>
#include <string>
#include <string_view>

#include "../core/error.hpp"
#include "detail/unicode_classes.hpp"

namespace subspace::data {

enum class split_pattern { gpt2, llama3, qwen2 };

/// The regexes as tokenizer.json writes them (a Split pre-tokenizer's pattern.Regex), for recognising them.
inline constexpr std::string_view gpt2_split_regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view llama3_split_regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view qwen2_split_regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

namespace detail {

/// One decoded code point: its value, class and length in bytes (0 past the end of the text).
struct code_point {
  char32_t value = 0;
  char_class cls = char_class::other;
  std::size_t size = 0;
};

/// Reads UTF-8 code points of `text`, whose first byte is at byte `offset` of the caller's text `source`.
class utf8_reader {
 public:
  utf8_reader(std::string_view text, std::size_t offset, std::string_view source)
      : text_(text), offset_(offset), source_(source) {}

  std::size_t size() const { return text_.size(); }

  /// The code point starting at byte i (size 0 when i is the end); invalid_argument for invalid UTF-8.
  code_point at(std::size_t i) const {
    if (i >= text_.size()) return {};
    const auto lead = static_cast<unsigned char>(text_[i]);
    if (lead < 0x80) return {lead, classify(lead), 1};
    // Lead bytes: 2 bytes C2..DF, 3 bytes E0..EF, 4 bytes F0..F4; the second byte's range excludes overlong
    // forms (E0, F0), surrogates (ED) and code points past U+10FFFF (F4).
    const std::size_t size = lead >= 0xc2 && lead <= 0xdf   ? 2
                             : lead >= 0xe0 && lead <= 0xef ? 3
                             : lead >= 0xf0 && lead <= 0xf4 ? 4
                                                            : 0;
    if (size == 0) fail(i, "is not a UTF-8 lead byte");
    if (i + size > text_.size()) fail(i, "starts a UTF-8 sequence cut short by the end of the text");
    char32_t value = lead & (0x7f >> size);
    for (std::size_t k = 1; k < size; ++k) {
      const auto next = static_cast<unsigned char>(text_[i + k]);
      unsigned char low = 0x80, high = 0xbf;
      if (k == 1 && lead == 0xe0) low = 0xa0;
      if (k == 1 && lead == 0xed) high = 0x9f;
      if (k == 1 && lead == 0xf0) low = 0x90;
      if (k == 1 && lead == 0xf4) high = 0x8f;
      if (next < low || next > high) fail(i + k, "does not continue the UTF-8 sequence before it");
      value = (value << 6) | (next & 0x3f);
    }
    return {value, classify(value), size};
  }

 private:
  [[noreturn]] void fail(std::size_t i, const char* what) const {
    static constexpr char hex[] = "0123456789abcdef";
    const auto byte = static_cast<unsigned char>(text_[i]);
    throw invalid_argument(std::string(source_) + ": invalid UTF-8 at byte offset " + std::to_string(offset_ + i) +
                           ": byte 0x" + hex[byte >> 4] + hex[byte & 15] + " " + what);
  }

  std::string_view text_;
  std::size_t offset_;
  std::string_view source_;
};

/// Checks that text (at `offset` of `source`) is valid UTF-8; invalid_argument naming the byte offset otherwise.
inline void check_utf8(std::string_view text, std::size_t offset, std::string_view source) {
  const utf8_reader reader(text, offset, source);
  for (std::size_t i = 0; i < text.size();) i += reader.at(i).size;
}

inline bool is_ascii_letter(const code_point& c, char lower) {
  return c.value == char32_t(lower) || c.value == char32_t(lower - 'a' + 'A');
}

/// The end of 's 't 're 've 'm 'll 'd after the apostrophe at i, or i when there is none. Case-insensitive as
/// Llama 3's (?i:...) is, where U+017F LATIN SMALL LETTER LONG S folds to s.
inline std::size_t contraction_end(const utf8_reader& text, std::size_t i, bool ignore_case) {
  const auto same = [&](const code_point& c, char lower) {
    return ignore_case ? is_ascii_letter(c, lower) || (lower == 's' && c.value == 0x17f) : c.value == char32_t(lower);
  };
  const code_point first = text.at(i + 1);
  for (const char one : {'s', 't', 'm', 'd'})
    if (same(first, one)) return i + 1 + first.size;
  const code_point second = text.at(i + 1 + first.size);
  for (const char* two : {"re", "ve", "ll"})
    if (same(first, two[0]) && same(second, two[1])) return i + 1 + first.size + second.size;
  return i;
}

/// The end of the run of code points of class `cls` starting at i, at most max_count of them.
inline std::size_t run_end(const utf8_reader& text, std::size_t i, char_class cls,
                           std::size_t max_count = std::string_view::npos) {
  for (std::size_t count = 0; count < max_count; ++count) {
    const code_point c = text.at(i);
    if (c.size == 0 || c.cls != cls) break;
    i += c.size;
  }
  return i;
}

/// The whitespace run starting at i: where it ends, where its last code point starts, how many code points it
/// has, and the end of its last CR or LF (i when it has none).
struct space_run {
  std::size_t end, last, count, after_last_newline;
};
inline space_run scan_space(const utf8_reader& text, std::size_t i) {
  space_run run{i, i, 0, i};
  for (code_point c; (c = text.at(run.end)).size != 0 && c.cls == char_class::space;) {
    run.last = run.end;
    run.end += c.size;
    ++run.count;
    if (c.value == '\r' || c.value == '\n') run.after_last_newline = run.end;
  }
  return run;
}

/// \s+(?!\S)|\s+ at a whitespace run: all of it at the end of the text, else all but its last code point (left
/// to prefix what follows), else its single code point.
inline std::size_t trailing_space_end(const utf8_reader& text, const space_run& run) {
  if (run.end == text.size() || run.count < 2) return run.end;
  return run.last;
}

/// The end of the GPT-2 piece starting at i.
inline std::size_t gpt2_piece_end(const utf8_reader& text, std::size_t i) {
  const code_point c = text.at(i);
  if (c.value == '\'') {
    const std::size_t end = contraction_end(text, i, false);
    if (end != i) return end;
  }
  // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': one space may lead a run of one class.
  if (c.value == ' ') {
    const code_point next = text.at(i + 1);
    if (next.size != 0 && next.cls != char_class::space) return run_end(text, i + 1, next.cls);
  }
  if (c.cls != char_class::space) return run_end(text, i, c.cls);
  return trailing_space_end(text, scan_space(text, i));
}

/// The end of the Llama 3 (max_digits 3) or Qwen2 (max_digits 1) piece starting at i.
inline std::size_t llama3_piece_end(const utf8_reader& text, std::size_t i, std::size_t max_digits) {
  const code_point c = text.at(i);
  if (c.value == '\'') {
    const std::size_t end = contraction_end(text, i, true);
    if (end != i) return end;
  }
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (c.cls == char_class::letter) return run_end(text, i, char_class::letter);
  if (c.cls != char_class::number && c.value != '\r' && c.value != '\n' &&
      text.at(i + c.size).cls == char_class::letter)
    return run_end(text, i + c.size, char_class::letter);
  // \p{N}{1,3}
  if (c.cls == char_class::number) return run_end(text, i, char_class::number, max_digits);
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  std::size_t start = i;
  if (c.value == ' ' && text.at(i + 1).cls == char_class::other && text.at(i + 1).size != 0) start = i + 1;
  if (text.at(start).cls == char_class::other) {
    std::size_t end = run_end(text, start, char_class::other);
    while (end < text.size() && (text.at(end).value == '\r' || text.at(end).value == '\n')) ++end;
    return end;
  }
  // \s*[\r\n]+ ends at the run's last line break; then \s+(?!\S)|\s+.
  const space_run run = scan_space(text, i);
  if (run.after_last_newline != i) return run.after_last_newline;
  return trailing_space_end(text, run);
}

}  // namespace detail

/// Calls emit(piece, offset of the piece in the caller's text) for each piece of `text` under `pattern`, in
/// order; the pieces cover the text. `offset` is where `text` starts in the caller's text `source` (both for
/// error messages).
template <class Emit>
void split_pieces(std::string_view text, split_pattern pattern, std::size_t offset, std::string_view source,
                  Emit&& emit) {
  const detail::utf8_reader reader(text, offset, source);
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t end = pattern == split_pattern::gpt2     ? detail::gpt2_piece_end(reader, i)
                            : pattern == split_pattern::llama3 ? detail::llama3_piece_end(reader, i, 3)
                                                               : detail::llama3_piece_end(reader, i, 1);
    emit(text.substr(i, end - i), offset + i);
    i = end;
  }
}

}  // namespace subspace::data

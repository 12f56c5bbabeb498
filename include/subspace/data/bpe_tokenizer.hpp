#pragma once
// bpe_tokenizer: byte-level BPE as GPT-2 and Llama 3 use it, encoding as the Hugging Face tokenizers library does,
// token for token. data/tokenizer_json.hpp builds one from a tokenizer.json.
//
// Encoding a text:
//   1. Added tokens (special ones such as <|endoftext|> first, then the others in the text between them) are cut
//      out where they occur, leftmost first and the longest at one position; lstrip/rstrip widen a match over the
//      whitespace before/after it. Each becomes its own id.
//   2. The text between them is pre-tokenized by the steps of the pre-tokenizer in order, each applied to every
//      piece of the step before: a regex split (data/pretokenize.hpp) cuts a piece into pieces; a prefix space
//      (ByteLevel's add_prefix_space) puts a space before a piece that does not start with one.
//   3. Each piece is BPE-encoded on its own: its bytes are the tokens of the byte-level alphabet (byte b is the
//      one-character token of GPT-2's bytes_to_unicode(b)), then the adjacent pair of lowest merge rank is merged,
//      leftmost first, until no pair has a merge. With ignore_merges a piece that is a whole token is that token.
// Invalid UTF-8 is an invalid_argument naming the byte offset (the library's input is a Python str, always
// valid). A byte with no token in the vocabulary (a tokenizer trained without the full byte alphabet) becomes the
// unknown token when the model has one (with fuse_unk, a run of them one unknown token), and is an error naming
// the offset when it has none (the library drops it silently).
//
// Decoding concatenates the bytes of each token (a vocabulary token's characters mapped back through the
// byte-level alphabet; an added token's content as written), special tokens included, and may be invalid UTF-8
// at a cut; printable() (data/tokenizer.hpp) makes it safe to show.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "pretokenize.hpp"

namespace subspace::data {

/// A token matched in the text before pre-tokenization (tokenizer.json's added_tokens).
struct added_token {
  std::string content;
  std::int32_t id = 0;
  bool lstrip = false, rstrip = false;  // the match takes the whitespace before / after it
  bool normalized = true;               // matched in the text left between the non-normalized ones
};

/// A merge of two adjacent tokens into a third; a merge's rank is its index in bpe_spec::merges.
struct bpe_merge {
  std::int32_t left = 0, right = 0, merged = 0;
};

/// One step of a pre-tokenizer: a regex split, or a space put before a piece that does not start with one.
struct pre_tokenizer_step {
  enum class kind { split, prefix_space };
  kind what = kind::split;
  split_pattern pattern = split_pattern::gpt2;  // of a split
};

/// Everything a byte-level BPE tokenizer is; data/tokenizer_json.hpp fills one from a tokenizer.json.
struct bpe_spec {
  std::vector<std::string> tokens;                // the model's vocabulary by id, in the byte-level alphabet ("": none)
  std::vector<bpe_merge> merges;                  // by rank: merges[0] applies first
  std::vector<added_token> added;                 // ids may be inside or past the model's vocabulary
  std::vector<pre_tokenizer_step> pre_tokenizer;  // in order, each on every piece of the step before
  bool ignore_merges = false;                     // a piece that is a whole vocabulary token is that token (Llama 3)
  std::int32_t unk = -1;                          // the token of a byte without one, or -1
  bool fuse_unk = false;                          // consecutive bytes without a token become one unk
};

namespace detail {
/// GPT-2's bytes_to_unicode: the printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the others,
/// in order, for U+0100 onwards.
inline const std::array<char32_t, 256>& byte_to_unicode() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
      t[std::size_t(b)] = printable ? char32_t(b) : next++;
    }
    return t;
  }();
  return table;
}

/// The bytes a token stands for: each character mapped back through byte_to_unicode, or, when a character is
/// outside that alphabet, the token's own UTF-8 bytes (as the library's ByteLevel decoder does). `in_alphabet`
/// says which.
inline std::string token_bytes(std::string_view token, bool& in_alphabet) {
  static const std::unordered_map<char32_t, unsigned char> byte_of = [] {
    std::unordered_map<char32_t, unsigned char> m;
    for (int b = 0; b < 256; ++b) m.emplace(byte_to_unicode()[std::size_t(b)], static_cast<unsigned char>(b));
    return m;
  }();
  std::string out;
  const utf8_reader reader(token, 0, "bpe token");
  in_alphabet = false;
  for (std::size_t i = 0; i < token.size();) {
    const code_point c = reader.at(i);
    const auto b = byte_of.find(c.value);
    if (b == byte_of.end()) return std::string(token);
    out += char(b->second);
    i += c.size;
  }
  in_alphabet = true;
  return out;
}
}  // namespace detail

class bpe_tokenizer {
 public:
  bpe_tokenizer() = default;

  /// Builds the lookup tables of `spec`; invalid_argument for an id that is negative or names no token.
  explicit bpe_tokenizer(bpe_spec spec) : spec_(std::move(spec)) {
    const auto vocab = std::int64_t(spec_.tokens.size());
    const auto in_vocab = [&](std::int32_t id) {
      return id >= 0 && id < vocab && !spec_.tokens[std::size_t(id)].empty();
    };
    require(spec_.unk == -1 || in_vocab(spec_.unk), [&] {
      return "bpe_tokenizer: unknown token id " + std::to_string(spec_.unk) + " is not in the vocabulary";
    });
    id_of_byte_.fill(-1);
    for (std::size_t id = 0; id < spec_.tokens.size(); ++id) {
      if (spec_.tokens[id].empty()) continue;
      bool in_alphabet = false;
      const std::string bytes = detail::token_bytes(spec_.tokens[id], in_alphabet);
      if (in_alphabet && bytes.size() == 1) id_of_byte_[static_cast<unsigned char>(bytes[0])] = std::int32_t(id);
      if (in_alphabet && spec_.ignore_merges) id_of_bytes_.emplace(bytes, std::int32_t(id));
    }
    for (std::size_t rank = 0; rank < spec_.merges.size(); ++rank) {
      const bpe_merge& m = spec_.merges[rank];
      require(in_vocab(m.left) && in_vocab(m.right) && in_vocab(m.merged), [&] {
        return "bpe_tokenizer: merge " + std::to_string(rank) + " names a token id outside the vocabulary";
      });
      // A later duplicate of a pair replaces the earlier one, as in the library.
      merge_of_pair_[pair_key(m.left, m.right)] = {std::int32_t(rank), m.merged};
    }
    vocab_size_ = vocab;
    for (const added_token& t : spec_.added) {
      require(t.id >= 0 && !t.content.empty(), [&] {
        return "bpe_tokenizer: added token '" + t.content + "' needs a non-negative id and non-empty content";
      });
      vocab_size_ = std::max<std::int64_t>(vocab_size_, std::int64_t(t.id) + 1);
      added_by_first_byte_[t.normalized][static_cast<unsigned char>(t.content[0])].push_back(
          std::size_t(&t - spec_.added.data()));
    }
    // What each id decodes to: an added token's content, else the vocabulary token's (both through the alphabet).
    bytes_.resize(std::size_t(vocab_size_));
    has_bytes_.resize(std::size_t(vocab_size_));
    for (std::size_t id = 0; id < spec_.tokens.size(); ++id) {
      if (spec_.tokens[id].empty()) continue;
      bool in_alphabet = false;
      bytes_[id] = detail::token_bytes(spec_.tokens[id], in_alphabet);
      has_bytes_[id] = true;
    }
    for (const added_token& t : spec_.added) {
      bool in_alphabet = false;
      bytes_[std::size_t(t.id)] = detail::token_bytes(t.content, in_alphabet);
      has_bytes_[std::size_t(t.id)] = true;
    }
    // An added token that holds a line feed, or takes the whitespace before it, may span a cut after a line.
    cuts_allowed_ = std::none_of(spec_.added.begin(), spec_.added.end(), [](const added_token& t) {
      return t.lstrip || t.content.find('\n') != std::string::npos;
    });
    // Longest first, so the first match at a position is the longest one there.
    for (auto& group : added_by_first_byte_)
      for (auto& bucket : group)
        std::stable_sort(bucket.begin(), bucket.end(), [&](std::size_t a, std::size_t b) {
          return spec_.added[a].content.size() > spec_.added[b].content.size();
        });
  }

  const bpe_spec& spec() const { return spec_; }
  /// One more than the largest token id (model vocabulary and added tokens): a model needs at least this many.
  std::int64_t vocab_size() const { return vocab_size_; }

  /// The tokens of `text`; see the top of the file. `source` names the text in error messages.
  std::vector<std::int32_t> encode(std::string_view text, std::string_view source = "bpe_tokenizer::encode") const {
    std::vector<std::int32_t> out;
    encode_into(text, out, {.source = source});
    return out;
  }

  struct encode_options {
    std::string_view source = "bpe_tokenizer::encode";  // names the text in error messages
    std::size_t offset = 0;                             // where the text starts in `source`
    bool continues = false;                             // the text continues earlier text: no prefix space
  };
  /// Appends the tokens of `text` to `out`.
  void encode_into(std::string_view text, std::vector<std::int32_t>& out, const encode_options& o) const {
    // Added tokens: the non-normalized ones in the whole text, then the normalized ones between them.
    for_each_added_split(text, 0, false, [&](std::string_view gap, std::size_t gap_at, std::int32_t gap_token) {
      if (gap_token >= 0) return out.push_back(gap_token);
      for_each_added_split(gap, gap_at, true, [&](std::string_view part, std::size_t at, std::int32_t token) {
        if (token >= 0) return out.push_back(token);
        encode_segment(part, o.offset + at, o.source, o.continues && at == 0, out);
      });
    });
  }

  /// Where text may be cut for encoding in parts: the last position p > 0 right after a line feed that follows a
  /// printable ASCII character (or starts the text) and right before an ASCII letter or digit; 0 when there is
  /// none, or when an added token could span such a cut. No split pattern joins that line feed to what comes
  /// before or after it, at the end of the text or not, so encode(text[0, p)) followed by encode_into(text[p,
  /// ...), continues) equals encode(text) whatever follows.
  std::size_t last_cut(std::string_view text) const {
    if (!cuts_allowed_) return 0;
    const auto alnum = [](char c) {
      return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    };
    for (std::size_t p = text.size(); p-- > 1;)
      if (text[p - 1] == '\n' && alnum(text[p]) && (p == 1 || (text[p - 2] > ' ' && text[p - 2] < 0x7f))) return p;
    return 0;
  }

  /// The bytes of `tokens`; invalid_argument naming the position of a token this tokenizer does not have.
  std::string decode(std::span<const std::int32_t> tokens) const {
    std::string out;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const std::string* bytes = bytes_of(tokens[i]);
      require(bytes != nullptr, [&] {
        return "bpe_tokenizer::decode: token " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
               " is not in the vocabulary (" + std::to_string(vocab_size_) + " ids)";
      });
      out += *bytes;
    }
    return out;
  }

  /// The bytes of token `id`, or nullptr when it has none.
  const std::string* bytes_of(std::int32_t id) const {
    if (id < 0 || id >= vocab_size_ || !has_bytes_[std::size_t(id)]) return nullptr;
    return &bytes_[std::size_t(id)];
  }

 private:
  static std::uint64_t pair_key(std::int32_t left, std::int32_t right) {
    return (std::uint64_t(std::uint32_t(left)) << 32) | std::uint32_t(right);
  }
  static bool is_space_at(std::string_view text, std::size_t i, std::size_t& size) {
    const detail::code_point c = detail::utf8_reader(text, 0, "").at(i);
    size = c.size;
    return c.cls == detail::char_class::space;
  }

  /// Calls emit(part, offset, token) for the parts of `text` in order: token >= 0 for a match of an added token of
  /// the group (normalized or not), -1 for the text between matches.
  template <class Emit>
  void for_each_added_split(std::string_view text, std::size_t offset, bool normalized, Emit&& emit) const {
    const auto& buckets = added_by_first_byte_[normalized];
    std::size_t gap_start = 0;
    for (std::size_t i = 0; i < text.size();) {
      const added_token* match = nullptr;
      for (const std::size_t k : buckets[static_cast<unsigned char>(text[i])])
        if (text.substr(i, spec_.added[k].content.size()) == spec_.added[k].content) {
          match = &spec_.added[k];
          break;
        }
      if (!match) {
        ++i;
        continue;
      }
      std::size_t start = i, stop = i + match->content.size(), size = 0;
      if (match->lstrip)  // back over whitespace, never into the previous match
        for (std::size_t j = start; j > gap_start;) {
          std::size_t k = j - 1;
          while (k > gap_start && (static_cast<unsigned char>(text[k]) & 0xc0) == 0x80) --k;
          if (!is_space_at(text, k, size)) break;
          start = j = k;
        }
      if (match->rstrip)
        while (stop < text.size() && is_space_at(text, stop, size)) stop += size;
      if (start > gap_start) emit(text.substr(gap_start, start - gap_start), offset + gap_start, std::int32_t(-1));
      emit(text.substr(start, stop - start), offset + start, match->id);
      gap_start = i = stop;
    }
    if (gap_start < text.size()) emit(text.substr(gap_start), offset + gap_start, std::int32_t(-1));
  }

  /// Pre-tokenizes and encodes the text between added tokens.
  void encode_segment(std::string_view text, std::size_t offset, std::string_view source, bool continues,
                      std::vector<std::int32_t>& out) const {
    detail::check_utf8(text, offset, source);
    // A text that continues earlier text gets no prefix space of its own: only its first step may add one.
    const bool skip_prefix = continues && !spec_.pre_tokenizer.empty() &&
                             spec_.pre_tokenizer[0].what == pre_tokenizer_step::kind::prefix_space;
    pre_tokenize_and_encode(text, offset, source, skip_prefix ? 1 : 0, out);
  }

  void pre_tokenize_and_encode(std::string_view piece, std::size_t offset, std::string_view source, std::size_t step,
                               std::vector<std::int32_t>& out) const {
    if (step == spec_.pre_tokenizer.size()) return encode_piece(piece, offset, source, out);
    const pre_tokenizer_step& s = spec_.pre_tokenizer[step];
    if (s.what == pre_tokenizer_step::kind::split)
      return split_pieces(piece, s.pattern, offset, source, [&](std::string_view part, std::size_t at) {
        pre_tokenize_and_encode(part, at, source, step + 1, out);
      });
    if (piece.front() == ' ') return pre_tokenize_and_encode(piece, offset, source, step + 1, out);
    // Offsets count the added space (the text is valid UTF-8 by now, so they only name bytes without a token).
    const std::string spaced = " " + std::string(piece);
    pre_tokenize_and_encode(spaced, offset - 1, source, step + 1, out);
  }

  /// BPE of one piece, as the library's Word::merge_all: a heap of candidate merges by (rank, position); an entry
  /// whose pair has changed since it was pushed is skipped.
  void encode_piece(std::string_view piece, std::size_t offset, std::string_view source,
                    std::vector<std::int32_t>& out) const {
    if (spec_.ignore_merges)
      if (const auto whole = id_of_bytes_.find(std::string(piece)); whole != id_of_bytes_.end())
        return out.push_back(whole->second);
    struct symbol {
      std::int32_t id;
      std::int64_t prev, next;  // -1: none
      bool removed = false;
    };
    std::vector<symbol> symbols;
    symbols.reserve(piece.size());
    for (std::size_t i = 0; i < piece.size(); ++i) {
      std::int32_t id = id_of_byte_[static_cast<unsigned char>(piece[i])];
      if (id < 0) {
        require(spec_.unk >= 0, [&] {
          static constexpr char hex[] = "0123456789abcdef";
          const auto b = static_cast<unsigned char>(piece[i]);
          return std::string(source) + ": byte 0x" + hex[b >> 4] + hex[b & 15] + " at byte offset " +
                 std::to_string(offset + i) + " has no token in the vocabulary and the model has no unk_token";
        });
        if (spec_.fuse_unk && i > 0 && id_of_byte_[static_cast<unsigned char>(piece[i - 1])] < 0) continue;
        id = spec_.unk;
      }
      symbols.push_back({id, std::int64_t(symbols.size()) - 1, std::int64_t(symbols.size()) + 1});
    }
    if (!symbols.empty()) symbols.back().next = -1;
    struct candidate {
      std::int32_t rank;
      std::int64_t pos;
      std::int32_t merged;
      bool operator>(const candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<candidate, std::vector<candidate>, std::greater<>> queue;
    const auto push = [&](std::int64_t pos) {
      const std::int64_t next = symbols[std::size_t(pos)].next;
      if (next < 0) return;
      const auto m = merge_of_pair_.find(pair_key(symbols[std::size_t(pos)].id, symbols[std::size_t(next)].id));
      if (m != merge_of_pair_.end()) queue.push({m->second.first, pos, m->second.second});
    };
    for (std::size_t i = 0; i + 1 < symbols.size(); ++i) push(std::int64_t(i));
    while (!queue.empty()) {
      const candidate top = queue.top();
      queue.pop();
      symbol& left = symbols[std::size_t(top.pos)];
      if (left.removed || left.next < 0) continue;
      symbol& right = symbols[std::size_t(left.next)];
      const auto m = merge_of_pair_.find(pair_key(left.id, right.id));
      if (m == merge_of_pair_.end() || m->second.second != top.merged) continue;
      left.id = top.merged;
      right.removed = true;
      left.next = right.next;
      if (right.next >= 0) symbols[std::size_t(right.next)].prev = top.pos;
      if (left.prev >= 0) push(left.prev);
      push(top.pos);
    }
    for (const symbol& s : symbols)
      if (!s.removed) out.push_back(s.id);
  }

  bpe_spec spec_;
  std::vector<std::string> bytes_;                             // token id -> the bytes it stands for
  std::vector<bool> has_bytes_;                                // token id -> whether it is a token at all
  std::array<std::int32_t, 256> id_of_byte_{};                 // byte -> its one-character token, or -1
  std::unordered_map<std::string, std::int32_t> id_of_bytes_;  // with ignore_merges: bytes -> whole token
  std::unordered_map<std::uint64_t, std::pair<std::int32_t, std::int32_t>> merge_of_pair_;  // -> {rank, merged}
  std::array<std::array<std::vector<std::size_t>, 256>, 2> added_by_first_byte_;            // [normalized][first byte]
  std::int64_t vocab_size_ = 0;
  bool cuts_allowed_ = true;
};

}  // namespace subspace::data

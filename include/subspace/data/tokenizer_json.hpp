#pragma once
// Reads a Hugging Face tokenizer.json of a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2 and their kin) into a
// bpe_tokenizer (data/bpe_tokenizer.hpp), which encodes as the tokenizers library does.
//
// What is read (docs/formats.md, "tokenizer.json"):
//   model           type "BPE": vocab (token -> id), merges ("left right" strings or [left, right] pairs, by rank),
//                   unk_token, fuse_unk, ignore_merges; dropout null, no continuing_subword_prefix or
//                   end_of_word_suffix, byte_fallback false
//   added_tokens    id, content, lstrip, rstrip, normalized (single_word false)
//   normalizer      null (nothing rewrites the text before byte-level BPE)
//   pre_tokenizer   ByteLevel (add_prefix_space, use_regex: GPT-2's split), or a Sequence of Split pre-tokenizers
//                   with a known regex (GPT-2's, Llama 3's, Qwen2's; behavior Isolated, not inverted) ending in one
//                   ByteLevel
// decoder, post_processor, truncation and padding are not read: decoding is the byte-level alphabet's, and
// encode() gives the text's tokens without a post-processor's template (no BOS), as encode(text,
// add_special_tokens=False) does. Anything else is an invalid_argument naming the file, the field and what was
// expected.

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../util/file.hpp"
#include "../util/json.hpp"
#include "bpe_tokenizer.hpp"

namespace subspace::data {

namespace detail::tokenizer_json {

/// A JSON value for a message, cut to a readable length.
inline std::string brief(const io::json& j) {
  std::string s = j.dump();
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

class reader {
 public:
  explicit reader(std::string_view source) : source_(source) {}

  /// `path` (a field path such as model.merges[3]) as the start of a message.
  std::string field(std::string_view path) const { return std::string(source_) + ": \"" + std::string(path) + "\""; }

  void expect(bool ok, std::string_view path, const io::json& got, std::string_view expected) const {
    require(ok, [&] { return field(path) + " is " + brief(got) + " (expected " + std::string(expected) + ")"; });
  }
  /// An optional boolean member (absent or null: `fallback`).
  bool boolean(const io::json& parent, std::string_view parent_path, std::string_view key, bool fallback) const {
    const io::json* v = parent.find(key);
    if (!v || v->is_null()) return fallback;
    expect(v->is_bool(), join(parent_path, key), *v, "true or false");
    return v->as_bool();
  }
  /// A member that must be absent, null, or `allowed`.
  void absent_or(const io::json& parent, std::string_view parent_path, std::string_view key, const io::json& allowed,
                 std::string_view why) const {
    const io::json* v = parent.find(key);
    if (!v || v->is_null() || *v == allowed) return;
    expect(false, join(parent_path, key), *v, "null or " + allowed.dump() + ": " + std::string(why));
  }
  /// A token id: an integer in [0, 2^31).
  std::int32_t id(const io::json& v, std::string_view path) const {
    expect(v.is_int() && v.as_int() >= 0 && v.as_int() <= 0x7fffffff, path, v, "a token id, 0 <= id < 2^31");
    return std::int32_t(v.as_int());
  }
  static std::string join(std::string_view parent, std::string_view key) {
    return parent.empty() ? std::string(key) : std::string(parent) + "." + std::string(key);
  }
  static std::string index(std::string_view parent, std::size_t i) {
    return std::string(parent) + "[" + std::to_string(i) + "]";
  }

  void model(const io::json& doc, bpe_spec& spec) const {
    const io::json* m = doc.find("model");
    expect(m && m->is_object(), "model", m ? *m : io::json(), "an object");
    if (const io::json* type = m->find("type"))
      expect(type->is_string() && type->as_string() == "BPE", "model.type", *type, "\"BPE\"");
    absent_or(*m, "model", "dropout", 0.0, "dropout makes encoding random");
    absent_or(*m, "model", "continuing_subword_prefix", "", "byte-level BPE marks no word continuation");
    absent_or(*m, "model", "end_of_word_suffix", "", "byte-level BPE marks no word end");
    require(!boolean(*m, "model", "byte_fallback", false),
            [&] { return field("model.byte_fallback") + " is true (expected false: byte-level BPE has every byte)"; });
    spec.ignore_merges = boolean(*m, "model", "ignore_merges", false);
    spec.fuse_unk = boolean(*m, "model", "fuse_unk", false);

    const io::json* vocab = m->find("vocab");
    expect(vocab && vocab->is_object(), "model.vocab", vocab ? *vocab : io::json(), "an object of token: id");
    std::unordered_map<std::string_view, std::int32_t> id_of;
    id_of.reserve(vocab->size());
    for (const auto& [token, value] : vocab->as_object()) {
      const std::int32_t id = this->id(value, "model.vocab." + token);
      require(!token.empty(),
              [&] { return field("model.vocab") + " has an empty token (id " + std::to_string(id) + ")"; });
      if (std::size_t(id) >= spec.tokens.size()) spec.tokens.resize(std::size_t(id) + 1);
      require(spec.tokens[std::size_t(id)].empty(), [&] {
        return field("model.vocab") + ": tokens " + io::json(spec.tokens[std::size_t(id)]).dump() + " and " +
               io::json(token).dump() + " have the same id " + std::to_string(id) + " (expected one token per id)";
      });
      spec.tokens[std::size_t(id)] = token;
      id_of.emplace(token, id);
    }

    const io::json* unk = m->find("unk_token");
    if (unk && !unk->is_null()) {
      expect(unk->is_string() && id_of.count(unk->as_string()), "model.unk_token", *unk,
             "null or a token of model.vocab");
      spec.unk = id_of.at(unk->as_string());
    }

    const io::json* merges = m->find("merges");
    expect(merges && merges->is_array(), "model.merges", merges ? *merges : io::json(),
           "an array of \"left right\" strings or [left, right] pairs");
    spec.merges.reserve(merges->size());
    for (std::size_t rank = 0; rank < merges->size(); ++rank) {
      const io::json& merge = merges->as_array()[rank];
      std::string_view left, right;
      if (merge.is_string()) {
        const std::string& s = merge.as_string();
        const std::size_t space = s.find(' ');
        expect(space != std::string::npos && space > 0 && space + 1 < s.size() && s.find(' ', space + 1) == s.npos,
               index("model.merges", rank), merge, "\"left right\": two tokens and one space");
        left = std::string_view(s).substr(0, space);
        right = std::string_view(s).substr(space + 1);
      } else {
        expect(merge.is_array() && merge.size() == 2 && merge.at(0).is_string() && merge.at(1).is_string(),
               index("model.merges", rank), merge, "a \"left right\" string or a [left, right] pair of strings");
        left = merge.at(0).as_string();
        right = merge.at(1).as_string();
      }
      const auto token = [&](std::string_view t) {
        const auto found = id_of.find(t);
        require(found != id_of.end(), [&] {
          return field(index("model.merges", rank)) + " is " + brief(merge) + ": " + io::json(t).dump() +
                 " is not a token of model.vocab";
        });
        return found->second;
      };
      spec.merges.push_back({token(left), token(right), token(std::string(left) + std::string(right))});
    }
  }

  void added_tokens(const io::json& doc, bpe_spec& spec) const {
    const io::json* added = doc.find("added_tokens");
    if (!added || added->is_null()) return;
    expect(added->is_array(), "added_tokens", *added, "an array of objects");
    for (std::size_t i = 0; i < added->size(); ++i) {
      const io::json& t = added->as_array()[i];
      const std::string path = index("added_tokens", i);
      expect(t.is_object(), path, t, "an object with id and content");
      const io::json* content = t.find("content");
      expect(content && content->is_string() && !content->as_string().empty(), join(path, "content"),
             content ? *content : io::json(), "a non-empty string");
      const io::json* id = t.find("id");
      require(id != nullptr, [&] { return field(join(path, "id")) + " is missing (expected a token id)"; });
      require(!boolean(t, path, "single_word", false), [&] {
        return field(join(path, "single_word")) + " is true (expected false: whole-word matching is not supported)";
      });
      const bool special = boolean(t, path, "special", false);
      spec.added.push_back({content->as_string(), this->id(*id, join(path, "id")), boolean(t, path, "lstrip", false),
                            boolean(t, path, "rstrip", false), boolean(t, path, "normalized", !special)});
    }
  }

  /// One pre-tokenizer (ByteLevel or Split) into steps; `last` says whether it must be, and is, the ByteLevel.
  void pre_tokenizer_part(const io::json& p, const std::string& path, bool last, bpe_spec& spec) const {
    expect(p.is_object() && p.find("type") && p.at("type").is_string(), path, p, "an object with a \"type\"");
    const std::string& type = p.at("type").as_string();
    if (type == "ByteLevel") {
      expect(last, join(path, "type"), p.at("type"),
             "\"Split\": ByteLevel maps bytes to its alphabet, so it comes last");
      if (boolean(p, path, "add_prefix_space", true))
        spec.pre_tokenizer.push_back({pre_tokenizer_step::kind::prefix_space, split_pattern::gpt2});
      if (boolean(p, path, "use_regex", true))
        spec.pre_tokenizer.push_back({pre_tokenizer_step::kind::split, split_pattern::gpt2});
      return;
    }
    expect(type == "Split" && !last, join(path, "type"), p.at("type"),
           last ? "\"ByteLevel\" last: the tokenizer must be byte-level" : "\"Split\" or \"ByteLevel\"");
    const io::json* pattern = p.find("pattern");
    const io::json* regex = pattern ? pattern->find("Regex") : nullptr;
    const std::string pattern_path = join(path, "pattern.Regex");
    const std::string expected = "one of the known splits: GPT-2's, Llama 3's or Qwen2's regex";
    expect(regex && regex->is_string(), pattern_path, regex ? *regex : io::json(), expected);
    const std::string& r = regex->as_string();
    const split_pattern known = r == gpt2_split_regex     ? split_pattern::gpt2
                                : r == llama3_split_regex ? split_pattern::llama3
                                                          : split_pattern::qwen2;
    expect(known != split_pattern::qwen2 || r == qwen2_split_regex, pattern_path, *regex, expected);
    const io::json* behavior = p.find("behavior");
    expect(behavior && behavior->is_string() && behavior->as_string() == "Isolated", join(path, "behavior"),
           behavior ? *behavior : io::json(), "\"Isolated\"");
    require(!boolean(p, path, "invert", false),
            [&] { return field(join(path, "invert")) + " is true (expected false: the matches are the pieces)"; });
    spec.pre_tokenizer.push_back({pre_tokenizer_step::kind::split, known});
  }

  void pre_tokenizer(const io::json& doc, bpe_spec& spec) const {
    const io::json* p = doc.find("pre_tokenizer");
    const std::string byte_level = "a ByteLevel pre-tokenizer, alone or last in a Sequence";
    expect(p && p->is_object(), "pre_tokenizer", p ? *p : io::json(), byte_level);
    const io::json* type = p->find("type");
    if (type && type->is_string() && type->as_string() == "Sequence") {
      const io::json* parts = p->find("pretokenizers");
      expect(parts && parts->is_array() && parts->size() > 0, "pre_tokenizer.pretokenizers",
             parts ? *parts : io::json(), byte_level);
      for (std::size_t i = 0; i < parts->size(); ++i)
        pre_tokenizer_part(parts->as_array()[i], index("pre_tokenizer.pretokenizers", i), i + 1 == parts->size(), spec);
      return;
    }
    pre_tokenizer_part(*p, "pre_tokenizer", true, spec);
  }

 private:
  std::string_view source_;
};

}  // namespace detail::tokenizer_json

/// The tokenizer a parsed tokenizer.json describes; `source` (the file) names it in error messages.
inline bpe_tokenizer bpe_tokenizer_from_json(const io::json& doc, std::string_view source) {
  const detail::tokenizer_json::reader r(source);
  r.expect(doc.is_object(), "(document)", doc, "a JSON object");
  const io::json* normalizer = doc.find("normalizer");
  r.expect(!normalizer || normalizer->is_null(), "normalizer", normalizer ? *normalizer : io::json(),
           "null: byte-level BPE reads the text as it is");
  bpe_spec spec;
  r.model(doc, spec);
  r.added_tokens(doc, spec);
  r.pre_tokenizer(doc, spec);
  return bpe_tokenizer(std::move(spec));
}

/// Reads a tokenizer.json file; see the top of the file.
inline bpe_tokenizer load_bpe_tokenizer(const std::filesystem::path& path) {
  const std::string source = "tokenizer '" + path.string() + "'";
  return bpe_tokenizer_from_json(io::json::parse(io::read_text(path, "tokenizer.json"), source), source);
}

}  // namespace subspace::data

// data/bpe_tokenizer.hpp and data/tokenizer_json.hpp: byte-level BPE from a Hugging Face tokenizer.json encodes
// as the tokenizers library does, token for token. tests/data/bpe/ holds three small tokenizers trained on Genesis
// by make_tokenizers.py (GPT-2's split; Llama 3's with ignore_merges; Qwen2's with a prefix space per piece and
// the older merge strings) and encodings.json, what the library made of each test text.
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <subspace/data/bpe_tokenizer.hpp>
#include <subspace/data/text.hpp>
#include <subspace/data/tokenizer.hpp>
#include <subspace/data/tokenizer_json.hpp>
#include <subspace/data/tokens.hpp>
#include <subspace/util/file.hpp>
#include <subspace/util/json.hpp>

#include "support/files.hpp"
#include "support/scratch_dir.hpp"

using namespace subspace;
namespace fs = std::filesystem;

namespace {

const fs::path bpe_dir = fs::path(SUBSPACE_TEST_DATA_DIR) / "bpe";
const char* const tokenizer_files[] = {"gpt2_style.json", "llama3_style.json", "qwen2_style.json"};

using testing::has;

std::vector<std::int32_t> ids_of(const io::json& array) {
  std::vector<std::int32_t> ids;
  for (const io::json& id : array.as_array()) ids.push_back(std::int32_t(id.as_int()));
  return ids;
}

/// The tokenizer.json of `name` with `edit` applied, parsed as `source`.
template <class Edit>
data::bpe_tokenizer edited(const char* name, Edit&& edit) {
  io::json doc = io::json::parse(io::read_text(bpe_dir / name));
  edit(doc);
  return data::bpe_tokenizer_from_json(doc, "edited.json");
}
io::json& member(io::json& parent, const std::string& key) {
  for (auto& m : parent.as_object())
    if (m.first == key) return m.second;
  return parent.set(key, nullptr);
}

}  // namespace

TEST_CASE("bpe_tokenizer encodes every test text as the tokenizers library does, and decodes as it does") {
  const io::json expected = io::json::parse(io::read_text(bpe_dir / "encodings.json"));
  for (const char* name : tokenizer_files) {
    const data::bpe_tokenizer tok = data::load_bpe_tokenizer(bpe_dir / name);
    const auto& cases = expected.at(name).as_array();
    REQUIRE(cases.size() >= 20);
    for (const io::json& c : cases) {
      const std::string& text = c.at("text").as_string();
      const std::vector<std::int32_t> want = ids_of(c.at("ids"));
      CAPTURE(name);
      CAPTURE(text);
      CHECK(tok.encode(text) == want);
      CHECK(tok.decode(want) == c.at("decoded").as_string());
    }
  }
}

TEST_CASE("bpe_tokenizer: decode gives back the text when nothing is stripped or added, and the vocabulary size") {
  const data::bpe_tokenizer gpt2 = data::load_bpe_tokenizer(bpe_dir / "gpt2_style.json");
  CHECK(gpt2.vocab_size() == 1001);  // 1000 trained tokens and <sep>
  const std::string text = "Genèse 1:1 — « Au commencement » 起初 😀\n\n  don't\r\n\t123456";
  CHECK(gpt2.decode(gpt2.encode(text)) == text);
  CHECK(gpt2.encode("<|endoftext|>") == std::vector<std::int32_t>{0});
  CHECK_THROWS_WITH_AS(gpt2.decode(std::vector<std::int32_t>{5, 1001}), has("token 1001 at position 1"),
                       invalid_argument);
  // Samples print through printable(): a token cut inside a character shows U+FFFD, not broken bytes.
  const std::vector<std::int32_t> smile = gpt2.encode("😀");
  REQUIRE(smile.size() > 1);
  CHECK(data::printable(gpt2.decode(std::vector<std::int32_t>(smile.begin(), smile.end() - 1))).find("\xEF\xBF\xBD") !=
        std::string::npos);
}

TEST_CASE("bpe_tokenizer: invalid UTF-8 is an error naming the byte offset") {
  const data::bpe_tokenizer llama3 = data::load_bpe_tokenizer(bpe_dir / "llama3_style.json");
  CHECK_THROWS_WITH_AS(llama3.encode("abc \xff def"), has("invalid UTF-8 at byte offset 4: byte 0xff"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(llama3.encode("ok\xc3"), has("byte offset 2: byte 0xc3 starts a UTF-8 sequence cut short"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(llama3.encode("x\xed\xa0\x80"), has("byte offset 2: byte 0xa0 does not continue"),
                       invalid_argument);  // a surrogate
  CHECK_THROWS_WITH_AS(llama3.encode("<|end_of_text|>ab\xc0\xaf", "prompt"),
                       has("prompt: invalid UTF-8 at byte offset 17: byte 0xc0 is not a UTF-8 lead byte"),
                       invalid_argument);  // an overlong form, after an added token
}

TEST_CASE("bpe_tokenizer: pre-tokenization is linear on long runs") {
  // A regex engine that backtracks is quadratic on a long run of spaces before a letter; BPE of one long piece
  // uses a heap, not a rescan per merge.
  const data::bpe_tokenizer gpt2 = data::load_bpe_tokenizer(bpe_dir / "gpt2_style.json");
  const std::string spaces(1 << 20, ' ');
  const std::vector<std::int32_t> tokens = gpt2.encode(spaces + "x" + std::string(1 << 20, 'a'));
  CHECK(gpt2.decode(tokens).size() == (std::size_t(2) << 20) + 1);
}

TEST_CASE("tokenizer.json: a bad file is one error naming the file and the field") {
  CHECK_THROWS_WITH_AS(data::load_bpe_tokenizer(bpe_dir / "missing.json"), has("missing.json"), invalid_argument);
  const auto bad = [](auto edit, const std::string& message) {
    CHECK_THROWS_WITH_AS(edited("gpt2_style.json", edit), has("edited.json: " + message), invalid_argument);
  };
  bad([](io::json& d) { member(d, "normalizer") = io::json::object({{"type", "NFC"}}); },
      "\"normalizer\" is {\"type\":\"NFC\"} (expected null");
  bad([](io::json& d) { member(member(d, "model"), "type") = "WordPiece"; }, "\"model.type\" is \"WordPiece\"");
  bad([](io::json& d) { member(member(d, "model"), "dropout") = 0.1; }, "\"model.dropout\" is 0.1 (expected null");
  bad([](io::json& d) { member(member(d, "model"), "byte_fallback") = true; }, "\"model.byte_fallback\" is true");
  bad([](io::json& d) { member(member(d, "model"), "merges").as_array()[3] = "nosuch token"; },
      "\"model.merges[3]\" is \"nosuch token\": \"nosuch\" is not a token of model.vocab");
  bad([](io::json& d) { member(member(d, "model"), "merges").as_array()[0] = "a b c"; },
      "\"model.merges[0]\" is \"a b c\" (expected \"left right\"");
  bad([](io::json& d) { member(member(member(d, "model"), "vocab"), "!") = -1; },
      "\"model.vocab.!\" is -1 (expected a token id");
  bad([](io::json& d) { member(member(member(d, "model"), "vocab"), "!") = 2; },
      "\"model.vocab\": tokens \"!\" and \"\\\"\" have the same id 2 (expected one token per id)");
  bad([](io::json& d) { member(member(d, "model"), "unk_token") = "<nope>"; }, "\"model.unk_token\" is \"<nope>\"");
  bad([](io::json& d) { member(d.as_object()[3].second.as_array()[0], "single_word") = true; },
      "\"added_tokens[0].single_word\" is true");
  bad([](io::json& d) { member(member(d, "pre_tokenizer"), "type") = "Whitespace"; },
      "\"pre_tokenizer.type\" is \"Whitespace\" (expected \"ByteLevel\" last");
  bad([](io::json& d) { member(d, "pre_tokenizer") = nullptr; }, "\"pre_tokenizer\" is null (expected a ByteLevel");
  const auto bad_llama3 = [](auto edit, const std::string& message) {
    CHECK_THROWS_WITH_AS(edited("llama3_style.json", edit), has("edited.json: " + message), invalid_argument);
  };
  bad_llama3(
      [](io::json& d) {
        member(member(member(d, "pre_tokenizer"), "pretokenizers").as_array()[0], "pattern") =
            io::json::object({{"Regex", "\\s+"}});
      },
      "\"pre_tokenizer.pretokenizers[0].pattern.Regex\" is \"\\\\s+\" (expected one of the known splits");
  bad_llama3(
      [](io::json& d) {
        auto& parts = member(member(d, "pre_tokenizer"), "pretokenizers").as_array();
        std::swap(parts[0], parts[1]);
      },
      "\"pre_tokenizer.pretokenizers[0].type\" is \"ByteLevel\" (expected \"Split\"");
}

TEST_CASE("bpe_tokenizer: a byte without a token is the unknown token, or an error naming the offset") {
  // Drop the token of byte 'z' (and the merges that use it).
  const auto without_z = [](io::json& d) {
    auto& vocab = member(member(d, "model"), "vocab").as_object();
    std::erase_if(vocab, [](const io::json::member& m) { return m.first.find('z') != std::string::npos; });
    auto& merges = member(member(d, "model"), "merges").as_array();
    std::erase_if(merges, [](const io::json& m) {
      return m.at(0).as_string().find('z') != std::string::npos || m.at(1).as_string().find('z') != std::string::npos;
    });
  };
  const data::bpe_tokenizer no_unk = edited("gpt2_style.json", without_z);
  CHECK_THROWS_WITH_AS(no_unk.encode("a zoo"),
                       has("byte 0x7a at byte offset 2 has no token in the vocabulary and the model has no unk_token"),
                       invalid_argument);
  const data::bpe_tokenizer with_unk = edited("gpt2_style.json", [&](io::json& d) {
    without_z(d);
    member(member(d, "model"), "unk_token") = "<|endoftext|>";
    member(member(d, "model"), "fuse_unk") = true;
  });
  const std::vector<std::int32_t> tokens = with_unk.encode("zzz");
  CHECK(tokens == std::vector<std::int32_t>{0});
}

TEST_CASE("text_to_shards with a tokenizer: the tokens of each file, cut into chunks between lines") {
  const data::bpe_tokenizer tok = data::load_bpe_tokenizer(bpe_dir / "llama3_style.json");
  const fs::path genesis = fs::path(SUBSPACE_TEST_DATA_DIR) / "kjv_genesis.txt";
  const std::vector<std::int32_t> whole = tok.encode(io::read_text(genesis));
  testing::scratch_dir dir;
  data::text_to_shards_options o;
  o.tokenizer = &tok;
  o.val_fraction = 0.25;
  o.chunk_bytes = 4096;  // many chunks, each cut after a line
  o.shard_tokens = 10000;
  const data::shards_written written = data::text_to_shards({genesis}, dir.path, o);
  CHECK(written.train_tokens + written.val_tokens == whole.size());
  std::vector<std::int32_t> read;
  for (const auto* list : {&written.train, &written.val})
    for (const fs::path& p : *list) {
      const data::token_file f(p);
      std::vector<std::int32_t> part(f.size());
      f.read(0, part.size(), part.data(), tok.vocab_size());
      read.insert(read.end(), part.begin(), part.end());
    }
  CHECK(read == whole);
  CHECK(written.val_tokens == std::uint64_t(std::llround(0.25 * double(whole.size()))));
}

// text_to_shards: converts plain text files into llm.c token shards for the trainers.
//
//   text_to_shards                                   # the default corpus (King James Bible) into ./shards
//   text_to_shards --input a.txt,b.txt --out data/mine --prefix mine --val-fraction 0.05
//   text_to_shards --tokenizer tokenizer.json        # BPE tokens of a Hugging Face tokenizer
//
// Writes <out>/<prefix>_train_NNNNNN.bin and <out>/<prefix>_val_NNNNNN.bin (the last --val-fraction of the
// tokens), each at most --shard-tokens tokens, every file atomically. Tokens are bytes (vocabulary 256), or those
// of --tokenizer (each input file and the separator encoded on their own).
#include <subspace/data/text.hpp>
#include <subspace/data/tokens.hpp>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/default_corpus.hpp"
#include "common/text_tokenizer.hpp"

namespace {

/// "\n", "\t" and "\\" escapes in a flag value (so a separator can be a blank line).
std::string unescape(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      const char e = s[++i];
      out += e == 'n' ? '\n' : e == 't' ? '\t' : e;
    } else {
      out += s[i];
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string input, out = "shards", prefix, separator, tokenizer;
  std::int64_t shard_tokens = 100'000'000;
  double val_fraction = 0.1;
  int version = 0;
  examples::cli cli("text_to_shards",
                    "Converts plain text files into llm.c token shards, byte-level (vocabulary 256) or with a Hugging "
                    "Face tokenizer.json: <out>/<prefix>_train_NNNNNN.bin and <out>/<prefix>_val_NNNNNN.bin.");
  cli.flag("input", input,
           "comma-separated text files, in order (empty: the default corpus, the King James Bible from the Debian "
           "packages bible-kjv and bible-kjv-text)")
      .flag("out", out, "output directory (created when missing)")
      .flag("prefix", prefix, "shard file-name prefix (empty: 'kjv' for the default corpus, else 'corpus')")
      .flag("shard-tokens", shard_tokens, "at most this many tokens per shard")
      .flag("val-fraction", val_fraction, "the last fraction of the tokens that forms the validation shards")
      .flag("version", version,
            "llm.c shard version: 1 (uint16 tokens) or 7 (uint32 tokens); 0: 1 unless the tokenizer has more than "
            "65536 tokens",
            {"0", "1", "7"})
      .flag("separator", separator,
            "text inserted between input files (\\n and \\t escapes; with --tokenizer it may be a special token "
            "such as <|endoftext|>)")
      .flag("tokenizer", tokenizer, "Hugging Face tokenizer.json (byte-level BPE) to encode with (none: bytes)");
  try {
    if (!cli.parse(argc, argv)) return 0;
    std::vector<std::filesystem::path> inputs;
    if (input.empty()) {
      inputs.push_back(examples::default_corpus_path());
      if (prefix.empty()) prefix = "kjv";
    } else {
      for (const auto& p : subspace::data::expand_paths(input)) inputs.push_back(p);
    }
    if (prefix.empty()) prefix = "corpus";
    const examples::text_tokenizer tok(tokenizer);
    subspace::data::text_to_shards_options o;
    o.tokenizer = tok.bpe();
    o.prefix = prefix;
    o.shard_tokens = shard_tokens;
    o.val_fraction = val_fraction;
    o.version = version != 0 ? version : tok.vocab_size() > 65536 ? 7 : 1;
    o.separator = unescape(separator);
    const auto written = subspace::data::text_to_shards(inputs, out, o);
    std::printf(
        "text_to_shards: %zu input file(s) -> %llu train tokens in %zu shard(s), %llu val tokens in %zu "
        "shard(s), in %s (%s, version %d)\n",
        inputs.size(), (unsigned long long)written.train_tokens, written.train.size(),
        (unsigned long long)written.val_tokens, written.val.size(), out.c_str(), tok.described().c_str(), o.version);
    for (const auto* list : {&written.train, &written.val})
      for (const auto& p : *list) std::printf("  %s\n", p.string().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "text_to_shards: %s\n", e.what());
    return 1;
  }
}

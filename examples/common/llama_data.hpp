#pragma once
// What the Llama training examples (train_llama, gossip_llama) share about the model and the data:
//
//   * model_flags: --preset and the size flags, declared once (declare_model_flags) and turned into an
//     nn::llama_config by model_config;
//   * data_flags: --text / --data / --data-format / --val-data / --val-fraction / --shuffle / --tokenizer
//     (declare_data_flags), and choose_data: token files as given by --data (llm.c shards, or nanoGPT's headerless
//     uint16 .bin only with --data-format raw-u16: a file is never guessed to be raw; a directory of text_to_shards
//     output trains on its *_train_* files and validates on its *_val_* files), or a plain-text file (--text,
//     default the King James Bible) converted once into llm.c shards in the data cache, byte-level or with the
//     --tokenizer (keyed by the file's and the tokenizer's path, size and time, and the split), then open_tokens:
//     the {train, validation} token datasets, and describe_data: the data: line. The source carries the tokenizer
//     that prompts and samples use. docs/data.md says what each choice reads.
//
// The flags keep their names, help texts and defaults in both programs.

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include <subspace/subspace.hpp>

#include "cli.hpp"
#include "default_corpus.hpp"
#include "format.hpp"
#include "text_tokenizer.hpp"

namespace examples {

/// --preset and the size flags.
struct model_flags {
  std::string preset = "tiny";
  std::int64_t d_model = 0, layers = 0, heads = 0, kv_heads = 0, ffn = 0, vocab = 0;
  bool tied = false;
};

/// Where the tokens come from.
struct data_flags {
  std::string text, data, data_format = "llmc", val_data, tokenizer;
  double val_fraction = 0.1;
  bool shuffle = true;
};

inline void declare_model_flags(cli& c, model_flags& m) {
  const std::string presets = "micro, tiny, 60m, 124m, 1b, 2b";
  c.flag("preset", m.preset,
         "model preset (" + presets + "; micro's head dim 4 runs on the host only); the size flags below override it",
         subspace::nn::presets::names())
      .flag("d-model", m.d_model, "hidden size (0: the preset's)")
      .flag("layers", m.layers, "transformer layers (0: the preset's)")
      .flag("heads", m.heads, "attention heads (0: the preset's)")
      .flag("kv-heads", m.kv_heads, "key/value heads, dividing --heads (0: the preset's)")
      .flag("ffn", m.ffn, "SwiGLU hidden size (0: the preset's)")
      .flag("vocab", m.vocab, "vocabulary size, > every token id (0: the preset's; byte-level text needs >= 256)")
      .flag("tied", m.tied, "tie the LM head to the token embedding");
}

inline void declare_data_flags(cli& c, data_flags& d) {
  c.flag("text", d.text, "plain-text file to train on, byte-tokenized (none: the King James Bible)")
      .flag("data", d.data, "token files instead of text (file, glob or directory of .bin), in --data-format")
      .flag("data-format", d.data_format,
            "format of --data and --val-data: llm.c shards (a bad header is an error), or nanoGPT's headerless "
            "uint16 .bin",
            {"llmc", "raw-u16"})
      .flag("val-data", d.val_data, "validation token files for --data (none: the last --val-fraction of --data)")
      .flag("val-fraction", d.val_fraction, "fraction of the tokens held out for validation")
      .flag("shuffle", d.shuffle, "visit training windows in a seeded random order per epoch (else in order)")
      .flag("tokenizer", d.tokenizer,
            "Hugging Face tokenizer.json (byte-level BPE) for --text, the prompt and the samples (none: byte-level)");
}

/// The model configuration: the preset with any size flags applied; `seq` (0: none) raises max_seq when longer.
inline subspace::nn::llama_config model_config(const model_flags& m, std::int64_t seq) {
  subspace::nn::llama_config cfg = subspace::nn::presets::by_name(m.preset);
  if (m.d_model) cfg.d_model = m.d_model;
  if (m.layers) cfg.n_layers = m.layers;
  if (m.heads) cfg.n_heads = m.heads;
  if (m.kv_heads) cfg.n_kv_heads = m.kv_heads;
  if (m.ffn) cfg.ffn_hidden = m.ffn;
  if (m.vocab) cfg.vocab = m.vocab;
  if (m.tied) cfg.tied_embeddings = true;
  if (seq > cfg.max_seq) cfg.max_seq = seq;
  cfg.validate();
  return cfg;
}

/// Where the training and validation tokens come from.
struct data_source {
  std::string train, val;  // token-file specs; val empty: split off the end of train
  bool bytes = false;      // byte-level tokens (samples decode as text)
  subspace::data::token_format format = subspace::data::token_format::llmc;
  text_tokenizer tokenizer;  // encodes the prompt and decodes samples (byte-level: only when `bytes`)
  std::string text;          // the --text file the shards were converted from (empty for --data)
  std::string val_chosen;    // how the validation tokens were chosen, for the data: line
  /// Whether samples print as text (else as token ids).
  bool decodes() const { return bytes || !tokenizer.byte_level(); }
};

/// "the last 10% of the tokens": the validation part split off the training files.
inline std::string last_fraction(double val_fraction, const std::string& of) {
  char percent[32];
  std::snprintf(percent, sizeof percent, "%.4g%%", val_fraction * 100);
  return "the last " + std::string(percent) + " of " + of;
}

/// A plain-text file as shards of `tokenizer`'s tokens, converted once into the data cache (keyed by the text's and
/// the tokenizer's path, size and time).
inline data_source text_shards(const std::filesystem::path& text, double val_fraction,
                               const text_tokenizer& tokenizer = {}) {
  namespace fs = std::filesystem;
  const fs::path abs = fs::absolute(text);
  std::error_code ec;
  const auto size = fs::file_size(abs, ec);
  if (ec) throw tool_error("--text " + text.string() + ": cannot read the file (" + ec.message() + ")");
  const auto stamp = fs::last_write_time(abs).time_since_epoch().count();
  std::string identity =
      abs.string() + "|" + std::to_string(size) + "|" + std::to_string(stamp) + "|" + std::to_string(val_fraction);
  if (!tokenizer.byte_level()) {
    const fs::path t = fs::absolute(tokenizer.path());
    identity += "|" + t.string() + "|" + std::to_string(fs::file_size(t)) + "|" +
                std::to_string(fs::last_write_time(t).time_since_epoch().count());
  }
  const std::size_t key = std::hash<std::string>{}(identity);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016zx", key);
  const fs::path dir = default_data_dir() / "shards" / (abs.stem().string() + "-" + hex);
  const fs::path done = dir / "done";
  if (!fs::exists(done)) {
    std::printf("converting %s (%s bytes) to %s shards in %s\n", abs.c_str(), human(double(size)).c_str(),
                tokenizer.described().c_str(), dir.c_str());
    subspace::data::text_to_shards_options to;
    to.prefix = "text";
    to.val_fraction = val_fraction;
    to.tokenizer = tokenizer.bpe();
    to.version = tokenizer.vocab_size() > 65536 ? 7 : 1;  // uint32 tokens when uint16 cannot hold them
    subspace::data::text_to_shards({abs}, dir, to);
    subspace::io::atomic_write_text(done, abs.string() + "\n");
  }
  return {.train = (dir / "text_train_*.bin").string(),
          .val = val_fraction > 0 ? (dir / "text_val_*.bin").string() : "",
          .bytes = tokenizer.byte_level(),
          .format = subspace::data::token_format::llmc,
          .tokenizer = tokenizer,
          .text = abs.string(),
          .val_chosen = last_fraction(val_fraction, "the text's tokens")};
}

/// --data: the files as given, except for a directory holding text_to_shards output (<prefix>_train_*.bin and
/// <prefix>_val_*.bin files), whose *_train_* files train and whose *_val_* files validate (unless --val-data names
/// others). Any other directory gives all its .bin files, and without --val-data the last --val-fraction of their
/// tokens validates.
inline data_source token_files(const data_flags& d, text_tokenizer tokenizer) {
  namespace fs = std::filesystem;
  data_source src{
      .train = d.data,
      .val = d.val_data,
      .bytes = false,
      .format = d.data_format == "raw-u16" ? subspace::data::token_format::raw_u16 : subspace::data::token_format::llmc,
      .tokenizer = std::move(tokenizer),
      .text = {},
      .val_chosen = d.val_data.empty() ? last_fraction(d.val_fraction, "the tokens") : "--val-data"};
  std::error_code ec;
  if (!fs::is_directory(d.data, ec)) return src;
  bool has_train = false, has_val = false;
  for (const auto& e : fs::directory_iterator(d.data, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_regular_file() || e.path().extension() != ".bin") continue;
    has_train = has_train || name.find("_train_") != std::string::npos;
    has_val = has_val || name.find("_val_") != std::string::npos;
  }
  if (!has_train) return src;
  src.train = (fs::path(d.data) / "*_train_*.bin").string();
  if (!d.val_data.empty()) return src;
  if (has_val) {
    src.val = (fs::path(d.data) / "*_val_*.bin").string();
    src.val_chosen = "the directory's *_val_* files";
  } else {
    src.val_chosen = last_fraction(d.val_fraction, "the *_train_* files' tokens (the directory has no *_val_* file)");
  }
  return src;
}

/// --data as given (token_files), or --text (default: the King James Bible) as cached shards of the --tokenizer's
/// tokens. cli_error, before any text is converted, when the model's vocabulary (model_vocab) cannot hold the
/// text's tokens.
inline data_source choose_data(const data_flags& d, std::int64_t model_vocab) {
  text_tokenizer tokenizer(d.tokenizer);
  if (d.data.empty() || !tokenizer.byte_level()) tokenizer.check_model_vocab(model_vocab);
  if (!d.data.empty()) return token_files(d, std::move(tokenizer));
  if (d.data_format != "llmc")
    throw cli_error("--data-format " + d.data_format + " applies to --data (--text becomes llm.c shards)");
  return text_shards(d.text.empty() ? default_corpus_path() : std::filesystem::path(d.text), d.val_fraction, tokenizer);
}

/// {train, validation} tokens of a source: its validation files, or the last val_fraction of its training files.
inline std::pair<subspace::data::token_dataset, subspace::data::token_dataset> open_tokens(const data_source& src,
                                                                                           double val_fraction) {
  subspace::data::token_dataset train = subspace::data::token_dataset::open(src.train, src.format), val;
  if (!src.val.empty()) val = subspace::data::token_dataset::open(src.val, src.format);
  else std::tie(train, val) = train.split(val_fraction);
  return {std::move(train), std::move(val)};
}

/// The data: line after "data: ": the format read (llm.c version and width from the headers, raw uint16 by
/// --data-format), the training and validation files, and how the validation tokens were chosen.
inline std::string describe_data(const data_source& src, const subspace::data::token_dataset& train,
                                 const subspace::data::token_dataset& val) {
  std::vector<subspace::data::token_segment> both = train.segments();
  both.insert(both.end(), val.segments().begin(), val.segments().end());
  std::string out = src.text.empty() ? "" : "text '" + src.text + "' (" + src.tokenizer.described() + ") as ";
  out += subspace::data::token_dataset(std::move(both)).formats();
  if (src.format == subspace::data::token_format::raw_u16) out += " by --data-format raw-u16";
  out += ": train " + train.describe() + ", val ";
  out += val.empty() ? "none" : val.describe() + " (" + src.val_chosen + ")";
  if (src.text.empty() && !src.tokenizer.byte_level()) out += ", decoded by " + src.tokenizer.described();
  return out;
}

}  // namespace examples

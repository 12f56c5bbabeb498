// examples/common/llama_data.hpp: which files --data DIR trains and validates on (text_to_shards output: *_train_*
// and *_val_*, never mixed; any other directory: all its .bin files, the last --val-fraction validating), and the
// data: line that names the files, the format read from the headers (or raw uint16 by flag) and the validation rule.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <subspace/data/text.hpp>
#include <subspace/data/tokens.hpp>

#include "../../examples/common/llama_data.hpp"
#include "support/files.hpp"
#include "support/scratch_dir.hpp"

using namespace subspace;
namespace fs = std::filesystem;

namespace {

using testing::scratch_dir;

std::string quoted(const fs::path& p) { return "'" + p.string() + "'"; }

/// Byte-level text_to_shards output in dir: 3 train shards of at most 500 tokens and 1 val shard.
data::shards_written write_shards(const fs::path& text_file, const fs::path& dir, int version = 1) {
  data::text_to_shards_options o;
  o.prefix = "story";
  o.shard_tokens = 500;
  o.val_fraction = 0.2;
  o.version = version;
  return data::text_to_shards({text_file}, dir, o);
}

std::string story() {
  std::string text;
  for (int i = 0; i < 70; ++i) text += "verse " + std::to_string(i) + ": and it was so.\n";
  return text;
}

/// Every file the dataset reads, in order.
std::vector<fs::path> files_of(const data::token_dataset& d) {
  std::vector<fs::path> out;
  for (const auto& s : d.segments()) {
    const auto& f = dynamic_cast<const data::token_file&>(*s.source);
    if (out.empty() || out.back() != f.path()) out.push_back(f.path());
  }
  return out;
}

/// Sets an environment variable for one scope.
struct scoped_env {
  std::string name, old;
  bool had;
  scoped_env(const char* n, const std::string& value) : name(n) {
    const char* v = std::getenv(n);
    had = v != nullptr;
    if (had) old = v;
    ::setenv(n, value.c_str(), 1);
  }
  ~scoped_env() {
    if (had) ::setenv(name.c_str(), old.c_str(), 1);
    else ::unsetenv(name.c_str());
  }
};

}  // namespace

TEST_CASE("--data DIR of text_to_shards output: *_train_* trains, *_val_* validates, and the data: line says so") {
  scratch_dir dir;
  testing::write_bytes(dir / "story.txt", story());
  const auto written = write_shards(dir / "story.txt", dir / "shards");
  REQUIRE(written.train.size() == 3);
  REQUIRE(written.val.size() == 1);

  examples::data_flags flags;
  flags.data = (dir / "shards").string();
  const examples::data_source src = examples::choose_data(flags, 256);
  const auto [train, val] = examples::open_tokens(src, flags.val_fraction);
  CHECK(files_of(train) == written.train);
  CHECK(files_of(val) == written.val);
  CHECK(train.tokens() == written.train_tokens);
  CHECK(val.tokens() == written.val_tokens);
  CHECK(examples::describe_data(src, train, val) ==
        "llm.c version 1 (uint16 tokens): train 3 files (" + quoted(written.train.front()) + " ... " +
            quoted(written.train.back()) + "), val " + quoted(written.val[0]) + " (the directory's *_val_* files)");

  // --val-data names the validation files; the directory's *_val_* files then are not read at all.
  data::write_llmc_tokens(dir / "held_out.bin", std::vector<std::int32_t>(50, 7), 7);
  flags.val_data = (dir / "held_out.bin").string();
  const examples::data_source chosen = examples::choose_data(flags, 256);
  const auto [train2, val2] = examples::open_tokens(chosen, flags.val_fraction);
  CHECK(files_of(train2) == written.train);
  CHECK(files_of(val2) == std::vector<fs::path>{dir / "held_out.bin"});
  CHECK(examples::describe_data(chosen, train2, val2) ==
        "llm.c version 1 (uint16 tokens) and llm.c version 7 (uint32 tokens): train 3 files (" +
            quoted(written.train.front()) + " ... " + quoted(written.train.back()) + "), val " +
            quoted(dir / "held_out.bin") + " (--val-data)");

  // Without *_val_* files the last --val-fraction of the *_train_* files validates; nothing else is read.
  fs::remove(written.val[0]);
  data::write_llmc_tokens(dir / "shards" / "unrelated.bin", std::vector<std::int32_t>(5000, 1), 1);
  flags.val_data.clear();
  flags.val_fraction = 0.25;
  const examples::data_source no_val = examples::choose_data(flags, 256);
  const auto [train3, val3] = examples::open_tokens(no_val, flags.val_fraction);
  CHECK(train3.tokens() + val3.tokens() == written.train_tokens);
  CHECK(files_of(val3).back() == written.train.back());
  CHECK(examples::describe_data(no_val, train3, val3)
            .ends_with("(the last 25% of the *_train_* files' tokens (the directory has no *_val_* file))"));
}

TEST_CASE("--data of other files: all of them, the last --val-fraction validating; raw uint16 only by flag") {
  scratch_dir dir;
  data::write_llmc_tokens(dir / "a.bin", std::vector<std::int32_t>(300, 3), 7);
  data::write_llmc_tokens(dir / "b.bin", std::vector<std::int32_t>(100, 4), 7);
  examples::data_flags flags;
  flags.data = dir.path.string();
  const examples::data_source src = examples::choose_data(flags, 256);
  const auto [train, val] = examples::open_tokens(src, flags.val_fraction);
  CHECK(files_of(train) == std::vector<fs::path>{dir / "a.bin", dir / "b.bin"});
  CHECK(val.tokens() == 40);
  CHECK(examples::describe_data(src, train, val) ==
        "llm.c version 7 (uint32 tokens): train 2 files (" + quoted(dir / "a.bin") + " ... " + quoted(dir / "b.bin") +
            "), val " + quoted(dir / "b.bin") + " (the last 10% of the tokens)");

  data::write_raw_u16_tokens(dir / "train.dat", std::vector<std::int32_t>(64, 9));
  flags.data = (dir / "train.dat").string();
  flags.data_format = "raw-u16";
  flags.val_fraction = 0;
  const examples::data_source raw = examples::choose_data(flags, 256);
  const auto [raw_train, raw_val] = examples::open_tokens(raw, flags.val_fraction);
  CHECK(examples::describe_data(raw, raw_train, raw_val) ==
        "raw uint16 (headerless) by --data-format raw-u16: train " + quoted(dir / "train.dat") + ", val none");

  // Token files decoded by a tokenizer say which.
  const fs::path bpe = fs::path(SUBSPACE_TEST_DATA_DIR) / "bpe" / "gpt2_style.json";
  flags.tokenizer = bpe.string();
  const examples::data_source decoded = examples::choose_data(flags, 1001);
  CHECK(examples::describe_data(decoded, raw_train, raw_val)
            .ends_with(", val none, decoded by BPE " + bpe.string() + " (1001 tokens)"));
}

TEST_CASE("--text: the data: line names the text, the tokenizer and the cached shards it trains on") {
  scratch_dir dir;
  testing::write_bytes(dir / "story.txt", story());
  const scoped_env cache("SUBSPACE_DATA_DIR", (dir / "cache").string());
  examples::data_flags flags;
  flags.text = (dir / "story.txt").string();
  const examples::data_source src = examples::choose_data(flags, 256);
  const auto [train, val] = examples::open_tokens(src, flags.val_fraction);
  REQUIRE(files_of(train).size() == 1);
  REQUIRE(files_of(val).size() == 1);
  CHECK(files_of(train)[0].filename() == "text_train_000000.bin");
  CHECK(files_of(val)[0].filename() == "text_val_000000.bin");
  CHECK(examples::describe_data(src, train, val) ==
        "text " + quoted(fs::absolute(dir / "story.txt")) + " (byte-level) as llm.c version 1 (uint16 tokens): train " +
            quoted(files_of(train)[0]) + ", val " + quoted(files_of(val)[0]) + " (the last 10% of the text's tokens)");
}

// data/tokens.hpp datasets beyond files: tokens and text given in memory (batched exactly as the same tokens in a
// shard), per-rank shards (every token once, the examples' former slice arithmetic, no overflow), and the errors
// of each, and the example of docs/data.md.
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <subspace/data/loader.hpp>
#include <subspace/data/tokenizer.hpp>
#include <subspace/data/tokenizer_json.hpp>
#include <subspace/data/tokens.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/train/trainer.hpp>

#include "support/files.hpp"
#include "support/scratch_dir.hpp"

using namespace subspace;
namespace fs = std::filesystem;

namespace {

using testing::has;
using testing::scratch_dir;

/// n tokens drawn uniformly from [0, vocab), fresh per seed.
std::vector<std::int32_t> random_tokens(std::size_t n, std::int32_t vocab, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<std::int32_t> pick(0, vocab - 1);
  std::vector<std::int32_t> out(n);
  for (auto& t : out) t = pick(gen);
  return out;
}

/// Every token of a dataset, in order, read through its sources.
std::vector<std::int32_t> all_tokens(const data::token_dataset& d) {
  std::vector<std::int32_t> out;
  for (const auto& s : d.segments()) {
    const std::size_t at = out.size();
    out.resize(at + s.size());
    s.source->read(s.begin, s.size(), out.data() + at, std::int64_t(1) << 40);
  }
  return out;
}

std::vector<std::int32_t> flat(const host_tensor<std::int32_t>& t) { return {t.data(), t.data() + t.numel()}; }

data::loader_options options(std::int64_t batch, std::int64_t seq, std::int64_t vocab, bool shuffle,
                             std::uint64_t seed) {
  data::loader_options o;
  o.batch = batch;
  o.seq = seq;
  o.vocab = vocab;
  o.shuffle = shuffle;
  o.seed = seed;
  return o;
}

/// A source of `n` tokens that are never read: for the arithmetic of shards far beyond memory.
struct unread_tokens final : data::token_source {
  std::uint64_t n;
  explicit unread_tokens(std::uint64_t count) : n(count) {}
  std::uint64_t size() const override { return n; }
  void read(std::uint64_t, std::size_t, std::int32_t*, std::int64_t) const override { FAIL("read"); }
  void check_vocab(std::int64_t, std::uint64_t, std::uint64_t) const override { FAIL("check_vocab"); }
  std::string name() const override { return "unread"; }
  std::string format() const override { return "none"; }
};

}  // namespace

TEST_CASE("in-memory tokens: the loader gives the same batches as from a shard of the same tokens") {
  scratch_dir dir;
  const std::vector<std::int32_t> a = random_tokens(1203, 5000, 11), b = random_tokens(517, 5000, 12);
  data::write_llmc_tokens(dir / "a.bin", a, 1);
  data::write_llmc_tokens(dir / "b.bin", b, 1);
  const data::token_dataset files({dir / "a.bin", dir / "b.bin"});
  // Two in-memory arrays stand where the two files stood: windows never cross either boundary.
  std::vector<data::token_segment> segments = data::token_dataset::from_tokens(a, "a").segments();
  segments.push_back(data::token_dataset::from_tokens(std::span<const std::int32_t>(b), "b").segments()[0]);
  const data::token_dataset memory(std::move(segments));
  CHECK(memory.tokens() == files.tokens());
  CHECK(all_tokens(memory) == all_tokens(files));

  for (const bool shuffle : {false, true})
    for (const int world : {1, 3}) {
      CAPTURE(shuffle);
      CAPTURE(world);
      for (int rank = 0; rank < world; ++rank) {
        const auto o = options(3, 16, 5000, shuffle, 7 + std::uint64_t(rank));
        data::batch_loader from_files(files.shard(rank, world), o), from_memory(memory.shard(rank, world), o);
        REQUIRE(from_memory.windows() == from_files.windows());
        // Past one epoch, so the second epoch's order is compared too.
        for (std::uint64_t i = 0; i < from_files.batches_per_epoch() + 2; ++i) {
          const auto x = from_files.next(), y = from_memory.next();
          CHECK(flat(x.tokens) == flat(y.tokens));
          CHECK(flat(x.targets) == flat(y.targets));
        }
        CHECK(from_memory.position() == from_files.position());
      }
    }
}

TEST_CASE("in-memory tokens: a copy owned by the dataset, described by name and format") {
  std::vector<std::int32_t> tokens = random_tokens(100, 300, 21);
  const std::vector<std::int32_t> original = tokens;
  const auto d = data::token_dataset::from_tokens(tokens, "mine");
  tokens.assign(tokens.size(), 0);  // the caller's buffer changes; the dataset keeps its copy
  CHECK(all_tokens(d) == original);
  CHECK(d.describe() == "in-memory tokens 'mine'");
  CHECK(d.formats() == "in memory");
  CHECK(d.slice(10, 20).describe() == "in-memory tokens 'mine'");
  CHECK(all_tokens(d.split(0.25).second) == std::vector<std::int32_t>(original.end() - 25, original.end()));
  const auto two = data::token_dataset(
      {d.segments()[0], data::token_dataset::from_tokens(std::vector<std::int32_t>{1, 2}, "more").segments()[0]});
  CHECK(two.describe() == "2 token sources (in-memory tokens 'mine' ... in-memory tokens 'more')");
}

TEST_CASE("in-memory text: byte-level by default, or through a BPE tokenizer") {
  const std::string text = "In the beginning God created the heaven and the earth.\nÉté, naïve café — 東京.\n";
  const auto bytes = data::token_dataset::from_text(text);
  CHECK(all_tokens(bytes) == data::byte_tokenizer{}.encode(text));
  CHECK(bytes.tokens() == text.size());
  CHECK(bytes.describe() == "in-memory tokens 'text'");

  const auto bpe = data::load_bpe_tokenizer(fs::path(SUBSPACE_TEST_DATA_DIR) / "bpe" / "gpt2_style.json");
  const auto encoded = data::token_dataset::from_text(text, bpe, "genesis");
  const std::vector<std::int32_t> expected = bpe.encode(text);
  CHECK(all_tokens(encoded) == expected);
  CHECK(expected.size() < text.size());  // merges happened: not the bytes again
  CHECK(encoded.describe() == "in-memory tokens 'genesis'");

  // A BPE vocabulary feeds a loader whose vocabulary holds it.
  data::batch_loader l(encoded, options(1, 4, bpe.vocab_size(), false, 0));
  const auto batch = l.next();
  CHECK(flat(batch.tokens) == std::vector<std::int32_t>(expected.begin(), expected.begin() + 4));
}

TEST_CASE("in-memory tokens: empty, negative, outside the vocabulary or too short are named errors") {
  CHECK_THROWS_WITH_AS(data::token_dataset::from_tokens(std::vector<std::int32_t>{}, "nothing"),
                       has("token_dataset::from_tokens: in-memory tokens 'nothing' are empty"), invalid_argument);
  CHECK_THROWS_WITH_AS(data::token_dataset::from_text("", data::byte_tokenizer{}, "blank"),
                       has("token_dataset::from_text: text 'blank' is empty"), invalid_argument);
  CHECK_THROWS_WITH_AS(data::token_dataset::from_tokens(std::vector<std::int32_t>{4, 5, -3, 6}, "signed"),
                       has("in-memory tokens 'signed': token -3 at position 2 is negative (token ids are >= 0)"),
                       invalid_argument);

  std::vector<std::int32_t> tokens = random_tokens(200, 256, 31);
  tokens[137] = 256;
  const auto d = data::token_dataset::from_tokens(tokens, "bytes+1");
  const std::string outside =
      "in-memory tokens 'bytes+1': token 256 at position 137 is not below the vocabulary size 256";
  CHECK_THROWS_WITH_AS(data::batch_loader(d, options(2, 8, 256, false, 0)), has(outside), invalid_argument);
  // Unchecked at construction, the read that meets it fails the same way.
  auto lazy = options(2, 8, 256, false, 0);
  lazy.check_all_tokens = false;
  data::batch_loader l(d, lazy);
  for (int i = 0; i < 8; ++i) l.next();  // windows 0..15 cover tokens 0..128
  CHECK_THROWS_WITH_AS(l.next(), has(outside), invalid_argument);

  CHECK_THROWS_WITH_AS(data::batch_loader(data::token_dataset::from_tokens(random_tokens(40, 256, 32), "short"),
                                          options(2, 32, 256, false, 0)),
                       has("batch_loader (train): in-memory tokens 'short': 40 tokens make 1 windows of seq + 1 = 33 "
                           "tokens, one batch needs 2 (at least 65 tokens in one file or in-memory array"),
                       invalid_argument);
}

TEST_CASE("shard: every token exactly once across the ranks, as the examples' slices were") {
  for (const std::size_t n : {1, 7, 100, 1001})
    for (const int world : {1, 2, 3, 7, 8}) {
      if (n < std::size_t(world)) continue;
      CAPTURE(n);
      CAPTURE(world);
      const std::vector<std::int32_t> tokens = random_tokens(n, 1000, std::uint32_t(n * 10 + std::size_t(world)));
      const auto d = data::token_dataset::from_tokens(tokens);
      std::vector<std::int32_t> joined;
      std::uint64_t smallest = n, largest = 0;
      for (int r = 0; r < world; ++r) {
        const auto part = d.shard(r, world);
        // The slice that gossip_llama, pipeline_llama and context_llama took before shard() existed.
        const std::uint64_t total = n, w = std::uint64_t(world), q = std::uint64_t(r);
        const auto slice = d.slice(total * q / w, total * (q + 1) / w);
        CHECK(all_tokens(part) == all_tokens(slice));
        const auto got = all_tokens(part);
        joined.insert(joined.end(), got.begin(), got.end());
        smallest = std::min(smallest, part.tokens());
        largest = std::max(largest, part.tokens());
      }
      CHECK(joined == tokens);
      CHECK(largest - smallest <= 1);
    }

  // Across files: a part may span a file boundary; together the parts are the files' tokens.
  scratch_dir dir;
  const auto a = random_tokens(50, 100, 41), b = random_tokens(31, 100, 42);
  data::write_llmc_tokens(dir / "a.bin", a, 7);
  data::write_llmc_tokens(dir / "b.bin", b, 7);
  const data::token_dataset files({dir / "a.bin", dir / "b.bin"});
  CHECK(files.shard(1, 3).segments().size() == 2);  // tokens [27, 54)
  CHECK(files.shard(1, 3).tokens() == 27);
  std::vector<std::int32_t> joined;
  for (int r = 0; r < 3; ++r) {
    const auto got = all_tokens(files.shard(r, 3));
    joined.insert(joined.end(), got.begin(), got.end());
  }
  std::vector<std::int32_t> both = a;
  both.insert(both.end(), b.begin(), b.end());
  CHECK(joined == both);
}

TEST_CASE("shard: exact beyond 64-bit products, and bad ranks or worlds are named errors") {
  const std::uint64_t n = (std::uint64_t(1) << 62) + 12345;
  const data::token_dataset huge({data::token_segment{std::make_shared<unread_tokens>(n), 0, n}});
  for (const int world : {3, 7, 1000}) {
    std::uint64_t covered = 0;
    for (const int r : {0, world / 2, world - 1}) {
      const auto part = huge.shard(r, world);
      const auto begin = std::uint64_t((unsigned __int128)n * unsigned(r) / unsigned(world));
      const auto end = std::uint64_t((unsigned __int128)n * unsigned(r + 1) / unsigned(world));
      REQUIRE(part.segments().size() == 1);
      CHECK(part.segments()[0].begin == begin);
      CHECK(part.segments()[0].end == end);
      if (r == world - 1) covered = end;
    }
    CHECK(covered == n);
  }

  const auto d = data::token_dataset::from_tokens(random_tokens(5, 10, 51), "five");
  CHECK_THROWS_WITH_AS(d.shard(0, 0), has("token_dataset::shard: world 0 (expected >= 1)"), invalid_argument);
  CHECK_THROWS_WITH_AS(d.shard(3, 3),
                       has("token_dataset::shard: rank 3 outside the world of 3 (expected 0 <= rank < 3)"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(d.shard(-1, 3), has("rank -1 outside the world of 3"), invalid_argument);
  CHECK_THROWS_WITH_AS(d.shard(0, 6),
                       has("token_dataset::shard: in-memory tokens 'five' has 5 tokens, fewer than the 6 ranks"),
                       invalid_argument);
  CHECK(d.shard(4, 5).tokens() == 1);
}

TEST_CASE("docs/data.md: one's own text through a tokenizer trains train::trainer, per-rank shards beside it") {
  const std::string text = testing::read_bytes(fs::path(SUBSPACE_TEST_DATA_DIR) / "kjv_genesis.txt").substr(0, 20000);
  const data::byte_tokenizer tokenizer;
  auto [train_tokens, val_tokens] = data::token_dataset::from_text(text, tokenizer, "my text").split(0.1);
  CHECK(train_tokens.tokens() == 18000);

  nn::llama_config cfg = nn::presets::micro();
  cfg.vocab = 256;
  cfg.max_seq = 16;
  data::batch_loader train_data(train_tokens, {.batch = 4, .seq = 16, .vocab = cfg.vocab, .shuffle = true, .seed = 1});
  data::batch_loader val_data(val_tokens, {.batch = 4, .seq = 16, .vocab = cfg.vocab, .name = "val"});
  train::trainer_options o;
  o.schedule.peak_lr = 1e-2f;
  o.schedule.total_steps = 30;
  train::trainer t(nn::llama<exec::host, float>(cfg), subspace::stack{}, o);
  t.init(1);
  const double before = t.evaluate(val_data, 4);
  for (int step = 0; step < 30; ++step) CHECK(t.step(train_data).tokens == 64);
  const double after = t.evaluate(val_data, 4);
  CHECK(after < before - 0.5);  // ln 256 ≈ 5.5 at the start; English bytes are learnt quickly

  const data::batch_loader rank1(train_tokens.shard(1, 4),
                                 {.batch = 4, .seq = 16, .vocab = cfg.vocab, .shuffle = true, .seed = 1 + 1});
  CHECK(rank1.dataset().tokens() == 4500);
}

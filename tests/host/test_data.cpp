// data/: llm.c shards and nanoGPT .bin files (raw uint16 only when asked for), datasets of several shards, the
// batch loader (sequential, shuffled, exact resume), the byte tokenizer, the text-to-shards converter, and the
// examples' default corpus (examples/common/default_corpus.hpp).
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <subspace/data/loader.hpp>
#include <subspace/data/text.hpp>
#include <subspace/data/tokenizer.hpp>
#include <subspace/data/tokens.hpp>

#include "../../examples/common/default_corpus.hpp"
#include "support/files.hpp"
#include "support/scratch_dir.hpp"

using namespace subspace;
namespace fs = std::filesystem;

namespace {

using testing::scratch_dir;

using testing::has;

std::string le32(std::int32_t v) {
  std::string s(4, '\0');
  for (int i = 0; i < 4; ++i) s[std::size_t(i)] = char((std::uint32_t(v) >> (8 * i)) & 0xff);
  return s;
}
/// An llm.c header with the given fields.
std::string header(std::int32_t magic, std::int32_t version, std::int32_t count) {
  std::string h = le32(magic) + le32(version) + le32(count);
  h.resize(1024, '\0');
  return h;
}
std::vector<std::int32_t> iota_tokens(std::size_t n, std::int32_t first = 0, std::int32_t modulo = 0) {
  std::vector<std::int32_t> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = modulo ? (first + std::int32_t(i)) % modulo : first + std::int32_t(i);
  return t;
}
std::vector<std::int32_t> all_tokens(const data::token_file& f) {
  std::vector<std::int32_t> out(f.size());
  f.read(0, out.size(), out.data(), std::int64_t(1) << 40);
  return out;
}
std::vector<std::int32_t> flat(const host_tensor<std::int32_t>& t) { return {t.data(), t.data() + t.numel()}; }

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Token files

TEST_CASE("token files: llm.c version 1 and 7 and raw uint16 round-trip, with the expected bytes") {
  scratch_dir dir;
  const auto v1 = iota_tokens(1000, 65000, 65536);  // wraps past 65535
  data::write_llmc_tokens(dir / "v1.bin", v1, 1);
  const std::string bytes = testing::read_bytes(dir / "v1.bin");
  REQUIRE(bytes.size() == 1024 + 2 * 1000);
  CHECK(bytes.substr(0, 12) == le32(20240520) + le32(1) + le32(1000));
  CHECK(bytes.substr(12, 1012) == std::string(1012, '\0'));
  CHECK(std::uint8_t(bytes[1024]) == (65000 & 0xff));
  CHECK(std::uint8_t(bytes[1025]) == (65000 >> 8));
  const data::token_file f1(dir / "v1.bin");
  CHECK(f1.version() == 1);
  CHECK(f1.width() == 2);
  CHECK(f1.size() == 1000);
  CHECK(all_tokens(f1) == v1);

  std::vector<std::int32_t> v7 = iota_tokens(300, 100000);
  v7.push_back(0x7fffffff);
  data::write_llmc_tokens(dir / "v7.bin", v7, 7);
  CHECK(testing::read_bytes(dir / "v7.bin").size() == 1024 + 4 * 301);
  const data::token_file f7(dir / "v7.bin", data::token_format::llmc);
  CHECK(f7.version() == 7);
  CHECK(f7.width() == 4);
  CHECK(all_tokens(f7) == v7);

  const auto raw = iota_tokens(777, 0, 65536);
  data::write_raw_u16_tokens(dir / "train.bin", raw);
  CHECK(testing::read_bytes(dir / "train.bin").size() == 2 * 777);
  const data::token_file fr(dir / "train.bin", data::token_format::raw_u16);  // raw only when asked for
  CHECK(fr.version() == 0);
  CHECK(fr.size() == 777);
  CHECK(all_tokens(fr) == raw);
  // an llm.c file read as raw is just numbers (the header included)
  CHECK(data::token_file(dir / "v1.bin", data::token_format::raw_u16).size() == 512 + 1000);

  data::write_llmc_tokens(dir / "empty.bin", std::vector<std::int32_t>{}, 1);
  CHECK(data::token_file(dir / "empty.bin").size() == 0);
}

TEST_CASE("token files: a damaged llm.c header is an error, never read as raw uint16 tokens") {
  scratch_dir dir;
  const auto p = dir / "shard.bin";
  data::write_llmc_tokens(p, iota_tokens(300, 0, 256), 1);
  std::string bytes = testing::read_bytes(p);
  bytes[0] = char(bytes[0] ^ 0x01);  // one flipped bit of the magic
  testing::write_bytes(p, bytes);
  const std::string magic = std::to_string(20240520 ^ 1);
  for (const auto format : {data::token_format::llmc, data::token_format{}}) {  // asked for, and the default
    CHECK_THROWS_WITH_AS(data::token_file(p, format),
                         has("token file '" + p.string() + "': bad magic " + magic +
                             " in the llm.c header (int32 at byte 0; expected 20240520 for uint16 tokens or 20240801 "
                             "for uint32 tokens)"),
                         invalid_argument);
  }
  CHECK_THROWS_WITH_AS(data::token_dataset::open(p.string()), has("bad magic " + magic), invalid_argument);
  // A real nanoGPT file is read when raw uint16 is asked for, and refused otherwise.
  data::write_raw_u16_tokens(dir / "train.bin", iota_tokens(600, 0, 256));
  CHECK(data::token_dataset::open((dir / "train.bin").string(), data::token_format::raw_u16).tokens() == 600);
  CHECK_THROWS_WITH_AS(data::token_dataset::open((dir / "train.bin").string()), has("bad magic"), invalid_argument);
}

TEST_CASE("token files: a shard truncated while open is an error naming the file, not a signal") {
  scratch_dir dir;
  const auto p = dir / "shard.bin";
  data::write_llmc_tokens(p, iota_tokens(100000, 0, 256), 1);
  const auto file = std::make_shared<const data::token_file>(p);
  data::loader_options o;
  o.batch = 4;
  o.seq = 64;
  o.shuffle = false;
  data::batch_loader loader(data::token_dataset({{file, 0, file->size()}}), o);
  loader.next();
  fs::resize_file(p, 1024 + 2 * 1000);  // another process cuts the shard short
  std::vector<std::int32_t> tail(10);
  CHECK_THROWS_WITH_AS(file->read(99990, tail.size(), tail.data(), 256),
                       has("reading '" + p.string() +
                           "': unexpected end of file at byte 201004 (the file had 201024 "
                           "bytes when opened: truncated since?)"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(file->check_vocab(256), has("unexpected end of file"), invalid_argument);
  for (int i = 0; i < 2; ++i) loader.next();  // windows still inside the first 1000 tokens
  CHECK_THROWS_WITH_AS(loader.next(), has("reading '" + p.string() + "': unexpected end of file"), invalid_argument);
  // Opened again, the shorter file no longer matches its header.
  CHECK_THROWS_WITH_AS(data::token_file{p}, has("the file has 3024 bytes (truncated)"), invalid_argument);
}

TEST_CASE("token files: bad input names the file and the expected value") {
  scratch_dir dir;
  const auto p = dir / "bad.bin";
  const std::string name = "token file '" + p.string() + "': ";
  const auto fails = [&](const std::string& bytes, data::token_format fmt, const std::string& text) {
    testing::write_bytes(p, bytes);
    CAPTURE(text);
    CHECK_THROWS_WITH_AS(data::token_file(p, fmt), has(name + text), invalid_argument);
  };
  const std::string payload(200, '\x01');
  fails(header(12345, 1, 100) + payload, data::token_format::llmc,
        "bad magic 12345 in the llm.c header (int32 at byte 0; expected 20240520 for uint16 tokens or 20240801 for "
        "uint32 tokens)");
  fails(header(20240520, 7, 100) + payload, data::token_format::llmc,
        "magic 20240520 (uint16 tokens) needs version 1, the header says 7");
  fails(header(20240801, 1, 50) + payload, data::token_format::llmc,
        "magic 20240801 (uint32 tokens) needs version 7, the header says 1");
  fails(header(20240520, 1, 150) + payload, data::token_format::llmc,
        "the header says 150 tokens of 2 bytes (1324 bytes with the header), the file has 1224 bytes (truncated)");
  fails(header(20240520, 1, 50) + payload, data::token_format::llmc,
        "the header says 50 tokens of 2 bytes (1124 bytes with the header), the file has 1224 bytes");
  fails(header(20240520, 1, -5), data::token_format::llmc, "negative token count -5");
  fails(header(20240520, 1, 10).substr(0, 500), data::token_format::llmc,
        "500 bytes is shorter than the llm.c header (1024 bytes)");
  fails("abc", data::token_format::raw_u16, "3 bytes is not a whole number of uint16 tokens");
  CHECK_THROWS_WITH_AS(data::token_file(dir / "missing.bin"),
                       has("cannot open '" + (dir / "missing.bin").string() + "' (token file): No such file"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(data::token_file(dir.path), has("it is a directory"), invalid_argument);

  // Tokens outside the vocabulary: at construction of a loader (scan) or while batching.
  data::write_llmc_tokens(dir / "big.bin", std::vector<std::int32_t>{1, 2, 3, 300, 4, 5, 6, 7, 8, 9}, 1);
  const data::token_file big(dir / "big.bin");
  CHECK_THROWS_WITH_AS(big.check_vocab(256),
                       has("token file '" + (dir / "big.bin").string() +
                           "': token 300 at position 3 is not below the vocabulary size 256"),
                       invalid_argument);
  data::loader_options o;
  o.batch = 1;
  o.seq = 4;
  CHECK_THROWS_WITH_AS(data::batch_loader(data::token_dataset({dir / "big.bin"}), o),
                       has("token 300 at position 3 is not below the vocabulary size 256"), invalid_argument);
  o.check_all_tokens = false;  // lazily: the batch that reads it fails
  data::batch_loader lazy(data::token_dataset({dir / "big.bin"}), o);
  CHECK_THROWS_WITH_AS(lazy.next(), has("token 300 at position 3"), invalid_argument);

  // Writing: values that do not fit the format.
  CHECK_THROWS_WITH_AS(data::write_llmc_tokens(p, std::vector<std::int32_t>{1, 70000}, 1),
                       has("token 70000 at position 1 does not fit version 1 (uint16: 0..65535; use version 7"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(data::write_llmc_tokens(p, std::vector<std::int32_t>{1}, 3),
                       has("version 3 (expected 1 for uint16 tokens or 7 for uint32 tokens)"), invalid_argument);
  CHECK_THROWS_WITH_AS(data::write_raw_u16_tokens(p, std::vector<std::int32_t>{-1}),
                       has("token -1 at position 0 does not fit uint16"), invalid_argument);
}

TEST_CASE("token datasets: lists, globs and directories of shards, slices and train/val splits") {
  scratch_dir dir;
  for (int s = 0; s < 3; ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "fw_train_%06d.bin", s);
    data::write_llmc_tokens(dir / name, iota_tokens(100, 1000 * s), 7);
  }
  data::write_raw_u16_tokens(dir / "other.dat", iota_tokens(10));
  const auto glob = data::expand_paths((dir.path / "fw_train_*.bin").string());
  REQUIRE(glob.size() == 3);
  CHECK(glob[0].filename() == "fw_train_000000.bin");
  CHECK(glob[2].filename() == "fw_train_000002.bin");
  CHECK(data::expand_paths(dir.path.string()) == glob);  // a directory: its .bin files
  const auto list = data::expand_paths((dir / "fw_train_000002.bin").string() + "," + (dir / "other.dat").string());
  CHECK(list.size() == 2);
  CHECK(list[1].filename() == "other.dat");
  CHECK_THROWS_WITH_AS(data::expand_paths((dir.path / "nothing_*.bin").string()),
                       has("no file matches the pattern '" + (dir.path / "nothing_*.bin").string() + "'"),
                       invalid_argument);
  CHECK_THROWS_AS(data::expand_paths(""), invalid_argument);

  const auto ds = data::token_dataset::open((dir.path / "fw_train_*.bin").string());
  CHECK(ds.tokens() == 300);
  CHECK(ds.segments().size() == 3);
  CHECK(ds.describe().find("3 files") == 0);
  const auto sl = ds.slice(50, 250);
  REQUIRE(sl.segments().size() == 3);
  CHECK(sl.segments()[0].begin == 50);
  CHECK(sl.segments()[2].end == 50);
  CHECK(sl.tokens() == 200);
  const auto [train, val] = ds.split(0.1);
  CHECK(train.tokens() == 270);
  CHECK(val.tokens() == 30);
  CHECK(val.segments().size() == 1);
  // the last 30 tokens of the last shard
  CHECK(dynamic_cast<const data::token_file&>(*val.segments()[0].source)[val.segments()[0].begin] == 2070);
  CHECK(ds.split(0.0).second.tokens() == 0);
  CHECK_THROWS_WITH_AS(ds.split(1.0), has("val_fraction 1 (expected 0 <= f < 1)"), invalid_argument);
}

// ---------------------------------------------------------------------------------------------------------------
// Batch loader

TEST_CASE("batch_loader: sequential batches are shifted windows that never cross files") {
  scratch_dir dir;
  data::write_llmc_tokens(dir / "a.bin", iota_tokens(25, 0), 7);     // 3 windows of 8 + 1 (stride 8)
  data::write_llmc_tokens(dir / "b.bin", iota_tokens(17, 1000), 7);  // 2 windows
  data::write_llmc_tokens(dir / "c.bin", iota_tokens(5, 5000), 7);   // too short: no window
  data::loader_options o;
  o.batch = 2;
  o.seq = 8;
  o.vocab = 1 << 20;
  data::batch_loader l(data::token_dataset({dir / "a.bin", dir / "c.bin", dir / "b.bin"}), o);
  CHECK(l.windows() == 5);
  CHECK(l.batches_per_epoch() == 2);
  auto b0 = l.next();
  CHECK(b0.tokens.shape() == shape{2, 8});
  CHECK(flat(b0.tokens) == std::vector<std::int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15});
  CHECK(flat(b0.targets) == std::vector<std::int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16});
  auto b1 = l.next();  // window 2 of a (16..24) and window 0 of b
  CHECK(b1.tokens(0, 0) == 16);
  CHECK(b1.targets(0, 7) == 24);
  CHECK(b1.tokens(1, 0) == 1000);
  CHECK(b1.targets(1, 7) == 1008);
  CHECK(l.position().epoch == 0);
  CHECK(l.position().cursor == 4);
  auto b2 = l.next();  // one window left: the epoch ends, the next starts from the beginning
  CHECK(l.position().epoch == 1);
  CHECK(flat(b2.tokens) == flat(b0.tokens));
  l.reset();
  CHECK(flat(l.next().targets) == flat(b0.targets));

  host_tensor<std::int32_t> wrong({2, 7}), right({2, 8});
  CHECK_THROWS_WITH_AS(l.next(wrong.v(), right.v()), has("tokens and targets must be [2, 8], got [2, 7] and [2, 8]"),
                       invalid_argument);
}

TEST_CASE("batch_loader: too few tokens for one batch, and bad options, are named errors") {
  scratch_dir dir;
  data::write_llmc_tokens(dir / "small.bin", iota_tokens(100, 0, 256), 1);
  data::loader_options o;
  o.batch = 4;
  o.seq = 32;
  CHECK_THROWS_WITH_AS(data::batch_loader(data::token_dataset({dir / "small.bin"}), o),
                       has("batch_loader (train): '" + (dir / "small.bin").string() +
                           "': 100 tokens make 3 windows of seq + 1 = 33 tokens, one batch needs 4 (at least 129 "
                           "tokens in one file or in-memory array: a window never crosses one)"),
                       invalid_argument);
  o.batch = 0;
  CHECK_THROWS_WITH_AS(data::batch_loader(data::token_dataset({dir / "small.bin"}), o),
                       has("batch must be >= 1, got 0"), invalid_argument);
  o.batch = 1;
  o.seq = 0;
  CHECK_THROWS_WITH_AS(data::batch_loader(data::token_dataset({dir / "small.bin"}), o), has("seq must be >= 1"),
                       invalid_argument);
  o.seq = 8;
  o.name = "val";
  CHECK_THROWS_WITH_AS(data::batch_loader(data::token_dataset{}, o), has("batch_loader (val): an empty token dataset"),
                       invalid_argument);
}

TEST_CASE("batch_loader: shuffled epochs cover every window once, reproducibly per seed") {
  scratch_dir dir;
  // Token value = position, so a row's first token names its window.
  data::write_llmc_tokens(dir / "a.bin", iota_tokens(4 * 250 + 1), 7);
  data::write_llmc_tokens(dir / "b.bin", iota_tokens(4 * 131 + 3, 100000), 7);
  const data::token_dataset ds({dir / "a.bin", dir / "b.bin"});
  data::loader_options o;
  o.batch = 3;
  o.seq = 4;
  o.vocab = 1 << 20;
  o.shuffle = true;
  o.seed = 1234;
  data::batch_loader l(ds, o);
  REQUIRE(l.windows() == 381);
  const auto first_tokens = [&](data::batch_loader& loader) {
    std::vector<std::int32_t> firsts;
    for (std::uint64_t b = 0; b < loader.batches_per_epoch(); ++b) {
      const auto batch = loader.next();
      for (std::int64_t r = 0; r < o.batch; ++r) firsts.push_back(batch.tokens(r, 0));
    }
    return firsts;
  };
  const auto epoch0 = first_tokens(l);
  CHECK(epoch0.size() == 381);  // 127 batches of 3: every window exactly once
  const std::set<std::int32_t> distinct(epoch0.begin(), epoch0.end());
  CHECK(distinct.size() == 381);
  for (const auto t : epoch0) CHECK(((t < 100000 && t % 4 == 0) || (t >= 100000 && (t - 100000) % 4 == 0)));
  CHECK(!std::is_sorted(epoch0.begin(), epoch0.end()));
  const auto epoch1 = first_tokens(l);
  CHECK(epoch1 != epoch0);  // a new permutation each epoch
  CHECK(std::set<std::int32_t>(epoch1.begin(), epoch1.end()) == distinct);

  data::batch_loader same(ds, o);
  CHECK(first_tokens(same) == epoch0);  // reproducible
  o.seed = 1235;
  data::batch_loader other(ds, o);
  CHECK(first_tokens(other) != epoch0);
}

TEST_CASE("batch_loader: a saved position resumes exactly, across epochs, sequential and shuffled") {
  scratch_dir dir;
  data::write_llmc_tokens(dir / "a.bin", iota_tokens(2000, 0, 256), 1);
  for (const bool shuffle : {false, true}) {
    CAPTURE(shuffle);
    data::loader_options o;
    o.batch = 4;
    o.seq = 16;
    o.shuffle = shuffle;
    o.seed = 99;
    const data::token_dataset ds({dir / "a.bin"});
    data::batch_loader a(ds, o);
    for (int i = 0; i < 45; ++i) a.next();  // 31 batches per epoch: into epoch 1
    const data::loader_position saved = a.position();
    CHECK(saved.epoch == 1);
    // through JSON, as a checkpoint stores it
    const auto restored = data::loader_position::from_json(io::json::parse(saved.to_json().dump()));
    CHECK(restored == saved);
    std::vector<std::vector<std::int32_t>> expected;
    for (int i = 0; i < 40; ++i) {
      const auto b = a.next();
      expected.push_back(flat(b.tokens));
      expected.back().insert(expected.back().end(), b.targets.data(), b.targets.data() + b.targets.numel());
    }
    data::batch_loader b(ds, o);
    b.seek(restored);
    for (int i = 0; i < 40; ++i) {
      const auto batch = b.next();
      auto got = flat(batch.tokens);
      got.insert(got.end(), batch.targets.data(), batch.targets.data() + batch.targets.numel());
      REQUIRE(got == expected[std::size_t(i)]);
    }
    CHECK(b.position() == a.position());
  }
  // A position from other data or settings is refused.
  data::loader_options o;
  o.batch = 4;
  o.seq = 16;
  data::batch_loader l(data::token_dataset({dir / "a.bin"}), o);
  data::loader_position p = l.position();
  p.windows = 7;
  CHECK_THROWS_WITH_AS(l.seek(p), has("saved position is for 7 windows per epoch, this data gives 124"),
                       invalid_argument);
  p = l.position();
  p.shuffle = true;
  CHECK_THROWS_WITH_AS(l.seek(p), has("saved position is for a shuffled loader, this one is sequential"),
                       invalid_argument);
  p = l.position();
  p.cursor = 1000;
  CHECK_THROWS_WITH_AS(l.seek(p), has("cursor 1000 beyond 124 windows"), invalid_argument);
  CHECK_THROWS_WITH_AS(data::loader_position::from_json(io::json::parse(R"({"epoch":1})")),
                       has("missing key \"cursor\""), invalid_argument);
  // The seed is unsigned: a negative, signed or padded string is refused, not wrapped to 2^64 - 1.
  for (const char* seed : {"-1", " -1", "+5", " 5", "18446744073709551616", ""}) {
    CAPTURE(seed);
    const std::string j = std::string(R"({"epoch":0,"cursor":0,"windows":124,"shuffle":true,"seed":")") + seed + "\"}";
    CHECK_THROWS_WITH_AS(
        data::loader_position::from_json(io::json::parse(j)),
        has("\"seed\" must be a decimal string of an unsigned 64-bit integer, got \"" + std::string(seed) + "\""),
        invalid_argument);
  }
  const std::string max_seed = R"({"epoch":0,"cursor":0,"windows":124,"shuffle":true,"seed":"18446744073709551615"})";
  CHECK(data::loader_position::from_json(io::json::parse(max_seed)).seed == ~std::uint64_t(0));
}

// ---------------------------------------------------------------------------------------------------------------
// Tokenizer, converter, default corpus

TEST_CASE("byte_tokenizer: encode/decode round trip, printable text for any tokens") {
  const data::byte_tokenizer tok;
  const std::string text = "In the beginning \xC3\xA9\xE2\x82\xAC\n\t\x01\xff";
  const auto ids = tok.encode(text);
  CHECK(ids.size() == text.size());
  CHECK(ids[0] == 'I');
  CHECK(ids.back() == 255);
  CHECK(tok.decode(ids) == text);
  CHECK_THROWS_WITH_AS(tok.decode(std::vector<std::int32_t>{65, 256}),
                       has("token 256 at position 1 is not a byte (expected 0..255)"), invalid_argument);
  // valid UTF-8, newline and tab pass; a control byte, a stray continuation, a cut sequence and 256 are replaced
  const std::string r = "\xEF\xBF\xBD";
  CHECK(tok.printable(ids) == "In the beginning \xC3\xA9\xE2\x82\xAC\n\t" + r + r);
  CHECK(tok.printable(std::vector<std::int32_t>{0xe2, 0x82}) == r + r);
  CHECK(tok.printable(std::vector<std::int32_t>{'a', 300, 'b', 0xc0, 0x80}) == "a" + r + "b" + r + r);
}

TEST_CASE("text_to_shards: text files become byte shards with a validation tail, written atomically") {
  scratch_dir dir;
  std::string a, b;
  for (int i = 0; i < 300; ++i) a += "line " + std::to_string(i) + " of the first file\n";
  for (int i = 0; i < 100; ++i) b += "and the second, " + std::to_string(i) + "\n";
  testing::write_bytes(dir / "a.txt", a);
  testing::write_bytes(dir / "b.txt", b);
  data::text_to_shards_options o;
  o.prefix = "kjv";
  o.shard_tokens = 4000;
  o.val_fraction = 0.2;
  o.separator = "\n\n";
  const auto out = data::text_to_shards({dir / "a.txt", dir / "b.txt"}, dir / "shards", o);
  const std::string all = a + "\n\n" + b;
  CHECK(out.train_tokens + out.val_tokens == all.size());
  CHECK(out.val_tokens == std::uint64_t(std::llround(0.2 * double(all.size()))));
  CHECK(out.train.size() == (out.train_tokens + 3999) / 4000);
  CHECK(out.train[0].filename() == "kjv_train_000000.bin");
  CHECK(out.val[0].filename() == "kjv_val_000000.bin");
  std::string back;
  for (const auto* list : {&out.train, &out.val})
    for (const auto& p : *list) {
      const data::token_file f(p);
      CHECK(f.version() == 1);
      CHECK(f.size() <= 4000);
      back += data::byte_tokenizer{}.decode(all_tokens(f));
    }
  CHECK(back == all);
  for (const auto& e : fs::directory_iterator(dir / "shards"))
    CHECK(e.path().filename().string().find(".tmp.") == std::string::npos);

  // The shards feed the loader directly.
  const auto [train, val] = std::pair{data::token_dataset::open((dir / "shards").string() + "/kjv_train_*.bin"),
                                      data::token_dataset::open((dir / "shards").string() + "/kjv_val_*.bin")};
  CHECK(train.tokens() == out.train_tokens);
  CHECK(val.tokens() == out.val_tokens);

  o.version = 7;
  o.val_fraction = 0;
  const auto v7 = data::text_to_shards({dir / "a.txt"}, dir / "v7", o);
  CHECK(v7.val.empty());
  CHECK(data::token_file(v7.train[0]).version() == 7);

  CHECK_THROWS_WITH_AS(data::text_to_shards({dir / "nope.txt"}, dir / "x", o),
                       has("cannot open '" + (dir / "nope.txt").string() + "' (text file)"), invalid_argument);
  CHECK_THROWS_WITH_AS(data::text_to_shards({}, dir / "x", o), has("no input files"), invalid_argument);
  testing::write_bytes(dir / "empty.txt", "");
  CHECK_THROWS_WITH_AS(data::text_to_shards({dir / "empty.txt"}, dir / "x", o), has("hold no text"), invalid_argument);
  o.val_fraction = 1.5;
  CHECK_THROWS_WITH_AS(data::text_to_shards({dir / "a.txt"}, dir / "x", o),
                       has("val_fraction 1.5 (expected 0 <= f < 1)"), invalid_argument);
}

TEST_CASE("default corpus: extracted from the Debian packages, or an error that names the install command") {
  scratch_dir dir;
  try {
    const auto path = examples::default_corpus_path(dir.path);
    CHECK(path == dir / "kjv.txt");
    const std::string text = testing::read_bytes(path);
    CHECK(text.rfind("In the beginning God created the heaven and the earth.\n", 0) == 0);
    CHECK(std::count(text.begin(), text.end(), '\n') == 31102);
    CHECK(text.size() > 4'000'000);
    CHECK(examples::default_corpus_path(dir.path) == path);  // the second call reuses the file
  } catch (const invalid_argument& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(what.find("sudo apt-get install -y bible-kjv bible-kjv-text") != std::string::npos);
    MESSAGE("default corpus packages not installed: checked the error message only");
  }
}

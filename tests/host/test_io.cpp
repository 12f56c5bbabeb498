// io/: JSON, safetensors, atomic writes, Hugging Face config.json, checkpoints of a model enumerated by
// for_each_parameter, and the JSONL metrics writer.
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <subspace/io/checkpoint.hpp>
#include <subspace/io/hf_config.hpp>
#include <subspace/io/metrics.hpp>
#include <subspace/io/safetensors.hpp>
#include <subspace/nn/config.hpp>
#include <subspace/optim/adamw.hpp>
#include <subspace/util/file.hpp>
#include <subspace/util/json.hpp>

#include "support/files.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"

using namespace subspace;
using io::json;
namespace fs = std::filesystem;

namespace {

using testing::scratch_dir;

/// A doctest matcher for a message containing `s`.
using testing::has;

template <class T>
bool bits_equal(view<const T, host_space> a, view<const T, host_space> b) {
  if (!(a.shape() == b.shape())) return false;
  return std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// JSON

TEST_CASE("json: escapes, unicode and surrogate pairs decode to UTF-8 and re-encode") {
  const json j = json::parse(R"("q\" b\\ s\/ \b\f\n\r\t \u00e9 \u20ac \ud83d\ude00 \u0001")");
  CHECK(j.as_string() == "q\" b\\ s/ \b\f\n\r\t \xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 \x01");
  CHECK(j.dump() == R"("q\" b\\ s/ \b\f\n\r\t é € 😀 \u0001")");
  CHECK(json::parse(j.dump()) == j);
}

TEST_CASE("json: nesting, member order, lookups and pretty printing") {
  const json j = json::parse(R"( { "b" : [1, [2, {"c": null}], {}], "a": {"x": true, "y": false}, "e": [] } )");
  REQUIRE(j.is_object());
  CHECK(j.as_object()[0].first == "b");  // insertion order kept
  CHECK(j.at("b").at(1).at(1).at("c").is_null());
  CHECK(j.at("a").at("x").as_bool());
  CHECK(j.at("e").size() == 0);
  CHECK(j.dump() == R"({"b":[1,[2,{"c":null}],{}],"a":{"x":true,"y":false},"e":[]})");
  CHECK(j.dump(2) ==
        "{\n  \"b\": [\n    1,\n    [\n      2,\n      {\n        \"c\": null\n      }\n    ],\n    {}\n  ],\n"
        "  \"a\": {\n    \"x\": true,\n    \"y\": false\n  },\n  \"e\": []\n}");
  CHECK(json::parse(j.dump(2)) == j);
  CHECK_THROWS_WITH_AS(j.at("missing"), has("missing key \"missing\""), invalid_argument);
  CHECK_THROWS_WITH_AS(j.at("b").as_string(), has("expected a string, got an array"), invalid_argument);
  // deep nesting is fine up to the limit, an error beyond it
  CHECK(json::parse(std::string(500, '[') + std::string(500, ']')).is_array());
  CHECK_THROWS_WITH_AS(json::parse(std::string(600, '[') + std::string(600, ']')), has("nesting"), invalid_argument);
}

TEST_CASE("json: numbers keep integers exact and doubles shortest") {
  CHECK(json::parse("0").as_int() == 0);
  CHECK(json::parse("-0").is_int());
  CHECK(json::parse("-12").as_int() == -12);
  CHECK(json::parse("9223372036854775807").as_int() == std::numeric_limits<std::int64_t>::max());
  CHECK(json::parse("-9223372036854775808").as_int() == std::numeric_limits<std::int64_t>::min());
  const json big = json::parse("9223372036854775808");  // beyond int64: a double
  CHECK(!big.is_int());
  CHECK(big.as_double() == 9223372036854775808.0);
  CHECK(json::parse("1.5e3").as_double() == 1500.0);
  CHECK(json::parse("1.5e3").as_int() == 1500);  // integral double accepted as an integer
  CHECK(json::parse("2E-2").as_double() == 0.02);
  CHECK(json::parse("1e-400").as_double() == 0.0);  // underflow reads as zero
  CHECK_THROWS_WITH_AS(json::parse("1e400"), has("outside the range of a double"), invalid_argument);
  CHECK_THROWS_AS(json::parse("1.5").as_int(), invalid_argument);
  for (const char* bad : {"01", "1.", ".5", "+1", "-", "1e", "1e+", "0x10", "NaN", "Infinity", "--1"}) {
    CAPTURE(bad);
    CHECK_THROWS_AS(json::parse(bad), invalid_argument);
  }
  CHECK(json(1e-5f).dump() == "1e-05");  // the float's shortest decimal, not 9.99999974737875e-06
  CHECK(json(500000.0f).dump() == "500000.0");
  CHECK(json(0.1).dump() == "0.1");
  CHECK(json(3e-4).dump() == "0.0003");
  CHECK(json(-1.5e-7).dump() == "-1.5e-07");
  CHECK(json(1e16).dump() == "1e+16");
  CHECK(json(123456789012345.0).dump() == "123456789012345.0");
  CHECK(json(6.02214076e23).dump() == "6.02214076e+23");
  CHECK(json(-0.0).dump() == "-0.0");
  CHECK(json(5e-324).dump() == "5e-324");
  for (const double x : {0.1, 1.0 / 3.0, 2.5e-300, 1.7976931348623157e308, 123.456, -7e-5})
    CHECK(json::parse(json(x).dump()).as_double() == x);  // exact round trip
  CHECK(json(3.0).dump() == "3.0");
  CHECK(json(std::int64_t(-7)).dump() == "-7");
  CHECK(json(std::nan("")).dump() == "null");
  CHECK(json(INFINITY).dump() == "null");
  CHECK(json(1.0) == json(1));  // numeric equality across integer and double
}

TEST_CASE("json: duplicate keys are found among many (in time linear in the keys), before and past 16 members") {
  // 200,000 keys: a pairwise duplicate check (the old parser's) takes minutes here; the hash set, milliseconds.
  const auto object_of = [](int keys, int duplicate_of) {
    std::string text = "{";
    for (int i = 0; i < keys; ++i) text += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":" + std::to_string(i);
    if (duplicate_of >= 0) text += ",\"k" + std::to_string(duplicate_of) + "\":0";
    return text + "}";
  };
  const json big = json::parse(object_of(200000, -1));
  CHECK(big.as_object().size() == 200000);
  CHECK(big.at("k199999").as_int() == 199999);
  CHECK_THROWS_WITH_AS(json::parse(object_of(200000, 3)), has("duplicate key \"k3\""), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse(object_of(15, 14)), has("duplicate key \"k14\""), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse(object_of(16, 0)), has("duplicate key \"k0\""), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse(object_of(17, 16)), has("duplicate key \"k16\""), invalid_argument);
}

TEST_CASE("json: malformed documents name the line, the column and what was expected") {
  CHECK_THROWS_WITH_AS(json::parse("{\"a\": 1,\n \"b\" 2}", "cfg.json"),
                       has("cfg.json: invalid JSON at line 2, column 6: expected ':' after the key \"b\""),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse("[1, 2,]"), has("expected a value"), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse("{\"a\":1,}"), has("expected a string key"), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse("{\"a\":1,\"a\":2}"), has("duplicate key \"a\""), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse("\"abc"), has("unterminated string"), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse("\"a\nb\""), has("control character"), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse(R"("\x")"), has("invalid escape"), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse(R"("\ud83d")"), has("low surrogate"), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse(R"("\u12g4")"), has("hex digit"), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse("{} x"), has("unexpected text after"), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse(""), has("got end of input"), invalid_argument);
  CHECK_THROWS_WITH_AS(json::parse("tru"), has("expected 'true'"), invalid_argument);
}

// ---------------------------------------------------------------------------------------------------------------
// Atomic writes

TEST_CASE("atomic_write: a writer that throws midway leaves the old file and no temporary file") {
  scratch_dir dir;
  const auto target = dir / "state.bin";
  io::atomic_write_text(target, "old content");
  CHECK_THROWS_WITH_AS(io::atomic_write(target,
                                        [](io::file_sink& out) {
                                          out.write("partial new con");
                                          throw invalid_argument("simulated failure midway");
                                        }),
                       has("simulated failure midway"), invalid_argument);
  CHECK(testing::read_bytes(target) == "old content");
  CHECK(dir.listing() == std::vector<std::string>{"state.bin"});
  // and a new file is not created at all
  CHECK_THROWS_AS(io::atomic_write(dir / "new.bin", [](io::file_sink&) { throw std::runtime_error("x"); }),
                  std::runtime_error);
  CHECK(dir.listing() == std::vector<std::string>{"state.bin"});
  // directories are created; a success replaces the content
  io::atomic_write_text(dir / "a" / "b" / "c.txt", "hello");
  CHECK(testing::read_bytes(dir / "a" / "b" / "c.txt") == "hello");
  io::atomic_write_text(target, "new");
  CHECK(testing::read_bytes(target) == "new");
  CHECK_THROWS_WITH_AS(io::read_text(dir / "nope.txt", "config"), has("nope.txt' (config)"), invalid_argument);
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors

TEST_CASE("safetensors: header and data match a hand-computed layout byte for byte") {
  scratch_dir dir;
  host_tensor<float> a({2});
  a(0) = 1.0f;
  a(1) = -2.0f;
  host_tensor<bf16> b({1, 3});
  b(0, 0) = bf16(1.0f);
  b(0, 1) = bf16(0.5f);
  b(0, 2) = bf16(-3.0f);
  host_tensor<std::int32_t> c({2});
  c(0) = 7;
  c(1) = -1;

  io::safetensors_writer w;
  w.metadata("format", "pt");
  w.add("a", a.v());
  w.add("b", b.v());  // 2-byte elements go after the 4-byte ones: every tensor stays aligned to its element size
  w.add("c", c.v());
  const std::string expected_header =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("c":{"dtype":"I32","shape":[2],"data_offsets":[8,16]},)"
      R"("b":{"dtype":"BF16","shape":[1,3],"data_offsets":[16,22]}})"
      "   ";  // 197 bytes of JSON + 3 spaces = 200, a multiple of 8
  CHECK(w.header() == expected_header);
  w.write(dir / "t.safetensors");

  const unsigned char expected[] = {
      0xc8, 0, 0, 0, 0, 0, 0, 0,  // header length 200, little-endian u64
  };
  const unsigned char data[] = {
      0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0,  // a: 1.0f, -2.0f
      0x07, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff,  // c: 7, -1
      0x80, 0x3f, 0x00, 0x3f, 0x40, 0xc0,              // b: bf16 1.0, 0.5, -3.0
  };
  const std::string file = testing::read_bytes(dir / "t.safetensors");
  REQUIRE(file.size() == 8 + 200 + 22);
  CHECK(std::memcmp(file.data(), expected, 8) == 0);
  CHECK(file.substr(8, 200) == expected_header);
  CHECK(std::memcmp(file.data() + 208, data, sizeof data) == 0);
}

TEST_CASE("safetensors: round trip of several dtypes, strided views, scalars and empty tensors") {
  scratch_dir dir;
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  auto f32 = testing::random_tensor<float>({3, 5}, seed);
  auto f64 = testing::random_tensor<double>({4}, seed + 1);
  auto b16 = testing::random_tensor<bf16>({2, 3, 4}, seed + 2);
  auto h16 = testing::random_tensor<fp16>({7}, seed + 3);
  host_tensor<std::int32_t> i32({2, 2});
  for (int i = 0; i < 4; ++i) i32.data()[i] = -1000 + 777 * i;
  host_tensor<std::int64_t> i64({3});
  for (int i = 0; i < 3; ++i) i64.data()[i] = (std::int64_t(1) << 40) * (i - 1);
  host_tensor<std::uint8_t> u8({5});
  for (int i = 0; i < 5; ++i) u8.data()[i] = std::uint8_t(50 * i);
  host_tensor<std::uint16_t> u16({2});
  u16(0) = 65535;
  u16(1) = 3;
  host_tensor<float> scalar(shape{});
  scalar.data()[0] = 42.5f;
  host_tensor<float> empty({0, 4});

  io::safetensors_writer w;
  w.metadata("step", "12");
  w.add("f32", f32.v());
  w.add("f32.T", f32.v().transposed());  // strided: written in row-major order of the transposed view
  w.add("f64", f64.v());
  w.add("bf16", b16.v());
  w.add("fp16", h16.v());
  w.add("i32", i32.v());
  w.add("i64", i64.v());
  w.add("u8", u8.v());
  w.add("u16", u16.v());
  w.add("scalar", scalar.v());
  w.add("empty", empty.v());
  w.add_as<bf16>("f32_as_bf16", f32.v());
  CHECK_THROWS_WITH_AS(w.add("f32", f32.v()), has("'f32' added twice"), invalid_argument);
  CHECK_THROWS_AS(w.add("__metadata__", f32.v()), invalid_argument);
  w.write(dir / "m.safetensors");

  const io::safetensors_file f(dir / "m.safetensors");
  CHECK(f.tensors().size() == 12);
  CHECK(f.metadata("step") == std::optional<std::string>("12"));
  CHECK(!f.metadata("nope").has_value());
  for (const auto& t : f.tensors()) CHECK(t.begin % io::element_size(t.dtype) == 0);  // aligned

  CHECK(bits_equal<float>(f.read<float>("f32").v(), f32.v()));
  auto ft = f.read<float>("f32.T");
  CHECK(ft.shape() == shape{5, 3});
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 5; ++j) CHECK(ft(j, i) == f32(i, j));
  CHECK(bits_equal<double>(f.read<double>("f64").v(), f64.v()));
  CHECK(bits_equal<bf16>(f.read<bf16>("bf16").v(), b16.v()));
  CHECK(bits_equal<fp16>(f.read<fp16>("fp16").v(), h16.v()));
  CHECK(bits_equal<std::int32_t>(f.read<std::int32_t>("i32").v(), i32.v()));
  CHECK(bits_equal<std::int64_t>(f.read<std::int64_t>("i64").v(), i64.v()));
  CHECK(bits_equal<std::uint8_t>(f.read<std::uint8_t>("u8").v(), u8.v()));
  CHECK(bits_equal<std::uint16_t>(f.read<std::uint16_t>("u16").v(), u16.v()));
  CHECK(f.read<float>("scalar").data()[0] == 42.5f);
  CHECK(f.read<float>("empty").shape() == shape{0, 4});
  CHECK(f.at("f32_as_bf16").dtype == io::st_dtype::BF16);

  // Conversions on load: bf16/fp16/f64 -> float exactly (or rounded once), f32 -> bf16 rounds to nearest even.
  const auto b_as_f = f.read<float>("bf16");
  for (std::int64_t i = 0; i < b16.numel(); ++i) CHECK(b_as_f.data()[i] == float(b16.data()[i]));
  const auto h_as_f = f.read<float>("fp16");
  for (std::int64_t i = 0; i < h16.numel(); ++i) CHECK(h_as_f.data()[i] == float(h16.data()[i]));
  const auto d_as_f = f.read<float>("f64");
  for (std::int64_t i = 0; i < f64.numel(); ++i) CHECK(d_as_f.data()[i] == float(f64.data()[i]));
  const auto f_as_b = f.read<bf16>("f32");
  const auto saved_b = f.read<bf16>("f32_as_bf16");
  for (std::int64_t i = 0; i < f32.numel(); ++i) {
    CHECK(f_as_b.data()[i].bits == bf16(f32.data()[i]).bits);
    CHECK(saved_b.data()[i].bits == bf16(f32.data()[i]).bits);
  }
  const auto i_as_i64 = f.read<std::int64_t>("i32");  // widening integers
  CHECK(i_as_i64.data()[3] == i32.data()[3]);
  // Loading into a strided destination
  host_tensor<float> dst({5, 3});
  f.read("f32", dst.v().transposed());
  CHECK(bits_equal<float>(ft.v(), dst.v()));

  // Errors name the tensor, the file and what was expected.
  host_tensor<float> wrong({5, 4});
  CHECK_THROWS_WITH_AS(f.read("f32", wrong.v()),
                       has("tensor 'f32' in '" + (dir / "m.safetensors").string() +
                           "': shape mismatch: the file has [3, 5], expected [5, 4]"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(f.read<float>("nope"), has("has no tensor 'nope'"), invalid_argument);
  CHECK_THROWS_WITH_AS(f.read<float>("i32"), has("dtype I32 cannot load as floating point"), invalid_argument);
  CHECK_THROWS_WITH_AS(f.read<std::int16_t>("i64"), has("does not fit I16"), invalid_argument);
}

TEST_CASE("safetensors: malformed files are rejected with the reason") {
  scratch_dir dir;
  const auto file = dir / "bad.safetensors";
  const auto le64 = [](std::uint64_t n) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[std::size_t(i)] = char((n >> (8 * i)) & 0xff);
    return s;
  };
  const auto with_header = [&](const std::string& h, std::size_t data_bytes) {
    return le64(h.size()) + h + std::string(data_bytes, '\x01');
  };
  const auto fails_with = [&](const std::string& bytes, const std::string& text) {
    testing::write_bytes(file, bytes);
    CAPTURE(text);
    CHECK_THROWS_WITH_AS(io::safetensors_file{file}, has(text), invalid_argument);
  };
  fails_with("abc", "too short");
  fails_with(le64(1000) + "{}", "exceeds the file");
  fails_with(le64(200'000'000) + "{}", "exceeds the format's limit");
  fails_with(with_header("[]      ", 0), "must start with '{'");
  fails_with(with_header(R"({"x":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", 4), "unknown dtype \"F33\"");
  fails_with(with_header(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4),
             "span 4 bytes, expected 8 for F32 [2]");
  fails_with(with_header(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
             "starts at byte 4 of the data buffer, expected 0");
  fails_with(with_header(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 6),
             "the tensors cover 4 bytes, the data buffer has 6");
  fails_with(with_header(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4), "non-negative");
  fails_with(with_header(R"({"__metadata__":{"a":1}})", 0), "__metadata__[\"a\"] must be a string");
  fails_with(with_header(R"({"x":{"dtype":"F32","shape":[1]}})", 4), "data_offsets");
  // Counts that would wrap a 64-bit size (each passed validation before, and a later read asked for 2^63 bytes).
  fails_with(with_header(R"({"x":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}})", 0),
             "shape [2305843009213693952] of F64 holds more bytes than a 64-bit size can count");
  fails_with(with_header(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0),
             "holds more bytes than a 64-bit size can count");
  testing::write_bytes(
      file, with_header(R"({"x":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})", 0));
  CHECK(io::safetensors_file{file}.at("x").numel() == 0);  // empty, whatever its other extents
  CHECK_THROWS_WITH_AS(io::safetensors_file{dir / "missing.safetensors"},
                       has("cannot open '" + (dir / "missing.safetensors").string() + "'"), invalid_argument);

  // A truncated file: a good one with its last bytes cut off.
  host_tensor<float> t({4});
  for (int i = 0; i < 4; ++i) t(i) = float(i);
  io::safetensors_writer w;
  w.add("t", t.v());
  w.write(file);
  const std::string good = testing::read_bytes(file);
  testing::write_bytes(file, good.substr(0, good.size() - 3));
  CHECK_THROWS_WITH_AS(io::safetensors_file{file}, has("truncated file or bad offsets"), invalid_argument);
}

TEST_CASE("safetensors: a producer that fails midway leaves the previous file intact") {
  scratch_dir dir;
  const auto file = dir / "model.safetensors";
  host_tensor<float> t({4});
  for (int i = 0; i < 4; ++i) t(i) = float(i);
  {
    io::safetensors_writer w;
    w.add("t", t.v());
    w.write(file);
  }
  const std::string before = testing::read_bytes(file);
  io::safetensors_writer w;
  w.add("t", t.v());
  w.add_bytes("u", io::st_dtype::F32, {1024}, [](io::file_sink& out) {
    const std::vector<float> half(512, 1.0f);
    out.write(half.data(), half.size() * sizeof(float));
    throw std::runtime_error("simulated device failure while copying 'u'");
  });
  CHECK_THROWS_WITH(w.write(file), has("simulated device failure"));
  CHECK(testing::read_bytes(file) == before);
  CHECK(dir.listing() == std::vector<std::string>{"model.safetensors"});

  io::safetensors_writer short_writer;
  short_writer.add_bytes("v", io::st_dtype::F32, {4}, [](io::file_sink& out) { out.write("abc", 3); });
  CHECK_THROWS_WITH_AS(short_writer.write(file), has("should have written 16 bytes, wrote 3"), invalid_argument);
  CHECK(testing::read_bytes(file) == before);
  CHECK(dir.listing() == std::vector<std::string>{"model.safetensors"});
}

#ifndef SUBSPACE_TEST_DATA_DIR
#define SUBSPACE_TEST_DATA_DIR "tests/data"
#endif

TEST_CASE("safetensors: compatible with the reference implementation (golden files checked by Python)") {
  // tests/data/subspace_written.safetensors was written by this writer and checked with the `safetensors` package
  // (tests/data/check_safetensors.py check); the writer must still produce it byte for byte. Regenerate with
  // SUBSPACE_UPDATE_GOLDEN=1 and check it again with Python.
  const fs::path data_dir = SUBSPACE_TEST_DATA_DIR;
  host_tensor<float> f32({2, 3});
  for (int i = 0; i < 6; ++i) f32.data()[i] = (float(i) - 2.5f) * 0.75f;
  host_tensor<bf16> b16({4});
  const float bvals[] = {1.0f, -2.5f, 0.15625f, 256.0f};
  for (int i = 0; i < 4; ++i) b16(i) = bf16(bvals[i]);
  host_tensor<fp16> h16({3});
  h16(0) = fp16(0.5f);
  h16(1) = fp16(-65504.0f);
  h16(2) = fp16(6.103515625e-05f);
  host_tensor<double> f64({2});
  f64(0) = 0.1;
  f64(1) = -1e300;
  host_tensor<std::int32_t> i32({2, 2});
  i32(0, 0) = std::numeric_limits<std::int32_t>::min();
  i32(0, 1) = -1;
  i32(1, 0) = 0;
  i32(1, 1) = std::numeric_limits<std::int32_t>::max();
  host_tensor<std::int64_t> i64({2});
  i64(0) = -(std::int64_t(1) << 40);
  i64(1) = std::int64_t(1) << 62;
  host_tensor<std::uint8_t> u8({3});
  u8(0) = 0;
  u8(1) = 128;
  u8(2) = 255;
  host_tensor<float> scalar(shape{});
  scalar.data()[0] = 42.5f;
  host_tensor<float> empty({0, 4});
  io::safetensors_writer w;
  w.metadata("format", "pt");
  w.metadata("producer", "subspace");
  w.add("f32", f32.v());
  w.add("bf16", b16.v());
  w.add("f16", h16.v());
  w.add("f64", f64.v());
  w.add("i32", i32.v());
  w.add("i64", i64.v());
  w.add("u8", u8.v());
  w.add("scalar", scalar.v());
  w.add("empty", empty.v());
  const char* update = std::getenv("SUBSPACE_UPDATE_GOLDEN");
  if (update && std::string(update) == "1") {
    w.write(data_dir / "subspace_written.safetensors");
    MESSAGE("wrote " << (data_dir / "subspace_written.safetensors").string());
  }
  scratch_dir dir;
  w.write(dir / "now.safetensors");
  const std::string golden = testing::read_bytes(data_dir / "subspace_written.safetensors");
  REQUIRE_MESSAGE(!golden.empty(), "missing golden file in " << data_dir.string());
  CHECK(testing::read_bytes(dir / "now.safetensors") == golden);

  // tests/data/python_written.safetensors was written by safetensors.numpy.save_file
  // (tests/data/check_safetensors.py write): our reader loads it.
  const io::safetensors_file py(data_dir / "python_written.safetensors");
  CHECK(py.metadata("who") == std::optional<std::string>("python"));
  const auto pf32 = py.read<float>("py_f32");
  CHECK(pf32.shape() == shape{3, 2});
  for (int i = 0; i < 6; ++i) CHECK(pf32.data()[i] == 0.25f * float(i));
  const auto pf16 = py.read<float>("py_f16");
  CHECK(pf16(0) == 1.5f);
  CHECK(pf16(1) == -0.25f);
  CHECK(py.read<double>("py_f64")(0) == 1.0 / 3.0);
  const auto pi64 = py.read<std::int64_t>("py_i64");
  CHECK(pi64(2) == (std::int64_t(3) << 40));
  CHECK(pi64(1) == -2);
  CHECK(py.read<std::int32_t>("py_u8")(1) == 200);
  const auto pbool = py.read<bool>("py_bool");
  CHECK(pbool(0));
  CHECK(!pbool(1));
}

// ---------------------------------------------------------------------------------------------------------------
// Hugging Face config.json

TEST_CASE("config.json: every LlamaConfig field is written and reads back into the same llama_config") {
  for (const auto& name : nn::presets::names()) {
    CAPTURE(name);
    nn::llama_config cfg = nn::presets::by_name(name);
    const json j = io::to_hf_config(cfg);
    const auto back = io::llama_config_from_hf(json::parse(j.dump(2)));
    CHECK(io::architecture_difference(cfg, back).empty());
    CHECK(back.name == cfg.name);
  }
  const nn::llama_config cfg = nn::presets::tiny();
  io::hf_config_options o;
  o.torch_dtype = "bfloat16";
  const json j = io::to_hf_config(cfg, o);
  CHECK(j.at("architectures").dump() == R"(["LlamaForCausalLM"])");
  CHECK(j.at("model_type").as_string() == "llama");
  CHECK(j.at("vocab_size").as_int() == 256);
  CHECK(j.at("hidden_size").as_int() == 128);
  CHECK(j.at("intermediate_size").as_int() == 344);
  CHECK(j.at("num_hidden_layers").as_int() == 4);
  CHECK(j.at("num_attention_heads").as_int() == 4);
  CHECK(j.at("num_key_value_heads").as_int() == 2);
  CHECK(j.at("head_dim").as_int() == 32);
  CHECK(j.at("max_position_embeddings").as_int() == 256);
  CHECK(j.at("rms_norm_eps").dump() == "1e-05");
  CHECK(j.at("rope_theta").dump() == "500000.0");
  CHECK(j.at("rope_scaling").is_null());
  CHECK(j.at("hidden_act").as_string() == "silu");
  CHECK(!j.at("attention_bias").as_bool());
  CHECK(!j.at("mlp_bias").as_bool());
  CHECK(!j.at("tie_word_embeddings").as_bool());
  CHECK(j.at("bos_token_id").is_null());
  CHECK(j.at("eos_token_id").is_null());
  CHECK(j.at("torch_dtype").as_string() == "bfloat16");

  nn::llama_config scaled = nn::presets::tiny();
  scaled.rope.llama31_scaling = true;
  scaled.rope.factor = 32.0f;
  scaled.rope.original_max_position = 8192;
  scaled.tied_embeddings = true;
  io::hf_config_options ids;
  ids.bos_token_id = 1;
  ids.eos_token_id = 2;
  const json js = io::to_hf_config(scaled, ids);
  CHECK(js.at("rope_scaling").dump() ==
        R"({"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,)"
        R"("original_max_position_embeddings":8192})");
  CHECK(js.at("bos_token_id").as_int() == 1);
  scratch_dir dir;
  io::write_hf_config(dir / "config.json", scaled, ids);
  const auto back = io::read_hf_config(dir / "config.json");
  CHECK(io::architecture_difference(scaled, back).empty());
  CHECK(back.rope.factor == 32.0f);
  CHECK(!io::architecture_difference(scaled, cfg).empty());
}

TEST_CASE("config.json: HF defaults fill optional fields, unsupported models are named errors") {
  const auto parse = [](const std::string& text) { return io::llama_config_from_hf(json::parse(text), "cfg.json"); };
  const auto c = parse(R"({"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":512,
      "intermediate_size":1376,"num_hidden_layers":8,"num_attention_heads":8})");
  CHECK(c.n_kv_heads == 8);                    // HF default: num_attention_heads
  CHECK(c.norm_eps == doctest::Approx(1e-6));  // HF default
  CHECK(c.rope.theta == 10000.0f);
  CHECK(c.max_seq == 2048);
  CHECK(!c.tied_embeddings);
  const std::string base = R"("vocab_size":256,"hidden_size":64,"intermediate_size":172,"num_hidden_layers":2,
      "num_attention_heads":4,"num_key_value_heads":2)";
  CHECK_THROWS_WITH_AS(parse(R"({"architectures":["MistralForCausalLM"],)" + base + "}"),
                       has("cfg.json: \"architectures\" is [\"MistralForCausalLM\"] (expected "
                           "[\"LlamaForCausalLM\"])"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(parse(R"({"model_type":"llama","hidden_act":"gelu",)" + base + "}"),
                       has("\"hidden_act\" is \"gelu\" (expected \"silu\")"), invalid_argument);
  CHECK_THROWS_WITH_AS(parse(R"({"model_type":"llama","head_dim":32,)" + base + "}"),
                       has("\"head_dim\" is 32 (expected hidden_size / num_attention_heads = 64 / 4)"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(
      parse(R"({"model_type":"llama","rope_scaling":{"rope_type":"linear","factor":2.0},)" + base + "}"),
      has("rope_type \"linear\" (supported: \"llama3\", or null)"), invalid_argument);
  CHECK_THROWS_WITH_AS(parse(R"({"model_type":"llama","attention_bias":true,)" + base + "}"),
                       has("\"attention_bias\" is true"), invalid_argument);
  CHECK_THROWS_WITH_AS(parse(R"({"model_type":"llama","hidden_size":"64"})"),
                       has("\"hidden_size\" must be a positive integer, got a string"), invalid_argument);
  CHECK_THROWS_WITH_AS(parse(R"({"model_type":"llama","vocab_size":256,"hidden_size":64,"intermediate_size":172,
      "num_hidden_layers":2,"num_attention_heads":5})"),
                       has("cfg.json: the configuration is not usable"), invalid_argument);
  CHECK_THROWS_WITH_AS(parse(R"({"vocab_size":1})"), has("names a Llama model"), invalid_argument);
  // Out of range: an integer of 2^63 or more has no int64 value, a float above FLT_MAX would become inf.
  for (const std::string big : {"9223372036854775808", "18446744073709551616", "1e300"})
    CHECK_THROWS_WITH_AS(parse(R"({"model_type":"llama",)" + base + R"(,"max_position_embeddings":)" + big + "}"),
                         has("\"max_position_embeddings\" must be a positive integer below 2^63"), invalid_argument);
  CHECK_THROWS_WITH_AS(parse(R"({"model_type":"llama",)" + base + R"(,"rms_norm_eps":1e39})"),
                       has("\"rms_norm_eps\" must be a positive number within float range, got 1e+39"),
                       invalid_argument);

  // transformers 5 writes rope_parameters (as saved by LlamaConfig.save_pretrained, transformers 5.23).
  const auto v5 = parse(R"({"architectures":["LlamaForCausalLM"],"attention_bias":false,"attention_dropout":0.0,
      "bos_token_id":null,"dtype":"bfloat16","eos_token_id":null,"head_dim":32,"hidden_act":"silu","hidden_size":128,
      "initializer_range":0.02,"intermediate_size":344,"max_position_embeddings":256,"mlp_bias":false,
      "model_type":"llama","num_attention_heads":4,"num_hidden_layers":4,"num_key_value_heads":2,"pad_token_id":null,
      "pretraining_tp":1,"rms_norm_eps":1e-05,"rope_parameters":{"factor":32.0,"high_freq_factor":4.0,
      "low_freq_factor":1.0,"original_max_position_embeddings":8192,"rope_theta":500000.0,"rope_type":"llama3"},
      "subspace_name":"tiny","tie_word_embeddings":true,"transformers_version":"5.23.0","use_cache":true,
      "vocab_size":256})");
  CHECK(v5.rope.theta == 500000.0f);
  CHECK(v5.rope.llama31_scaling);
  CHECK(v5.rope.factor == 32.0f);
  CHECK(v5.rope.original_max_position == 8192);
  CHECK(v5.tied_embeddings);
  const auto v5_plain = parse("{\"model_type\":\"llama\"," + base +
                              R"(,"rope_parameters":{"rope_theta":250000.0,"rope_type":"default"}})");
  CHECK(v5_plain.rope.theta == 250000.0f);
  CHECK(!v5_plain.rope.llama31_scaling);
  CHECK_THROWS_WITH_AS(
      parse("{\"model_type\":\"llama\"," + base + R"(,"rope_parameters":{"rope_theta":1.0,"rope_type":"yarn"}})"),
      has("\"rope_parameters\" has rope_type \"yarn\" (supported: \"llama3\", \"default\")"), invalid_argument);
}

// ---------------------------------------------------------------------------------------------------------------
// Checkpoints of a model enumerated by for_each_parameter

namespace {

/// A stand-in for the Llama model: a few parameters with Hugging Face names, shapes from the config.
struct fake_model {
  std::vector<std::string> names;
  std::vector<host_tensor<float>> values, grads;
  std::vector<parameter_info> infos;

  explicit fake_model(const nn::llama_config& c, std::uint64_t seed, bool extra_param = false) {
    const auto add = [&](std::string name, const shape& s) {
      infos.push_back(optim::param_info_for(name, s));
      names.push_back(std::move(name));
      values.push_back(testing::random_tensor<float>(s, seed + names.size()));
      grads.push_back(testing::random_tensor<float>(s, seed + 1000 + names.size()));
    };
    add("model.embed_tokens.weight", {c.vocab, c.d_model});
    for (std::int64_t l = 0; l < c.n_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      add(p + "input_layernorm.weight", {c.d_model});
      add(p + "self_attn.q_proj.weight", {c.d_model, c.d_model});
      add(p + "self_attn.k_proj.weight", {c.kv_dim(), c.d_model});
      add(p + "mlp.down_proj.weight", {c.d_model, c.ffn_hidden});
    }
    add("model.norm.weight", {c.d_model});
    if (!c.tied_embeddings) add("lm_head.weight", {c.vocab, c.d_model});
    if (extra_param) add("model.extra.weight", {3});
  }

  // What checkpoints read of a parameter store.
  std::size_t size() const { return names.size(); }
  const parameter_info& info(std::size_t i) const { return infos[i]; }
  view<float, host_space> value(std::size_t i) { return values[i].v(); }

  template <class F>
  void for_each_parameter(F&& f) {
    for (std::size_t i = 0; i < names.size(); ++i) f(names[i], values[i].v(), grads[i].v(), infos[i]);
  }
};

using adam_state = optim::adamw::state<host_space>;

std::vector<adam_state> init_states(const optim::adamw& opt, fake_model& m) {
  std::vector<adam_state> states;
  m.for_each_parameter([&](const std::string& name, auto value, auto, const parameter_info&) {
    states.push_back(opt.init(exec::host{}, optim::param_info_for(name, value.shape())));
  });
  return states;
}

void adam_steps(const optim::adamw& opt, fake_model& m, std::vector<adam_state>& states, std::int64_t first,
                int count) {
  for (int s = 0; s < count; ++s) {
    std::size_t i = 0;
    m.for_each_parameter([&](const std::string&, auto value, auto grad, const parameter_info& info) {
      opt.step(exec::host{}, value, view<const float, host_space>(grad), states[i++], info,
               optim::step_context{1e-2f, first + s});
    });
  }
}

}  // namespace

TEST_CASE("checkpoint: save and load a model with AdamW state, training continues bit-identically") {
  scratch_dir dir;
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const nn::llama_config cfg = nn::presets::micro();
  const optim::adamw opt;
  fake_model a(cfg, seed);
  auto sa = init_states(opt, a);
  adam_steps(opt, a, sa, 1, 3);

  io::trainer_state ts;
  ts.step = 3;
  ts.tokens = 3 * 4 * 16;
  ts.seed = 0xfedcba9876543210ull;  // above INT64_MAX: stored exactly as a decimal string
  ts.rng_offset = 123456789;
  ts.train_data = data::loader_position{2, 40, 96, true, 77};
  ts.extra.set("wall_s", json(12.5));
  ts.extra.set("lr_schedule", json("cosine"));
  const auto ckpt = dir / "ckpt";
  io::save_checkpoint(exec::host{}, ckpt, cfg, a, sa, ts);
  CHECK(dir.listing() == std::vector<std::string>{"ckpt"});
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(ckpt)) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  CHECK(files == std::vector<std::string>{"config.json", "model.safetensors", "trainer_state.json",
                                          "trainer_state.safetensors"});
  {
    const io::safetensors_file mf(ckpt / "model.safetensors");
    CHECK(mf.metadata("format") == std::optional<std::string>("pt"));
    CHECK(mf.at("model.layers.1.self_attn.q_proj.weight").shape == std::vector<std::int64_t>{16, 16});
    const io::safetensors_file sf(ckpt / "trainer_state.safetensors");
    CHECK(sf.find("model.norm.weight.exp_avg") != nullptr);
    CHECK(sf.find("model.norm.weight.exp_avg_sq") != nullptr);
    CHECK(sf.tensors().size() == 2 * a.names.size());
  }

  fake_model b(cfg, seed + 99);  // different weights
  auto sb = init_states(opt, b);
  const io::trainer_state back = io::load_checkpoint(exec::host{}, ckpt, cfg, b, sb);
  CHECK(back.step == 3);
  CHECK(back.tokens == ts.tokens);
  CHECK(back.seed == ts.seed);
  CHECK(back.rng_offset == ts.rng_offset);
  CHECK(back.train_data == ts.train_data);
  CHECK(back.extra == ts.extra);
  for (std::size_t i = 0; i < a.names.size(); ++i) {
    CAPTURE(a.names[i]);
    CHECK(bits_equal<float>(a.values[i].v(), b.values[i].v()));
    CHECK(bits_equal<float>(sa[i].m.v(), sb[i].m.v()));
    CHECK(bits_equal<float>(sa[i].v.v(), sb[i].v.v()));
  }
  // States keyed by name work too.
  std::map<std::string, adam_state> by_name;
  for (std::size_t i = 0; i < b.names.size(); ++i)
    by_name.emplace(b.names[i], opt.init(exec::host{}, optim::param_info_for(b.names[i], b.values[i].shape())));
  fake_model c(cfg, seed + 5);
  io::load_checkpoint(exec::host{}, ckpt, cfg, c, by_name);
  for (std::size_t i = 0; i < a.names.size(); ++i) CHECK(bits_equal<float>(by_name.at(a.names[i]).v.v(), sa[i].v.v()));

  // Continuing from the checkpoint gives the same bits as never stopping.
  b.grads.clear();
  for (auto& g : a.grads) {
    host_tensor<float> copy_of(g.shape());
    copy(exec::host{}, g.v(), copy_of.v());
    b.grads.push_back(std::move(copy_of));
  }
  adam_steps(opt, a, sa, 4, 2);
  adam_steps(opt, b, sb, 4, 2);
  for (std::size_t i = 0; i < a.names.size(); ++i) CHECK(bits_equal<float>(a.values[i].v(), b.values[i].v()));
}

TEST_CASE("checkpoint: with_values saves and restores other value tensors (fp32 masters) under the model's names") {
  scratch_dir dir;
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const nn::llama_config cfg = nn::presets::micro();
  fake_model m(cfg, seed);
  std::vector<host_tensor<float>> masters;
  for (std::size_t i = 0; i < m.names.size(); ++i)
    masters.push_back(testing::random_tensor<float>(m.values[i].shape(), seed + 500 + i));
  auto adapter = io::with_values(m, masters);
  io::trainer_state ts;
  ts.step = 9;
  io::save_checkpoint(exec::host{}, dir / "ckpt", cfg, adapter, ts);
  const io::safetensors_file f(dir / "ckpt" / "model.safetensors");
  CHECK(bits_equal<float>(f.read<float>("model.norm.weight").v(), masters[m.names.size() - 2].v()));

  std::vector<host_tensor<float>> restored;
  for (std::size_t i = 0; i < m.names.size(); ++i) restored.emplace_back(m.values[i].shape());
  auto back = io::with_values(m, restored);
  CHECK(io::load_checkpoint(exec::host{}, dir / "ckpt", cfg, back).step == 9);
  for (std::size_t i = 0; i < m.names.size(); ++i) CHECK(bits_equal<float>(restored[i].v(), masters[i].v()));
  restored.pop_back();
  auto short_adapter = io::with_values(m, restored);
  CHECK_THROWS_WITH_AS(io::load_checkpoint(exec::host{}, dir / "ckpt", cfg, short_adapter),
                       has("with_values: " + std::to_string(restored.size()) +
                           " values, but parameter "
                           "'lm_head.weight' is number"),
                       invalid_argument);
}

TEST_CASE("checkpoint: mismatches are reported with the tensor and both shapes") {
  scratch_dir dir;
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const nn::llama_config cfg = nn::presets::micro();
  fake_model a(cfg, seed);
  const optim::adamw opt;
  auto sa = init_states(opt, a);
  io::trainer_state ts;
  ts.step = 5;
  const auto ckpt = dir / "ckpt";
  io::save_checkpoint(exec::host{}, ckpt, cfg, a, sa, ts);

  // Another architecture: the config check names the differing fields.
  nn::llama_config wider = cfg;
  wider.d_model = 32;
  fake_model w(wider, seed);
  auto sw = init_states(opt, w);
  CHECK_THROWS_WITH_AS(io::load_checkpoint(exec::host{}, ckpt, wider, w, sw),
                       has("was saved for a different model: hidden_size 16 vs 32"), invalid_argument);
  // Loading the weights alone: the first tensor whose shape differs, with both shapes.
  CHECK_THROWS_WITH_AS(io::load_weights(exec::host{}, ckpt, w),
                       has("tensor 'model.embed_tokens.weight' in '" + (ckpt / "model.safetensors").string() +
                           "': shape mismatch: the file has [32, 16], expected [32, 32]"),
                       invalid_argument);
  // A parameter the file lacks.
  fake_model extra(cfg, seed, /*extra_param=*/true);
  CHECK_THROWS_WITH_AS(io::load_weights(exec::host{}, ckpt, extra),
                       has("1 parameter(s) missing: 'model.extra.weight' (shape [3])"), invalid_argument);
  io::load_options lenient;
  lenient.allow_missing = true;
  const auto report = io::load_weights(exec::host{}, ckpt, extra, lenient);
  CHECK(report.missing == std::vector<std::string>{"model.extra.weight"});
  CHECK(report.loaded.size() == a.names.size());
  // A tied model loading an untied checkpoint: lm_head.weight is unexpected (an error when strict).
  nn::llama_config tied = cfg;
  tied.tied_embeddings = true;
  fake_model t(tied, seed);
  const auto r2 = io::load_weights(exec::host{}, ckpt, t);
  CHECK(r2.unexpected == std::vector<std::string>{"lm_head.weight"});
  io::load_options strict;
  strict.allow_unexpected = false;
  CHECK_THROWS_WITH_AS(io::load_weights(exec::host{}, ckpt, t, strict),
                       has("1 tensor(s) that the model does not have: lm_head.weight"), invalid_argument);
  // An untied model loading a tied checkpoint: the hint says what to do.
  io::save_model(exec::host{}, dir / "tied", tied, t);
  CHECK_THROWS_WITH_AS(io::load_weights(exec::host{}, dir / "tied", a),
                       has("'lm_head.weight' (shape [32, 16]) (the checkpoint ties the LM head"), invalid_argument);
  // Wrong number of optimizer states.
  sa.pop_back();
  CHECK_THROWS_WITH_AS(io::load_checkpoint(exec::host{}, ckpt, cfg, a, sa),
                       has("optimizer states, but parameter 'lm_head.weight' is number"), invalid_argument);
  // Without optimizer state: the file holds states this run does not use.
  CHECK_THROWS_WITH_AS(io::load_checkpoint(exec::host{}, ckpt, cfg, a),
                       has("holds " + std::to_string(2 * a.names.size()) + " optimizer tensors, this run uses 0"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(io::load_checkpoint(exec::host{}, dir / "nowhere", cfg, a), has("no trainer_state.json"),
                       invalid_argument);
}

TEST_CASE("checkpoint: an interrupted save (files from two steps) is detected") {
  scratch_dir dir;
  const nn::llama_config cfg = nn::presets::micro();
  fake_model a(cfg, 1);
  io::trainer_state ts;
  ts.step = 100;
  const auto ckpt = dir / "ckpt";
  io::save_checkpoint(exec::host{}, ckpt, cfg, a, ts);
  CHECK(io::load_checkpoint(exec::host{}, ckpt, cfg, a).step == 100);
  // A save that wrote into the directory in place got as far as model.safetensors, then died.
  io::save_model(exec::host{}, ckpt, cfg, a, {}, 200);
  CHECK_THROWS_WITH_AS(io::load_checkpoint(exec::host{}, ckpt, cfg, a), has("model.safetensors ("), invalid_argument);
  CHECK_THROWS_WITH_AS(io::load_checkpoint(exec::host{}, ckpt, cfg, a), has("mixes files of different saves"),
                       invalid_argument);
}

TEST_CASE("checkpoint: bf16 export converts on load, Hugging Face sharded checkpoints load as initial weights") {
  scratch_dir dir;
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const nn::llama_config cfg = nn::presets::micro();
  fake_model a(cfg, seed);
  io::save_options so;
  so.dtype = io::weights_dtype::bf16;
  io::save_model(exec::host{}, dir / "hf", cfg, a, so);
  CHECK(io::safetensors_file(dir / "hf" / "model.safetensors").at("model.norm.weight").dtype == io::st_dtype::BF16);
  CHECK(json::parse(testing::read_bytes(dir / "hf" / "config.json")).at("torch_dtype").as_string() == "bfloat16");
  fake_model b(cfg, seed + 7);
  io::load_weights(exec::host{}, dir / "hf", b);
  for (std::size_t i = 0; i < a.names.size(); ++i)
    for (std::int64_t k = 0; k < a.values[i].numel(); ++k)
      REQUIRE(b.values[i].data()[k] == float(bf16(a.values[i].data()[k])));

  // A sharded checkpoint: two files and model.safetensors.index.json, as transformers writes them.
  const auto shard_dir = dir / "sharded";
  io::safetensors_writer w1, w2;
  json weight_map = json::object();
  for (std::size_t i = 0; i < a.names.size(); ++i) {
    auto& w = i % 2 ? w2 : w1;
    w.add(a.names[i], a.values[i].v());
    weight_map.set(a.names[i], json(i % 2 ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors"));
  }
  w1.write(shard_dir / "model-00001-of-00002.safetensors");
  w2.write(shard_dir / "model-00002-of-00002.safetensors");
  io::atomic_write_text(
      shard_dir / "model.safetensors.index.json",
      json::object({{"metadata", json::object({{"total_size", json(0)}})}, {"weight_map", weight_map}}).dump(2));
  fake_model c(cfg, seed + 8);
  const auto report = io::load_weights(exec::host{}, shard_dir, c);
  CHECK(report.loaded.size() == a.names.size());
  for (std::size_t i = 0; i < a.names.size(); ++i) CHECK(bits_equal<float>(a.values[i].v(), c.values[i].v()));
  // A single file by name works as well.
  fake_model d(cfg, seed + 9);
  io::load_weights(exec::host{}, dir / "hf" / "model.safetensors", d);
  CHECK(d.values[0](0, 0) == b.values[0](0, 0));
  CHECK_THROWS_WITH_AS(io::load_weights(exec::host{}, dir.path, d),
                       has("no model.safetensors or model.safetensors.index.json"), invalid_argument);
}

// ---------------------------------------------------------------------------------------------------------------
// Metrics

TEST_CASE("metrics: one flushed JSON object per line with the standard fields and extras") {
  scratch_dir dir;
  const auto path = dir / "logs" / "metrics.jsonl";
  {
    io::metrics_writer m(path);
    io::metrics_record r;
    r.step = 1;
    r.loss = 5.5;
    r.lr = 3e-4;
    r.tokens = 1024;
    r.tok_per_s = 2048.5;
    r.wall_s = 0.5;
    r.grad_norm = 1.25;
    m.write(r);
    // flushed: readable while the writer is still open
    CHECK(io::read_jsonl(path).size() == 1);
    r.step = 2;
    r.loss = std::nan("");
    r.val_loss = 4.75;
    m.write(r, {{"mfu", 0.375}, {"tokens_per_step", 512}});
    CHECK_THROWS_WITH_AS(m.write(r, {{"loss", 1.0}}), has("extra field \"loss\" repeats"), invalid_argument);
  }
  const std::string text = testing::read_bytes(path);
  CHECK(std::count(text.begin(), text.end(), '\n') == 2);
  CHECK(text.substr(0, text.find('\n')) ==
        R"({"step":1,"loss":5.5,"lr":0.0003,"tokens":1024,"tok_per_s":2048.5,"wall_s":0.5,"grad_norm":1.25})");
  const auto lines = io::read_jsonl(path);
  REQUIRE(lines.size() == 2);
  CHECK(!lines[0].contains("val_loss"));
  CHECK(lines[1].at("step").as_int() == 2);
  CHECK(lines[1].at("loss").is_null());  // NaN has no JSON form
  CHECK(lines[1].at("val_loss").as_double() == 4.75);
  CHECK(lines[1].at("mfu").as_double() == 0.375);
  CHECK(lines[1].at("tokens_per_step").as_double() == 512);
  // append mode continues a resumed run
  {
    io::metrics_writer m(path, io::metrics_writer::open_mode::append);
    m.write(json::object({{"step", json(3)}, {"loss", json(4.0)}}));
  }
  CHECK(io::read_jsonl(path).size() == 3);
  testing::write_bytes(dir / "bad.jsonl", "{\"step\":1}\n{\"step\":\n");
  CHECK_THROWS_WITH_AS(io::read_jsonl(dir / "bad.jsonl"), has("bad.jsonl' line 2"), invalid_argument);
}

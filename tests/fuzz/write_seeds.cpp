// Writes the fuzz targets' seed corpus: files the library itself writes (safetensors files and their headers,
// config.json of both model families, llm.c and raw token files, a trainer's checkpoint), plus the adversarial
// inputs too large to commit. Run as a test fixture before the replay tests; the seeds are also the starting
// corpus of scripts/fuzz.sh.
//
//   fuzz_write_seeds OUT_DIR [TARGET FILE]...
//       writes OUT_DIR/seeds/<target>/<name> for every target and copies each FILE into OUT_DIR/seeds/TARGET;
//       the large adversarial inputs go to OUT_DIR/generated/<target>/<name> (replayed, too slow to mutate)
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <adjoint/config.hpp>
#include <subspace/core/dtype.hpp>
#include <subspace/core/error.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/data/tokens.hpp>
#include <subspace/io/hf_config.hpp>
#include <subspace/io/safetensors.hpp>
#include <subspace/io/struct_config.hpp>
#include <subspace/nn/config.hpp>
#include <subspace/util/json.hpp>

#include "resume_fixture.hpp"

namespace {

namespace fs = std::filesystem;
namespace io = subspace::io;
using io::json;

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// Writes OUT/seeds/target/name; `prefix` goes before the bytes (the targets whose first byte chooses
/// something).
void seed(const fs::path& out, const std::string& target, const std::string& name, const std::string& bytes,
          const std::string& prefix = "") {
  io::atomic_write_text(out / "seeds" / target / name, prefix + bytes);
}
/// Writes OUT/generated/target/name.
void generated(const fs::path& out, const std::string& target, const std::string& name, const std::string& bytes) {
  io::atomic_write_text(out / "generated" / target / name, bytes);
}

template <class T>
subspace::host_tensor<T> ramp(const subspace::shape& s, double scale) {
  subspace::host_tensor<T> t(s);
  for (std::int64_t i = 0; i < s.numel(); ++i) t.data()[i] = T(double(i) * scale - 1.0);
  return t;
}

void safetensors_seeds(const fs::path& out, const fs::path& scratch) {
  // Several dtypes, metadata, a strided view's copy, a scalar and an empty tensor.
  const auto a = ramp<float>({2, 3}, 0.25);
  const auto b = ramp<double>({}, 3.5);
  const auto c = ramp<float>({0, 4}, 1);
  std::vector<std::int64_t> ids = {3, -7, 1LL << 40};
  std::vector<std::uint8_t> bytes = {0, 1, 254, 255, 9};
  io::safetensors_writer mixed;
  mixed.metadata("format", "pt");
  mixed.metadata("step", "12");
  mixed.add("a.weight", a.v());
  mixed.add_as<subspace::bf16>("a.bf16", a.v());
  mixed.add_as<subspace::fp16>("a.fp16", a.v());
  mixed.add("scalar", b.v());
  mixed.add("empty", c.v());
  mixed.add_bytes("ids", io::st_dtype::I64, {3}, [&](io::file_sink& f) { f.write(ids.data(), 24); });
  mixed.add_bytes("bytes", io::st_dtype::U8, {5}, [&](io::file_sink& f) { f.write(bytes.data(), 5); });
  mixed.add_bytes("flags", io::st_dtype::BOOL, {2}, [&](io::file_sink& f) { f.write(bytes.data(), 2); });
  mixed.write(scratch / "mixed.safetensors");
  seed(out, "safetensors_file", "mixed.safetensors", read_all(scratch / "mixed.safetensors"));
  seed(out, "safetensors_header", "mixed.json", mixed.header());

  const auto w = ramp<float>({4, 2, 2, 1}, 0.5);
  io::safetensors_writer plain;
  plain.add("w", w.v());
  plain.write(scratch / "plain.safetensors");
  seed(out, "safetensors_file", "plain.safetensors", read_all(scratch / "plain.safetensors"));
  seed(out, "safetensors_header", "plain.json", plain.header());
  seed(out, "json", "safetensors_header.json", mixed.header());
}

void config_seeds(const fs::path& out) {
  namespace nn = subspace::nn;
  io::hf_config_options ids;
  ids.bos_token_id = 1;
  ids.eos_token_id = 2;
  ids.torch_dtype = "bfloat16";
  nn::llama_config scaled = nn::presets::tiny();
  scaled.rope.llama31_scaling = true;
  scaled.rope.factor = 8;
  scaled.rope.low_freq_factor = 1;
  scaled.rope.high_freq_factor = 4;
  scaled.rope.original_max_position = 128;
  scaled.tied_embeddings = true;
  const std::vector<std::pair<std::string, std::string>> llamas = {
      {"llama_micro.json", io::to_hf_config(nn::presets::micro()).dump(2)},
      {"llama_tiny_scaled.json", io::to_hf_config(scaled, ids).dump(2)},
      {"llama_1b.json", io::to_hf_config(nn::presets::llama_1b()).dump()},
  };
  for (const auto& [name, text] : llamas) seed(out, "config", name, text);
  using ssm_io = io::config_io<adjoint::ssm_config>;
  seed(out, "config", "ssm_micro.json", ssm_io::to_json(adjoint::presets::micro(), {}).dump(2));
  seed(out, "config", "ssm_paper.json", ssm_io::to_json(adjoint::presets::paper(), {}).dump());
  seed(out, "json", "config.json", llamas[1].second);
}

void token_seeds(const fs::path& out, const fs::path& scratch) {
  namespace d = subspace::data;
  std::vector<std::int32_t> bytes(300), wide(120);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = std::int32_t((i * 37) % 256);
  for (std::size_t i = 0; i < wide.size(); ++i) wide[i] = std::int32_t((i * 4099) % 65536);
  d::write_llmc_tokens(scratch / "v1.bin", bytes, 1);
  d::write_llmc_tokens(scratch / "v7.bin", wide, 7);
  d::write_raw_u16_tokens(scratch / "raw.bin", bytes);
  // The first byte: the format (its low bit: llm.c or raw), then the loader's batch, sequence, vocabulary and
  // shuffle (fuzz_tokens.cpp).
  const std::string v1 = read_all(scratch / "v1.bin"), v7 = read_all(scratch / "v7.bin");
  seed(out, "tokens", "llmc_v1", v1, std::string(1, char(0x00)));
  seed(out, "tokens", "llmc_v1_shuffled", v1, std::string(1, char(0x54)));
  seed(out, "tokens", "llmc_v7", v7, std::string(1, char(0x80 | 0x30)));
  seed(out, "tokens", "llmc_v7_shuffled", v7, std::string(1, char(0x80 | 0x40 | 0x04)));
  seed(out, "tokens", "raw_u16", read_all(scratch / "raw.bin"), std::string(1, char(0x01)));
}

void checkpoint_seeds(const fs::path& out, const fs::path& scratch) {
  fs::create_directories(scratch / "resume");
  const auto files = subspace::fuzz::write_resume_checkpoint(scratch / "resume");
  for (std::size_t i = 0; i < files.size(); ++i) {
    const auto& [name, bytes] = files[i];
    seed(out, "resume", name, bytes, std::string(1, char(i)));
    if (name == io::state_json_file_name) {
      seed(out, "trainer_state", name, bytes);
      seed(out, "json", name, bytes);
    }
  }
}

void json_seeds(const fs::path& out) {
  seed(out, "json", "values.json",
       R"({"a": [1, -2.5e-3, 1E+2, "\u00e9\ud83d\ude00\n\"", true, false, null], "b": {"c": {}, "d": []}, )"
       R"("big": 123456789012345678901234567890, "tiny": 5e-324, "int": -9223372036854775808})");
  // Objects of many keys: duplicate detection must stay linear (80,000 keys parsed in well under a second).
  std::string many = "{";
  for (int i = 0; i < 80000; ++i) many += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":" + std::to_string(i);
  many += "}";
  generated(out, "json", "many_keys.json", many);
  generated(out, "safetensors_header", "many_keys.json", many);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc % 2 != 0) {
    std::fprintf(stderr, "usage: %s OUT_DIR [TARGET FILE]...\n", argv[0]);
    return 2;
  }
  try {
    const fs::path out = argv[1];
    const fs::path scratch = out / ".scratch";
    fs::remove_all(out / "seeds");
    fs::remove_all(out / "generated");
    fs::remove_all(scratch);
    fs::create_directories(scratch);
    // Every target's directories exist, empty or not: the replay tests name them.
    for (const char* target :
         {"json", "safetensors_header", "safetensors_file", "config", "tokens", "trainer_state", "resume"}) {
      fs::create_directories(out / "seeds" / target);
      fs::create_directories(out / "generated" / target);
    }
    safetensors_seeds(out, scratch);
    config_seeds(out);
    token_seeds(out, scratch);
    checkpoint_seeds(out, scratch);
    json_seeds(out);
    for (int i = 2; i + 1 < argc; i += 2) {
      const fs::path file = argv[i + 1];
      seed(out, argv[i], file.filename().string(), read_all(file));
    }
    fs::remove_all(scratch);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_write_seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}

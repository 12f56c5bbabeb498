#pragma once
// A checkpoint's sidecar, trainer_state.json: the trainer state that exact resume needs (step, tokens, seed, RNG
// offset, the training data position, trainer extras) and the checkpoint's identity, the size and fnv1a_64
// fingerprint (core/hash.hpp, add_bytes) of every other file in the directory when it was saved:
//
//   {"format": "subspace-trainer-state", "version": 2, "step": 40, "tokens": 81920, "seed": "1",
//    "rng_offset": "0", "train_data": {...}, "optimizer_tensors": 18, "extra": {...},
//    "files": {"config.json": {"bytes": 612, "fnv1a_64": "8c0f2d5ab1e3a47e"}, ...}}
//
// The sidecar is written last, and verify_checkpoint_files checks every file it lists before a resume reads any:
// a directory holding one save's weights beside another's optimizer state is refused, naming the file. step and
// tokens are at most max_trainer_count, so that the arithmetic a trainer does on them cannot overflow.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../core/hash.hpp"
#include "../data/loader.hpp"
#include "../util/file.hpp"
#include "../util/json.hpp"

namespace subspace::io {

inline constexpr const char* model_file_name = "model.safetensors";
inline constexpr const char* model_index_file_name = "model.safetensors.index.json";
inline constexpr const char* config_file_name = "config.json";
inline constexpr const char* state_tensors_file_name = "trainer_state.safetensors";
inline constexpr const char* state_json_file_name = "trainer_state.json";

/// The largest step or token count a checkpoint may record (2^62: far beyond any run, and step + 1 or a sum of two
/// counts still fits in int64).
inline constexpr std::int64_t max_trainer_count = std::int64_t(1) << 62;

/// What a trainer needs besides the weights and the optimizer state to continue exactly where it stopped.
struct trainer_state {
  std::int64_t step = 0;               // optimizer steps completed
  std::int64_t tokens = 0;             // training tokens consumed
  std::uint64_t seed = 0;              // the run's base seed
  std::uint64_t rng_offset = 0;        // the next unused Philox offset
  data::loader_position train_data{};  // where the training loader continues
  json extra = json::object();         // trainer-specific values (wall time, best val loss, ...)
};

/// A file's size and content fingerprint.
struct file_fingerprint {
  std::uint64_t bytes = 0;
  std::uint64_t fnv1a_64 = 0;
  friend bool operator==(const file_fingerprint&, const file_fingerprint&) = default;
};

/// The fingerprint of the file at `path` (read once, in blocks).
inline file_fingerprint fingerprint_of(const std::filesystem::path& path) {
  const read_file f(path, "checkpoint file");
  std::vector<unsigned char> block(std::size_t(1) << 20);  // a multiple of 8: add_bytes sees whole words
  fnv1a_64 h;
  for (std::uint64_t at = 0; at < f.size();) {
    const std::size_t n = std::size_t(std::min<std::uint64_t>(block.size(), f.size() - at));
    f.read(at, block.data(), n);
    h.add_bytes(block.data(), n);
    at += n;
  }
  return {f.size(), h.value()};
}

namespace detail::ckpt {

inline std::string hex64(std::uint64_t v) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, v >>= 4) s[std::size_t(i)] = digits[v & 15];
  return s;
}
inline bool parse_hex64(const std::string& s, std::uint64_t& out) {
  if (s.size() != 16) return false;
  out = 0;
  for (const char c : s) {
    const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return false;
    out = (out << 4) | std::uint64_t(d);
  }
  return true;
}

inline std::string u64_string(std::uint64_t v) { return std::to_string(v); }
inline std::uint64_t parse_u64(const json& j, const std::string& where, const char* key) {
  const json* v = j.find(key);
  require(v && (v->is_string() || (v->is_int() && v->as_int() >= 0)),
          [&] { return where + ": \"" + key + "\" must be a non-negative integer (as a decimal string)"; });
  if (v->is_int()) return std::uint64_t(v->as_int());
  const std::string& s = v->as_string();
  const std::optional<std::uint64_t> out = parse_unsigned(s);
  require(out.has_value(), [&] {
    return where + ": \"" + key + "\" must be a decimal string of an unsigned 64-bit integer, got \"" + s + "\"";
  });
  return *out;
}

/// The sidecar as read: the trainer state and the files it vouches for.
struct sidecar {
  trainer_state state;
  std::vector<std::pair<std::string, file_fingerprint>> files;
};

inline std::vector<std::pair<std::string, file_fingerprint>> parse_files(const json& j, const std::string& where) {
  const json* files = j.find("files");
  require(files && files->is_object(), [&] {
    return where + ": missing object \"files\" (the size and fingerprint of every file of the checkpoint)";
  });
  std::vector<std::pair<std::string, file_fingerprint>> out;
  for (const auto& [name, entry] : files->as_object()) {
    const json* bytes = entry.is_object() ? entry.find("bytes") : nullptr;
    const json* hash = entry.is_object() ? entry.find("fnv1a_64") : nullptr;
    file_fingerprint f;
    const bool ok = bytes && bytes->is_int() && bytes->as_int() >= 0 && hash && hash->is_string() &&
                    parse_hex64(hash->as_string(), f.fnv1a_64);
    const std::filesystem::path p(name);
    if (!ok || name.empty() || p.has_parent_path() || name == "." || name == "..")
      throw invalid_argument(where + ": \"files\": entry \"" + name +
                             "\" must be a file name with {\"bytes\": size, \"fnv1a_64\": 16 hex digits}");
    f.bytes = std::uint64_t(bytes->as_int());
    out.emplace_back(name, f);
  }
  return out;
}

inline sidecar read_sidecar(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const fs::path p = dir / state_json_file_name;
  require(fs::exists(p), [&] {
    return "checkpoint " + detail::quoted(dir) + ": no " + state_json_file_name +
           " (not a checkpoint directory, or its first save was interrupted)";
  });
  const std::string where = detail::quoted(p);
  const json j = json::parse(read_text(p, "trainer state"), where);
  require(j.is_object() && j.find("format") && j.at("format").is_string() &&
              j.at("format").as_string() == "subspace-trainer-state",
          [&] { return where + ": \"format\" must be \"subspace-trainer-state\""; });
  const json* version = j.find("version");
  require(version && version->is_int() && version->as_int() == 2, [&] {
    return where + ": unsupported \"version\" (expected 2; a version 1 checkpoint records no file fingerprints and " +
           "cannot be resumed, but its weights load as initial weights)";
  });
  sidecar out;
  trainer_state& ts = out.state;
  const auto count = [&](const char* key) {
    const json* v = j.find(key);
    require(v && v->is_int() && v->as_int() >= 0 && v->as_int() <= max_trainer_count, [&] {
      return where + ": \"" + key + "\" must be an integer in [0, 2^62], got " + (v ? v->dump() : "nothing");
    });
    return v->as_int();
  };
  ts.step = count("step");
  ts.tokens = count("tokens");
  ts.seed = parse_u64(j, where, "seed");
  ts.rng_offset = parse_u64(j, where, "rng_offset");
  require(j.find("train_data") != nullptr, [&] { return where + ": missing \"train_data\""; });
  try {
    ts.train_data = data::loader_position::from_json(j.at("train_data"));
  } catch (const invalid_argument& e) {
    throw invalid_argument(where + ": \"train_data\": " + e.what());
  }
  if (const json* e = j.find("extra")) ts.extra = *e;
  out.files = parse_files(j, where);
  return out;
}

}  // namespace detail::ckpt

/// Writes dir/trainer_state.json (atomically, after every other file of the checkpoint): `ts`, the count of
/// optimizer tensors, and the fingerprint of every other regular file now in `dir`.
inline void write_trainer_state(const std::filesystem::path& dir, const trainer_state& ts,
                                std::size_t optimizer_tensors) {
  require(ts.step >= 0 && ts.step <= max_trainer_count && ts.tokens >= 0 && ts.tokens <= max_trainer_count, [&] {
    return "checkpoint " + detail::quoted(dir) + ": step " + std::to_string(ts.step) + " and tokens " +
           std::to_string(ts.tokens) + " must lie in [0, 2^62]";
  });
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename() != state_json_file_name)
      names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  json files = json::object();
  for (const std::string& name : names) {
    const file_fingerprint f = fingerprint_of(dir / name);
    files.set(name, json::object(
                        {{"bytes", json(std::int64_t(f.bytes))}, {"fnv1a_64", json(detail::ckpt::hex64(f.fnv1a_64))}}));
  }
  const json j = json::object({{"format", json("subspace-trainer-state")},
                               {"version", json(2)},
                               {"step", json(ts.step)},
                               {"tokens", json(ts.tokens)},
                               {"seed", json(detail::ckpt::u64_string(ts.seed))},
                               {"rng_offset", json(detail::ckpt::u64_string(ts.rng_offset))},
                               {"train_data", ts.train_data.to_json()},
                               {"optimizer_tensors", json(optimizer_tensors)},
                               {"extra", ts.extra},
                               {"files", files}});
  atomic_write_text(dir / state_json_file_name, j.dump(2) + "\n");
}

/// Refuses a save that would replace `dir` unless `dir` is absent, empty or a checkpoint (a sidecar in it or in one
/// of its subdirectories): a save replaces the directory whole, and must not take other files with it.
inline void check_replaceable(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  if (!fs::exists(dir) || (fs::is_directory(dir) && fs::is_empty(dir))) return;
  bool checkpoint = fs::exists(dir / state_json_file_name);
  if (fs::is_directory(dir))
    for (const auto& e : fs::directory_iterator(dir))
      checkpoint = checkpoint || (e.is_directory() && fs::exists(e.path() / state_json_file_name));
  require(checkpoint, [&] {
    return "checkpoint " + detail::quoted(dir) +
           ": the path exists and holds no checkpoint; a save replaces the whole directory, so give a new or "
           "checkpoint directory";
  });
}

/// Reads dir/trainer_state.json.
inline trainer_state read_trainer_state(const std::filesystem::path& dir) {
  return detail::ckpt::read_sidecar(dir).state;
}

/// Checks every file dir/trainer_state.json lists against its recorded size and fingerprint, and returns the
/// trainer state; invalid_argument naming the first file that is missing or differs.
inline trainer_state verify_checkpoint_files(const std::filesystem::path& dir) {
  const detail::ckpt::sidecar s = detail::ckpt::read_sidecar(dir);
  for (const auto& [name, recorded] : s.files) {
    const std::filesystem::path p = dir / name;
    require(std::filesystem::is_regular_file(p), [&] {
      return "checkpoint " + detail::quoted(dir) + ": " + name + ", listed in " + state_json_file_name +
             ", is missing (an incomplete copy of the checkpoint?)";
    });
    const file_fingerprint found = fingerprint_of(p);
    require(found == recorded, [&] {
      return "checkpoint " + detail::quoted(dir) + ": " + name + " (" + std::to_string(found.bytes) +
             " bytes, fnv1a_64 " + detail::ckpt::hex64(found.fnv1a_64) + ") is not the file " + state_json_file_name +
             " records (" + std::to_string(recorded.bytes) + " bytes, fnv1a_64 " +
             detail::ckpt::hex64(recorded.fnv1a_64) +
             "): the directory mixes files of different saves; resume from another checkpoint";
    });
  }
  return s.state;
}

}  // namespace subspace::io

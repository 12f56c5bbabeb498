// Checkpoints as files on disk: every directory is published whole, each state an interrupted save (kill -9, a
// full disk) can leave recovers to one complete checkpoint, files of two saves are refused by their fingerprints,
// the sidecar's counts are bounded, a sharded index stays inside its directory, and a resumed run's metrics hold
// each step once. Interruptions are simulated by building the partial states on disk.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <subspace/io/checkpoint.hpp>
#include <subspace/io/metrics.hpp>
#include <subspace/nn/config.hpp>
#include <subspace/optim/adamw.hpp>
#include <subspace/util/directory.hpp>

#include "support/files.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"

using namespace subspace;
using io::json;
namespace fs = std::filesystem;

namespace {

using testing::has;

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

/// Three named parameters (Llama names) and their AdamW states: what a checkpoint reads of a model.
struct small_model {
  std::vector<std::string> names{"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"};
  std::vector<host_tensor<float>> values;
  std::vector<parameter_info> infos;
  std::vector<optim::adamw::state<host_space>> states;

  explicit small_model(std::uint64_t seed) {
    const optim::adamw opt;
    for (std::size_t i = 0; i < names.size(); ++i) {
      const shape s = i == 1 ? shape{16} : shape{32, 16};
      values.push_back(testing::random_tensor<float>(s, seed + i));
      infos.push_back(optim::param_info_for(names[i], s));
      states.push_back(opt.init(exec::host{}, infos.back()));
      copy(exec::host{}, testing::random_tensor<float>(s, seed + 10 + i).v(), states.back().m.v());
    }
  }
  std::size_t size() const { return names.size(); }
  const parameter_info& info(std::size_t i) const { return infos[i]; }
  view<float, host_space> value(std::size_t i) { return values[i].v(); }

  void save(const fs::path& dir, std::int64_t step) {
    io::trainer_state ts;
    ts.step = step;
    io::save_checkpoint(exec::host{}, dir, nn::presets::micro(), *this, states, ts);
  }
  /// The step loaded from `dir` into this model; its first value then tells whose weights they were.
  std::int64_t load(const fs::path& dir) {
    return io::load_checkpoint(exec::host{}, dir, nn::presets::micro(), *this, states).step;
  }
  float first() const { return values[0].data()[0]; }
};

const auto any_name = [](const std::string&) { return true; };

}  // namespace

TEST_CASE("checkpoint files: a directory holding one save's weights beside another's optimizer state is refused") {
  testing::scratch_dir dir;
  small_model a(1), b(2);
  a.save(dir / "a" / "step_10", 10);
  b.save(dir / "b" / "step_10", 10);  // the same step, saved by another run
  for (const char* file : {"trainer_state.safetensors", "model.safetensors", "config.json"}) {
    CAPTURE(file);
    const fs::path mixed = dir / ("mixed-" + std::string(file));
    fs::copy(dir / "a" / "step_10", mixed);
    fs::copy_file(dir / "b" / "step_10" / file, mixed / file, fs::copy_options::overwrite_existing);
    if (std::string(file) == "config.json") testing::write_bytes(mixed / file, testing::read_bytes(mixed / file) + " ");
    small_model c(3);
    CHECK_THROWS_WITH_AS(c.load(mixed), has(std::string(file) + " ("), invalid_argument);
    CHECK_THROWS_WITH_AS(c.load(mixed), has("is not the file trainer_state.json records"), invalid_argument);
    CHECK_THROWS_WITH_AS(c.load(mixed), has("mixes files of different saves"), invalid_argument);
  }
  fs::remove(dir / "a" / "step_10" / "trainer_state.safetensors");
  small_model c(3);
  CHECK_THROWS_WITH_AS(c.load(dir / "a" / "step_10"),
                       has("trainer_state.safetensors, listed in trainer_state.json, is missing"), invalid_argument);
  CHECK(c.load(dir / "b" / "step_10") == 10);
  CHECK(c.first() == b.first());
}

TEST_CASE("checkpoint files: a save that fails midway leaves the previous checkpoint whole and nothing else") {
  testing::scratch_dir dir;
  small_model a(1);
  a.save(dir / "ckpt", 5);
  const float saved = a.first();
  a.values[0].data()[0] += 1;
  a.states.pop_back();  // the save writes the weights, then fails at the optimizer state
  CHECK_THROWS_WITH_AS(a.save(dir / "ckpt", 6), has("optimizer states, but parameter 'lm_head.weight'"),
                       invalid_argument);
  CHECK(dir.listing() == std::vector<std::string>{"ckpt"});
  small_model b(2);
  CHECK(b.load(dir / "ckpt") == 5);
  CHECK(b.first() == saved);
}

TEST_CASE("checkpoint files: re-saving a step replaces it whole, and every state kill -9 can leave recovers") {
  testing::scratch_dir dir;
  const fs::path step = dir / "step_7";
  small_model old_run(1), new_run(2);
  const auto reset = [&] {
    fs::remove_all(dir.path);
    fs::create_directories(dir.path);
    old_run.save(step, 7);
  };
  const auto loaded = [&](const fs::path& from) {
    small_model m(3);
    REQUIRE(m.load(from) == 7);
    return m.first();
  };

  // A re-save, uninterrupted: the new checkpoint, nothing else left.
  reset();
  new_run.save(step, 7);
  CHECK(dir.listing() == std::vector<std::string>{"step_7"});
  CHECK(loaded(step) == new_run.first());

  // Killed while filling the staging directory: the old checkpoint stands; the staging directory is removed.
  reset();
  fs::create_directories(io::staging_directory(step));
  fs::copy_file(step / "config.json", io::staging_directory(step) / "config.json");
  CHECK(io::recover_directory_writes(dir.path, any_name).size() == 1);
  CHECK(dir.listing() == std::vector<std::string>{"step_7"});
  CHECK(loaded(step) == old_run.first());

  // Killed after moving the old checkpoint aside, before renaming the new one in: the old one comes back.
  reset();
  io::atomic_write_directory(dir / "scratch", [&](const fs::path& staging) {
    io::trainer_state ts;
    ts.step = 7;
    io::write_checkpoint(exec::host{}, staging, nn::presets::micro(), new_run, new_run.states, ts);
  });
  fs::rename(dir / "scratch", io::staging_directory(step));
  fs::rename(step, io::superseded_directory(step));
  CHECK(dir.listing() == std::vector<std::string>{".step_7.old", ".step_7.partial"});
  CHECK(io::recover_directory_writes(dir.path, any_name).size() == 2);
  CHECK(dir.listing() == std::vector<std::string>{"step_7"});
  CHECK(loaded(step) == old_run.first());

  // Killed after renaming the new one in, before removing the old: the new one stands; the old is removed.
  reset();
  fs::copy(step, io::superseded_directory(step));
  new_run.save(dir / "fresh", 7);
  fs::remove_all(step);
  fs::rename(dir / "fresh", step);
  CHECK(io::recover_directory_writes(dir.path, any_name).size() == 1);
  CHECK(dir.listing() == std::vector<std::string>{"step_7"});
  CHECK(loaded(step) == new_run.first());

  // A save that finds the old checkpoint aside and none in place (no recovery ran) keeps it until replacing it.
  reset();
  fs::rename(step, io::superseded_directory(step));
  new_run.save(step, 7);
  CHECK(dir.listing() == std::vector<std::string>{"step_7"});
  CHECK(loaded(step) == new_run.first());

  // Recovery leaves directories that are not its own alone.
  reset();
  fs::create_directories(dir / ".cache.partial");
  CHECK(io::recover_directory_writes(dir.path, [](const std::string& name) { return name == "step_7"; }).empty());
  CHECK(dir.listing() == std::vector<std::string>{".cache.partial", "step_7"});
}

TEST_CASE("checkpoint files: the sidecar's counts are bounded, and its version and file list are required") {
  testing::scratch_dir dir;
  small_model a(1);
  a.save(dir / "ckpt", 3);
  const fs::path sidecar = dir / "ckpt" / "trainer_state.json";
  const std::string good = testing::read_bytes(sidecar);
  const auto edited = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    const std::size_t at = s.find(from);
    REQUIRE(at != std::string::npos);
    testing::write_bytes(sidecar, s.replace(at, from.size(), to));
  };
  edited("\"step\": 3", "\"step\": 9223372036854775807");
  CHECK_THROWS_WITH_AS(io::read_trainer_state(dir / "ckpt"),
                       has("\"step\" must be an integer in [0, 2^62], got 9223372036854775807"), invalid_argument);
  edited("\"tokens\": 0", "\"tokens\": 4611686018427387905");
  CHECK_THROWS_WITH_AS(io::read_trainer_state(dir / "ckpt"), has("\"tokens\" must be an integer in [0, 2^62]"),
                       invalid_argument);
  edited("\"version\": 2", "\"version\": 1");
  CHECK_THROWS_WITH_AS(io::read_trainer_state(dir / "ckpt"), has("a version 1 checkpoint records no file fingerprints"),
                       invalid_argument);
  edited("\"files\"", "\"fyles\"");
  CHECK_THROWS_WITH_AS(io::read_trainer_state(dir / "ckpt"), has("missing object \"files\""), invalid_argument);
  edited("\"config.json\"", "\"../config.json\"");
  CHECK_THROWS_WITH_AS(io::read_trainer_state(dir / "ckpt"), has("entry \"../config.json\" must be a file name"),
                       invalid_argument);
  testing::write_bytes(sidecar, good);
  CHECK(a.load(dir / "ckpt") == 3);

  io::trainer_state ts;
  ts.step = io::max_trainer_count + 1;
  CHECK_THROWS_WITH_AS(io::save_checkpoint(exec::host{}, dir / "huge", nn::presets::micro(), a, a.states, ts),
                       has("must lie in [0, 2^62]"), invalid_argument);
  CHECK(dir.listing() == std::vector<std::string>{"ckpt"});
}

TEST_CASE("checkpoint files: the sidecar's seed and rng_offset are decimal digits of an unsigned 64-bit integer") {
  testing::scratch_dir dir;
  small_model a(1);
  a.save(dir / "ckpt", 3);
  const fs::path sidecar = dir / "ckpt" / "trainer_state.json";
  const std::string good = testing::read_bytes(sidecar);
  for (const char* key : {"seed", "rng_offset"}) {
    const std::string field = "\"" + std::string(key) + "\": \"0\"";
    REQUIRE(good.find(field) != std::string::npos);
    // A blank, a sign or a value past 2^64 - 1 is refused, not read as 2^64 - 1 or 5.
    for (const char* value : {" -1", "-1", "+5", " 5", "5 ", "18446744073709551616", "0x10", ""}) {
      const std::string shown = std::string(key) + " = \"" + value + "\"";
      CAPTURE(shown);
      std::string s = good;
      testing::write_bytes(sidecar,
                           s.replace(s.find(field), field.size(), "\"" + std::string(key) + "\": \"" + value + "\""));
      CHECK_THROWS_WITH_AS(io::read_trainer_state(dir / "ckpt"),
                           has("\"" + std::string(key) +
                               "\" must be a decimal string of an unsigned 64-bit integer, got \"" + value + "\""),
                           invalid_argument);
    }
    std::string s = good;
    testing::write_bytes(
        sidecar, s.replace(s.find(field), field.size(), "\"" + std::string(key) + "\": \"18446744073709551615\""));
    const io::trainer_state ts = io::read_trainer_state(dir / "ckpt");
    CHECK((std::string(key) == "seed" ? ts.seed : ts.rng_offset) == ~std::uint64_t(0));
  }
}

TEST_CASE("checkpoint files: a sharded index may name only files inside the model directory") {
  testing::scratch_dir dir;
  small_model a(1);
  io::safetensors_writer w;
  for (std::size_t i = 0; i < a.size(); ++i) w.add(a.names[i], a.values[i].v());
  w.write(dir / "outside.safetensors");
  w.write(dir / "model" / "shards" / "inside.safetensors");
  const auto index_naming = [&](const std::string& file) {
    json map = json::object();
    for (const auto& name : a.names) map.set(name, json(file));
    io::atomic_write_text(dir / "model" / "model.safetensors.index.json", json::object({{"weight_map", map}}).dump());
  };
  small_model b(2);
  for (const std::string& file : std::vector<std::string>{"../outside.safetensors", "shards/../../outside.safetensors",
                                                          (dir / "outside.safetensors").string(), "..", ""}) {
    CAPTURE(file);
    index_naming(file);
    CHECK_THROWS_WITH_AS(io::load_weights(exec::host{}, dir / "model", b),
                         has("names '" + file + "', which is not a file inside the model directory"), invalid_argument);
  }
  index_naming("shards/inside.safetensors");
  CHECK(io::load_weights(exec::host{}, dir / "model", b).loaded.size() == 3);
  CHECK(b.first() == a.first());
}

TEST_CASE("metrics: a resumed run drops the lines after its checkpoint's step and a torn last line") {
  testing::scratch_dir dir;
  const fs::path path = dir / "metrics.jsonl";
  CHECK(io::truncate_metrics_after(path, 3) == 0);
  CHECK(!fs::exists(path));
  {
    io::metrics_writer m(path);
    for (std::int64_t step = 1; step <= 6; ++step) {
      io::metrics_record r;
      r.step = step;
      r.loss = 1.0 / double(step);
      m.write(r);
    }
    m.write(json::object({{"note", json("no step")}}));
  }
  const std::string six = testing::read_bytes(path);
  testing::write_bytes(path, six + "{\"step\": 7, \"lo");  // killed, or out of space, in the middle of a line
  CHECK(io::truncate_metrics_after(path, 4) == 3);
  const std::vector<json> lines = io::read_jsonl(path);
  REQUIRE(lines.size() == 5);
  for (std::int64_t step = 1; step <= 4; ++step) CHECK(lines[std::size_t(step - 1)].at("step").as_int() == step);
  CHECK(lines[4].at("note").as_string() == "no step");
  CHECK(six.rfind(testing::read_bytes(path).substr(0, testing::read_bytes(path).find("{\"note\"")), 0) ==
        0);  // the kept lines keep their bytes
  {
    io::metrics_writer m(path, io::metrics_writer::open_mode::append);
    io::metrics_record r;
    r.step = 5;
    m.write(r);
  }
  CHECK(io::read_jsonl(path).size() == 6);
  CHECK(io::truncate_metrics_after(path, 5) == 0);
  CHECK(names_in(dir.path) == std::vector<std::string>{"metrics.jsonl"});
}

TEST_CASE("checkpoint files: a save never replaces a directory that holds something other than a checkpoint") {
  testing::scratch_dir dir;
  small_model a(1);
  testing::write_bytes(dir / "notes.txt", "keep me");
  CHECK_THROWS_WITH_AS(a.save(dir.path, 1), has("the path exists and holds no checkpoint"), invalid_argument);
  CHECK(dir.listing() == std::vector<std::string>{"notes.txt"});
  fs::remove(dir / "notes.txt");
  a.save(dir.path, 1);  // an empty directory becomes the checkpoint
  a.save(dir.path, 2);  // and a checkpoint is replaced
  CHECK(a.load(dir.path) == 2);
}

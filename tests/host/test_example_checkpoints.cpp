// What the example programs share about checkpoint directories and output paths (examples/common): step names that
// sort by number past 10^9 steps, which directories hold a complete checkpoint, the clean-up before a run, and the
// checks that make a bad output path fail before the first step.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../../examples/common/checkpoints.hpp"
#include "../../examples/common/flag_checks.hpp"
#include "support/files.hpp"
#include "support/scratch_dir.hpp"

namespace fs = std::filesystem;

namespace {

using subspace::testing::has;

void touch(const fs::path& p) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << "{}";
}
/// A directory that is_checkpoint takes for one: a sidecar (its content is not read here).
void fake_checkpoint(const fs::path& dir) { touch(dir / subspace::io::state_json_file_name); }

}  // namespace

TEST_CASE("example checkpoints: step names sort by number, also past 10^9 steps") {
  CHECK(examples::checkpoint_name(5) == "step_000000005");
  CHECK(examples::checkpoint_name(999999999) == "step_999999999");
  CHECK(examples::checkpoint_name(1000000000) == "step_1000000000");
  CHECK(examples::step_of("runs/step_1000000000") == 1000000000);
  for (const char* bad : {"step_", "step_12a", "step_-1", "stage-0", "step_1234567890123456789"})
    CHECK_FALSE(examples::step_of(bad).has_value());

  subspace::testing::scratch_dir dir;
  for (const std::int64_t step : {1000000000, 999999999, 7}) fake_checkpoint(dir / examples::checkpoint_name(step));
  const auto all = examples::checkpoints_in(dir.path);
  REQUIRE(all.size() == 3);
  CHECK(all[0].filename() == "step_000000007");
  CHECK(all[2].filename() == "step_1000000000");
  CHECK(examples::resolve_resume(dir.path) == all[2]);
}

TEST_CASE("example checkpoints: a run cleans what an interrupted one left, and keeps the newest N") {
  subspace::testing::scratch_dir dir;
  fake_checkpoint(dir / "step_000000002");
  for (int s = 0; s < 2; ++s) fake_checkpoint(dir / "step_000000004" / ("stage-" + std::to_string(s)));
  fake_checkpoint(dir / "step_000000006" / "stage-1");  // stage 0 of a save that wrote in place is missing
  fs::create_directories(dir / "step_000000008");       // its first save died before the sidecar
  touch(dir / "step_000000008" / "model.safetensors.tmp.12.0");
  fake_checkpoint(dir / ".step_000000010.old");  // a re-save of step 10 died before renaming the new one in
  touch(dir / ".step_000000010.partial" / "model.safetensors");
  touch(dir / ".step_000000012.partial" / "config.json");  // a save of step 12 died while writing
  fs::create_directories(dir / "notes");                   // not the run's: left alone
  CHECK_FALSE(examples::is_checkpoint(dir / "step_000000006"));
  CHECK(examples::is_checkpoint(dir / "step_000000004"));

  examples::clean_before_run(dir.path, dir / "step_000000010");
  CHECK(dir.listing() == std::vector<std::string>{"notes", "step_000000002", "step_000000004", "step_000000010"});
  CHECK(examples::resolve_resume(dir.path) == dir / "step_000000010");

  touch(dir / ".step_000000014.partial" / "config.json");
  examples::keep_newest_checkpoints(dir.path, 2);
  CHECK(dir.listing() == std::vector<std::string>{"notes", "step_000000004", "step_000000010"});
}

TEST_CASE("example flags: output paths that cannot be written and non-finite numbers fail before any work") {
  subspace::testing::scratch_dir dir;
  touch(dir / "file");
  CHECK_THROWS_WITH_AS(examples::need_writable_directory("checkpoint-dir", dir / "file" / "ckpt"),
                       has("--checkpoint-dir " + (dir / "file" / "ckpt").string() + ": cannot create the directory"),
                       examples::cli_error);
  CHECK_THROWS_WITH_AS(examples::need_writable_file("metrics", dir / "file" / "m.jsonl"),
                       has("--metrics " + (dir / "file" / "m.jsonl").string() + ": cannot create the directory"),
                       examples::cli_error);
  CHECK_THROWS_WITH_AS(examples::need_writable_file("metrics", dir.path), has("is a directory"), examples::cli_error);
  examples::need_writable_directory("checkpoint-dir", dir / "new" / "ckpt");
  examples::need_writable_file("metrics", dir / "logs" / "m.jsonl");
  CHECK(dir.listing() == std::vector<std::string>{"file", "logs", "new"});  // created, and no probe file left
  CHECK(fs::is_empty(dir / "new" / "ckpt"));

  CHECK_THROWS_WITH_AS(examples::need_sampling(INFINITY, "x", 1, 1), has("--temperature must be a finite number >= 0"),
                       examples::cli_error);
  CHECK_THROWS_WITH_AS(examples::need_sampling(0.8, "", 1, 1), has("--prompt must not be empty"), examples::cli_error);
  examples::need_sampling(0.8, "", 0, 1);  // no samples: no prompt needed
  examples::need_sampling(0.8, "x", 1, examples::max_sample_tokens);
  CHECK_THROWS_WITH_AS(examples::need_sampling(0.8, "x", 1, 1000000000000000LL),
                       has("--sample-tokens must lie in [0, 65536] (new tokens per sample), got 1000000000000000"),
                       examples::cli_error);
  CHECK_THROWS_WITH_AS(examples::need_finite_non_negative("weight-decay", NAN),
                       has("--weight-decay must be a finite number >= 0, got nan"), examples::cli_error);
}

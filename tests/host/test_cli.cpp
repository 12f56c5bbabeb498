// examples::cli, the flag parser of the example programs and benchmarks: values, switches, choices, defaults in
// --help, and the messages of bad input.
#include <doctest/doctest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "../../examples/common/cli.hpp"

namespace {

/// argv for cli::parse from words (the program name first).
struct args {
  std::vector<std::string> words;
  std::vector<char*> ptrs;
  explicit args(std::vector<std::string> w) : words(std::move(w)) {
    words.insert(words.begin(), "prog");
    for (auto& s : words) ptrs.push_back(s.data());
  }
  int argc() const { return int(ptrs.size()); }
  char** argv() { return ptrs.data(); }
};

struct fixture {
  int steps = 10;
  double lr = 3e-4;
  std::string mode = "fast";
  bool verbose = false, dry = false;
  examples::cli cli{"prog", "a test program"};
  fixture() {
    cli.flag("steps", steps, "steps")
        .flag("lr", lr, "learning rate")
        .flag("mode", mode, "mode", {"fast", "slow"})
        .flag("verbose", verbose, "a bool flag with a value")
        .toggle("dry-run", dry, "a switch");
  }
  bool parse(std::vector<std::string> w) {
    args a(std::move(w));
    return cli.parse(a.argc(), a.argv());
  }
};

}  // namespace

TEST_CASE("cli: values in both spellings, switches, bools and choices") {
  fixture f;
  CHECK(f.parse({"--steps", "25", "--lr=0.01", "--mode", "slow", "--verbose", "on", "--dry-run"}));
  CHECK(f.steps == 25);
  CHECK(f.lr == 0.01);
  CHECK(f.mode == "slow");
  CHECK(f.verbose);
  CHECK(f.dry);
  fixture g;
  CHECK(g.parse({}));
  CHECK_FALSE(g.dry);
  CHECK(g.steps == 10);
}

TEST_CASE("cli: bad input names the flag, the value and what was expected") {
  const auto fails = [](std::vector<std::string> w, const std::string& message) {
    fixture f;
    CAPTURE(message);
    CHECK_THROWS_WITH_AS(f.parse(std::move(w)), doctest::Contains(message.c_str()), examples::cli_error);
  };
  fails({"--steps", "ten"}, "--steps: got 'ten', expected an integer");
  fails({"--lr", "fast"}, "--lr: got 'fast', expected a number");
  fails({"--mode", "medium"}, "--mode: got 'medium', expected one of fast|slow");
  fails({"--verbose", "maybe"}, "--verbose: got 'maybe', expected true or false");
  fails({"--steps"}, "--steps needs a value");
  fails({"--nope", "1"}, "unknown flag --nope");
  fails({"--nope"}, "unknown flag --nope");
  fails({"--dry-run=yes"}, "--dry-run is a switch and takes no value");
  fails({"stray"}, "unexpected argument 'stray'");
}

TEST_CASE("cli: --help lists every flag with its default in the shortest form") {
  fixture f;
  char* buf = nullptr;
  std::size_t size = 0;
  FILE* mem = open_memstream(&buf, &size);
  REQUIRE(mem != nullptr);
  FILE* saved = stdout;
  stdout = mem;
  const bool go_on = f.parse({"--help"});
  stdout = saved;
  std::fclose(mem);
  const std::string help(buf, size);
  std::free(buf);
  CHECK_FALSE(go_on);
  CHECK(help.find("--steps") != std::string::npos);
  CHECK(help.find("(default: 10)") != std::string::npos);
  CHECK(help.find("(default: 3e-04)") != std::string::npos);  // std::to_chars: the shorter of 0.0003 and 3e-04
  CHECK(help.find("{fast|slow} (default: fast)") != std::string::npos);
  CHECK(help.find("--dry-run            a switch (a switch, no value)") != std::string::npos);
}

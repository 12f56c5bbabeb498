#!/usr/bin/env bash
# Fuzzes one reader for a while (docs/fuzzing.md).
#
#   bash scripts/fuzz.sh TARGET [MINUTES]     # TARGET: json safetensors_header safetensors_file config tokens
#                                              #         trainer_state resume (or "all", one after another)
#
# With clang >= 17 (as scripts/setup.sh finds or installs it): libFuzzer with ASan and UBSan, in
# build/fuzz-libfuzzer. Otherwise g++ with the portable driver under ASan and UBSan, the sanitize preset's flags
# (build/fuzz-portable). Either way the seed corpus is the one the library writes, plus the
# committed past findings; new corpus inputs (libFuzzer) go to build/fuzz-corpus/TARGET. A finding is written to
# build/fuzz-findings/TARGET/crash-* (or timeout-*): replay it with `build/.../fuzz_TARGET FILE`, fix the reader,
# and commit the file under tests/fuzz/regressions/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(json safetensors_header safetensors_file config tokens trainer_state resume)
target="${1:-}"
minutes="${2:-10}"
if [ -z "$target" ] || { [ "$target" != all ] && [[ ! " ${targets[*]} " == *" $target "* ]]; }; then
  echo "usage: bash scripts/fuzz.sh TARGET [MINUTES]   (TARGET: ${targets[*]} or all)" >&2
  exit 2
fi
source scripts/setup.sh >/dev/null
jobs="$(nproc 2>/dev/null || echo 2)"

# clang >= 17 with libFuzzer (scripts/setup.sh finds one or installs Debian's clang-19 as root), else g++ with the
# portable driver.
clang=""
if subspace_setup_clang >/dev/null; then
  clang="$(command -v clang++)"
fi

if [ -n "$clang" ]; then
  build=build/fuzz-libfuzzer
  echo "fuzz: libFuzzer with $clang ($("$clang" -dumpversion)), in $build"
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$clang" -DSUBSPACE_CUDA=OFF \
    -DSUBSPACE_BUILD_EXAMPLES=OFF -DSUBSPACE_BUILD_BENCH=OFF >/dev/null
else
  build=build/fuzz-portable
  echo "fuzz: no clang >= 17: g++ with the portable driver under ASan and UBSan (the sanitize preset's flags), in $build"
  cmake --preset sanitize -B "$build" -DCMAKE_CXX_COMPILER=g++ >/dev/null
fi
cmake --build "$build" -j "$jobs" --target subspace_fuzz_targets
corpus="$build/tests/fuzz/corpus"
"$build/tests/fuzz/fuzz_write_seeds" "$corpus" safetensors_file tests/data/python_written.safetensors

run() {
  local t="$1" findings="build/fuzz-findings/$1" inputs=("$corpus/seeds/$1")
  mkdir -p "$findings"
  [ -d "tests/fuzz/regressions/$t" ] && inputs+=("tests/fuzz/regressions/$t")
  echo "== fuzz_$t for $minutes minutes; findings go to $findings/"
  if [ -n "$clang" ]; then
    local grown="build/fuzz-corpus/$t"
    mkdir -p "$grown"
    "$build/tests/fuzz/fuzz_$t" -max_total_time=$((minutes * 60)) -timeout=20 -rss_limit_mb=4096 \
      -artifact_prefix="$findings/" "$grown" "${inputs[@]}"
  else
    "$build/tests/fuzz/fuzz_$t" --seconds $((minutes * 60)) --timeout 20 --artifact-prefix "$findings/" \
      "${inputs[@]}"
  fi
}
if [ "$target" = all ]; then
  for t in "${targets[@]}"; do run "$t"; done
else
  run "$target"
fi

#!/usr/bin/env bash
# Runs every test: installs what is missing, builds host and (where nvcc is) CUDA targets, builds the two
# consumer projects, runs CTest, then the README's example commands on a tiny budget. The GPU suite reports
# Skipped on machines without a CUDA device.
#
#   bash scripts/test.sh                       # everything
#   SUBSPACE_PRESET=cpu bash scripts/test.sh   # host build only
#   SUBSPACE_SANITIZE=1 bash scripts/test.sh   # also the host suite and fuzz replay under ASan + UBSan
#
# CI (preset ci) always runs the sanitize preset, and runs the host suite and the fuzz replay only there, built by
# clang (>= 17; scripts/setup.sh installs clang-19 on Debian) at -O0 with ASan + UBSan and libFuzzer. The ci preset
# builds everything else but the benchmarks with g++ and nvcc at -O1 (CUDA tests, examples and their CLI tests,
# header checks): it is compiled to be checked, and only the CLI tests run it. The benchmarks are built where they
# run, on a GPU machine (the cuda preset). Each phase prints its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
jobs="$(nproc 2>/dev/null || echo 2)"
sanitize="${SUBSPACE_SANITIZE:-$([ "$SUBSPACE_PRESET" = ci ] && echo 1 || echo 0)}"

phase_start=$SECONDS
phase() {
  [ -n "${phase_name:-}" ] && echo "== $phase_name: $((SECONDS - phase_start)) s"
  phase_name="$1"
  phase_start=$SECONDS
  [ -n "$1" ] && echo "== $1"
  return 0
}

phase "configure + build (preset $SUBSPACE_PRESET)"
cmake --preset "$SUBSPACE_PRESET" >/dev/null
cmake --build --preset "$SUBSPACE_PRESET" -j "$jobs"

phase "consumer projects (FetchContent and find_package)"
bash tests/consumer/check.sh "$SUBSPACE_PRESET"

phase "tests (preset $SUBSPACE_PRESET)"
ctest --preset "$SUBSPACE_PRESET" -j "$jobs"

if [ -d "build/$SUBSPACE_PRESET/examples" ]; then
  phase "README commands on a tiny budget (build/$SUBSPACE_PRESET/examples)"
  bash scripts/readme_commands.sh "build/$SUBSPACE_PRESET/examples"
fi

if [ "$sanitize" = 1 ]; then
  phase "configure + build (preset sanitize: host suite and fuzz targets, clang, ASan + UBSan)"
  subspace_setup_clang
  cmake --preset sanitize >/dev/null
  cmake --build --preset sanitize -j "$jobs"

  phase "tests (preset sanitize)"
  ctest --preset sanitize -j "$jobs"
fi
phase ""
echo "== all tests passed in $SECONDS s"

#!/usr/bin/env bash
# Runs every test: installs what is missing, builds host and (where nvcc is) CUDA targets, builds the two
# consumer projects, then runs CTest. The GPU suite reports Skipped on machines without a CUDA device.
#
#   bash scripts/test.sh              # everything
#   SUBSPACE_PRESET=cpu bash scripts/test.sh   # host build only
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
jobs="$(nproc 2>/dev/null || echo 2)"

echo "== configure + build (preset $SUBSPACE_PRESET)"
cmake --preset "$SUBSPACE_PRESET" >/dev/null
cmake --build --preset "$SUBSPACE_PRESET" -j "$jobs"

echo "== consumer projects (FetchContent and find_package)"
bash tests/consumer/check.sh "$SUBSPACE_PRESET"

echo "== tests"
ctest --preset "$SUBSPACE_PRESET" -j "$jobs"

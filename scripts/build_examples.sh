#!/usr/bin/env bash
# Builds the example programs (all of them, or the ones named) with the preset scripts/setup.sh picks — cuda when
# nvcc is there, else cpu — and points build/examples at build/<preset>/examples, the path the README's commands
# use. From scratch all nine take about 6 minutes on 2 idle cores (train_llama alone about 2); a rebuild after no
# change takes seconds. scripts/main.sh runs it.
#
#   bash scripts/build_examples.sh                       # every example
#   bash scripts/build_examples.sh pipeline_llama        # one (or several) by name
#   SUBSPACE_PRESET=cpu bash scripts/build_examples.sh   # the host-only build on a machine with nvcc
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(subspace_examples)
echo "== build ${targets[*]} (preset $SUBSPACE_PRESET) into build/examples -> build/$SUBSPACE_PRESET/examples"
cmake --preset "$SUBSPACE_PRESET" >/dev/null
cmake --build --preset "$SUBSPACE_PRESET" --target "${targets[@]}" -j "$(nproc 2>/dev/null || echo 2)"
ln -sfn "$SUBSPACE_PRESET/examples" build/examples

#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs the example trainer — on the GPU when one is
# present, else on the CPU. Extra arguments go to the trainer (see --help).
#
#   bash scripts/main.sh
#   bash scripts/main.sh --steps 500
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
device=host
if command -v nvcc >/dev/null && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  device=cuda
fi
echo "== build (preset $SUBSPACE_PRESET)"
cmake --preset "$SUBSPACE_PRESET" >/dev/null
cmake --build --preset "$SUBSPACE_PRESET" --target primitives_demo -j "$(nproc 2>/dev/null || echo 2)"
echo "== run on $device"
"build/$SUBSPACE_PRESET/examples/primitives_demo" --device "$device" "$@"

#!/usr/bin/env bash
# The main job: installs what is missing, builds, and trains the example Llama (examples/train_llama) on the
# default corpus — the King James Bible, byte-level — on the GPU when one is present, else on the CPU (a few
# minutes on 2 cores), then prints text samples. Extra arguments go to the trainer (see --help).
#
#   bash scripts/main.sh
#   bash scripts/main.sh --steps 1000 --checkpoint-dir runs/ckpt
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
device=host
if command -v nvcc >/dev/null && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  device=cuda
fi
echo "== build (preset $SUBSPACE_PRESET)"
cmake --preset "$SUBSPACE_PRESET" >/dev/null
cmake --build --preset "$SUBSPACE_PRESET" --target train_llama -j "$(nproc 2>/dev/null || echo 2)"
mkdir -p runs
echo "== train on $device (metrics: runs/train_llama.jsonl; plot with python3 scripts/plot_metrics.py)"
"build/$SUBSPACE_PRESET/examples/train_llama" --device "$device" --metrics runs/train_llama.jsonl "$@"

#!/usr/bin/env bash
# The main job: installs what is missing, builds, and trains the example Llama (examples/train_llama) on the
# default corpus — the King James Bible, byte-level — on the GPU when one is present, else on the CPU (about a
# minute on 2 cores), then prints text samples. Extra arguments go to the trainer (see --help). Afterwards it
# builds the other examples (scripts/build_examples.sh; about 5 more minutes on 2 cores the first time), so that
# every build/examples/... command of the README works.
#
#   bash scripts/main.sh
#   bash scripts/main.sh --steps 1000 --checkpoint-dir runs/ckpt
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build_examples.sh train_llama
mkdir -p runs
echo "== train (metrics: runs/train_llama.jsonl; plot with python3 scripts/plot_metrics.py)"
# --device auto (the default): the GPU when the build has CUDA and a device is present, else the CPU.
build/examples/train_llama --metrics runs/train_llama.jsonl "$@"
echo "== the other examples (the README's build/examples/... commands)"
bash scripts/build_examples.sh

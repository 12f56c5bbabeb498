#!/usr/bin/env bash
# Subspace Network fidelity: the same Llama (the 60m preset's shape, d 512, 8 layers, byte vocabulary) trained as a
# 4-stage 1F1B pipeline for the same steps with the same schedule, data order and seed, once with dense
# boundaries and once per k of a sweep (d/100, d/50 and d/16: 5, 10, 32) as a Subspace Network; the JSON holds
# each run's validation-loss curve, final validation loss, its ratio to the dense run's, and the boundary bytes.
#
#   bash bench/pipeline/fidelity.sh PIPELINE_LLAMA OUT.json [COMMIT] [STEPS]
#   SUBSPACE_CORPUS=kjv.txt bash bench/pipeline/fidelity.sh ...    # a text file instead of the default corpus
#
# The corpus is the King James Bible when its Debian package is installed, else tests/data/kjv_genesis.txt.
set -euo pipefail
bin="$1"; out="$2"; commit="${3:-unknown}"; steps="${4:-400}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
source "$here/../common/corpus.sh"
common=(--preset 60m --vocab 256 --stages 4 --schedule 1f1b --microbatches 4 --batch 4 --seq 256 --steps "$steps"
        --lr 1e-3 --warmup $((steps / 10)) --decay cosine --clip 1.0 --eval-every $((steps / 6)) --eval-batches 20
        --seed 1 --samples 0 --log-every 100 "${text[@]}")
"$bin" "${common[@]}" --compressor identity --metrics "$work/dense.jsonl" --summary "$work/dense.json"
for k in 5 10 32; do
  "$bin" "${common[@]}" --compressor subspace --k "$k" --metrics "$work/k$k.jsonl" --summary "$work/k$k.json"
done

python3 - "$work" "$out" "$commit" "$corpus" "$steps" <<'PY'
import json, os, sys, time
work, out, commit, corpus, steps = sys.argv[1:]
runs = {}
for name in ("dense", "k5", "k10", "k32"):
    s = json.load(open(os.path.join(work, name + ".json")))
    curve = [json.loads(l) for l in open(os.path.join(work, name + ".jsonl"))]
    s["val_loss_curve"] = [[r["step"], r["val_loss"]] for r in curve if "val_loss" in r]
    runs[name] = s
dense = runs["dense"]["final_val_loss"]
for name, s in runs.items():
    s["val_loss_ratio_to_dense"] = s["final_val_loss"] / dense
doc = {
    "benchmark": "pipeline_fidelity", "device": runs["dense"]["device"], "commit": commit,
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "config": {"model": "60m shape (d 512, 8 layers, FFN 1376, 8 heads), byte vocabulary", "corpus": corpus,
               "stages": 4, "schedule": "1f1b", "microbatches": 4, "batch": 4, "seq": 256, "steps": int(steps),
               "lr": 1e-3, "warmup": int(steps) // 10, "decay": "cosine to 10%", "clip": 1.0, "wire": "fp32"},
    "results": runs,
}
tmp = out + ".tmp"
json.dump(doc, open(tmp, "w"), indent=2)
os.replace(tmp, out)
for name, s in runs.items():
    print(f"{name:6s} k {s['k']:3d}  final val {s['final_val_loss']:.4f}  ratio {s['val_loss_ratio_to_dense']:.4f}  "
          f"fwd {s['boundary_bytes_per_token_forward']:.0f} B/token")
PY

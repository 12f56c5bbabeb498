#!/usr/bin/env bash
# The Llama-60M optimizer comparison of issue 7 (docs/galore.md): AdamW, GaLore and
# GoLore@20% train the same 60M model (hidden 512, FFN 1376, 8 layers, 8 heads, vocabulary 32000, T 256) on the
# default corpus for the same steps with the same schedule, data order and seed; the summary JSON holds each
# run's validation loss, optimizer-state bytes and step time.
#
#   bash bench/galore_60m/run.sh TRAIN_LLAMA OUT.json [COMMIT] [STEPS]
#   SUBSPACE_CORPUS=kjv.txt bash bench/galore_60m/run.sh ...    # a text file instead of the default corpus
#
# Settings: GoLore's 60M recipe (lr 1e-3, warm-up 10% of the steps, cosine to 10%, clip 1.0), rank 128,
# refresh 200, alpha 0.25 for the subspace optimizers (GaLore's 60M recipe), batch 16 x 256 tokens (1000 steps are
# about one epoch of the King James Bible: a 60M model overfits it beyond that). The corpus is the King James
# Bible when its Debian package is installed, else tests/data/kjv_genesis.txt (named in the JSON).
set -euo pipefail
bin="$1"; out="$2"; commit="${3:-unknown}"; steps="${4:-1000}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

source "$here/../common/corpus.sh"
common=(--preset 60m --seq 256 --batch 16 --steps "$steps" --lr 1e-3 --warmup $((steps / 10)) --decay cosine
        --clip 1.0 --eval-every $((steps / 10)) --eval-batches 20 --seed 1 --samples 0 --log-every 100
        --rank 128 --refresh 200 --galore-scale 0.25 --golore-percent 20 --device cuda "${text[@]}")
for opt in adamw galore golore; do
  echo "== $opt"
  "$bin" "${common[@]}" --optimizer "$opt" --metrics "$work/$opt.jsonl" --summary "$work/$opt.json"
done

python3 - "$work" "$out" "$commit" "$corpus" "$steps" <<'PY'
import json, os, sys, time
work, out, commit, corpus, steps = sys.argv[1:]
runs = {}
for opt in ("adamw", "galore", "golore"):
    s = json.load(open(os.path.join(work, opt + ".json")))
    curve = [json.loads(l) for l in open(os.path.join(work, opt + ".jsonl"))]
    s["val_loss_curve"] = [[r["step"], r["val_loss"]] for r in curve if "val_loss" in r]
    s["train_loss_last_100"] = sum(r["loss"] for r in curve[-100:]) / len(curve[-100:])
    runs[opt] = s
base = runs["adamw"]
doc = {
    "benchmark": "galore_60m", "device": base["device"], "commit": commit,
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "config": {"model": "60m", "corpus": corpus, "tokenizer": "bytes", "steps": int(steps), "batch": 16, "seq": 256,
               "lr": 1e-3, "warmup": int(steps) // 10, "decay": "cosine to 10%", "clip": 1.0,
               "rank": 128, "refresh": 200, "alpha": 0.25, "golore_percent": 20},
    "results": runs,
    "ratios_vs_adamw": {opt: {"optimizer_state_bytes": r["optimizer_state_bytes"] / base["optimizer_state_bytes"],
                              "step_ms": r["step_ms"] / base["step_ms"],
                              "final_val_loss_delta": r["final_val_loss"] - base["final_val_loss"]}
                        for opt, r in runs.items()},
}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
os.replace(tmp, out)
for opt, r in runs.items():
    print(f"{opt:7s} val {r['final_val_loss']:.4f}  optimizer state {r['optimizer_state_bytes']/2**20:7.1f} MiB  "
          f"{r['step_ms']:6.1f} ms/step")
PY

#!/usr/bin/env bash
# Mixture-of-Subspaces fidelity at long context: the same Llama trained with context parallelism for the same steps,
# schedule, data order and seed, once with the dense K/V exchange and once with Mixture of Subspaces (its default
# ranks, a dense warm-up of a tenth of the steps whose K/V give the basis, the last layer dense); the JSON holds each
# run's validation-loss curve, final validation loss and perplexity, the ratio of MoS's perplexity to the dense
# run's, the K/V bytes each rank sent, the seconds of training steps, and the last warm-up step's time (the switch
# ends it: the PCA and the tables' broadcast).
#
#   bash bench/context/fidelity.sh CONTEXT_LLAMA OUT.json [COMMIT] [STEPS]
#
# Environment (defaults): FIDELITY_SEQ (8192) tokens per sequence, FIDELITY_CP (4) ranks per sequence,
# FIDELITY_PRESET (tiny), FIDELITY_DEVICE (auto: the GPU when the build has CUDA and one is present),
# FIDELITY_THREADS (0: all; host worker threads per rank), FIDELITY_PARALLEL (0; 1 trains the two runs at once, for
# a GPU with room for both: the same curves in about half the wall time), FIDELITY_FLAGS (more context_llama flags
# for both runs, e.g. model sizes or --lr), SUBSPACE_CORPUS (a text file instead of the default corpus: the King
# James Bible when its Debian package is installed, else tests/data/kjv_genesis.txt).
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
bin="$1"; out="$2"; commit="${3:-unknown}"; steps="${4:-200}"
seq="${FIDELITY_SEQ:-8192}" cp="${FIDELITY_CP:-4}" preset="${FIDELITY_PRESET:-tiny}"
device="${FIDELITY_DEVICE:-auto}" threads="${FIDELITY_THREADS:-0}" parallel="${FIDELITY_PARALLEL:-0}"
read -r -a flags <<<"${FIDELITY_FLAGS:-}"
[[ "$steps" =~ ^[0-9]+$ ]] && [ "$steps" -ge 20 ] || { echo "fidelity.sh: STEPS must be an integer >= 20, got '$steps'" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
source "$here/../common/corpus.sh"
common=(--preset "$preset" --cp "$cp" --seq "$seq" --batch 1 --steps "$steps" --warmup $((steps / 10)) --decay cosine
        --eval-every $((steps / 5)) --eval-batches 4 --seed 1 --log-every 10 --device "$device"
        --threads "$threads" "${text[@]}" "${flags[@]}")
train() {  # train RUN: one run's log and metrics into $work
  local run="$1" compressor=identity extra=()
  [ "$run" = mos ] && compressor=mos extra=(--warmup-pca $((steps / 10)))
  "$bin" "${common[@]}" --compressor "$compressor" "${extra[@]}" --metrics "$work/$run.jsonl" >"$work/$run.log" 2>&1
}
report() {  # report RUN STATUS: the run's header and validation lines, or its last lines and a failure
  echo "== $1"
  [ "$2" = 0 ] || { tail -20 "$work/$1.log"; echo "fidelity.sh: the $1 run failed" >&2; exit 1; }
  grep -E "^(context|sequence|compressor|switched|done|K/V sent)|val" "$work/$1.log" || true
}
if [ "$parallel" = 1 ]; then
  train dense & dense_pid=$!
  train mos & mos_pid=$!
  dense_status=0 mos_status=0
  wait "$dense_pid" || dense_status=$?
  wait "$mos_pid" || mos_status=$?
  report dense "$dense_status"; report mos "$mos_status"
else
  for run in dense mos; do
    status=0; train "$run" || status=$?
    report "$run" "$status"
  done
fi

python3 - "$work" "$out" "$commit" "$corpus" "$steps" "$seq" "$cp" "$preset" "${FIDELITY_FLAGS:-}" <<'PY'
import json, math, os, sys, time
work, out, commit, corpus, steps, seq, cp, preset, flags = sys.argv[1:]
runs = {}
for name in ("dense", "mos"):
    lines = [json.loads(l) for l in open(os.path.join(work, name + ".jsonl")) if l.strip()]
    curve = [[l["step"], l["val_loss"]] for l in lines if "val_loss" in l]
    log = open(os.path.join(work, name + ".log")).read().splitlines()
    runs[name] = {"final_val_loss": curve[-1][1], "final_val_perplexity": math.exp(curve[-1][1]),
                  "final_train_loss": lines[-1]["loss"], "val_loss_curve": curve,
                  "kv_bytes_sent_per_rank": sum(max(l["kv_bytes_sent"]) for l in lines),  # the busiest rank each step
                  "train_s": sum(l["step_ms"] for l in lines) / 1e3,
                  # the last warm-up step: the switch (the PCA, the tables' broadcast) ends it
                  "switch_step_s": next((l["step_ms"] / 1e3 for l in lines if l["step"] == int(steps) // 10), None)
                                   if name == "mos" else None,
                  "header": [h for h in log if h.startswith(("model", "context", "sequence", "compressor"))]}
ratio = runs["mos"]["final_val_perplexity"] / runs["dense"]["final_val_perplexity"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
where = next((h for h in runs["dense"]["header"] if h.startswith("context")), "")  # names the GPU when on one
doc = {"benchmark": "context_fidelity", "device": (cpu + "; " if where.endswith(" on host") else "") + where,
       "commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "config": {"preset": preset, "vocab": "bytes", "corpus": corpus, "cp": int(cp), "seq": int(seq), "batch": 1,
                  "steps": int(steps), "warmup": int(steps) // 10, "decay": "cosine", "layout": "zigzag",
                  "exchange": "ring", "mos_warmup_pca": int(steps) // 10, "eval_batches": 4, "seed": 1,
                  "more_flags": flags},
       "results": runs, "perplexity_ratio_mos_to_dense": ratio,
       "kv_bytes_ratio_mos_to_dense": runs["mos"]["kv_bytes_sent_per_rank"] / runs["dense"]["kv_bytes_sent_per_rank"]}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
os.replace(tmp, out)
for name, r in runs.items():
    print(f"{name:5s} final val loss {r['final_val_loss']:.4f} (perplexity {r['final_val_perplexity']:.3f}), "
          f"K/V sent {r['kv_bytes_sent_per_rank'] / 1e6:.1f} MB per rank, {r['train_s']:.0f} s of steps" +
          (f", the switch step {r['switch_step_s']:.2f} s" if r["switch_step_s"] is not None else ""))
print(f"MoS / dense perplexity: {ratio:.4f}; K/V bytes: {doc['kv_bytes_ratio_mos_to_dense']:.4f}")
PY

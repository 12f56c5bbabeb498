#!/usr/bin/env bash
# Our host training step against PyTorch eager on the CPU, back to back on one machine with the same threads: the
# README main job's model and batch (the tiny preset, batch 8 x T 256, fp32, AdamW, clipping at 1.0).
#
# Ours is examples/train_llama --device host itself (the loader included); its per-step times come from --metrics.
# PyTorch's is bench/llama_step/torch_reference.py --device cpu (the same model; random tokens, no loader). Both
# skip their warm-up steps; the rounds alternate the two; tok/s = B·T / the median step time over all rounds.
# PyTorch comes from the registry into a virtual environment (.venv-bench, made on the first run: the CPU wheel
# index when it answers, else PyPI). Flags: --threads (2), --steps timed per round (30), --warmup (5), --rounds (3),
# --out FILE.json.
#
#   bash bench/llama_step/host.sh
#   bash bench/llama_step/host.sh --threads 4 --rounds 5 --out bench/results/llama-step-host-DATE.json
set -euo pipefail
cd "$(dirname "$0")/../.."
threads=2 steps=30 warmup=5 rounds=3 out=""
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "host.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in threads steps warmup rounds; do
  [[ "${!v}" =~ ^[0-9]+$ ]] && [ "${!v}" -ge 1 ] || { echo "host.sh: --$v must be a positive integer, got '${!v}'" >&2; exit 2; }
done

venv=.venv-bench
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "== PyTorch into $venv (first run)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null ||
    "$venv/bin/pip" install -q torch
fi
bash scripts/build_examples.sh train_llama >/dev/null

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Alternating rounds, so that a slower spell of the machine (these are shared VMs) falls on both sides alike.
for round in $(seq 1 "$rounds"); do
  echo "== round $round/$rounds: ours (train_llama --device host --threads $threads), then PyTorch eager"
  build/examples/train_llama --device host --threads "$threads" --steps $((warmup + steps + 1)) \
    --eval-every 100000 --samples 0 --metrics "$work/ours.$round.jsonl" >"$work/ours.log" 2>&1 ||
    { cat "$work/ours.log"; exit 1; }
  "$venv/bin/python" bench/llama_step/torch_reference.py --device cpu --configs tiny --modes eager \
    --threads "$threads" --steps "$steps" --warmup "$warmup" --out "$work/torch.$round.json" 2>&1 |
    grep -v -i warn || true
  [ -f "$work/torch.$round.json" ] || { echo "host.sh: the PyTorch reference wrote no result" >&2; exit 1; }
done

python3 - "$work" "$rounds" "$warmup" "$steps" "$threads" "${out}" <<'PY'
import json, os, platform, statistics, subprocess, sys, time
work, rounds, warmup, steps, threads, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
ours_ms, torch_ms, tokens, torch_version, final_loss = [], [], 0, "", 0.0
for r in range(1, rounds + 1):
    lines = [json.loads(l) for l in open(f"{work}/ours.{r}.jsonl") if l.strip()]
    timed = [l for l in lines if warmup < l["step"] <= warmup + steps]  # the last step (with its evaluation) is not
    ours_ms += [l["step_ms"] for l in timed]
    tokens, final_loss = lines[0]["tokens"], timed[-1]["loss"]
    ref = json.load(open(f"{work}/torch.{r}.json"))
    torch_ms += ref["results"][0]["step_ms_each"]
    torch_version = ref["torch"]
def summary(name, ms):
    med = statistics.median(ms)
    return {"mode": name, "step_ms_median": med, "step_ms_mean": statistics.mean(ms), "step_ms_min": min(ms),
            "step_ms_max": max(ms), "tok_per_s": tokens / (med / 1e3), "steps_timed": len(ms)}
ours = summary("subspace host (examples/train_llama --device host)", ours_ms)
ours["final_loss"] = final_loss
theirs = summary("torch eager (bench/llama_step/torch_reference.py --device cpu)", torch_ms)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
doc = {"benchmark": "llama_step_host", "device": f"{cpu}, {threads} threads",
       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit, "torch": torch_version,
       "config": {"model": "tiny preset (d 128, 4 layers, 4/2 heads, FFN 344, vocab 256)", "batch": 8, "seq": 256,
                  "tokens_per_step": tokens, "precision": "fp32", "optimizer": "AdamW (0.9, 0.95), clip 1.0",
                  "warmup_steps": warmup, "timed_steps_per_round": steps, "rounds": rounds, "threads": threads,
                  "statistic": "tok_per_s from the median step time over every round; rounds alternate ours and torch"},
       "results": [ours, theirs], "ratio_vs_torch_eager": ours["tok_per_s"] / theirs["tok_per_s"]}
for r in (ours, theirs):
    print(f"{r['mode']}: {r['tok_per_s']/1e3:.1f}k tok/s (median {r['step_ms_median']:.1f} ms/step, "
          f"min {r['step_ms_min']:.1f}, max {r['step_ms_max']:.1f}, {r['steps_timed']} steps)")
print(f"ours / torch eager = {doc['ratio_vs_torch_eager']:.2f} (torch {torch_version})")
if out:
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
PY

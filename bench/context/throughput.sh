#!/usr/bin/env bash
# Context-parallel training throughput over modelled links: the same Llama trained with context parallelism through
# comm::throttled in enforce mode (every transfer completes only when the modelled link would have delivered it), at
# each link, once with the dense K/V exchange and once with Mixture of Subspaces; the JSON holds each run's mean step
# time and tokens/s over the timed steps, the K/V bytes and modelled network seconds per step, and the ratios the
# goal names: MoS at the slow link against the dense exchange at the fast one, and the dense exchange at the slow link.
#
#   bash bench/context/throughput.sh CONTEXT_LLAMA OUT.json [COMMIT] [STEPS]
#
# STEPS (8) steps per run; the first 3 are not timed (set-up, and Mixture of Subspaces' 2 dense warm-up steps and
# its switch). Environment (defaults): THROUGHPUT_PRESET (60m), THROUGHPUT_SEQ (16384) tokens per sequence,
# THROUGHPUT_CP (4) ranks per sequence, THROUGHPUT_LINKS ("gbit100 mbit300": the fast link first),
# THROUGHPUT_SYNC_EVERY (1: the weight gradients all-reduced every step, over the same modelled link; c > 1
# averages the weights every c steps instead, and STEPS - 3 must then be a multiple of c),
# THROUGHPUT_COMPRESSORS ("identity mos": the dense exchange and Mixture of Subspaces; the ratios need both),
# THROUGHPUT_DEVICE (auto), THROUGHPUT_THREADS (0), SUBSPACE_CORPUS (as bench/common/corpus.sh).
# The ranks are threads of one process: on one GPU they share it, so each step's compute is what all D ranks take
# together, not what one of D GPUs would; the network time is each link's own, as on D machines.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
bin="$1"; out="$2"; commit="${3:-unknown}"; steps="${4:-8}"
preset="${THROUGHPUT_PRESET:-60m}" seq="${THROUGHPUT_SEQ:-16384}" cp="${THROUGHPUT_CP:-4}"
links="${THROUGHPUT_LINKS:-gbit100 mbit300}" sync_every="${THROUGHPUT_SYNC_EVERY:-1}"
compressors="${THROUGHPUT_COMPRESSORS:-identity mos}"
device="${THROUGHPUT_DEVICE:-auto}" threads="${THROUGHPUT_THREADS:-0}"
[[ "$steps" =~ ^[0-9]+$ ]] && [ "$steps" -ge 5 ] || { echo "throughput.sh: STEPS must be an integer >= 5, got '$steps'" >&2; exit 2; }
[[ "$sync_every" =~ ^[0-9]+$ ]] && [ "$sync_every" -ge 1 ] && [ $(((steps - 3) % sync_every)) = 0 ] ||
  { echo "throughput.sh: THROUGHPUT_SYNC_EVERY must be a positive integer dividing the timed steps (STEPS - 3 = $((steps - 3))), got '$sync_every'" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
source "$here/../common/corpus.sh"
common=(--preset "$preset" --cp "$cp" --seq "$seq" --batch 1 --steps "$steps" --warmup 1 --eval-every "$((steps + 1))"
        --sync-every "$sync_every" --seed 1 --log-every 1 --throttle enforce --device "$device" --threads "$threads"
        "${text[@]}")
runs=()
for link in $links; do
  for compressor in $compressors; do
    [ "$compressor" = identity ] || [ "$compressor" = mos ] ||
      { echo "throughput.sh: THROUGHPUT_COMPRESSORS takes identity and mos, got '$compressor'" >&2; exit 2; }
    run="$compressor@$link" extra=()
    [ "$compressor" = mos ] && extra=(--warmup-pca 2)
    echo "== $run"
    "$bin" "${common[@]}" --bandwidth "$link" --compressor "$compressor" "${extra[@]}" --metrics "$work/$run.jsonl" \
      >"$work/$run.log" 2>&1 || { tail -20 "$work/$run.log"; echo "throughput.sh: the $run run failed" >&2; exit 1; }
    grep -E "^(context|sequence|compressor|step $steps/)" "$work/$run.log" || true
    runs+=("$run")
  done
done

python3 - "$work" "$out" "$commit" "$corpus" "$steps" "$seq" "$cp" "$preset" "$sync_every" "${runs[@]}" <<'PY'
import json, os, sys, time
work, out, commit, corpus, steps, seq, cp, preset, sync_every, *names = sys.argv[1:]
timed_from = 4  # steps 1-3: set-up, MoS's dense warm-up and its switch
results, header = [], []
for name in names:
    compressor, link = name.split("@")
    lines = [json.loads(l) for l in open(os.path.join(work, name + ".jsonl")) if l.strip()]
    timed = [l for l in lines if l["step"] >= timed_from]
    step_s = sum(l["step_ms"] for l in timed) / len(timed) / 1e3
    tokens = int(seq)  # one sequence of seq tokens per step (batch 1, the CP group holds it)
    log = open(os.path.join(work, name + ".log")).read().splitlines()
    header = header or [h for h in log if h.startswith(("context", "sequence"))]
    results.append({"compressor": compressor, "link": link, "timed_steps": len(timed), "step_s": step_s,
                    "tok_per_s": tokens / step_s,
                    "kv_bytes_per_step_busiest_rank": sum(max(l["kv_bytes_sent"]) for l in timed) / len(timed),
                    "grad_bytes_per_step": sum(l["grad_bytes_sent"] for l in timed) / len(timed),
                    "comm_model_s_per_step": sum(l["comm_model_s"] for l in timed) / len(timed),
                    "final_loss": lines[-1]["loss"],
                    "compressor_line": next((h for h in log if h.startswith("compressor")), "")})
tok_s = {(r["compressor"], r["link"]): r["tok_per_s"] for r in results}
links = list(dict.fromkeys(r["link"] for r in results))
fast, slow = links[0], links[-1]
wanted = {f"mos_{slow}_vs_dense_{fast}_tok_per_s": (("mos", slow), ("identity", fast)),
          f"dense_{slow}_vs_dense_{fast}_tok_per_s": (("identity", slow), ("identity", fast)),
          f"mos_vs_dense_at_{slow}_tok_per_s": (("mos", slow), ("identity", slow))}
ratios = {k: tok_s[a] / tok_s[b] for k, (a, b) in wanted.items() if a in tok_s and b in tok_s}  # those it ran
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
where = next((h for h in header if h.startswith("context")), "")
doc = {"benchmark": "context_throughput", "device": (cpu + "; " if where.endswith(" on host") else "") + where,
       "commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "config": {"preset": preset, "vocab": "bytes", "corpus": corpus, "cp": int(cp), "seq": int(seq), "batch": 1,
                  "steps": int(steps), "timed_steps": f"{timed_from}..{steps}", "layout": "zigzag",
                  "exchange": "ring", "throttle": "enforce", "sync_every": int(sync_every), "mos_warmup_pca": 2,
                  "header": header},
       "results": results, "ratios": ratios}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
os.replace(tmp, out)
for r in results:
    print(f"{r['compressor']:8s} {r['link']:8s} step {r['step_s']:.3f} s  {r['tok_per_s']:9.0f} tok/s  "
          f"K/V {r['kv_bytes_per_step_busiest_rank'] / 1e6:8.2f} MB  grads {r['grad_bytes_per_step'] / 1e6:7.2f} MB  "
          f"modelled network {r['comm_model_s_per_step']:.3f} s")
for k, v in ratios.items():
    print(f"{k}: {v:.3f}")
PY

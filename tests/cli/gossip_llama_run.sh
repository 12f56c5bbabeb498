#!/usr/bin/env bash
# gossip_llama end to end on the host: 4 in-process ranks train a micro Llama on the Genesis text for a few steps,
# once with gossip (one_peer_exp, AccumAdamW) and once with the all-reduce baseline, under a modelled 1 Gbit/s
# network. Each run must exit 0, print the progress lines and the validation loss, and write one JSON line per step
# with every field (bytes_sent as one count per rank; consensus at the evaluation steps of the gossip run only);
# every rank sends about the same nonzero bytes per step, and the all-reduce sends about 2(n-1)/n = 1.5 times the bytes of
# pairwise gossip (the gradients through a ring all-reduce against the parameters once to the peer).
#
#   gossip_llama_run.sh GOSSIP_LLAMA TEXT_FILE
set -euo pipefail
bin="$1"; text="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SUBSPACE_DATA_DIR="$work/cache"
common=(--text "$text" --ranks 4 --preset micro --vocab 256 --d-model 32 --seq 32 --batch 4 --steps 6 --lr 2e-3
        --warmup 2 --eval-every 3 --eval-batches 2 --threads 1 --seed 5 --bandwidth gbit1 --bucket-mb 0.05
        --samples 1 --sample-tokens 20)

fail() { echo "FAIL: $*"; for f in "$work"/*.log; do echo "== $f"; cat "$f"; done; exit 1; }
"$bin" "${common[@]}" --topology one_peer_exp --metrics "$work/gossip.jsonl" >"$work/gossip.log" 2>&1 ||
  fail "the gossip run exited $?"
"$bin" "${common[@]}" --topology allreduce --metrics "$work/allreduce.jsonl" >"$work/allreduce.log" 2>&1 ||
  fail "the all-reduce run exited $?"

for run in gossip allreduce; do
  m="$work/$run.jsonl"
  [ "$(wc -l <"$m")" -eq 6 ] || fail "$run.jsonl should have 6 lines"
  for field in step loss lr tokens tok_per_s wall_s grad_norm bytes_sent bytes_sent_max bytes_sent_mean comm_model_s; do
    grep -q "\"$field\":" "$m" || fail "$run metrics lack the field $field"
  done
  [ "$(grep -c '"val_loss":' "$m")" -eq 2 ] || fail "$run metrics should hold val_loss at steps 3 and 6"
  # bytes_sent: four nonzero counts on every line, equal up to the ring all-reduce's uneven chunks (< 1%)
  sed -E 's/.*"bytes_sent":\[([^]]*)\].*/\1/' "$m" | awk -F, -v run="$run" '
    NF != 4 { print run ": bytes_sent has " NF " entries, expected 4"; exit 1 }
    { for (i = 1; i <= 4; ++i) if ($i + 0 <= 0 || ($i - $1) / $1 > 0.01 || ($1 - $i) / $1 > 0.01) {
        print run ": unequal or zero bytes_sent: " $0; exit 1 } }' ||
    fail "bytes_sent"
  grep -q "step 6/6 .*sent .*B/rank .*comm .*val " "$work/$run.log" || fail "$run: no final progress line with bytes, comm time and val"
  grep -q -- "--- sample 1 ---" "$work/$run.log" || fail "$run: no sample printed"
done
[ "$(grep -c '"consensus":' "$work/gossip.jsonl")" -eq 2 ] || fail "gossip metrics should hold consensus at steps 3 and 6"
grep -q '"consensus":' "$work/allreduce.jsonl" && fail "all-reduce metrics should hold no consensus"
grep -q "consensus " "$work/gossip.log" || fail "gossip: no consensus distance printed"

bytes_of() { tail -n 1 "$1" | sed -E 's/.*"bytes_sent_max":([0-9]+).*/\1/'; }
g="$(bytes_of "$work/gossip.jsonl")"; a="$(bytes_of "$work/allreduce.jsonl")"
awk -v g="$g" -v a="$a" 'BEGIN { r = a / g; exit !(r > 1.45 && r < 1.55) }' ||
  fail "all-reduce bytes / gossip bytes = $a / $g, expected about 1.5"
echo "ok: gossip sends $g B per rank per step, all-reduce $a B"

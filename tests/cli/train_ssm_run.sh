#!/usr/bin/env bash
# train_ssm end to end on the host: for the exact engine on one rank and the sharded engine (window 8) on two
# in-process ranks, a run of 6 steps and a run of the same plan stopped at step 4 (--stop-at) then resumed to
# step 6 must write the same final training loss (exact: the host path is deterministic); the metrics carry
# every field and the activation bytes; one-rank runs print samples.
#
#   train_ssm_run.sh TRAIN_SSM TEXT_FILE
set -euo pipefail
bin="$1"; text="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SUBSPACE_DATA_DIR="$work/cache"
fail() { echo "FAIL: $*"; for f in "$work"/*.log; do echo "== $f"; cat "$f"; done; exit 1; }
loss_of() { tail -n 1 "$1" | sed -E 's/.*"loss":([^,]*),.*/\1/'; }

run_case() {
  local name="$1"; shift
  local common=(--text "$text" --d-model 16 --state 4 --layers 4 --seq 32 --batch 4 --lr 3e-3 --warmup 2
                --eval-every 3 --eval-batches 2 --threads 2 --seed 5 --sample-tokens 30 --samples 1 "$@")
  "$bin" "${common[@]}" --steps 6 --metrics "$work/$name-straight.jsonl" >"$work/$name-straight.log"
  "$bin" "${common[@]}" --steps 6 --stop-at 4 --metrics "$work/$name-resumed.jsonl" \
    --checkpoint-dir "$work/$name-ckpt" >"$work/$name-first.log"
  "$bin" "${common[@]}" --steps 6 --metrics "$work/$name-resumed.jsonl" --checkpoint-dir "$work/$name-ckpt" \
    --resume "$work/$name-ckpt" >"$work/$name-resumed.log"
  [ "$(wc -l <"$work/$name-straight.jsonl")" -eq 6 ] || fail "$name: straight metrics should have 6 lines"
  [ "$(wc -l <"$work/$name-resumed.jsonl")" -eq 6 ] || fail "$name: resumed metrics should have 6 lines (4 + 2)"
  for field in step loss val_loss lr tokens tok_per_s grad_norm activation_bytes; do
    grep -q "\"$field\":" "$work/$name-straight.jsonl" || fail "$name: metrics lack the field $field"
  done
  local a b
  a="$(loss_of "$work/$name-straight.jsonl")"; b="$(loss_of "$work/$name-resumed.jsonl")"
  [ "$a" = "$b" ] || fail "$name: final loss differs: straight $a, resumed $b"
  grep -q "resumed from .*step_000000004 at step 4" "$work/$name-resumed.log" || fail "$name: no resume line"
  grep -q "act .*B (formula .*B)" "$work/$name-straight.log" || fail "$name: no activation memory in the progress line"
  echo "ok: $name final loss $a in both runs"
}

run_case exact --engine exact
grep -q -- "--- sample 1 ---" "$work/exact-straight.log" || fail "exact: no sample printed"
[ -f "$work/exact-ckpt/step_000000006/config.json" ] || fail "exact: checkpoint lacks config.json"
grep -q '"state": 4' "$work/exact-ckpt/step_000000006/config.json" || fail "exact: config.json lacks the state size"
run_case sharded --engine sharded --window 8 --ranks 2
[ -f "$work/sharded-ckpt/step_000000006/stage-1/model.safetensors" ] || fail "sharded: no per-rank checkpoint"

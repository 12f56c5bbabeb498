#!/usr/bin/env bash
# train_llama end to end on the host: a run of 8 steps, and a run of the same plan stopped at step 5 (--stop-at)
# then resumed to step 8, must print the same final training loss in their metrics (exact: the host path is
# deterministic), write every metrics field, keep HF-loadable checkpoints, and print samples. A resume with another
# --steps must say that it re-plans the learning-rate schedule (no exact continuation).
#
#   train_llama_resume.sh TRAIN_LLAMA TEXT_FILE
set -euo pipefail
bin="$1"; text="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SUBSPACE_DATA_DIR="$work/cache"
common=(--text "$text" --preset micro --vocab 256 --d-model 32 --seq 32 --batch 4 --accumulation 2 --lr 2e-3
        --warmup 2 --eval-every 4 --eval-batches 2 --threads 2 --seed 11 --sample-tokens 40 --samples 1)

"$bin" "${common[@]}" --steps 8 --metrics "$work/straight.jsonl" >"$work/straight.log"
"$bin" "${common[@]}" --steps 8 --stop-at 5 --metrics "$work/resumed.jsonl" --checkpoint-dir "$work/ckpt" \
  --checkpoint-every 5 >"$work/first.log"
"$bin" "${common[@]}" --steps 8 --metrics "$work/resumed.jsonl" --checkpoint-dir "$work/ckpt" \
  --resume "$work/ckpt" >"$work/resumed.log"
# A resume with another --steps re-plans the learning-rate schedule, and says it is no exact continuation.
"$bin" "${common[@]}" --steps 10 --resume "$work/ckpt/step_000000008" >"$work/replanned.log"

fail() { echo "FAIL: $*"; for f in "$work"/*.log; do echo "== $f"; cat "$f"; done; exit 1; }
[ "$(wc -l <"$work/straight.jsonl")" -eq 8 ] || fail "straight.jsonl should have 8 lines"
[ "$(wc -l <"$work/resumed.jsonl")" -eq 8 ] || fail "resumed.jsonl should have 8 lines (5 + 3 appended)"
for field in step loss val_loss lr tokens tok_per_s wall_s grad_norm; do
  grep -q "\"$field\":" "$work/straight.jsonl" || fail "metrics lack the field $field"
done
loss_of() { tail -n 1 "$1" | sed -E 's/.*"loss":([^,]*),.*/\1/'; }
a="$(loss_of "$work/straight.jsonl")"; b="$(loss_of "$work/resumed.jsonl")"
[ "$a" = "$b" ] || fail "final loss differs: straight $a, resumed $b"
grep -q "resumed from .*step_000000005 at step 5" "$work/resumed.log" || fail "no resume line"
! grep -q "not an exact continuation" "$work/resumed.log" || fail "the same --steps was called inexact"
grep -q "note: not an exact continuation: the learning-rate schedule is re-planned to end at step 10 (the checkpoint's run planned 8; --steps 8 continues it exactly)" \
  "$work/replanned.log" || fail "a resume with another --steps did not say the schedule is re-planned"
for f in model.safetensors config.json trainer_state.json trainer_state.safetensors; do
  [ -f "$work/ckpt/step_000000008/$f" ] || fail "checkpoint step_000000008 lacks $f"
done
grep -q -- "--- sample 1 ---" "$work/straight.log" || fail "no sample printed"
grep -q "val " "$work/straight.log" || fail "no validation loss printed"
echo "ok: final loss $a in both runs"

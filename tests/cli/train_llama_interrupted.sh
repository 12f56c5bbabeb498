#!/usr/bin/env bash
# train_llama after an interrupted run, simulated on disk: the run stopped at step 5 left what kill -9 or a full
# disk can leave (metrics lines past its last checkpoint and a torn last line, a half-written staging directory, a
# step directory written in place without its sidecar, and its step-5 checkpoint moved aside by a re-save that
# died before renaming the new one in). A resume must clean all of it, continue from step 5, log each step once
# and end with the loss of an uninterrupted run. A checkpoint holding another run's optimizer state of the same
# step is refused, naming the file.
#
#   train_llama_interrupted.sh TRAIN_LLAMA TEXT_FILE
set -euo pipefail
bin="$1"; text="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SUBSPACE_DATA_DIR="$work/cache"
common=(--text "$text" --preset micro --vocab 256 --d-model 32 --seq 32 --batch 4 --lr 2e-3 --warmup 2
        --eval-every 4 --eval-batches 2 --threads 2 --samples 0 --steps 8)
fail() { echo "FAIL: $*"; for f in "$work"/*.log; do echo "== $f"; cat "$f"; done; exit 1; }
loss_of() { tail -n 1 "$1" | sed -E 's/.*"loss":([^,]*),.*/\1/'; }
ckpt="$work/ckpt"

"$bin" "${common[@]}" --seed 11 --metrics "$work/straight.jsonl" >"$work/straight.log"
"$bin" "${common[@]}" --seed 11 --stop-at 5 --checkpoint-dir "$ckpt" --checkpoint-every 5 \
  --metrics "$work/m.jsonl" >"$work/first.log"

# What the interrupted run left.
sed -n 5p "$work/m.jsonl" | sed 's/"step":5/"step":6/' >>"$work/m.jsonl"
printf '{"step":7,"lo' >>"$work/m.jsonl"
mkdir -p "$ckpt/.step_000000006.partial" && echo garbage >"$ckpt/.step_000000006.partial/model.safetensors"
mkdir -p "$ckpt/step_000000007" && cp "$ckpt/step_000000005/config.json" "$ckpt/step_000000007/"
mv "$ckpt/step_000000005" "$ckpt/.step_000000005.old"

"$bin" "${common[@]}" --seed 11 --checkpoint-dir "$ckpt" --resume "$ckpt" --metrics "$work/m.jsonl" \
  >"$work/resumed.log"
grep -q "restored '.*step_000000005'" "$work/resumed.log" || fail "the checkpoint moved aside was not restored"
grep -q "removed '.*\.step_000000006\.partial'" "$work/resumed.log" || fail "the staging directory was not removed"
grep -q "removed '.*step_000000007' (an incomplete checkpoint)" "$work/resumed.log" || fail "step 7 was not removed"
grep -q "resumed from .*step_000000005 at step 5" "$work/resumed.log" || fail "no resume from step 5"
[ "$(ls -A "$ckpt" | tr '\n' ' ')" = "step_000000005 step_000000008 " ] || fail "left in $ckpt: $(ls -A "$ckpt")"
steps="$(sed -E 's/.*"step":([0-9]+),.*/\1/' "$work/m.jsonl" | tr '\n' ' ')"
[ "$steps" = "1 2 3 4 5 6 7 8 " ] || fail "metrics steps are '$steps', expected each of 1..8 once"
a="$(loss_of "$work/straight.jsonl")"; b="$(loss_of "$work/m.jsonl")"
[ "$a" = "$b" ] || fail "final loss differs: straight $a, resumed $b"

# Another run's optimizer state of the same step beside this run's weights.
"$bin" "${common[@]}" --seed 12 --stop-at 5 --checkpoint-dir "$work/other" >"$work/other.log"
cp "$work/other/step_000000005/trainer_state.safetensors" "$ckpt/step_000000005/"
if "$bin" "${common[@]}" --seed 11 --resume "$ckpt/step_000000005" >"$work/mixed.log" 2>&1; then
  fail "a checkpoint mixing two runs' files was resumed"
fi
grep -q "trainer_state.safetensors (.*is not the file trainer_state.json records.*mixes files of different saves" \
  "$work/mixed.log" || fail "the mixture was not reported"
echo "ok: resumed after a simulated kill, final loss $a; a mixed checkpoint is refused"

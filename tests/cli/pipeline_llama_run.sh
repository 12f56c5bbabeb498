#!/usr/bin/env bash
# pipeline_llama end to end on the host: 4 stages as threads train a micro Llama on the Genesis text, as a
# Subspace Network and as a plain pipeline, under modelled 80 Mbit/s links. Each run exits 0, prints the progress
# lines with the validation loss and a sample, and writes one JSON line per step. The subspace boundaries carry
# exactly B·S·M·(4k + 2) bytes forward (rank 0's sends) per step, the plain ones B·S·M·d·4. A run stopped after 3
# steps with a checkpoint and resumed to 6 ends with the uninterrupted run's final loss; a resume from that checkpoint
# with one stage's file damaged fails at once naming it; and --export-hf writes a Hugging Face Llama directory
# (config.json, model.safetensors) that llama_eval loads.
#
#   pipeline_llama_run.sh PIPELINE_LLAMA LLAMA_EVAL TEXT_FILE
set -euo pipefail
bin="$1"; eval_bin="$2"; text="$3"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SUBSPACE_DATA_DIR="$work/cache"
common=(--text "$text" --stages 4 --preset micro --vocab 256 --layers 4 --seq 32 --batch 2 --microbatches 3
        --steps 6 --lr 2e-3 --warmup 2 --eval-every 3 --eval-batches 2 --threads 1 --seed 5 --bandwidth mbit80
        --samples 1 --sample-tokens 20)

fail() { echo "FAIL: $*"; for f in "$work"/*.log; do echo "== $f"; cat "$f"; done; exit 1; }
"$bin" "${common[@]}" --compressor subspace --k 4 --metrics "$work/subspace.jsonl" --export-hf "$work/hf" \
  >"$work/subspace.log" 2>&1 || fail "the subspace run exited $?"
"$bin" "${common[@]}" --compressor identity --metrics "$work/identity.jsonl" >"$work/identity.log" 2>&1 ||
  fail "the identity run exited $?"

tokens=$((2 * 32 * 3))
for run in subspace identity; do
  m="$work/$run.jsonl"
  [ "$(wc -l <"$m")" -eq 6 ] || fail "$run.jsonl should have 6 lines"
  for field in step loss lr tokens tok_per_s step_ms grad_norm bytes_sent comm_model_s waited_fraction; do
    grep -q "\"$field\":" "$m" || fail "$run metrics lack the field $field"
  done
  [ "$(grep -c '"val_loss":' "$m")" -eq 2 ] || fail "$run metrics should hold val_loss at steps 3 and 6"
  [ "$run" = subspace ] && want=$((tokens * (4 * 4 + 2))) || want=$((tokens * 16 * 4))
  first=$(sed -E 's/.*"bytes_sent":\[([0-9]+),.*/\1/' "$m" | sort -u)
  [ "$first" = "$want" ] || fail "$run: rank 0 sent '$first' bytes per step, expected $want"
  grep -q "step 6/6 .*sent .*B/rank .*comm .*val " "$work/$run.log" || fail "$run: no final progress line"
  grep -q -- "--- sample 1 ---" "$work/$run.log" || fail "$run: no sample printed"
done


# Stop after 3 steps with a checkpoint, resume to 6: the same final loss as the uninterrupted run.
"$bin" "${common[@]}" --compressor subspace --k 4 --steps 6 --checkpoint-dir "$work/ckpt" --checkpoint-every 3 \
  >"$work/first.log" 2>&1 || fail "the checkpointing run exited $?"
[ -f "$work/ckpt/step_000000003/stage-0/model.safetensors" ] || fail "no stage-0 checkpoint at step 3"
[ -f "$work/ckpt/step_000000003/stage-3/model.safetensors" ] || fail "no stage-3 checkpoint at step 3"
"$bin" "${common[@]}" --compressor subspace --k 4 --resume "$work/ckpt/step_000000003" >"$work/resumed.log" 2>&1 ||
  fail "the resumed run exited $?"
grep -q "resumed from .* at step 3" "$work/resumed.log" || fail "no resume line"
want=$(grep -o 'step 6/6 | loss [0-9.]*' "$work/subspace.log")
got=$(grep -o 'step 6/6 | loss [0-9.]*' "$work/resumed.log")
[ -n "$want" ] && [ "$want" = "$got" ] || fail "resumed '$got' differs from uninterrupted '$want'"

# A checkpoint whose last stage is damaged: rank 3 fails to load it, and its failure aborts the in-process world,
# so ranks 0-2 (which loaded theirs and wait for rank 3) stop at once instead of after --comm-timeout, and the
# error names rank 3 and its file rather than a peer's timeout.
cp -r "$work/ckpt/step_000000003" "$work/damaged"
truncate -s 100 "$work/damaged/stage-3/model.safetensors"
status=0
timeout 120 "$bin" "${common[@]}" --compressor subspace --k 4 --comm-timeout 600 --resume "$work/damaged" \
  >"$work/damaged.log" 2>&1 || status=$?
[ "$status" -ne 124 ] || fail "the resume from a damaged stage hung (the peers waited for rank 3)"
[ "$status" -ne 0 ] || fail "the resume from a damaged stage exited 0"
grep -q "error: rank 3: .*stage-3.*model.safetensors" "$work/damaged.log" || fail "the error does not name rank 3's file"
! grep -q "timed out" "$work/damaged.log" || fail "a peer timed out instead of stopping with rank 3"

# The export is a plain Llama llama_eval reads.
[ -f "$work/hf/config.json" ] && [ -f "$work/hf/model.safetensors" ] || fail "no exported Hugging Face directory"
"$eval_bin" --model "$work/hf" --prompt "And God said" --generate 10 >"$work/eval.log" 2>&1 ||
  fail "llama_eval could not read the export"
echo "ok"

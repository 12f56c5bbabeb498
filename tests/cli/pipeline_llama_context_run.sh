#!/usr/bin/env bash
# pipeline_llama with pipeline × context parallelism on the host: 2 stages × 2 ranks per sequence (zigzag, ring)
# train a micro Llama on the Genesis text with both compressors at once — the Subspace Network's boundary between
# the stages and Mixture of Subspaces in the attention. The run exits 0, says so in its header, writes one JSON line
# per step, counts each sequence once in the tokens, and after the dense warm-up (2 steps) rank 0 sends fewer bytes
# per step (compressed K/V). A run stopped at step 3 with a checkpoint (after the switch: the K/V tables beside
# each stage) and resumed to 4 ends with the uninterrupted run's final loss.
#
#   pipeline_llama_context_run.sh PIPELINE_LLAMA TEXT_FILE
set -euo pipefail
bin="$1"; text="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SUBSPACE_DATA_DIR="$work/cache"
common=(--text "$text" --stages 2 --cp 2 --compressor subspace --k 4 --kv-compressor mos --warmup-pca 2 --pca-steps 1
        --preset micro --vocab 256 --layers 4 --seq 32 --batch 2 --microbatches 2 --steps 4 --lr 2e-3 --warmup 1
        --eval-every 2 --eval-batches 2 --threads 1 --seed 5 --samples 1 --sample-tokens 10)

fail() { echo "FAIL: $*"; for f in "$work"/*.log; do echo "== $f"; cat "$f"; done; exit 1; }
"$bin" "${common[@]}" --metrics "$work/run.jsonl" --checkpoint-dir "$work/ckpt" --checkpoint-every 3 \
  >"$work/run.log" 2>&1 || fail "the run exited $?"
grep -q "pipeline: 2 stages x 1 replica = 4 ranks" "$work/run.log" || fail "no pipeline line"
grep -q "context: every stage's sequences over 2 ranks, zigzag placement (16 rows per rank), ring exchange" \
  "$work/run.log" || fail "no context line"
grep -q "K/V compressor: Mixture of Subspaces" "$work/run.log" || fail "no K/V compressor line"
grep -q "compressor: subspace, k 4" "$work/run.log" || fail "no boundary compressor line"
grep -q "step 4/4 .*val " "$work/run.log" || fail "no final progress line"
grep -q -- "--- sample 1 ---" "$work/run.log" || fail "no sample"

m="$work/run.jsonl"
[ "$(wc -l <"$m")" -eq 4 ] || fail "run.jsonl should have 4 lines"
# Each sequence once: 2 micro-batches of 2 x 32 tokens per step.
[ "$(sed -n 1p "$m" | sed -E 's/.*"tokens":([0-9]+).*/\1/')" = "128" ] || fail "step 1 should count 128 tokens"
# Rank 0 (stage 0, place 0) sends its boundary payloads and its K/V: less once the K/V are compressed (step 3).
bytes() { sed -n "${1}p" "$m" | sed -E 's/.*"bytes_sent":\[([0-9]+),.*/\1/'; }
[ "$(bytes 3)" -lt "$(bytes 2)" ] || fail "rank 0 sent $(bytes 3) bytes at step 3, not fewer than $(bytes 2) at step 2"
[ -f "$work/ckpt/step_000000003/stage-0/kv_subspace.safetensors" ] || fail "no K/V tables beside stage 0 at step 3"

"$bin" "${common[@]}" --resume "$work/ckpt/step_000000003" >"$work/resumed.log" 2>&1 ||
  fail "the resumed run exited $?"
grep -q "resumed from .* at step 3" "$work/resumed.log" || fail "no resume line"
want=$(grep -o 'step 4/4 | loss [0-9.]*' "$work/run.log")
got=$(grep -o 'step 4/4 | loss [0-9.]*' "$work/resumed.log")
[ -n "$want" ] && [ "$want" = "$got" ] || fail "resumed final '$got', uninterrupted '$want'"
echo "pipeline_llama pipeline x context: ok"

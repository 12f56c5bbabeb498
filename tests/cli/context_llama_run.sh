#!/usr/bin/env bash
# context_llama end to end on the host: 4 ranks as threads train a micro Llama on the Genesis text with every
# 32-token sequence spread over them (zigzag placement, ring exchange), under modelled 300 Mbit/s links. The run
# exits 0, prints progress lines with the validation loss and writes one JSON line per step; each rank sends exactly
# (C − 1) K/V blocks forward and (C − 1) dK/dV blocks backward per layer and micro-batch (a block: 2 · B · S/C ·
# d_kv fp32 values). The all-gather exchange trains to the same loss (up to fp32 rounding). A run stopped after 3 steps with a
# checkpoint and resumed to 6 ends with the uninterrupted run's final loss; the checkpoint also resumes on 2 ranks.
# With --compressor mos the first steps send dense K/V, the later ones compressed payloads of exactly the
# expected size, and a resume after the switch repeats the uninterrupted run.
#
#   context_llama_run.sh CONTEXT_LLAMA TEXT_FILE
set -euo pipefail
bin="$1"; text="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SUBSPACE_DATA_DIR="$work/cache"
common=(--text "$text" --preset micro --vocab 256 --layers 3 --seq 32 --batch 2 --microbatches 2 --steps 6 --lr 2e-3
        --warmup 2 --eval-every 3 --eval-batches 2 --threads 1 --seed 5 --bandwidth mbit300)

fail() { echo "FAIL: $*"; for f in "$work"/*.log; do echo "== $f"; cat "$f"; done; exit 1; }
"$bin" "${common[@]}" --cp 4 --metrics "$work/ring.jsonl" >"$work/ring.log" 2>&1 || fail "the ring run exited $?"
"$bin" "${common[@]}" --cp 4 --attention all_gather --metrics "$work/gather.jsonl" >"$work/gather.log" 2>&1 ||
  fail "the all-gather run exited $?"

m="$work/ring.jsonl"
[ "$(wc -l <"$m")" -eq 6 ] || fail "ring.jsonl should have 6 lines"
for field in step loss lr tokens tok_per_s step_ms grad_norm kv_bytes_sent kv_bytes_per_layer grad_bytes_sent comm_model_s; do
  grep -q "\"$field\":" "$m" || fail "metrics lack the field $field"
done
[ "$(grep -c '"val_loss":' "$m")" -eq 2 ] || fail "metrics should hold val_loss at steps 3 and 6"
# micro: d_kv = 2 heads x 4 = 8; per layer and micro-batch 2 x 3 blocks of 2 x 2 x 8 x 8 fp32 values.
want=$((3 * 2 * 2 * 3 * (2 * 2 * 8 * 8 * 4)))
for run in ring gather; do
  sent=$(sed -E 's/.*"kv_bytes_sent":\[([0-9,]+)\].*/\1/' "$work/$run.jsonl" | tr ',' '\n' | sort -u)
  [ "$sent" = "$want" ] || fail "$run: the ranks sent '$sent' K/V bytes per step, expected $want"
done
grep -q "step 6/6 .*K/V .*B/rank .*comm .*val " "$work/ring.log" || fail "no final progress line"
ring_loss=$(grep -o 'step 6/6 | loss [0-9.]*' "$work/ring.log")
gather_loss=$(grep -o 'step 6/6 | loss [0-9.]*' "$work/gather.log")
# The two exchanges sum the same partial gradients in another order: equal up to fp32 rounding.
awk -v a="${ring_loss##* }" -v b="${gather_loss##* }" 'BEGIN { d = a - b; exit !(a > 0 && d < 1e-3 && d > -1e-3) }' ||
  fail "ring '$ring_loss' and all-gather '$gather_loss' differ"

# Stop after 3 steps with a checkpoint, resume to 6: the same final loss as the uninterrupted run.
"$bin" "${common[@]}" --cp 4 --checkpoint-dir "$work/ckpt" --checkpoint-every 3 >"$work/first.log" 2>&1 ||
  fail "the checkpointing run exited $?"
[ -f "$work/ckpt/step_000000003/model.safetensors" ] || fail "no checkpoint at step 3"
"$bin" "${common[@]}" --cp 4 --resume "$work/ckpt/step_000000003" >"$work/resumed.log" 2>&1 ||
  fail "the resumed run exited $?"
grep -q "resumed from .* at step 3" "$work/resumed.log" || fail "no resume line"
got=$(grep -o 'step 6/6 | loss [0-9.]*' "$work/resumed.log")
[ "$ring_loss" = "$got" ] || fail "resumed '$got' differs from uninterrupted '$ring_loss'"
# The checkpoint is a whole model's: 2 ranks per sequence resume it too.
"$bin" "${common[@]}" --cp 2 --layout contiguous --resume "$work/ckpt/step_000000003" >"$work/resumed2.log" 2>&1 ||
  fail "the resume on 2 ranks exited $?"
grep -q "step 6/6 | loss " "$work/resumed2.log" || fail "the resume on 2 ranks printed no final step"
# Mixture of Subspaces: 3 dense warm-up steps, then compressed K/V on layers 0 and 1 (the last stays dense). Per
# layer and micro-batch a payload holds 2 x 8 rows x (2 + 3) fp32 coefficients and 4 chunks x 2 fp32 rotation
# coefficients: 352 B, 3 of them each way; the last layer's dense blocks as before.
mos=(--compressor mos --warmup-pca 3 --pca-steps 2 --rank-k 2 --rank-v 3)
"$bin" "${common[@]}" --cp 4 "${mos[@]}" --metrics "$work/mos.jsonl" --checkpoint-dir "$work/mos_ckpt" \
  --checkpoint-every 4 >"$work/mos.log" 2>&1 || fail "the Mixture-of-Subspaces run exited $?"
grep -q "switched to Mixture of Subspaces after step 3" "$work/mos.log" || fail "no switch line"
dense_step=$((2 * 3 * 2 * 3 * (2 * 2 * 8 * 8 * 4)))
mos_step=$((2 * (2 * 2 * 3 * 352 + 2 * 3 * (2 * 2 * 8 * 8 * 4))))
for s in 1 2 4 5 6; do
  line=$(grep "\"step\":$s," "$work/mos.jsonl")
  sent=$(echo "$line" | sed -E 's/.*"kv_bytes_sent":\[([0-9,]+)\].*/\1/' | tr ',' '\n' | sort -u)
  [ "$s" -le 2 ] && want_mos=$dense_step || want_mos=$mos_step
  [ "$sent" = "$want_mos" ] || fail "mos step $s: the ranks sent '$sent' K/V bytes, expected $want_mos"
done
[ -f "$work/mos_ckpt/step_000000004/kv_subspace.safetensors" ] || fail "no K/V tables beside the step-4 checkpoint"
"$bin" "${common[@]}" --cp 4 "${mos[@]}" --resume "$work/mos_ckpt/step_000000004" >"$work/mos_resumed.log" 2>&1 ||
  fail "the Mixture-of-Subspaces resume exited $?"
want=$(grep -o 'step 6/6 | loss [0-9.]*' "$work/mos.log")
got=$(grep -o 'step 6/6 | loss [0-9.]*' "$work/mos_resumed.log")
[ -n "$want" ] && [ "$want" = "$got" ] || fail "mos resumed '$got' differs from uninterrupted '$want'"
echo "ok"

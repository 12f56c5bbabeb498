#!/usr/bin/env bash
# --data DIR on text_to_shards output: train_llama trains on the *_train_* shards and validates on the *_val_*
# shards (never mixing them, whatever --val-fraction says), and its data: line names those files and the format read
# from their headers. A glob of every shard mixes them by request: the last --val-fraction of the tokens validates.
#
#   data_dir_run.sh TEXT_TO_SHARDS TRAIN_LLAMA TEXT_FILE
set -euo pipefail
to_shards="$1"; bin="$2"; text="$3"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SUBSPACE_DATA_DIR="$work/cache"
fail() { echo "FAIL: $*"; for f in "$work"/*.log; do echo "== $f"; cat "$f"; done; exit 1; }

dir="$work/shards"
"$to_shards" --input "$text" --out "$dir" --prefix gen --shard-tokens 60000 --val-fraction 0.1 >"$work/shards.log"
[ -f "$dir/gen_train_000002.bin" ] && [ ! -f "$dir/gen_train_000003.bin" ] && [ -f "$dir/gen_val_000000.bin" ] ||
  fail "expected 3 train shards and 1 val shard"

common=(--preset micro --vocab 256 --d-model 32 --seq 32 --batch 2 --steps 1 --eval-every 1 --eval-batches 1
        --threads 2 --samples 0 --val-fraction 0.2)
# run NAME DATA EXPECTED: train_llama --data DATA prints a data: line that starts with EXPECTED.
run() {
  "$bin" --data "$2" "${common[@]}" >"$work/$1.log"
  local line
  line="$(grep '^data: ' "$work/$1.log")" || fail "$1: no data: line"
  [ "${line:0:${#3}}" = "$3" ] || fail "$1: got
  $line
expected it to start with
  $3"
}
run dir "$dir" "data: llm.c version 1 (uint16 tokens): train 3 files ('$dir/gen_train_000000.bin' ... '$dir/gen_train_000002.bin'), val '$dir/gen_val_000000.bin' (the directory's *_val_* files) — "
run glob "$dir/*.bin" "data: llm.c version 1 (uint16 tokens): train 3 files ('$dir/gen_train_000000.bin' ... '$dir/gen_train_000002.bin'), val 2 files ('$dir/gen_train_000002.bin' ... '$dir/gen_val_000000.bin') (the last 20% of the tokens) — "
echo "ok: --data DIR validates on its *_val_* shard"

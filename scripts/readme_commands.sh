#!/usr/bin/env bash
# Runs the README's example commands as written, on a tiny budget, against built examples. A command is a line of a
# ```sh block that starts with build/examples/ (with its \-continued lines); they run in order in one scratch
# directory (so runs/, shards/ and checkpoints pass from one command to the next), with build/examples/ replaced by
# EXAMPLES_DIR, these numbers shrunk: --steps 6, --stop-at 3, --checkpoint-every 3, step_NNNNNNNNN 6, --generate 16,
# --warmup-pca 2, and the trainers given smaller batches, sequences, evaluations and samples and primitives_demo fewer
# rows (flags appended: the last wins);
# everything else is kept as written. The default corpus is extracted into the scratch directory; where its Debian
# packages are missing, tests/data/kjv_genesis.txt stands in for it (with a note).
#
# Fails (exit 1, naming each command) when a command fails, and when the README names a program under
# build/examples that examples/CMakeLists.txt does not build, or a program under a preset's directory
# (build/cpu/examples/...), which the documented build (scripts/build_examples.sh) does not promise.
#
#   bash scripts/readme_commands.sh [EXAMPLES_DIR]    # default: $SUBSPACE_EXAMPLES_DIR, else build/examples
#   bash scripts/readme_commands.sh build/ci/examples # CI: the ci preset's binaries (CUDA builds; without a GPU
#                                                     # --device auto runs them on the host)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
readme="$root/README.md"
dir="${1:-${SUBSPACE_EXAMPLES_DIR:-$root/build/examples}}"
[ -d "$dir" ] || { echo "readme_commands: no examples directory $dir (bash scripts/build_examples.sh makes one)" >&2; exit 1; }
dir="$(cd "$dir" && pwd)"

failed=()
fail() { echo "FAIL: $*"; failed+=("$*"); }

# The programs the documented build makes, and the ones the README names.
mapfile -t built < <(sed -nE 's/^subspace_example\(([a-z_0-9]+) .*/\1/p' "$root/examples/CMakeLists.txt")
mapfile -t named < <(grep -oE 'build/examples/[A-Za-z_0-9]+' "$readme" | sed 's|build/examples/||' | sort -u)
for program in "${named[@]}"; do
  [[ " ${built[*]} " == *" $program "* ]] || fail "README names build/examples/$program, which examples/CMakeLists.txt does not build"
  [ -x "$dir/$program" ] || fail "README names build/examples/$program, which is not in $dir"
done
while read -r path; do
  fail "README names $path: the documented build promises build/examples/..., not a preset's directory"
done < <(grep -oE 'build/[A-Za-z_0-9-]+/examples/[A-Za-z_0-9]+' "$readme" | sort -u)

# The commands: lines of ```sh blocks that start with build/examples/, joined with their continuation lines.
mapfile -t commands < <(awk '
  /^```/ { in_sh = !in_sh && /^```sh[ \t]*$/; cont = 0; next }
  !in_sh { next }
  cont { sub(/^[ \t]+/, ""); cmd = cmd " " $0 }
  !cont { if ($0 !~ /^build\/examples\//) next; cmd = $0 }
  { if (cmd ~ /\\$/) { sub(/[ \t]*\\$/, "", cmd); cont = 1 } else { print cmd; cont = 0 } }
' "$readme")
[ "${#commands[@]}" -gt 0 ] || fail "no build/examples/ command found in README.md"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export SUBSPACE_DATA_DIR="$work/data"
mkdir -p "$SUBSPACE_DATA_DIR"
has_corpus() { [ -e /usr/lib/bible.data ] && { command -v bible >/dev/null || [ -x /usr/games/bible ]; }; }
if ! has_corpus; then
  echo "note: the default corpus (Debian bible-kjv, bible-kjv-text) is not installed: tests/data/kjv_genesis.txt stands in"
  cp "$root/tests/data/kjv_genesis.txt" "$SUBSPACE_DATA_DIR/kjv.txt"
fi

start=$SECONDS
for i in "${!commands[@]}"; do
  original="${commands[$i]}"
  program="$(sed -E 's|^build/examples/([A-Za-z_0-9]+).*|\1|' <<<"$original")"
  cmd="$(sed -E -e 's/[[:space:]]+#.*$//' -e "s|^build/examples/|$dir/|" \
    -e 's/--steps [0-9]+/--steps 6/g' -e 's/--stop-at [0-9]+/--stop-at 3/g' \
    -e 's/--checkpoint-every [0-9]+/--checkpoint-every 3/g' -e 's/step_[0-9]{9}/step_000000006/g' \
    -e 's/--generate [0-9]+/--generate 16/g' -e 's/--warmup-pca [0-9]+/--warmup-pca 2/g' <<<"$original")"
  case "$program" in  # fewer tokens per step, evaluation and sample (the flags given last win)
    train_llama | train_ssm) cmd+=" --batch 2 --eval-batches 2 --sample-tokens 32" ;;
    gossip_llama) cmd+=" --batch 2 --seq 64 --eval-batches 2 --sample-tokens 32" ;;
    pipeline_llama) cmd+=" --batch 1 --eval-batches 2 --sample-tokens 32" ;;
    context_llama) cmd+=" --seq 256 --eval-batches 1" ;;
    primitives_demo) cmd+=" --rows 1024" ;;  # converges as well (relative error 0.012 against 0.011)
  esac
  log="$work/command_$i.log"
  t0=$SECONDS
  if (cd "$work" && timeout 300 bash -c "$cmd") >"$log" 2>&1; then
    echo "ok ($((SECONDS - t0)) s): $original"
  else
    status=$?
    echo "---- output of: $cmd"
    tail -n 20 "$log"
    fail "exit status $status ($((SECONDS - t0)) s): $original"
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "readme_commands: ${#failed[@]} of the README's commands or names failed:"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "readme_commands: all ${#commands[@]} README commands ran in $((SECONDS - start)) s (examples from $dir)"

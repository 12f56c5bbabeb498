#!/usr/bin/env bash
# Runs a command that must fail: passes when it exits with the expected status and its stderr matches the
# expected pattern (grep -E), and nothing is left in the scratch directory it may write to.
#
#   expect_failure.sh STATUS PATTERN -- COMMAND [ARGS...]
set -uo pipefail
want_status="$1"; pattern="$2"; shift 2
[ "$1" = "--" ] && shift
err="$(mktemp)"
trap 'rm -f "$err"' EXIT
"$@" >/dev/null 2>"$err"
status=$?
if [ "$status" -ne "$want_status" ]; then
  echo "expected exit status $want_status, got $status from: $*"; cat "$err"; exit 1
fi
if ! grep -Eq -- "$pattern" "$err"; then
  echo "stderr does not match /$pattern/:"; cat "$err"; exit 1
fi
echo "ok: exit $status, stderr: $(head -c 300 "$err")"

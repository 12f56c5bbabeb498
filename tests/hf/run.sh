#!/usr/bin/env bash
# Runs the Hugging Face transformers check (check_transformers.py) on a llama_eval binary.
#
#   tests/hf/run.sh path/to/llama_eval [check_transformers.py flags]
#
# PYTHON names the interpreter (default python3); it needs torch, transformers, safetensors and numpy, e.g.
#   python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors numpy
#   PYTHON=/tmp/hfvenv/bin/python tests/hf/run.sh build/examples/llama_eval
# Exit status: the check's own (0 agree, 1 disagree, 2 bad usage), or 77 (CTest: Skipped) when that interpreter
# cannot import torch and transformers.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

if [ $# -lt 1 ]; then
  echo "usage: $0 LLAMA_EVAL [check_transformers.py flags]" >&2
  exit 2
fi

if ! "$python" -c 'import torch, transformers' >/dev/null 2>&1; then
  echo "hf check skipped: '$python' cannot import torch and transformers (set PYTHON to an interpreter that can)"
  exit 77
fi

exec "$python" "$here/check_transformers.py" "$@"

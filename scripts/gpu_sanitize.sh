#!/usr/bin/env bash
# compute-sanitizer over the GPU suite (docs/fuzzing.md, "GPU sanitizers"). Needs a CUDA device.
#
#   bash scripts/gpu_sanitize.sh                    # memcheck, racecheck and synccheck over every case
#   bash scripts/gpu_sanitize.sh racecheck '*scan*' # one tool over the cases whose names match (doctest filter)
#
# Builds subspace_cuda_tests in the cuda preset, then runs it once per tool under compute-sanitizer; a report makes
# the tool exit 9 and the script exit non-zero after the last tool. The comm::nccl cases need two GPUs and are left
# out. racecheck is the slow one: the trainer-level cases take minutes each under it.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh >/dev/null || exit 1
command -v compute-sanitizer >/dev/null || { echo "gpu_sanitize: compute-sanitizer is not on PATH" >&2; exit 1; }
tools="${1:-memcheck racecheck synccheck}"
filter="${2:-*}"
cmake --preset cuda >/dev/null && cmake --build --preset cuda --target subspace_cuda_tests -j "$(nproc)" || exit 1
export NCCL_NVLS_ENABLE=0
status=0
for tool in $tools; do
  echo "== compute-sanitizer --tool $tool, cases '$filter'"
  compute-sanitizer --tool "$tool" --error-exitcode 9 build/cuda/tests/subspace_cuda_tests \
    --test-case="$filter" --test-case-exclude="*nccl*" || { echo "== $tool: FAILED"; status=1; }
done
exit $status

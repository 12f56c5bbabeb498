#!/usr/bin/env bash
# On a GPU machine: builds the cuda preset, runs the whole test suite (GPU suite included), the main job on
# CUDA, and every benchmark. Logs and JSON results go to OUTDIR (default bench/results); copy the JSON you
# keep into bench/results/ and commit it.
#
#   bash bench/run.sh [OUTDIR]            # SUBSPACE_COMMIT=<sha> names the measured commit when .git is absent
set -uo pipefail
cd "$(dirname "$0")/.."
out="$(mkdir -p "${1:-bench/results}" && cd "${1:-bench/results}" && pwd)"
SUBSPACE_PRESET=cuda source scripts/setup.sh || exit 1
commit="${SUBSPACE_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
jobs="$(nproc 2>/dev/null || echo 4)"
status=0

echo "== build (cuda preset, commit $commit)"
{ cmake --preset cuda >/dev/null && cmake --build --preset cuda -j "$jobs"; } >"$out/build.log" 2>&1 ||
  { tail -n 60 "$out/build.log"; exit 1; }

echo "== tests"
ctest --preset cuda -j 8 -LE gpu --output-on-failure >"$out/ctest.log" 2>&1 || status=1
# The GPU suite one test file at a time, each bounded, so a hang in one cannot hide the results of the others.
: >"$out/gpu_suite.log"
for src in tests/cuda/test_*.cu; do
  name="$(basename "$src")"
  NCCL_NVLS_ENABLE=0 timeout 300 build/cuda/tests/subspace_cuda_tests -sf="*$name" >>"$out/gpu_suite.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || { status=1; echo "GPU suite: $name exited $rc" | tee -a "$out/gpu_suite.log"; }
done
grep -E "test cases:" "$out/gpu_suite.log"; grep -E "tests passed|tests failed|Skipped|Failed" "$out/ctest.log" | tail -n 12

echo "== main job on CUDA"
build/cuda/examples/primitives_demo --device cuda >"$out/main_job.log" 2>&1 || status=1
tail -n 3 "$out/main_job.log"

echo "== benchmarks"
build/cuda/bench/bench_gemm --commit "$commit" --out "$out/gemm.json" 2>&1 | tee "$out/bench_gemm.log" | tail -n 12 ||
  status=1
build/cuda/bench/bench_attention --commit "$commit" --out "$out/attention.json" 2>&1 | tee "$out/bench_attention.log" |
  tail -n 12 || status=1
NCCL_NVLS_ENABLE=0 build/cuda/bench/bench_comm --commit "$commit" --out "$out/comm.json" 2>&1 | tee "$out/bench_comm.log" |
  tail -n 16 || status=1
exit $status

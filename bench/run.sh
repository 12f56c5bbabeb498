#!/usr/bin/env bash
# On a GPU machine: builds the cuda preset, runs the whole test suite (GPU suite included), the main job on
# CUDA, every benchmark, and the PyTorch reference of the Llama step. Logs and JSON results go to OUTDIR (default
# bench/results); copy the JSON you keep into bench/results/ and commit it.
#
#   bash bench/run.sh [OUTDIR]            # SUBSPACE_COMMIT=<sha> names the measured commit when .git is absent
#   SUBSPACE_BENCH_ONLY="llama_step torch" bash bench/run.sh      # only some phases (default: all, in this order)
#
# Phases: tests (ctest without the gpu label), gpu (the GPU suite: ctest -L gpu), main (the main job on
# CUDA), hf (tests/hf: our checkpoints against transformers), gemm, attention, comm, llama_step, gossip (the
# benchmarks; gossip: data-parallel all-reduce against each gossip topology, 8 ranks on the GPU, throttled 1 and
# 25 Gbit/s; pipeline: dense against Subspace Network boundaries — bytes, step times over modelled links, and the
# fidelity of bench/pipeline/fidelity.sh), torch (bench/llama_step/torch_reference.py, skipped when python3 cannot import torch), galore60m
# (bench/galore_60m: AdamW vs GaLore vs GoLore@20% on Llama-60M; SUBSPACE_GALORE_STEPS steps, default 1000).
# The build covers only the targets the chosen phases need (all of them when `tests` is chosen; none for `torch`
# alone).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="$(mkdir -p "${1:-bench/results}" && cd "${1:-bench/results}" && pwd)"
commit="${SUBSPACE_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
jobs="$(nproc 2>/dev/null || echo 4)"
status=0

all_phases="tests gpu main hf gemm attention comm llama_step gossip pipeline torch galore60m"
read -r -a chosen <<<"${SUBSPACE_BENCH_ONLY:-$all_phases}"
for p in "${chosen[@]}"; do
  [[ " $all_phases " == *" $p "* ]] ||
    { echo "SUBSPACE_BENCH_ONLY: unknown phase '$p' (phases: $all_phases)" >&2; exit 2; }
done
want() { [[ " ${chosen[*]} " == *" $1 "* ]]; }

# run_logged LOG SECONDS LINES COMMAND...: runs COMMAND bounded by SECONDS, its output teed to LOG in $out and its
# last LINES lines shown; a failure or a timeout sets status.
run_logged() {
  local log="$1" limit="$2" lines="$3" rc
  shift 3
  timeout "$limit" "$@" 2>&1 | tee "$out/$log" | tail -n "$lines"
  rc=$?
  [ $rc -eq 0 ] || { status=1; echo "${log%.log} exited $rc$([ $rc -eq 124 ] && echo ", timed out after ${limit} s")"; }
}

# The build: every target when the tests run, else the executables of the chosen phases.
targets=()
if ! want tests; then
  want gpu && targets+=(subspace_cuda_tests)
  { want main || want galore60m; } && targets+=(train_llama)
  want hf && targets+=(llama_eval)
  for b in gemm attention comm llama_step gossip pipeline; do want "$b" && targets+=("bench_$b"); done
  want pipeline && targets+=(pipeline_llama)
fi
if want tests || [ "${#targets[@]}" -gt 0 ]; then
  SUBSPACE_PRESET=cuda source scripts/setup.sh || exit 1
  echo "== build (cuda preset, commit $commit${targets[*]:+, targets ${targets[*]}})"
  build=(cmake --build --preset cuda -j "$jobs")
  [ "${#targets[@]}" -gt 0 ] && build+=(--target "${targets[@]}")
  { cmake --preset cuda >/dev/null && "${build[@]}"; } >"$out/build.log" 2>&1 ||
    { tail -n 60 "$out/build.log"; exit 1; }
fi

if want tests; then
  echo "== tests"
  ctest --preset cuda -j 8 -LE gpu --output-on-failure >"$out/ctest.log" 2>&1 || status=1
  grep -E "tests passed|tests failed|Skipped|Failed" "$out/ctest.log" | tail -n 12
fi

if want gpu; then
  echo "== GPU suite"
  # ctest -L gpu: one entry per test case, one at a time, each bounded by its TIMEOUT (tests/CMakeLists.txt), so
  # a hang in one cannot hide the results of the others; the whole suite is bounded too. On this machine a
  # Skipped case means no usable device, which counts as a failure.
  NCCL_NVLS_ENABLE=0 timeout 3600 ctest --preset cuda -L gpu --output-on-failure >"$out/gpu_suite.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || { status=1; echo "GPU suite: ctest exited $rc$([ $rc -eq 124 ] && echo ", timed out after 3600 s")"; }
  grep -E "tests passed|tests failed" "$out/gpu_suite.log"
  grep -E "\*\*\*(Failed|Timeout|Exception)" "$out/gpu_suite.log" | tail -n 20
  skipped="$(grep -c "\*\*\*Skipped" "$out/gpu_suite.log")"
  [ "$skipped" -eq 0 ] || { status=1; echo "GPU suite: $skipped cases Skipped (no CUDA device?)"; }
fi

# The default corpus needs a Debian package a GPU machine may lack: fall back to the Genesis text of the tests.
corpus=()
[ -e /usr/lib/bible.data ] || corpus=(--text tests/data/kjv_genesis.txt)

want main && { echo "== main job on CUDA (train_llama)"; run_logged main_job.log 600 8 \
  build/cuda/examples/train_llama --device cuda "${corpus[@]}" --metrics "$out/main_job.jsonl"; }
want hf && { echo "== Hugging Face transformers check"; run_logged hf_check.log 600 14 \
  bash tests/hf/run.sh build/cuda/examples/llama_eval; }

want gemm && { echo "== bench_gemm"; run_logged bench_gemm.log 900 12 \
  build/cuda/bench/bench_gemm --commit "$commit" --out "$out/gemm.json"; }
want attention && { echo "== bench_attention"; run_logged bench_attention.log 900 12 \
  build/cuda/bench/bench_attention --commit "$commit" --out "$out/attention.json"; }
want comm && { echo "== bench_comm"; run_logged bench_comm.log 900 16 \
  env NCCL_NVLS_ENABLE=0 build/cuda/bench/bench_comm --commit "$commit" --out "$out/comm.json"; }
want llama_step && { echo "== bench_llama_step"; run_logged bench_llama_step.log 900 12 \
  build/cuda/bench/bench_llama_step --commit "$commit" --out "$out/llama_step.json"; }
want gossip && { echo "== bench_gossip"; run_logged bench_gossip.log 900 20 \
  build/cuda/bench/bench_gossip --commit "$commit" --out "$out/gossip.json"; }
if want pipeline; then
  echo "== bench_pipeline: boundary bytes at the 2B width, step times over 80 Mbit/s .. 100 Gbit/s, fidelity"
  run_logged bench_pipeline_bytes.log 900 8 build/cuda/bench/bench_pipeline --configs 2b --layers 4 --seq 1024 \
    --bandwidths gbit100 --wires fp32,bf16 --bytes-only --commit "$commit" --out "$out/pipeline_bytes.json"
  run_logged bench_pipeline.log 1800 16 build/cuda/bench/bench_pipeline --commit "$commit" --out "$out/pipeline.json"
  run_logged pipeline_fidelity.log 1800 6 bash bench/pipeline/fidelity.sh build/cuda/examples/pipeline_llama \
    "$out/pipeline_fidelity.json" "$commit"
fi

if want torch; then
  if python3 -c 'import torch' 2>/dev/null; then
    echo "== PyTorch reference of the Llama step (eager and torch.compile)"
    run_logged llama_step_torch.log 1800 8 \
      python3 bench/llama_step/torch_reference.py --commit "$commit" --out "$out/llama_step_torch.json"
  else
    echo "== PyTorch reference: skipped (python3 cannot import torch)"
  fi
fi
want galore60m && { echo "== Llama-60M: AdamW vs GaLore vs GoLore@20%"; run_logged galore_60m.log 1200 6 \
  bash bench/galore_60m/run.sh build/cuda/examples/train_llama "$out/galore_60m.json" "$commit" \
  "${SUBSPACE_GALORE_STEPS:-1000}"; }
exit $status

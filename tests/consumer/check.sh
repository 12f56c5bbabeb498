#!/usr/bin/env bash
# Builds and runs tests/consumer twice: through FetchContent (SOURCE_DIR = this checkout) and through
# find_package after `cmake --install`. With a CUDA preset the consumer also enables CUDA.
#   bash tests/consumer/check.sh <preset>
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
preset="${1:-cpu}"
work="$root/build/consumer-$preset"
rm -rf "$work"
cuda=OFF
[ "$preset" != "cpu" ] && command -v nvcc >/dev/null && cuda=ON

# consume HOW [CMAKE_ARGS...]: configures the consumer with SUBSPACE_CONSUME=HOW, builds it and runs its programs.
consume() {
  local how="$1"
  shift
  cmake -S "$root/tests/consumer" -B "$work/$how" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DSUBSPACE_CONSUME="$how" -DCONSUMER_CUDA=$cuda "$@" >/dev/null
  cmake --build "$work/$how"
  "$work/$how/consumer_host"
  if [ "$cuda" = ON ]; then "$work/$how/consumer_cuda"; fi
}

echo "-- consumer via FetchContent (CUDA $cuda)"
consume fetch -DSUBSPACE_SOURCE_DIR="$root"

echo "-- consumer via find_package after cmake --install (CUDA $cuda)"
cmake -S "$root" -B "$work/lib" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSUBSPACE_CUDA=OFF \
  -DSUBSPACE_BUILD_TESTS=OFF -DSUBSPACE_BUILD_EXAMPLES=OFF -DSUBSPACE_BUILD_BENCH=OFF >/dev/null
cmake --install "$work/lib" --prefix "$work/prefix" >/dev/null
consume find -DCMAKE_PREFIX_PATH="$work/prefix"
echo "-- consumer projects: both built and ran"

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

echo "-- consumer via FetchContent (CUDA $cuda)"
cmake -S "$root/tests/consumer" -B "$work/fetch" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DSUBSPACE_CONSUME=fetch -DSUBSPACE_SOURCE_DIR="$root" -DCONSUMER_CUDA=$cuda >/dev/null
cmake --build "$work/fetch"
"$work/fetch/consumer_host"
if [ "$cuda" = ON ]; then "$work/fetch/consumer_cuda"; fi

echo "-- consumer via find_package after cmake --install (CUDA $cuda)"
cmake -S "$root" -B "$work/lib" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSUBSPACE_CUDA=OFF \
  -DSUBSPACE_BUILD_TESTS=OFF -DSUBSPACE_BUILD_EXAMPLES=OFF -DSUBSPACE_BUILD_BENCH=OFF >/dev/null
cmake --install "$work/lib" --prefix "$work/prefix" >/dev/null
cmake -S "$root/tests/consumer" -B "$work/find" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DSUBSPACE_CONSUME=find -DCMAKE_PREFIX_PATH="$work/prefix" -DCONSUMER_CUDA=$cuda >/dev/null
cmake --build "$work/find"
"$work/find/consumer_host"
if [ "$cuda" = ON ]; then "$work/find/consumer_cuda"; fi
echo "-- consumer projects: both built and ran"

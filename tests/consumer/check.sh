#!/usr/bin/env bash
# Builds and runs tests/consumer: through FetchContent (SOURCE_DIR = this checkout) and through find_package after
# `cmake --install`, linking subspace::subspace; then a C++-only consumer of subspace::core configured with
# /usr/bin/cmake when there is one (Debian 12: CMake 3.25). With a CUDA preset the first two also enable CUDA,
# and two consumers of the split targets are configured (not built): subspace::cuda alone must not search for
# NCCL, subspace::nccl must link it. A FetchContent consumer configured without CMAKE_BUILD_TYPE must be warned of
# the unoptimised build, with its cache left as it is. `cmake` on PATH must be >= 3.28 (scripts/setup.sh).
#   bash tests/consumer/check.sh <preset>
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
preset="${1:-cpu}"
work="$root/build/consumer-$preset"
rm -rf "$work"
cuda=OFF
[ "$preset" != "cpu" ] && command -v nvcc >/dev/null && cuda=ON
system_cmake=cmake
[ -x /usr/bin/cmake ] && system_cmake=/usr/bin/cmake

# configure DIR CMAKE [ARGS...]: configures the consumer project into $work/DIR with the given cmake.
configure() {
  local dir="$1" cmake_bin="$2"
  shift 2
  "$cmake_bin" -S "$root/tests/consumer" -B "$work/$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
}

# consume DIR CMAKE [ARGS...]: configures, builds and runs the consumer's programs.
consume() {
  local dir="$1" cmake_bin="$2"
  configure "$@"
  "$cmake_bin" --build "$work/$dir"
  "$work/$dir/consumer_host"
  if [ -x "$work/$dir/consumer_cuda" ]; then "$work/$dir/consumer_cuda"; fi
}

echo "-- consumer via FetchContent, subspace::subspace (CUDA $cuda)"
consume fetch cmake -DSUBSPACE_CONSUME=fetch -DSUBSPACE_SOURCE_DIR="$root" -DCONSUMER_CUDA=$cuda

echo "-- consumer via FetchContent without CMAKE_BUILD_TYPE: configured, warned, its cache left alone"
for build_type in "" Release; do
  log="$work/build-type-${build_type:-none}.log"
  cmake -S "$root/tests/consumer" -B "$work/build-type-${build_type:-none}" -G Ninja -DCMAKE_BUILD_TYPE="$build_type" \
    -DSUBSPACE_CONSUME=fetch -DSUBSPACE_SOURCE_DIR="$root" -DCONSUMER_TARGETS=split >"$log" 2>&1
  warned=no
  grep -q "subspace: CMAKE_BUILD_TYPE is not set" "$log" && warned=yes
  if [ "$warned" != "$([ -z "$build_type" ] && echo yes || echo no)" ]; then
    cat "$log"
    echo "consumer: CMAKE_BUILD_TYPE '$build_type': warned $warned about an unoptimised build" >&2
    exit 1
  fi
  if ! grep -qx "CMAKE_BUILD_TYPE:STRING=$build_type" "$work/build-type-${build_type:-none}/CMakeCache.txt"; then
    echo "consumer: subspace changed the consumer's CMAKE_BUILD_TYPE '$build_type'" >&2
    exit 1
  fi
done

echo "-- consumer via find_package after cmake --install, subspace::subspace (CUDA $cuda)"
cmake -S "$root" -B "$work/lib" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSUBSPACE_CUDA=OFF \
  -DSUBSPACE_BUILD_TESTS=OFF -DSUBSPACE_BUILD_EXAMPLES=OFF -DSUBSPACE_BUILD_BENCH=OFF >/dev/null
cmake --install "$work/lib" --prefix "$work/prefix" >/dev/null
consume find cmake -DSUBSPACE_CONSUME=find -DCMAKE_PREFIX_PATH="$work/prefix" -DCONSUMER_CUDA=$cuda

echo "-- C++-only consumer of subspace::core, $("$system_cmake" --version | head -n1): find_package, then FetchContent"
consume core-find "$system_cmake" -DSUBSPACE_CONSUME=find -DCMAKE_PREFIX_PATH="$work/prefix" -DCONSUMER_TARGETS=split
consume core-fetch "$system_cmake" -DSUBSPACE_CONSUME=fetch -DSUBSPACE_SOURCE_DIR="$root" -DCONSUMER_TARGETS=split

if [ "$cuda" = ON ]; then
  echo "-- subspace::cuda without NCCL (FetchContent), subspace::nccl (find_package): configured"
  configure cuda-fetch cmake -DSUBSPACE_CONSUME=fetch -DSUBSPACE_SOURCE_DIR="$root" -DCONSUMER_TARGETS=split \
    -DCONSUMER_CUDA=ON
  if grep -q "^NCCL_" "$work/cuda-fetch/CMakeCache.txt"; then
    echo "consumer: NCCL was searched for although no target links subspace::nccl" >&2
    exit 1
  fi
  configure cuda-find cmake -DSUBSPACE_CONSUME=find -DCMAKE_PREFIX_PATH="$work/prefix" -DCONSUMER_TARGETS=split \
    -DCONSUMER_CUDA=ON -DCONSUMER_NCCL=ON
  if ! grep -A6 "^build consumer_nccl:" "$work/cuda-find/build.ninja" | grep -q "libnccl"; then
    echo "consumer: consumer_nccl does not link NCCL" >&2
    exit 1
  fi
fi
echo "-- consumer projects: all built and ran"

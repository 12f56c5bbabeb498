#!/usr/bin/env bash
# Installs what building and testing subspace needs, when it is missing, and puts the tools on PATH.
# Sourced by scripts/test.sh and scripts/main.sh; safe to run again (it only installs what is missing).
#
#   Debian packages: libboost-dev (Boost.Hana headers), doctest-dev, ninja-build (python3-venv too when CMake
#                    must be installed). Also wanted, not required: bible-kjv and bible-kjv-text, the
#                    public-domain default corpus of the example trainer (a machine that cannot install them —
#                    no registry — still builds and tests; the trainer then needs --data). As root they are installed; otherwise the exact
#                    apt-get line is printed and the script fails.
#   CMake >= 3.28:   Debian 12's 3.25 cannot build CUDA C++20 with nvcc 13, so a newer CMake is installed from
#                    PyPI into .tools/ (git-ignored) when the one on PATH is older.
#   CUDA:            /usr/local/cuda/bin joins PATH when nvcc is there but not on PATH. CUDA is optional.

_subspace_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_subspace_setup() {
  local missing=() pkg
  local want=(libboost-dev doctest-dev ninja-build)
  for pkg in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  # Packages may be present without dpkg knowing (a machine with its own image): trust the compiler.
  _has_header() { echo "#include <$1>" | ${CXX:-c++} -std=c++20 -E -x c++ - >/dev/null 2>&1; }
  if [[ " ${missing[*]} " == *" libboost-dev "* ]] && _has_header boost/hana.hpp; then
    missing=("${missing[@]/libboost-dev}")
  fi
  if [[ " ${missing[*]} " == *" doctest-dev "* ]] && _has_header doctest/doctest.h; then
    missing=("${missing[@]/doctest-dev}")
  fi
  if [[ " ${missing[*]} " == *" ninja-build "* ]] && command -v ninja >/dev/null; then
    missing=("${missing[@]/ninja-build}")
  fi
  read -r -a missing <<<"${missing[*]}"
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      echo "setup: installing Debian packages: ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        { echo "setup: apt-get install ${missing[*]} failed" >&2; return 1; }
    else
      echo "setup: missing Debian packages. Install them with:" >&2
      echo "  sudo apt-get install -y ${missing[*]}" >&2
      return 1
    fi
  fi

  local optional=()
  for pkg in bible-kjv bible-kjv-text; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || optional+=("$pkg")
  done
  if [ "${#optional[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null &&
      { apt-get install -y -qq --no-install-recommends "${optional[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 &&
          apt-get install -y -qq --no-install-recommends "${optional[@]}" >/dev/null 2>&1; }; }; then
      echo "setup: installed the default corpus packages: ${optional[*]}"
    else
      echo "setup: note: could not install ${optional[*]} (the default training corpus);" \
        "train_llama then needs --data. Install with: sudo apt-get install -y ${optional[*]}" >&2
    fi
  fi

  if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH"
  fi

  # CMake >= 3.28: the one on PATH, or one from PyPI in .tools/.
  if [ -x "$_subspace_root/.tools/bin/cmake" ]; then
    export PATH="$_subspace_root/.tools/bin:$PATH"
  fi
  local version
  version="$(cmake --version 2>/dev/null | head -n1 | sed -E 's/[^0-9]*([0-9]+\.[0-9]+).*/\1/')"
  if [ -z "$version" ] || [ "$(printf '%s\n3.28\n' "$version" | sort -V | head -n1)" != "3.28" ]; then
    echo "setup: CMake ${version:-none} is older than 3.28; installing CMake from PyPI into .tools/"
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
      if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
      else
        echo "setup: python3-venv is needed to install CMake: sudo apt-get install -y python3-venv" >&2
        return 1
      fi
    fi
    python3 -m venv "$_subspace_root/.tools" &&
      "$_subspace_root/.tools/bin/pip" install -q --disable-pip-version-check "cmake>=3.28,<5" ||
      { echo "setup: could not install CMake >= 3.28 (pip install 'cmake>=3.28' into .tools/ failed)" >&2; return 1; }
    export PATH="$_subspace_root/.tools/bin:$PATH"
  fi
  echo "setup: $(cmake --version | head -n1); nvcc: $(command -v nvcc >/dev/null && nvcc --version | tail -n1 || echo 'not found (host build only)')"
}

_subspace_setup || { [ "${BASH_SOURCE[0]}" = "$0" ] && exit 1 || return 1; }

# Clang >= 17 as .tools/bin/clang++, for the sanitize preset (the host suite and the fuzz targets under ASan +
# UBSan; libFuzzer). Called by scripts/test.sh only when it runs that preset. Clang 17 is the first with C++20
# aggregate deduction, which subspace::stack{.optimizer = ...} needs. Debian 12 ships clang-19: as root it is
# installed; otherwise the apt-get line is printed.
subspace_setup_clang() {
  local candidate path found="" major
  for candidate in clang++-{30..17} clang++; do
    path="$(command -v "$candidate")" || continue
    [[ "$path" == "$_subspace_root/.tools/"* ]] && continue  # our own link from an earlier run
    major="$("$path" -dumpversion 2>/dev/null | cut -d. -f1)"
    if [ -n "$major" ] && [ "$major" -ge 17 ]; then
      found="$path"
      break
    fi
  done
  if [ -z "$found" ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      echo "setup: installing clang-19 (Debian packages clang-19, libclang-rt-19-dev) for the sanitize preset"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang-19 libclang-rt-19-dev \
        >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
          --no-install-recommends clang-19 libclang-rt-19-dev >/dev/null; } ||
        { echo "setup: apt-get install clang-19 libclang-rt-19-dev failed" >&2; return 1; }
      found="$(command -v clang++-19)"
    else
      echo "setup: the sanitize preset needs clang >= 17. Install it with:" >&2
      echo "  sudo apt-get install -y clang-19 libclang-rt-19-dev" >&2
      return 1
    fi
  fi
  mkdir -p "$_subspace_root/.tools/bin"
  ln -sf "$found" "$_subspace_root/.tools/bin/clang++"
  case ":$PATH:" in *":$_subspace_root/.tools/bin:"*) ;; *) export PATH="$_subspace_root/.tools/bin:$PATH" ;; esac
  echo "setup: sanitize preset compiler: $(clang++ --version | head -n1)"
}

# Presets: cuda when nvcc is there (CI: warnings as errors), else cpu.
if command -v nvcc >/dev/null; then
  SUBSPACE_PRESET="${SUBSPACE_PRESET:-$([ "${CI:-}" = "true" ] && echo ci || echo cuda)}"
else
  SUBSPACE_PRESET="${SUBSPACE_PRESET:-cpu}"
fi
export SUBSPACE_PRESET

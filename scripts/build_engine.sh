#!/usr/bin/env bash
# Builds the C++ engine (pybind11 module `chat`) into python_demo/build/, and for the
# simulator (cmodel) also libcmodel_yield.so, the preload mllama_tpu/cmodel_yield.py applies.
# Idempotent: when the module is newer than its sources it only says so and exits (well
# under a second); otherwise cmake + make. Called by scripts/setup_env.sh.
#   scripts/build_engine.sh [--force] [extra cmake args, e.g. -DTARGET_ARCH=soc]
# PYTHON selects the interpreter the module is built for (default: the project's .venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/python_demo"
BUILD="${MLLAMA_ENGINE_DIR:-$SRC/build}"  # where mllama_tpu/engines/bmodel.py loads the module from
PY="${PYTHON:-$ROOT/.venv/bin/python}"

say() { echo "[build_engine] $*" >&2; }

force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi

if [ ! -x "$PY" ]; then
    echo "error: no Python at $PY; run scripts/setup_env.sh first (or set PYTHON=...)" >&2
    exit 2
fi
if ! command -v cmake >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
    echo "error: cmake and a C++17 compiler are needed to build the engine (apt-get install cmake g++)" >&2
    exit 2
fi

# Up to date: a module exists and nothing it is built from is newer, nor the interpreter changed.
module="$(ls "$BUILD"/chat*.so 2>/dev/null | head -n1 || true)"
if [ "$force" = 0 ] && [ -n "$module" ] && [ $# -eq 0 ] && [ "$(cat "$BUILD/.python" 2>/dev/null)" = "$PY" ]; then
    newer="$(find "$SRC/chat.cpp" "$SRC/cmodel_yield.c" "$SRC/CMakeLists.txt" "$SRC/include" -newer "$module" -print -quit)"
    # A simulator build is only whole with its preload next to the module.
    is_cmodel="$(grep -c "^TARGET_ARCH:STRING=cmodel$" "$BUILD/CMakeCache.txt" 2>/dev/null || true)"
    if [ -z "$newer" ] && { [ "$is_cmodel" != 1 ] || [ -f "$BUILD/libcmodel_yield.so" ]; }; then
        say "up to date: ${module#$ROOT/}"
        exit 0
    fi
fi

# A stale cache made for another interpreter would keep pointing at it.
if [ -f "$BUILD/CMakeCache.txt" ] && [ "$(cat "$BUILD/.python" 2>/dev/null)" != "$PY" ]; then
    rm -rf "$BUILD"
fi
mkdir -p "$BUILD"
LOG="$BUILD/build.log"
say "building the chat module for $PY"
cmake -S "$SRC" -B "$BUILD" -DPython_EXECUTABLE="$PY" "$@" >"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
cmake --build "$BUILD" -j "$(nproc 2>/dev/null || echo 2)" >>"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
echo "$PY" > "$BUILD/.python"
module="$(ls "$BUILD"/chat*.so | head -n1)"
touch "$module"  # make's output may predate an edited header it did not depend on
say "built ${module#$ROOT/} (log: ${LOG#$ROOT/})"

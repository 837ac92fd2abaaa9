#!/usr/bin/env bash
# Runs a command (default: the engine and chat tests on the simulator) against the C++ engine
# built with AddressSanitizer + UBSan, and says whether our own code was reported.
#   scripts/run_sanitized.sh [command ...]      e.g. scripts/run_sanitized.sh .venv/bin/python my_probe.py
# The sanitized module is built into python_demo/build-sanitize/ (the normal build is untouched)
# and chosen through MLLAMA_ENGINE_DIR. Reports go to build/sanitize/{asan,ubsan}.PID; the
# vendor's libraries are suppressed only where scripts/sanitizer.supp says why. Exit status: the
# command's, or 3 when a report names python_demo/chat.cpp.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
SAN_BUILD="$ROOT/python_demo/build-sanitize"
OUT="$ROOT/build/sanitize"

# Not stripped (RelWithDebInfo), so reports name our source lines.
MLLAMA_ENGINE_DIR="$SAN_BUILD" "$ROOT/scripts/build_engine.sh" -DMLLAMA_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
libasan="$(gcc -print-file-name=libasan.so)"
libubsan="$(gcc -print-file-name=libubsan.so)"
for lib in "$libasan" "$libubsan"; do
    [ -f "$lib" ] || { echo "error: $lib not found: install gcc's sanitizer runtimes (apt-get install gcc)" >&2; exit 2; }
done
tpu_lib="$("$PY" -c 'import os, tpu_mlir; print(os.path.join(os.path.dirname(tpu_mlir.__file__), "lib"))')"
rm -rf "$OUT" && mkdir -p "$OUT"
[ $# -gt 0 ] || set -- "$PY" -m pytest -q -p no:cacheprovider tests/test_engine_bmodel.py tests/test_contract.py \
    -k "not other_modes and not int4 and not simulator_debug"

# libasan must come first; the yield preload (python_demo/build) keeps the simulator usable.
# LD_LIBRARY_PATH: with ASan's dlopen interceptor in between, bmlib's own RUNPATH no longer finds
# libcmodel.so. Leaks are reported but, from the interpreter and the vendor, not counted (below).
status=0
env LD_PRELOAD="$libasan:$libubsan:$ROOT/python_demo/build/libcmodel_yield.so" \
    LD_LIBRARY_PATH="$tpu_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    MLLAMA_ENGINE_DIR="$SAN_BUILD" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
    ASAN_OPTIONS="suppressions=$ROOT/scripts/sanitizer.supp:detect_leaks=1:exitcode=0:log_path=$OUT/asan" \
    LSAN_OPTIONS="exitcode=0" \
    UBSAN_OPTIONS="print_stacktrace=1:log_path=$OUT/ubsan" \
    "$@" || status=$?

exec "$PY" "$ROOT/scripts/sanitizer_report.py" "$OUT" "$status"

#!/usr/bin/env bash
# Creates (or refreshes) the project's Python 3.10 virtualenv in .venv and builds what the
# chain needs on top of it. Sourced by run_tests.sh and run_demo.sh; safe to re-run: a step
# whose inputs did not change is skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.requirements.sha256"

say() { echo "[setup] $*" >&2; }

# tpu-mlir 1.30.2 ships for CPython 3.10 only. The pyenv shim named python3.10 exists but
# fails unless 3.10 is selected, so each candidate is run once before it is trusted.
find_python310() {
    local cand
    for cand in python3.10 "$(command -v pyenv >/dev/null 2>&1 && echo "$(pyenv root)/versions/"3.10*/bin/python)"; do
        for c in $cand; do
            [ -n "$c" ] || continue
            if "$c" -c 'import sys, venv; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
                command -v "$c" 2>/dev/null || echo "$c"
                return 0
            fi
        done
    done
    return 1
}

want_hash="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want_hash" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        if ! PY310="$(find_python310)"; then
            echo "error: Python 3.10 is required (tpu-mlir supports no other); install it, e.g. 'pyenv install 3.10.13' or 'apt-get install python3.10-venv', then re-run." >&2
            exit 2
        fi
        say "creating .venv with $PY310"
        "$PY310" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
    else
        say "requirements.txt changed: refreshing .venv"
    fi
    # Large wheels (tpu-mlir ~300 MB, CUDA torch several GB): a few minutes on a cold cache.
    "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
    "$VENV/bin/python" -m pip install -q --no-deps --ignore-requires-python -r "$ROOT/requirements-nodeps.txt"
    echo "$want_hash" > "$STAMP"
fi

# The wheel bundles Ubuntu 22.04's libc.so.6, libm.so.6 and libpthread.so.0 in
# tpu_mlir/lib/third_party, which its tools put on the library path. On a host with a newer
# glibc (Debian 12: 2.36) they shadow the system's, and the first system library that needs
# the newer symbols fails ("GLIBC_2.36 not found"). The core C libraries must come from the
# host anyway, so they are moved aside (kept, not deleted, to show what was there).
TP="$("$VENV/bin/python" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("tpu_mlir")
print(os.path.join(os.path.dirname(spec.origin), "lib", "third_party"))
PY
)"
for lib in libc.so.6 libm.so.6 libpthread.so.0; do
    if [ -e "$TP/$lib" ]; then
        mkdir -p "$TP.shadowed"
        mv "$TP/$lib" "$TP.shadowed/$lib"
        say "moved bundled $lib aside (it shadows the host glibc)"
    fi
done

# The C++ engine (pybind11 module `chat`), rebuilt when its sources are newer than it.
if [ -f "$ROOT/python_demo/CMakeLists.txt" ] && [ "${MLLAMA_SKIP_ENGINE_BUILD:-0}" != 1 ]; then
    "$ROOT/scripts/build_engine.sh"
fi

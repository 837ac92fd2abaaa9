#!/usr/bin/env bash
# Sets up what is missing (venv, TPU-MLIR glibc fix, C++ engine, Chromium), then runs every test,
# slow ones (TPU-MLIR compiles, simulator runs) included, on two workers (one per core; a test
# file stays on one worker, longest files first: tests/conftest.py). Extra arguments go to
# pytest, e.g. ./run_tests.sh -m "not slow", ./run_tests.sh tests/test_setup.py, or -n 0 for one
# process (pdb, -s).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup_env.sh"
# Debian's Chromium + WebDriver for the chat page's browser test (installed once, when missing).
"$ROOT/scripts/setup_browser.sh"
# Through cmodel_yield: the simulator's threads yield instead of starving each other (see
# python_demo/cmodel_yield.c); MLLAMA_CMODEL_YIELD=0 runs without it.
exec "$ROOT/.venv/bin/python" -m mllama_tpu.cmodel_yield -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"

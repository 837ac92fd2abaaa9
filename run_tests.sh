#!/usr/bin/env bash
# Sets up what is missing (venv, TPU-MLIR glibc fix, C++ engine), then runs every test,
# slow ones (TPU-MLIR compiles, simulator runs) included. Extra arguments go to pytest,
# e.g. ./run_tests.sh -m "not slow" or ./run_tests.sh tests/test_setup.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# Compile exported ONNX pieces (manifest.json + pieces/) into one bmodel with TPU-MLIR.
#   ./compile/compile.sh --mode int4|int8|bf16|f16|f32 --name NAME --seq_length N
#                        [--onnx_dir tmp/onnx] [--out .] [--jobs N] [--group_size 64] [--lm_head w8|float] [--chip bm1684x]
#                        [--tpu_mlir_path DIR]
# Resumable: run it again after an interruption and only unfinished pieces are compiled.
# The logic lives in mllama_tpu/compile (python -m mllama_tpu.compile.cli --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m mllama_tpu.compile.cli "$@"

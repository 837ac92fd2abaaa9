#!/usr/bin/env bash
# Checkpoint -> ONNX export -> bmodel in one command.
#   ./compile/run_compile.sh --model_name llama3.2-11b --seq_length 512 [--model_path DIR] [--mode int4]
#                            [--tpu_mlir_path DIR] [--out .] [--onnx_dir tmp/onnx] [--jobs N] [--lm_head w8|float]
# Without --model_path the checkpoint is downloaded with modelscope; with --tpu_mlir_path a TPU-MLIR
# source build (its envsetup.sh) is used instead of the installed tpu-mlir.
# The logic lives in mllama_tpu/compile/run.py (python -m mllama_tpu.compile.run --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m mllama_tpu.compile.run "$@"

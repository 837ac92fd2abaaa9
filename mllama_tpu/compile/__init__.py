"""Compile stage: export dir (manifest + ONNX pieces) -> one BM1684X bmodel with TPU-MLIR.

Entry points: `compile_model(...)` (library), `python -m mllama_tpu.compile.cli` (compile/compile.sh),
`python -m mllama_tpu.compile.run` (compile/run_compile.sh: export + compile in one command).
"""
from mllama_tpu.compile.driver import bmodel_name, compile_model
from mllama_tpu.compile.policy import MODES

__all__ = ["compile_model", "bmodel_name", "MODES"]

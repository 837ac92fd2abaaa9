"""Backends behind one interface (base.Engine): `onnx` (reference, CPU) and `bmodel` (BM1684X).

`open_engine` is the one place that maps a backend name and a model path to an engine, so the
CLI and the tests (parametrized by backend) build engines the same way.
"""
from __future__ import annotations

from pathlib import Path

from mllama_tpu.engines.base import Engine
from mllama_tpu.errors import UserError
from mllama_tpu.sampling import GENERATION_MODES, SamplingParams

BACKENDS = ("bmodel", "onnx")


def open_engine(backend: str, model: str | Path, devid: int = 0) -> Engine:
    """Load `model` with `backend`; user mistakes (missing files, bad device) become UserError."""
    path = Path(model)
    if backend == "onnx":
        from mllama_tpu.engines.onnx import OnnxEngine

        if path.is_file():
            raise UserError(f"{path} is a file; --backend onnx takes an export dir (for a .bmodel use --backend bmodel)")

        return OnnxEngine(path)
    if backend == "bmodel":
        if path.is_dir():
            raise UserError(
                f"{path} is a directory; --backend bmodel takes a NAME.bmodel file (for an export dir use --backend onnx)"
            )
        if not path.is_file():
            raise UserError(f"bmodel {path} not found: pass the compiled NAME.bmodel with -m")
        try:
            from mllama_tpu.engines.bmodel import BmodelEngine
        except ImportError as e:
            raise UserError(
                f"the bmodel backend is not available ({e}); build it with scripts/build_engine.sh "
                "or use --backend onnx with an export dir"
            ) from None
        try:
            return BmodelEngine(str(path), devid)
        except UserError:
            raise
        except (RuntimeError, ValueError, OSError) as e:
            # The C++ engine reports a missing device / unreadable bmodel as an exception.
            raise UserError(f"cannot load {path} on device {devid}: {e}") from None
    raise UserError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "GENERATION_MODES", "Engine", "SamplingParams", "open_engine"]

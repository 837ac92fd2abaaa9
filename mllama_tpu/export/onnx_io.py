"""Writing one piece to ONNX safely, and describing what was written.

- A piece is exported into a private temp dir, then renamed into place: a half-written file
  never carries the final name.
- Pieces over protobuf's 2 GB limit are written by torch with one external file per
  tensor; we gather those into a single `<net>.onnx.data` next to `<net>.onnx` (streamed,
  no tensor is loaded) so a piece is at most two files. Both are checksummed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto

from mllama_tpu.export.pieces import Piece

OPSET = 15  # TPU-MLIR 1.30 reads opset 15-17; the original project exported at 15


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _gather_external_data(onnx_path: Path, data_name: str) -> None:
    """Rewrite torch's one-file-per-tensor external data into one file `data_name`."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    folder = onnx_path.parent
    offset = 0
    used: set[Path] = set()
    with open(folder / data_name, "wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            src = folder / info["location"]
            start, length = int(info.get("offset", 0)), info.get("length")
            size = int(length) if length is not None else src.stat().st_size - start
            pad = (-offset) % 4096  # page-align each tensor: mmap-friendly for readers
            out.write(b"\0" * pad)
            offset += pad
            with open(src, "rb") as f:
                f.seek(start)
                _copy_exact(f, out, size)
            del tensor.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(size))):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, v
            offset += size
            used.add(src)
    onnx.save(model, str(onnx_path))
    for src in used:
        src.unlink()


def _copy_exact(src: Any, dst: Any, size: int) -> None:
    while size > 0:
        chunk = src.read(min(size, 1 << 24))
        if not chunk:
            raise IOError("external tensor file shorter than recorded")
        dst.write(chunk)
        size -= len(chunk)


def export_piece(piece: Piece, pieces_dir: Path, device: str = "cpu") -> None:
    """Export `piece` to pieces_dir/<name>.onnx (+ .onnx.data when large), atomically."""
    tmp = pieces_dir / f".tmp-{piece.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx_name, data_name = f"{piece.name}.onnx", f"{piece.name}.onnx.data"
    module = piece.module.to(device).eval()
    args = tuple(x.to(device) for x in piece.inputs.values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about constant shapes are what we want
        torch.onnx.export(module, args, str(tmp / onnx_name), input_names=list(piece.inputs),
                          output_names=piece.outputs, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    piece.module = None  # type: ignore[assignment]  # free the weights before the file shuffle
    del module
    if any(p.name != onnx_name for p in tmp.iterdir()):
        _gather_external_data(tmp / onnx_name, data_name)
    final_onnx, final_data = pieces_dir / onnx_name, pieces_dir / data_name
    final_onnx.unlink(missing_ok=True)  # the .onnx goes last: present means complete
    final_data.unlink(missing_ok=True)
    if (tmp / data_name).exists():
        os.replace(tmp / data_name, final_data)
    os.replace(tmp / onnx_name, final_onnx)
    shutil.rmtree(tmp, ignore_errors=True)


def _value_info(v: onnx.ValueInfoProto) -> dict[str, Any]:
    t = v.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    return {"name": v.name, "shape": [dim.dim_value for dim in t.shape.dim], "dtype": dtype}


def describe(onnx_path: Path) -> dict[str, Any]:
    """Inputs/outputs of an ONNX file (names, static shapes, dtypes), read from the file itself."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return {"inputs": [_value_info(v) for v in model.graph.input if v.name not in inits],
            "outputs": [_value_info(v) for v in model.graph.output]}

"""Writing one piece to ONNX with about one piece of memory, atomically.

torch's exporter keeps copies of every weight while it builds and serialises the proto
(measured: ~3.4x the piece on top of the module). So the weights never go through it:
  1. each Parameter of the piece is turned into an extra graph input for the trace, so
     the traced graph is small (no initializers) and the forward runs on the real tensors;
  2. the weights are then streamed to disk as initializers straight from the tensors'
     buffers: appended to the .onnx as protobuf fields (a message written twice merges,
     repeated fields append), or, when the piece is over protobuf's 2 GB limit, into one
     `<net>.onnx.data` external-data file (page-aligned) referenced from the .onnx.
Everything is written in a private temp dir, then renamed into place (the .onnx last), so
a half-written file never carries the final name.
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
from onnx import GraphProto, ModelProto, TensorProto
from torch import nn

from mllama_tpu.export.pieces import Piece

OPSET = 15  # TPU-MLIR 1.30 reads opset 15-17; the original project exported at 15
SINGLE_FILE_LIMIT = 1800 << 20  # above this the weights go to <net>.onnx.data (protobuf caps a file at 2 GB)
_ALIGN = 4096

_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_INITIALIZER = GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_GRAPH = ModelProto.DESCRIPTOR.fields_by_name["graph"].number


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class _HashingWriter:
    """File writer that hashes what it writes, so a piece is never read back to checksum it."""

    def __init__(self, path: Path) -> None:
        self.f, self.sha, self.size = open(path, "wb"), hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data) if isinstance(data, bytes) else data.nbytes

    def tell(self) -> int:
        return self.size

    def close(self) -> dict[str, Any]:
        self.f.close()
        return {"sha256": self.sha.hexdigest(), "size": self.size}


class _WeightsAsInputs(nn.Module):
    """Wraps a piece so that its parameters are traced as inputs (see module doc)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []
        self._owners: list[tuple[nn.Module, str]] = []
        for name, param in list(inner.named_parameters()):
            path, _, attr = name.rpartition(".")
            owner = inner.get_submodule(path) if path else inner
            del owner._parameters[attr]
            self.names.append(name)
            self.tensors.append(param.detach())  # plain tensor: setattr must not re-register it
            self._owners.append((owner, attr))

    def forward(self, *args: torch.Tensor):
        n = len(args) - len(self.names)
        for (owner, attr), value in zip(self._owners, args[n:]):
            setattr(owner, attr, value)
        return self.inner(*args[:n])


def export_piece(piece: Piece, pieces_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """Export `piece` to pieces_dir/<name>.onnx (+ <name>.onnx.data when large).

    Returns {"sha256", "size", ["external_data": {"sha256", "size"}], "inputs", "outputs"}:
    checksums computed while writing, I/O (names, static shapes, dtypes) read from the graph.
    """
    tmp = pieces_dir / f".tmp-{piece.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx_name, data_name = f"{piece.name}.onnx", f"{piece.name}.onnx.data"
    wrapped = _WeightsAsInputs(piece.module.to(device).eval())
    piece.module = None  # type: ignore[assignment]  # `wrapped` holds the only reference now
    args = tuple(x.to(device) for x in piece.inputs.values()) + tuple(wrapped.tensors)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about constant shapes are what we want
        torch.onnx.export(wrapped, args, str(tmp / onnx_name), input_names=list(piece.inputs) + wrapped.names,
                          output_names=piece.outputs, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    weights = dict(zip(wrapped.names, (t.cpu() for t in wrapped.tensors)))
    del wrapped, args
    info = _attach_weights(tmp / onnx_name, weights, data_name)
    del weights
    final_onnx, final_data = pieces_dir / onnx_name, pieces_dir / data_name
    final_onnx.unlink(missing_ok=True)  # the .onnx goes last: present means complete
    final_data.unlink(missing_ok=True)
    if (tmp / data_name).exists():
        os.replace(tmp / data_name, final_data)
    os.replace(tmp / onnx_name, final_onnx)
    shutil.rmtree(tmp, ignore_errors=True)
    return info


def _attach_weights(onnx_path: Path, weights: dict[str, torch.Tensor], data_name: str) -> dict[str, Any]:
    """Turn the traced weight inputs back into initializers, streaming their bytes."""
    model = onnx.load(str(onnx_path))
    used = [i.name for i in model.graph.input if i.name in weights]
    real_inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    io = _describe(model)
    total = sum(weights[n].numel() * weights[n].element_size() for n in used)
    if total > SINGLE_FILE_LIMIT:
        data = _HashingWriter(onnx_path.parent / data_name)
        for name in used:
            offset = data.tell()
            n = _write_tensor_bytes(data, weights[name])
            t = model.graph.initializer.add()
            _tensor_header(t, name, weights[name])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(n))):
                e = t.external_data.add()
                e.key, e.value = k, v
            data.write(b"\0" * (-data.tell() % _ALIGN))  # page-align the next tensor: mmap-friendly
        external = data.close()
        f = _HashingWriter(onnx_path)
        f.write(model.SerializeToString())
        return f.close() | {"external_data": external} | io
    f = _HashingWriter(onnx_path)
    f.write(model.SerializeToString())
    for name in used:  # each one a ModelProto{graph{initializer{...}}} that merges on parse
        header = TensorProto()
        _tensor_header(header, name, weights[name])
        head = header.SerializeToString()
        nbytes = weights[name].numel() * weights[name].element_size()
        tensor_len = len(head) + len(_tag(_RAW_DATA)) + len(_varint(nbytes)) + nbytes
        graph_len = len(_tag(_INITIALIZER)) + len(_varint(tensor_len)) + tensor_len
        f.write(_tag(_GRAPH) + _varint(graph_len) + _tag(_INITIALIZER) + _varint(tensor_len) + head
                + _tag(_RAW_DATA) + _varint(nbytes))
        _write_tensor_bytes(f, weights[name])
    return f.close() | io


def _tensor_header(t: TensorProto, name: str, tensor: torch.Tensor) -> None:
    t.name = name
    t.dims.extend(tensor.shape)
    t.data_type = onnx.helper.np_dtype_to_tensor_dtype(tensor.numpy().dtype)


def _write_tensor_bytes(f: _HashingWriter, tensor: torch.Tensor) -> int:
    """Write the tensor's little-endian bytes without materialising a copy of it."""
    buf = memoryview(tensor.contiguous().numpy()).cast("B")
    f.write(buf)
    return buf.nbytes


def _tag(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _value_info(v: onnx.ValueInfoProto) -> dict[str, Any]:
    t = v.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    return {"name": v.name, "shape": [dim.dim_value for dim in t.shape.dim], "dtype": dtype}


def describe(onnx_path: Path) -> dict[str, Any]:
    """Inputs/outputs of an ONNX file (names, static shapes, dtypes), read from the file itself."""
    return _describe(onnx.load(str(onnx_path), load_external_data=False))


def _describe(model: ModelProto) -> dict[str, Any]:
    inits = {i.name for i in model.graph.initializer}
    return {"inputs": [_value_info(v) for v in model.graph.input if v.name not in inits],
            "outputs": [_value_info(v) for v in model.graph.output]}

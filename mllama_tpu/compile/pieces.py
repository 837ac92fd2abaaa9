"""The export's pieces as compile sees them, checked before any compile work starts.

Everything the compile needs about a piece (file, checksum, input shapes and dtypes) comes from
manifest.json (read by mllama_tpu.manifest); the ONNX files are checked against it (size, sha256,
graph inputs), so a stale or half-copied export is refused with one line instead of failing deep
inside TPU-MLIR.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllama_tpu import contract
from mllama_tpu.errors import UserError
from mllama_tpu.manifest import MANIFEST_NAME, read_manifest

_ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 16: "bfloat16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str


@dataclass(frozen=True)
class DataFile:
    """A checksummed file of the export: the .onnx itself or its external-data side file."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class Piece:
    net: str
    onnx: Path
    sha256: str
    size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external: DataFile | None = None  # pieces over 2 GB keep their tensors in `<net>.onnx.data`

    @property
    def digest(self) -> str:
        """Identity of the piece's content, graph and weights."""
        return self.sha256 + (f"+{self.external.sha256}" if self.external else "")

    @property
    def total_size(self) -> int:
        return self.size + (self.external.size if self.external else 0)


@dataclass(frozen=True)
class Export:
    root: Path
    manifest: dict[str, Any]
    seq_length: int
    layers: list[str]
    pieces: list[Piece]  # in contract.combine_order

    @property
    def token_config(self) -> Path:
        return self.root / "token_config"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def _specs(items: Any, where: str) -> list[TensorSpec]:
    try:
        return [TensorSpec(str(t["name"]), [int(d) for d in t["shape"]], str(t["dtype"])) for t in items]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: malformed tensor list ({e}); re-run the export") from None


def _onnx_inputs(path: Path) -> list[TensorSpec]:
    import onnx

    # Graph only: weights (possibly external data files) are not read here.
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        specs.append(TensorSpec(v.name, dims, _ONNX_DTYPES.get(t.elem_type, f"onnx:{t.elem_type}")))
    return specs


def load_export(onnx_dir: str | Path, seq_length: int, verify: bool = True) -> Export:
    root = Path(onnx_dir)
    if not root.is_dir():
        raise UserError(f"ONNX dir {root} does not exist; run the export first (compile/export_onnx.py) "
                        f"or pass --onnx_dir")
    manifest = read_manifest(root)
    mpath = root / MANIFEST_NAME
    if manifest["seq_length"] != seq_length:
        raise UserError(f"{mpath} was exported with seq_length {manifest['seq_length']}, "
                        f"not {seq_length}; pass --seq_length {manifest['seq_length']} or re-export")
    layers = manifest["layers"]
    table = manifest["pieces"]
    pieces = []
    for net in contract.combine_order(layers, manifest["prefill_lengths"]):
        entry = table[net]
        where = f"{mpath} [{net}]"
        try:
            onnx_path = root / entry["file"]
            ext = entry.get("external_data")
            external = DataFile(root / ext["file"], str(ext["sha256"]), int(ext["size"])) if ext else None
            piece = Piece(net, onnx_path, str(entry["sha256"]), int(entry["size"]),
                          _specs(entry["inputs"], where), _specs(entry["outputs"], where), external)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: missing or bad field ({e}); re-run the export") from None
        if verify:
            verify_piece(piece)
        pieces.append(piece)
    return Export(root, manifest, seq_length, layers, pieces)


def _verify_file(f: DataFile, net: str) -> None:
    if not f.path.is_file():
        raise UserError(f"{f.path} is missing (listed in manifest.json for {net}); re-run the export")
    size = f.path.stat().st_size
    if size != f.size:
        raise UserError(f"{f.path} has {size} bytes, manifest.json says {f.size}; "
                        f"the file changed after export, re-run the export")
    digest = sha256_file(f.path)
    if digest != f.sha256:
        raise UserError(f"{f.path} checksum {digest[:12]}… differs from manifest.json "
                        f"({f.sha256[:12]}…); the file changed after export, re-run the export")


def verify_piece(piece: Piece) -> None:
    """The ONNX file (and its weights file) is what the manifest describes: same bytes, same inputs."""
    _verify_file(DataFile(piece.onnx, piece.sha256, piece.size), piece.net)
    if piece.external:
        _verify_file(piece.external, piece.net)
    actual = _onnx_inputs(piece.onnx)
    if [(t.name, t.shape, t.dtype) for t in actual] != [(t.name, t.shape, t.dtype) for t in piece.inputs]:
        got = ", ".join(f"{t.name}{t.shape}:{t.dtype}" for t in actual)
        raise UserError(f"{piece.onnx} inputs ({got}) disagree with manifest.json for {piece.net}; re-run the export")

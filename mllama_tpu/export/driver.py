"""export_model: HF Mllama checkpoint -> out_dir/{pieces/*.onnx, manifest.json, token_config/}.

Resumable: the manifest records each finished piece with its checksums as soon as it is
written; a later run keeps every piece whose files still match, and redoes the rest. The
manifest also records a fingerprint of the source (config, weight files, seq_length,
prefill lengths and this package's export code); when it changes, nothing old is trusted.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from mllama_tpu.config import ModelDims
from mllama_tpu.dir_lock import exclusive
from mllama_tpu.errors import UserError
from mllama_tpu.export import flags
from mllama_tpu.export.onnx_io import export_piece, sha256_file
from mllama_tpu import contract
from mllama_tpu.contract import RECENT_IDS
from mllama_tpu.export.pieces import build_piece, piece_names, top_k
from mllama_tpu.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from mllama_tpu.weights import CheckpointWeights

TOKEN_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
               "generation_config.json", "config.json")
_CODE_FILES = [Path(__file__).parent / n for n in
               ("text.py", "vision.py", "heads.py", "rope.py", "pieces.py", "onnx_io.py")] + \
              [Path(__file__).parent.parent / n for n in ("config.py", "weights.py", "contract.py")]


def export_model(model_dir: str | Path, out_dir: str | Path, seq_length: int, device: str = "cpu",
                 only: Iterable[str] | None = None, progress: bool = True,
                 prefill_lengths: Iterable[int] | None = None) -> Path:
    """Export every piece (or those in `only`) and return the path of manifest.json.
    prefill_lengths: the chunk lengths of the step nets (contract.DEFAULT_PREFILL_LENGTHS)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    dims = ModelDims.from_model_dir(model_dir)
    seq_length = _check_seq(seq_length, dims)
    try:
        chunks = contract.prefill_lengths(prefill_lengths, seq_length)
    except ValueError as e:
        raise UserError(f"{e}; pass e.g. --prefill_lengths {flags.DEFAULT_TEXT}") from None
    device = _check_device(device)
    weights = CheckpointWeights(model_dir, dims.tie_word_embeddings)
    with exclusive(_writable(out_dir), "export"):
        return _export(model_dir, out_dir, dims, seq_length, chunks, device, weights, only, progress)


def _export(model_dir: Path, out_dir: Path, dims: ModelDims, seq_length: int, chunks: tuple[int, ...],
            device: str, weights: CheckpointWeights, only: Iterable[str] | None, progress: bool) -> Path:
    pieces_dir = out_dir / "pieces"
    pieces_dir.mkdir(exist_ok=True)
    for stale in pieces_dir.glob(".tmp-*"):  # left by an interrupted run: never a finished piece
        shutil.rmtree(stale, ignore_errors=True)

    manifest_path = out_dir / MANIFEST_NAME
    fingerprint = _fingerprint(model_dir, seq_length, chunks)
    manifest = _load_manifest(manifest_path)
    if manifest.get("fingerprint") != fingerprint:
        manifest = {}  # other model, seq or export code: start over
    manifest.update(_header(dims, seq_length, chunks, fingerprint))
    manifest.setdefault("pieces", {})
    names = list(only) if only is not None else piece_names(dims, chunks)
    bar = tqdm(names, desc="export", unit="piece", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        if _is_done(out_dir, manifest["pieces"].get(name)):
            continue
        manifest["pieces"].pop(name, None)
        piece = build_piece(name, weights, dims, seq_length, chunks)
        info = export_piece(piece, pieces_dir, device)
        del piece
        gc.collect()  # the piece's weights go before the next piece is read
        manifest["pieces"][name] = _entry(name, info)
        _write_json(manifest_path, manifest)
    manifest["token_config"] = _copy_token_config(model_dir, out_dir / "token_config")
    _write_json(manifest_path, manifest)
    return manifest_path


def _check_seq(seq_length: Any, dims: ModelDims) -> int:
    if isinstance(seq_length, bool) or not isinstance(seq_length, int):
        try:
            seq_length = int(str(seq_length), 10)
        except ValueError:
            raise UserError(f"seq_length {seq_length!r} is not an integer; pass e.g. -s 512") from None
    if seq_length <= 0:
        raise UserError(f"seq_length {seq_length} must be a positive integer; pass e.g. -s 512")
    if seq_length > dims.max_position_embeddings:
        raise UserError(f"seq_length {seq_length} exceeds the model's max_position_embeddings "
                        f"{dims.max_position_embeddings}; pass a smaller -s")
    return seq_length


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA device is available; use -d cpu")
    return device


def _writable(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output dir {out_dir} is not writable ({e.strerror}); pass another -f") from None
    return out_dir


def _fingerprint(model_dir: Path, seq_length: int, chunks: tuple[int, ...]) -> dict[str, Any]:
    code = hashlib.sha256()
    for f in _CODE_FILES:
        code.update(f.read_bytes())
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    return {"seq_length": seq_length, "prefill_lengths": list(chunks), "export_code": code.hexdigest()[:16],
            "config_sha256": sha256_file(model_dir / "config.json"),
            # Size alone missed retrained weights of the same shapes; size + mtime catches a
            # replaced file without hashing tens of GB on every run.
            "weights": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.suffix == ".safetensors"}}


def _header(dims: ModelDims, seq_length: int, chunks: tuple[int, ...], fingerprint: dict[str, Any]) -> dict[str, Any]:
    d = dims.to_dict() | {"padded_patches": dims.padded_patches}
    return {"format": MANIFEST_FORMAT, "seq_length": seq_length, "prefill_lengths": list(chunks), "dims": d, "layers": dims.layer_kinds,
            "dtype": "float32", "image_token_id": dims.image_token_id, "eos_token_ids": dims.eos_token_ids,
            "sampling": {"top_k": top_k(dims), "recent_ids": RECENT_IDS}, "fingerprint": fingerprint}


def _entry(name: str, info: dict[str, Any]) -> dict[str, Any]:
    """Manifest entry: paths relative to the export dir, checksums from export_piece."""
    entry = {"file": f"pieces/{name}.onnx", **info}
    if "external_data" in info:  # > 2 GB piece: its tensors live in one side file, checksummed on its own
        entry["external_data"] = {"file": f"pieces/{name}.onnx.data", **info["external_data"]}
    return entry


def _is_done(out_dir: Path, entry: dict[str, Any] | None) -> bool:
    if not entry:
        return False
    for f in [entry, entry.get("external_data")]:
        if f is None:
            continue
        path = out_dir / f["file"]
        if not path.is_file() or path.stat().st_size != f["size"] or sha256_file(path) != f["sha256"]:
            return False
    return True


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _copy_token_config(model_dir: Path, dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKEN_FILES:
        if (model_dir / name).is_file():  # via a temp name: a kill mid-copy leaves no half file
            shutil.copy2(model_dir / name, dest / f".{name}.tmp")
            os.replace(dest / f".{name}.tmp", dest / name)
            copied.append(name)
    return copied

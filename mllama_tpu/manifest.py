"""manifest.json, the export's description of itself: written by export, read here once for
compile and the ONNX engine; and the token facts (EOS ids, image token) that travel beside a
model (ARCHITECTURE.md, "The manifest").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllama_tpu import contract
from mllama_tpu.errors import UserError

MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """The checked manifest of an export dir: its format, layer kinds and every net's entry are
    there, or a one-line UserError says what is wrong and to re-run the export."""
    root = Path(export_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise UserError(f"export dir {root} not found: pass the directory written by compile/export_onnx.py")
    if not path.is_file():
        raise UserError(f"no {MANIFEST_NAME} in {root}: it is not an export dir, run compile/export_onnx.py")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): re-run the export") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{path} has format {got!r}, this version reads format {MANIFEST_FORMAT}: "
                        "re-run the export with this version")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers or not set(layers) <= set(contract.LAYER_KINDS):
        raise UserError(f"{path}: 'layers' must list 'self'/'cross' per text layer: re-run the export")
    if not isinstance(manifest.get("seq_length"), int) or manifest["seq_length"] < 1:
        raise UserError(f"{path}: 'seq_length' must be a positive integer: re-run the export")
    pieces = manifest.get("pieces")
    missing = [n for n in contract.net_names(layers) if not isinstance(pieces, dict) or n not in pieces]
    if missing:
        raise UserError(f"{path} lacks net(s) {', '.join(missing)}: the export is incomplete, re-run it")
    return manifest


@dataclass(frozen=True)
class TokenFacts:
    eos_ids: list[int]
    image_token_id: int | None


def _ids(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(t) for t in x] if isinstance(x, (list, tuple)) else [int(x)]


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def token_facts(model_dir: Path, token_config: Path | None = None) -> TokenFacts:
    """EOS ids and image token id of the model in `model_dir` (an export dir, or the dir of a
    bmodel). They are not in the bmodel, so they come from what export and compile write beside
    it: the manifest, and token_config/ (config.json, generation_config.json; `token_config`
    when the user chose another). EOS ids from all of them; the tokenizer's own is the caller's."""
    token_config = token_config or model_dir / "token_config"
    manifest = _json(model_dir / MANIFEST_NAME)
    cfg = _json(token_config / "config.json")
    gen = _json(token_config / "generation_config.json")
    eos = (_ids(manifest.get("eos_token_ids")) + _ids(cfg.get("text_config", {}).get("eos_token_id"))
           + _ids(gen.get("eos_token_id")))
    image = manifest.get("image_token_id", cfg.get("image_token_index", cfg.get("image_token_id")))
    return TokenFacts(list(dict.fromkeys(eos)), int(image) if image is not None else None)

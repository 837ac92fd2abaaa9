"""manifest.json, the export's description of itself: written by export, read here once for
compile and the ONNX engine; and the token facts (EOS ids, image token) that travel beside a
model (ARCHITECTURE.md, "The manifest").
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from mllama_tpu import contract
from mllama_tpu.errors import UserError

MANIFEST_FORMAT = 2  # 2: prefill in chunks against the cache (step nets, cross_kv_i), no block_i
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
    if not isinstance(layers, list) or not layers or not all(k in contract.LAYER_KINDS for k in layers):
        raise UserError(f"{path}: 'layers' must list 'self'/'cross' per text layer: re-run the export")
    if not _is_int(manifest.get("seq_length")) or manifest["seq_length"] < 1:
        raise UserError(f"{path}: 'seq_length' must be a positive integer: re-run the export")
    lengths = manifest.get("prefill_lengths")
    if (not isinstance(lengths, list) or not lengths or not all(_is_int(c) and 2 <= c <= manifest["seq_length"] for c in lengths)
            or lengths != sorted(set(lengths))):
        raise UserError(f"{path}: 'prefill_lengths' must be increasing integers in 2..seq_length: re-run the export")
    pieces = manifest.get("pieces")
    missing = [n for n in contract.net_names(layers, lengths) if not isinstance(pieces, dict) or n not in pieces]
    if missing:
        raise UserError(f"{path} lacks net(s) {', '.join(missing)}: the export is incomplete, re-run it")
    # What the readers take without asking again (the ONNX engine opens every piece's file).
    bad = [n for n, e in pieces.items() if not isinstance(e, dict) or not isinstance(e.get("file"), str)]
    if bad:
        raise UserError(f"{path}: the entry of net(s) {', '.join(bad)} has no 'file': re-run the export")
    _check_dims(path, manifest.get("dims"))
    sampling = manifest.get("sampling", {})
    if not isinstance(sampling, dict) or not all(_is_int(sampling.get(k, 1)) for k in ("top_k", "recent_ids")):
        raise UserError(f"{path}: 'sampling' must give top_k and recent_ids as integers: re-run the export")
    return manifest


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_dims(path: Path, dims: Any) -> None:
    from mllama_tpu.config import ModelDims

    required = [f.name for f in fields(ModelDims) if f.default is MISSING and f.default_factory is MISSING]
    if not isinstance(dims, dict) or (absent := [k for k in required if k not in dims]):
        what = f"lacks {', '.join(absent)}" if isinstance(dims, dict) else "is not an object"
        raise UserError(f"{path}: 'dims' {what}: re-run the export")


@dataclass(frozen=True)
class TokenFacts:
    eos_ids: list[int]
    image_token_id: int | None


def _ids(x: Any, path: Path, key: str) -> list[int]:
    if x is None:
        return []
    ids = x if isinstance(x, list) else [x]
    if not all(_is_int(t) for t in ids):
        raise UserError(f"{path}: {key!r} must be a token id or a list of them, not {json.dumps(x)[:40]}: "
                        "pass the token_config/ exported with the model (-t), or re-run the export")
    return ids


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
    paths = model_dir / MANIFEST_NAME, token_config / "config.json", token_config / "generation_config.json"
    manifest, cfg, gen = (_json(p) for p in paths)
    text_config = cfg.get("text_config")
    text_config = text_config if isinstance(text_config, dict) else {}
    eos = (_ids(manifest.get("eos_token_ids"), paths[0], "eos_token_ids")
           + _ids(text_config.get("eos_token_id"), paths[1], "text_config.eos_token_id")
           + _ids(gen.get("eos_token_id"), paths[2], "eos_token_id"))
    if "image_token_id" in manifest:
        image = _ids(manifest["image_token_id"], paths[0], "image_token_id")
    else:
        key = "image_token_index" if "image_token_index" in cfg else "image_token_id"
        image = _ids(cfg.get(key), paths[1], key)
    if len(image) > 1:
        raise UserError(f"{paths[0] if 'image_token_id' in manifest else paths[1]}: the image token id must be "
                        "one id: pass the token_config/ exported with the model (-t), or re-run the export")
    return TokenFacts(list(dict.fromkeys(eos)), image[0] if image else None)

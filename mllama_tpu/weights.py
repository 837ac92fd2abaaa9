"""Lazy safetensors reader: open the shards, read only the tensors a piece asks for.

Names are normalised to one short scheme so the export code does not care whether the
checkpoint was written with the hub layout (`language_model.model.*`, `vision_model.*`)
or transformers 5's in-memory layout (`model.language_model.*`, ...):

    text.*  (decoder: embed_tokens, layers, norm)   lm_head.*   vision.*   projector.*

Tensors come back as float32 (bf16/f16 checkpoints are widened): the ONNX pieces are f32
and TPU-MLIR quantizes from there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from mllama_tpu.errors import UserError

_PREFIXES: list[tuple[str, str]] = [  # (checkpoint prefix, our prefix), longest first
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.vision_model.", "vision."),
    ("vision_model.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
]


def canonical_name(name: str) -> str | None:
    for src, dst in _PREFIXES:
        if name.startswith(src):
            return dst + name[len(src):]
    return None


class CheckpointWeights:
    """Index of a checkpoint's tensors (file per name); tensors are read on demand."""

    def __init__(self, model_dir: str | Path, tie_word_embeddings: bool = False) -> None:
        self.model_dir = Path(model_dir)
        self._where: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, name in file)
        for path in self._shard_files():
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    canon = canonical_name(name)
                    if canon is not None:
                        self._where[canon] = (path, name)
        if "lm_head.weight" not in self._where and tie_word_embeddings and "text.embed_tokens.weight" in self._where:
            self._where["lm_head.weight"] = self._where["text.embed_tokens.weight"]
        if "text.embed_tokens.weight" not in self._where:
            raise UserError(f"no Mllama text weights (language_model.model.embed_tokens) in {self.model_dir}; "
                            "is this an MllamaForConditionalGeneration checkpoint?")

    def _shard_files(self) -> list[Path]:
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({self.model_dir / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"weight shard(s) {', '.join(missing[:3])} listed in {index} are missing; "
                                "download the complete checkpoint")
            return files
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"no *.safetensors weights in {self.model_dir}; download the model's weight files")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._where if n.startswith(prefix))

    def get(self, name: str, transpose: bool = False) -> torch.Tensor:
        """One tensor as f32 (2-D ones optionally transposed to [in, out]).

        Large tensors are read in row slices straight into the f32 result, so reading
        the 2 GB embedding costs 2 GB, not 2 GB plus a bf16 copy plus a transposed one.
        """
        if name not in self._where:
            raise UserError(f"tensor {name} not found in {self.model_dir}; the checkpoint is incomplete "
                            "or does not match its config.json")
        path, key = self._where[name]
        with safe_open(str(path), framework="pt") as f:
            sl = f.get_slice(key)
            shape = list(sl.get_shape())
            if len(shape) != 2:
                if transpose:
                    raise ValueError(f"cannot transpose {name} of shape {shape}")
                return f.get_tensor(key).to(torch.float32)
            rows, cols = shape
            out = torch.empty((cols, rows) if transpose else (rows, cols), dtype=torch.float32)
            step = max(1, (1 << 24) // max(cols, 1))  # ~16M elements per slice
            for i in range(0, rows, step):  # copy_ converts and transposes in one pass
                part = sl[i:i + step]
                (out[:, i:i + step] if transpose else out[i:i + step]).copy_(part.t() if transpose else part)
            return out

    def group(self, prefix: str, transpose: Callable[[str], bool] = lambda name: False) -> dict[str, torch.Tensor]:
        """All tensors under `prefix`, keyed by the rest of their name; those for which
        `transpose(name)` holds come as [in, out]."""
        return {n[len(prefix):]: self.get(n, transpose(n)) for n in self.names(prefix)}

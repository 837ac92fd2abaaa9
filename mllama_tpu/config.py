"""Model dimensions: one dataclass, read from an HF `config.json` or from an export manifest.

Everything downstream (export, compile, engines) takes its shapes from here, never from a
model name. The HF reader accepts both config layouts seen in the wild: transformers 4
(`rope_theta` + `rope_scaling`) and transformers 5 (`rope_parameters`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mllama_tpu.errors import UserError

# transformers' defaults for keys a config.json may omit (MllamaTextConfig / MllamaVisionConfig).
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 40, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    "hidden_act": "silu", "tie_word_embeddings": False, "eos_token_id": 128001,
    "bos_token_id": 128000, "pad_token_id": 128004,
}
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1280, "num_hidden_layers": 32, "num_global_layers": 8, "attention_heads": 16,
    "num_channels": 3, "intermediate_size": 5120, "vision_output_dim": 7680, "image_size": 448,
    "patch_size": 14, "norm_eps": 1e-5, "max_num_tiles": 4,
    "intermediate_layers_indices": [3, 7, 15, 23, 30], "hidden_act": "gelu",
    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
}


@dataclass(frozen=True)
class ModelDims:
    # text decoder
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # rows of lm_head (logits width)
    embed_rows: int  # rows of embed_tokens (vocab_size + 8 in Mllama: image token etc.)
    num_hidden_layers: int
    cross_attention_layers: list[int]
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None = default rope; else {"rope_type": "llama3", ...}
    tie_word_embeddings: bool
    # vision encoder
    vision_hidden_size: int
    vision_num_heads: int
    vision_intermediate_size: int
    vision_num_layers: int
    vision_num_global_layers: int
    vision_intermediate_layers: list[int]
    vision_output_dim: int
    vision_norm_eps: float
    num_channels: int
    max_num_tiles: int
    tile_size: int
    patch_size: int
    num_patches: int  # per tile, including the CLS token (1601 for 560/14)
    max_aspect_ratio_id: int
    supported_aspect_ratios: list[list[int]]
    # tokens
    image_token_id: int
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def layer_kinds(self) -> list[str]:
        cross = set(self.cross_attention_layers)
        return ["cross" if i in cross else "self" for i in range(self.num_hidden_layers)]

    @property
    def padded_patches(self) -> int:
        """Patches per tile padded to a multiple of 8, as the vision encoder runs them."""
        return (self.num_patches + 7) // 8 * 8

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelDims":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any] | str | Path) -> "ModelDims":
        if not isinstance(manifest, dict):
            manifest = json.loads(Path(manifest).read_text())
        return cls.from_dict(manifest["dims"])

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelDims":
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not model_dir.is_dir():
            raise UserError(f"model dir {model_dir} does not exist; pass -m with a Mllama checkpoint directory")
        if not path.is_file():
            raise UserError(f"no config.json in {model_dir}; pass -m with a Mllama checkpoint directory")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from None
        gen_path = model_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_hf_config(cfg, gen, where=str(path))

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], generation: dict[str, Any] | None = None,
                       where: str = "config.json") -> "ModelDims":
        if cfg.get("model_type") != "mllama" or "text_config" not in cfg or "vision_config" not in cfg:
            raise UserError(f"{where} is not a Mllama (Llama-3.2-Vision) config "
                            f"(model_type={cfg.get('model_type')!r}); pass an MllamaForConditionalGeneration checkpoint")
        t = {**_TEXT_DEFAULTS, **cfg["text_config"]}
        v = {**_VISION_DEFAULTS, **cfg["vision_config"]}
        theta, scaling = _rope(t)
        image_size, patch = _square(v["image_size"], where), _square(v["patch_size"], where)
        heads = t["num_attention_heads"]
        eos = _as_list(t.get("eos_token_id")) + _as_list((generation or {}).get("eos_token_id"))
        return cls(
            hidden_size=t["hidden_size"], num_attention_heads=heads,
            num_key_value_heads=t["num_key_value_heads"], head_dim=t["hidden_size"] // heads,
            intermediate_size=t["intermediate_size"], vocab_size=t["vocab_size"],
            embed_rows=t["vocab_size"] + 8, num_hidden_layers=t["num_hidden_layers"],
            cross_attention_layers=sorted(t["cross_attention_layers"]),
            rms_norm_eps=float(t["rms_norm_eps"]), max_position_embeddings=t["max_position_embeddings"],
            rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=bool(t["tie_word_embeddings"]),
            vision_hidden_size=v["hidden_size"], vision_num_heads=v["attention_heads"],
            vision_intermediate_size=v["intermediate_size"], vision_num_layers=v["num_hidden_layers"],
            vision_num_global_layers=v["num_global_layers"],
            vision_intermediate_layers=list(v["intermediate_layers_indices"]),
            vision_output_dim=v["vision_output_dim"], vision_norm_eps=float(v["norm_eps"]),
            num_channels=v["num_channels"], max_num_tiles=v["max_num_tiles"], tile_size=image_size,
            patch_size=patch, num_patches=(image_size // patch) ** 2 + 1,
            max_aspect_ratio_id=len(v["supported_aspect_ratios"]),
            supported_aspect_ratios=[list(r) for r in v["supported_aspect_ratios"]],
            image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 128256)),
            eos_token_ids=list(dict.fromkeys(eos)),  # unique, order kept
            bos_token_id=t.get("bos_token_id"), pad_token_id=t.get("pad_token_id"),
        )


def _rope(t: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either config layout; scaling None means plain rope."""
    params = t.get("rope_parameters") or {}
    scaling = t.get("rope_scaling") or {}
    theta = params.get("rope_theta", t.get("rope_theta", 500000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UserError(f"rope type {kind!r} is not supported (only default and llama3)")
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(theta), {"rope_type": "llama3", **{k: merged[k] for k in keep}}


def _square(x: int | list[int], where: str) -> int:
    if isinstance(x, int):
        return x
    if len(set(x)) != 1:
        raise UserError(f"{where}: non-square image/patch size {x} is not supported")
    return int(x[0])


def _as_list(x: int | list[int] | None) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]

"""Random-weight Llama-3.2-Vision checkpoints with the real dims at reduced depth.

Speed on the chip depends on shapes, not on weight values, so a random checkpoint with the
exact 11B (or 90B) dims measures what the real one would. Depth is reduced: per-layer nets are
separate bmodel nets, so a model with one layer of each kind (and a shallow vision encoder)
gives every net whose time we multiply by the real layer counts.

The checkpoint is written in the layout of the published HF checkpoints
(`language_model.model.layers.N...`, `vision_model...`, `multi_modal_projector...`), which is
what both our export and TPU-MLIR's llm_convert.py read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The published Llama-3.2-Vision aspect-ratio table (max 4 tiles).
ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]


@dataclass(frozen=True)
class Dims:
    """What differs between the model sizes; everything else is shared Llama-3.2-Vision."""
    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int  # real depth (for extrapolation)
    cross_attention_layers: tuple[int, ...]  # real indices (for extrapolation)
    vocab_size: int = 128256
    vision_layers: int = 32
    vision_global_layers: int = 8
    vision_hidden: int = 1280
    vision_heads: int = 16
    vision_intermediate: int = 5120
    image_size: int = 560
    patch_size: int = 14
    max_num_tiles: int = 4
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)

    @property
    def num_cross(self) -> int:
        return len(self.cross_attention_layers)

    @property
    def num_self(self) -> int:
        return self.num_hidden_layers - self.num_cross


# Cross-attention every 5th layer from 3, as in the published configs.
DIMS = {
    "11b": Dims("11b", 4096, 14336, 32, 8, 40, tuple(range(3, 40, 5))),
    "90b": Dims("90b", 8192, 28672, 64, 8, 100, tuple(range(3, 100, 5))),
    # For tests: same structure, tiny dims (compiles in seconds).
    # 4 query heads per KV head like 11B: llm_convert hard-codes that ratio for cross layers.
    "tiny": Dims("tiny", 512, 1024, 8, 2, 2, (1,), vocab_size=512, vision_layers=2,
                 vision_global_layers=1, vision_hidden=64, vision_heads=2,
                 vision_intermediate=128, image_size=56, patch_size=14, max_num_tiles=4,
                 intermediate_layers_indices=(1, 2)),
}


@dataclass(frozen=True)
class Reduced:
    """The reduced depth actually built: text layer 0 is self-attention, 1 is cross."""
    text_layers: int = 2
    cross_layers: tuple[int, ...] = (1,)
    # Enough local layers for the 5 intermediate-feature taps. transformers 5 (and our export)
    # read tap i after local layer i; llm_convert taps after layer i-1 and cannot tap 0. Taps
    # 1..5 over 6 layers are valid for both (same shapes, so the same cost either way).
    vision_layers: int = 6
    vision_global_layers: int = 1
    intermediate_layers_indices: tuple[int, ...] = field(default=(1, 2, 3, 4, 5))


def hf_config(d: Dims, r: Reduced) -> dict:
    """config.json content for the reduced model (MllamaConfig fields)."""
    taps = list(r.intermediate_layers_indices)[:len(d.intermediate_layers_indices)]
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "model_type": "mllama",
        "image_token_index": d.vocab_size,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "mllama_text_model",
            "vocab_size": d.vocab_size,  # embed_tokens gets 8 more rows (image token etc.)
            "hidden_size": d.hidden_size,
            "intermediate_size": d.intermediate_size,
            "num_attention_heads": d.num_attention_heads,
            "num_key_value_heads": d.num_key_value_heads,
            "num_hidden_layers": r.text_layers,
            "cross_attention_layers": list(r.cross_layers),
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "tie_word_embeddings": False,
            **_special_ids(d.vocab_size),
            "torch_dtype": "bfloat16",
        },
        "vision_config": {
            "model_type": "mllama_vision_model",
            "hidden_size": d.vision_hidden,
            "attention_heads": d.vision_heads,
            "intermediate_size": d.vision_intermediate,
            "num_hidden_layers": r.vision_layers,
            "num_global_layers": r.vision_global_layers,
            "intermediate_layers_indices": taps,
            "vision_output_dim": d.vision_hidden * (len(taps) + 1),
            "image_size": d.image_size,
            "patch_size": d.patch_size,
            "max_num_tiles": d.max_num_tiles,
            "supported_aspect_ratios": ASPECT_RATIOS,
            "norm_eps": 1e-5,
            "num_channels": 3,
            "torch_dtype": "bfloat16",
        },
    }


def _special_ids(vocab: int) -> dict:
    """The published special token ids, or small ones when the vocab is tiny (tests)."""
    if vocab > 128009:
        return {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
                "pad_token_id": 128004}
    return {"bos_token_id": 0, "eos_token_id": [1], "pad_token_id": 2}


def _hub_name(key: str) -> str:
    """transformers-5 state-dict key -> the published checkpoint's key."""
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("model."):
        return key[len("model."):]
    return key


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith(("layernorm.weight", "norm.weight")) and len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    if "gate" in name and len(shape) == 1 and shape[0] == 1:
        # Gates are tanh'd scalars: nonzero so every branch is live, as in a trained model.
        return torch.full(shape, 0.5, dtype=torch.bfloat16)
    t = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
    return t.to(torch.bfloat16)


def make_checkpoint(out_dir: str | Path, dims: Dims, reduced: Reduced = Reduced(),
                    seed: int = 0, vision_only: bool = False) -> Path:
    """Write config.json + model.safetensors (bf16, random) unless already there. Returns dir.

    vision_only: write only the vision encoder and projector (what the vit net reads), for the
    extra vision depths; the 2 GB embedding and lm_head are not needed there.
    """
    from safetensors.torch import save_file
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    out = Path(out_dir)
    done = out / "model.safetensors"
    if done.exists() and (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = hf_config(dims, reduced)
    cfg = MllamaConfig(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    with torch.device("meta"):  # names and shapes only, no memory
        model = MllamaForConditionalGeneration(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, p in model.state_dict().items():
        name = _hub_name(key)
        if vision_only and name.startswith("language_model."):
            # Our weight loader checks for the text embedding to recognise the checkpoint;
            # zeros cost no random draws and the vit never reads them.
            if name == "language_model.model.embed_tokens.weight":
                tensors[name] = torch.zeros(tuple(p.shape), dtype=torch.bfloat16)
            continue
        tensors[name] = _random_tensor(name, tuple(p.shape), gen)
    tmp = out / "model.safetensors.partial"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    tmp.rename(done)  # last: a crash mid-write leaves no "cached" checkpoint
    return out

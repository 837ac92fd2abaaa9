"""Architecture of the tiny Mllama: Llama-3.2-11B-Vision's structure with small dimensions.

Every feature the chain must handle is present: GQA, llama3 rope scaling, cross-attention layers
that are neither first nor last, a vision encoder with gated global layers and intermediate-layer
outputs, 4 tiles with all 8 aspect ratios. The dims are part of the contract with the tests of
export/compile/engine: do not change them without telling everyone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import MllamaConfig

from mllama_tpu.tiny import tokenizer as tok

TILE_SIZE = 112
PATCH_SIZE = 14
MAX_TILES = 4
# The 8 (width, height) tile layouts that max_num_tiles=4 allows; transformers' default order.
SUPPORTED_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]


@dataclass(frozen=True)
class TinyDims:
    text_hidden: int = 64
    text_heads: int = 4
    text_kv_heads: int = 2  # GQA: 2 query heads share each KV head
    text_intermediate: int = 192
    text_layers: int = 5
    cross_attention_layers: tuple[int, ...] = (1, 3)
    max_position_embeddings: int = 2048
    vision_hidden: int = 64
    vision_heads: int = 2
    vision_intermediate: int = 128
    vision_local_layers: int = 3
    vision_global_layers: int = 1
    # Indices into the local encoder's per-layer outputs (transformers 5.x: index i = output of
    # layer i); their outputs are concatenated to the final state, as in the 11B model.
    intermediate_layers_indices: tuple[int, ...] = (0, 2)
    rope: dict = field(
        default_factory=lambda: {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # Small on purpose: with head_dim 16 this puts some frequencies in each of the three
            # llama3 bands (kept, smoothed, divided by factor), so all branches are exercised.
            "original_max_position_embeddings": 256,
        }
    )


def build_config(dims: TinyDims = TinyDims()) -> MllamaConfig:
    """The MllamaConfig of the tiny model (ids come from our tokenizer's fixed layout)."""
    vision_output_dim = dims.vision_hidden * (1 + len(dims.intermediate_layers_indices))
    text_config = {
        "vocab_size": tok.VOCAB_SIZE,
        "hidden_size": dims.text_hidden,
        "hidden_act": "silu",
        "num_hidden_layers": dims.text_layers,
        "num_attention_heads": dims.text_heads,
        "num_key_value_heads": dims.text_kv_heads,
        "intermediate_size": dims.text_intermediate,
        "rope_parameters": dict(dims.rope),
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": dims.max_position_embeddings,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "cross_attention_layers": list(dims.cross_attention_layers),
        "bos_token_id": tok.special_id("<|begin_of_text|>"),
        "eos_token_id": tok.special_id("<|end_of_text|>"),
        "pad_token_id": tok.special_id("<|finetune_right_pad_id|>"),
    }
    vision_config = {
        "hidden_size": dims.vision_hidden,
        "hidden_act": "gelu",
        "num_hidden_layers": dims.vision_local_layers,
        "num_global_layers": dims.vision_global_layers,
        "attention_heads": dims.vision_heads,
        "num_channels": 3,
        "intermediate_size": dims.vision_intermediate,
        "vision_output_dim": vision_output_dim,
        "image_size": TILE_SIZE,
        "patch_size": PATCH_SIZE,
        "norm_eps": 1e-5,
        "max_num_tiles": MAX_TILES,
        "intermediate_layers_indices": list(dims.intermediate_layers_indices),
        "supported_aspect_ratios": [list(r) for r in SUPPORTED_ASPECT_RATIOS],
        "initializer_range": 0.02,
    }
    config = MllamaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tok.IMAGE_TOKEN_ID,
    )
    config.architectures = ["MllamaForConditionalGeneration"]
    return config

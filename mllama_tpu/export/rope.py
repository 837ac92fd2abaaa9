"""Rotary tables for the text decoder, precomputed once per export.

The blocks gather rows of these tables by `position_ids`, so the ONNX graph holds no
trigonometry and no shape-dependent position logic. llama3 frequency scaling (the
Llama-3.2 rope_scaling) is applied when the inverse frequencies are built.
"""
from __future__ import annotations

import math

import torch

from mllama_tpu.config import ModelDims


def inverse_frequencies(dims: ModelDims) -> torch.Tensor:
    d = dims.head_dim
    inv = 1.0 / (dims.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = dims.rope_scaling
    if s is None:
        return inv
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


def rotary_tables(dims: ModelDims, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [positions, head_dim] (f32), rows indexed by position id."""
    inv = inverse_frequencies(dims)
    pos = torch.arange(positions, dtype=torch.float32)
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()

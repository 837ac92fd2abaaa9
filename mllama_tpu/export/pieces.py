"""How to build each net of the contract (mllama_tpu.contract) from a checkpoint's weights.

A Piece is a torch module plus named example inputs (their shapes are the static shapes
of the ONNX file) and output names, both in the contract's order. Only the tensors the piece
needs are read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mllama_tpu import contract
from mllama_tpu.config import ModelDims
from mllama_tpu.export.heads import GreedyHead, PenaltySampleHead
from mllama_tpu.export.rope import rotary_tables
from mllama_tpu.export.text import CrossAttentionBlock, CrossKV, Embedding, LmHead, SelfAttentionBlock
from mllama_tpu.export.vision import VisionEncoder
from mllama_tpu.weights import CheckpointWeights


@dataclass
class Piece:
    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]


def is_projection(name: str) -> bool:
    """Weights that Linear takes as [in, out]."""
    return name.endswith(("_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")) or name in (
        "lm_head.weight", "projector.weight")


def top_k(dims: ModelDims) -> int:
    """K of the sampling head: the contract's, or the whole vocabulary when that is smaller."""
    return min(contract.SAMPLE_TOP_K, dims.vocab_size)


def piece_names(dims: ModelDims, chunks: tuple[int, ...]) -> list[str]:
    return contract.net_names(dims.layer_kinds, chunks)


def build_piece(name: str, weights: CheckpointWeights, dims: ModelDims, seq: int, chunks: tuple[int, ...]) -> Piece:
    """The piece `name`, its example inputs and outputs named and ordered as the contract says.
    chunks: the prefill lengths (the embedding takes the largest chunk's ids)."""
    piece = _build(name, weights, dims, seq, max(chunks))
    ins, outs = contract.net_io(name, dims.layer_kinds)
    if tuple(piece.inputs) != ins or tuple(piece.outputs) != outs:
        raise AssertionError(f"piece {name} has I/O {list(piece.inputs)} -> {piece.outputs}, "
                             f"the contract {list(ins)} -> {list(outs)}")
    return piece


def _build(name: str, weights: CheckpointWeights, dims: ModelDims, seq: int, max_chunk: int) -> Piece:
    i32 = torch.int32
    h, kv, d = dims.hidden_size, dims.num_key_value_heads, dims.head_dim
    t, p, s = dims.max_num_tiles, dims.num_patches, dims.tile_size
    zeros = torch.zeros
    if name in ("embedding", "embedding_cache"):
        n = max_chunk if name == "embedding" else 1
        return Piece(name, Embedding(weights.get("text.embed_tokens.weight")),
                     {"input_ids": zeros(1, n, dtype=i32)}, ["hidden_states"])
    if name == "lm_head":
        return Piece(name, LmHead(weights.get("text.norm.weight"), weights.get("lm_head.weight", transpose=True),
                                    dims.rms_norm_eps),
                     {"hidden_states": zeros(1, h)}, ["logits"])
    if name == "greedy_head":
        return Piece(name, GreedyHead(), {"logits": torch.randn(1, dims.vocab_size)}, ["token"])
    if name == "penalty_sample_head":
        return Piece(name, PenaltySampleHead(dims.vocab_size, top_k(dims)),
                     {"logits": torch.randn(1, dims.vocab_size), "recent_ids": zeros(1, contract.RECENT_IDS, dtype=i32),
                      "top_p": torch.tensor([0.8]), "temperature": torch.tensor([0.7]),
                      "repeat_penalty": torch.tensor([1.1])},
                     ["probs", "tokens"])
    if name == "vit":
        module = VisionEncoder(weights.group("vision.", is_projection),
                               weights.group("projector.", lambda n: n == "projector.weight"), dims)
        return Piece(name, module,
                     {"pixel_values": zeros(t, dims.num_channels, s, s), "aspect_ratio_ids": torch.ones(1, 1, dtype=i32),
                      "aspect_ratio_mask": torch.ones(1, t, dtype=i32)},
                     ["cross_attention_states"])
    where = contract.layer_of(name)
    if where is None:
        raise ValueError(f"unknown piece {name!r}")
    w = weights.group(f"text.layers.{where.layer}.", is_projection)
    if where.rows is None:
        return Piece(name, CrossKV(w, dims), {"cross_attention_states": zeros(t, p, h)}, ["cross_k", "cross_v"])
    n = where.rows
    if dims.layer_kinds[where.layer] == "self":
        cos, sin = rotary_tables(dims, seq + 1)  # positions 0..seq (one spare row)
        inputs = {"input_states": zeros(1, n, h), "position_ids": torch.arange(n, dtype=i32).view(1, n),
                  "attention_mask": zeros(1, 1, n, seq + n), "history_k": zeros(1, seq, kv, d),
                  "history_v": zeros(1, seq, kv, d)}
        return Piece(name, SelfAttentionBlock(w, dims, cos, sin), inputs, ["hidden_states", "present_k", "present_v"])
    inputs = {"input_states": zeros(1, n, h), "text_row_mask": torch.ones(1, n, 1),
              "attention_mask": zeros(1, 1, n, t * p), "cross_k": zeros(1, kv, t * p, d),
              "cross_v": zeros(1, kv, t * p, d)}  # head-major: see CrossKV
    return Piece(name, CrossAttentionBlock(w, dims), inputs, ["hidden_states"])

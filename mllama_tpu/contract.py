"""The net contract: the names, roles and I/O of every net, the one interface between export,
compile and both engines (ARCHITECTURE.md, "The net contract").

Export builds exactly these nets with these input and output names, compile builds and combines
them, the ONNX engine runs them by these names, and the C++ engine is handed `engine_spec()` at
load and checks the bmodel against it. Nothing here knows a model size: layer kinds come from
the export's manifest (or the bmodel's own nets).
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple

# Additive attention-mask values: 0 lets a query see a key, MASK_HIDDEN hides it. -10000 rather
# than finfo.min so the value survives f16/bf16 on the device without becoming -inf/NaN.
MASK_VISIBLE = 0.0
MASK_HIDDEN = -10000.0

# The sampling head: K candidates it returns, R recent ids its repeat penalty sees.
SAMPLE_TOP_K = 50
RECENT_IDS = 64

LAYER_KINDS = ("self", "cross")

# Nets that are not per layer: inputs, outputs.
HEADS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vit": (("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"), ("cross_attention_states",)),
    "embedding": (("input_ids",), ("hidden_states",)),
    "embedding_cache": (("input_ids",), ("hidden_states",)),
    "lm_head": (("hidden_states",), ("logits",)),
    "greedy_head": (("logits",), ("token",)),
    "penalty_sample_head": (("logits", "recent_ids", "top_p", "temperature", "repeat_penalty"), ("probs", "tokens")),
}

# Per-layer nets. A step net runs C new tokens against the KV cache: C = 1 is a decode step
# (block_cache_i), larger C a chunk of a prompt (block_chunk{C}_i, one net per prefill length).
# Both kinds of step share their I/O names; cross_kv_i projects an image's states into the
# cross K/V once per image (ARCHITECTURE.md, "Prefill in chunks").
STEP_BLOCKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "self": (("input_states", "position_ids", "attention_mask", "history_k", "history_v"),
             ("hidden_states", "present_k", "present_v")),
    "cross": (("input_states", "text_row_mask", "attention_mask", "cross_k", "cross_v"),
              ("hidden_states",)),
}
CROSS_KV: tuple[tuple[str, ...], tuple[str, ...]] = (("cross_attention_states",), ("cross_k", "cross_v"))

# Net names as templates: the C++ engine matches the bmodel's nets against these.
DECODE_NET = "block_cache_{layer}"
CHUNK_NET = "block_chunk{rows}_{layer}"
CROSS_KV_NET = "cross_kv_{layer}"

# Prefill lengths when the export is given none: a short chat prompt (a question, a follow-up
# turn) fits the smallest, a long one runs in chunks of the largest. Lengths above SEQ are cut.
DEFAULT_PREFILL_LENGTHS = (64, 128, 512)

# Tensors that only travel from one net to another on the device (compile stores them in the
# activation dtype); everything else is written or read by the host.
DEVICE_TENSORS = frozenset({"input_states", "cross_attention_states", "history_k", "history_v",
                            "cross_k", "cross_v"})
DEVICE_TENSORS_BY_NET = {"lm_head": frozenset({"hidden_states"})}  # read from a block's output


def step_block(layer: int, rows: int) -> str:
    """The net that runs `rows` new tokens of layer `layer` against the cache."""
    return DECODE_NET.format(layer=layer) if rows == 1 else CHUNK_NET.format(rows=rows, layer=layer)


def decode_block(layer: int) -> str:
    return step_block(layer, 1)


def cross_kv_block(layer: int) -> str:
    return CROSS_KV_NET.format(layer=layer)


class LayerNet(NamedTuple):
    layer: int
    rows: int | None  # tokens a step net runs; None for cross_kv


def layer_of(net: str) -> LayerNet | None:
    """(layer, rows) of a per-layer net's name, None for a head."""
    for template in (DECODE_NET, CHUNK_NET, CROSS_KV_NET):
        pattern = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{rows\}", r"(?P<rows>\d+)")
        m = re.fullmatch(pattern, net)
        if m:
            rows = 1 if template == DECODE_NET else (int(m["rows"]) if template == CHUNK_NET else None)
            return LayerNet(int(m["layer"]), rows)
    return None


def prefill_lengths(requested: Iterable[int] | None, seq_length: int) -> tuple[int, ...]:
    """The chunk lengths an export builds: sorted, distinct, each 2..SEQ (1 is decode's)."""
    lengths = DEFAULT_PREFILL_LENGTHS if requested is None else tuple(requested)
    cut = sorted({min(int(c), seq_length) for c in lengths})
    if not cut or cut[0] < 2:
        raise ValueError(f"prefill lengths {list(lengths)}: each must be at least 2 (1 is the decode step)")
    return tuple(cut)


def net_names(layers: list[str], chunks: Iterable[int]) -> list[str]:
    """Every net of a model with these layer kinds and prefill lengths, in export order."""
    names = ["embedding", "embedding_cache"]
    for i, kind in enumerate(layers):
        names += [cross_kv_block(i)] if kind == "cross" else []
        names += [step_block(i, rows) for rows in (1, *chunks)]
    return names + ["lm_head", "greedy_head", "penalty_sample_head", "vit"]


def combine_order(layers: list[str], chunks: Iterable[int]) -> list[str]:
    """Heads, then self-attention blocks, then cross-attention blocks, then the vision encoder:
    fixed, so two compiles of the same export give the same bmodel."""
    chunks = tuple(chunks)
    self_idx = [i for i, k in enumerate(layers) if k == "self"]
    cross_idx = [i for i, k in enumerate(layers) if k == "cross"]
    nets = ["embedding", "embedding_cache", "lm_head", "greedy_head", "penalty_sample_head"]
    for i in self_idx + cross_idx:
        nets += [cross_kv_block(i)] if layers[i] == "cross" else []
        nets += [step_block(i, rows) for rows in (1, *chunks)]
    return nets + ["vit"]


def net_io(net: str, layers: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of `net` in a model with these layer kinds."""
    if net in HEADS:
        return HEADS[net]
    where = layer_of(net)
    if where is None or where.layer >= len(layers) or (where.rows is None and layers[where.layer] != "cross"):
        raise KeyError(f"no net {net!r} in a model of {len(layers)} layers")
    return CROSS_KV if where.rows is None else STEP_BLOCKS[layers[where.layer]]


def engine_spec() -> dict:
    """What the C++ engine checks a bmodel against and computes its decode masks with."""
    return {
        "heads": {name: [list(ins), len(outs)] for name, (ins, outs) in HEADS.items()},
        "blocks": {kind: [list(ins), len(outs)] for kind, (ins, outs) in STEP_BLOCKS.items()}
        | {"cross_kv": [list(CROSS_KV[0]), len(CROSS_KV[1])]},
        "names": {"decode": DECODE_NET, "chunk": CHUNK_NET, "cross_kv": CROSS_KV_NET},
        "mask_visible": MASK_VISIBLE,
        "mask_hidden": MASK_HIDDEN,
    }

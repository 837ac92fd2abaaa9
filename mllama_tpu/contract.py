"""The net contract: the names, roles and I/O of every net, the one interface between export,
compile and both engines (ARCHITECTURE.md, "The net contract").

Export builds exactly these nets with these input and output names, compile builds and combines
them, the ONNX engine runs them by these names, and the C++ engine is handed `engine_spec()` at
load and checks the bmodel against it. Nothing here knows a model size: layer kinds come from
the export's manifest (or the bmodel's own nets).
"""
from __future__ import annotations

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

# Per-layer nets by (kind, decode): block_i runs the prompt, block_cache_i one decode step.
BLOCKS: dict[tuple[str, bool], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("self", False): (("input_states", "position_ids", "attention_mask"),
                      ("hidden_states", "present_k", "present_v")),
    ("self", True): (("input_states", "position_ids", "attention_mask", "history_k", "history_v"),
                     ("hidden_states", "present_k", "present_v")),
    ("cross", False): (("input_states", "cross_attention_states", "text_row_mask", "attention_mask"),
                       ("hidden_states", "cross_k", "cross_v")),
    ("cross", True): (("input_states", "text_row_mask", "attention_mask", "cross_k", "cross_v"),
                      ("hidden_states",)),
}

# Tensors that only travel from one net to another on the device (compile stores them in the
# activation dtype); everything else is written or read by the host.
DEVICE_TENSORS = frozenset({"input_states", "cross_attention_states", "history_k", "history_v",
                            "cross_k", "cross_v"})
DEVICE_TENSORS_BY_NET = {"lm_head": frozenset({"hidden_states"})}  # read from a block's output


def prefill_block(i: int) -> str:
    return f"block_{i}"


def decode_block(i: int) -> str:
    return f"block_cache_{i}"


def layer_of(net: str) -> tuple[int, bool] | None:
    """(layer, decode) of a block net's name, None for a head."""
    for prefix, decode in (("block_cache_", True), ("block_", False)):
        if net.startswith(prefix) and net[len(prefix):].isdigit():
            return int(net[len(prefix):]), decode
    return None


def net_names(layers: list[str]) -> list[str]:
    """Every net of a model with these layer kinds, in export order (small, common ones first)."""
    names = ["embedding", "embedding_cache"]
    for i in range(len(layers)):
        names += [prefill_block(i), decode_block(i)]
    return names + ["lm_head", "greedy_head", "penalty_sample_head", "vit"]


def combine_order(layers: list[str]) -> list[str]:
    """Heads, then self-attention blocks, then cross-attention blocks, then the vision encoder:
    fixed, so two compiles of the same export give the same bmodel."""
    self_idx = [i for i, k in enumerate(layers) if k == "self"]
    cross_idx = [i for i, k in enumerate(layers) if k == "cross"]
    nets = ["embedding", "embedding_cache", "lm_head", "greedy_head", "penalty_sample_head"]
    for i in self_idx + cross_idx:
        nets += [prefill_block(i), decode_block(i)]
    return nets + ["vit"]


def net_io(net: str, layers: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of `net` in a model with these layer kinds."""
    if net in HEADS:
        return HEADS[net]
    where = layer_of(net)
    if where is None or where[0] >= len(layers):
        raise KeyError(f"no net {net!r} in a model of {len(layers)} layers")
    return BLOCKS[layers[where[0]], where[1]]


def engine_spec() -> dict:
    """What the C++ engine checks a bmodel against and computes its decode masks with."""
    return {
        "heads": {name: [list(ins), len(outs)] for name, (ins, outs) in HEADS.items()},
        "blocks": {f"{kind}_{'decode' if decode else 'prefill'}": [list(ins), len(outs)]
                   for (kind, decode), (ins, outs) in BLOCKS.items()},
        "mask_visible": MASK_VISIBLE,
        "mask_hidden": MASK_HIDDEN,
    }

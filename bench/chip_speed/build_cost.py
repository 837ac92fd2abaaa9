"""What the full model costs to build and to hold, from the nets built at reduced depth: the
per-layer nets before prefill in chunks (a decode step and a static SEQ block per layer) and
after (a decode step, a step net per prefill length, cross_kv), side by side.

Every per-layer net of the full model has the shapes of the reduced model's net of its kind
(self layer 0, cross layer 1), so per-net figures multiply by the layer counts. Device memory
of a combined bmodel, as `model_tool --combine` + `--info` show for our nets: coefficients
stored once per distinct blob (all step nets of a layer hold the same weights), instructions
summed over nets, runtime (activation) memory that of the largest net. The engine adds the KV
caches (bf16): SEQ slots per self layer, the image's tokens per cross layer. Compile time is
the nets' model_transform + model_deploy seconds, run one at a time; the compile stage runs
one job per core, so the build takes about the serial sum / cores.
"""
from __future__ import annotations

import os

from mllama_tpu.contract import cross_kv_block, decode_block, layer_of, step_block

from .checkpoint import ASPECT_RATIOS, Dims
from .nets import NetCost
from .report import CROSS, SELF

CARD_BYTES = 16 * 2**30  # a 16 GB BM1684X
KV_BYTES = 2  # bf16 cache
HEADS = ("lm_head", "greedy_head", "penalty_sample_head")
# The static prefill nets the chunk steps replaced (manifest format 1).
BEFORE = {"self": [decode_block(SELF), f"block_{SELF}"], "cross": [decode_block(CROSS), f"block_{CROSS}"]}


def after(lengths: tuple[int, ...]) -> dict[str, list[str]]:
    return {"self": [step_block(SELF, c) for c in (1, *lengths)],
            "cross": [step_block(CROSS, c) for c in (1, *lengths)] + [cross_kv_block(CROSS)]}


def part(c: NetCost) -> dict:
    """What build_cost reads of a net: its compile seconds and device memory."""
    return {"compile_s": round(c.compile_s["model_transform_s"] + c.compile_s["model_deploy_s"], 1)
            if c.compile_s else None, "device_memory": c.device_memory}


def _own_weights(net: str) -> bool:
    """cross_kv holds the k/v projections, which no other net has; every other net of a layer
    (decode step, step nets, the static block of before) holds that layer's one shared copy."""
    ln = layer_of(net)
    return ln is not None and ln.rows is None


def layers(nets_by_kind: dict[str, list[str]], parts: dict[str, dict], d: Dims) -> dict:
    out: dict = {"compile_serial_s": 0.0, "weight_bytes": 0, "instruct_bytes": 0, "runtime_bytes": 0}
    for kind, nets in nets_by_kind.items():
        missing = [n for n in nets if n not in parts or parts[n]["compile_s"] is None]
        if missing:
            return {"missing": missing}
        count = d.num_self if kind == "self" else d.num_cross
        mem = [parts[n]["device_memory"] for n in nets]
        shared = max(m["weight"] for n, m in zip(nets, mem) if not _own_weights(n))
        own = sum(m["weight"] for n, m in zip(nets, mem) if _own_weights(n))
        secs = sum(parts[n]["compile_s"] for n in nets)
        out[kind] = {"nets": nets, "compile_s_per_layer": round(secs, 1),
                     "weight_bytes_per_layer": shared + own,
                     "instruct_bytes_per_layer": sum(m["instruct"] for m in mem)}
        out["compile_serial_s"] += count * secs
        out["weight_bytes"] += count * (shared + own)
        out["instruct_bytes"] += count * sum(m["instruct"] for m in mem)
        out["runtime_bytes"] = max(out["runtime_bytes"], *(m["runtime"] for m in mem))
    out["compile_serial_s"] = round(out["compile_serial_s"], 1)
    cores = os.cpu_count() or 1
    out["compile_min_on_this_machine"] = round(out["compile_serial_s"] / cores / 60, 1)
    out["cores"] = cores
    return out


def kv_cache_bytes(d: Dims, seq: int) -> int:
    kv = d.num_key_value_heads * (d.hidden_size // d.num_attention_heads)
    image_tokens = d.max_num_tiles * ((d.image_size // d.patch_size) ** 2 + 1)
    return 2 * kv * KV_BYTES * (d.num_self * seq + d.num_cross * image_tokens)


def vision_weight_bytes(d: Dims) -> int:
    """The vit's stored weights (bf16) from its shapes: the layers, the projector, the patch
    conv and the positional tables (one per aspect ratio)."""
    h, f = d.vision_hidden, d.vision_intermediate
    patches = (d.image_size // d.patch_size) ** 2 + 1
    layers = (d.vision_layers + d.vision_global_layers) * (4 * h * h + 2 * h * f + f + 5 * h)
    projector = h * (len(d.intermediate_layers_indices) + 1) * d.hidden_size + d.hidden_size
    ratios = len(ASPECT_RATIOS) + 1  # id 0 is the padding row
    tables = patches * h + ratios * d.max_num_tiles * patches * h + 2 * ratios * d.max_num_tiles * h
    return 2 * (layers + projector + 3 * d.patch_size ** 2 * h + tables + h)


def table_bytes(d: Dims) -> int:
    """The embedding table (bf16, shared by embedding and embedding_cache; 8 more rows than the
    vocabulary, as the published checkpoints)."""
    return (d.vocab_size + 8) * d.hidden_size * 2


def compose(d: Dims, seq: int, lengths: tuple[int, ...], costs: dict[str, NetCost],
            earlier_before: dict[str, dict], vision_weight_bytes: int) -> dict:
    now = {n: part(c) for n, c in costs.items()}
    res = {"before": layers(BEFORE, earlier_before, d), "after": layers(after(lengths), now, d),
           "prefill_lengths": list(lengths), "seq_length": seq}
    heads = [n for n in HEADS if n in now]
    head_mem = [now[n]["device_memory"] for n in heads]
    shared = {"nets": heads,
              "weight_bytes": sum(m["weight"] for m in head_mem) + table_bytes(d) + vision_weight_bytes,
              "instruct_bytes": sum(m["instruct"] for m in head_mem),
              "runtime_bytes": max((m["runtime"] for m in head_mem), default=0),
              "compile_serial_s": round(sum(now[n]["compile_s"] or 0 for n in heads), 1),
              "not_compiled_here": ["embedding", "embedding_cache", "vit"],
              "note": "the embedding table and the vit's weights from their shapes (bf16); their "
                      "instructions, activations and compile time are not measured, and are the "
                      "same before and after"}
    res["shared_nets"] = shared
    kv = kv_cache_bytes(d, seq)
    for side in ("before", "after"):
        s = res[side]
        if "missing" in s:
            continue
        total = (s["weight_bytes"] + s["instruct_bytes"] + shared["weight_bytes"] + shared["instruct_bytes"]
                 + max(s["runtime_bytes"], shared["runtime_bytes"]) + kv)
        s["device_total_bytes"] = total
        s["device_total_of_card"] = round(total / CARD_BYTES, 3)
    res["kv_cache_bytes"] = kv
    res["card_bytes"] = CARD_BYTES
    return res


def table(res: dict) -> str:
    gb = 1e9
    lines = [f"## Building and holding the full model (seq {res['seq_length']}, prefill lengths "
             f"{','.join(map(str, res['prefill_lengths']))})", "",
             "| | before (decode + static block) | after (decode + steps + cross_kv) |", "|---|---|---|"]
    b, a = res["before"], res["after"]

    def row(label, key, fmt):
        lines.append(f"| {label} | {fmt(b.get(key))} | {fmt(a.get(key))} |")

    for kind in ("self", "cross"):
        lines.append(f"| compile s, one {kind} layer | {b.get(kind, {}).get('compile_s_per_layer', '—')} | "
                     f"{a.get(kind, {}).get('compile_s_per_layer', '—')} |")
    row("all 40 layers, serial s", "compile_serial_s", lambda x: "—" if x is None else f"{x:.0f}")
    row(f"all 40 layers on {a.get('cores', '?')} cores, min", "compile_min_on_this_machine",
        lambda x: "—" if x is None else f"{x:.0f}")
    row("layer weights GB (one copy per layer)", "weight_bytes", lambda x: "—" if x is None else f"{x / gb:.2f}")
    row("layer instructions MB", "instruct_bytes", lambda x: "—" if x is None else f"{x / 1e6:.1f}")
    row("largest layer net's activations MB", "runtime_bytes", lambda x: "—" if x is None else f"{x / 1e6:.0f}")
    row("device total GB (+ heads, table, vit weights, KV)", "device_total_bytes",
        lambda x: "—" if x is None else f"{x / gb:.2f}")
    row("of a 16 GB card", "device_total_of_card", lambda x: "—" if x is None else f"{x:.0%}")
    s = res["shared_nets"]
    lines += ["", f"Same in both: {', '.join(s['nets'])} ({s['compile_serial_s']:.0f} s to compile), the "
                  f"embedding table and the vit's weights; KV caches {res['kv_cache_bytes'] / 1e6:.0f} MB. "
                  f"Not compiled here: {', '.join(s['not_compiled_here'])} ({s['note']})."]
    return "\n".join(lines)

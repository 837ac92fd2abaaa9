"""From per-net estimates at reduced depth to full-model figures, the floor, and the table.

Extrapolation (exact for the text stack, because every text layer is its own net and all
layers of one kind have the same shapes):
  decode step  = embedding_cache + n_self x block_cache(self) + n_cross x block_cache(cross)
                 + lm_head [+ greedy_head: ours is a separate net, llm_convert fuses top-1 into
                 lm_head]; with penalty sampling, ours' penalty_sample_head instead of greedy_head
  first token  = vit + embedding + n_self x block(self) + n_cross x block(cross) + lm_head
                 [+ greedy_head], for a 4-tile image and a prompt of seq_length tokens
                 (the prefill nets are static: they always process seq_length tokens).
The vision encoder is one net; built at two depths d1 < d2 its per-layer cost is
(t2 - t1) / (layers added), and the full encoder is t1 + that x the missing layers (global
layers are counted like local ones: same shapes, two scalar gates more). With one depth only,
the vit figure is reported at its reduced depth and flagged.

Floor: the bytes a decode step must read from DDR (the weights of every decode net, from the
bmodels' coefficient sizes, but one row of the embedding table; and, second figure, also the
KV cache each layer attends over, bf16)
divided by the peak DDR bandwidth the cost model itself uses (read back from its profiles).
"""
from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import Dims, Reduced
from .nets import NetCost

SELF, CROSS = 0, 1  # text layer index of each kind in the reduced checkpoint (Reduced())


@dataclass
class SideResult:
    name: str  # "ours" | "llm_convert"
    costs: dict[str, NetCost]
    errors: dict[str, str]


def _ms(costs: dict[str, NetCost], net: str) -> float | None:
    c = costs.get(net)
    return c.ms if c is not None and c.estimated else None


def vit_full_ms(costs: dict[str, NetCost], dims: Dims, r1: Reduced, r2: Reduced | None
                ) -> tuple[float | None, str]:
    t1 = _ms(costs, "vit")
    if t1 is None:
        return None, "no vit estimate"
    full_layers = dims.vision_layers + dims.vision_global_layers
    l1 = r1.vision_layers + r1.vision_global_layers
    t2 = _ms(costs, "vit_deep")
    if r2 is None or t2 is None:
        return t1, f"vit at reduced depth ({l1} of {full_layers} layers), not extrapolated"
    l2 = r2.vision_layers + r2.vision_global_layers
    per_layer = (t2 - t1) / (l2 - l1)
    return t1 + per_layer * (full_layers - l1), (
        f"vit extrapolated: {t1:.2f} ms at {l1} layers, {per_layer:.3f} ms per layer "
        f"(from a {l2}-layer build), x {full_layers} layers")


def substitute(ours: SideResult, other: SideResult, nets: tuple[str, ...]) -> list[str]:
    """Fill nets ours did not compile with the other side's estimate; returns notes."""
    notes = []
    for net in nets:
        if net not in ours.costs and net not in ours.errors and net in other.costs:
            ours.costs[net] = other.costs[net]
            notes.append(f"{net}: not compiled by us (--big_tables off); llm_convert's "
                         f"estimate used")
    return notes


def summarize(side: SideResult, dims: Dims, r1: Reduced, r2: Reduced | None) -> dict:
    c = side.costs
    parts = {
        "embedding_cache": 1, f"block_cache_{SELF}": dims.num_self,
        f"block_cache_{CROSS}": dims.num_cross, "lm_head": 1, "greedy_head": 1,
    }
    decode, missing, notes = 0.0, [], []
    for net, n in parts.items():
        if net not in c:
            if net != "greedy_head":  # llm_convert has none (top-1 is inside its lm_head)
                missing.append(net)
            continue
        if not c[net].estimated:
            notes.append(f"{net} is a dynamic net: no estimate, counted as 0")
            continue
        decode += n * c[net].ms
    sample_ms = None  # the same step with the sampling head instead of the greedy one
    if not missing and all(h in c and c[h].estimated for h in ("greedy_head", "penalty_sample_head")):
        sample_ms = round(decode - c["greedy_head"].ms + c["penalty_sample_head"].ms, 3)
    prefill_parts = {"embedding": 1, f"block_{SELF}": dims.num_self,
                     f"block_{CROSS}": dims.num_cross, "lm_head": 1, "greedy_head": 1}
    prefill, pmissing = 0.0, []
    for net, n in prefill_parts.items():
        if net not in c:
            if net != "greedy_head":
                pmissing.append(net)
            continue
        if c[net].estimated:
            prefill += n * c[net].ms
    text_prefill = None if pmissing else round(prefill, 3)
    vit, vit_note = vit_full_ms(c, dims, r1, r2)
    if vit is None:
        pmissing.append("vit")
    else:
        prefill += vit
    return {
        "decode_ms": None if missing else round(decode, 3),
        "decode_missing": missing,
        "decode_sample_ms": sample_ms,
        "prefill_ms": None if pmissing else round(prefill, 3),
        "prefill_missing": pmissing,
        "prefill_text_ms": text_prefill,  # the same without the vit
        "vit_ms": None if vit is None else round(vit, 3),
        "vit_note": vit_note,
        "notes": notes,
        "nets": {k: v.to_json() for k, v in c.items()},
        "errors": side.errors,
    }


def floor(ours: SideResult, dims: Dims, seq: int) -> dict:
    """Bytes per decode step over the cost model's peak DDR bandwidth."""
    c = ours.costs
    counts = {"embedding_cache": 1, f"block_cache_{SELF}": dims.num_self,
              f"block_cache_{CROSS}": dims.num_cross, "lm_head": 1, "greedy_head": 1}
    if any(n not in c for n in list(counts)[:4]):
        return {"note": "decode nets of ours missing: no floor"}
    # embedding_cache holds the whole table but a step gathers one row of it.
    row = dims.hidden_size * 2
    wbytes = sum(n * (row if k == "embedding_cache" else c[k].weight_bytes)
                 for k, n in counts.items() if k in c)
    kv_heads, head_dim = dims.num_key_value_heads, dims.hidden_size // dims.num_attention_heads
    patches = (dims.image_size // dims.patch_size) ** 2 + 1
    bf16 = 2
    kv_self = 2 * seq * kv_heads * head_dim * bf16  # history K and V
    kv_cross = 2 * dims.max_num_tiles * patches * kv_heads * head_dim * bf16
    kv_bytes = dims.num_self * kv_self + dims.num_cross * kv_cross
    peaks = sorted({round(v.profile.peak_ddr_gbps, 2) for v in c.values()
                    if v.estimated and v.profile.ddr_bw_usage > 0})
    peak = max(peaks) if peaks else 0.0
    res = {"weight_bytes": wbytes, "kv_bytes": kv_bytes, "peak_ddr_gbps": peak,
           "peak_source": "read back from the compiler profiles' 'DDR BW USAGE' line "
                          "(GDMA bytes / time / usage); values seen: " + ", ".join(map(str, peaks))}
    if peak:
        res["weights_ms"] = round(wbytes / (peak * 1e9) * 1e3, 3)
        res["weights_kv_ms"] = round((wbytes + kv_bytes) / (peak * 1e9) * 1e3, 3)
    return res


def build(dims: Dims, seq: int, sides: list[SideResult], r1: Reduced, r2: Reduced | None,
          substituted: tuple[str, ...] = ()) -> dict:
    by_name = {s.name: s for s in sides}
    sub_notes = []
    if substituted and "ours" in by_name and "llm_convert" in by_name:
        sub_notes = substitute(by_name["ours"], by_name["llm_convert"], substituted)
    out = {"model": dims.name, "seq_length": seq, "quantize": "W4BF16 group 64",
           "chip": "bm1684x", "layers": {"self": dims.num_self, "cross": dims.num_cross},
           "extrapolation": __doc__.split("Extrapolation", 1)[1].split("Floor:")[0].strip(),
           "sides": {s.name: summarize(s, dims, r1, r2) for s in sides}}
    if sub_notes:
        out["sides"]["ours"]["notes"] = sub_notes + out["sides"]["ours"]["notes"]
    ours = next((s for s in sides if s.name == "ours"), None)
    if ours is not None:
        out["floor"] = floor(ours, dims, seq)
    so, sl = out["sides"].get("ours"), out["sides"].get("llm_convert")
    ratios = {}
    if so and sl:
        for k in ("decode_ms", "prefill_ms", "prefill_text_ms", "vit_ms"):
            if so[k] and sl[k]:
                ratios[k.replace("_ms", "")] = round(so[k] / sl[k], 3)
    out["ratios_ours_over_llm_convert"] = ratios
    fl = out.get("floor", {})
    if so and so["decode_ms"] and fl.get("weights_ms"):
        out["ours_decode_over_floor"] = round(so["decode_ms"] / fl["weights_ms"], 3)
    if sl and sl["decode_ms"] and fl.get("weights_ms"):
        out["llm_convert_decode_over_floor"] = round(sl["decode_ms"] / fl["weights_ms"], 3)
    return out


def _f(x, unit="") -> str:
    return "—" if x is None else f"{x:.2f}{unit}"


def table(res: dict) -> str:
    """The one table docs/benchmarks.md shows: full-model figures, per-net figures, ratios, floor."""
    so = res["sides"].get("ours", {})
    sl = res["sides"].get("llm_convert", {})
    r = res.get("ratios_ours_over_llm_convert", {})
    lines = [f"## {res['model']} · seq {res['seq_length']} · {res['quantize']} · {res['chip']}",
             "", "| figure (full model) | ours | llm_convert | ours / llm_convert |",
             "|---|---|---|---|"]
    for key, label in (("decode_ms", "decode ms / token (greedy head)"),
                       ("decode_sample_ms", "decode ms / token (penalty sampling head)"),
                       ("prefill_ms", "first token ms (4 tiles, full prompt)"),
                       ("prefill_text_ms", "  of which embedding + blocks + lm_head"),
                       ("vit_ms", "  of which vit")):
        lines.append(f"| {label} | {_f(so.get(key))} | {_f(sl.get(key))} | "
                     f"{_f(r.get(key.replace('_ms', '')))} |")
    fl = res.get("floor", {})
    if fl.get("weights_ms"):
        lines.append(f"| decode floor: weights {fl['weight_bytes'] / 1e9:.2f} GB / "
                     f"{fl['peak_ddr_gbps']} GB/s | {fl['weights_ms']:.2f} | | |")
        lines.append(f"| decode floor incl. KV ({fl['kv_bytes'] / 1e6:.0f} MB) | "
                     f"{fl['weights_kv_ms']:.2f} | | |")
        lines.append(f"| decode / floor (weights) | {_f(res.get('ours_decode_over_floor'), 'x')} | "
                     f"{_f(res.get('llm_convert_decode_over_floor'), 'x')} | |")
    lines += ["", "| net (one layer) | ours ms | llm_convert ms | ratio | ours weight MB |",
              "|---|---|---|---|---|"]
    names = list(dict.fromkeys(list(so.get("nets", {})) + list(sl.get("nets", {}))))
    for n in names:
        a = so.get("nets", {}).get(n, {}).get("ms")
        b = sl.get("nets", {}).get(n, {}).get("ms")
        w = so.get("nets", {}).get(n, {}).get("weight_bytes")
        ratio = f"{a / b:.2f}" if a and b else "—"
        lines.append(f"| {n} | {_f(a)} | {_f(b)} | {ratio} | "
                     f"{'—' if w is None else f'{w / 1e6:.1f}'} |")
    for side in ("ours", "llm_convert"):
        s = res["sides"].get(side, {})
        for note in [s.get("vit_note")] + s.get("notes", []):
            if note:
                lines.append(f"\n- {side}: {note}")
        for net, err in s.get("errors", {}).items():
            lines.append(f"\n- {side}: {net} failed: {err}")
    return "\n".join(lines)

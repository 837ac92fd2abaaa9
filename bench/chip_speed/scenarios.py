"""First-token latency of realistic chat inputs (issue 13's S1-S5), composed from per-net
cost-model estimates, each beside its floor and llm_convert's static figure.

A scenario is a prompt of `new` tokens after `cached` ones already in the KV cache, with or
without an image that is new to the cache. Our engine runs, in this order:
  vit + n_cross x cross_kv          when the image is new (cross K/V are kept for follow-ups)
  per chunk of mllama_tpu.inputs.plan_chunks (the engine's own plan over the prefill lengths):
    embedding + n_self x self step(C) + n_cross x cross step(C)   (cross layers only with an image)
  lm_head + greedy_head             for the last token
The vision encoder always runs at max_num_tiles: Mllama's vision attention lets real patches
read the padding tiles, so a smaller encoder would change the answers (ARCHITECTURE.md,
"Prefill in chunks").

llm_convert's converter is static (so were our nets before): an image new to it pays its vit
(4 tiles) and a SEQ-token prefill, anything else a SEQ-token prefill (static_ms). Its figures
come from bench/README's runs (EARLIER), as do our vit and the embedding gathers when this run
did not build them.

Floor: the scenario's own work at the issue's peaks, max(weight bytes / 68.72 GB/s,
FLOPs / 16 TFLOPS bf16). Weights are read once (int4 group 64 text layers, bf16 vit, W8
lm_head); FLOPs are 2 x params per token through every matmul plus attention's two products,
counting only real tokens (causal context), and the vit at max_num_tiles for the reason above.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mllama_tpu.contract import cross_kv_block, decode_block, step_block
from mllama_tpu.inputs import plan_chunks

from .checkpoint import Dims
from .nets import NetCost
from .report import CROSS, SELF

EARLIER = Path(__file__).resolve().parents[1] / "results" / "chip_speed_11b_earlier.json"
DDR_GBPS = 68.72
BF16_TFLOPS = 16.0
BYTES_PER_PARAM = {"w4g64": 0.5 + 2 / 64, "w8": 1.0, "bf16": 2.0}
# Llama 3.2's chat format around one user turn: begin_of_text, the user and assistant headers
# (start_header, role, end_header, "\n\n" each) and eot_id; the image adds <|image|>.
TEMPLATE_TOKENS = 11


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    new: int  # prompt tokens to prefill
    cached: int = 0  # tokens already in the KV cache (a follow-up with the same image)
    image: bool = True  # the prompt has an image (cross layers run)
    new_image: bool = True  # ... not yet in the cache (vit + cross_kv run)
    seq: int = 512
    goal_ms: float | None = None
    goal: str = ""


def scenarios(seq: int = 512, long_seq: int = 2048) -> tuple[Scenario, ...]:
    question = 30 + TEMPLATE_TOKENS
    return (
        Scenario("S1", "1-tile image, 30-token question", question, seq=seq, goal_ms=600, goal="<= 600 ms"),
        Scenario("S2", "4-tile image, 30-token question", question, seq=seq, goal_ms=2300, goal="<= 2300 ms"),
        Scenario("S3", f"4-tile image, {seq}-token prompt", seq, seq=seq, goal="no slower than before"),
        Scenario("S4", "follow-up: 30 new tokens after 400 cached, same image", 30, cached=400,
                 new_image=False, seq=seq, goal_ms=200, goal="<= 200 ms"),
        Scenario("S5", "text only, 30 tokens", 30, image=False, new_image=False, seq=seq,
                 goal_ms=200, goal="<= 200 ms"),
        Scenario(f"S1_seq{long_seq}", f"S1 at seq {long_seq}", question, seq=long_seq,
                 goal="within 10 % of S1"),
    )


VIT = "vit_full"  # the whole 40-layer encoder, extrapolated from two reduced depths


def launches(sc: Scenario, d: Dims, lengths: tuple[int, ...]) -> list[tuple[str, int]]:
    """(net at reduced depth, launches in the full model) of a scenario, in the engine's order."""
    out = [(VIT, 1), (cross_kv_block(CROSS), d.num_cross)] if sc.new_image else []
    for _, _, size in plan_chunks(sc.cached + sc.new, sc.cached, lengths):
        out += [("embedding", 1), (step_block(SELF, size), d.num_self)]
        if sc.image:
            out.append((step_block(CROSS, size), d.num_cross))
    return out + [("lm_head", 1), ("greedy_head", 1)]


def nets_needed(sc: Scenario, d: Dims, lengths: tuple[int, ...]) -> list[str]:
    """The nets a run builds for a scenario (the vit is its own stage)."""
    return list(dict.fromkeys(net for net, _ in launches(sc, d, lengths) if net != VIT))


def load_earlier(path: Path = EARLIER) -> dict:
    return json.loads(path.read_text())


def _part(costs: dict[str, NetCost], earlier: dict, net: str) -> tuple[float, str]:
    """(ms, where from) of one net: this run's estimate, else the earlier runs' record."""
    c = costs.get(net)
    if c is not None and c.estimated:
        return c.ms, "this run"
    rec = earlier["ours"].get(net)
    if rec is None:
        raise KeyError(net)
    return rec["ms"], rec["source"]


def ours_ms(sc: Scenario, dims: Dims, lengths: tuple[int, ...], costs: dict[str, NetCost],
            earlier: dict, vit_ms: float | None) -> dict:
    sources: dict[str, str] = {}
    total = 0.0
    for net, n in launches(sc, dims, lengths):
        if net == VIT and vit_ms is not None:
            ms, sources[net] = vit_ms, "this run"
        else:
            ms, sources[net] = _part(costs, earlier, net)
        total += n * ms
    chunks = [size for _, _, size in plan_chunks(sc.cached + sc.new, sc.cached, lengths)]
    return {"ms": round(total, 1), "chunks": chunks, "sources": sources}


def decode_ms(dims: Dims, costs: dict[str, NetCost], earlier: dict) -> float:
    parts = {"embedding_cache": 1, decode_block(SELF): dims.num_self,
             decode_block(CROSS): dims.num_cross, "lm_head": 1, "greedy_head": 1}
    return round(sum(n * _part(costs, earlier, net)[0] for net, n in parts.items()), 1)


def _vision_work(d: Dims) -> tuple[float, float]:
    """(weight bytes, FLOPs) of the vision encoder and projector at max_num_tiles."""
    h, f = d.vision_hidden, d.vision_intermediate
    patches = (d.image_size // d.patch_size) ** 2 + 1
    tokens = d.max_num_tiles * (-(-patches // 8) * 8)  # patches padded to a multiple of 8
    layer = 4 * h * h + 2 * h * f
    layers = d.vision_layers + d.vision_global_layers
    proj = h * (len(d.intermediate_layers_indices) + 1) * d.hidden_size
    flops = layers * (2 * layer * tokens + 4 * tokens * tokens * h) + 2 * proj * d.max_num_tiles * patches
    return (layers * layer + proj) * BYTES_PER_PARAM["bf16"], flops


def floor_ms(sc: Scenario, d: Dims) -> dict:
    hd = d.hidden_size // d.num_attention_heads
    kv = d.num_key_value_heads * hd
    mlp = 3 * d.hidden_size * d.intermediate_size
    self_params = 2 * d.hidden_size * d.hidden_size + 2 * d.hidden_size * kv + mlp
    cross_params = 2 * d.hidden_size * d.hidden_size + mlp
    cross_kv_params = 2 * d.hidden_size * kv
    image_tokens = d.max_num_tiles * ((d.image_size // d.patch_size) ** 2 + 1)
    w4 = BYTES_PER_PARAM["w4g64"]
    n = sc.new
    # Causal context: token i of the new ones attends cached + i + 1 keys.
    ctx = n * sc.cached + n * (n + 1) // 2
    weights = d.num_self * self_params * w4 + d.vocab_size * d.hidden_size * BYTES_PER_PARAM["w8"]
    flops = d.num_self * (2 * self_params * n + 4 * ctx * d.hidden_size) + 2 * d.vocab_size * d.hidden_size
    if sc.image:
        weights += d.num_cross * cross_params * w4
        flops += d.num_cross * (2 * cross_params * n + 4 * n * image_tokens * d.hidden_size)
    if sc.new_image:
        vw, vf = _vision_work(d)
        weights += vw + d.num_cross * cross_kv_params * w4
        flops += vf + d.num_cross * 2 * cross_kv_params * image_tokens
    bw_ms = weights / (DDR_GBPS * 1e9) * 1e3
    compute_ms = flops / (BF16_TFLOPS * 1e12) * 1e3
    return {"ms": round(max(bw_ms, compute_ms), 1), "weights_ms": round(bw_ms, 1),
            "compute_ms": round(compute_ms, 1), "weight_bytes": int(weights), "flops": int(flops)}


def static_ms(sc: Scenario, record: dict, seq: int) -> float | None:
    """A static converter's first token (llm_convert's, or ours before chunked prefill): a new
    image pays vit + a SEQ-token prefill; a follow-up with the image kept, or a text prompt,
    a SEQ-token prefill. Measured at seq 512 only."""
    if sc.seq != seq:
        return None
    return record["first_token_ms"]["ms"] if sc.new_image else record["prefill_text_ms"]["ms"]


def compose(dims: Dims, lengths: tuple[int, ...], costs_by_seq: dict[int, dict[str, NetCost]],
            seq: int, vit_ms: float | None, earlier: dict) -> dict:
    out: dict = {"model": dims.name, "quantize": "W4BF16 group 64, W8 lm_head", "chip": "bm1684x",
                 "prefill_lengths": list(lengths), "template_tokens": TEMPLATE_TOKENS,
                 "floor_peaks": {"ddr_gbps": DDR_GBPS, "bf16_tflops": BF16_TFLOPS},
                 "scenarios": {}, "earlier_sources": earlier["sources"]}
    for sc in scenarios(seq):
        costs = costs_by_seq.get(sc.seq, {})
        try:
            ours = ours_ms(sc, dims, lengths, costs, earlier, vit_ms)
        except KeyError as e:
            ours = {"ms": None, "missing": str(e)}
        fl = floor_ms(sc, dims)
        out["scenarios"][sc.key] = {
            "label": sc.label, "seq_length": sc.seq, "prompt_tokens": sc.new,
            "cached_tokens": sc.cached, "goal": sc.goal,
            "ours_ms": ours["ms"], "llm_convert_ms": static_ms(sc, earlier["llm_convert"], seq),
            "floor_ms": fl["ms"], "ours_before_ms": static_ms(sc, earlier["ours_before"], seq),
            "chunks": ours.get("chunks"), "parts_from": ours.get("sources"), "floor": fl}
    s = out["scenarios"]
    long_key = next(k for k in s if k.startswith("S1_seq"))
    if s["S1"]["ours_ms"] and s[long_key]["ours_ms"]:
        s[long_key]["over_S1"] = round(s[long_key]["ours_ms"] / s["S1"]["ours_ms"], 3)
    try:
        ours_decode = decode_ms(dims, costs_by_seq.get(seq, {}), earlier)
    except KeyError:
        ours_decode = None
    out["decode"] = {"ours_ms_per_token": ours_decode,
                     "llm_convert_ms_per_token": earlier["llm_convert"]["decode_ms_per_token"]["ms"],
                     "head_counted": True}
    return out


def _f(x) -> str:
    return "—" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def table(res: dict) -> str:
    lines = [f"## First token, {res['model']} dims, {res['quantize']}, prefill lengths "
             f"{','.join(map(str, res['prefill_lengths']))}", "",
             "| scenario | ours ms | chunks | before (static nets) ms | llm_convert ms | floor ms | goal |",
             "|---|---|---|---|---|---|---|"]
    for key, s in res["scenarios"].items():
        lines.append(f"| {key}: {s['label']} | {_f(s['ours_ms'])} | {s['chunks'] or '—'} | "
                     f"{_f(s['ours_before_ms'])} | {_f(s['llm_convert_ms'])} | {_f(s['floor_ms'])} | "
                     f"{s['goal']} |")
    d = res["decode"]
    lines += ["", f"decode ms / token (greedy head counted): ours {_f(d['ours_ms_per_token'])}, "
                  f"llm_convert {_f(d['llm_convert_ms_per_token'])}"]
    return "\n".join(lines)

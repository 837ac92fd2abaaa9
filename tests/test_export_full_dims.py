"""Real Llama-3.2-Vision dims (random bf16 weights, reduced depth): every net's I/O matches the contract.

11B: hidden 4096, 32 heads, 8 KV heads, head dim 128, tiles 4 x 560 px, patch 14 -> 1601 patches;
one self + one cross text layer, one local + one global vision layer (the vision output keeps
its 7680 width by picking the single local layer 5 times as "intermediate").
90B: hidden 8192, 64 heads, 8 KV heads, MLP 28672, one layer of each kind (its blocks are
> 2 GB, so they also exercise the external-data path).
The vocabulary is shrunk to 4096 to keep CI time and disk down (the memory benchmark,
bench/export_memory.py, keeps the full 128256).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mllama_tpu.export import export_model
from mllama_tpu.export.onnx_io import describe
from mllama_tpu.export.random_checkpoint import full_config, write_random_checkpoint

pytestmark = pytest.mark.slow

SEQ = 32  # shapes scale with it; a short one keeps the traced forward (and CI) quick
CHUNK = 32  # the default prefill lengths cut to SEQ
VOCAB = 4096
T, S, P, KV, D = 4, 560, 1601, 8, 128


def contract(h: int, kinds: list[str], vocab: int, seq: int = SEQ) -> dict[str, tuple[list, list]]:
    """net -> (inputs, outputs) as (name, shape, dtype) lists, from the agreed net contract."""
    f, i = "float32", "int32"
    nets = {
        "vit": ([("pixel_values", [T, 3, S, S], f), ("aspect_ratio_ids", [1, 1], i), ("aspect_ratio_mask", [1, T], i)],
                [("cross_attention_states", [T, P, h], f)]),
        "embedding": ([("input_ids", [1, CHUNK], i)], [("hidden_states", [1, CHUNK, h], f)]),
        "embedding_cache": ([("input_ids", [1, 1], i)], [("hidden_states", [1, 1, h], f)]),
        "lm_head": ([("hidden_states", [1, h], f)], [("logits", [1, vocab], f)]),
        "greedy_head": ([("logits", [1, vocab], f)], [("token", [1], i)]),
        "penalty_sample_head": (
            [("logits", [1, vocab], f), ("recent_ids", [1, 64], i), ("top_p", [1], f), ("temperature", [1], f),
             ("repeat_penalty", [1], f)],
            [("probs", [1, 50], f), ("tokens", [1, 50], i)]),
    }
    for n, kind in enumerate(kinds):
        for rows in (1, CHUNK):  # decode, and the one prefill chunk the defaults leave at this SEQ
            name = f"block_cache_{n}" if rows == 1 else f"block_chunk{rows}_{n}"
            if kind == "self":
                nets[name] = (
                    [("input_states", [1, rows, h], f), ("position_ids", [1, rows], i),
                     ("attention_mask", [1, 1, rows, seq + rows], f), ("history_k", [1, seq, KV, D], f),
                     ("history_v", [1, seq, KV, D], f)],
                    [("hidden_states", [1, rows, h], f), ("present_k", [1, rows, KV, D], f),
                     ("present_v", [1, rows, KV, D], f)])
            else:
                nets[name] = (
                    [("input_states", [1, rows, h], f), ("text_row_mask", [1, rows, 1], f),
                     ("attention_mask", [1, 1, rows, T * P], f), ("cross_k", [1, KV, T * P, D], f),
                     ("cross_v", [1, KV, T * P, D], f)],
                    [("hidden_states", [1, rows, h], f)])
        if kind == "cross":
            nets[f"cross_kv_{n}"] = ([("cross_attention_states", [T, P, h], f)],
                                     [("cross_k", [1, KV, T * P, D], f), ("cross_v", [1, KV, T * P, D], f)])
    return nets


def as_triples(entries: list[dict]) -> list[tuple]:
    return [(e["name"], e["shape"], e["dtype"]) for e in entries]


def export_and_check(tmp_path: Path, kind: str, h: int, names: list[str]) -> dict:
    """Export `names` one piece at a time, check each against the contract, then delete it.

    Together 90B's pieces are ~14 GB of f32 (CI's disk once had 12 GB free); one at a time the
    peak is the checkpoint plus the largest piece.
    """
    cfg = full_config(kind, text_layers=2, cross_layers=[1], vision_layers=1, global_layers=1, vocab_size=VOCAB)
    cfg["image_token_index"] = VOCAB
    model = write_random_checkpoint(tmp_path / "model", cfg, dtype=torch.bfloat16)
    out = tmp_path / "onnx"
    try:
        for name in names:
            manifest = json.loads(export_model(model, out, SEQ, only=[name], progress=False).read_text())
            check_piece(out, manifest, h, name)
            entry = manifest["pieces"][name]
            for f in [entry["file"]] + ([entry["external_data"]["file"]] if "external_data" in entry else []):
                (out / f).unlink()
    finally:  # GBs: do not leave them to pytest's tmp retention
        shutil.rmtree(model)
        shutil.rmtree(out, ignore_errors=True)
    assert manifest["layers"] == ["self", "cross"]
    assert sorted(manifest["pieces"]) == sorted(names)
    return manifest


def check_piece(out: Path, manifest: dict, h: int, name: str) -> None:
    entry = manifest["pieces"][name]
    want_in, want_out = contract(h, ["self", "cross"], VOCAB)[name]
    assert as_triples(entry["inputs"]) == want_in, name
    assert as_triples(entry["outputs"]) == want_out, name
    on_disk = describe(out / entry["file"])  # the file itself, not just what the manifest says
    assert on_disk == {"inputs": entry["inputs"], "outputs": entry["outputs"]}, name
    assert (out / entry["file"]).stat().st_size == entry["size"]
    if "external_data" in entry:
        assert (out / entry["external_data"]["file"]).stat().st_size == entry["external_data"]["size"]


def test_11b_dims(tmp_path):
    manifest = export_and_check(tmp_path, "11b", 4096, list(contract(4096, ["self", "cross"], VOCAB)))
    d = manifest["dims"]
    assert (d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]) == (4096, 32, 8, 128)
    assert (d["num_patches"], d["max_num_tiles"], d["tile_size"], d["vision_output_dim"]) == (P, T, S, 7680)
    assert manifest["sampling"] == {"top_k": 50, "recent_ids": 64}


def test_90b_dims(tmp_path):
    names = [n for n in contract(8192, ["self", "cross"], VOCAB) if n != "vit"]  # vit: same encoder as 11B
    manifest = export_and_check(tmp_path, "90b", 8192, names)
    d = manifest["dims"]
    assert (d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"], d["intermediate_size"]) == \
        (8192, 64, 8, 28672)
    for name in ("block_chunk32_0", "block_chunk32_1"):  # 3.4 GB of f32 weights each: the external-data path
        assert manifest["pieces"][name]["external_data"]["size"] > 2 << 30

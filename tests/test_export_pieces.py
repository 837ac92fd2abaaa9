"""Every exported net (run by onnxruntime) against the same computation in transformers.

Weights: random, in the bundled tiny model's config, with every gate nonzero (an untrained
or zero-gated model would hide the cross-attention and gated vision paths). f32, max abs
error < 1e-4.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import MllamaForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)
from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

from mllama_tpu.contract import MASK_HIDDEN, cross_kv_block, step_block
from mllama_tpu.inputs import prefill_inputs
from mllama_tpu.export import export_model
from mllama_tpu.export.random_checkpoint import tiny_config, write_random_checkpoint

SEQ = 24
CHUNKS = (8, 16)
TOL = 1e-4
NEG = MASK_HIDDEN


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """(export dir, manifest, transformers model) for random weights in the tiny model's config."""
    cfg_path = tiny_model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else tiny_config()
    root = tmp_path_factory.mktemp("export-pieces")
    model_dir = write_random_checkpoint(root / "model", cfg, seed=1, shard_bytes=200_000)
    out = root / "onnx"
    manifest = json.loads(export_model(model_dir, out, SEQ, progress=False, prefill_lengths=CHUNKS).read_text())
    model = MllamaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    return out, manifest, model


def run(out: Path, net: str, **inputs: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(out / "pieces" / f"{net}.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def close(ours: np.ndarray, ref: torch.Tensor) -> None:
    ref_np = ref.detach().float().numpy()
    assert ours.shape == ref_np.shape
    err = float(np.abs(ours - ref_np).max())
    assert err < TOL, f"max abs error {err}"


def f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def to_kv_layout(t: torch.Tensor) -> torch.Tensor:
    """transformers' cache [1,KV,S,D] -> our [1,S,KV,D]."""
    return t.transpose(1, 2)


def layer_index(manifest: dict, kind: str) -> int:
    return manifest["layers"].index(kind)


def causal_mask(seq: int, real: int) -> torch.Tensor:
    """Additive [1,1,seq,seq]: causal over the first `real` tokens, padding keys hidden."""
    i = torch.arange(seq)
    visible = (i[None, :] <= i[:, None]) & (i[None, :] < real)
    return torch.where(visible, 0.0, NEG).view(1, 1, seq, seq)


@torch.no_grad()
@pytest.mark.parametrize("ratio,tiles", [((1, 1), 1), ((2, 2), 4)])
def test_vit(tiny, ratio, tiles):
    out, manifest, model = tiny
    d = manifest["dims"]
    t, s = d["max_num_tiles"], d["tile_size"]
    gen = torch.Generator().manual_seed(0)
    pixels = torch.zeros(1, 1, t, 3, s, s)
    pixels[0, 0, :tiles] = torch.randn(tiles, 3, s, s, generator=gen)
    ar_id = d["supported_aspect_ratios"].index(list(ratio)) + 1
    ar_ids = torch.tensor([[ar_id]])
    ar_mask = torch.zeros(1, 1, t, dtype=torch.long)
    ar_mask[..., :tiles] = 1
    vision = model.model.vision_model(pixel_values=pixels, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask)
    states = vision.last_hidden_state
    ref = model.model.multi_modal_projector(states).reshape(-1, states.shape[-2], d["hidden_size"])
    (ours,) = run(out, "vit", pixel_values=f32(pixels[0, 0]), aspect_ratio_ids=ar_ids.numpy().astype(np.int32),
                  aspect_ratio_mask=ar_mask[0].numpy().astype(np.int32))
    close(ours, ref)


@torch.no_grad()
def test_embedding(tiny):
    out, manifest, model = tiny
    ids = torch.randint(0, manifest["dims"]["vocab_size"], (1, max(CHUNKS)))  # the largest chunk's ids
    ids[0, 3] = manifest["image_token_id"]  # the image token lives past the text vocab
    table = model.model.language_model.embed_tokens
    (ours,) = run(out, "embedding", input_ids=ids.numpy().astype(np.int32))
    close(ours, table(ids))
    (ours,) = run(out, "embedding_cache", input_ids=ids[:, 3:4].numpy().astype(np.int32))
    close(ours, table(ids[:, 3:4]))


@torch.no_grad()
@pytest.mark.parametrize("filled,rows,size", [(0, 5, 8), (0, 16, 16), (7, 6, 8), (11, 1, 1), (SEQ - 1, 1, 1)])
def test_self_block_runs_a_chunk_against_the_cache(tiny, filled, rows, size):
    """`rows` new tokens (a chunk padded to its net's length, or a decode step) after `filled`
    cached ones: the hidden states and the new K/V transformers gives the same tokens."""
    out, manifest, model = tiny
    i = layer_index(manifest, "self")
    lm = model.model.language_model
    layer, h = lm.layers[i], manifest["dims"]["hidden_size"]
    x = torch.randn(1, filled + rows, h)
    pos = torch.arange(filled + rows).view(1, -1)
    cache = DynamicCache(config=lm.config)
    if filled:
        layer(x[:, :filled], attention_mask=causal_mask(filled, filled), position_ids=pos[:, :filled],
              past_key_values=cache, use_cache=True, position_embeddings=lm.rotary_emb(x, pos[:, :filled]))
    k_cached = to_kv_layout(cache.layers[i].keys).numpy() if filled else None
    v_cached = to_kv_layout(cache.layers[i].values).numpy() if filled else None
    new_pos = pos[:, filled:]
    mask = torch.zeros(1, 1, rows, filled + rows)
    mask[0, 0, :, filled:] = causal_mask(rows, rows)[0, 0]
    ref = layer(x[:, filled:], attention_mask=mask, position_ids=new_pos, past_key_values=cache, use_cache=True,
                position_embeddings=lm.rotary_emb(x, new_pos))

    kv, d = manifest["dims"]["num_key_value_heads"], manifest["dims"]["head_dim"]
    hist_k, hist_v = np.random.randn(2, 1, SEQ, kv, d).astype(np.float32)  # junk beyond `filled`
    if filled:
        hist_k[:, :filled], hist_v[:, :filled] = k_cached, v_cached
    chunk = prefill_inputs(np.zeros(filled + rows, np.int64), SEQ, 0).chunk(filled, rows, size)
    states = np.random.randn(1, size, h).astype(np.float32)  # pad rows: anything
    states[:, :rows] = f32(x[:, filled:])
    hidden, nk, nv = run(out, step_block(i, size), input_states=states, position_ids=chunk.position_ids,
                         attention_mask=chunk.attention_mask, history_k=hist_k, history_v=hist_v)
    close(hidden[:, :rows], ref)
    close(nk[:, :rows], to_kv_layout(cache.layers[i].keys)[:, filled:])
    close(nv[:, :rows], to_kv_layout(cache.layers[i].values)[:, filled:])


def cross_inputs(manifest: dict, tiles_seen: torch.Tensor):
    """transformers' cross masks and ours from a per-token tile mask [SEQ, T] (0/1)."""
    d = manifest["dims"]
    tmask = tiles_seen.view(1, -1, 1, d["max_num_tiles"])
    ref_mask, row = _prepare_cross_attention_mask(tmask, num_vision_tokens=d["num_patches"], dtype=torch.float32)
    per_patch = tiles_seen.repeat_interleave(d["num_patches"], dim=1)  # [S, T*P]
    keep = tiles_seen.amax(dim=1, keepdim=True).float()  # rows that see some tile
    ours = torch.where(per_patch.bool(), 0.0, NEG) * keep  # fully hidden rows: all zero, as transformers
    return ref_mask, row, f32(ours.view(1, 1, *ours.shape)), f32(keep.view(1, -1, 1))


@torch.no_grad()
def test_cross_kv_and_cross_block_steps(tiny):
    """cross_kv_i gives transformers' cross K/V of an image; the step nets, a chunk of rows or one
    decode row, give its hidden states for those rows (seeing tiles, or none)."""
    out, manifest, model = tiny
    d = manifest["dims"]
    i = layer_index(manifest, "cross")
    lm = model.model.language_model
    layer, h, t, p = lm.layers[i], d["hidden_size"], d["max_num_tiles"], d["num_patches"]
    x = torch.randn(1, SEQ, h)
    states = torch.randn(t, p, h)
    seen = torch.zeros(SEQ, t, dtype=torch.long)
    seen[4:, :2] = 1  # tokens before the image see nothing (rows zeroed); 2 real tiles
    seen[10:12] = 0  # and a hole in the middle
    ref_mask, row, our_mask, our_row = cross_inputs(manifest, seen)
    cache = DynamicCache(config=lm.config)
    ref = layer(x, cross_attention_states=states, cross_attention_mask=ref_mask, attention_mask=None,
                full_text_row_masked_out_mask=row, past_key_values=cache, use_cache=True)
    ck, cv = run(out, cross_kv_block(i), cross_attention_states=f32(states))
    close(ck, cache.layers[i].keys)  # cross K/V are head-major, as transformers keeps them
    close(cv, cache.layers[i].values)
    assert our_row[0, :4, 0].sum() == 0 and our_row[0, 10:12, 0].sum() == 0
    for lo, size in [(0, 16), (8, 16), (3, 8), (SEQ - 1, 1), (2, 1), (10, 1)]:
        n = min(size, SEQ - lo)
        rows_in = np.zeros((1, size, h), np.float32)  # pad rows: zeros, all-visible, no MLP
        mask_in = np.zeros((1, 1, size, t * p), np.float32)
        row_in = np.zeros((1, size, 1), np.float32)
        rows_in[:, :n], mask_in[:, :, :n], row_in[:, :n] = f32(x[:, lo:lo + n]), our_mask[:, :, lo:lo + n], our_row[:, lo:lo + n]
        (hidden,) = run(out, step_block(i, size), input_states=rows_in, text_row_mask=row_in, attention_mask=mask_in,
                        cross_k=ck, cross_v=cv)
        close(hidden[:, :n], ref[:, lo:lo + n])


def test_cross_step_of_many_rows_takes_the_fused_form_with_the_same_result(tiny, tmp_path, monkeypatch):
    """From FUSED_CROSS_ROWS rows on a cross step repeats K/V per query head (the form TPU-MLIR
    fuses); exported that way, the 16-row step gives what the grouped form gives (checked against
    transformers above) for rows that see tiles, rows that see none and pad rows."""
    from mllama_tpu.export import text

    out, manifest, _ = tiny
    d = manifest["dims"]
    i = layer_index(manifest, "cross")
    h, t, p, size = d["hidden_size"], d["max_num_tiles"], d["num_patches"], 16
    assert size < text.FUSED_CROSS_ROWS  # the module's export took the grouped form
    monkeypatch.setattr(text, "FUSED_CROSS_ROWS", 8)
    fused = tmp_path / "fused"
    export_model(out.parent / "model", fused, SEQ, only=[step_block(i, size)], progress=False, prefill_lengths=CHUNKS)
    rng = np.random.default_rng(3)
    cross = {"cross_k": rng.standard_normal((1, d["num_key_value_heads"], t * p, d["head_dim"])).astype(np.float32),
             "cross_v": rng.standard_normal((1, d["num_key_value_heads"], t * p, d["head_dim"])).astype(np.float32)}
    mask = np.full((1, 1, size, t * p), NEG, np.float32)
    mask[:, :, :6, :p] = 0  # rows 0-5 see tile 0; rows 6-11 see tiles 0-1
    mask[:, :, 6:12, :2 * p] = 0
    mask[:, :, 12:] = 0  # rows that see nothing (and pad rows): all visible, no MLP
    row = np.ones((1, size, 1), np.float32)
    row[:, 12:] = 0
    inputs = dict(input_states=rng.standard_normal((1, size, h)).astype(np.float32), text_row_mask=row,
                  attention_mask=mask, **cross)
    (grouped,) = run(out, step_block(i, size), **inputs)
    (fused_out,) = run(fused, step_block(i, size), **inputs)
    close(fused_out, torch.from_numpy(grouped))


@torch.no_grad()
def test_lm_head(tiny):
    out, manifest, model = tiny
    x = torch.randn(1, manifest["dims"]["hidden_size"])
    ref = model.lm_head(model.model.language_model.norm(x))
    (ours,) = run(out, "lm_head", hidden_states=f32(x))
    close(ours, ref)


def test_greedy_head(tiny):
    out, manifest, _ = tiny
    logits = np.random.RandomState(0).randn(1, manifest["dims"]["vocab_size"]).astype(np.float32)
    (token,) = run(out, "greedy_head", logits=logits)
    assert token.dtype == np.int32 and token.tolist() == [int(logits.argmax())]


@pytest.mark.parametrize("top_p,temperature,penalty", [(0.8, 0.7, 1.3), (1.0, 1.0, 1.0), (0.3, 1.5, 2.0)])
def test_penalty_sample_head(tiny, top_p, temperature, penalty):
    """Same distribution as transformers' repetition penalty -> temperature -> top-k -> top-p."""
    out, manifest, _ = tiny
    v, k, r = manifest["dims"]["vocab_size"], manifest["sampling"]["top_k"], manifest["sampling"]["recent_ids"]
    rng = np.random.RandomState(1)
    logits = (3 * rng.randn(1, v)).astype(np.float32)
    top = np.argsort(-logits[0])[:8]
    recent = np.concatenate([top[:4], rng.randint(0, v, 6)])  # penalise some of the leaders
    # the engine's window holds prompt ids too: <|image|> (= V, past lm_head) changes nothing
    window = np.concatenate([recent, [v], np.full(r - len(recent) - 1, recent[0])]).reshape(1, r).astype(np.int32)
    probs, tokens = run(out, "penalty_sample_head", logits=logits, recent_ids=window,
                        top_p=np.array([top_p], np.float32), temperature=np.array([temperature], np.float32),
                        repeat_penalty=np.array([penalty], np.float32))
    ids, scores = torch.tensor(recent).view(1, -1), torch.tensor(logits)
    for proc in (RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature),
                 TopKLogitsWarper(k), TopPLogitsWarper(top_p)):
        scores = proc(ids, scores)
    ref = torch.softmax(scores, dim=-1)[0].numpy()
    assert tokens.dtype == np.int32 and len(set(tokens[0].tolist())) == k
    assert np.abs(probs[0] - ref[tokens[0]]).max() < TOL  # same probability for every candidate
    assert abs(ref[tokens[0]].sum() - 1) < TOL  # and no mass outside the candidates


def test_external_data_piece_matches_single_file(tiny, tmp_path, monkeypatch):
    """Pieces over the protobuf limit keep their weights in <net>.onnx.data: same results."""
    from mllama_tpu.export import onnx_io

    out, manifest, _ = tiny
    model_dir = out.parent / "model"
    monkeypatch.setattr(onnx_io, "SINGLE_FILE_LIMIT", 0)
    ext = json.loads(export_model(model_dir, tmp_path, SEQ, only=["lm_head", "block_chunk8_1"], progress=False,
                                  prefill_lengths=CHUNKS).read_text())
    entry = ext["pieces"]["block_chunk8_1"]
    assert entry["external_data"]["file"] == "pieces/block_chunk8_1.onnx.data"
    assert entry["inputs"] == manifest["pieces"]["block_chunk8_1"]["inputs"]
    assert entry["size"] < 100_000 < entry["external_data"]["size"]  # the weights really moved out
    for f in (entry, entry["external_data"]):  # checksums taken while writing match the files
        assert onnx_io.sha256_file(tmp_path / f["file"]) == f["sha256"]
        assert (tmp_path / f["file"]).stat().st_size == f["size"]
    x = np.random.randn(1, manifest["dims"]["hidden_size"]).astype(np.float32)
    (a,) = run(out, "lm_head", hidden_states=x)
    (b,) = run(tmp_path, "lm_head", hidden_states=x)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_rotary_tables_match_transformers(layout):
    """cos/sin tables (llama3 scaling) from either config layout == transformers' rotary embedding."""
    from transformers import MllamaConfig

    from mllama_tpu.config import ModelDims
    from mllama_tpu.export.rope import rotary_tables

    cfg = tiny_config()
    text = cfg["text_config"]
    text["rope_scaling"]["original_max_position_embeddings"] = 64  # positions below cross every band
    if layout == "transformers5":
        text["rope_parameters"] = {**text.pop("rope_scaling"), "rope_theta": text.pop("rope_theta")}
    dims = ModelDims.from_hf_config(cfg)
    assert dims.rope_scaling is not None and dims.rope_scaling["rope_type"] == "llama3"
    cos, sin = rotary_tables(dims, 1024)
    model = MllamaForConditionalGeneration(MllamaConfig(**cfg))
    lm = model.model.language_model
    pos = torch.arange(1024).view(1, -1)
    ref_cos, ref_sin = lm.rotary_emb(torch.zeros(1, 1024, dims.hidden_size), pos)
    assert torch.allclose(cos, ref_cos[0], atol=1e-5) and torch.allclose(sin, ref_sin[0], atol=1e-5)


@torch.no_grad()
def test_padding_tiles_reach_the_real_ones(tiny):
    """Why the vit is compiled for T tiles only (ARCHITECTURE.md, "Prefill in chunks"): Mllama's
    vision mask hides padding from padding only, so a 1-tile image's states change with what the
    3 padding tiles hold; a vit for fewer tiles would not be the model."""
    _, manifest, model = tiny
    d = manifest["dims"]
    t, s = d["max_num_tiles"], d["tile_size"]
    gen = torch.Generator().manual_seed(3)
    pixels = torch.zeros(1, 1, t, 3, s, s)
    pixels[0, 0, 0] = torch.randn(3, s, s, generator=gen)
    other = pixels.clone()
    other[0, 0, 1:] = torch.randn(t - 1, 3, s, s, generator=gen)
    ar_ids, ar_mask = torch.tensor([[1]]), torch.tensor([[[1] + [0] * (t - 1)]])
    real = [model.model.vision_model(pixel_values=px, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask)
            .last_hidden_state[0, 0, 0] for px in (pixels, other)]
    assert float((real[0] - real[1]).abs().max()) > 1e-3 * float(real[0].abs().max())

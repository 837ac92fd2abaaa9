"""The bmodel engine (C++ `chat` on the BM1684X simulator) generates what transformers and the ONNX
reference engine generate, token for token, from the f32 bmodel of the tiny model.

Each case compares the whole answer, up to EOS or MAX_NEW_TOKENS (the toy task's answers are
6-7 tokens with EOS): the prefill's token and decode steps that read the KV cache written by
prefill and by decode itself, through the cross layers for image prompts.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from mllama_tpu.engines.bmodel import BmodelEngine
from mllama_tpu.engines.onnx import OnnxEngine
from mllama_tpu.generate import STOP_EOS, STOP_SEQLEN, generate
from mllama_tpu.inputs import (
    decode_self_mask,
    pad_token_id,
    prefill_inputs,
    prepare_image,
    process,
    prompt_features,
)
from mllama_tpu.manifest import token_facts
from mllama_tpu.sampling import SamplingParams
from mllama_tpu.tiny.task import LAYOUTS
from tests.parity_cases import Case, conversations, engine_generate, hf_generate, make_cases, run_conversation

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 12
SEED = 5151


CASES = make_cases(SEED, two_turn=2, text_prompt="What colour is the sky?")


@pytest.fixture(scope="module")
def bmodel_path(tiny_bmodel):
    return tiny_bmodel("f32")


@pytest.fixture(scope="module")
def engine(bmodel_path):
    e = BmodelEngine(bmodel_path)
    yield e
    e.close()


@pytest.fixture(scope="module")
def onnx_engine(tiny_onnx_dir):
    return OnnxEngine(tiny_onnx_dir)


def engine_tokens(engine, processor, case: Case, max_new_tokens: int, eos: list[int]) -> list[int]:
    g = engine_generate(engine, processor, case, max_new_tokens, eos)
    return g.tokens + ([eos[0]] if g.stop_reason == STOP_EOS else [])


def test_cases_cover_every_layout(processor):
    ids = {int(process(processor, c.messages, c.image)["aspect_ratio_ids"][0, 0]) for c in CASES if c.scene}
    assert ids == set(range(1, len(LAYOUTS) + 1))
    assert sum(c.scene is not None for c in CASES) >= 12


def test_dims_come_from_the_bmodel(engine, hf_model, tiny_onnx_dir):
    import json

    manifest = json.loads((tiny_onnx_dir / "manifest.json").read_text())
    tc, vc = hf_model.config.text_config, hf_model.config.vision_config
    assert engine.seq_length == manifest["seq_length"]
    assert engine.hidden_size == tc.hidden_size
    assert engine.vocab_size == tc.vocab_size
    assert engine.num_layers == tc.num_hidden_layers
    assert engine.cross_layers == sorted(tc.cross_attention_layers)
    assert engine.max_tiles == vc.max_num_tiles
    assert engine.num_patches == (vc.image_size // vc.patch_size) ** 2 + 1
    assert engine.sample_k == manifest["sampling"]["top_k"]
    assert engine.memory["engine_bytes"] > 0
    # not in the bmodel: from the token_config/ the compile step writes beside it
    facts = token_facts(engine.model_dir)
    assert facts.image_token_id == hf_model.config.image_token_index
    assert set(hf_model.generation_config.eos_token_id) <= set(facts.eos_ids)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_greedy_matches_transformers_and_onnx(engine, onnx_engine, processor, hf_model, case):
    eos = list(hf_model.generation_config.eos_token_id)
    engine.set_sampling(SamplingParams())
    onnx_engine.set_sampling(SamplingParams())
    want = hf_generate(hf_model, processor, case, MAX_NEW_TOKENS)
    got = engine_tokens(engine, processor, case, MAX_NEW_TOKENS, eos)
    ref = engine_tokens(onnx_engine, processor, case, MAX_NEW_TOKENS, eos)
    # transformers keeps the EOS it stopped on; the engines report the stop instead
    if want and want[-1] in eos:
        want = want[:-1] + [eos[0]]
    assert got == ref, f"{case.name}: bmodel {got} != onnx {ref}"
    assert got == want, f"{case.name}: bmodel {got} != transformers {want}"


CONVERSATIONS = conversations(SEED)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=[c.name for c in CONVERSATIONS])
def test_conversations_reuse_the_cache_and_match_transformers(engine, processor, hf_model, conversation):
    """Later turns keep what the device cache holds and prefill the rest in chunks; every answer
    is transformers' on the whole conversation (four turns with history, an image that changes,
    text-only turns)."""
    engine.set_sampling(SamplingParams())
    reused = run_conversation(engine, processor, hf_model, conversation, MAX_NEW_TOKENS)
    assert (reused[1] == 0) == (conversation.name == "image_changes") and all(r > 0 for r in reused[2:]), reused


MASK_CASES = [c for c in CASES if c.name in ("layout1x2", "text_only", "two_turns0")]


@pytest.mark.parametrize("case", MASK_CASES, ids=[c.name for c in MASK_CASES])
def test_device_masks_are_the_python_definition(engine, processor, case):
    """The masks the C++ engine gives the decode nets equal mllama_tpu.inputs', for an image
    prompt, a text-only prompt and a two-turn prompt: the cross row and text row uploaded at
    the prompt's last chunk, and the self-attention row it builds each step by the contract's rule."""
    image = prepare_image(processor, case.image) if case.scene is not None else None
    if image is not None:
        engine.encode_image(image)
    f = prompt_features(processor, case.messages, image)
    p = prefill_inputs(f["input_ids"][0], engine.seq_length, pad_token_id(processor), f.get("cross_attention_mask"),
                       engine.num_patches, engine.max_tiles)
    engine.set_sampling(SamplingParams())
    engine.decode(engine.prefill(p))
    cross, rows = engine.native.decode_cross_masks()
    if p.has_image:
        assert np.array_equal(np.asarray(cross, np.float32), p.decode_cross_attention_mask.ravel())
        assert np.array_equal(np.asarray(rows, np.float32), p.decode_text_row_mask.ravel())
    else:
        assert len(cross) == len(rows) == 0
    seq = engine.seq_length
    for filled in sorted({0, 1, p.num_tokens, engine.position, seq - 1, seq}):
        assert np.array_equal(np.asarray(engine.native.decode_self_mask(filled), np.float32),
                              decode_self_mask(filled, seq).ravel()), filled


def test_penalty_sampling_equals_the_onnx_engine(engine, onnx_engine, processor):
    """One host-side draw for both engines: the same seed gives the same sampled answer."""
    params = SamplingParams("penalty_sample", temperature=1.2, top_p=0.9, top_k=20, repeat_penalty=1.1,
                            repeat_last_n=8, seed=21)
    for e in (engine, onnx_engine):
        e.set_sampling(params)
    case = CASES[1]
    assert engine_tokens(engine, processor, case, MAX_NEW_TOKENS, eos=[]) == \
        engine_tokens(onnx_engine, processor, case, MAX_NEW_TOKENS, eos=[])


def test_penalty_sampling_same_seed_same_tokens(engine, processor):
    case = CASES[-1]  # text-only: the cheapest prompt on the simulator
    runs = []
    for seed in (11, 11):
        engine.set_sampling(SamplingParams("penalty_sample", temperature=1.5, top_p=0.95, top_k=20, repeat_penalty=1.2,
                         repeat_last_n=16, seed=seed))
        runs.append(engine_tokens(engine, processor, case, MAX_NEW_TOKENS, eos=[]))
    assert runs[0] == runs[1]
    assert all(0 <= t < engine.vocab_size for t in runs[0])


@pytest.fixture(scope="module")
def text_greedy(engine, processor) -> list[int]:
    engine.set_sampling(SamplingParams())
    return engine_tokens(engine, processor, CASES[-1], MAX_NEW_TOKENS, eos=[])


@pytest.mark.parametrize("temperature", [0.0, 1e-4])
def test_temperature_to_zero_is_greedy(engine, processor, text_greedy, temperature):
    """0 switches to the greedy head; a tiny temperature makes the sampling head's draw one-hot."""
    engine.set_sampling(SamplingParams("penalty_sample", temperature=temperature, top_p=1.0, top_k=50, repeat_penalty=1.0,
                        repeat_last_n=16, seed=3))
    assert engine_tokens(engine, processor, CASES[-1], MAX_NEW_TOKENS, eos=[]) == text_greedy
    engine.set_sampling(SamplingParams())


def test_seqlen_is_reached_and_reported(engine, onnx_engine):
    """A prompt of SEQ-2 tokens leaves room for 3 tokens; the next decode is refused."""
    seq = engine.seq_length
    ids = np.arange(seq - 2) % 300 + 10
    out = {}
    for e in (engine, onnx_engine):
        e.set_sampling(SamplingParams())
        g = generate(e, prefill_inputs(ids, seq, 0), [], 100)
        assert g.stop_reason == STOP_SEQLEN and len(g.tokens) == 3
        out[type(e).__name__] = g.tokens
    assert out["BmodelEngine"] == out["OnnxEngine"]
    for e in (engine, onnx_engine):
        with pytest.raises(RuntimeError, match="full"):
            e.decode(out["BmodelEngine"][-1])


def test_image_prompt_needs_an_encoded_image(engine, processor):
    case = CASES[0]
    engine.encode_image(prepare_image(processor, case.image))
    engine.clear_image()
    f = process(processor, case.messages, case.image)
    p = prefill_inputs(f["input_ids"][0], engine.seq_length, 0, f["cross_attention_mask"], engine.num_patches,
                       engine.max_tiles)
    with pytest.raises(RuntimeError, match="encode_image"):
        engine.prefill(p)


def test_wrong_input_size_is_a_value_error(engine):
    with pytest.raises(ValueError, match="takes"):
        engine.native.encode_image(np.zeros(7, np.float32), np.zeros(1, np.int32), np.zeros(4, np.int32))
    chunk = prefill_inputs(np.arange(40) + 10, engine.seq_length, 0).chunk(0, 20, 32)
    with pytest.raises(ValueError, match="no step net of 32 tokens"):
        engine.native.prefill_chunk(chunk)
    chunk = prefill_inputs(np.arange(40) + 10, engine.seq_length, 0).chunk(30, 10, 16)
    chunk.offset = engine.seq_length - 4  # past the cache's end
    with pytest.raises(ValueError, match="does not fit"):
        engine.native.prefill_chunk(chunk)


def test_simulator_debug_output_stays_off_stdout(bmodel_path, tmp_path):
    """The simulator's firmware prints debug lines; a streamed answer (or JSON) on stdout must not see them."""
    import subprocess
    import sys

    from mllama_tpu import REPO_ROOT

    code = f"""
import numpy as np
from mllama_tpu.engines.bmodel import BmodelEngine
from mllama_tpu.inputs import prefill_inputs
e = BmodelEngine({str(bmodel_path)!r})
print("token", e.prefill(prefill_inputs(np.arange(5) + 10, e.seq_length, 0)))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("token "), res.stdout[-3000:]
    assert "cmodel" in res.stderr  # the messages are on stderr, not lost

    # MLLAMA_SIMULATOR_LOG sends them to a file instead: stderr stays clean as well.
    log = tmp_path / "simulator.log"
    env = {**os.environ, "MLLAMA_SIMULATOR_LOG": str(log)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [ln for ln in res.stdout.splitlines() if ln.strip()] == lines
    assert "cmodel" not in res.stderr, res.stderr[-3000:]
    assert "cmodel" in log.read_text()


def test_int4_bmodel_runs_with_bf16_device_tensors(tiny_bmodel, onnx_engine, processor):
    """int4 keeps hidden states, KV cache and cross states in bf16 on the device: the engine reads
    those dtypes from the bmodel, sizes its cache by them, and still starts the answer as f32 does."""
    e = BmodelEngine(tiny_bmodel("int4"))
    try:
        dtypes = {i["name"]: i["dtype"] for i in e.net_io("block_cache_0")["inputs"]}
        assert dtypes["history_k"] == dtypes["input_states"] == "bf16"
        case = CASES[1]
        eos = token_facts(onnx_engine.model_dir).eos_ids
        onnx_engine.set_sampling(SamplingParams())
        e.set_sampling(SamplingParams())
        got = engine_tokens(e, processor, case, 3, eos)
        ref = engine_tokens(onnx_engine, processor, case, 3, eos)
        assert got[:2] == ref[:2], f"int4 {got} vs f32 onnx {ref}"
    finally:
        e.close()


@pytest.mark.parametrize("mode,lm_head", [("int8", None), ("bf16", None), ("f16", None), ("int4", "float")])
def test_other_modes_answer_like_the_f32_reference(tiny_bmodel, onnx_engine, processor, hf_model, mode, lm_head):
    """int4 has its own 100-pair gate (test_int4_accuracy.py); the other quantized modes, and int4
    with a bf16 lm_head, must give the f32 reference's tokens on the parity cases, all but at most one."""
    eos = list(hf_model.generation_config.eos_token_id)
    onnx_engine.set_sampling(SamplingParams())
    quantized = BmodelEngine(tiny_bmodel(mode, lm_head))
    try:
        quantized.set_sampling(SamplingParams())
        differ = [c.name for c in CASES
                  if engine_tokens(quantized, processor, c, MAX_NEW_TOKENS, eos)
                  != engine_tokens(onnx_engine, processor, c, MAX_NEW_TOKENS, eos)]
    finally:
        quantized.close()
    assert len(differ) <= 1, f"{mode}: tokens differ from the f32 reference on {differ}"

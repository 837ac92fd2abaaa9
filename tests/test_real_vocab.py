"""Llama 3.2's real 128256-id vocabulary through the whole chain: export, compile (f32 and int4),
the C++ engine on the BM1684X simulator, against transformers on the same weights.

The model is mllama_tpu.real_vocab's random tiny Mllama with the published tokenizer. With the
real vocabulary the token heads are as large as on the 11B, so these tests also hold them to
being static single-subnet nets and check their results at that size.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mllama_tpu import real_vocab
from mllama_tpu.text_stream import TextStream
from mllama_tpu.compile.simulate import run_nets
from mllama_tpu.engines.bmodel import BmodelEngine
from mllama_tpu.generate import STOP_EOS, STOP_MAX_NEW_TOKENS
from mllama_tpu.manifest import token_facts
from mllama_tpu.sampling import SamplingParams
from mllama_tpu.inputs import load_processor, process, user_message
from tests.parity_cases import Case, engine_generate, hf_generate

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 10
QUESTION = "What is in this picture?"
T = real_vocab.TILE_SIZE
# (width, height): every tile layout's exact size and one the processor must resize.
IMAGE_SIZES = [(T, T), (2 * T, T), (T, 2 * T), (2 * T, 2 * T), (4 * T, T), (T, 3 * T), (90, 70)]


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields plus noise: every tile differs, so the cross-attention sees something."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), np.sin(4 * (x + y))], axis=-1)
    pixels = 127.5 * (1 + 0.7 * base + 0.3 * rng.uniform(-1, 1, (height, width, 3)))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


IMAGE_CASES = [Case(f"image{w}x{h}", [user_message(QUESTION, True)], None, None, picture=_picture(w, h, i))
               for i, (w, h) in enumerate(IMAGE_SIZES)]
TEXT_CASE = Case("text_only", [user_message(QUESTION, False)], None, None)
PROBE_CASES = [Case(f"eos{eos}", real_vocab.probe_messages(p), None, None)
               for p, eos in zip(real_vocab.EOS_PROBES, real_vocab.EOS_IDS)]


@pytest.fixture(scope="module")
def processor(real_vocab_onnx_dir):
    return load_processor(real_vocab_onnx_dir / "token_config")


@pytest.fixture(scope="module")
def hf_model(real_vocab_model_dir):
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(real_vocab_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(real_vocab_bmodel):
    e = BmodelEngine(real_vocab_bmodel("f32"))
    yield e
    e.close()


@pytest.fixture(scope="module")
def truth(hf_model, processor) -> dict[str, list[int]]:
    return {c.name: hf_generate(hf_model, processor, c, MAX_NEW_TOKENS)
            for c in IMAGE_CASES + [TEXT_CASE] + PROBE_CASES}


@pytest.fixture(scope="module")
def answers(engine, processor, truth) -> dict[str, object]:
    engine.set_sampling(SamplingParams())
    return {c.name: engine_generate(engine, processor, c, MAX_NEW_TOKENS, token_facts(engine.model_dir).eos_ids)
            for c in IMAGE_CASES + [TEXT_CASE] + PROBE_CASES}


def test_the_published_vocabulary(engine, processor, real_vocab_onnx_dir):
    tok = processor.tokenizer
    assert engine.vocab_size == real_vocab.VOCAB_SIZE == 128256
    assert token_facts(engine.model_dir).image_token_id == tok.convert_tokens_to_ids("<|image|>") == 128256
    assert set(token_facts(engine.model_dir).eos_ids) == {128001, 128008, 128009}
    assert [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")] == \
        [128001, 128008, 128009]
    assert tok.decode(tok("Grüße, 世界", add_special_tokens=False)["input_ids"]) == "Grüße, 世界"
    manifest = json.loads((real_vocab_onnx_dir / "manifest.json").read_text())
    assert manifest["pieces"]["embedding"]["inputs"][0]["shape"] == [1, manifest["seq_length"]]


@pytest.mark.parametrize("mode", ["f32", "int4"])
def test_every_net_is_one_static_subnet(real_vocab_bmodel, mode):
    rep = json.loads((real_vocab_bmodel(mode).parent / "compile_report.json").read_text())
    for net in ("lm_head", "greedy_head", "penalty_sample_head"):
        entry = rep["nets"][net]
        assert not entry["dynamic"] and entry["subnets"] == 1, (mode, net)
        assert entry["estimate"]["cycles"] > 0, (mode, net)


@pytest.mark.parametrize("case", IMAGE_CASES + [TEXT_CASE], ids=lambda c: c.name)
def test_f32_greedy_matches_transformers(answers, truth, case):
    g = answers[case.name]
    want = truth[case.name]
    assert g.stop_reason == STOP_MAX_NEW_TOKENS and len(want) == MAX_NEW_TOKENS  # long answers, no EOS
    assert g.tokens == want, f"{case.name}: engine {g.tokens} != transformers {want}"


def test_cases_cover_every_layout_and_the_image_matters(processor, truth):
    layouts = {int(process(processor, c.messages, c.image)["aspect_ratio_ids"][0, 0]) for c in IMAGE_CASES}
    assert len(layouts) == len(IMAGE_SIZES) - 1  # the resized one repeats a layout
    image_answers = {tuple(truth[c.name]) for c in IMAGE_CASES}
    assert len(image_answers) >= 3 and tuple(truth[TEXT_CASE.name]) not in image_answers


@pytest.mark.parametrize("case,eos", list(zip(PROBE_CASES, real_vocab.EOS_IDS)), ids=lambda x: getattr(x, "name", x))
def test_every_eos_id_stops_generation(engine, processor, answers, truth, case, eos):
    want = truth[case.name]
    assert want[-1] == eos and len(want) > 4  # transformers stops on this id
    g = answers[case.name]
    assert g.stop_reason == STOP_EOS and g.tokens == want[:-1]
    # that id alone stops it too, and without it the same prompt runs on
    alone = engine_generate(engine, processor, case, MAX_NEW_TOKENS, [eos])
    assert alone.stop_reason == STOP_EOS and alone.tokens == want[:-1]
    others = engine_generate(engine, processor, case, len(want), [e for e in token_facts(engine.model_dir).eos_ids if e != eos])
    assert others.tokens[: len(want)] == want


def test_multibyte_answers_stream_whole_characters(answers, processor):
    tok = processor.tokenizer
    multibyte = 0
    for name, g in answers.items():
        full = tok.decode(g.tokens, skip_special_tokens=True)
        stream, pieces = TextStream(tok), []
        for t in g.tokens:
            pieces.append(stream.push(t))
            assert full.startswith("".join(pieces)), f"{name}: streamed text is not a prefix of the answer"
        pieces.append(stream.flush())
        assert "".join(pieces) == full
        multibyte += sum(len(ch.encode()) > 1 for ch in full if ch != "\ufffd")
    assert multibyte >= 5  # the answers do hold characters of two or more UTF-8 bytes


def test_a_character_split_over_tokens_streams_whole(processor):
    """Llama 3's byte-level BPE splits rare characters into byte pieces; none is emitted half."""
    tok = processor.tokenizer
    text = "llama 𓃒 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    halves = [t for t in ids if "\ufffd" in tok.decode([t])]
    assert halves, "the hieroglyph should take several byte tokens"
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_heads_at_the_real_vocabulary_match_onnx(real_vocab_bmodel, real_vocab_onnx_dir):
    """The simulator's heads on 128256 logits: the argmax, and the sampling head's candidates."""
    from mllama_tpu.compile import parity

    rng = np.random.default_rng(3)
    logits = (2 * rng.standard_normal((1, real_vocab.VOCAB_SIZE))).astype(np.float32)
    top = np.argsort(-logits[0])[:6]
    # prompt ids are in the window too, <|image|> (128256) among them: past lm_head, it changes nothing
    recent = np.concatenate([top[:3], [real_vocab.IMAGE_TOKEN_ID],
                             rng.integers(0, real_vocab.VOCAB_SIZE, 60)]).reshape(1, 64).astype(np.int32)
    feed = {"logits": logits, "recent_ids": recent, "top_p": np.array([0.9], np.float32),
            "temperature": np.array([0.8], np.float32), "repeat_penalty": np.array([1.3], np.float32)}
    sim = run_nets(real_vocab_bmodel("f32"), {"greedy_head": {"logits": logits}, "penalty_sample_head": feed})
    assert int(sim["greedy_head"][0].reshape(-1)[0]) == int(np.argmax(logits))
    probs, tokens = parity.onnx_outputs(real_vocab_onnx_dir, "penalty_sample_head", feed)
    assert sim["penalty_sample_head"][1].tolist() == tokens.tolist()
    assert np.abs(sim["penalty_sample_head"][0] - probs).max() < 1e-5


def test_penalty_sampling_runs_at_the_real_vocabulary(engine, processor, truth):
    runs = []
    for seed in (7, 7):
        engine.set_sampling(SamplingParams("penalty_sample", temperature=1.2, top_p=0.9, top_k=40, repeat_penalty=1.3,
                            repeat_last_n=16, seed=seed))
        runs.append(engine_generate(engine, processor, TEXT_CASE, 6, []).tokens)
    engine.set_sampling(SamplingParams("penalty_sample", temperature=1e-4, top_p=1.0, top_k=50, repeat_penalty=1.0,
                        repeat_last_n=16, seed=1))
    coldest = engine_generate(engine, processor, TEXT_CASE, MAX_NEW_TOKENS, []).tokens
    engine.set_sampling(SamplingParams())
    assert runs[0] == runs[1] and all(0 <= t < real_vocab.VOCAB_SIZE for t in runs[0])
    assert coldest == truth[TEXT_CASE.name]  # a one-hot draw is the greedy answer


def test_int4_answers_start_like_f32(real_vocab_bmodel, processor, answers):
    """W4BF16 blocks on random weights move the logits; the first tokens must still agree."""
    e = BmodelEngine(real_vocab_bmodel("int4"))
    try:
        e.set_sampling(SamplingParams())
        agree = 0
        for c in IMAGE_CASES:
            got = engine_generate(e, processor, c, 2, token_facts(e.model_dir).eos_ids).tokens
            agree += got[:1] == answers[c.name].tokens[:1]
    finally:
        e.close()
    assert agree >= len(IMAGE_CASES) - 1

"""The ONNX reference engine generates exactly what transformers' `generate` does (greedy).

Same weights (the bundled tiny model), same processor output; the engine runs the exported
pieces with onnxruntime through mllama_tpu.inputs + mllama_tpu.generate.
"""
from __future__ import annotations

import pytest

from mllama_tpu.engines.onnx import OnnxEngine
from mllama_tpu.errors import UserError
from mllama_tpu.manifest import token_facts
from mllama_tpu.sampling import SamplingParams
from mllama_tpu.generate import STOP_EOS, STOP_SEQLEN
from mllama_tpu.inputs import prefill_inputs, process, prompt_features
from mllama_tpu.tiny.task import LAYOUTS
from tests.parity_cases import conversations, engine_generate, hf_generate, make_cases, run_conversation

MAX_NEW_TOKENS = 20
SEED = 2024

CASES = make_cases(SEED, two_turn=1, text_prompt="Hello")


@pytest.fixture(scope="module")
def engine(tiny_onnx_dir):
    return OnnxEngine(tiny_onnx_dir)


def test_cases_cover_every_layout(processor):
    ids = set()
    for case in CASES:
        if case.scene is not None:
            ids.add(int(process(processor, case.messages, case.image)["aspect_ratio_ids"][0, 0]))
    assert ids == set(range(1, len(LAYOUTS) + 1))
    assert len(CASES) >= 12


def test_engine_reads_dims_from_manifest(engine, hf_model):
    cfg = hf_model.config
    assert engine.seq_length == 128
    assert engine.vocab_size == cfg.text_config.vocab_size
    assert engine.hidden_size == cfg.text_config.hidden_size
    assert engine.max_tiles == cfg.vision_config.max_num_tiles
    assert engine.num_patches == (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1
    facts = token_facts(engine.model_dir)
    assert facts.image_token_id == cfg.image_token_index
    assert set(hf_model.generation_config.eos_token_id) <= set(facts.eos_ids)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_greedy_matches_transformers(engine, processor, hf_model, case):
    engine.set_sampling(SamplingParams())
    eos = list(hf_model.generation_config.eos_token_id)
    want = hf_generate(hf_model, processor, case, MAX_NEW_TOKENS)
    got = engine_generate(engine, processor, case, MAX_NEW_TOKENS, eos)
    tokens = got.tokens + ([want[-1]] if got.stop_reason == STOP_EOS and want and want[-1] in eos else [])
    assert tokens == want, f"{case.name}: engine {tokens} != transformers {want}"


CONVERSATIONS = conversations(SEED)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=[c.name for c in CONVERSATIONS])
def test_conversations_reuse_the_cache_and_match_transformers(engine, processor, hf_model, conversation):
    """Each turn sends the whole conversation: the engine prefills only what its cache lacks and
    still answers as transformers does on the whole prompt."""
    engine.set_sampling(SamplingParams())
    prompts = [len(prompt_features(processor, m, None)["input_ids"][0]) for m, _ in conversation.turns]
    reused = run_conversation(engine, processor, hf_model, conversation, MAX_NEW_TOKENS)
    if conversation.name == "image_changes":
        assert reused[1] == 0 and prompts[1] > max(engine.prefill_lengths)  # another image: all of it, in chunks
    else:
        assert all(r >= p for r, p in zip(reused[1:], prompts))  # at least the previous prompt was kept


def test_toy_task_answers_are_correct(engine, processor, hf_model):
    """With the trained tiny model the answers depend on the image and are right.

    The model's own gate is >= 95 % on held-out pairs; on these 11 at most one may miss.
    """
    engine.set_sampling(SamplingParams())
    eos = list(hf_model.generation_config.eos_token_id)
    wrong = []
    asked = [c for c in CASES if c.expected]
    for case in asked:
        got = engine_generate(engine, processor, case, MAX_NEW_TOKENS, eos)
        answer = processor.tokenizer.decode(got.tokens, skip_special_tokens=True).strip()
        if got.stop_reason != STOP_EOS or answer != case.expected:
            wrong.append(f"{case.name}: {answer!r} (want {case.expected!r})")
    assert len(wrong) <= 1, "; ".join(wrong)


def test_generation_stops_at_seq_length(engine, processor):
    """Without an EOS the loop fills the KV cache exactly: SEQ - L + 1 tokens, then stops."""
    engine.set_sampling(SamplingParams())
    case = CASES[0]
    got = engine_generate(engine, processor, case, 10_000, eos=[])
    L = len(process(processor, case.messages, case.image)["input_ids"][0])
    assert got.stop_reason == STOP_SEQLEN
    assert len(got.tokens) == engine.seq_length - L + 1
    with pytest.raises(RuntimeError, match="full"):
        engine.decode(got.tokens[-1])


def test_image_prompt_needs_encoded_image(tiny_onnx_dir, processor):
    fresh = OnnxEngine(tiny_onnx_dir)
    case = CASES[0]
    f = process(processor, case.messages, case.image)
    p = prefill_inputs(f["input_ids"][0], fresh.seq_length, 0, f["cross_attention_mask"], fresh.num_patches, fresh.max_tiles)
    with pytest.raises(RuntimeError, match="encode_image"):
        fresh.prefill(p)


def test_penalty_sampling_is_seeded(engine, processor):
    case = CASES[1]
    runs = []
    for seed in (7, 7, 8):
        engine.set_sampling(SamplingParams("penalty_sample", temperature=1.5, top_p=1.0, top_k=50, repeat_penalty=1.1, repeat_last_n=16, seed=seed))
        runs.append(engine_generate(engine, processor, case, 24, eos=[]).tokens)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_not_an_export_dir(tmp_path):
    with pytest.raises(UserError, match="not found"):
        OnnxEngine(tmp_path / "missing")
    with pytest.raises(UserError, match="manifest.json"):
        OnnxEngine(tmp_path)

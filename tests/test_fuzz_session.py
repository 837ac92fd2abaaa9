"""Fuzzing the chat's token sequences (mllama_tpu.session.ChatSession, history on): scripted
conversations of questions of any length and text (special-token strings included), image
changes, resets, answer budgets, on the ONNX engine over the tiny export (SEQ 128, so overflow
comes every few turns). Every prompt the engine is handed fits SEQ, the cache never overflows,
a kept conversation that no longer fits restarts with the notice, a question too long on its
own is one line, and the session answers the next question after any of them.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzzing import assert_clear, bounded
from mllama_tpu.engines import SamplingParams, open_engine
from mllama_tpu.errors import UserError
from mllama_tpu.session import RESTART_NOTICE, ChatSession, LoadedModel, Notice, TurnDone
from mllama_tpu.tiny import data
from mllama_tpu.token_config import open_processor

SPECIAL = ["<|image|>", "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|end_of_text|>", "<|finetune_right_pad_id|>"]
WORDS = ["red", "What", "shape", "is", "it", "?", "circle", "日本", "✓", "\t", "\u200b", "a" * 30]

question = st.lists(st.sampled_from(WORDS + SPECIAL) | st.text(max_size=6), max_size=90).map(" ".join)
step = st.one_of(
    st.tuples(st.just("ask"), question, st.integers(1, 12)),  # question, max_new_tokens
    st.tuples(st.just("image"), st.integers(0, 3), st.none()),  # a new image (0: none)
    st.tuples(st.just("reset"), st.none(), st.none()),
)


@pytest.fixture(scope="module")
def model(tiny_onnx_dir):
    engine = open_engine("onnx", tiny_onnx_dir)
    tc = tiny_onnx_dir / "token_config"
    m = LoadedModel.on(engine, open_processor(tc), tc)
    prompts: list[int] = []
    real_prefill = engine.prefill

    def recording_prefill(p):
        prompts.append(p.num_tokens)
        return real_prefill(p)

    engine.prefill = recording_prefill  # the real engine runs; only the prompt length is noted
    m.prompts = prompts
    yield m
    m.close()


@pytest.fixture(scope="module")
def scenes():
    return [None] + [data.render(data.make_scene(random.Random(i), (1, 2))) for i in range(3)]


@bounded(40, deadline_ms=60000)
@given(steps=st.lists(step, min_size=1, max_size=7))
# Typed with an image: the tokenizer read it as a second image slot and prefill_inputs raised
# ValueError (cross_attention_mask [1,L,2,T]); now refused in one line.
@example(steps=[("image", 1, None), ("ask", "what is <|image|> here", 3)])
@example(steps=[("ask", "<|image|>", 3), ("ask", "red " * 70, 4), ("ask", "red " * 40, 4)])
def test_any_conversation_fits_or_restarts_with_a_notice(model, scenes, steps):
    seq = model.seq_length
    s = ChatSession(model, enable_history=True)
    s.set_sampling(SamplingParams())
    for kind, arg, budget in steps:
        if kind == "image":
            s.set_image(None if arg == 0 else f"scene{arg}.png", scenes[arg])
            continue
        if kind == "reset":
            s.reset()
            continue
        s.max_new_tokens = budget
        had_history = bool(s.messages)
        alone = s.model.count_prompt_tokens(s._conversation(arg.strip(), [])) if arg.strip() else 0
        overflow = had_history and bool(arg.strip()) and s.prompt_length(arg) + s.answer_room > seq
        model.prompts.clear()
        try:
            events = list(s.turn(arg))
        except UserError as e:
            # Refused only when the question is empty or does not fit even without the history.
            assert_clear(e)
            assert not arg.strip() or alone > seq or "<|image|>" in arg, (str(e), alone)
            assert not model.prompts, "a refused turn reached the engine"
            continue
        done = [e for e in events if isinstance(e, TurnDone)]
        notices = [e.text for e in events if isinstance(e, Notice)]
        assert len(done) == 1 and len(model.prompts) == 1
        assert model.prompts[0] <= seq and model.engine.position <= seq
        assert done[0].prompt_tokens + len(done[0].tokens) <= seq + 1  # the last token is not fed back
        assert (RESTART_NOTICE in notices) == overflow, (notices, overflow)
        if overflow:
            assert len(s.messages) == 2  # the new conversation is this turn alone
    # After whatever happened, the session still answers.
    s.max_new_tokens = 2
    assert [e for e in s.turn("What shape is it?") if isinstance(e, TurnDone)]

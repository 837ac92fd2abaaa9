"""Sampling settings have one owner (mllama_tpu.sampling): the CLI's defaults are its defaults, and
an impossible setting cannot be built, so the CLI, the session and the engines (which only ever
receive a SamplingParams) refuse it in the same words (the server's schema refuses the same
ranges earlier, with a 422 naming the field: test_server_errors)."""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

from mllama_tpu import REPO_ROOT
from mllama_tpu.errors import UserError
from mllama_tpu.sampling import SamplingParams, draw_token, sample_head_inputs

sys.path.insert(0, str(REPO_ROOT / "python_demo"))
import pipeline  # noqa: E402

BAD = [("temperature", -0.5, "--temperature"), ("top_p", 0.0, "--top_p"), ("top_p", 1.5, "--top_p"),
       ("top_k", 0, "--top_k"), ("repeat_penalty", 0.0, "--repeat_penalty"),
       ("repeat_last_n", -1, "--repeat_last_n"), ("seed", -3, "--seed")]


def test_cli_defaults_are_the_sampling_defaults():
    args = pipeline.parse_args(["-m", "x"])
    got = pipeline.sampling_from(args)
    assert got == SamplingParams()


def message_of(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("field,value,flag", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_an_impossible_setting_cannot_be_built_and_the_cli_says_the_same(field, value, flag, tiny_onnx_dir):
    good = SamplingParams(mode="penalty_sample")
    want = message_of(lambda: dataclasses.replace(good, **{field: value}))
    assert field.split("_")[0] in want and str(value) in want
    assert message_of(lambda: SamplingParams(**{**dataclasses.asdict(good), field: value})) == want
    cli = message_of(lambda: pipeline.main(["-m", str(tiny_onnx_dir), "--backend", "onnx", "--generation_mode",
                                            "penalty_sample", flag, str(value), "-q", "hi"]))
    assert cli == want


def test_recent_ids_window():
    p = SamplingParams("penalty_sample", repeat_last_n=3, repeat_penalty=1.3)
    h = sample_head_inputs(p, [5, 6, 7, 8], window=6)
    assert h.recent_ids.tolist() == [[6, 6, 6, 6, 7, 8]] and h.repeat_penalty.tolist() == pytest.approx([1.3])
    none = sample_head_inputs(dataclasses.replace(p, repeat_last_n=0), [5, 6], window=4)
    assert none.repeat_penalty.tolist() == [1.0]  # no window: the penalty does nothing
    assert sample_head_inputs(p, [9], window=4).recent_ids.tolist() == [[9, 9, 9, 9]]


def test_draw_keeps_top_k_and_is_seeded():
    probs = np.array([0.5, 0.3, 0.2], np.float32)
    tokens = np.array([10, 11, 12], np.int32)
    draws = {draw_token(probs, tokens, 1, np.random.default_rng(s)) for s in range(20)}
    assert draws == {10}
    a = [draw_token(probs, tokens, 3, np.random.default_rng(4)) for _ in range(3)]
    assert a == [draw_token(probs, tokens, 3, np.random.default_rng(4))] * 3
    assert {draw_token(probs, tokens, 3, np.random.default_rng(s)) for s in range(40)} == {10, 11, 12}

"""TextStream: whole UTF-8 characters only, and stop strings never handed out, even in part."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mllama_tpu import REPO_ROOT
from mllama_tpu.text_stream import TextStream


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(REPO_ROOT / "assets" / "tiny-mllama"), local_files_only=True)


def stream_out(tok, text: str, stop: tuple[str, ...]) -> tuple[str, bool, list[str]]:
    s = TextStream(tok, stop)
    pieces = []
    for i in tok.encode(text, add_special_tokens=False):
        pieces.append(s.push(i))
        if s.stopped:
            break
    pieces.append(s.flush())
    return "".join(pieces), s.stopped, pieces


@pytest.mark.parametrize("text,stop,want,stopped", [
    ("the red circle is left", ("circle",), "the red ", True),
    ("the red circle is left", ("le is",), "the red circ", True),  # straddles a token boundary
    ("the red circle is left", ("blue", " is "), "the red circle", True),  # the first one that appears
    ("the red circle is left", ("xyz",), "the red circle is left", False),
    ("the red circle is left", ("left!",), "the red circle is left", False),  # a prefix that never completes
    ("ünïcödé über", ("über",), "ünïcödé ", True),
])
def test_stop_strings(tok, text, stop, want, stopped):
    got, did_stop, pieces = stream_out(tok, text, stop)
    assert got == want and did_stop == stopped
    assert not any("\ufffd" in p for p in pieces)
    for s in stop:  # not even the start of a stop string went out before it was known
        assert s not in got


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tok):
    s = TextStream(tok, ("red square",))
    out = "".join(s.push(i) for i in tok.encode("a red", add_special_tokens=False))
    assert out == "a "  # "red" may still become "red square"
    out += "".join(s.push(i) for i in tok.encode(" circle", add_special_tokens=False)) + s.flush()
    assert out == "a red circle" and not s.stopped

"""`./run_demo.sh --serve`: the bundled tiny model, compiled to int4 as the demo does, served on
the simulator through the C++ engine (mllama_tpu.demo --serve, what the script runs after setup)."""
from __future__ import annotations

import sys

import httpx
import pytest

from serving import SAMPLES, TRUTH, running_server, user_turn

pytestmark = pytest.mark.slow


def test_demo_serves_the_tiny_model(tmp_path):
    image = SAMPLES / "white_triangle_left_on_yellow_1x1.png"
    with running_server(tmp_path, key=None, timeout=1800, command=(sys.executable, "-m", "mllama_tpu.demo", "--serve")) as s:
        assert s.model == "tiny-mllama"
        client = s.client()
        for question, expected in TRUTH[image.name]["questions"].items():
            r = client.chat.completions.create(model=s.model, messages=[user_turn(question, image)], max_tokens=24)
            assert r.choices[0].message.content.strip() == expected
        assert "<title>mllama-tpu chat</title>" in httpx.get(s.url + "/").text
        assert "127.0.0.1" in s.log() and "simulator messages" in s.log()

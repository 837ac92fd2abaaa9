"""One device, many clients: a FIFO queue, 429 when it is full, a client that leaves frees the
engine at the next token, and --devid 0,1 gives each request to a free engine.

The queue tests need turns that last: the tiny model answers in a handful of tokens and then
ends. `endless_onnx_dir` is the tiny export (its nets, symlinked) whose end-of-answer token
is one the model never writes (<|python_tag|>), so it talks until max_tokens; exported at SEQ 512
so that a turn can last seconds.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import CACHE
from serving import SAMPLES, TRUTH, pipeline_turns, running_server, user_turn

IMAGES = [SAMPLES / "yellow_square_right_on_blue_1x2.png", SAMPLES / "black_triangle_right_on_white_2x1.png"]
NEVER_SAID = ("<|python_tag|>", 383)
ENDLESS_SEQ = 512  # room for turns of seconds, even on the ONNX engine (~100 tokens/s here)
LONG = 400
BACKENDS = ["onnx", pytest.param("bmodel", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def endless_onnx_dir(tiny_model_dir, tmp_path_factory):
    from mllama_tpu.export import export_model

    export = CACHE / f"onnx-tiny-{ENDLESS_SEQ}"
    export_model(tiny_model_dir, export, ENDLESS_SEQ)  # a few seconds; cached
    d = tmp_path_factory.mktemp("endless")
    (d / "pieces").symlink_to(export / "pieces")
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["eos_token_ids"] = manifest["dims"]["eos_token_ids"] = [NEVER_SAID[1]]
    (d / "manifest.json").write_text(json.dumps(manifest))
    tc = d / "token_config"
    shutil.copytree(export / "token_config", tc)
    edits = {"config.json": lambda c: c["text_config"].update(eos_token_id=NEVER_SAID[1]),
             "generation_config.json": lambda c: c.update(eos_token_id=[NEVER_SAID[1]]),
             "tokenizer_config.json": lambda c: c.update(eos_token=NEVER_SAID[0])}
    for name, edit in edits.items():
        cfg = json.loads((tc / name).read_text())
        edit(cfg)
        (tc / name).write_text(json.dumps(cfg))
    return d


def long_turn(server, **kw):
    """A streamed turn that only max_tokens ends (the endless model), as an open openai stream."""
    return server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Hello"}], stream=True, **kw)


def first_content(stream, n: int = 1) -> int:
    """Read until n content chunks came; returns how many."""
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen >= n:
                break
    return seen


def wait_for(server, predicate, timeout: float = 60) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        health = httpx.get(server.url + "/health").json()
        if predicate(health):
            return health
        time.sleep(0.02)
    raise AssertionError(f"server state never reached: {health}")


# ---------------------------------------------------------------------------------------------
# many clients, one engine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_eight_concurrent_clients(backend, tiny_onnx_dir, tiny_bmodel, tmp_path):
    model = tiny_onnx_dir if backend == "onnx" else tiny_bmodel("f32")
    asks = [(image, q) for image in IMAGES for q in TRUTH[image.name]["questions"]]
    assert len(asks) == 8
    refs = {}
    for image in IMAGES:
        questions = list(TRUTH[image.name]["questions"])
        for turn in pipeline_turns(backend, model, questions, image, "--max_new_tokens", "24"):
            refs[image, turn["question"]] = turn["answer"]
    with running_server(tmp_path, "--backend", backend, "-m", str(model)) as server:
        barrier = threading.Barrier(len(asks))

        def ask(image_question):
            image, q = image_question
            client = server.client()
            barrier.wait()  # all eight at once
            chunks = list(client.chat.completions.create(model=server.model, messages=[user_turn(q, image)],
                                                         max_tokens=24, stream=True))
            return chunks

        with ThreadPoolExecutor(len(asks)) as pool:
            results = list(pool.map(ask, asks))
        ids = set()
        for (image, q), chunks in zip(asks, results):
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == refs[image, q], (image.name, q)  # complete, and nobody else's tokens in it
            assert len({c.id for c in chunks}) == 1
            ids |= {c.id for c in chunks}
            assert chunks[-1].choices[0].finish_reason == "stop"
        assert len(ids) == 8
        # All were admitted (8 <= 1 engine + 16 waiting) and served one after the other.
        log = server.log()
        assert log.count(" engine 0: ") == 8


def test_queue_full_is_429_with_retry_after(endless_onnx_dir, tmp_path):
    with running_server(tmp_path, "--backend", "onnx", "-m", str(endless_onnx_dir), "--max_queue", "1") as server:
        running = long_turn(server, max_tokens=LONG)
        assert first_content(running) == 1  # the engine is busy with it
        waiting = ThreadPoolExecutor(1).submit(
            server.client().chat.completions.create, model=server.model,
            messages=[user_turn("What shape is it?", IMAGES[1])], max_tokens=3)
        wait_for(server, lambda h: h["queued"] == 1)
        r = httpx.post(server.base_url + "/chat/completions", headers=server.headers(), timeout=60,
                       json={"model": server.model, "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error" and "retry in" in err["message"]
        # The official client sees it as a RateLimitError.
        with pytest.raises(openai.RateLimitError):
            server.client().chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi"}])
        running.close()  # the first client goes away: the waiting one is served
        answer = waiting.result(timeout=120)
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
        assert server.alive()


def test_disconnect_frees_the_engine_at_the_next_token(endless_onnx_dir, tmp_path):
    with running_server(tmp_path, "--backend", "onnx", "-m", str(endless_onnx_dir)) as server:
        client = server.client()
        t = time.time()
        full = list(long_turn(server, max_tokens=LONG))
        full_s = time.time() - t
        assert full[-1].choices[0].finish_reason == "length"

        def next_request_wait() -> float:
            r = client.chat.completions.create(model=server.model, messages=[user_turn("What shape is it?", IMAGES[1])],
                                               max_tokens=3)
            return r.model_extra["timings"]["queue_s"]

        # Streaming: read a few chunks, hang up, ask again at once.
        stream = long_turn(server, max_tokens=LONG)
        first_content(stream, 3)
        stream.close()
        queue_s = next_request_wait()
        assert queue_s < full_s / 3, (queue_s, full_s)
        # Not streaming: the client gives up (timeout) while the turn runs.
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=full_s / 4).chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=LONG)
        queue_s = next_request_wait()
        assert queue_s < full_s / 3, (queue_s, full_s)
        cancelled = [int(n) for n in re.findall(r"\+ (\d+) answer tokens.*cancelled", server.log())]
        assert len(cancelled) == 2 and all(n < LONG for n in cancelled), server.log()[-2000:]


def test_two_engines_serve_two_clients_at_once(endless_onnx_dir, tmp_path):
    with running_server(tmp_path, "--backend", "onnx", "-m", str(endless_onnx_dir), "--devid", "0,1") as server:
        assert httpx.get(server.url + "/health").json()["engines"] == 2

        def run(_):
            with server.client().chat.completions.with_streaming_response.create(
                    model=server.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=60,
                    stream=True) as response:
                engine = response.headers["x-mllama-engine"]
                chunks = [line for line in response.iter_lines() if line.startswith("data: ")]
            return engine, chunks

        with ThreadPoolExecutor(2) as pool:
            first, second = pool.submit(run, 0), pool.submit(run, 1)
            wait_for(server, lambda h: h["busy"] == 2)  # both engines at work at the same time
            results = [first.result(timeout=300), second.result(timeout=300)]
        assert {engine for engine, _ in results} == {"0", "1"}
        for _, chunks in results:
            assert chunks[-1] == "data: [DONE]"
            assert '"finish_reason": "length"' in chunks[-2]
        assert server.log().count(" engine 0: ") == 1 and server.log().count(" engine 1: ") == 1

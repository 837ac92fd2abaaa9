"""The server through the official `openai` client: its answers are pipeline.py's.

Each reference is `pipeline.py --json` run as its own process on the same model, image, question
and settings; the server (python_demo/server.py, a real uvicorn process on a loopback port) must
give the same answer text and token count, whole and streamed. Backends: onnx (the reference
engine) and, slow, bmodel (the C++ engine on the simulator, f32 tiny bmodel).
"""
from __future__ import annotations

import httpx
import pytest

from serving import SAMPLES, TRUTH, data_url, pipeline_turns, running_server, sse_events, user_turn

IMAGE = SAMPLES / "yellow_square_right_on_blue_1x2.png"
QUESTIONS = list(TRUTH[IMAGE.name]["questions"])
MAX_TOKENS = 24
BACKENDS = ["onnx", pytest.param("bmodel", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_path(backend, tiny_onnx_dir, tiny_bmodel):
    return tiny_onnx_dir if backend == "onnx" else tiny_bmodel("f32")


@pytest.fixture(scope="module")
def server(backend, model_path, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server"), "--backend", backend, "-m", str(model_path)) as s:
        yield s


@pytest.fixture(scope="module")
def reference(backend, model_path) -> list[dict]:
    return pipeline_turns(backend, model_path, QUESTIONS, IMAGE, "--max_new_tokens", str(MAX_TOKENS))


def streamed(client, **kw):
    """(text, chunks) of a streamed completion through the openai client."""
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_and_health(server, model_path):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [server.model]
    assert model_path.name.startswith(server.model)
    assert client.models.retrieve(server.model).id == server.model
    health = httpx.get(server.url + "/health").json()  # no key needed for the liveness probe
    assert health["status"] == "ok" and health["engines"] == 1


def test_whole_and_streamed_answers_equal_pipeline(server, reference):
    client = server.client()
    for ref in reference:
        kw = dict(model=server.model, messages=[user_turn(ref["question"], IMAGE)], max_tokens=MAX_TOKENS)
        whole = client.chat.completions.create(**kw)
        assert whole.choices[0].message.content == ref["answer"], ref["question"]
        assert whole.choices[0].finish_reason == "stop"
        assert whole.usage.completion_tokens == len(ref["tokens"])
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        text, chunks = streamed(client, **kw)
        assert text == ref["answer"], ref["question"]
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it really streamed
        assert len({c.id for c in chunks}) == 1
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert [c.choices[0].finish_reason for c in finals] == ["stop"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref["tokens"])
    # The model is right about the sample, too (the toy task's truth).
    assert [r["answer"].strip() for r in reference] == list(TRUTH[IMAGE.name]["questions"].values())
    # Every turn is logged with its first-token latency and speed.
    assert server.log().count("tokens/s, eos") >= 2 * len(reference)


def test_sampled_answer_equals_pipeline(server, backend, model_path):
    """temperature/top_p/seed and frequency_penalty (-> repeat_penalty 2 ** (f / 2)) as pipeline.py's flags."""
    q = QUESTIONS[0]
    ref = pipeline_turns(backend, model_path, [q], IMAGE, "--max_new_tokens", str(MAX_TOKENS),
                         "--generation_mode", "penalty_sample", "--temperature", "1.5", "--top_p", "0.95",
                         "--seed", "7", "--repeat_penalty", repr(2 ** 0.5))[0]
    r = server.client().chat.completions.create(model=server.model, messages=[user_turn(q, IMAGE)],
                                                max_tokens=MAX_TOKENS, temperature=1.5, top_p=0.95, seed=7,
                                                frequency_penalty=1.0)
    assert (r.choices[0].message.content, r.usage.completion_tokens) == (ref["answer"], len(ref["tokens"]))


def test_multi_turn_with_the_image_in_the_first_message(server, backend, model_path):
    refs = pipeline_turns(backend, model_path, QUESTIONS[:3], IMAGE, "--max_new_tokens", str(MAX_TOKENS),
                          "--enable_history")
    client = server.client()
    messages = []
    for ref in refs:
        messages.append(user_turn(ref["question"], IMAGE if not messages else None))
        text, _ = streamed(client, model=server.model, messages=messages, max_tokens=MAX_TOKENS)
        assert text == ref["answer"], ref["question"]
        messages.append({"role": "assistant", "content": text})


@pytest.mark.parametrize("backend", ["onnx"], indirect=True, scope="module")  # bmodel: the same server path
def test_text_only(server, backend, model_path):
    ref = pipeline_turns(backend, model_path, ["Hello"], None, "--max_new_tokens", str(MAX_TOKENS))[0]
    r = server.client().chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == ref["answer"] and r.usage.completion_tokens == len(ref["tokens"])


def test_length_and_stop(server, reference):
    client = server.client()
    ref = reference[1]  # "It is a square."
    kw = dict(model=server.model, messages=[user_turn(ref["question"], IMAGE)])
    short = client.chat.completions.create(max_tokens=2, **kw)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert ref["answer"].startswith(short.choices[0].message.content)
    also = client.chat.completions.create(max_completion_tokens=2, **kw)
    assert also.choices[0].message.content == short.choices[0].message.content
    cut = client.chat.completions.create(stop=[" square", "zzz"], **kw)
    assert cut.choices[0].message.content == ref["answer"].split(" square")[0]
    assert cut.choices[0].finish_reason == "stop"
    text, chunks = streamed(client, stop=" square", **kw)
    assert text == cut.choices[0].message.content


def test_system_message_and_plain_sse(server, reference):
    """Raw SSE over HTTP, as a browser or curl sees it: a system message is accepted, [DONE] ends it."""
    ref = reference[0]
    body = {"model": server.model, "stream": True, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "system", "content": "You answer questions about images."},
                         {"role": "user", "content": [{"type": "text", "text": ref["question"]},
                                                      {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}]}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, headers=server.headers(),
                      timeout=600) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text.strip()  # the system prompt and a text-first layout change the prompt: just an answer
    timings = [e["timings"] for e in events[:-1] if e.get("timings")]
    assert len(timings) == 1 and timings[0]["ftl_s"] > 0 and timings[0]["tps"] >= 0

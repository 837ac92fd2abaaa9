"""Bad requests get OpenAI's error JSON with the right status, and the server keeps serving.

One server (onnx backend, an API key, small limits so that "too large" is cheap to send) takes a
table of bad requests over raw HTTP, then a schemathesis run against its own OpenAPI schema
(bounded in examples and time, loopback only); no 5xx, and it still answers afterwards.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from cli_runs import one_error_line
from serving import KEY, SAMPLES, SERVER, data_url, running_server, user_turn

IMAGE = SAMPLES / "white_triangle_left_on_yellow_1x1.png"
MAX_PIXELS = 250_000
MAX_BODY_MB = 0.25
MAX_MESSAGES = 8


@pytest.fixture(scope="module")
def server(tiny_onnx_dir, tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server"), "--backend", "onnx", "-m", str(tiny_onnx_dir),
                        "--max_image_pixels", str(MAX_PIXELS), "--max_body_mb", str(MAX_BODY_MB),
                        "--max_messages", str(MAX_MESSAGES)) as s:
        yield s


def png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url: str, question: str = "What shape is it?") -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def cases(model: str) -> dict[str, tuple]:
    """name -> (body: bytes | dict, headers or None for the right key, status, code, words in the message)."""
    png = IMAGE.read_bytes()
    ok = [user_turn("What shape is it?", IMAGE)]
    body = lambda **kw: {"model": model, "messages": ok, **kw}  # noqa: E731
    two = [image_message(data_url(IMAGE)), {"role": "assistant", "content": "It is a triangle."},
           image_message(data_url(IMAGE))]
    return {
        "malformed JSON": (b'{"model": "x", "messages": [', None, 400, "invalid_json", "not valid JSON"),
        "not an object": (b"[1, 2]", None, 400, "invalid_json", "JSON object"),
        "missing messages": ({"model": model}, None, 422, "missing_required_parameter", "messages"),
        "empty messages": ({"model": model, "messages": []}, None, 422, "invalid_value", "messages"),
        "unknown role": ({"model": model, "messages": [{"role": "robot", "content": "hi"}]}, None, 422,
                         "invalid_value", "messages[0].role"),
        "wrong type": (body(temperature="hot"), None, 422, "invalid_value", "temperature"),
        "two images": ({"model": model, "messages": two}, None, 400, "too_many_images", "one image per conversation"),
        "remote URL": ({"model": model, "messages": [image_message("https://example.com/cat.png")]}, None, 400,
                       "image_url_not_supported", "data URL"),
        "file URL": ({"model": model, "messages": [image_message("file:///etc/passwd")]}, None, 400,
                     "image_url_not_supported", "reads no files"),
        "local path": ({"model": model, "messages": [image_message(str(IMAGE))]}, None, 400,
                       "image_url_not_supported", "data URL"),
        "non-image data URL": ({"model": model, "messages": [image_message("data:text/plain;base64,aGVsbG8=")]},
                               None, 400, "invalid_image", "not an image"),
        "text labelled PNG": ({"model": model, "messages": [image_message(
            "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode())]}, None, 400,
            "invalid_image", "not an image"),
        "bad base64": ({"model": model, "messages": [image_message("data:image/png;base64,@@@")]}, None, 400,
                       "invalid_image", "base64"),
        "truncated PNG": ({"model": model, "messages": [image_message(
            "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode())]}, None, 400,
            "invalid_image", "truncated"),
        "over the pixel limit": ({"model": model, "messages": [image_message(
            png_url(Image.new("RGB", (600, 600), "red")))]}, None, 400, "image_too_large", str(MAX_PIXELS)),
        "body over the size limit": (body(user="x" * int(MAX_BODY_MB * 1.1 * (1 << 20))), None, 413,
                                     "request_too_large", "limit"),
        "max_tokens 0": (body(max_tokens=0), None, 422, "invalid_value", "max_tokens"),
        "max_tokens beyond SEQ": (body(max_tokens=128), None, 400, "invalid_value", "leaves"),
        "prompt beyond SEQ": ({"model": model, "messages": [user_turn(" ".join(["red"] * 200))]}, None, 400,
                              "context_length_exceeded", "limit is 128"),
        "too many messages": ({"model": model, "messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)},
                              None, 400, "too_many_messages", str(MAX_MESSAGES)),
        "ends with the assistant": ({"model": model, "messages": ok + [{"role": "assistant", "content": "It"}]},
                                    None, 400, "invalid_value", "end with the user"),
        "image from the assistant": ({"model": model, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]},
            {"role": "user", "content": "and?"}]}, None, 400, "invalid_value", "only user messages"),
        # Found by tests/test_fuzz_session.py: was a 503 (prefill_inputs' ValueError on two image slots).
        "image token in the text": ({"model": model, "messages": [image_message(data_url(IMAGE), "is <|image|> red?")]},
                                    None, 400, "invalid_value", "image token"),
        "n 2": (body(n=2), None, 422, "invalid_value", "'n'"),
        "tools": (body(tools=[{"type": "function", "function": {"name": "f"}}]), None, 400,
                  "unsupported_parameter", "tools"),
        "unknown model": ({"model": "gpt-4o", "messages": ok}, None, 404, "model_not_found", model),
        "wrong key": (body(), {"Authorization": "Bearer nope"}, 401, "invalid_api_key", "Bearer"),
        "missing key": (body(), {}, 401, "invalid_api_key", "Bearer"),
    }


def test_bad_requests(server):
    failures = []
    for name, (payload, headers, status, code, words) in cases(server.model).items():
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h = {"content-type": "application/json", **(server.headers() if headers is None else headers)}
        t = time.time()
        r = httpx.post(server.base_url + "/chat/completions", content=raw, headers=h, timeout=120)
        try:
            body = r.json()
            err = body["error"]
            assert set(body) == {"error"} and set(err) == {"message", "type", "param", "code"}
            assert isinstance(err["message"], str) and isinstance(err["type"], str)
            assert (r.status_code, err["code"]) == (status, code)
            assert words in err["message"]
            assert "Traceback" not in r.text
            assert time.time() - t < 30  # refused at once: no fetch, no model run
        except (AssertionError, KeyError, ValueError) as e:
            failures.append(f"{name}: {r.status_code} {r.text[:300]} ({e!r})")
    assert not failures, "\n".join(failures)
    assert server.alive()


def test_auth_covers_every_route_but_health_and_page(server):
    for path in ("/v1/models", f"/v1/models/{server.model}", "/openapi.json", "/no/such/route"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/health").status_code == 200
    assert "<title>mllama-tpu chat</title>" in httpx.get(server.url + "/").text
    r = httpx.get(server.url + "/no/such/route", headers=server.headers())
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.base_url + "/models/gpt-4o", headers=server.headers())
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_still_serving_after_bad_requests(server):
    client = server.client()
    r = client.chat.completions.create(model=server.model, messages=[user_turn("What shape is it?", IMAGE)])
    assert r.choices[0].message.content == "It is a triangle."


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Generated requests from the server's own OpenAPI schema: no 5xx, responses as documented."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
           "-H", f"Authorization: Bearer {KEY}",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance",
           "--max-examples", "25", "--max-time", "40", "--seed", "1", "--workers", "1",
           "--request-timeout", "60", "--phases", "coverage,fuzzing",
           "--suppress-health-check", "all", "--report", "junit", "--report-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "/v1/chat/completions" in r.stdout
    assert server.alive()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("flags,words", [
    (["--port", "70000"], "not a port number"), (["--port", "abc"], "invalid int value"),
    (["--devid", "0,0"], "distinct device ids"), (["--max_queue", "-1"], "--max_queue must be >= 0"),
    (["--backend", "tpu"], "invalid choice"), (["-m", "/nonexistent.bmodel"], "not found")])
def test_bad_flags_are_one_line_before_the_port_is_bound(flags, words):
    args = ["-m", str(IMAGE)] + flags  # any existing path passes the model check; flags fail first
    r = subprocess.run([sys.executable, str(SERVER), *args], capture_output=True, text=True, timeout=120)
    one_error_line(r, words)

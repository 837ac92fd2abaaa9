"""Helpers of the server tests: the real server process on a free loopback port, started through
our own CLI (python_demo/server.py, so the simulator preload and the flags are exercised too), and
reference answers from `pipeline.py --json` for the same model, image, question and settings."""
from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from mllama_tpu import REPO_ROOT

SERVER = REPO_ROOT / "python_demo" / "server.py"
PIPELINE = REPO_ROOT / "python_demo" / "pipeline.py"
SAMPLES = REPO_ROOT / "assets" / "samples"
TRUTH = json.loads((SAMPLES / "truth.json").read_text())
KEY = "test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user_turn(question: str, image: Path | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": question}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                        {"type": "text", "text": question}]}


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    key: str | None
    model: str = ""

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.key or "unused", max_retries=0, **kw)

    def alive(self) -> bool:
        try:
            return self.proc.poll() is None and httpx.get(self.url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False


@contextlib.contextmanager
def running_server(log_dir: Path, *args: str, key: str | None = KEY, timeout: float = 600,
                   command: tuple[str, ...] = (sys.executable, str(SERVER))) -> Iterator[Server]:
    port = free_port()
    log_path = Path(log_dir) / f"server-{port}.log"
    cmd = [*command, *args, "--port", str(port)]
    env = dict(os.environ)
    env.pop("MLLAMA_API_KEY", None)
    if key:
        env["MLLAMA_API_KEY"] = key  # the key through the environment, as the README suggests
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, key)
    try:
        end = time.time() + timeout
        while not server.alive():
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
            if time.time() > end:
                raise AssertionError(f"server not up after {timeout} s:\n{server.log()[-3000:]}")
            time.sleep(0.3)
        models = httpx.get(server.base_url + "/models", headers=server.headers(), timeout=10).json()
        server.model = models["data"][0]["id"]
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pipeline_turns(backend: str, model: Path, questions: list[str], image: Path | None = None,
                   *flags: str) -> list[dict]:
    """`pipeline.py --json`'s turns ({question, answer, tokens, ftl_s, tps}) for these questions
    (one run per distinct call in a test session: the runs are the slow part of these tests)."""
    return [dict(t) for t in _pipeline_turns(backend, Path(model), tuple(questions), image, flags)]


@functools.lru_cache(maxsize=None)
def _pipeline_turns(backend: str, model: Path, questions: tuple[str, ...], image: Path | None,
                    flags: tuple[str, ...]) -> list[dict]:
    cmd = [sys.executable, str(PIPELINE), "--backend", backend, "-m", str(model), "--json", *flags]
    if image is not None:
        cmd += ["-i", str(image)]
    for q in questions:
        cmd += ["-q", q]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    turns = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"question"')]
    assert [t["question"] for t in turns] == list(questions), r.stdout
    return turns


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """The data of each SSE event of a streamed response ('[DONE]' as the string)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)

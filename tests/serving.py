"""Helpers of the server tests: the real server process (mllama_tpu.serve.child: our own CLI on a
free loopback port), and reference answers from `pipeline.py --json` for the same model, image,
question and settings."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from mllama_tpu import REPO_ROOT
from cli_runs import json_turns, run_pipeline
from mllama_tpu.serve.child import SERVER, data_url, free_port, server_child, user_message  # noqa: F401

SAMPLES = REPO_ROOT / "assets" / "samples"
TRUTH = json.loads((SAMPLES / "truth.json").read_text())
KEY = "test-key-0123456789"


def user_turn(question: str, image: Path | None = None) -> dict:
    return user_message(question, data_url(image) if image is not None else None)


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
    env = dict(os.environ)
    env.pop("MLLAMA_API_KEY", None)
    if key:
        env["MLLAMA_API_KEY"] = key  # the key through the environment, as the README suggests
    log_path = Path(log_dir) / f"server-{free_port()}.log"
    with server_child(list(args), log_path, env, timeout, command) as (url, proc):
        server = Server(url, proc, log_path, key)
        models = httpx.get(server.base_url + "/models", headers=server.headers(), timeout=10).json()
        server.model = models["data"][0]["id"]
        yield server


def pipeline_turns(backend: str, model: Path, questions: list[str], image: Path | None = None,
                   *flags: str) -> list[dict]:
    """`pipeline.py --json`'s turns ({question, answer, tokens, ftl_s, tps}) for these questions
    (one run per distinct call in a test session: the runs are the slow part of these tests)."""
    return [dict(t) for t in _pipeline_turns(backend, Path(model), tuple(questions), image, flags)]


@functools.lru_cache(maxsize=None)
def _pipeline_turns(backend: str, model: Path, questions: tuple[str, ...], image: Path | None,
                    flags: tuple[str, ...]) -> list[dict]:
    args = ["--backend", backend, "-m", str(model), "--json", *flags]
    if image is not None:
        args += ["-i", str(image)]
    for q in questions:
        args += ["-q", q]
    r = run_pipeline(*args, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    turns = json_turns(r.stdout)
    assert [t["question"] for t in turns] == list(questions), r.stdout
    return turns


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """The data of each SSE event of a streamed response ('[DONE]' as the string)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)

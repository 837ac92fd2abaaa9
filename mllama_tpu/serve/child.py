"""The server as a child process: started through our own CLI (python_demo/server.py, so the
simulator preload and the flags are exercised), on a free loopback port, waited for until
/health answers, stopped at the end. The tests and the soak benchmark both drive it this way,
and both speak to it in the same messages."""
from __future__ import annotations

import base64
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from mllama_tpu import REPO_ROOT

SERVER = REPO_ROOT / "python_demo" / "server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user_message(question: str, url: str | None = None) -> dict:
    """A user message with the image (a URL, e.g. data_url's) before the question, or text only."""
    if url is None:
        return {"role": "user", "content": question}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def _serving(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def server_child(args: list[str], log_path: Path, env: dict[str, str], timeout: float = 600,
                 command: tuple[str, ...] = (sys.executable, str(SERVER))) -> Iterator[tuple[str, subprocess.Popen]]:
    """(url, process) of `command args --port P` once /health answers; its output goes to log_path.
    A child that exits or does not come up within `timeout` raises RuntimeError with its log's tail."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*command, *args, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO_ROOT, env=env)
    try:
        end = time.time() + timeout
        while not _serving(url):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
            if time.time() > end:
                raise RuntimeError(f"the server is not up after {timeout} s:\n{Path(log_path).read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

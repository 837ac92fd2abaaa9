"""How the tests run our command-line programs and read what they print: `pipeline.py`'s
`--json` turns, and the one `error:` line (exit code 2) that every refusal is."""
from __future__ import annotations

import json
import subprocess
import sys

from mllama_tpu import REPO_ROOT

PIPELINE = REPO_ROOT / "python_demo" / "pipeline.py"


def run_pipeline(*args: str, stdin: str | None = None, timeout: float | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if timeout is None:  # the simulator runs a net in seconds, not milliseconds
        timeout = 2400 if "bmodel" in args or any(a.endswith(".bmodel") for a in args) else 300
    return subprocess.run([sys.executable, str(PIPELINE), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env)


def json_turns(stdout: str) -> list[dict]:
    """The turn lines of `--json` output: a device runtime may log to stdout too."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"question"')]


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The run was refused the way every bad input is: exit code 2, its whole stderr one
    `error:` line holding `words`, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]

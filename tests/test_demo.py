"""`./run_demo.sh`'s main job (mllama_tpu.demo): the bundled tiny model exported, compiled to int4
and asked every toy-task question about every sample image through the C++ engine on the
simulator, with answers checked against the samples' truth and nothing else on the terminal.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mllama_tpu import REPO_ROOT
from mllama_tpu.demo import SAMPLES, WORK

pytestmark = pytest.mark.slow

DEMO_LINE = re.compile(r"^(== .+|Q: .+|A: .+   \[(ok|expected: .+)\]   FTL [0-9.]+ s, [0-9.]+ tok/s|\d+/\d+ answers as expected .+)$")


def test_demo_answers_the_samples_and_prints_only_the_chat():
    truth = json.loads((SAMPLES / "truth.json").read_text())
    log = WORK / "simulator.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MLLAMA_SIMULATOR_LOG"}
    r = subprocess.run([sys.executable, "-m", "mllama_tpu.demo"], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]

    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert [line for line in lines if not DEMO_LINE.match(line)] == []
    for name, facts in truth.items():
        assert any(line.startswith(f"== {name}") for line in lines), name
    answers = [line for line in lines if line.startswith("A: ")]
    assert len(answers) == sum(len(f["questions"]) for f in truth.values())
    right, total = map(int, re.search(r"^(\d+)/(\d+) answers as expected", lines[-1]).groups())
    assert total == len(answers) and right == sum("[ok]" in a for a in answers)
    assert right / total >= 0.9, r.stdout

    # The simulator's own chatter went to the demo's log file, not to the terminal.
    chatter = [line for line in log.read_text().splitlines() if len(line) > 20][:50]
    assert chatter, "the simulator wrote nothing to the log: is the demo still on the simulator?"
    assert not any(line in r.stdout or line in r.stderr for line in chatter)

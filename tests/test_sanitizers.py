"""The C++ engine under AddressSanitizer + UBSan: the engine, contract and in-process chat tests
on the simulator (MLLAMA_TEST_CHAT_BACKEND=bmodel) give zero reports from our own code (scripts/run_sanitized.sh; the vendor's known
reports are suppressed in scripts/sanitizer.supp, each with its reason)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mllama_tpu import REPO_ROOT

pytestmark = pytest.mark.slow


def test_engine_and_chat_tests_are_clean_under_asan_and_ubsan(tiny_bmodel):
    tiny_bmodel("f32")  # built by this run's cache, so the sanitized run only reads it
    cmd = [str(REPO_ROOT / "scripts" / "run_sanitized.sh"), sys.executable, "-m", "pytest", "-q", "-x",
           "-p", "no:cacheprovider", "tests/test_engine_bmodel.py", "tests/test_contract.py", "tests/test_pipeline.py",
           # In-process only: a pipeline.py subprocess under ASan takes minutes and runs the same engine
           # calls as the in-process session tests ("interactive" started one through a pty: 5 min).
           "-k", "not other_modes and not int4 and not simulator_debug and not onnx and not scripted_json"
                 " and not cli_sampling and not interactive and not bad_inputs and not missing_device"]
    env = {**os.environ, "MLLAMA_TEST_CHAT_BACKEND": "bmodel"}
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600, env=env)
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, tail
    summary = [ln for ln in res.stdout.splitlines() if ln.startswith("sanitizer: ")]
    assert summary and summary[-1].startswith("sanitizer: 0 finding(s) in our code"), tail
    assert " passed" in res.stdout and " failed" not in res.stdout, tail

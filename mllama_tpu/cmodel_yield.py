"""Start Python programs with the simulator's yield preload (python_demo/cmodel_yield.c).

The BM1684X simulator spends nearly all its CPU in threads that poll each other; the preload
makes them yield, which runs a tiny net tens of times faster on 2 cores (bench/simulator_yield.py).
LD_PRELOAD only takes effect when a process starts, so entry points re-exec themselves once:

    python -m mllama_tpu.cmodel_yield -m pytest ...     (run_tests.sh)
    exec_with_preload([...]) at the top of a main        (pipeline.py, the demo)

Nothing happens on a chip build (the preload is only built for the simulator), when it is
preloaded already, or with MLLAMA_CMODEL_YIELD=0 (to measure the simulator without it).
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

from mllama_tpu import REPO_ROOT

PRELOAD = REPO_ROOT / "python_demo" / "build" / "libcmodel_yield.so"
OPT_OUT = "MLLAMA_CMODEL_YIELD"


def preload_env(environ: Mapping[str, str] = os.environ) -> dict[str, str] | None:
    """`environ` plus the preload, or None when there is nothing to add."""
    # LD_PRELOAD splits on spaces and colons: a checkout path holding one cannot be preloaded.
    if environ.get(OPT_OUT) == "0" or not PRELOAD.is_file() or any(c in str(PRELOAD) for c in " :"):
        return None
    current = environ.get("LD_PRELOAD", "")
    if str(PRELOAD) in current.replace(":", " ").split():
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{PRELOAD}:{current}" if current else str(PRELOAD)
    return env


def exec_with_preload(python_args: Sequence[str]) -> None:
    """Become `python *python_args` with the preload when it applies; otherwise return."""
    env = preload_env()
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *python_args], env)


if __name__ == "__main__":
    args = sys.argv[1:]
    exec_with_preload(args)
    os.execv(sys.executable, [sys.executable, *args])

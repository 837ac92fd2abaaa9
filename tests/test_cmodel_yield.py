"""The simulator's yield preload (python_demo/cmodel_yield.c, mllama_tpu/cmodel_yield.py): built
for the simulator, put in place by the launcher and by pipeline.py's re-exec, left out on request,
and changing nothing the simulator computes.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mllama_tpu import REPO_ROOT
from mllama_tpu.cmodel_yield import OPT_OUT, PRELOAD
from cli_runs import json_turns, run_pipeline

MAPS_HAVE_PRELOAD = f"import os; print('{PRELOAD}' in open('/proc/self/maps').read(), os.environ.get('LD_PRELOAD', ''))"


def env_without_preload(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT)}
    env.update(extra)
    return env


def launch(env: dict[str, str]) -> tuple[bool, str]:
    out = subprocess.run([sys.executable, "-m", "mllama_tpu.cmodel_yield", "-c", MAPS_HAVE_PRELOAD],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", (out[1] if len(out) > 1 else "")


def test_preload_is_built_and_replaces_the_unlock():
    assert PRELOAD.is_file(), "scripts/build_engine.sh builds it for the simulator"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(PRELOAD)], capture_output=True, text=True,
                             check=True).stdout
    assert " T pthread_mutex_unlock" in symbols


def test_launcher_preloads_once_and_can_be_turned_off():
    loaded, ld_preload = launch(env_without_preload(LD_PRELOAD="libc.so.6"))
    assert loaded and ld_preload.split(":") == [str(PRELOAD), "libc.so.6"]

    loaded, ld_preload = launch(env_without_preload(LD_PRELOAD=str(PRELOAD)))
    assert loaded and ld_preload == str(PRELOAD), "already preloaded: not added twice"

    loaded, ld_preload = launch(env_without_preload(**{OPT_OUT: "0"}))
    assert not loaded and ld_preload == ""


@pytest.mark.slow
def test_pipeline_answers_the_same_with_and_without_it(tiny_bmodel):
    """pipeline.py re-execs itself with the preload; the tokens are the simulator's either way."""
    image = REPO_ROOT / "assets" / "samples" / "green_square_left_on_red_2x2.png"
    background = image.stem.split("_on_")[1].split("_")[0]  # the sample's name says what it shows
    args = ["-m", str(tiny_bmodel("f32")), "-i", str(image), "-q", "What color is the background?",
            "--max_new_tokens", "8", "--json"]

    def turn(env: dict[str, str]) -> dict:
        r = run_pipeline(*args, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        return json_turns(r.stdout)[-1]

    plain = turn(env_without_preload(**{OPT_OUT: "0"}))
    yielding = turn(env_without_preload())
    assert yielding["tokens"] == plain["tokens"]
    assert yielding["answer"] == f"The background is {background}."
    # The re-exec took effect: on 2 cores the polling threads cost ~10x when they do not yield.
    assert yielding["ftl_s"] < plain["ftl_s"], (yielding, plain)


@pytest.mark.slow
def test_a_loaded_engine_that_runs_nothing_leaves_the_cores_alone(tiny_bmodel):
    """Between calls (a server waiting for requests, a chat waiting for its user) the simulator's
    polling threads sleep: the engine reports its device use to the preload (DeviceInUse)."""
    script = ("import os, sys, time; from mllama_tpu.engines import open_engine; "
              f"e = open_engine('bmodel', {str(tiny_bmodel('f32'))!r}, 0); "
              "t0 = os.times(); time.sleep(2); t1 = os.times(); "
              "print((t1.user - t0.user + t1.system - t0.system) / (t1.elapsed - t0.elapsed))")

    def idle_cores(env: dict[str, str]) -> float:
        r = subprocess.run([sys.executable, "-m", "mllama_tpu.cmodel_yield", "-c", script], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return float(r.stdout.strip().splitlines()[-1])

    spinning = idle_cores(env_without_preload(**{OPT_OUT: "0"}))
    resting = idle_cores(env_without_preload())
    assert resting < 0.2 and spinning > 5 * resting, (resting, spinning)

"""Faults: kill -9 in the middle of export, a chat turn and a server stream, then run again; a net
launch the device refuses in the middle of a turn (CLI and server). Nothing half-done is taken
as done, the next run or turn is correct, one line (or the API's error body) says what happened.

Compile's kill -9 is tests/test_compile_cli.py::test_killed_compile_resumes. A client that hangs
up mid-stream freeing the engine is tests/test_server_load.py; here the answer after it is checked.

The device fault is real at libbmrt's boundary: tests/fail_launch.c, an LD_PRELOAD (composed with
the simulator's yield preload) that makes chosen launches of chosen nets return false, as libbmrt
does when the device refuses one, or never return (a hung device: the kill -9 tests kill there, so
the kill lands mid-answer on any machine). The C++ engine binds bmrt_launch_tensor_ex dynamically
(checked).
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from mllama_tpu import REPO_ROOT
from mllama_tpu.engines.bmodel import ENGINE_DIR
from mllama_tpu.export.onnx_io import sha256_file
from cli_runs import PIPELINE, json_turns, run_pipeline
from serving import SAMPLES, TRUTH, pipeline_turns, running_server, user_turn
from tests.conftest import TEST_PREFILL_LENGTHS

EXPORT_CLI = REPO_ROOT / "compile" / "export_onnx.py"
IMAGE = SAMPLES / "yellow_square_right_on_blue_1x2.png"
Q1, Q2, Q3, Q4 = list(TRUTH[IMAGE.name]["questions"])


def fresh_answers(model: Path) -> list[dict]:
    """pipeline.py's answers to Q1, Q3, Q4, each a fresh conversation with the image, in a run
    never killed or faulted (one run per test session, shared by the tests below)."""
    return pipeline_turns("bmodel", model, [Q1, Q3, Q4], IMAGE)


def read_until(proc: subprocess.Popen, predicate, timeout: float = 300) -> str:
    """proc's stdout as it comes, until predicate(text so far) or timeout."""
    text, fd, end = b"", proc.stdout.fileno(), time.monotonic() + timeout
    while not predicate(text.decode(errors="replace")) and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            text += chunk
    return text.decode(errors="replace")


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---------------------------------------------------------------------------------------------
# kill -9 during export
# ---------------------------------------------------------------------------------------------


def _listed_pieces_are_whole(out: Path) -> dict[str, dict]:
    """The manifest's pieces; each one listed is on disk whole (its size and sha256)."""
    try:
        pieces = json.loads((out / "manifest.json").read_text())["pieces"]
    except (OSError, ValueError, KeyError):
        return {}
    for name, entry in pieces.items():
        f = out / entry["file"]
        assert f.is_file() and f.stat().st_size == entry["size"] and sha256_file(f) == entry["sha256"], \
            f"{name} is listed as done but is not whole on disk"
    return pieces


def test_killed_export_resumes_to_a_clean_export(tiny_model_dir, tiny_onnx_dir, test_seq_length, tmp_path):
    clean = json.loads((tiny_onnx_dir / "manifest.json").read_text())["pieces"]  # the fixture's whole export
    out = tmp_path / "onnx"
    cmd = [sys.executable, str(EXPORT_CLI), "-m", str(tiny_model_dir), "-s", str(test_seq_length), "-f", str(out),
           "--prefill_lengths", ",".join(map(str, TEST_PREFILL_LENGTHS))]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed while a piece is half-written (its private .tmp dir exists), after one is finished.
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if len(_listed_pieces_are_whole(out)) >= 1 and any((out / "pieces").glob(".tmp-*/*")):
            break
        time.sleep(0.01)
    kill_group(proc)
    half = [p.name.removeprefix(".tmp-") for p in (out / "pieces").glob(".tmp-*")]
    done = _listed_pieces_are_whole(out)
    assert half and done, f"the kill did not land mid-export (half-written {half}, done {list(done)})"
    assert not set(half) & set(done), f"half-written piece(s) {half} listed as done"
    assert len(done) < len(clean)
    kept = {n: (out / e["file"]).stat().st_mtime_ns for n, e in done.items()}

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    pieces = _listed_pieces_are_whole(out)
    assert {n: (e["size"], e["sha256"]) for n, e in pieces.items()} == \
           {n: (e["size"], e["sha256"]) for n, e in clean.items()}
    assert not list((out / "pieces").glob(".tmp-*")), "a stale .tmp dir was left"
    assert {n: (out / pieces[n]["file"]).stat().st_mtime_ns for n in kept} == kept, "a finished piece was redone"
    assert sorted(p.name for p in (out / "token_config").iterdir()) == \
           sorted(p.name for p in (tiny_onnx_dir / "token_config").iterdir())


# ---------------------------------------------------------------------------------------------
# the device fault shim (tests/fail_launch.c)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fail_launch(tmp_path_factory) -> Path:
    """tests/fail_launch.c built as a preload; the engine must bind the symbol it interposes."""
    engine = next(ENGINE_DIR.glob("chat*.so"))
    dynsym = subprocess.run(["nm", "-D", "--undefined-only", str(engine)], capture_output=True, text=True).stdout
    assert "bmrt_launch_tensor_ex" in dynsym, f"{engine.name} does not import bmrt_launch_tensor_ex dynamically"
    so = tmp_path_factory.mktemp("fail_launch") / "libfail_launch.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(so),
                    str(Path(__file__).with_name("fail_launch.c")), "-ldl", "-lpthread"], check=True)
    return so


def fault_env(shim: Path, **plans: str) -> dict[str, str]:
    """This process's environment (the yield preload in it) with the fault shim preloaded too and
    its plans (FAIL_LAUNCH / HANG_LAUNCH="net:N,...")."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [str(shim), env.get("LD_PRELOAD")]))
    env.update(plans)
    return env


# ---------------------------------------------------------------------------------------------
# kill -9 during a chat turn
# ---------------------------------------------------------------------------------------------


def pipeline_json(model: Path, questions: list[str], *flags: str, env: dict | None = None):
    """(turns, stderr, returncode) of one fresh `pipeline.py --json` run with the image."""
    r = run_pipeline("-m", str(model), "-i", str(IMAGE), "--json", *flags, *sum([["-q", q] for q in questions], []),
                     timeout=600, env=env)
    return json_turns(r.stdout), r.stderr, r.returncode


@pytest.mark.slow
def test_killed_chat_turn_then_a_fresh_run_answers_the_same(tiny_bmodel, fail_launch, tmp_path):
    model = tiny_bmodel("f32")
    reference = fresh_answers(model)
    # The 2nd decode step never returns, so the kill lands mid-answer whatever the machine's load.
    log = tmp_path / "killed.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(PIPELINE), "-m", str(model), "-i", str(IMAGE), "-q", Q1],
                                cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=err,
                                env=fault_env(fail_launch, HANG_LAUNCH="block_cache_1:2"))
    shown = read_until(proc, lambda t: "Answer: " in t and len(t.split("Answer: ", 1)[1]) > 0)
    end = time.monotonic() + 120
    while "hanging in launch 2 of net 'block_cache_1'" not in log.read_text() and time.monotonic() < end:
        time.sleep(0.05)
    assert proc.poll() is None, f"the turn ended before the kill: {shown!r}"
    kill_group(proc)
    partial = shown.split("Answer: ", 1)[1]
    assert partial and reference[0]["answer"].startswith(partial) and partial != reference[0]["answer"]
    assert "hanging in launch 2 of net 'block_cache_1'" in log.read_text(), "the kill did not land mid-launch"
    turns, stderr, code = pipeline_json(model, [Q1])
    assert code == 0, stderr[-3000:]
    assert [(t["answer"], t["tokens"]) for t in turns] == [(reference[0]["answer"], reference[0]["tokens"])]


# ---------------------------------------------------------------------------------------------
# a net launch the device refuses, in the middle of a turn
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_failed_launch_mid_turn_restarts_the_conversation(tiny_bmodel, fail_launch):
    model = tiny_bmodel("f32")
    fresh = fresh_answers(model)
    # With history: Q1 answers; Q2 fails at its 2nd decode step (block_cache_1's launches: Q1's
    # decodes, then 2 more); Q3 is a new conversation; Q4 (after Q3, in it) fails in its prefill
    # (the embedding runs once per prefill chunk, and these prompts are one chunk); Q5 = Q1 asked
    # again starts anew.
    decodes_q1 = len(fresh[0]["tokens"])
    plan = f"block_cache_1:{decodes_q1 + 2},embedding:4"
    turns, stderr, code = pipeline_json(model, [Q1, Q2, Q3, Q4, Q1], "--enable_history",
                                        env=fault_env(fail_launch, FAIL_LAUNCH=plan))
    assert code == 2, stderr[-3000:]  # a turn failed: the scripted run says so in its status
    assert stderr.count("fail_launch: failing launch") == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert "net 'block_cache_1'" in errors[0] and "writing answer token 3 (decode)" in errors[0]
    assert "net 'embedding'" in errors[1] and "reading the prompt (prefill)" in errors[1]
    for line in errors:
        assert "bmrt_launch_tensor_ex failed" in line and "conversation was restarted" in line and "ask again" in line
    assert [t["question"] for t in turns] == [Q1, Q3, Q1]
    assert [(t["answer"], t["tokens"]) for t in turns] == [(f["answer"], f["tokens"]) for f in (fresh[0], fresh[1], fresh[0])]


# ---------------------------------------------------------------------------------------------
# the server: a failed launch, a client that hangs up, kill -9 mid-stream
# ---------------------------------------------------------------------------------------------


def content_chunks(stream, n: int) -> str:
    text, seen = "", 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            seen += 1
            if seen >= n:
                break
    return text


@pytest.mark.slow
def test_server_survives_a_failed_launch_kill_9_and_a_hang_up(tiny_bmodel, fail_launch, tmp_path, monkeypatch):
    model = tiny_bmodel("f32")
    ref = fresh_answers(model)[0]
    ask = dict(messages=[user_turn(Q1, IMAGE)], max_tokens=64)
    n = len(ref["tokens"])  # block_cache_1 launches of a whole answer (one per decode step)
    # Request 1 runs vit, embedding once (a one-chunk prefill) and block_cache_1 n times. Request 2 (streamed)
    # fails at its 2nd decode. The failure drops the encoded image, so request 3 runs vit again:
    # that launch fails. Request 4 encodes the image and fails in its prefill. Request 5 answers.
    # Request 6 (streamed) hangs in its 2nd decode, and the server is killed there.
    plans = {"FAIL_LAUNCH": f"block_cache_1:{n + 2},vit:2,embedding:3", "HANG_LAUNCH": f"block_cache_1:{2 * n + 4}"}
    for k, v in fault_env(fail_launch, **plans).items():
        monkeypatch.setenv(k, v)
    with running_server(tmp_path, "--backend", "bmodel", "-m", str(model)) as server:
        client = server.client(timeout=60)
        first = client.chat.completions.create(model=server.model, **ask)
        assert (first.choices[0].message.content, first.usage.completion_tokens) == (ref["answer"], n)

        stream = client.chat.completions.create(model=server.model, stream=True, **ask)
        with pytest.raises(openai.APIError) as streamed_error:
            for _ in stream:
                pass
        message = str(streamed_error.value)
        assert "net 'block_cache_1'" in message and "(decode)" in message and "retry" in message, message

        for net, doing in [("vit", "encoding the image"), ("embedding", "(prefill)")]:
            with pytest.raises(openai.APIStatusError) as whole_error:
                client.chat.completions.create(model=server.model, **ask)
            assert whole_error.value.status_code == 503
            body = whole_error.value.body
            assert body["code"] == "engine_failed" and f"net '{net}'" in body["message"] and doing in body["message"]

        again = client.chat.completions.create(model=server.model, **ask)
        assert (again.choices[0].message.content, again.usage.completion_tokens) == (ref["answer"], n)
        assert server.log().count("fail_launch: failing launch") == 3 and "Traceback" not in server.log()

        # kill -9 of the server mid-stream: the client gets an error soon, not a hang.
        stream = client.chat.completions.create(model=server.model, stream=True, **ask)
        shown = content_chunks(stream, 1)
        end = time.monotonic() + 60
        while "hanging in launch" not in server.log() and time.monotonic() < end:
            time.sleep(0.05)
        assert "hanging in launch" in server.log(), "the server is not inside the 2nd decode step"
        server.proc.kill()
        t = time.monotonic()
        with pytest.raises(openai.APIError):
            rest = [c for c in stream]
            raise AssertionError(f"the stream went on after the kill: {shown!r} + {len(rest)} chunks")
        assert time.monotonic() - t < 30
        assert shown and ref["answer"].startswith(shown) and shown != ref["answer"]

    for k in plans:
        monkeypatch.delenv(k)
    with running_server(tmp_path, "--backend", "bmodel", "-m", str(model)) as restarted:
        client = restarted.client(timeout=60)
        answer = client.chat.completions.create(model=restarted.model, **ask)
        assert (answer.choices[0].message.content, answer.usage.completion_tokens) == (ref["answer"], n)
        # A client that hangs up mid-stream (tests/test_server_load.py: the engine is freed at
        # the next token): the next request is answered in full, the same.
        stream = client.chat.completions.create(model=restarted.model, stream=True, **ask)
        assert content_chunks(stream, 1)
        stream.close()
        after = client.chat.completions.create(model=restarted.model, **ask)
        assert (after.choices[0].message.content, after.usage.completion_tokens) == (ref["answer"], n)

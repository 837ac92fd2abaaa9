"""A pre-imported model_transform.py, forked once per piece.

model_transform.py spends most of its time importing: its ONNX front end pulls in
onnxruntime_extensions, which imports transformers and torch (10-30 s per run, against a few
seconds of actual work on a small piece). The zygote imports all that once, then forks a child
per request; the child runs the unchanged script with runpy, in the piece's directory, with its
output in the piece's log. Same code, same arguments, same files: only the imports are shared.

Protocol (JSON lines): requests on stdin {"id", "cwd", "argv", "log"}; replies on stdout
{"ready": true} once, then {"id", "pid"} when a child starts and {"id", "rc"} when it ends.
Standard library only: it may run under a TPU-MLIR source build's own Python.
"""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

_REEXEC = "MLLAMA_TPU_ZYGOTE_ENV"
DISABLE_ENV = "MLLAMA_TPU_NO_ZYGOTE"  # set to 1 to run every tool as a plain subprocess


def _reply(lock: threading.Lock, msg: dict[str, Any]) -> None:
    with lock:
        sys.__stdout__.write(json.dumps(msg) + "\n")
        sys.__stdout__.flush()


def _child(tool: str, req: dict[str, Any]) -> None:
    code = 1
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdin.close()
        os.chdir(req["cwd"])
        sys.argv = [tool, *req["argv"]]
        try:
            runpy.run_path(tool, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - the log gets the story, the parent the exit code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(tool: str) -> None:
    if tool == "wheel" and not os.environ.get(_REEXEC):
        # The wheel sets PATH/LD_LIBRARY_PATH/PYTHONPATH in os.environ on import; the dynamic
        # loader only reads them at process start, so start again with them in place.
        import tpu_mlir  # noqa: F401

        os.environ[_REEXEC] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "mllama_tpu.compile.zygote", tool])
    if tool == "wheel":
        import tpu_mlir

        tool = os.path.join(tpu_mlir.package_path, "python", "tools", "model_transform.py")
    tools_dir = os.path.dirname(tool)
    sys.path[:0] = [tools_dir, os.path.dirname(tools_dir)]
    try:  # the expensive part, shared by every child; best effort (a child imports what is missing)
        import transform.OnnxConverter  # noqa: F401
    except Exception:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
    lock = threading.Lock()
    pending: dict[int, str] = {}
    cond = threading.Condition()

    def reap() -> None:
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                with cond:
                    if not pending and done.is_set():
                        return
                    cond.wait(0.2)
                continue
            with cond:
                rid = pending.pop(pid, None)
            if rid is not None:
                _reply(lock, {"id": rid, "rc": os.waitstatus_to_exitcode(status)})

    done = threading.Event()
    reaper = threading.Thread(target=reap, daemon=True)
    reaper.start()
    _reply(lock, {"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        with cond:
            pid = os.fork()
            if pid == 0:
                _child(tool, req)
            pending[pid] = req["id"]
            cond.notify_all()
        _reply(lock, {"id": req["id"], "pid": pid})
    done.set()
    reaper.join()


class TransformHandle:
    def __init__(self, client: "ZygoteClient", rid: str):
        self.client, self.rid = client, rid
        self.pid: int | None = None
        self.rc: int | None = None
        self.started = threading.Event()
        self.ended = threading.Event()

    def wait(self) -> int:
        self.ended.wait()
        return self.rc if self.rc is not None else 1


class ZygoteClient:
    """Driver side: starts the zygote and hands out one TransformHandle per request."""

    def __init__(self, tool: str, env: dict[str, str], python: str):
        from mllama_tpu import REPO_ROOT

        env = dict(env)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.proc = subprocess.Popen([python, "-m", "mllama_tpu.compile.zygote", tool], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.handles: dict[str, TransformHandle] = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.dead = False
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if msg.get("ready"):
                self.ready.set()
                continue
            h = self.handles.get(msg["id"])
            if h is None:
                continue
            if "pid" in msg:
                h.pid = msg["pid"]
                h.started.set()
            if "rc" in msg:
                h.rc = msg["rc"]
                h.ended.set()
        # The zygote is gone: release everyone still waiting (their pieces count as failed).
        self.dead = True
        self.ready.set()
        for h in self.handles.values():
            h.started.set()
            h.ended.set()

    def submit(self, argv: list[str], cwd: Path, log: Path) -> TransformHandle:
        self.ready.wait()
        with self.lock:
            self.next_id += 1
            rid = str(self.next_id)
            h = self.handles[rid] = TransformHandle(self, rid)
            if self.dead or self.proc.stdin is None:
                h.started.set()
                h.ended.set()
                return h
            self.proc.stdin.write(json.dumps({"id": rid, "cwd": str(cwd), "argv": argv, "log": str(log)}) + "\n")
            self.proc.stdin.flush()
        h.started.wait()
        return h

    def kill(self) -> None:
        """Interrupted: stop at once (its running children are killed by the job runner)."""
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1])

"""Bounded parallel runner for piece compiles.

Each job is a short list of commands run one after the other, all output going to the job's own
log file. At most `max_jobs` jobs run at once (never more than the machine's cores), and a new
job starts only if the memory it is expected to need is available: the expectation is learned
from the peak resident memory (psutil, whole process tree) of the jobs already finished, scaled
by ONNX size, starting from a cautious guess. Nothing waits on fixed sleeps; the loop wakes when
a job ends or every `poll` seconds to sample memory.

A failing job stops new ones from starting; the jobs already running finish (their pieces are
kept for a resume), then JobFailed carries the name, log path and last lines of the log. On
KeyboardInterrupt (or SIGTERM turned into one by the CLI) every running process tree is killed.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import psutil

GB = 1 << 30
# Before any job has been measured: a TPU-MLIR process with its libraries takes about 1 GB,
# and transform+deploy hold a few copies of the weights (npz, lowered, reordered).
_BASE_GUESS = int(1.5 * GB)
_PER_BYTE_GUESS = 6.0
_MIN_WEIGHT = 64 << 20  # small pieces are dominated by the fixed cost; do not extrapolate from them


class Handle(Protocol):
    pid: int | None

    def wait(self) -> int: ...


# How to start one command somewhere other than a plain subprocess (see zygote.py):
# (arguments after the tool, cwd, log path) -> running handle.
Launcher = Callable[[list[str], Path, Path], Handle]


@dataclass
class Step:
    cmd: list[str]
    via: Launcher | None = None

    @property
    def tool(self) -> str:
        return Path(self.cmd[0]).name


@dataclass
class Job:
    name: str
    steps: list[Step]
    cwd: Path
    log: Path
    env: dict[str, str]
    weight_bytes: int  # ONNX size: what memory use scales with
    on_success: Callable[["JobResult"], None] | None = None


@dataclass
class JobResult:
    name: str
    ok: bool
    seconds: float
    peak_rss: int
    returncode: int = 0
    error: str = ""


class JobFailed(Exception):
    def __init__(self, name: str, log: Path, detail: str, tail: list[str]):
        self.name, self.log, self.detail, self.tail = name, log, detail, tail
        lines = "\n".join(f"    {t}" for t in tail)
        super().__init__(f"piece {name} failed: {detail}; log: {log}\n  last lines of the log:\n{lines}")


def tail_lines(path: Path, n: int = 15) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-n:]


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def kill_tree(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@dataclass
class _Running:
    job: Job
    thread: threading.Thread
    started: float
    pid: int | None = None
    peak: int = 0
    result: JobResult | None = None


@dataclass
class MemoryModel:
    """Expected peak memory of a job from its weight size, learned from finished jobs."""

    samples: list[tuple[int, int]] = field(default_factory=list)  # (weight bytes, peak rss)

    def expect(self, weight: int) -> int:
        if not self.samples:
            return int(_BASE_GUESS + _PER_BYTE_GUESS * weight)
        w = max(weight, _MIN_WEIGHT)
        return max(int(peak * w / max(sw, _MIN_WEIGHT)) if w > sw else peak for sw, peak in self.samples)


class JobRunner:
    def __init__(self, max_jobs: int, progress: Callable[[JobResult], None] | None = None,
                 poll: float = 0.5, available: Callable[[], int] | None = None):
        self.max_jobs = max(1, min(max_jobs, os.cpu_count() or 1))
        self.progress = progress
        self.poll = poll
        self.available = available or (lambda: psutil.virtual_memory().available)
        self.memory = MemoryModel()
        self._wake = threading.Event()
        self._abort = threading.Event()  # set on interrupt: workers start no further step

    def _admit(self, job: Job, running: list[_Running]) -> bool:
        if not running:
            return True  # always make progress, even when memory looks short
        # Memory the running jobs will still take on top of what they hold now.
        growth = sum(max(self.memory.expect(r.job.weight_bytes) - r.peak, 0) for r in running)
        return self.available() - growth >= self.memory.expect(job.weight_bytes)

    def _work(self, r: _Running) -> None:
        job = r.job
        start = time.monotonic()
        rc, error = 0, ""
        try:
            job.cwd.mkdir(parents=True, exist_ok=True)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            job.log.write_text("")
            # Append mode: a launched tool may write the same file through its own descriptor.
            with open(job.log, "a") as log:
                for step in job.steps:
                    if self._abort.is_set():
                        rc, error = -1, "interrupted"
                        break
                    log.write("$ " + " ".join(step.cmd) + "\n")
                    log.flush()
                    handle: Handle
                    if step.via is None:
                        # Same process group as us: killing the compile's group kills its tools too.
                        handle = subprocess.Popen(step.cmd, cwd=job.cwd, env=job.env, stdout=log,
                                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                    else:
                        handle = step.via(step.cmd[1:], job.cwd, job.log)
                    r.pid = handle.pid
                    self._wake.set()
                    rc = handle.wait()
                    r.pid = None
                    if rc != 0:
                        error = f"{step.tool} exited with {rc}"
                        break
            result = JobResult(job.name, rc == 0, time.monotonic() - start, r.peak, rc, error)
            if result.ok and job.on_success:
                job.on_success(result)
        except Exception as e:  # noqa: BLE001 - reported as this job's failure
            result = JobResult(job.name, False, time.monotonic() - start, r.peak, rc, f"{type(e).__name__}: {e}")
        r.result = result
        self._wake.set()

    def run(self, jobs: list[Job]) -> list[JobResult]:
        pending = deque(jobs)
        running: list[_Running] = []
        results: list[JobResult] = []
        failed: tuple[Job, JobResult] | None = None
        try:
            while running or (pending and failed is None):
                while (pending and failed is None and len(running) < self.max_jobs
                       and self._admit(pending[0], running)):
                    job = pending.popleft()
                    r = _Running(job, threading.Thread(target=None), time.monotonic())
                    r.thread = threading.Thread(target=self._work, args=(r,), daemon=True)
                    running.append(r)
                    r.thread.start()
                self._wake.wait(self.poll)
                self._wake.clear()
                for r in running:
                    if r.pid is not None:
                        r.peak = max(r.peak, tree_rss(r.pid))
                for r in [r for r in running if r.result is not None]:
                    r.thread.join()
                    running.remove(r)
                    res = r.result
                    results.append(res)
                    if res.ok and res.peak_rss > 0:  # a job too short to be sampled says nothing
                        self.memory.samples.append((r.job.weight_bytes, res.peak_rss))
                    elif failed is None:
                        failed = (r.job, res)
                    if self.progress:
                        self.progress(res)
        except BaseException:
            self._abort.set()
            for r in running:
                if r.pid is not None:
                    kill_tree(r.pid)
            raise
        if failed:
            job, res = failed
            raise JobFailed(job.name, job.log, res.error, tail_lines(job.log))
        return results

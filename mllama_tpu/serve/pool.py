"""Many clients, few engines: one FIFO queue, one worker thread per engine (device).

A request is admitted while fewer than engines + max_queue requests are in flight; beyond that
it is refused at once (the app answers 429 with Retry-After) instead of waiting without bound.
The first free worker takes the oldest waiting request, so every engine stays busy and no
request overtakes another. A worker runs the session's producer (blocking) and hands each event
to the request's asyncio queue; the request's `cancelled` flag (a client that went away) is
polled by the producer between tokens, so the device is free again after one more token.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from mllama_tpu.errors import UserError
from mllama_tpu.inputs import PromptTooLong
from mllama_tpu.session import EngineFailed, LoadedModel, TurnDone, TurnRequest, produce_turn

log = logging.getLogger("mllama_tpu.serve")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Refused:
    """The producer refused the request (a UserError before PromptAccepted)."""
    message: str


@dataclass(frozen=True)
class Failed:
    """The engine raised: a device or runtime failure, not the client's fault."""
    message: str


@dataclass(frozen=True)
class Started:
    engine: int
    queue_s: float


_END = object()


class Job:
    """One request's turn: queued, then run by a worker; its events arrive on `events`."""

    _ids = itertools.count(1)

    def __init__(self, turn: TurnRequest, loop: asyncio.AbstractEventLoop, request_id: str):
        self.turn = turn
        self.request_id = request_id
        self.number = next(self._ids)
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()
        self.enqueued = time.perf_counter()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody listens
            pass

    async def next_event(self) -> Any:
        """The next event, or None once the job is over."""
        item = await self.events.get()
        return None if item is _END else item


class EnginePool:
    def __init__(self, models: list[LoadedModel], max_queue: int):
        if not models:
            raise ValueError("an engine pool needs at least one engine")
        self.models = models
        self.max_queue = max_queue
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy = 0
        self._turn_s = 1.0  # running mean of a turn's duration, for Retry-After
        # Read by each engine's own worker between turns (the engine is not to be asked mid-turn).
        self._memory = [dict(m.engine.memory) for m in models]
        self._workers = [threading.Thread(target=self._work, args=(i,), name=f"engine-{i}", daemon=True)
                         for i in range(len(models))]
        for w in self._workers:
            w.start()

    @property
    def capacity(self) -> int:
        return len(self.models) + self.max_queue

    def stats(self) -> dict:
        with self._lock:
            return {"engines": len(self.models), "busy": self._busy, "queued": self._in_flight - self._busy,
                    "memory": [dict(m) for m in self._memory]}

    def submit(self, turn: TurnRequest, request_id: str) -> Job:
        """Queue a turn; QueueFull when engines + max_queue requests are in flight already."""
        with self._lock:
            if self._in_flight >= self.capacity:
                waiting = self._in_flight - self._busy + 1
                raise QueueFull(max(1, min(60, math.ceil(self._turn_s * waiting / len(self.models)))))
            self._in_flight += 1
        job = Job(turn, asyncio.get_running_loop(), request_id)
        self._jobs.put(job)
        return job

    def close(self) -> None:
        for _ in self._workers:
            self._jobs.put(None)
        for w in self._workers:
            w.join(timeout=30)
        for m in self.models:
            m.close()

    def _work(self, index: int) -> None:
        model = self.models[index]
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._busy += 1
            started = time.perf_counter()
            try:
                if not job.cancelled:  # a client that left while waiting costs nothing
                    job._emit(Started(index, started - job.enqueued))
                    self._run(index, model, job, started)
            finally:
                memory = self._read_memory(index, model)
                with self._lock:
                    self._memory[index] = memory
                    self._busy -= 1
                    self._in_flight -= 1
                    self._turn_s = 0.8 * self._turn_s + 0.2 * (time.perf_counter() - started)
                job._emit(_END)

    def _read_memory(self, index: int, model: LoadedModel) -> dict[str, int]:
        try:
            return dict(model.engine.memory)
        except Exception as e:  # a failed engine may not answer: keep what it said last
            log.warning("engine %d: memory not readable: %s", index, e)
            return self._memory[index]

    def _run(self, index: int, model: LoadedModel, job: Job, started: float) -> None:
        try:
            for event in produce_turn(model, job.turn, lambda: job.cancelled):
                job._emit(event)
                if isinstance(event, TurnDone):
                    log.info(
                        "%s engine %d: %d prompt + %d answer tokens, waited %.3f s, FTL %.3f s, %.2f tokens/s, %s",
                        job.request_id, index, event.prompt_tokens, len(event.tokens), started - job.enqueued,
                        event.ftl_s, event.tps, event.stop_reason,
                    )
        except (UserError, PromptTooLong) as e:  # the request side counts the prompt first: rare
            job._emit(Refused(str(e)))
        except EngineFailed as e:  # a device fault: this request gets a 503, the next one runs afresh
            log.error("%s engine %d: %s", job.request_id, index, e)
            job._emit(Failed(f"{e}; the server keeps serving: retry the request"))
        except Exception as e:  # a bug of ours: the request gets a 503, the worker goes on
            log.error("%s engine %d failed: %s", job.request_id, index, e, exc_info=True)
            job._emit(Failed(f"the engine failed ({type(e).__name__}: {e})"))

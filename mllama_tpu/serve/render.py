"""Two renderers of one turn's events: SSE chunks as they come, or one whole response.

Both read the same events (TextPiece*, then TurnDone) from the same job, so a streamed answer
and a whole one cannot differ. finish_reason: "stop" for EOS or a stop string, "length" when
max_tokens or the sequence length ended the answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator

from mllama_tpu.generate import STOP_EOS, STOP_MAX_NEW_TOKENS, STOP_SEQLEN
from mllama_tpu.session import STOP_CANCELLED, STOP_STRING, TextPiece, TurnDone
from mllama_tpu.serve.errors import ApiError, error_body
from mllama_tpu.serve.pool import Failed, Job, Refused

# Every stop reason the session gives, by its owners' names: a new or renamed one fails here
# (KeyError) instead of becoming "stop" unnoticed. A cancelled turn's client is gone; its
# response, if one is still written, says "stop" as before.
_FINISH = {STOP_EOS: "stop", STOP_STRING: "stop", STOP_CANCELLED: "stop",
           STOP_MAX_NEW_TOKENS: "length", STOP_SEQLEN: "length"}


@dataclass(frozen=True)
class Meta:
    id: str
    created: int
    model: str
    engine: int
    queue_s: float


def finish_reason(stop_reason: str) -> str:
    return _FINISH[stop_reason]


def api_error(event: Refused | Failed) -> ApiError:
    """The one mapping of a refused or failed turn to its error body, before the response
    headers (app._until_started) and after them (the renderers) alike."""
    if isinstance(event, Refused):
        return ApiError(400, event.message, "messages", "invalid_value")
    return ApiError(503, event.message, None, "engine_failed")


def usage(done: TurnDone) -> dict:
    n = len(done.tokens)
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": n, "total_tokens": done.prompt_tokens + n}


def timings(done: TurnDone, meta: Meta) -> dict:
    return {"queue_s": round(meta.queue_s, 6), "ftl_s": round(done.ftl_s, 6), "tps": round(done.tps, 3),
            "engine": meta.engine}


async def _events(job: Job) -> AsyncIterator[TextPiece | TurnDone]:
    while True:
        event = await job.next_event()
        if event is None:
            return
        if isinstance(event, (Failed, Refused)):
            raise api_error(event)
        yield event


async def whole(job: Job, meta: Meta) -> dict:
    async for event in _events(job):
        if isinstance(event, TurnDone):
            return {
                "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": event.answer},
                             "finish_reason": finish_reason(event.stop_reason), "logprobs": None}],
                "usage": usage(event), "timings": timings(event, meta),
            }
    raise ApiError(503, "the turn ended without an answer (the server is shutting down?): retry")


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(job: Job, meta: Meta, include_usage: bool) -> AsyncIterator[str]:
    """SSE lines; closing the iterator (the client went away) cancels the turn at the next token."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return _sse(body)

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for event in _events(job):
                if isinstance(event, TextPiece):
                    if event.text:
                        yield chunk({"content": event.text})
                elif isinstance(event, TurnDone):
                    yield chunk({}, finish_reason(event.stop_reason), timings=timings(event, meta))
                    if include_usage:
                        yield _sse({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                                    "model": meta.model, "choices": [], "usage": usage(event)})
        except ApiError as e:  # the headers are sent: the error goes in the stream, as OpenAI does
            yield _sse(error_body(e.status, e.message, e.param, e.code))
        yield _sse("[DONE]")
    finally:
        job.cancel()

"""The HTTP API: /v1/chat/completions, /v1/models, /health, and the chat page at /.

One request path: validate and prepare the turn (in a worker thread: tokenizing and decoding an
image take CPU), queue it, wait until the producer accepts the prompt (so a refusal is still an
HTTP error, not a broken stream), then render the events as SSE or as one response.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from mllama_tpu.serve import errors, render
from mllama_tpu.serve.conversation import Limits, PromptCounter, prepare_turn
from mllama_tpu.serve.errors import ApiError
from mllama_tpu.serve.guard import Guard
from mllama_tpu.serve.pool import EnginePool, Failed, QueueFull, Refused, Started
from mllama_tpu.serve.schema import ChatCompletion, ChatCompletionRequest, ErrorResponse, Health, ModelCard, ModelList
from mllama_tpu.session import PromptAccepted

_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "invalid request (what, where, what to do)", 401: "missing or wrong API key", 404: "unknown model or route",
    413: "body over the size limit", 422: "body does not match the schema", 429: "queue full (see Retry-After)",
    503: "engine failed or server shutting down"}.items()}


@dataclass(frozen=True)
class ServerConfig:
    served_name: str
    limits: Limits = Limits()
    api_key: str | None = None
    max_body_bytes: int = 16 << 20


def page_html() -> str:
    return resources.files("mllama_tpu.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(pool: EnginePool, counter: PromptCounter, config: ServerConfig):
    """The ASGI app (the FastAPI app behind the key/size guard); `.fastapi` is the inner app."""
    created = int(time.time())
    app = FastAPI(title="mllama-tpu", version="0.1.0", docs_url=None, redoc_url=None,
                  description="OpenAI-compatible chat completions with one image per conversation, "
                              "served by Llama-3.2-Vision on a BM1684X (or its simulator).")
    errors.install(app)
    html = page_html()
    seq = pool.models[0].seq_length

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(html)

    @app.get("/health", response_model=Health)
    async def health():
        return Health(**pool.stats())

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]})
    async def models():
        return ModelList(data=[ModelCard(id=config.served_name, created=created)])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses={k: _ERRORS[k] for k in (401, 404)})
    async def model(model_id: str):
        if model_id != config.served_name:
            raise ApiError(404, f"model {model_id!r} is not served here: use {config.served_name!r}", "model",
                           "model_not_found")
        return ModelCard(id=config.served_name, created=created)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                         "description": "a ChatCompletion, or with stream=true SSE chunks ending in [DONE]"},
                   **_ERRORS},
        summary=f"chat completion (one image per conversation; prompt + answer <= {seq} tokens)",
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prepared = await run_in_threadpool(prepare_turn, body, counter, seq, config.served_name, config.limits)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            job = pool.submit(prepared.turn, request_id)
        except QueueFull as e:
            raise ApiError(429, f"all {len(pool.models)} engine(s) are busy and {pool.max_queue} request(s) wait "
                           f"already: retry in {e.retry_after_s} s", None, "queue_full",
                           {"Retry-After": str(e.retry_after_s)}) from None
        try:
            started = await _until_started(job, request)
        except BaseException:
            job.cancel()
            raise
        if started is None:  # the client left while waiting
            return JSONResponse(errors.error_body(400, "client disconnected"), status_code=400)
        meta = render.Meta(request_id, int(time.time()), config.served_name, started.engine, started.queue_s)
        headers = {"x-request-id": request_id, "x-mllama-engine": str(started.engine)}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(render.stream(job, meta, include_usage), media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})
        try:
            whole = await _unless_disconnected(render.whole(job, meta), request)
        finally:
            job.cancel()
        if whole is None:  # the client left: nobody reads this
            return JSONResponse(errors.error_body(400, "client disconnected"), status_code=400)
        return JSONResponse(whole, headers=headers)

    def openapi() -> dict:
        # The schema names what this server takes: its one model id, and max_tokens below SEQ.
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
            props["model"]["enum"] = [config.served_name]
            for name in ("max_tokens", "max_completion_tokens"):
                for branch in props[name].get("anyOf", [props[name]]):
                    if branch.get("type") == "integer":
                        branch["maximum"] = seq - 1
        return app.openapi_schema

    app.openapi = openapi
    return Guard(app, config.api_key, config.max_body_bytes)


async def _until_started(job, request: Request) -> Started | None:
    """Wait for an engine and for the producer to accept the prompt; None if the client left."""
    started = None
    while True:
        event = await _unless_disconnected(job.next_event(), request)
        if event is None:
            return None
        if isinstance(event, Started):
            started = event
        elif isinstance(event, PromptAccepted):
            return started
        elif isinstance(event, (Refused, Failed)):
            raise render.api_error(event)


async def _unless_disconnected(awaitable, request: Request, poll_s: float = 0.1):
    """Await `awaitable`, checking the connection meanwhile: a client that disconnects gets its
    turn cancelled (the caller's job.cancel()) instead of holding the engine."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()

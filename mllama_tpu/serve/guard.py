"""The door: the API key and the body size limit, checked before any route runs.

Pure ASGI (not Starlette's BaseHTTPMiddleware, which would break streaming and hide a client's
disconnect from the stream). The body is read here, up to the limit, and replayed to the app;
after it, `receive` is the server's own again, so the app still sees http.disconnect.
"""
from __future__ import annotations

import hmac

from mllama_tpu.serve.errors import error_bytes

DRAIN_BYTES = 64 << 20
OPEN_PATHS = ("/health", "/")  # the liveness probe, and the static page (it holds no data; it asks for the key)


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            return await _answer(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                 "invalid_api_key", {"www-authenticate": "Bearer"})
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        limit = self.max_body_bytes
        too_big = f"the request body is over this server's limit of {limit} bytes: send a smaller image or conversation"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _drain(receive, int(declared))
            return await _answer(send, 413, too_big, "request_too_large")
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                if more:
                    await _drain(receive, len(body) + DRAIN_BYTES)
                return await _answer(send, 413, too_big, "request_too_large")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        return False


async def _drain(receive, upto: int) -> None:
    """Read (and drop) what the client is still sending, so that it reads our 413 instead of
    failing to write into a closed connection; bounded, so a huge upload only ends sooner."""
    seen = 0
    upto = min(upto, DRAIN_BYTES)
    while seen < upto:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _answer(send, status: int, message: str, code: str, extra: dict[str, str] | None = None) -> None:
    body = error_bytes(status, message, None, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

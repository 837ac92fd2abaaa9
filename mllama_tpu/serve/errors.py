"""Every error the server answers, as OpenAI's error JSON with its HTTP status.

{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}: the message says what was
wrong, where (param names the field, e.g. messages[0].content[1].image_url) and what to do.
A bug of ours is logged with its traceback for the operator and answered as a 500 without one.
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("mllama_tpu.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_bytes(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """The same body for the ASGI middleware, which answers before FastAPI sees the request."""
    return json.dumps(error_body(status, message, param, code)).encode()


def field_path(loc: tuple) -> str:
    """pydantic's location ('body', 'messages', 0, 'role') as the field OpenAI would name:
    messages[0].role. The union members pydantic inserts ('str', 'list[tagged-union[...]]') and
    the tag after a tagged-union index ('image_url') are not fields, so they are dropped."""
    out, tag_next = "", False
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if tag_next:
            tag_next = False
            continue
        if "[" in part or part in ("str", "int", "float", "bool", "none", "function-after"):
            tag_next = "tagged-union" in part
            continue
        out += f".{part}" if out else part
    return out


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str | None, str]:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}).get("error", "")
        return 400, f"the request body is not valid JSON ({ctx}): send a JSON object", None, "invalid_json"
    loc = tuple(first.get("loc", ()))
    if loc == ("body",):
        return 400, "the request body is missing or not a JSON object: send a JSON object", None, "invalid_json"
    param = field_path(loc)
    if first.get("type") == "missing":
        return 422, f"missing required parameter '{param}'", param, "missing_required_parameter"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return 422, f"invalid '{param}': {first.get('msg')}{more}", param, "invalid_value"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        status, message, param, code = _validation_message(exc)
        return error_response(status, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see /openapi.json for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal server error ({type(exc).__name__}); the server keeps serving")

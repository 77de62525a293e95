"""Every error the API returns has OpenAI's shape: ``{"error": {message, type, param, code}}``.

Clients (the openai SDK, OpenWebUI, LibreChat) map the status to an exception class and
show ``message``; FastAPI's default ``{"detail": …}`` would reach users as noise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from layers.store.base import StoreError

log = logging.getLogger("ai_sysadmin.gateway")

# status → OpenAI error type, as OpenAI's own API uses them.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """An error to return to the client, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            json.dumps(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


def error_response(status: int, message: str, **kw: Any) -> Response:
    return OpenAIError(status, message, **kw).response()


def _param_from_loc(loc: Sequence[int | str]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def validation_error(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    """The first validation problem as a 400 with ``param`` naming the field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param_from_loc(first.get("loc", ()))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        msg = "is required"
    elif first.get("type") == "extra_forbidden":
        msg = "is not a recognised field"
    text = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return OpenAIError(400, text, param=param, code="invalid_value")


def response_for(exc: Exception) -> Response:
    """The answer to an error a handler raised (FastAPI's routes and the fast path alike)."""
    if isinstance(exc, OpenAIError):
        return exc.response()
    if isinstance(exc, StoreError):
        # The store is full, restarting or not open (yet / any more): the request was not
        # stored and may be retried. One line in the log, no traceback per request.
        log.warning("store unavailable: %s", exc)
        return error_response(
            503, f"the store is unavailable, retry later ({exc})", code="store_unavailable",
            headers={"Retry-After": "2"},
        )
    log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "internal error in the gateway", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
            code = "unknown_url"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            code = "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return error_response(exc.status_code, message, code=code, headers=exc.headers)

    async def _response_for(_: Request, exc: Exception) -> Response:
        return response_for(exc)

    for kind in (OpenAIError, StoreError, Exception):
        app.add_exception_handler(kind, _response_for)

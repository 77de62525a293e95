"""Every error the API returns has OpenAI's shape: ``{"error": {message, type, param, code}}``.

Clients (the openai SDK, OpenWebUI, LibreChat) map the status to an exception class and
show ``message``; FastAPI's default ``{"detail": …}`` would reach users as noise.

This is the one place that turns exceptions into HTTP answers (:func:`openai_error`,
registered once on the app by :func:`install_error_handlers` and used by the fast path):
routes raise the layers' errors (layers/errors.py) as they come and need no translation.
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

from layers.actions.service import ActionError
from layers.client import LayerError
from layers.errors import AiSysadminError

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


class OpenAIError(AiSysadminError):
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


# ActionError's code (layers/actions/service.py) → status; any other code is a 400.
ACTION_STATUS: dict[str, int] = {"not_found": 404, "not_pending": 409, "refused": 409}

INTERNAL_MESSAGE = "internal error in the gateway"


def openai_error(exc: AiSysadminError) -> OpenAIError:
    """The OpenAI-shaped answer to one of our errors (layers/errors.py says which)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, LayerError):
        # The layer's own status and code; a 429's Retry-After and the upstream's
        # ``param`` pass through, so a client sees what the layer said.
        headers = ({"Retry-After": str(max(1, round(exc.retry_after)))}
                   if exc.retry_after else None)
        param = None
        if exc.upstream_body and isinstance(exc.upstream_body.get("error"), dict):
            param = exc.upstream_body["error"].get("param")
        return OpenAIError(exc.status, exc.message, code=exc.code, param=param, headers=headers)
    if isinstance(exc, ActionError):
        return OpenAIError(ACTION_STATUS.get(exc.code, 400), exc.message,
                           code=f"action_{exc.code}")
    if exc.http_status is None:
        # Not an answer for a client (a failure of ours, or the operator's to fix): the
        # message may name paths or addresses, so it goes to the log with its traceback.
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return OpenAIError(500, INTERNAL_MESSAGE, code="internal_error")
    if exc.http_status >= 500 and exc.http_log:
        # Expected (the store is full, restarting): one line per request, no traceback.
        log.warning("%s: %s", exc.http_log, exc)
    headers = ({"Retry-After": str(exc.http_retry_after)}
               if exc.http_retry_after is not None else None)
    return OpenAIError(exc.http_status, exc.http_message.format(exc), code=exc.openai_code,
                       headers=headers)


def response_for(exc: Exception) -> Response:
    """The answer to an error a handler raised (FastAPI's routes and the fast path alike)."""
    if isinstance(exc, AiSysadminError):
        return openai_error(exc).response()
    log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return error_response(500, INTERNAL_MESSAGE, code="internal_error")


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

    for kind in (AiSysadminError, Exception):
        app.add_exception_handler(kind, _response_for)

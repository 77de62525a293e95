"""The chat route served without FastAPI's routing and dependency solving.

Why: time to first token through the gateway is the model's plus what the gateway adds.
On an idle gateway (one chat every few seconds, cold CPU caches), timestamps inside the
gateway put FastAPI's router, exception middleware and dependency solving at about 0.4 ms
of the 1 ms between a request's arrival and its departure to the layer. Here the hottest
routes go straight to their handlers: the same handler functions and the same key check
as the FastAPI routes (a test keeps the two tables equal), errors in the same OpenAI shape.
Every other request, and the lifespan, goes to the FastAPI app unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from gateway.auth import require_key
from gateway.errors import response_for
from gateway.protocol import write_hold, writes_held
from gateway.routes import openai

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[Request], Awaitable[Response]]
Guard = Callable[[Request], Awaitable[None]]
RouteTable = Mapping[tuple[str, str], tuple[Guard, Handler]]

# (method, path) -> (the route's dependency, its handler), as declared in routes/openai.py.
ROUTES: RouteTable = {
    ("POST", "/v1/chat/completions"): (require_key, openai.chat_completions),
    ("POST", "/chat/completions"): (require_key, openai.chat_completions),
}


class FastPaths:
    """ASGI app: :data:`ROUTES` directly, everything else through ``app``."""

    def __init__(self, app: FastAPI, routes: RouteTable = ROUTES) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get((scope.get("method", ""), scope.get("path", "")))
        if route is None or scope["type"] != "http":
            await self.app(scope, receive, send)  # type: ignore[arg-type]
            return
        scope["app"] = self.app  # what Starlette sets: handlers reach the state through it
        request = Request(scope, receive)  # type: ignore[arg-type]
        guard, handler = route
        try:
            await guard(request)
            response = await handler(request)
        except Exception as exc:  # noqa: BLE001 - every error becomes an OpenAI-shaped answer
            response = response_for(exc)
        # Head and body in one write; a stream holds its own head, and a background task
        # must not keep the answer back.
        whole = not isinstance(response, StreamingResponse) and response.background is None
        with writes_held(write_hold(scope) if whole else None):
            await response(scope, receive, send)  # type: ignore[arg-type]

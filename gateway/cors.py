"""CORS for browser clients (Open WebUI's direct connections call the API from the page).

An ASGI wrapper around the whole served app (the fast path included), so every answer —
errors, streams, Server-Sent Events — carries the headers. ``gateway.cors_origins`` is
the allowlist, matched exactly against the ``Origin`` header; empty (the default) means
no cross-origin access at all:

- a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is
  answered here, before any key check (browsers send no credentials with it): 204 with
  the allowed method and headers for a listed origin, 403 in OpenAI's error shape for
  any other;
- an actual request from a listed origin gets ``Access-Control-Allow-Origin`` (the origin
  itself, or ``*`` when the list is ``["*"]``), ``Vary: Origin`` and the headers a client
  may read; a GET from any other origin is served unchanged (the browser keeps the
  answer from the page), and any other method from another origin — a form or a
  "simple" fetch, which needs no preflight — is refused with 403 before it reaches a
  route, unless it is the gateway's own origin (the dashboard);
- ``Access-Control-Allow-Credentials`` only with ``gateway.cors_allow_credentials`` and
  never with ``*`` (the configuration refuses that pair).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from layers.config import GatewayConfig

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

METHODS = b"GET, POST, OPTIONS"
# Methods a cross-site page may send through the admin's browser (their answers it
# cannot read without CORS); anything else from another origin is refused outright.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Always allowed (the key, JSON bodies, resuming an event stream); further headers a
# listed origin asks for in its preflight are allowed too (the OpenAI SDK sends its
# x-stainless-* headers): they grant nothing the key does not.
BASE_HEADERS = ("authorization", "content-type", "last-event-id")
EXPOSE = b"Retry-After, X-Ai-Sysadmin-Layer, X-Ai-Sysadmin-Max-Tokens"
MAX_AGE = b"600"
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


def _header(scope: Scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope.get("headers", ()) if k == name]


class Cors:
    """ASGI middleware answering preflights and labelling answers for allowed origins."""

    def __init__(self, app: ASGIApp, cfg: GatewayConfig) -> None:
        self.app = app
        self.any = "*" in cfg.cors_origins
        self.origins = frozenset(o.encode() for o in cfg.cors_origins if o != "*")
        self.enabled = bool(cfg.cors_origins)
        self.credentials = cfg.cors_allow_credentials and not self.any

    def allowed(self, origin: bytes) -> bool:
        return self.any or origin in self.origins

    def _allow_origin(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        out = [(b"access-control-allow-origin", b"*" if self.any else origin)]
        if self.credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origins = _header(scope, b"origin")
        if not origins:
            if self.enabled:  # the answer differs with the Origin: caches must know
                await self.app(scope, receive, _vary(send, None))
            else:
                await self.app(scope, receive, send)
            return
        origin = origins[0] if len(origins) == 1 else b""
        method = _header(scope, b"access-control-request-method")
        if scope.get("method") == "OPTIONS" and method:
            await self.preflight(origin, method[0], scope, send)
            return
        if (scope.get("method") not in SAFE_METHODS and not (origin and self.allowed(origin))
                and not _same_origin(origin, scope)):
            # A page of another site posting through the admin's browser (a form or a
            # "simple" fetch needs no preflight): refused before it reaches any route —
            # with no API key configured, loopback would otherwise serve it.
            await _refuse(send, origin, "a cross-site request that changes state"
                          if not self.enabled else "it is not in gateway.cors_origins")
            return
        extra = self._allow_origin(origin) if origin and self.allowed(origin) else None
        if extra is not None:
            extra.append((b"access-control-expose-headers", EXPOSE))
        if extra is None and not self.enabled:
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, _vary(send, extra))

    async def preflight(self, origin: bytes, method: bytes, scope: Scope, send: Send) -> None:
        vary = (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        if not origin or not self.allowed(origin):
            await _refuse(send, origin, "gateway.cors_origins is empty: no cross-origin access"
                          if not self.enabled else "it is not in gateway.cors_origins", vary)
            return
        asked = b",".join(_header(scope, b"access-control-request-headers")).decode("latin-1")
        names = list(BASE_HEADERS)
        for name in (h.strip().lower() for h in asked.split(",")):
            if name and TOKEN.fullmatch(name) and name not in names:
                names.append(name)
        headers = [
            *self._allow_origin(origin),
            (b"access-control-allow-methods", METHODS),
            (b"access-control-allow-headers", ", ".join(names[:64]).encode()),
            (b"access-control-max-age", MAX_AGE),
            vary,
        ]
        # Chromium's Private Network Access: a page of a public origin asks before it may
        # reach a private or loopback address.
        if _header(scope, b"access-control-request-private-network") == [b"true"]:
            headers.append((b"access-control-allow-private-network", b"true"))
        await _answer(send, 204, headers, b"")


def _same_origin(origin: bytes, scope: Scope) -> bool:
    """The page was served by this gateway (the dashboard): its Origin names the host the
    request was sent to. Browsers send Origin on same-origin POSTs too."""
    hosts = _header(scope, b"host")
    if not origin or len(hosts) != 1:
        return False
    scheme = scope.get("scheme", "http").encode()
    return origin == scheme + b"://" + hosts[0]


async def _refuse(send: Send, origin: bytes, why: str,
                  *extra: tuple[bytes, bytes]) -> None:
    shown = origin.decode("latin-1")[:200]
    body = json.dumps({"error": {
        "message": f"cross-origin request from {shown!r} refused: {why}",
        "type": "permission_error", "param": "Origin", "code": "cors_origin_not_allowed",
    }}).encode()
    await _answer(send, 403, [*extra, (b"content-type", b"application/json")], body)


def _vary(send: Send, extra: list[tuple[bytes, bytes]] | None) -> Send:
    """``send`` with ``Vary: Origin`` (and ``extra``) added to the response's head."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", ())
                       if k.lower() not in (b"vary", b"access-control-allow-origin")]
            vary = [v for k, v in message.get("headers", ()) if k.lower() == b"vary"]
            values = [p.strip() for v in vary for p in v.split(b",") if p.strip()]
            if not any(p.lower() == b"origin" for p in values):
                values.append(b"Origin")
            headers.append((b"vary", b", ".join(values)))
            headers.extend(extra or ())
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]],
                  body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def with_cors(app: ASGIApp, cfg: GatewayConfig) -> ASGIApp:
    """``app`` behind the CORS middleware."""
    return Cors(app, cfg)

"""Talking to our own gateway: the one client module of the processes that call its HTTP
API as a client would — the ``ai-sysadmin`` CLI (``approvals``, ``notify``, ``events
tail``, ``incidents``), the daemon (it follows ``GET /v1/events/stream``) and the
collectors' sink (``POST /v1/events``).

- where it is: ``base_url`` (``gateway.host``/``port`` through ``loopback_url`` of
  layers/config.py, or a URL given);
- which key to send: ``api_key`` (the daemon's and the pipeline commands'),
  ``admin_key`` (approvals, notifications), ``bearer``;
- one request that fails as ``GatewayError`` (``request``, the CLI's);
- ``AsyncGateway``: a POST retried with backoff until the gateway takes it (the sink),
  and the event stream opened at a position (``Last-Event-ID``; the daemon, ``events
  tail``), parsed by ``sse_events``; ``Backoff`` is the doubling wait both retry with.

Timeouts, retries and messages stay the callers' own: each passes what it always used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from typing import TYPE_CHECKING, Any

import httpx

from layers.errors import Unavailable

if TYPE_CHECKING:
    from layers.config import Settings

log = logging.getLogger("ai_sysadmin.gateway_client")

STREAM_PATH = "/v1/events/stream"


def base_url(settings: Settings, override: str | None = None) -> str:
    """``override`` (``--url``) when given, else the configured gateway on this machine."""
    return (override or settings.gateway.local_url).rstrip("/")


def api_key(settings: Settings) -> str | None:
    """The key of a pipeline client: ``collectors.api_key``; on a fleet agent its host
    key (``fleet.key_file``); else the first of ``gateway.api_keys`` / ``api_keys_file``."""
    if settings.collectors.api_key:
        return settings.collectors.api_key
    if settings.fleet.role == "agent" and settings.fleet.key_file is not None:
        # A fleet agent posts its host's events with its host key (docs/fleet.md).
        try:
            return settings.fleet.key_file.read_text().strip() or None
        except OSError:
            return None
    keys = settings.gateway.resolved_api_keys()
    return keys[0] if keys else None


def admin_key(settings: Settings) -> str | None:
    """The admin key (``gateway.admin_key[_file]``), else the first API key: what may
    approve actions and reach the notification API."""
    key = settings.gateway.resolved_admin_key()
    if key is None:
        keys = settings.gateway.resolved_api_keys()
        key = keys[0] if keys else None
    return key


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class GatewayError(Unavailable):
    """The gateway did not answer (``cause``: the httpx error) or refused (``status``;
    ``message``: its OpenAI-shaped error's message, None without one; ``body``: as sent)."""

    def __init__(self, url: str, *, status: int | None = None, message: str | None = None,
                 body: str = "", cause: httpx.HTTPError | None = None) -> None:
        self.url, self.status, self.message, self.body, self.cause = (
            url, status, message, body, cause
        )
        super().__init__(f"{type(cause).__name__}: {cause}" if cause else f"status {status}")


def error_message(response: httpx.Response) -> str | None:
    """The ``error.message`` of the gateway's OpenAI-shaped error; None without one."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return None


def request(method: str, url: str, *, key: str | None, json: Any = None,
            params: dict[str, Any] | None = None, timeout: float,
            ok: Collection[int] = range(200, 400)) -> httpx.Response:
    """One synchronous request; ``GatewayError`` when it fails or its status is not ``ok``."""
    try:
        r = httpx.request(method, url, json=json, params=params, headers=bearer(key),
                          timeout=timeout)
    except httpx.HTTPError as exc:
        raise GatewayError(url, cause=exc) from None
    if r.status_code not in ok:
        raise GatewayError(url, status=r.status_code, message=error_message(r), body=r.text)
    return r


class Backoff:
    """Waits that start at ``first`` and double up to ``most``; ``reset`` after a success."""

    def __init__(self, first: float, most: float) -> None:
        self.first, self.most, self.wait = first, most, first

    def reset(self) -> None:
        self.wait = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.wait)
        self.wait = min(self.wait * 2, self.most)


class AsyncGateway:
    """An async client of the gateway at ``base``, sending ``key`` as a bearer token."""

    def __init__(self, base: str, key: str | None, *,
                 timeout: httpx.Timeout | float = 30.0,
                 client: httpx.AsyncClient | None = None) -> None:
        self.base = base.rstrip("/")
        self.headers = bearer(key)
        self.client = client or httpx.AsyncClient(timeout=timeout)

    async def post_retrying(self, path: str, body: Any, backoff: Backoff, *, what: str,
                            logger: logging.Logger = log) -> None:
        """POST until the gateway answers 2xx, waiting ``backoff`` between tries. A 4xx
        other than 408/429 (our bug, a wrong key) is logged as an error (``what`` was
        refused) and still retried: what is sent must not vanish silently."""
        url = self.base + path
        while True:
            try:
                r = await self.client.post(url, json=body, headers=self.headers)
                if r.status_code < 300:
                    return
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    logger.error("gateway refused %s: %s %s", what, r.status_code, r.text[:300])
            except httpx.HTTPError as exc:
                logger.warning("gateway unreachable (%s); retrying in %.0fs",
                               type(exc).__name__, backoff.wait)
            await backoff.sleep()

    @contextlib.asynccontextmanager
    async def stream(self, params: dict[str, Any], *,
                     last_event_id: str | None = None) -> AsyncIterator[httpx.Response]:
        """``GET /v1/events/stream`` after event ``last_event_id`` (``Last-Event-ID``;
        None: from the start). A status other than 200 raises ``GatewayError`` (body
        read); a transport failure, on connect or mid-stream, is the httpx error."""
        headers = dict(self.headers)
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        url = self.base + STREAM_PATH
        async with self.client.stream("GET", url, params=params, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                raise GatewayError(url, status=r.status_code, message=error_message(r),
                                   body=r.text)
            yield r

    async def aclose(self) -> None:
        await self.client.aclose()


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """Parse a ``text/event-stream`` body into {id, event, data} dicts."""
    current: dict[str, str] = {}
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data or current:
                yield {**current, "data": "\n".join(data)}
            current, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event"):
            current[name] = value

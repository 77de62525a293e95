"""A reference point, not a product: how cheap a Python proxy can be on uvicorn.

A bare ASGI app (no FastAPI, no httpx) that forwards ``POST /v1/chat/completions`` to
``BENCH_UPSTREAM`` over a small pool of keep-alive HTTP/1.1 connections on raw asyncio
streams, relaying a streamed answer chunk by chunk. It shows what the gateway's hot path
could cost if its upstream client and routing were this thin. Opt-in bench path
``lean``. Run: ``BENCH_UPSTREAM=http://127.0.0.1:9000 uvicorn bench.lean_proxy:app``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_up = urlsplit(os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9000"))
HOST, PORT = _up.hostname or "127.0.0.1", _up.port or 80
_idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []


async def _connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    while _idle:
        r, w = _idle.pop()
        if not w.is_closing() and not r.at_eof():
            return r, w
    return await asyncio.open_connection(HOST, PORT)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
        code = 200 if scope["path"] == "/health" else 404
        await send({"type": "http.response.start", "status": code,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    reader, writer = await _connect()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\n"
                 b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
                 % (HOST.encode(), PORT, len(body)) + body)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    ctype = headers.get(b"content-type", b"application/json")
    if b"content-length" in headers:
        data = await reader.readexactly(int(headers[b"content-length"]))
        _idle.append((reader, writer))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": data})
        return
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"cache-control", b"no-cache")]})
    try:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            data = (await reader.readexactly(size + 2))[:-2]
            await send({"type": "http.response.body", "body": data, "more_body": True})
    except BaseException:
        writer.close()
        raise
    _idle.append((reader, writer))
    await send({"type": "http.response.body", "body": b""})

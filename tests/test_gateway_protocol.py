"""WriteHold (gateway/protocol.py) on a real loopback connection: held writes leave as
one, a close sends what was held, an abort drops it; the protocol in real uvicorn; the
settings that turn the protocol and the fast paths off (gateway.fast_protocol,
gateway.fast_paths)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.cors import Cors
from gateway.fastpath import FastPaths
from gateway.protocol import HttpProtocol, WriteHold, write_hold, writes_held
from gateway.server import QuietServer, make_server
from layers.config import Settings

# The writer stays referenced: a StreamWriter that is collected closes its transport.
_writers: list[asyncio.StreamWriter] = []


async def _pair() -> tuple[WriteHold, asyncio.StreamReader, asyncio.AbstractServer]:
    accepted: asyncio.Future[asyncio.StreamReader] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(reader)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _writers.append(writer)
    return WriteHold(writer.transport), await accepted, server  # type: ignore[arg-type]


async def _nothing_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return True
    return False


async def test_held_writes_leave_as_one_on_release() -> None:
    hold, peer, server = await _pair()
    async with server:
        hold.write(b"plain ")
        assert await peer.readexactly(6) == b"plain "
        hold.hold()
        hold.write(b"head|")
        hold.writelines([b"first ", memoryview(b"event")])
        assert await _nothing_within(peer, 0.2)
        hold.release()
        assert await peer.read(65536) == b"head|first event"  # one write, one read
        hold.write(b" after")  # no longer held
        assert await peer.readexactly(6) == b" after"
        hold.close()
        assert await peer.read() == b""


@pytest.mark.parametrize(("end", "received"), [("close", b"last words"), ("abort", b"")])
async def test_close_sends_what_was_held_and_abort_drops_it(end: str, received: bytes) -> None:
    hold, peer, server = await _pair()
    async with server:
        hold.hold()
        hold.write(b"last words")
        getattr(hold, end)()
        assert await peer.read() == received
        hold.release()  # nothing left, and the transport is closed: no error


# -- through real uvicorn ----------------------------------------------------------------------
# The protocol subclasses uvicorn's private HttpToolsProtocol (pyproject.toml bounds uvicorn
# to the minor series it was written against): these run the real server on a loopback
# port, so a uvicorn whose internals moved fails here, not in production.

BODY = b'{"first": "event"}'
PAUSE = 0.5  # between the head and the body, as between a stream's head and first event


async def _held_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Holds its writes where the server offers it, sends the head, waits, sends the body."""
    assert scope["type"] == "http"
    hold = write_hold(scope)
    with writes_held(hold):
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY)),
            (b"x-hold", b"yes" if hold is not None else b"no")]})
        await asyncio.sleep(PAUSE)
        await send({"type": "http.response.body", "body": BODY})


@contextlib.asynccontextmanager
async def _uvicorn(app: Any, http: Any) -> AsyncIterator[int]:
    """uvicorn serving ``app`` on an ephemeral loopback port (signals left alone)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = QuietServer(uvicorn.Config(app, http=http, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), task
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def _first_read(port: int) -> bytes:
    """What the first read of a GET's answer returns: the bytes of the first segment(s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        return await asyncio.wait_for(reader.read(65536), PAUSE * 6)
    finally:
        writer.close()


@pytest.mark.skipif(HttpProtocol is None, reason="httptools is not installed")
async def test_uvicorn_with_the_protocol_sends_a_held_head_with_its_body() -> None:
    async with _uvicorn(_held_app, HttpProtocol) as port:
        first = await _first_read(port)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nx-hold: yes\r\n" in first
    assert first.endswith(b"\r\n\r\n" + BODY)  # the head waited for the body: one write


@pytest.mark.skipif(HttpProtocol is None, reason="httptools is not installed")
async def test_uvicorns_own_protocol_offers_no_hold_and_sends_the_head_alone() -> None:
    """What gateway.fast_protocol = false serves: the app writes as usual (and the
    assertion above is not one that any server passes)."""
    async with _uvicorn(_held_app, "httptools") as port:
        first = await _first_read(port)
    assert first.startswith(b"HTTP/1.1 200 ") and b"\r\nx-hold: no\r\n" in first
    assert first.endswith(b"\r\n\r\n")  # the head left before the body was sent


class _SlowBody(Response):
    """A whole (non-streamed) answer whose body is sent a moment after its head."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        await asyncio.sleep(PAUSE)
        await send({"type": "http.response.body", "body": self.body})


async def _open(request: Request) -> None:
    return None


async def _slow_answer(request: Request) -> Response:
    return _SlowBody(BODY, media_type="application/json")


@pytest.mark.skipif(HttpProtocol is None, reason="httptools is not installed")
async def test_a_fast_path_answer_leaves_as_one_write_through_real_uvicorn() -> None:
    fast = FastPaths(FastAPI(), routes={("GET", "/"): (_open, _slow_answer)})
    async with _uvicorn(fast, HttpProtocol) as port:
        first = await _first_read(port)
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"\r\n\r\n" + BODY)


# -- the settings that turn each shortcut off -------------------------------------------------


def _settings(tmp: Path, **gateway: Any) -> Settings:
    return Settings.model_validate({"state_dir": str(tmp / "state"), "memory": {"enabled": False},
                                    "gateway": {"api_keys": ["k"], **gateway}})


def _served(server: uvicorn.Server) -> Any:
    app = server.config.app
    assert isinstance(app, Cors)  # CORS stays outermost whatever else is switched off
    return app.app


def test_both_shortcuts_are_on_by_default(tmp_path: Path) -> None:
    g = _settings(tmp_path).gateway
    assert g.fast_protocol and g.fast_paths
    server = make_server(_settings(tmp_path))
    assert server.config.http is (HttpProtocol or "auto")
    assert isinstance(_served(server), FastPaths)


def test_fast_protocol_false_serves_uvicorns_own_protocol(tmp_path: Path) -> None:
    server = make_server(_settings(tmp_path, fast_protocol=False))
    assert server.config.http == "auto"
    assert isinstance(_served(server), FastPaths)


def test_fast_paths_false_sends_every_request_through_fastapi(tmp_path: Path) -> None:
    server = make_server(_settings(tmp_path, fast_paths=False))
    app = _served(server)
    assert isinstance(app, FastAPI) and not isinstance(app, FastPaths)
    assert server.config.http is (HttpProtocol or "auto")
    # The chat route is still served (by FastAPI's routing, with the same key check).
    client = TestClient(server.config.app, raise_server_exceptions=False)
    r = client.post("/v1/chat/completions", json={"model": "trigger", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_the_settings_come_from_the_environment_as_documented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AI_SYSADMIN_GATEWAY__FAST_PROTOCOL", "false")
    monkeypatch.setenv("AI_SYSADMIN_GATEWAY__FAST_PATHS", "false")
    g = Settings(state_dir=tmp_path / "state").gateway
    assert not g.fast_protocol and not g.fast_paths


def test_fast_paths_skip_no_middleware_because_the_app_has_none(tmp_path: Path) -> None:
    """FastPaths calls the chat handler without FastAPI's middleware stack, so a
    middleware added to the app would be skipped for exactly the busiest route. There is
    none: what must apply to every answer (CORS) wraps FastPaths from outside."""
    app = create_app(_settings(tmp_path, cors_origins=["http://127.0.0.1:3000"]))
    assert app.user_middleware == []
    server = make_server(_settings(tmp_path, cors_origins=["http://127.0.0.1:3000"]))
    assert isinstance(_served(server), FastPaths)

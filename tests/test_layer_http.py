"""The client the gateway and the pipeline use to reach the layers (``layers/http.py``):
against a real llama-server, and against the fake upstream for faults a real one cannot be
made to produce on demand (those tests say which fault in their names)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import psutil
import pytest
import pytest_asyncio

from layers import http
from tests.conftest import Stack
from tests.fake_upstream import FakeUpstream
from tests.support import free_port

CHAT = {"model": "trigger", "messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 2,
        "temperature": 0}
HEADERS = {"content-type": "application/json"}


def _established_to(port: int) -> int:
    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


async def _chat(client: http.HTTPClient, url: str, **extra: object) -> http.Response:
    body = json.dumps({**CHAT, **extra}).encode()
    return await client.request("POST", f"{url}/v1/chat/completions", content=body, headers=HEADERS,
                                timeout=http.Timeouts(connect=5, read=60))


@pytest_asyncio.fixture(loop_scope="function")  # the test's own loop: connections live on it
async def client() -> AsyncIterator[http.HTTPClient]:
    c = http.HTTPClient()
    yield c
    await c.aclose()


async def _answered(client: http.HTTPClient, url: str) -> tuple[int, bytes]:
    response = await _chat(client, url)
    try:
        return response.status_code, await response.aread()
    finally:
        await response.aclose()


async def test_sequential_requests_reuse_one_keepalive_connection(
    stack: Stack, client: http.HTTPClient
) -> None:
    url, port = stack.layer_url("trigger"), stack.ports["trigger"]
    for _ in range(5):
        status, body = await _answered(client, url)
        assert status == 200
        assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    assert _established_to(port) == 1


def _local_ports(port: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


async def _settled(port: int, count: int) -> int:
    """Established connections to ``port`` once they reach ``count`` (or after 5 s); the
    loop keeps running meanwhile, so background connects happen."""
    deadline = time.monotonic() + 5
    while _established_to(port) != count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return _established_to(port)


async def _streamed(client: http.HTTPClient, url: str) -> bytes:
    response = await _chat(client, url, stream=True, max_tokens=4)
    try:
        return await response.aread()
    finally:
        await response.aclose()


async def test_a_spare_connection_carries_the_next_stream(stack: Stack) -> None:
    """llama-server (mostly) closes its connection after a streamed answer: without a
    spare the next stream would wait for a new connection; with one, the next stream goes
    out on a connection that was open before it was sent."""
    url, port = stack.layer_url("trigger"), stack.ports["trigger"]
    spared = http.HTTPClient(spare=1)
    try:
        for _ in range(3):
            assert (await _streamed(spared, url)).rstrip().endswith(b"data: [DONE]")
            await asyncio.sleep(0.3)  # idle: the spare is opened now
            before = _local_ports(port)
            assert before
            response = await _chat(spared, url, stream=True, max_tokens=4)
            assert _local_ports(port) <= before  # no connection opened for this request
            await response.aread()
            await response.aclose()
    finally:
        await spared.aclose()
    assert await _settled(port, 0) == 0  # closing the client closes its spare


async def test_stream_arrives_as_sse_events_and_closing_early_drops_the_connection(
    stack: Stack, client: http.HTTPClient
) -> None:
    url, port = stack.layer_url("trigger"), stack.ports["trigger"]
    response = await _chat(client, url, stream=True, max_tokens=64)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    async for piece in response.aiter_raw():
        assert piece.startswith(b"data: ")
        json.loads(piece.split(b"\n", 1)[0][len(b"data: "):])
        break
    await response.aclose()
    deadline = time.monotonic() + 5
    while _established_to(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _established_to(port) == 0  # not pooled: the layer sees the client leave
    assert (await _answered(client, url))[0] == 200  # the next request opens a new one


async def test_request_resent_once_on_new_connection_fake_upstream_drop_keepalive(
    fakes: Callable[..., FakeUpstream], client: http.HTTPClient
) -> None:
    upstream = fakes("drop_keepalive")
    for _ in range(3):
        assert (await _answered(client, f"http://127.0.0.1:{upstream.port}"))[0] == 200
    assert upstream.requests == 3


async def test_silent_upstream_is_read_timeout_fake_upstream_hang(
    fakes: Callable[..., FakeUpstream], client: http.HTTPClient
) -> None:
    upstream = fakes("hang")
    started = time.monotonic()
    with pytest.raises(http.ReadTimeout):
        await client.request("POST", f"http://127.0.0.1:{upstream.port}/v1/chat/completions",
                             content=json.dumps(CHAT).encode(), headers=HEADERS,
                             timeout=http.Timeouts(connect=2, read=0.5))
    assert time.monotonic() - started < 5


async def test_stream_cut_by_the_upstream_is_protocol_error_fake_upstream_crash_midstream(
    fakes: Callable[..., FakeUpstream], client: http.HTTPClient
) -> None:
    upstream = fakes("crash_midstream")
    response = await _chat(client, f"http://127.0.0.1:{upstream.port}", stream=True)
    got: list[bytes] = []
    with pytest.raises(http.ProtocolError):
        async for piece in response.aiter_raw():
            got.append(piece)
    assert len(got) == 2  # what arrived before the crash was delivered
    await response.aclose()


async def test_nothing_listening_is_connect_error(client: http.HTTPClient) -> None:
    with pytest.raises(http.ConnectError, match="cannot connect"):
        await _chat(client, f"http://127.0.0.1:{free_port()}")


async def test_header_value_with_a_line_break_is_refused_before_sending(
    stack: Stack, client: http.HTTPClient
) -> None:
    with pytest.raises(ValueError, match="invalid character"):
        await client.request("POST", f"{stack.layer_url('trigger')}/v1/chat/completions",
                             content=b"{}", headers={"authorization": "Bearer x\r\nX-Evil: 1"})
    assert _established_to(stack.ports["trigger"]) == 0


def _chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) if i == 1 else b"%x\r\n%s\r\n" % (len(p), p)
                    for i, p in enumerate(pieces))
    return body + b"0\r\n" + trailer + b"\r\n"


async def _serve_raw(answer: bytes, step: int) -> tuple[asyncio.Server, int]:
    """An upstream that sends ``answer`` (head and chunked body) in ``step``-byte
    segments, a pause between them: the framing must not depend on where TCP cuts."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for i in range(0, len(answer), step):
            writer.write(answer[i:i + step])
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.close()

    port = free_port()
    return await asyncio.start_server(handle, "127.0.0.1", port), port


HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"


@pytest.mark.parametrize("step", [1, 2, 5, 13, 4096, 1 << 20])
async def test_chunked_body_split_anywhere_fake_upstream_segments(
    client: http.HTTPClient, step: int
) -> None:
    # A chunk larger than one read, when segments are large enough to send it quickly.
    big = b"x" * (70_000 if step >= 4096 else 100)
    pieces = [b"data: {\"a\":1}\n\n", b"data: [DONE]\n\n", big, b"\r\n"]
    server, port = await _serve_raw(HEAD + _chunked(*pieces, trailer=b"x-t: 1\r\n"), step)
    async with server:
        response = await client.request("GET", f"http://127.0.0.1:{port}/", timeout=5)
        received = [piece async for piece in response.aiter_raw()]
    assert b"".join(received) == b"".join(pieces)
    assert all(received)  # no empty pieces handed on


@pytest.mark.parametrize("body", [
    b"zz\r\ndata\r\n0\r\n\r\n",  # not a hex size
    b"-4\r\ndata\r\n0\r\n\r\n",  # a negative size
    b"4\r\ndataXY0\r\n\r\n",  # data not followed by CRLF
    b"40\r\nonly part of the chunk",  # the connection closes inside a chunk
    b"4\r\ndata\r\n",  # ... or before the last chunk
])
async def test_broken_chunked_framing_is_protocol_error_fake_upstream_garbage(
    client: http.HTTPClient, body: bytes
) -> None:
    server, port = await _serve_raw(HEAD + body, 1 << 20)
    async with server:
        response = await client.request("GET", f"http://127.0.0.1:{port}/", timeout=5)
        with pytest.raises(http.ProtocolError):
            await response.aread()

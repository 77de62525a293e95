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
    """llama-server closes its connection after every streamed answer: without a spare
    the next stream waits for a new connection; with one, it goes out on a connection
    opened while the client was idle."""
    url, port = stack.layer_url("trigger"), stack.ports["trigger"]
    plain, spared = http.HTTPClient(), http.HTTPClient(spare=1)
    try:
        assert (await _streamed(plain, url)).rstrip().endswith(b"data: [DONE]")
        assert await _settled(port, 0) == 0  # the server closed it; nothing is kept
        await _streamed(spared, url)
        assert await _settled(port, 1) == 1  # the spare, opened after the answer
        spare = _local_ports(port)
        response = await _chat(spared, url, stream=True, max_tokens=4)
        assert _local_ports(port) == spare  # sent on the spare: no new connection
        assert (await response.aread()).rstrip().endswith(b"data: [DONE]")
        await response.aclose()
        assert await _settled(port, 1) == 1  # and the next spare is ready
        assert _local_ports(port) != spare
    finally:
        await plain.aclose()
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

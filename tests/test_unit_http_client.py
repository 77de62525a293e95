"""layers/http.py's strictness against a raw TCP server in the test: each test's server
writes the exact bytes of one answer, so framing a real layer never sends (a body over
the cap, lenient chunk sizes, repeated headers) is checked in milliseconds."""

from __future__ import annotations

import asyncio

import pytest

from layers import http


async def serve(raw: bytes) -> tuple[asyncio.Server, str]:
    """A server that reads a request's head, writes ``raw`` and closes; and its URL."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(raw)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/x"


async def fetch(raw: bytes, **client: int) -> http.Response:
    """The answer ``raw`` read whole by a fresh client (its body in ``content``)."""
    server, url = await serve(raw)
    c = http.HTTPClient(**client)
    try:
        response = await c.request("POST", url, content=b"{}", timeout=5.0)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response
    finally:
        await c.aclose()
        server.close()


def chunked(*lines: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"".join(lines)


async def test_a_strict_chunked_body_with_extensions_is_read() -> None:
    r = await fetch(chunked(b"5\r\nhello\r\n", b"1;name=v\r\n!\r\n", b"A ;x\r\n0123456789\r\n",
                            b"0\r\n\r\n"))
    assert r.content == b"hello!0123456789"


@pytest.mark.parametrize("size", [b"0x5", b"+5", b"5_0", b"", b" 5", b"5 ", b"-5", b"5\t",
                                  b"g", b"1" * 17])
async def test_a_lenient_chunk_size_is_a_protocol_error(size: bytes) -> None:
    with pytest.raises(http.ProtocolError, match="chunk size"):
        await fetch(chunked(size + b"\r\nhello\r\n", b"0\r\n\r\n"))


async def test_a_content_length_over_the_cap_is_refused_before_reading() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 2048\r\n\r\n"
    with pytest.raises(http.ProtocolError, match="over 1024"):
        await fetch(head + b"x" * 2048, max_body=1024)
    assert (await fetch(head + b"x" * 2048, max_body=2048)).content == b"x" * 2048


async def test_a_chunked_body_over_the_cap_is_cut() -> None:
    body = chunked(*[b"200\r\n" + b"x" * 512 + b"\r\n"] * 3, b"0\r\n\r\n")
    with pytest.raises(http.ProtocolError, match="over 1024"):
        await fetch(body, max_body=1024)
    assert len((await fetch(body, max_body=1536)).content) == 1536


async def test_a_body_until_close_over_the_cap_is_cut() -> None:
    raw = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"x" * 3000
    with pytest.raises(http.ProtocolError, match="over 1024"):
        await fetch(raw, max_body=1024)


async def test_the_default_cap_is_64_mib() -> None:
    assert http.HTTPClient().max_body == http.MAX_BODY_BYTES == 64 * 1024 * 1024


async def test_repeated_headers_are_all_kept_and_get_gives_the_last() -> None:
    r = await fetch(b"HTTP/1.1 200 OK\r\nset-cookie: a=1\r\nX-Thing: one\r\nset-cookie: b=2\r\n"
                    b"content-length: 2\r\n\r\nok")
    assert r.headers.get_all("set-cookie") == ["a=1", "b=2"]
    assert r.headers["set-cookie"] == "b=2" and r.headers.get("x-thing") == "one"
    assert r.headers.get_all("absent") == [] and r.content == b"ok"


@pytest.mark.parametrize("lengths", [b"content-length: 2\r\ncontent-length: 3\r\n",
                                     b"content-length: 2, 3\r\n", b"content-length: +2\r\n",
                                     b"content-length: 1_0\r\n"])
async def test_conflicting_or_lenient_content_lengths_are_protocol_errors(lengths: bytes) -> None:
    with pytest.raises(http.ProtocolError, match="content-length"):
        await fetch(b"HTTP/1.1 200 OK\r\n" + lengths + b"\r\nokk")


async def test_agreeing_repeated_content_lengths_are_one() -> None:
    r = await fetch(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok")
    assert r.content == b"ok"


async def test_the_last_transfer_coding_decides_chunked() -> None:
    r = await fetch(b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n"
                    b"transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert r.content == b"ok"

"""WriteHold (gateway/protocol.py) on a real loopback connection: held writes leave as
one, a close sends what was held, an abort drops it."""

from __future__ import annotations

import asyncio

import pytest

from gateway.protocol import WriteHold

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

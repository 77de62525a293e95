"""uvicorn's HTTP/1.1 protocol, with a way for a response to send its head with its body.

Why: uvicorn writes a response's head the moment the app starts the response and each body
part with a write of its own, so the head of a stream leaves as a TCP segment of its own
and the client wakes up twice for its first event: once for the head, once more for the
event that follows a fraction of a millisecond later. On two cores shared with the model,
that second wakeup sits on the time to first token. Held and joined, head and first event
leave as one segment (docs/gateway.md, Streams).

A response asks for it through the ASGI scope: ``scope["extensions"][HOLD_WRITES]`` is a
:class:`WriteHold`. Under another server there is no such extension, and a response
writes as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

HOLD_WRITES = "ai_sysadmin.hold_writes"


class WriteHold:
    """A connection's transport whose writes can be held and then sent as one.

    Everything but writing and closing goes to the transport itself.
    """

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] | None = None

    def hold(self) -> None:
        """Keep this connection's writes until :meth:`release`."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Send what was held, in one write."""
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(b"".join(held))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is None:
            self._transport.write(data)
        else:
            self._held.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def close(self) -> None:
        self.release()  # what was written before the close is sent, as without a hold
        self._transport.close()

    def write_eof(self) -> None:
        self.release()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def write_hold(scope: Mapping[str, Any]) -> WriteHold | None:
    """The connection's :class:`WriteHold`, if the server offers one."""
    hold: WriteHold | None = scope.get("extensions", {}).get(HOLD_WRITES)
    return hold


@contextlib.contextmanager
def writes_held(hold: WriteHold | None) -> Iterator[None]:
    """Hold the connection's writes for the block and send them as one at its end (also
    when it fails); without a hold, writes go out as they are made."""
    if hold is None:
        yield
        return
    hold.hold()
    try:
        yield
    finally:
        hold.release()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without httptools: its default protocol, writes as usual
    HttpProtocol: type[asyncio.Protocol] | None = None
else:

    class HttpProtocol(HttpToolsProtocol):  # type: ignore[no-redef]
        """uvicorn's httptools protocol, offering :data:`HOLD_WRITES` to the app."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(WriteHold(transport))  # type: ignore[arg-type]

        def on_message_begin(self) -> None:
            super().on_message_begin()
            extensions = self.scope.setdefault("extensions", {})  # type: ignore[typeddict-item]
            extensions[HOLD_WRITES] = self.transport  # type: ignore[assignment]

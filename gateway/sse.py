"""The response that relays a layer's server-sent events to a client.

Starlette's ``StreamingResponse`` watches for the client's disconnect with an anyio task
group per stream; on two cores that bookkeeping was a third of the gateway's CPU per
streamed answer (docs/benchmarks.md). This does the same with two plain asyncio tasks:
one relays, one waits for ``http.disconnect``; whichever ends first ends the other, so a
client that leaves cancels the relay, and the relay's cleanup closes the upstream
connection (llama-server then stops generating).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from gateway.protocol import WriteHold, write_hold, writes_held


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """Sends its head together with the first event.

    Why: the layer sends its head at once and then reads the prompt with every core busy.
    Relaying that head straight away woke this process and the client while the model's
    threads, which wait for each other, needed the CPU: on two cores the first token came
    about 0.3 ms later (paired A/B rounds on the real model). A client that leaves meanwhile is still
    noticed (the watcher below), and no client times out waiting for a head sooner than it
    would wait for the first token (their read timeouts cover both alike).
    """

    media_type = "text/event-stream"

    async def stream_response(self, send: Send, hold: WriteHold | None = None) -> None:
        events = aiter(self.body_iterator)
        try:
            await self._relay(events, send, hold)
        finally:
            # Cancelled while sending (the client left): the events' own cleanup (closing
            # the layer's connection, the stream's metrics) runs now, not when collected.
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _relay(self, events: AsyncIterator[str | bytes | memoryview], send: Send,
                     hold: WriteHold | None) -> None:
        chunk = await anext(events, None)
        start = {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
        if chunk is None:
            await send(start)
        else:
            with writes_held(hold):  # the head and the first event in one write
                await send(start)
                await send(self._event(chunk))
            chunk = await anext(events, None)
        while chunk is not None:
            await send(self._event(chunk))
            chunk = await anext(events, None)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _event(self, chunk: str | bytes | memoryview) -> Message:
        if isinstance(chunk, str):  # what StreamingResponse allows its iterator to yield
            chunk = chunk.encode(self.charset)
        return {"type": "http.response.body", "body": chunk, "more_body": True}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.ensure_future(self.stream_response(send, write_hold(scope)))
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait((relay, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not relay.done():
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
        if not relay.cancelled() and relay.exception() is not None:
            raise relay.exception()  # type: ignore[misc]

"""A fake OpenAI-compatible upstream for faults a real llama-server cannot be made to
produce on demand: hanging, answering 503 forever, garbage, a crash mid-stream.

Tests that use it say so in their names (``..._fake_upstream_<fault>``). It speaks just
enough HTTP/1.1 over asyncio streams, in a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, field
from typing import Literal

Fault = Literal["hang", "loading", "error500", "garbage", "truncated_json", "crash_midstream",
                "slow", "invalid_json", "ok", "drop_keepalive"]


def _chunk(content: str, finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
        "model": "fake", "choices": [{"index": 0, "delta": {"content": content},
                                       "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _completion(content: str, finish: str = "stop") -> bytes:
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()


@dataclass
class FakeUpstream:
    fault: Fault
    port: int
    requests: int = 0
    open_connections: int = 0
    # "slow": one streamed token per this many seconds (a layer thrashing on swap).
    token_interval: float = 5.0
    slow_tokens: int = 100
    # "slow", streamed: the head at once, the first token this much later (a long prompt).
    first_token_delay: float = 0.0
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _server: asyncio.Server | None = field(default=None, repr=False)

    def start(self) -> FakeUpstream:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", self.port)
            )
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.fault == "drop_keepalive" and answered:
                    # A keep-alive connection closed just as the next request arrived.
                    writer.transport.abort()
                    return
                answered += 1
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                await self._answer(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_connections -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, method: str, path: str, body: bytes,
                      writer: asyncio.StreamWriter) -> None:
        def send(status: str, payload: bytes, ctype: str = "application/json") -> None:
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)

        if path.endswith("/health"):
            if self.fault == "loading":
                send("503 Service Unavailable", b'{"error":{"code":503,"message":"Loading model"}}')
            else:
                send("200 OK", b'{"status":"ok"}')
            await writer.drain()
            return
        self.requests += 1
        stream = b'"stream": true' in body or b'"stream":true' in body
        if self.fault == "hang":
            await asyncio.sleep(3600)
        elif self.fault == "loading":
            send("503 Service Unavailable", b'{"error":{"code":503,"message":"Loading model"}}')
        elif self.fault == "error500":
            send("500 Internal Server Error", b'{"error":{"code":500,"message":"boom"}}')
        elif self.fault == "garbage":
            send("200 OK", _completion("this is not json {{{"))
        elif self.fault == "truncated_json":
            send("200 OK", _completion('{"anomaly": true, "sever', finish="length"))
        elif self.fault == "invalid_json":
            send("200 OK", b'{"id": "chatcmpl-fake", "choices": [{"message": ')
        elif self.fault == "slow":
            if not stream:
                await asyncio.sleep(self.token_interval * self.slow_tokens)
                send("200 OK", _completion("fine"))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(self.first_token_delay)
                for i in range(self.slow_tokens):
                    part = _chunk(f" t{i}")
                    writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(self.token_interval)
                done = b"data: [DONE]\n\n"
                writer.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
        elif self.fault == "crash_midstream" and stream:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            for part in (_chunk("one"), _chunk(" two")):
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.transport.abort()  # the layer dies: no last chunk, no [DONE]
            raise ConnectionError("crashed on purpose")
        else:
            send("200 OK", _completion("fine"))
        await writer.drain()

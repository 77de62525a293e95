"""A bench instrument, not a product part: an HTTP/1.1-aware byte relay that records every
request that passes through it.

Put in front of a layer's llama-server (the gateway is configured with the relay's port
as the layer's), it counts what the layer is really asked to do, from the layer's side:
each request's method, path and body, when it was sent, when its answer's head and end
came back, its status, and whether the connection closed before the answer was complete
(the client gave up: a timeout). Bytes are forwarded unchanged, as they arrive; the HTTP
framing is only read alongside (``Content-Length`` and chunked bodies, answers that end
at close), so streams pass at their own pace.

Run: ``python -m bench.counting_relay PORT UPSTREAM_PORT LOG.jsonl``. One JSON object per
request is appended to the log when the request is finished (answered or not).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MAX_KEPT_BODY = 512 * 1024  # request bodies kept in the log (trigger batches are a few KB)


@dataclass
class Head:
    start_line: str
    headers: dict[str, str]


@dataclass
class Message:
    head: Head
    body: bytes


class Framer:
    """Incremental HTTP/1.1 message framing of one direction of a connection.

    ``feed`` takes bytes as they arrive and returns what completed in them: ``Head`` when
    a message's head is complete, ``Message`` when its body is. ``kind`` is ``request`` or
    ``response``; a response without a length runs until the connection closes
    (``eof``). ``keep_body`` keeps body bytes (up to ``MAX_KEPT_BODY``)."""

    def __init__(self, kind: str, *, keep_body: bool = False) -> None:
        self.kind = kind
        self.keep_body = keep_body
        self._buf = bytearray()
        self._state = "head"
        self._remaining = 0
        self._head: Head | None = None
        self._body = bytearray()

    def feed(self, data: bytes) -> list[Head | Message]:
        self._buf += data
        out: list[Head | Message] = []
        while self._step(out):
            pass
        return out

    def eof(self) -> list[Head | Message]:
        """The connection closed: a body that runs until close is complete now."""
        if self._state == "until_close" and self._head is not None:
            self._take(len(self._buf))
            return [self._finish()]
        return []

    @property
    def in_message(self) -> bool:
        return self._state != "head" or bool(self._buf)

    def _take(self, n: int) -> bytes:
        piece = bytes(self._buf[:n])
        del self._buf[:n]
        if self.keep_body and len(self._body) < MAX_KEPT_BODY:
            self._body += piece[: MAX_KEPT_BODY - len(self._body)]
        return piece

    def _finish(self) -> Message:
        assert self._head is not None
        msg = Message(self._head, bytes(self._body))
        self._head, self._body, self._state = None, bytearray(), "head"
        return msg

    def _step(self, out: list[Head | Message]) -> bool:
        """One state transition; False when more bytes are needed."""
        if self._state == "head":
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            raw = bytes(self._buf[:end]).decode("latin-1")
            del self._buf[: end + 4]
            start, *lines = raw.split("\r\n")
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self._head = Head(start, headers)
            out.append(self._head)
            self._state = self._body_mode(self._head)
            if self._state == "head":
                out.append(self._finish())
            return True
        if self._state == "fixed":
            n = min(self._remaining, len(self._buf))
            self._take(n)
            self._remaining -= n
            if self._remaining:
                return False
            out.append(self._finish())
            return True
        if self._state == "chunk_size":
            end = self._buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(self._buf[:end]).split(b";")[0].strip() or b"0", 16)
            del self._buf[: end + 2]
            if size == 0:
                self._state = "trailers"
            else:
                self._state, self._remaining = "chunk_data", size
            return True
        if self._state == "chunk_data":
            n = min(self._remaining, len(self._buf))
            self._take(n)
            self._remaining -= n
            if self._remaining:
                return False
            self._state, self._remaining = "chunk_end", 2
            return True
        if self._state == "chunk_end":  # the CRLF after a chunk's data
            n = min(self._remaining, len(self._buf))
            del self._buf[:n]
            self._remaining -= n
            if self._remaining:
                return False
            self._state = "chunk_size"
            return True
        if self._state == "trailers":
            end = self._buf.find(b"\r\n")
            if end < 0:
                return False
            del self._buf[: end + 2]
            if end == 0:
                out.append(self._finish())
            return True
        # until_close: everything is body until eof()
        self._take(len(self._buf))
        return False

    def _body_mode(self, head: Head) -> str:
        if "chunked" in head.headers.get("transfer-encoding", "").lower():
            return "chunk_size"
        if "content-length" in head.headers:
            self._remaining = int(head.headers["content-length"])
            return "fixed" if self._remaining else "head"
        if self.kind == "request":
            return "head"
        parts = head.start_line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status < 200 or status in (204, 304):
            return "head"
        return "until_close"


@dataclass
class Exchange:
    """One request and what came back for it."""

    conn: int
    method: str
    path: str
    body: bytes
    t_sent: float
    status: int | None = None
    t_head: float | None = None
    t_done: float | None = None

    def record(self, outcome: str) -> dict[str, Any]:
        return {"conn": self.conn, "method": self.method, "path": self.path,
                "body": self.body.decode("utf-8", "replace"), "t_sent": self.t_sent,
                "status": self.status, "t_head": self.t_head, "t_done": self.t_done,
                "outcome": outcome}


@dataclass
class Recorder:
    """Appends one JSON line per finished exchange to the log (flushed each time, so the
    bench can read the log while the relay runs)."""

    log: IO[str]
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def write(self, ex: Exchange, outcome: str) -> None:
        self.log.write(json.dumps(ex.record(outcome)) + "\n")
        self.log.flush()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 upstream_port: int, rec: Recorder) -> None:
    conn = next(rec.ids)
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:
        writer.close()
        return
    pending: list[Exchange] = []  # sent, answer not complete, oldest first
    closed_by: list[str] = []

    async def requests() -> None:
        framer = Framer("request", keep_body=True)
        try:
            while data := await reader.read(65536):
                now = time.time()
                for item in framer.feed(data):
                    if isinstance(item, Message):
                        method, path, *_ = (item.head.start_line.split(" ") + ["", ""])
                        pending.append(Exchange(conn, method, path, item.body, now))
                up_writer.write(data)
                await up_writer.drain()
        finally:
            closed_by.append("client")
            up_writer.close()

    async def responses() -> None:
        framer = Framer("response")
        try:
            while data := await up_reader.read(65536):
                now = time.time()
                writer.write(data)
                for item in framer.feed(data):
                    _answered(item, now)
                await writer.drain()
            for item in framer.eof():
                _answered(item, time.time())
        finally:
            closed_by.append("upstream")
            writer.close()

    def _answered(item: Head | Message, now: float) -> None:
        waiting = [ex for ex in pending if ex.t_head is None]
        if isinstance(item, Head) and waiting:
            parts = item.start_line.split(" ", 2)
            waiting[0].status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
            waiting[0].t_head = now
        elif isinstance(item, Message) and pending:
            ex = pending.pop(0)
            ex.t_done = now
            rec.write(ex, "answered")

    await asyncio.gather(requests(), responses(), return_exceptions=True)
    # Whatever is still pending was cut off: by the client (it stopped waiting) or by the
    # layer (it closed mid-answer).
    who = closed_by[0] if closed_by else "client"
    for ex in pending:
        rec.write(ex, "abandoned" if who == "client" else "cut")


async def main(port: int, upstream_port: int, log_path: Path) -> None:
    with log_path.open("a", encoding="utf-8") as log:
        rec = Recorder(log)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _relay(reader, writer, upstream_port, rec)

        server = await asyncio.start_server(handle, "127.0.0.1", port)
        await server.serve_forever()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The exchanges recorded so far (a line being written is skipped)."""
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])))

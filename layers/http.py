"""A small HTTP/1.1 client for talking to the layers: keep-alive connections on asyncio streams.

Why not httpx here: on the gateway's hot path httpx, httpcore and anyio cost about 2 ms of
CPU per proxied request on two cores — ten times the rest of the gateway (see
docs/benchmarks.md). The layers speak plain HTTP/1.1 with JSON and server-sent-event
bodies, so this client covers exactly that: requests with a byte body, responses framed by
``Content-Length``, chunked transfer or connection close, keep-alive reuse, TLS for remote
endpoints, and a timeout per phase (connect, write, every read). Nothing else.

It is strict where leniency would let a broken or hostile peer in: a body is capped
(``max_body``), chunk sizes are hex digits only (no ``0x``, sign, ``_`` or padding, which
Python's ``int(…, 16)`` would take), and a repeated ``Content-Length`` must agree.
Repeated headers are all kept (:class:`Headers`).

A response is returned once its head has arrived; its body is then read with
:meth:`Response.aread` or :meth:`Response.aiter_raw`. Closing a response before its body
ended closes the connection, which is how llama-server learns that a client went away and
stops generating.

llama-server closes the connection after every streamed answer, whatever its
``Keep-Alive`` header says. So that the next stream does not wait for a TCP connect (and
for one of llama-server's HTTP threads to pick it up), the client can keep ``spare``
connections per origin opened ahead, after each answer, while the machine is idle.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from layers.errors import Unavailable

# llama-server (cpp-httplib) closes a keep-alive connection after 5 s idle; one idle
# longer than this is not reused, so a request rarely meets a connection being closed.
IDLE_REUSE_SECONDS = 4.0
MAX_IDLE_PER_ORIGIN = 256
MAX_HEAD_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
SPARE_CONNECT_TIMEOUT = 5.0
# The largest answer body read by default (a stream: all its events together). The
# layers' answers are kilobytes; a peer sending without end must not fill the memory.
MAX_BODY_BYTES = 64 * 1024 * 1024
# A chunk size line: 1 to 16 hex digits (no sign, prefix, separator or padding), then
# optionally chunk extensions, which may be preceded by blanks (RFC 9112 7.1.1).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\r\n]*)?")


class HTTPError(Unavailable):
    """Any failure to get an answer over HTTP."""


class ConnectError(HTTPError):
    """No connection could be opened."""


class ProtocolError(HTTPError):
    """The connection broke off or the peer did not speak HTTP/1.1."""


class TimeoutException(HTTPError):
    """A phase of the exchange took longer than its timeout."""


class ConnectTimeout(TimeoutException, ConnectError):
    pass


class ReadTimeout(TimeoutException):
    pass


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    read: float  # for the head and for every later read of the body
    write: float = 30.0

    @classmethod
    def of(cls, value: float | Timeouts) -> Timeouts:
        return value if isinstance(value, Timeouts) else cls(value, value, value)


Origin = tuple[str, str, int]  # scheme, host, port


class Headers(dict[str, str]):
    """A response's headers by lower-case name: ``headers[name]`` and ``get`` give the
    last value received (as a plain dict of them did), :meth:`get_all` every one in
    order (a repeated header is not lost)."""

    __slots__ = ("_all",)

    def __init__(self) -> None:
        super().__init__()
        self._all: dict[str, list[str]] = {}

    def add(self, name: str, value: str) -> None:
        self[name] = value
        self._all.setdefault(name, []).append(value)

    def get_all(self, name: str) -> list[str]:
        values = self._all.get(name)
        if values is not None:
            return list(values)
        value = self.get(name)  # set directly (HTTP/1.0's implied connection: close)
        return [] if value is None else [value]


class _Connection:
    __slots__ = ("origin", "reader", "writer", "idle_since", "reused", "exchanges")

    def __init__(self, origin: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.reused = False
        self.exchanges = 0  # requests sent on it; a spare has none

    def usable(self, now: float) -> bool:
        return (
            now - self.idle_since < IDLE_REUSE_SECONDS
            and not self.writer.is_closing()
            and not self.reader.at_eof()
        )

    def close(self) -> None:
        self.writer.close()


class Response:
    """An answer whose head has arrived. Read the body once, then it is closed."""

    def __init__(
        self,
        client: HTTPClient,
        conn: _Connection,
        status_code: int,
        headers: Headers,
        read_timeout: float,
        keep_alive: bool,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self._max_body = max_body
        self._client = client
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout
        self._keep_alive = keep_alive
        self._content: bytes | None = None
        self._complete = False

    # -- body --

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked framing removed)."""
        conn = self._conn
        if conn is None:
            raise ProtocolError("the response is closed")
        reader = conn.reader
        try:
            if self.status_code in (204, 304):
                pass  # no body, whatever the headers say
            elif _chunked(self.headers):
                async for piece in self._chunks(reader):
                    yield piece
            elif "content-length" in self.headers:
                remaining = _content_length(self.headers)
                if remaining > self._max_body:
                    raise ProtocolError(f"the body is {remaining} bytes, over {self._max_body}")
                while remaining > 0:
                    piece = await self._read(reader.read(min(remaining, READ_SIZE)))
                    if not piece:
                        raise ProtocolError(f"connection closed with {remaining} bytes of the body unread")
                    remaining -= len(piece)
                    yield piece
            else:  # body runs until the peer closes the connection
                self._keep_alive = False
                left = self._max_body
                while piece := await self._read(reader.read(READ_SIZE)):
                    left -= len(piece)
                    if left < 0:
                        raise ProtocolError(f"the body is over {self._max_body} bytes")
                    yield piece
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise ProtocolError(f"the body broke off ({type(exc).__name__})") from None
        self._complete = True
        await self.aclose()

    async def _chunks(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        """Chunked transfer decoding of whatever has arrived: one read and one piece per
        arrival, however many chunks (a role and a first token, say) it holds, and a
        chunk's data as it comes rather than once it is whole."""
        buf = bytearray()
        data_left = 0  # of the current chunk
        body_left = self._max_body  # chunk sizes are counted against it as they come
        crlf_due = False  # after a chunk's data
        while True:
            out = bytearray()
            while True:
                if data_left:
                    take = min(data_left, len(buf))
                    out += buf[:take]
                    del buf[:take]
                    data_left -= take
                    if data_left:
                        break
                    crlf_due = True
                if crlf_due:
                    if len(buf) < 2:
                        break
                    if buf[:2] != b"\r\n":
                        raise ProtocolError("a chunk's data is not followed by CRLF")
                    del buf[:2]
                    crlf_due = False
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise ProtocolError("a chunk size line is too long")
                    break
                line = _CHUNK_SIZE.fullmatch(buf, 0, eol)
                if line is None:
                    raise ProtocolError(f"a bad chunk size line: {bytes(buf[:min(eol, 40)])!r}")
                size = int(line.group(1), 16)
                body_left -= size
                if body_left < 0:
                    raise ProtocolError(f"the chunked body is over {self._max_body} bytes")
                if size == 0:  # the last chunk, then trailers (ignored) up to an empty line
                    end = buf.find(b"\r\n\r\n", eol)
                    if end < 0:
                        if len(buf) > MAX_HEAD_BYTES:
                            raise ProtocolError(f"the trailers are over {MAX_HEAD_BYTES} bytes")
                        break
                    if len(buf) > end + 4:
                        self._keep_alive = False  # bytes after the answer: don't trust the rest
                    if out:
                        yield bytes(out)
                    return
                del buf[: eol + 2]
                data_left = size
            if out:
                yield bytes(out)
            data = await self._read(reader.read(READ_SIZE))
            if not data:
                raise ProtocolError("the connection closed inside the chunked body")
            buf += data

    async def _read(self, op: Any) -> Any:
        try:
            async with asyncio.timeout(self._read_timeout):
                return await op
        except TimeoutError:
            raise ReadTimeout(f"no data for {self._read_timeout:g}s") from None

    async def aread(self) -> bytes:
        if self._content is None:
            self._content = b"".join([piece async for piece in self.aiter_raw()])
        return self._content

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise RuntimeError("the body has not been read: await aread() first")
        return self._content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    async def aclose(self) -> None:
        """Give the connection back for reuse if the body was read to its end and the peer
        keeps it alive; otherwise close it (the peer sees the client leave)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._complete and self._keep_alive:
            self._client._release(conn)
        else:
            conn.close()
        self._client._keep_spare(conn.origin)


class HTTPClient:
    """Pooled keep-alive connections per origin. No limit on connections: callers bound
    their own concurrency (the layers' admission limiter).

    ``spare``: connections per origin kept opened ahead of the next request (see the
    module's docstring); 0 opens connections only when a request needs one.
    ``max_body``: the largest answer body read (more is a :class:`ProtocolError`).
    """

    def __init__(self, *, spare: int = 0, max_body: int = MAX_BODY_BYTES) -> None:
        self.max_body = max_body
        self._idle: dict[Origin, list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False
        self.spare = spare
        self._warming: set[Origin] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout: float | Timeouts = 30.0,
    ) -> Response:
        """Send a request and return once the answer's head arrived (the body unread).

        A pooled connection the peer closed while idle is no fault of the peer: the request
        is sent once more on a new connection if nothing of an answer had arrived.
        """
        t = Timeouts.of(timeout)
        origin, target = _split(url)
        head = _request_head(method, target, origin, headers, len(content))
        while (conn := self._pooled(origin)) is not None:
            try:
                return await self._exchange(conn, head, content, t)
            except _StaleConnection:
                continue  # the next pooled one (a spare), else a new connection
        return await self._exchange(await self._connect(origin, t.connect), head, content, t)

    async def get(self, url: str, *, headers: Mapping[str, str] | None = None,
                  timeout: float | Timeouts = 5.0) -> Response:  # fmt: skip
        """A GET whose body is read before returning."""
        response = await self.request("GET", url, headers=headers, timeout=timeout)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # spares being opened
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    # -- connections --

    def _pooled(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                conn.reused = True
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection, *, spare: bool = False) -> bool:
        """Pool ``conn`` for reuse (False: closed instead): at the end of the idle list,
        where reuse takes from, or a ``spare`` at its front, behind the kept-alive ones."""
        idle = self._idle.setdefault(conn.origin, [])
        if self._closed or len(idle) >= MAX_IDLE_PER_ORIGIN or conn.reader.at_eof():
            conn.close()
            return False
        conn.idle_since = time.monotonic()
        if spare:
            idle.insert(0, conn)
        else:
            idle.append(conn)
        return True

    def _keep_spare(self, origin: Origin) -> None:
        """After an answer: open a connection in the background unless ``spare`` unused
        ones are ready. Only unused ones count: a used one may be closed by the server
        any moment (llama-server does so after a stream)."""
        if not self.spare or self._closed or origin in self._warming:
            return
        # Unused spares sit at the front of the idle list (used connections are appended,
        # and taken, at its end): only that prefix is looked at, whatever the pool's size.
        idle = self._idle.setdefault(origin, [])
        now = time.monotonic()
        ready = 0
        while ready < len(idle) and not idle[ready].exchanges:
            if idle[ready].usable(now):
                ready += 1
            else:
                idle.pop(ready).close()  # closed by the server, or idle too long to trust
        if ready >= self.spare:
            return
        self._warming.add(origin)
        task = asyncio.get_running_loop().create_task(self._open_spare(origin))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_spare(self, origin: Origin) -> None:
        try:
            conn = await self._connect(origin, SPARE_CONNECT_TIMEOUT)
        except HTTPError:
            return  # the next request connects itself and reports what fails
        finally:
            self._warming.discard(origin)
        if self._release(conn, spare=True):
            self._keep_spare(origin)  # more than one wanted

    async def _connect(self, origin: Origin, timeout: float) -> _Connection:
        scheme, host, port = origin
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None, limit=MAX_HEAD_BYTES
                )
        except TimeoutError:
            raise ConnectTimeout(f"connecting to {host}:{port} took over {timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        return _Connection(origin, reader, writer)

    async def _exchange(self, conn: _Connection, head: bytes, content: bytes, t: Timeouts) -> Response:
        try:
            conn.exchanges += 1
            writer = conn.writer
            writer.writelines((head, content))  # one send (writev) for head and body
            try:
                async with asyncio.timeout(t.write):
                    await writer.drain()
            except TimeoutError:
                raise TimeoutException(f"sending the request took over {t.write:g}s") from None
            except ConnectionError:
                raise _StaleConnection from None
            status, headers = await self._read_head(conn, t.read)
        except _StaleConnection:
            conn.close()
            if conn.reused:
                raise
            raise ProtocolError(f"{conn.origin[1]}:{conn.origin[2]} closed the connection "
                                "without answering") from None
        except BaseException:
            conn.close()
            raise
        keep_alive = headers.get("connection", "").lower() != "close"
        return Response(self, conn, status, headers, t.read, keep_alive, self.max_body)

    async def _read_head(self, conn: _Connection, timeout: float) -> tuple[int, Headers]:
        reader = conn.reader
        while True:
            try:
                async with asyncio.timeout(timeout):
                    raw = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                raise ReadTimeout(f"no answer within {timeout:g}s") from None
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise _StaleConnection from None
                raise ProtocolError("the connection closed inside the answer's head") from None
            except ConnectionError:
                raise _StaleConnection from None
            except asyncio.LimitOverrunError:
                raise ProtocolError(f"the answer's head is over {MAX_HEAD_BYTES} bytes") from None
            status, headers = _parse_head(raw)
            if status >= 200:
                return status, headers
            # 1xx informational answers precede the real one.


class _StaleConnection(Exception):
    """Nothing came back on a connection: on a reused one the peer had closed it."""


# Both are cached: a client talks to a handful of URLs with the same few headers, and on
# an idle gateway (cold CPU caches) parsing them again cost time before every request.
@functools.lru_cache(maxsize=256)
def _split(url: str) -> tuple[Origin, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConnectError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return (scheme, parts.hostname, port), target


def _request_head(
    method: str, target: str, origin: Origin, headers: Mapping[str, str] | None, length: int
) -> bytes:
    fixed = _head_without_length(method, target, origin, tuple((headers or {}).items()))
    return fixed + b"content-length: %d\r\n\r\n" % length


@functools.lru_cache(maxsize=256)
def _head_without_length(
    method: str, target: str, origin: Origin, headers: tuple[tuple[str, str], ...]
) -> bytes:
    scheme, host, port = origin
    default_port = 443 if scheme == "https" else 80
    host_header = host if port == default_port else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
    lines = [f"{method} {target} HTTP/1.1", f"host: {host_header}"]
    for name, value in headers:
        # A header from configuration must not smuggle a second header or request.
        if any(c in name or c in value for c in "\r\n\0") or ":" in name:
            raise ValueError(f"invalid character in HTTP header {name!r}")
        lines.append(f"{name}: {value}")
    lines.append("")
    return "\r\n".join(lines).encode("latin-1")


def _chunked(headers: Headers) -> bool:
    """Whether the body is chunked: the last of all transfer codings (RFC 9112 6.1)."""
    if "transfer-encoding" not in headers:
        return False
    codings = ",".join(headers.get_all("transfer-encoding")).split(",")
    return codings[-1].strip().lower() == "chunked"


def _content_length(headers: Headers) -> int:
    """Digits only (``int`` would take ``+1``, ``1_0`` and blanks); repeated values must
    agree (two lengths are how a response is smuggled past one side)."""
    values = {v for field in headers.get_all("content-length") for v in field.split(",")}
    values = {v.strip() for v in values}
    if len(values) != 1:
        raise ProtocolError(f"conflicting content-length: {sorted(values)}")
    value = values.pop()
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise ProtocolError(f"a bad content-length: {value[:40]!r}")
    return int(value)


def _parse_head(raw: bytes) -> tuple[int, Headers]:
    lines = raw.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
    try:
        status = int(status_line[1])
    except ValueError:
        raise ProtocolError(f"bad status line: {lines[0][:80]!r}") from None
    headers = Headers()
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line: {line[:80]!r}")
        headers.add(name.strip().lower(), value.strip())
    if status_line[0] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    return status, headers

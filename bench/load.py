"""The load generator, run in its own process: ``python -m bench.load SPEC_JSON``.

A closed-loop HTTP/1.1 client on raw asyncio streams (uvloop when installed): each of
``concurrency`` keep-alive connections sends the next request as soon as the previous
answer is complete. Hand-written rather than httpx because an httpx client spends about
as much CPU per request as the proxies it measures, on the same two cores; this one
spends a few tens of microseconds.

Modes:
- ``closed`` (default): run ``duration`` seconds (after ``warmup``) or ``max_requests``,
  whichever ends first; latency of every request, TTFT and inter-chunk delays of streams.
- ``hold``: open ``concurrency`` streams at once, one per connection, and count how many
  are open at the same time and how many end with ``[DONE]``.
- ``interleave``: one request at a time, taking ``url`` and each of ``others`` in turn
  (in orders where every target follows every other equally often, 0.1 s apart),
  ``max_requests`` rounds; figures per target in ``per_target``. Drift of a shared
  machine (another process, a thermal step) then falls on every target alike — for
  small differences such as the time to first token through a proxy.

Prints one JSON object (:class:`LoadResult`) on stdout. Loopback only: any other host is
refused.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Target(BaseModel):
    name: str
    url: str
    headers: dict[str, str] = Field(default_factory=dict)


class LoadSpec(BaseModel):
    url: str
    body: dict[str, Any]
    headers: dict[str, str] = Field(default_factory=dict)
    name: str = "target"
    others: list[Target] = Field(default_factory=list)  # mode interleave
    concurrency: int = Field(1, ge=1, le=4000)
    mode: str = "closed"
    duration: float = Field(3.0, gt=0, le=600)
    warmup: float = Field(0.5, ge=0, le=60)
    max_requests: int = Field(200_000, ge=1)
    timeout: float = Field(120.0, gt=0, le=900)
    out: str | None = None  # write the result here instead of stdout


class LoadResult(BaseModel):
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = Field(default_factory=list)
    elapsed: float = 0.0
    latencies_ms: list[float] = Field(default_factory=list)
    ttft_ms: list[float] = Field(default_factory=list)
    inter_chunk_ms: list[float] = Field(default_factory=list)
    peak_open: int = 0
    warmup_done: int = 0  # requests answered during the warmup (for CPU per request)
    per_target: dict[str, LoadResult] = Field(default_factory=dict)  # mode interleave

    def record(self, latency: float, ttft: float | None, gaps: list[float]) -> None:
        """One answered request (seconds in, milliseconds kept)."""
        self.ok += 1
        self.latencies_ms.append(latency * 1000)
        if ttft is not None:
            self.ttft_ms.append(ttft * 1000)
        self.inter_chunk_ms.extend(g * 1000 for g in gaps)

    def record_error(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])


class HttpError(Exception):
    pass


# What a failed request raises: counted as an error, never a crash of the generator.
REQUEST_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError,
                  ValueError, TimeoutError)


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def ensure(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _first_token(data: bytes) -> bool:
    """A chunk that shows the first generated token's effect: text, or the end of the
    answer. The gateway holds back text that may begin a stop sequence, so an answer the
    model ends at once (the default base model often writes its turn marker first)
    reaches the client as a finish chunk with no text — its first token all the same."""
    i = data.find(b'"content":"')
    while i >= 0:
        if data[i + 11 : i + 12] != b'"':
            return True
        i = data.find(b'"content":"', i + 11)
    return b'"finish_reason":"' in data


async def one_request(
    conn: Connection, raw: bytes, stream: bool, on_open: Any = None
) -> tuple[float, float | None, list[float]]:
    """Send one request; return (latency, ttft, inter-chunk gaps) in seconds."""
    reused = conn.writer is not None and not conn.writer.is_closing()
    reader, writer = await conn.ensure()
    t0 = time.perf_counter()
    writer.write(raw)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        # The server closed an idle keep-alive connection (llama-server does): like any
        # HTTP client, send again once on a fresh connection; nothing was answered yet.
        if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
            raise
        conn.close()
        reader, writer = await conn.ensure()
        t0 = time.perf_counter()
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip().lower()
    ttft: float | None = None
    gaps: list[float] = []
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        last: float | None = None
        opened = False
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            data = (await reader.readexactly(size + 2))[:-2]
            parts.append(data)
            if stream and not opened and on_open is not None:
                opened = True
                on_open()
            if stream and _first_token(data):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                elif last is not None:
                    gaps.append(now - last)
                last = now
        body = b"".join(parts)
    else:
        body = await reader.read()
        conn.close()
    latency = time.perf_counter() - t0
    if headers.get("connection") == "close":
        conn.close()
    if status != 200:
        raise HttpError(f"HTTP {status}: {body[:200]!r}")
    if stream and b"[DONE]" not in body:
        raise HttpError(f"stream without [DONE]: {body[-200:]!r}")
    if not stream and b'"choices"' not in body:
        raise HttpError(f"no choices: {body[:200]!r}")
    return latency, ttft, gaps


def build_request(url: str, headers: dict[str, str], body_json: dict[str, Any]) -> tuple[str, int, bytes]:
    u = urlsplit(url)
    host = u.hostname or "127.0.0.1"
    if host not in LOOPBACK:
        raise SystemExit(f"bench.load: refusing non-loopback target {host}")
    port = u.port or 80
    body = json.dumps(body_json, separators=(",", ":")).encode()
    head = [f"POST {u.path} HTTP/1.1", f"host: {host}:{port}", "content-type: application/json",
            f"content-length: {len(body)}", "accept: */*"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return host, port, ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def run_closed(spec: LoadSpec) -> LoadResult:
    host, port, raw = build_request(spec.url, spec.headers, spec.body)
    stream = bool(spec.body.get("stream"))
    res = LoadResult()
    start = time.perf_counter()
    measure_from = start + spec.warmup
    stop_at = measure_from + spec.duration
    hard_stop = stop_at + spec.timeout
    counted = 0
    last_end = measure_from

    async def worker() -> None:
        nonlocal counted, last_end
        conn = Connection(host, port)
        while time.perf_counter() < stop_at and counted < spec.max_requests:
            began = time.perf_counter()
            try:
                latency, ttft, gaps = await asyncio.wait_for(
                    one_request(conn, raw, stream), hard_stop - began
                )
            except REQUEST_ERRORS as exc:
                conn.close()
                if began >= measure_from:
                    res.record_error(exc)
                    counted += 1
                await asyncio.sleep(0.01)
                continue
            if began < measure_from:
                res.warmup_done += 1
                continue
            last_end = max(last_end, began + latency)
            counted += 1
            res.record(latency, ttft, gaps)
        conn.close()

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    # Requests that began in the window are counted to their end, so the window is
    # measured to the last answer (not cut at stop_at, which would inflate req/s).
    res.elapsed = max(1e-9, last_end - measure_from)
    if len(res.inter_chunk_ms) > 50_000:  # keep the JSON small; a stride keeps the shape
        step = len(res.inter_chunk_ms) // 50_000 + 1
        res.inter_chunk_ms = res.inter_chunk_ms[::step]
    return res


async def run_hold(spec: LoadSpec) -> LoadResult:
    """Open all streams at once and hold them until the upstream ends them."""
    host, port, raw = build_request(spec.url, spec.headers, spec.body)
    res = LoadResult()
    open_now = 0
    start = time.perf_counter()

    def opened() -> None:
        nonlocal open_now
        open_now += 1
        res.peak_open = max(res.peak_open, open_now)

    async def one() -> None:
        nonlocal open_now
        conn = Connection(host, port)
        was_open = [False]

        def mark() -> None:
            was_open[0] = True
            opened()

        try:
            res.record(*await asyncio.wait_for(
                one_request(conn, raw, True, on_open=mark), spec.timeout
            ))
        except REQUEST_ERRORS as exc:
            res.record_error(exc)
        finally:
            if was_open[0]:
                open_now -= 1
            conn.close()

    await asyncio.gather(*(one() for _ in range(spec.concurrency)))
    res.elapsed = time.perf_counter() - start
    return res


def balanced_orders(n: int) -> list[list[int]]:
    """A Williams design: orders of ``range(n)`` in which each target directly follows
    each other target equally often (n orders for even n, 2n for odd n). A rotation keeps
    the cyclic order, so every target would follow the same one each time."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


async def run_interleaved(spec: LoadSpec) -> LoadResult:
    """Concurrency 1, the targets in turn: ``max_requests`` requests to each."""
    targets = [Target(name=spec.name, url=spec.url, headers=spec.headers), *spec.others]
    stream = bool(spec.body.get("stream"))
    plan = []
    for t in targets:
        host, port, raw = build_request(t.url, t.headers, spec.body)
        plan.append((t.name, Connection(host, port), raw, LoadResult()))
    orders = balanced_orders(len(plan))
    start = time.perf_counter()
    for k in range(spec.max_requests):
        # Every target follows every other equally often (a proxy's work after its answer,
        # such as LiteLLM's logging, would otherwise always land on the same next target),
        # and a pause lets that work settle before the next one is timed.
        for i in orders[k % len(orders)]:
            _name, conn, raw, res = plan[i]
            await asyncio.sleep(0.1)
            try:
                latency, ttft, gaps = await asyncio.wait_for(one_request(conn, raw, stream),
                                                             spec.timeout)
            except REQUEST_ERRORS as exc:
                conn.close()
                res.record_error(exc)
                continue
            res.elapsed += latency
            res.record(latency, ttft, gaps)
    for _name, conn, _raw, _res in plan:
        conn.close()
    out = LoadResult(elapsed=time.perf_counter() - start)
    out.per_target = {name: res for name, _conn, _raw, res in plan}
    return out


def main() -> None:
    spec = LoadSpec.model_validate_json(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        uvloop.install()
    except ImportError:
        pass
    runner = {"hold": run_hold, "interleave": run_interleaved}.get(spec.mode, run_closed)
    result = asyncio.run(runner(spec))
    if spec.out:
        with open(spec.out, "w", encoding="utf-8") as fh:
            fh.write(result.model_dump_json())
    else:
        sys.stdout.write(result.model_dump_json())


if __name__ == "__main__":
    main()

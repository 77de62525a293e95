"""A zero-latency fake OpenAI-compatible upstream for the benchmarks. NOT a model.

It answers ``POST /v1/chat/completions`` (plain and ``stream: true``, with ``usage`` and,
for streams, the ``stream_options.include_usage`` chunk), ``GET /v1/models`` and
``GET /health`` with canned text, so that a benchmark through a proxy measures the
proxy's own cost and nothing else. ``--chunk-delay`` spaces the stream chunks out (the
"slow stub" that holds 1,000 streams open at once).

It is a hand-written HTTP/1.1 server on a bare asyncio protocol (uvloop when installed):
keep-alive, Content-Length or chunked request bodies, chunked streamed responses. At a
few tens of microseconds per request it is never the bottleneck of what it measures.

Run: ``python -m bench.stub_upstream --port 9000 [--chunks 8] [--chunk-delay 0.0]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

OWNED_BY = "ai-sysadmin-bench-stub (zero-latency fake upstream for benchmarks, not a model)"
WORDS = ["The", " system", " is", " healthy", ";", " no", " action", " needed", "."]


class StubConfig:
    def __init__(self, chunks: int, chunk_delay: float) -> None:
        self.chunks = chunks
        self.chunk_delay = chunk_delay


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode()
        + b"\r\nconnection: keep-alive\r\n\r\n" + body
    )


def _completion(model: str, prompt_tokens: int, chunks: int) -> bytes:
    text = "".join(WORDS[i % len(WORDS)] for i in range(chunks))
    return json.dumps(
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": chunks,
                "total_tokens": prompt_tokens + chunks,
            },
        },
        separators=(",", ":"),
    ).encode()


def _sse(obj: dict[str, object]) -> bytes:
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _chunk(model: str, delta: dict[str, str], finish: str | None) -> dict[str, object]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


class StubProtocol(asyncio.Protocol):
    """One connection: parses requests from a buffer; streamed answers run as a task and
    hold back the next request on this connection until they end (HTTP/1.1 order)."""

    def __init__(self, config: StubConfig) -> None:
        self.config = config
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.streaming is None:
            self._process()

    def _process(self) -> None:
        while self.transport is not None and self.streaming is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _ = lines[0].split(" ", 2)
            except ValueError:
                self._bad("malformed request line")
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            start = end + 4
            if headers.get("transfer-encoding", "").lower() == "chunked":
                decoded = self._dechunk(start)
                if decoded is None:
                    return
                body, consumed = decoded
            else:
                length = int(headers.get("content-length", "0") or 0)
                if len(self.buf) - start < length:
                    return
                body, consumed = self.buf[start : start + length], start + length
            self.buf = self.buf[consumed:]
            self._handle(method, target.split("?", 1)[0], body)

    def _dechunk(self, pos: int) -> tuple[bytes, int] | None:
        parts = []
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(self.buf[pos:eol].split(b";")[0], 16)
            if len(self.buf) < eol + 2 + size + 2:
                return None
            parts.append(self.buf[eol + 2 : eol + 2 + size])
            pos = eol + 2 + size + 2
            if size == 0:
                return b"".join(parts), pos

    def _bad(self, message: str) -> None:
        assert self.transport is not None
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "param": None, "code": None}}).encode()
        self.transport.write(_response("400 Bad Request", body))

    def _handle(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        if method == "GET" and path in ("/health", "/v1/health"):
            self.transport.write(_response("200 OK", b'{"status":"ok"}'))
        elif method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [
                {"id": "stub", "object": "model", "created": 0, "owned_by": OWNED_BY}]}
            self.transport.write(_response("200 OK", json.dumps(models).encode()))
        elif method == "POST" and path == "/v1/chat/completions":
            try:
                req = json.loads(body)
                model = str(req.get("model") or "stub")
                prompt_tokens = max(1, len(body) // 4)
            except (ValueError, AttributeError):
                self._bad("body is not JSON")
                return
            if req.get("stream"):
                usage = bool((req.get("stream_options") or {}).get("include_usage"))
                self.streaming = asyncio.ensure_future(self._stream(model, prompt_tokens, usage))
            else:
                self.transport.write(
                    _response("200 OK", _completion(model, prompt_tokens, self.config.chunks))
                )
        else:
            err = {"error": {"message": f"no route {method} {path}", "type": "not_found",
                             "param": None, "code": None}}
            self.transport.write(_response("404 Not Found", json.dumps(err).encode()))

    async def _stream(self, model: str, prompt_tokens: int, usage: bool) -> None:
        t = self.transport
        try:
            assert t is not None
            t.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
                b"connection: keep-alive\r\n\r\n"
                + _sse(_chunk(model, {"role": "assistant", "content": ""}, None))
            )
            n = self.config.chunks
            for i in range(n):
                if self.config.chunk_delay:
                    await asyncio.sleep(self.config.chunk_delay)
                if self.transport is None:
                    return
                t.write(_sse(_chunk(model, {"content": WORDS[i % len(WORDS)]}, None)))
            tail = _sse(_chunk(model, {}, "stop"))
            if usage:
                final = _chunk(model, {}, None)
                final["choices"] = []
                final["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                  "total_tokens": prompt_tokens + n}
                tail += _sse(final)
            t.write(tail + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        finally:
            self.streaming = None
        if self.transport is not None and self.buf:
            self._process()


async def serve(host: str, port: int, config: StubConfig) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(config), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"stub upstream listening on http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=8, help="content chunks (= tokens) per answer")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    args = parser.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, StubConfig(args.chunks, args.chunk_delay)))


if __name__ == "__main__":
    main()

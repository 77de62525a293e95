"""Issue 19: tool-call streams pass through the gateway byte for byte, ``: ping`` comments
and all, and the sysadmin refuses client tools with a clear 400.

The upstream here is a **fake** (:class:`RecordedLlamaServer`, on tests/fake_upstream.py):
it replays, byte for byte, answers recorded from the real llama-server of
tests/test_tool_calls.py (SmolLM2-135M-Instruct, ``--jinja``, a tools template; in
tests/recordings/), because a real llama-server cannot be made to send what proxies in
front of it send — ``: ping`` keep-alive comments (LiteLLM issue #20480: a proxy that took
them for data broke tool-call streams), CRLF framing, a pause at a chosen point — nor the
same bytes twice. The gateway, the openai SDK and the clients' accumulators are real.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.support import Proc, cli, free_port, gateway_config, write_toml
from tests.test_tool_calls import (
    TOOLS,
    accumulate_langchain_style,
    assert_tool_call_stream,
    parse_sse,
)

RECORDINGS = Path(__file__).parent / "recordings"
# The recorded answers (to a pass-through "review" request; the model named itself "review").
STREAM = (RECORDINGS / "llama_server_tool_call_stream.sse").read_bytes()
ANSWER = (RECORDINGS / "llama_server_tool_call.json").read_bytes()
PING = b": ping\n\n"


def _recorded_call() -> dict[str, str]:
    """The call in the recorded stream, read the plain way: fragments joined by index."""
    call = {"id": "", "name": "", "arguments": ""}
    for event in STREAM.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue
        for frag in json.loads(event[6:])["choices"][0]["delta"].get("tool_calls") or [] if (
                json.loads(event[6:])["choices"]) else []:
            call["id"] += frag.get("id", "")
            call["name"] += frag.get("function", {}).get("name", "")
            call["arguments"] += frag.get("function", {}).get("arguments", "")
    return call


RECORDED_CALL = _recorded_call()
AUTH = {"Authorization": "Bearer test-key"}
TOOL_BODY: dict[str, Any] = {
    "model": "review", "tools": TOOLS, "tool_choice": "required", "temperature": 0,
    "parallel_tool_calls": False, "max_tokens": 64,
    "messages": [{"role": "user", "content": "Write a JSON object with the key unit set to nginx.service."}],
}


def events_of(stream: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in stream.split(b"\n\n") if e]


def with_pings(stream: bytes) -> bytes:
    """The recording as a proxy in front of llama-server sends it: a ``: ping`` comment
    before the first event and after every other one."""
    out = [PING]
    for i, event in enumerate(events_of(stream)):
        out.append(event)
        if i % 2 == 0:
            out.append(PING)
    return b"".join(out)


def content_stream(words: list[str], model: str) -> bytes:
    """A plain text answer in llama-server's chunk format (for requests without tools)."""
    head = {"created": 0, "id": "chatcmpl-replay", "model": model,
            "system_fingerprint": "b0-unknown", "object": "chat.completion.chunk"}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None}]
    deltas += [{"content": w} for w in words]
    events = [{"choices": [{"finish_reason": None, "index": 0, "delta": d}], **head} for d in deltas]
    events.append({"choices": [{"finish_reason": "stop", "index": 0, "delta": {}}], **head})
    events.append({"choices": [], **head, "usage": {"completion_tokens": len(words),
                                                     "prompt_tokens": 5, "total_tokens": 5 + len(words)}})
    return b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n"
                    for e in events) + b"data: [DONE]\n\n"


@dataclass
class RecordedLlamaServer(FakeUpstream):
    """Fake upstream: replays llama-server's recorded answers. Requests with ``tools`` get
    the tool-call recording (streamed: with ``: ping`` comments between events), others a
    short text answer; streamed events are sent one HTTP chunk each, as llama-server does.
    ``crlf`` frames events with CRLF line ends; ``hold`` pauses after the first data event
    until it is set (at most 30 s)."""

    crlf: bool = False
    hold: threading.Event | None = None
    bodies: list[dict[str, Any]] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)

    async def _answer(self, method: str, path: str, body: bytes,
                      writer: asyncio.StreamWriter) -> None:
        if path.endswith("/health"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 15\r\n\r\n{\"status\":\"ok\"}")
            await writer.drain()
            return
        self.requests += 1
        request = json.loads(body)
        self.bodies.append(request)
        tools = bool(request.get("tools"))
        if not request.get("stream"):
            payload = ANSWER if tools else json.dumps({
                "choices": [{"finish_reason": "stop", "index": 0,
                             "message": {"role": "assistant", "content": "fine"}}],
                "created": 0, "id": "chatcmpl-replay", "model": request["model"],
                "object": "chat.completion",
                "usage": {"completion_tokens": 1, "prompt_tokens": 5, "total_tokens": 6}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                         + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            await writer.drain()
            return
        stream = with_pings(STREAM if tools else content_stream(["all", " is", " fine"], request["model"]))
        parts = [p + b"\n\n" for p in stream.split(b"\n\n") if p]
        if self.crlf:
            parts = [p.replace(b"\n", b"\r\n") for p in parts]
        self.sent = parts
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        held = False
        for part in parts:
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            await writer.drain()
            if self.hold is not None and not held and part.startswith(b"data:"):
                held = True
                for _ in range(300):
                    if self.hold.is_set():
                        break
                    await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@dataclass
class Replay:
    fake: RecordedLlamaServer
    url: str
    gateway: Proc


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replay]:
    tmp = tmp_path_factory.mktemp("replay")
    fake = RecordedLlamaServer("ok", free_port()).start()
    port = free_port()
    cfg = write_toml(tmp / "gw.toml",
                     gateway_config(tmp, dict.fromkeys(("trigger", "review", "meta"), fake.port), port))
    gw = cli(cfg, "gateway", log_path=tmp / "gw.log").start()
    try:
        gw.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        yield Replay(fake, f"http://127.0.0.1:{port}", gw)
    finally:
        gw.stop()
        fake.stop()
    assert "Exception in ASGI application" not in gw.log() and "unhandled" not in gw.log()


@pytest.fixture
def fake(replay: Replay) -> Iterator[RecordedLlamaServer]:
    replay.fake.crlf, replay.fake.hold = False, None
    replay.fake.bodies.clear()
    yield replay.fake
    replay.fake.crlf, replay.fake.hold = False, None


@pytest.fixture(scope="module")
def client(replay: Replay) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{replay.url}/v1", api_key="test-key", max_retries=0,
                       timeout=60) as c:
        yield c


def _stream(url: str, body: dict[str, Any]) -> bytes:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        return r.read()


# -- pass-through: the recorded stream, unaltered ---------------------------------------------


def test_fake_upstream_replay_tool_call_stream_passes_byte_for_byte(
    replay: Replay, fake: RecordedLlamaServer
) -> None:
    body = {**TOOL_BODY, "stream": True, "stream_options": {"include_usage": True}}
    got = _stream(replay.url, body)
    assert got == b"".join(fake.sent) == with_pings(STREAM)
    assert_tool_call_stream(parse_sse(got.decode()), include_usage=True)
    # The client's tools reached the layer as it sent them.
    sent = fake.bodies[-1]
    for key in ("tools", "tool_choice", "parallel_tool_calls", "temperature", "stream_options"):
        assert sent[key] == body[key], key
    assert sent["max_tokens"] == 64


def test_fake_upstream_replay_tool_call_stream_through_the_sdk(
    client: openai.OpenAI, fake: RecordedLlamaServer
) -> None:
    """The openai SDK skips the comments and gets the recorded call, by both of its ways
    of reading a stream; so does the LangChain-style accumulator."""
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                            **TOOL_BODY)
    chunks = [c.model_dump(exclude_unset=True) for c in stream]
    assert_tool_call_stream(chunks, include_usage=True)
    recorded = parse_sse(STREAM.decode())
    assert [c["choices"] for c in chunks] == [c["choices"] for c in recorded]
    calls = accumulate_langchain_style(chunks)
    assert [(c["index"], c["id"], c["type"], c["name"]) for c in calls] == [
        (0, RECORDED_CALL["id"], "function", RECORDED_CALL["name"])]
    assert calls[0]["arguments"] == RECORDED_CALL["arguments"]

    with client.chat.completions.stream(**TOOL_BODY) as helper:
        events = [e.type for e in helper]
        final = helper.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    call = (final.choices[0].message.tool_calls or [])[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.id == RECORDED_CALL["id"]
    assert call.function.name == RECORDED_CALL["name"]  # type: ignore[union-attr]
    assert call.function.arguments == RECORDED_CALL["arguments"]  # type: ignore[union-attr]
    assert isinstance(json.loads(call.function.arguments), dict)  # type: ignore[union-attr]


def test_fake_upstream_replay_non_streamed_tool_call_passes_byte_for_byte(
    replay: Replay, client: openai.OpenAI, fake: RecordedLlamaServer
) -> None:
    r = httpx.post(f"{replay.url}/v1/chat/completions", json=TOOL_BODY, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.content == ANSWER
    assert "stream" not in fake.bodies[-1]  # with tools, not read as a stream (no watch)
    answer = client.chat.completions.create(**TOOL_BODY)
    assert answer.choices[0].finish_reason == "tool_calls"
    call = (answer.choices[0].message.tool_calls or [])[0]
    recorded = json.loads(ANSWER)["choices"][0]["message"]["tool_calls"][0]
    assert call.id == recorded["id"]
    assert call.function.name == recorded["function"]["name"]  # type: ignore[union-attr]
    assert call.function.arguments == recorded["function"]["arguments"]  # type: ignore[union-attr]


def test_fake_upstream_replay_crlf_stream_is_relayed_as_it_arrives(
    replay: Replay, fake: RecordedLlamaServer
) -> None:
    """Events framed with CRLF (servers on sse-starlette) go out one by one too: the
    client has the first event while the layer still holds the rest back."""
    fake.crlf, fake.hold = True, threading.Event()
    body = {**TOOL_BODY, "stream": True}
    with httpx.stream("POST", f"{replay.url}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=20) as r:
        pieces = r.iter_raw()
        received = b""
        while b"data: {" not in received:
            received += next(pieces)
        assert fake.hold is not None and not fake.hold.is_set()
        fake.hold.set()
        received += b"".join(pieces)
    assert received == b"".join(fake.sent)
    assert received.count(b"\r\n\r\n") == len(fake.sent)
    assert_tool_call_stream(parse_sse(received.decode()), include_usage=True)


def test_fake_upstream_replay_pings_through_the_watched_chat(
    client: openai.OpenAI, fake: RecordedLlamaServer
) -> None:
    """A chat without tools is watched for repetition: comments and content-less chunks
    pass that watch too, streamed and collected."""
    chunks = list(client.chat.completions.create(
        model="review", messages=[{"role": "user", "content": "ok?"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "all is fine"
    answer = client.chat.completions.create(
        model="review", messages=[{"role": "user", "content": "ok?"}])
    assert fake.bodies[-1]["stream"] is True  # the watch reads it as a stream
    assert answer.choices[0].message.content == "all is fine"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 3


# -- the sysadmin takes no client tools ------------------------------------------------------------


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": TOOLS}, "tools"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "unit_status"}}}, "tool_choice"),
    ({"functions": [TOOLS[1]["function"]]}, "functions"),
    ({"function_call": {"name": "unit_status"}}, "function_call"),
], ids=["tools", "tools-auto", "required", "named", "functions", "function_call"])
@pytest.mark.parametrize("stream", [False, True])
def test_sysadmin_refuses_client_tools_with_a_clear_400(
    replay: Replay, fake: RecordedLlamaServer, extra: dict[str, Any], param: str, stream: bool
) -> None:
    body = {"model": "ai-sysadmin", "stream": stream,
            "messages": [{"role": "user", "content": "restart nginx"}], **extra}
    r = httpx.post(f"{replay.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["code"] == "tools_not_supported"
    assert "read-only" in err["message"] and "trigger, review, meta" in err["message"]
    assert fake.bodies == []  # refused before any layer was asked


def test_sysadmin_refusal_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="ai-sysadmin", tools=TOOLS,  # type: ignore[arg-type]
                                       messages=[{"role": "user", "content": "disk?"}])
    assert exc.value.body["param"] == "tools"  # type: ignore[index]


def test_sysadmin_takes_empty_tools_and_no_tool_choice(
    client: openai.OpenAI, fake: RecordedLlamaServer
) -> None:
    """Frontends that send ``tools: []`` or ``tool_choice: "none"`` with every chat are
    served; nothing of it reaches the layer."""
    r = client.chat.completions.create(model="ai-sysadmin", tools=[], tool_choice="none",
                                       messages=[{"role": "user", "content": "disk?"}])
    assert r.model == "ai-sysadmin" and r.choices[0].message.content == "all is fine"
    sent = fake.bodies[-1]
    assert not {"tools", "tool_choice", "functions", "function_call"} & set(sent)

"""Issue 19: ``/v1/responses`` is held to the limits of chat — the concurrent-chat gate, the
repetition cut — and reports a layer's failures as chat does: before the stream, an error
in OpenAI's shape; during it, Responses' ``error`` and ``response.failed`` events.

The upstreams are **fakes** (tests/fake_upstream.py), for what a real llama-server cannot
be made to do on demand: hold a generation for a known time (``slow``), die mid-stream
(``crash_midstream``), stay loading (``loading``), or repeat one sentence for ever
(:class:`LoopingFake`). The gateway and the openai SDK are real.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.reliability_support import AUTH, GatewayFactory, wait_until
from tests.support import free_port

SENTENCE = "The disk is full. "
BODY: dict[str, Any] = {"model": "meta", "input": "Is the disk full?"}


def _events(raw: str) -> list[dict[str, Any]]:
    out = []
    for event in (e for e in raw.split("\n\n") if e):
        kind, data = event.split("\n")
        parsed = json.loads(data[len("data: "):])
        assert kind == f"event: {parsed['type']}"
        out.append(parsed)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


class LoopingFake(FakeUpstream):
    """Fake upstream: streams ``SENTENCE`` for ever, in llama-server's chunk format, and
    notes when the gateway hangs up (as llama-server would, to free the slot)."""

    def __init__(self, port: int) -> None:
        super().__init__("ok", port)
        self.bodies: list[dict[str, Any]] = []
        self.hung_up = threading.Event()

    async def _answer(self, method: str, path: str, body: bytes,
                      writer: asyncio.StreamWriter) -> None:
        if not path.endswith("/chat/completions"):
            await super()._answer(method, path, body, writer)
            return
        self.bodies.append(json.loads(body))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        words = [w + " " for w in SENTENCE.split()]
        try:
            for n in range(5000):
                delta = {"role": "assistant", "content": None} if n == 0 else {
                    "content": words[(n - 1) % len(words)]}
                event = {"choices": [{"finish_reason": None, "index": 0, "delta": delta}],
                         "created": 0, "id": "chatcmpl-loop", "model": "meta",
                         "object": "chat.completion.chunk"}
                part = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.003)
        except ConnectionError:
            self.hung_up.set()
            raise


def test_responses_and_chats_share_the_gate_fake_upstream_slow(
    gateways: GatewayFactory, fakes: Callable[..., FakeUpstream]
) -> None:
    """max_concurrent_chats = 1, no queue: a streamed response holds the one place (a chat
    is refused), and a chat holds it against a response."""
    slow = fakes("slow", token_interval=0.1, slow_tokens=30)
    gw = gateways(slow.port, gateway={"max_concurrent_chats": 1, "chat_queue": 0})
    chat = {"model": "meta", "messages": [{"role": "user", "content": "x"}], "stream": True}
    for holder, path, other, other_path in (
        ({**BODY, "stream": True}, "/v1/responses", chat, "/v1/chat/completions"),
        (chat, "/v1/chat/completions", {**BODY, "stream": True}, "/v1/responses"),
    ):
        before = slow.requests
        thread = threading.Thread(target=lambda b=holder, p=path: httpx.post(
            f"{gw.url}{p}", headers=AUTH, json=b, timeout=60))
        thread.start()
        assert wait_until(lambda b=before: slow.requests == b + 1, 10)
        refused = httpx.post(f"{gw.url}{other_path}", headers=AUTH, json=other, timeout=10)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "chats_saturated"
        thread.join(30)
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="test-key", max_retries=0)
    r = sdk.responses.create(**BODY)  # the place is free again
    assert r.output_text.startswith(" t0 t1")
    text = gw.metrics()
    assert 'route="responses",status="429"' in text and 'route="responses",status="200"' in text


def test_streamed_response_failure_midstream_fake_upstream_crash(
    gateways: GatewayFactory, fakes: Callable[..., FakeUpstream]
) -> None:
    crash = fakes("crash_midstream")
    gw = gateways(crash.port)
    with httpx.stream("POST", f"{gw.url}/v1/responses", headers=AUTH, timeout=30,
                      json={**BODY, "stream": True}) as r:
        assert r.status_code == 200
        events = _events(r.read().decode())
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[4:] == ["response.output_text.delta"] * 2 + ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_error" and events[-2]["message"].startswith("layer meta")
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["output"][0]["content"][0]["text"] == "one two"
    # The SDK hands the failure over as events, as from OpenAI.
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="test-key", max_retries=0)
    got = [e.type for e in sdk.responses.create(stream=True, **BODY)]
    assert got[-2:] == ["error", "response.failed"]
    # Not streamed: the chat route's 502, in OpenAI's shape.
    r2 = httpx.post(f"{gw.url}/v1/responses", headers=AUTH, json=BODY, timeout=30)
    assert r2.status_code == 502 and r2.json()["error"]["code"] == "upstream_error"


def test_loading_layer_is_a_503_fake_upstream_loading(
    gateways: GatewayFactory, fakes: Callable[..., FakeUpstream]
) -> None:
    loading = fakes("loading")
    gw = gateways(loading.port)
    for stream in (False, True):
        r = httpx.post(f"{gw.url}/v1/responses", headers=AUTH, timeout=30,
                       json={**BODY, "stream": stream})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("stream", [False, True])
def test_repetition_is_cut_in_responses_fake_upstream_looping(
    gateways: GatewayFactory, stream: bool
) -> None:
    looping = LoopingFake(free_port())
    looping.start()
    try:
        gw = gateways(looping.port)
        started = time.monotonic()
        if stream:
            with httpx.stream("POST", f"{gw.url}/v1/responses", headers=AUTH, timeout=30,
                              json={**BODY, "stream": True}) as r:
                final = _events(r.read().decode())[-1]
            assert final["type"] == "response.completed"
            response = final["response"]
        else:
            r = httpx.post(f"{gw.url}/v1/responses", headers=AUTH, json=BODY, timeout=30)
            assert r.status_code == 200
            response = r.json()
        assert time.monotonic() - started < 15
        assert response["status"] == "completed"  # ended by the gateway, as a stop
        text = response["output"][0]["content"][0]["text"]
        # Cut where it repeats, not at the 512-token cap; what was not yet sent keeps one copy.
        assert 1 <= text.count("The disk is full.") <= (15 if stream else 1)
        assert response["usage"]["output_tokens"] < 512
        assert looping.hung_up.wait(10)  # the generation was ended on the layer
        assert looping.bodies[-1]["stream"] is True
    finally:
        looping.stop()

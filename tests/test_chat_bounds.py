"""Issue 15, bounded chat: the README's request answers in seconds with a bounded answer
on the real model; output caps and ceilings; the chat template and stop strings of the
packaged model; degenerate repetition cut; a bound on concurrent chat generations.

Real llama-server on the real default model where behaviour depends on it. A model cannot
be made to loop on demand, so the relay's cut is also shown against a fake layer that
streams a looping answer for ever (``..._fake_upstream_loop``); the concurrency bound uses
the slow fake, which holds a generation for a known time.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.bounds import ChatGate, add_stops, cap_output
from gateway.chat_watch import PIECE, RepetitionDetector
from gateway.errors import OpenAIError
from layers.config import ConfigError, LayerConfig, Settings, load_settings
from layers.generation import TURN_MARKERS, stop_strings, template_args
from layers.supervisor import engine_command
from tests.fake_upstream import FakeUpstream
from tests.reliability_support import AUTH, GatewayFactory, wait_until
from tests.support import REPO, Proc, free_port, write_toml

pytestmark = pytest.mark.timeout(300)
README_REQUEST = {"model": "ai-sysadmin",
                  "messages": [{"role": "user", "content": "How is the machine?"}]}
LOOP = "The machine is fine and the disk is fine.\n"


# -- the repetition detector ------------------------------------------------------------------


def _feed(text: str, chunk: int, **kw: Any) -> tuple[Any, int]:
    d = RepetitionDetector(**kw)
    for i in range(0, len(text), chunk):
        if d.feed(text[i : i + chunk]) is not None:
            return d.found, i + chunk
    return None, len(text)


@pytest.mark.parametrize("unit", [
    LOOP,                                              # a line
    "I am a computer. ",                               # a sentence, no newline
    "the ",                                            # one word
    "How is the machine?<|im_end|>\n<|im_start|>admin\n",  # the README's junk (issue 15)
    "=",                                               # no whitespace at all
    "abc",                                             # a run inside one "word"
])
def test_detector_cuts_degenerate_repetition_soon_after_it_starts(unit: str) -> None:
    intro = "Here is what I found on this host.\n"
    text = intro + unit * 2000
    found, at = _feed(text, 3)
    assert found is not None, unit
    # Cut within a few copies beyond the minimum (40 tokens), not at the end of the text.
    assert at < len(intro) + max(10 * len(unit), 800), (unit, at)
    # What is kept: the text before the repetition and its first copy.
    kept = text[: found.keep_chars]
    assert kept.startswith(intro) and len(kept) <= len(intro) + max(len(unit), 3 * PIECE)


def test_detector_result_does_not_depend_on_how_text_is_chunked() -> None:
    text = "Checking services.\n" + "Restarting nginx now. " * 30
    results = {_feed(text, n)[0] for n in (1, 2, 5, 17, 64, len(text))}
    assert len(results) == 1 and None not in results


def test_detector_keeps_legitimate_text() -> None:
    """Docs with tables, code, and command output (ls -l, ps, /proc) are never cut."""
    texts = [p.read_text() for p in sorted((REPO / "docs").glob("*.md"))]
    texts += [p.read_text() for p in sorted((REPO / "gateway").glob("*.py"))]
    texts.append(Path("/proc/cpuinfo").read_text() + Path("/proc/meminfo").read_text())
    texts.append("| a | b | c |\n| --- | --- | --- |\n" + "".join(
        f"| {i} | 0 | 0 |\n" for i in range(40)))
    for text in texts:
        found, at = _feed(text, 7)
        assert found is None, text[max(0, at - 300) : at]


def test_detector_holds_bounded_state_on_long_text() -> None:
    d = RepetitionDetector()
    text = " ".join(f"word{i}" for i in range(50_000))
    for i in range(0, len(text), 11):
        d.feed(text[i : i + 11])
    assert d.found is None and len(d._tokens) <= 2 * d._keep  # no growth with the answer


# -- caps and stop strings --------------------------------------------------------------------


@pytest.mark.parametrize(("sent", "expected"), [
    ({}, {"max_tokens": 128}),  # the packaged base model's cap
    ({"max_tokens": 100}, {"max_tokens": 100}),
    ({"max_tokens": 100_000}, {"max_tokens": 2048}),
    ({"max_completion_tokens": 9000}, {"max_completion_tokens": 2048}),
    ({"n_predict": -1}, {"max_tokens": 2048}),
    ({"n_predict": 40, "max_tokens": 5}, {"max_tokens": 40}),  # llama-server's precedence
])
def test_output_cap_default_and_ceiling(sent: dict[str, int], expected: dict[str, int]) -> None:
    body: dict[str, Any] = {"messages": [], **sent}
    cap = cap_output(body, LayerConfig(port=1))
    assert {k: v for k, v in body.items() if k != "messages"} == expected
    assert cap == next(iter(expected.values()))


def test_output_cap_fits_the_model() -> None:
    assert LayerConfig(port=1).output_cap() == 128  # the packaged base model
    assert LayerConfig(port=1, model=Path("/m/qwen.gguf")).output_cap() == 512
    assert LayerConfig(port=1, model=Path("/m/qwen.gguf"), max_tokens=64).output_cap() == 64


def test_stops_are_added_to_the_clients_own_not_to_constrained_output() -> None:
    stops = stop_strings(LayerConfig(port=1))
    assert stops == list(TURN_MARKERS)
    assert stop_strings(LayerConfig(port=1, model=Path("/m/qwen.gguf"))) == []
    body: dict[str, Any] = {"stop": "\n\n"}
    add_stops(body, stops)
    assert body["stop"] == ["\n\n", *TURN_MARKERS]
    schema = {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}
    add_stops(schema, stops)
    assert "stop" not in schema


def test_ceiling_below_default_is_a_config_error(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "c.toml", {"layers": {"meta": {"max_tokens_ceiling": 100}}})
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    assert "layers.meta" in exc.value.lines[0] and "below max_tokens (128)" in exc.value.lines[0]


def test_engine_gets_the_gemma_template_for_the_packaged_model_only() -> None:
    s = Settings()
    packaged = engine_command(s, "meta", s.layers.meta, Path("/c/default.gguf"), Path("/b/ls"))
    assert packaged[-3:] == ["--no-jinja", "--chat-template", "gemma"]
    own = s.layers.meta.model_copy(update={"model": Path("/m/qwen.gguf")})
    assert "--chat-template" not in engine_command(s, "meta", own, Path("/m/qwen.gguf"),
                                                   Path("/b/ls"))
    chosen = own.model_copy(update={"chat_template": "chatml"})
    assert template_args("llama-server", chosen) == ["--no-jinja", "--chat-template", "chatml"]
    assert template_args("llama-cpp-python", s.layers.meta) == ["--chat_format", "gemma"]
    assert template_args("llama-server", s.layers.meta.model_copy(
        update={"chat_template": "model"})) == []


# -- the chat gate ------------------------------------------------------------------------------


async def test_gate_queues_then_refuses_and_hands_slots_over_in_order() -> None:
    gate = ChatGate(limit=1, queue=1, timeout=5)
    await gate.acquire()
    second = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0.01)
    assert not second.done() and gate.waiting == 1
    with pytest.raises(OpenAIError) as exc:  # the queue is full: refused at once
        await gate.acquire()
    assert exc.value.status == 429 and exc.value.headers["Retry-After"]
    gate.release()  # the slot goes to the waiter
    await asyncio.wait_for(second, 1)
    assert gate.running == 1 and gate.waiting == 0
    gate.release()
    assert gate.running == 0


async def test_gate_wait_times_out_and_a_cancelled_waiter_leaves_no_trace() -> None:
    gate = ChatGate(limit=1, queue=4, timeout=0.2)
    await gate.acquire()
    with pytest.raises(OpenAIError) as exc:
        await gate.acquire()
    assert exc.value.status == 429 and "within" in exc.value.message
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 0
    gate.release()
    assert gate.running == 0
    await gate.acquire()  # the slot is free again, not lost
    assert gate.running == 1


# -- fakes: a layer that loops for ever -------------------------------------------------------


def _chunk(delta: dict[str, Any], n: int, timings: bool, finish: str | None = None) -> bytes:
    event: dict[str, Any] = {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": 1767225600, "id": "chatcmpl-loop", "model": "meta",
        "system_fingerprint": "fake", "object": "chat.completion.chunk"}
    if timings:
        event["timings"] = {"cache_n": 3, "prompt_n": 20, "predicted_n": n}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


class LoopingUpstream(FakeUpstream):
    """Streams ``LOOP`` word by word for ever (up to ``limit`` tokens), as llama-server
    frames it, and records when the gateway hung up — as llama-server would, to cancel
    the slot."""

    def __init__(self, port: int, limit: int = 5000) -> None:
        super().__init__("ok", port)
        self.limit = limit
        self.bodies: list[dict[str, Any]] = []
        self.sent = 0
        self.hung_up = threading.Event()

    async def _answer(self, method: str, path: str, body: bytes,
                      writer: asyncio.StreamWriter) -> None:
        if not path.endswith("/chat/completions"):
            await super()._answer(method, path, body, writer)
            return
        request = json.loads(body)
        self.bodies.append(request)
        timings = bool(request.get("timings_per_token"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        words = LOOP.split(" ")
        pieces = [w + " " for w in words[:-1]] + [words[-1]]  # joined: LOOP, LOOP, …
        try:
            for n in range(self.limit):
                delta = ({"role": "assistant", "content": None} if n == 0
                         else {"content": pieces[(n - 1) % len(pieces)]})
                part = _chunk(delta, n, timings)
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await writer.drain()
                self.sent = n
                await asyncio.sleep(0.004)
            end = _chunk({}, self.limit, timings, finish="length") + b"data: [DONE]\n\n"
            writer.write(f"{len(end):x}\r\n".encode() + end + b"\r\n0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            self.hung_up.set()
            raise


@pytest.fixture
def looping() -> Iterator[LoopingUpstream]:
    up = LoopingUpstream(free_port())
    up.start()
    yield up
    up.stop()


def _events(raw: str) -> list[str]:
    return [e for e in raw.split("\n\n") if e]


def test_looping_stream_is_cut_and_the_generation_ended_fake_upstream_loop(
    looping: LoopingUpstream, gateways: GatewayFactory
) -> None:
    gw = gateways(looping.port)
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={**README_REQUEST, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        events = _events(r.read().decode())
    assert events[-1] == "data: [DONE]"
    finish, usage = json.loads(events[-3][6:]), json.loads(events[-2][6:])
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["model"] == "ai-sysadmin" and finish["id"] == "chatcmpl-loop"
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 23
    assert 30 <= usage["usage"]["completion_tokens"] < 100  # cut after ~40 words
    # The gateway hung up on the layer (llama-server then frees the slot): the loop did
    # not run on to its end.
    assert looping.hung_up.wait(10) and looping.sent < 200
    sent = looping.bodies[-1]
    assert sent["timings_per_token"] is True and sent["max_tokens"] == 128  # the packaged model's cap
    assert sent["stop"] == list(TURN_MARKERS)


def test_looping_non_streamed_answer_is_cut_to_one_copy_fake_upstream_loop(
    looping: LoopingUpstream, gateways: GatewayFactory
) -> None:
    gw = gateways(looping.port)
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers=AUTH, timeout=60,
                   json=README_REQUEST)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "chat.completion" and answer["model"] == "ai-sysadmin"
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": LOOP.rstrip("\n")}
    assert answer["usage"]["prompt_tokens"] == 23 and answer["usage"]["completion_tokens"] < 100
    assert r.headers["x-ai-sysadmin-max-tokens"] == "128"
    assert looping.hung_up.wait(10) and looping.sent < 200
    # Read from the layer as a stream, so that the cut also ended the generation.
    assert looping.bodies[-1]["stream"] is True


def test_constrained_output_is_not_watched_fake_upstream_loop(
    looping: LoopingUpstream, gateways: GatewayFactory
) -> None:
    """JSON held to a schema repeats legitimately (arrays) and ends with its grammar."""
    looping.limit = 120
    gw = gateways(looping.port)
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={**README_REQUEST, "stream": True,
                            "response_format": {"type": "json_object"}}) as r:
        events = _events(r.read().decode())
    assert looping.sent == 119 and not looping.hung_up.is_set()  # relayed to the end
    assert "stop" not in looping.bodies[-1] and "timings_per_token" not in looping.bodies[-1]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


# -- the concurrency bound ----------------------------------------------------------------------


def test_chat_beyond_the_bound_waits_then_is_refused_fake_upstream_slow(
    gateways: GatewayFactory, fakes: Callable[..., FakeUpstream]
) -> None:
    """max_concurrent_chats = 1, chat_queue = 1: the second chat waits until the first is
    done, the third is refused at once with 429 and Retry-After. The slow fake holds a
    generation for a known time (20 tokens, 0.15 s apart)."""
    slow = fakes("slow", token_interval=0.15, slow_tokens=20)
    gw = gateways(slow.port, gateway={"max_concurrent_chats": 1, "chat_queue": 1})
    results: dict[str, tuple[int, float, float]] = {}
    body = {"model": "meta", "messages": [{"role": "user", "content": "x"}], "stream": True}
    t0 = time.monotonic()

    def one(name: str) -> None:
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=AUTH,
                          timeout=60, json=body) as r:
            first = time.monotonic() - t0
            r.read()
            results[name] = (r.status_code, first, time.monotonic() - t0)

    first = threading.Thread(target=one, args=("first",))
    first.start()
    assert wait_until(lambda: slow.requests == 1, 10)
    second = threading.Thread(target=one, args=("second",))
    second.start()
    time.sleep(0.5)
    refused = httpx.post(f"{gw.url}/v1/chat/completions", headers=AUTH, json=body, timeout=10)
    refused_at = time.monotonic() - t0
    first.join(30)
    second.join(30)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "chats_saturated"
    assert refused_at < results["first"][2]  # at once, not after waiting
    assert results["first"][0] == results["second"][0] == 200
    # The second reached the layer only when the first was done.
    assert results["second"][1] >= results["first"][2] - 0.2, results
    assert slow.requests == 2


def test_chat_queue_timeout_is_a_429_fake_upstream_slow(
    gateways: GatewayFactory, fakes: Callable[..., FakeUpstream]
) -> None:
    slow = fakes("slow", token_interval=0.5, slow_tokens=20)
    gw = gateways(slow.port, gateway={"max_concurrent_chats": 1, "chat_queue_timeout": 1.0})
    body = {"model": "meta", "messages": [{"role": "user", "content": "x"}], "stream": True}
    holder = threading.Thread(target=lambda: httpx.post(
        f"{gw.url}/v1/chat/completions", headers=AUTH, json=body, timeout=60))
    holder.start()
    assert wait_until(lambda: slow.requests == 1, 10)
    started = time.monotonic()
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers=AUTH, json=body, timeout=10)
    assert r.status_code == 429 and 0.9 <= time.monotonic() - started < 5
    assert r.json()["error"]["code"] == "chats_saturated"
    holder.join(30)


# -- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_layer(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
               model_path: Path) -> Iterator[int]:
    """One llama-server on the packaged model, started with the argv the supervisor
    builds (engine_command), so the template flags are proven on the real binary."""
    tmp = tmp_path_factory.mktemp("bounds")
    port = free_port()
    settings = Settings()
    layer = settings.layers.meta.model_copy(update={
        "port": port, "context_size": 4096, "parallel": 2, "threads": 2, "embeddings": False})
    argv = engine_command(settings, "meta", layer, model_path, llama_server_bin)
    proc = Proc(argv, log_path=tmp / "layer.log").start()
    proc.wait_http(f"http://127.0.0.1:{port}/health")
    yield port
    proc.stop()


def test_packaged_model_is_prompted_with_gemma_turns(real_layer: int) -> None:
    r = httpx.post(f"http://127.0.0.1:{real_layer}/apply-template", timeout=30,
                   json={"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "How is the machine?"}]})
    prompt = r.json()["prompt"]
    assert "<start_of_turn>user\nBe brief." in prompt and "How is the machine?" in prompt
    assert prompt.endswith("<start_of_turn>model\n") and "<|im_start|>" not in prompt


def test_readme_request_is_answered_in_seconds_with_a_bounded_answer(
    real_layer: int, gateways: GatewayFactory
) -> None:
    gw = gateways(real_layer)
    started = time.monotonic()
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=README_REQUEST, headers=AUTH,
                   timeout=120)
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    answer = r.json()
    tokens = answer["usage"]["completion_tokens"]
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    # Was 3,842 tokens, until the slot's context was full, in 1 min 56 s (issue 15).
    assert 1 <= tokens <= 128 and r.headers["x-ai-sysadmin-max-tokens"] == "128"
    # The time is the layer's own for those tokens (llama-server's timings), nothing on
    # top: at the 37 tokens/s the cap alone means 3.5 s; on a machine shared with
    # other work it is slower, so the bound is on tokens, and on what the gateway adds.
    t = answer["timings"]
    layer_s = (t["prompt_ms"] + t["predicted_ms"]) / 1000
    print(f"README request: {elapsed:.1f}s ({layer_s:.1f}s in the layer), {tokens} tokens, "
          f"finish {answer['choices'][0]['finish_reason']}")
    assert elapsed < layer_s + 5


def test_streamed_answer_is_bounded_and_a_larger_ask_is_clamped(
    real_layer: int, gateways: GatewayFactory
) -> None:
    gw = gateways(real_layer, layers={"meta": {"max_tokens": 16, "max_tokens_ceiling": 24}})
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=AUTH, timeout=120,
                      json={**README_REQUEST, "stream": True, "max_tokens": 100_000,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["x-ai-sysadmin-max-tokens"] == "24"
        events = _events(r.read().decode())
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    assert 1 <= usage["completion_tokens"] <= 24
    finishes = [c["choices"][0]["finish_reason"] for c in map(lambda e: json.loads(e[6:]),
                                                               events[:-2]) if c["choices"]]
    assert finishes[-1] in ("stop", "length")
    # No max_tokens: the layer's default; the same for the legacy completions route.
    r2 = httpx.post(f"{gw.url}/v1/completions", headers=AUTH, timeout=120,
                    json={"model": "meta", "prompt": "The disk is"})
    assert r2.status_code == 200 and r2.headers["x-ai-sysadmin-max-tokens"] == "16"
    assert r2.json()["usage"]["completion_tokens"] <= 16


async def test_the_sysadmin_context_fits_its_budget() -> None:
    """Open incidents with long titles once pushed the chat's prompt past meta's slot
    (400 from the layer): the context keeps whole lines within its budget."""
    from layers.context import MAX_LINE_CHARS, gather_context

    class Many:
        name = "incidents"

        async def snippets(self) -> list[str]:
            return [f"incident {n} " + "word " * 200 for n in range(50)]

    text = await gather_context([Many()], max_chars=1024)  # type: ignore[list-item]
    lines = text.splitlines()
    assert len(text) <= 1024 and len(lines) == 1024 // (MAX_LINE_CHARS + 1)
    assert all(len(line) <= MAX_LINE_CHARS for line in lines)
    assert lines[0].startswith("[incidents] incident 0 ")
    assert len((await gather_context([Many()])).splitlines()) == 50  # no budget: all

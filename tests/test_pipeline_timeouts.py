"""Work that times out makes progress instead of repeating forever (issue 15, part 3).

A real llama-server cannot be made slow on demand (a busy CPU makes it slow, but not
deterministically), so most tests here use a fake "slow layer": an OpenAI-shaped server
that answers small trigger batches at once — with llama-server's ``timings`` — and never
answers larger ones, or a marked event, within any deadline. The test names say
``fake_upstream``. The last test reads the measured speed from a real llama-server.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from layers.client import LayerClients, LayerError, LayerTimeout
from layers.config import Settings
from layers.deadline import DeadlineRule, Speed, Work
from layers.events import Event
from layers.pipeline import prompts
from layers.pipeline.stages import IncidentWorker
from layers.pipeline.trigger import TriggerStage, VerdictBus
from layers.prefilter import Prefilter, load_rules
from layers.store import Store
from tests.fake_upstream import FakeUpstream
from tests.support import free_port, llama_server

FENCE = re.compile(r"<<<EVENTS ([0-9a-f]+)>>>")


@dataclass
class SlowLayer(FakeUpstream):
    """A trigger layer that is up (``/health`` answers) but too slow for batches of more
    than ``answers_at_most`` events, and for any request holding a ``STUCK`` event.
    ``health`` False: ``/health`` does not answer either (a frozen process)."""

    answers_at_most: int = 2
    health: bool = True
    seen: list[tuple[str, ...]] = field(default_factory=list)  # event messages per request

    async def _answer(self, method: str, path: str, body: bytes,
                      writer: asyncio.StreamWriter) -> None:
        if path.endswith("/health"):
            if not self.health:
                await asyncio.sleep(3600)
            await super()._answer(method, path, body, writer)
            return
        self.requests += 1
        request = json.loads(body)
        user = request["messages"][-1]["content"]
        nonce = FENCE.search(user)
        events = prompts.unfence(user, "EVENTS", nonce.group(1)) if nonce else []
        messages = tuple(e["message"] for e in events)
        self.seen.append(messages)
        if len(messages) > self.answers_at_most or any("STUCK" in m for m in messages):
            await asyncio.sleep(3600)  # the client's deadline ends this
            return
        content = json.dumps({"v": [["warning", "memory", "worker killed"] for _ in messages]})
        answer = {
            "id": "chatcmpl-slow", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 300, "completion_tokens": 20 * len(messages),
                      "total_tokens": 300 + 20 * len(messages)},
            # As llama-server reports them: 10,000 prompt and 5,000 generated tokens/s.
            "timings": {"prompt_n": 300, "prompt_ms": 30.0,
                        "predicted_n": 20 * len(messages), "predicted_ms": 4.0 * len(messages)},
        }
        payload = json.dumps(answer).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await writer.drain()


@pytest.fixture
def slow_layer() -> Iterator[SlowLayer]:
    layer = SlowLayer("ok", free_port())
    layer.start()
    yield layer
    layer.stop()


def settings_for(tmp: Path, port: int, **gateway: Any) -> Settings:
    return Settings.model_validate({
        "state_dir": str(tmp / "state"), "memory": {"enabled": False},
        "layers": {n: {"port": port, "managed": False, "parallel": 2}
                   for n in ("trigger", "review", "meta")},
        "gateway": {"timeouts": {"connect": 1.0, "first_byte": 1.0, "total": 2.0},
                    "breaker": {"failures": 2, "reset_after": 60.0, "retries": 0}, **gateway},
        "pipeline": {"batch_size": 8, "trigger_concurrency": 1, "layer_retries": 0,
                     "deadline_floor": 0.3},
    })


def oom(i: int, stuck: bool = False) -> Event:
    tag = "STUCK" if stuck else f"w{i}"
    return Event(host="h1", priority=3,
                 message=f"Out of memory: Killed process {4000 + i} ({tag}) total-vm:{i}kB")


async def test_batch_that_times_out_is_split_until_every_event_has_a_verdict_fake_upstream_slow(
    tmp_path: Path, store: Store, slow_layer: SlowLayer
) -> None:
    settings = settings_for(tmp_path, slow_layer.port)
    clients = LayerClients(settings)
    events = [oom(i, stuck=i == 5) for i in range(8)]
    stage = TriggerStage(settings, store, clients["trigger"],
                         Prefilter(load_rules(), debounce=0), VerdictBus())
    started = time.monotonic()
    try:
        await store.events.add(events)
        rounds = 0
        while await stage.step():
            rounds += 1
            assert rounds < 10, "the stage keeps finding work: something is sent again"
    finally:
        await clients.aclose()
    elapsed = time.monotonic() - started
    verdicts = await store.verdicts.after(0)
    by_message = {v.message: v for v in verdicts}
    assert len(verdicts) == 8 and len(by_message) == 8  # every event exactly one verdict
    stuck = by_message[events[5].message]
    assert stuck.unreviewed and stuck.anomaly and stuck.severity == "critical"  # rule's floor
    assert "timed out" in stuck.summary
    assert [v.unreviewed for v in verdicts].count(True) == 1  # the others came from the model
    # 8 → 4 + 4 → 2 + 2 (answered) and 2 (→ 1 + 1, one stuck) + 2: 9 requests, each
    # different from every other — nothing that timed out was sent again.
    sizes = [len(s) for s in slow_layer.seen]
    assert sizes == [8, 4, 2, 2, 4, 2, 1, 1, 2], sizes
    assert len(set(slow_layer.seen)) == len(slow_layer.seen)
    ep = clients["trigger"].endpoints[0]
    assert ep.breaker.state == "closed" and ep.slow_timeouts == 5
    assert elapsed < 30


async def test_split_halves_wait_for_a_layer_that_refuses_and_are_not_merged_again_fake_upstream_slow(
    tmp_path: Path, store: Store, slow_layer: SlowLayer
) -> None:
    """A batch times out, then the layer is saturated (429) before its halves went out:
    the next round sends the halves, not the batch that timed out."""
    settings = settings_for(tmp_path, slow_layer.port)
    clients = LayerClients(settings)
    stage = TriggerStage(settings, store, clients["trigger"],
                         Prefilter(load_rules(), debounce=0), VerdictBus())
    pool = clients["trigger"]
    real_chat = pool.chat
    calls = 0

    async def saturated_after_first(body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise LayerError(429, "layer trigger is busy", code="layer_saturated")
        return await real_chat(body, **kw)

    pool.chat = saturated_after_first  # type: ignore[method-assign]
    slow_layer.answers_at_most = 4
    try:
        await store.events.add([oom(i) for i in range(8)])
        with pytest.raises(LayerError) as busy:
            await stage.step()
        assert busy.value.status == 429
        assert len(await store.verdicts.after(0)) == 0
        while await stage.step():
            pass
    finally:
        await clients.aclose()
    assert [len(s) for s in slow_layer.seen] == [8, 4, 4]
    assert len(await store.verdicts.after(0)) == 8


async def test_review_without_an_answer_at_the_longest_deadline_is_unreviewed_fake_upstream_slow(
    tmp_path: Path, store: Store, slow_layer: SlowLayer
) -> None:
    """The review is tried again with a longer deadline (the timeout slowed the measured
    speed), and given up — incident unreviewed, never healthy — once the deadline was the
    ceiling (`gateway.timeouts.total`), rather than sent again forever."""
    settings = settings_for(tmp_path, slow_layer.port)
    clients = LayerClients(settings)
    stage = TriggerStage(settings, store, clients["trigger"],
                         Prefilter(load_rules(), debounce=0), VerdictBus())
    try:
        await store.events.add([oom(1)])
        while await stage.step():
            pass
        slow_layer.answers_at_most = -1  # from now on nothing is answered in time
        worker = IncidentWorker(settings, store, clients)
        with pytest.raises(LayerTimeout) as first:  # 1 s (first_byte): a longer one to try
            await worker.step()
        assert not first.value.final
        assert await worker.step()  # 2 s, the ceiling: given up
    finally:
        await clients.aclose()
    (inc,) = await store.incidents.list()
    # Unreviewed, never healthy; critical (an OOM kill), so the escalate_severity floor
    # still sends it to the meta layer, with no review.
    assert inc.review is None and inc.status == "escalated" and inc.stage == "meta"
    detail = await store.incidents.get(inc.id)
    assert detail is not None
    assert any(t.kind == "unreviewed" and "did not answer" in t.detail["error"]
               for t in detail.timeline)


async def test_breaker_stays_closed_for_a_slow_layer_that_is_alive_fake_upstream_slow(
    tmp_path: Path, slow_layer: SlowLayer
) -> None:
    settings = settings_for(tmp_path, slow_layer.port)
    slow_layer.answers_at_most = 0  # nothing is answered in time
    clients = LayerClients(settings)
    pool = clients["trigger"]
    try:
        for _ in range(3):  # more than breaker.failures = 2
            with pytest.raises(LayerTimeout) as exc:
                await pool.chat_json(prompts.trigger_messages([oom(1)], ["oom_kill"], "ab"),
                                     prompts.trigger_schema(1), max_tokens=64, retries=0)
            assert exc.value.alive and exc.value.status == 504
        ep = pool.endpoints[0]
        assert ep.breaker.state == "closed" and ep.health == "ready"
        assert slow_layer.requests == 3  # every call reached the layer
    finally:
        await clients.aclose()


async def test_breaker_opens_for_a_layer_that_is_frozen_fake_upstream_hang(
    tmp_path: Path, slow_layer: SlowLayer
) -> None:
    settings = settings_for(tmp_path, slow_layer.port)
    slow_layer.answers_at_most = 0
    slow_layer.health = False  # SIGSTOPped: connections accepted, nothing answered
    clients = LayerClients(settings)
    pool = clients["trigger"]
    messages = prompts.trigger_messages([oom(1)], ["oom_kill"], "ab")
    try:
        for _ in range(2):
            with pytest.raises(LayerTimeout) as exc:
                await pool.chat_json(messages, prompts.trigger_schema(1), max_tokens=64,
                                     retries=0)
            assert not exc.value.alive
        ep = pool.endpoints[0]
        assert ep.breaker.state == "open" and ep.health == "down"
        started = time.monotonic()
        with pytest.raises(LayerError) as down:
            await pool.chat_json(messages, prompts.trigger_schema(1), max_tokens=64, retries=0)
        assert down.value.status == 503 and down.value.code == "layer_unavailable"
        assert time.monotonic() - started < 0.5  # failed fast, without the layer
        assert slow_layer.requests == 2
    finally:
        await clients.aclose()


async def test_breaker_opens_for_a_layer_that_refuses_connections(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, free_port())  # nothing listens there
    clients = LayerClients(settings)
    pool = clients["trigger"]
    try:
        for _ in range(2):
            with pytest.raises(LayerError) as exc:
                await pool.chat({"messages": [{"role": "user", "content": "hi"}]})
            assert exc.value.status == 503 and "unreachable" in exc.value.message
        assert pool.endpoints[0].breaker.state == "open"
    finally:
        await clients.aclose()


async def test_deadline_follows_the_speed_the_layer_reported_fake_upstream_slow(
    tmp_path: Path, slow_layer: SlowLayer
) -> None:
    settings = settings_for(tmp_path, slow_layer.port, timeouts={
        "connect": 1.0, "first_byte": 120.0, "total": 600.0})
    clients = LayerClients(settings)
    pool = clients["trigger"]
    ep = pool.endpoints[0]
    work = Work(prompt_chars=3000, max_tokens=288)
    try:
        assert pool.deadline(ep, work).seconds == 120.0  # nothing measured: first_byte
        await pool.chat_json(prompts.trigger_messages([oom(1)], ["oom_kill"], "ab"),
                             prompts.trigger_schema(1), max_tokens=64, retries=0)
    finally:
        await clients.aclose()
    assert ep.speed.prompt_tps == pytest.approx(10000.0)
    assert ep.speed.generation_tps == pytest.approx(5000.0)
    # 3000 chars at the measured chars/token, prompt at 10,000 t/s, 288 tokens at
    # 5,000 t/s, times the factor 4 (over the floor of 0.3 s set here).
    assert ep.speed.chars_per_token is not None
    expected = 3000 / ep.speed.chars_per_token / 10000 + 288 / 5000
    assert pool.deadline(ep, work).seconds == pytest.approx(4 * expected)


# -- the deadline rule itself -------------------------------------------------------------

RULE = DeadlineRule(factor=4.0, floor=30.0, ceiling=600.0, fallback=120.0)
BATCH = Work(prompt_chars=3000, max_tokens=288)  # 8 trigger events


def llama_answer(prompt_tps: float, gen_tps: float, prompt_n: int = 1000,
                 predicted_n: int = 160) -> dict[str, Any]:
    return {"usage": {"prompt_tokens": prompt_n, "completion_tokens": predicted_n},
            "timings": {"prompt_n": prompt_n, "prompt_ms": prompt_n / prompt_tps * 1000,
                        "predicted_n": predicted_n, "predicted_ms": predicted_n / gen_tps * 1000}}


def test_deadline_is_the_fallback_until_measured_then_factor_times_expected() -> None:
    speed = Speed()
    assert speed.deadline(BATCH, RULE).seconds == 120.0
    speed.observe(llama_answer(prompt_tps=100.0, gen_tps=10.0), elapsed=26.0, prompt_chars=3000)
    assert speed.chars_per_token == pytest.approx(3.0)
    # 1000 prompt tokens at 100/s + 288 at 10/s = 38.8 s, times 4.
    assert speed.deadline(BATCH, RULE).seconds == pytest.approx(155.2)
    assert speed.deadline(Work(300, 64), RULE).seconds == 30.0  # the floor
    assert speed.deadline(Work(30000, 2000), RULE).seconds == 600.0  # the ceiling
    assert speed.deadline(Work(30000, 2000), RULE).final


def test_a_slower_layer_lengthens_deadlines_at_once_a_faster_one_gradually() -> None:
    speed = Speed()
    speed.observe(llama_answer(100.0, 10.0), elapsed=26.0, prompt_chars=3000)
    before = speed.deadline(BATCH, RULE).seconds
    speed.observe(llama_answer(10.0, 1.0), elapsed=260.0, prompt_chars=3000)  # 10x slower
    assert speed.deadline(BATCH, RULE).seconds == pytest.approx(min(600.0, before * 10))
    speed.observe(llama_answer(100.0, 10.0), elapsed=26.0, prompt_chars=3000)
    assert speed.generation_tps == pytest.approx(5.5)  # halfway back, not all the way


def test_a_timeout_lengthens_the_next_deadline_up_to_the_ceiling() -> None:
    speed = Speed()
    speed.observe(llama_answer(100.0, 10.0), elapsed=26.0, prompt_chars=3000)
    seconds = []
    for _ in range(4):
        d = speed.deadline(BATCH, RULE)
        seconds.append(round(d.seconds, 1))
        speed.timed_out(d)
    assert seconds == [155.2, 600.0, 600.0, 600.0]
    half = Work(prompt_chars=1500, max_tokens=160)
    assert speed.deadline(half, RULE).seconds == 600.0  # the halves too, after timeouts
    speed.observe(llama_answer(100.0, 10.0), elapsed=26.0, prompt_chars=3000)
    assert speed.deadline(BATCH, RULE).seconds == pytest.approx(155.2)  # an answer resets it


def test_without_timings_the_speed_is_completion_tokens_over_elapsed() -> None:
    speed = Speed()
    speed.observe({"usage": {"prompt_tokens": 500, "completion_tokens": 100}}, elapsed=20.0,
                  prompt_chars=2000)
    assert speed.generation_tps == pytest.approx(5.0) and speed.prompt_tps is None
    assert speed.chars_per_token == pytest.approx(4.0)  # 2000 chars / 500 tokens
    unmeasured_prompt = 500 / (5.0 * 4.0)  # prompt assumed 4x the generation speed
    assert speed.deadline(Work(2000, 100), RULE).seconds == pytest.approx(
        max(30.0, 4 * (unmeasured_prompt + 20.0)))


# -- real llama-server --------------------------------------------------------------------


@pytest.fixture
def real_trigger(tmp_path: Path, llama_server_bin: Path, model_path: Path) -> Iterator[int]:
    port = free_port()
    proc = llama_server(llama_server_bin, model_path, port, tmp_path / "layer.log").start()
    proc.wait_http(f"http://127.0.0.1:{port}/health")
    yield port
    proc.stop(signal.SIGKILL)


@pytest.mark.slow
async def test_speed_is_read_from_real_llama_server_timings(
    tmp_path: Path, real_trigger: int
) -> None:
    settings = Settings.model_validate({
        "state_dir": str(tmp_path / "state"), "memory": {"enabled": False},
        "layers": {n: {"port": real_trigger, "managed": False, "parallel": 2}
                   for n in ("trigger", "review", "meta")},
    })
    clients = LayerClients(settings)
    pool = clients["trigger"]
    ep = pool.endpoints[0]
    events = [oom(i) for i in range(4)]
    messages = prompts.trigger_messages(events, ["oom_kill"] * 4, prompts.new_nonce())
    work = Work(prompt_chars=sum(len(m["content"]) for m in messages), max_tokens=32 * 4 + 32)
    try:
        started = time.perf_counter()
        await pool.chat_json(messages, prompts.trigger_schema(4), max_tokens=work.max_tokens,
                             retries=0)
        elapsed = time.perf_counter() - started
    finally:
        await clients.aclose()
    # llama-server's answer carried timings: both speeds measured, tokens/chars from usage.
    assert ep.speed.samples == 1
    assert ep.speed.generation_tps is not None and ep.speed.generation_tps > 0
    assert ep.speed.prompt_tps is not None and ep.speed.prompt_tps > ep.speed.generation_tps
    assert ep.speed.chars_per_token is not None and 1.0 < ep.speed.chars_per_token < 8.0
    # The rule's deadline for the same work would not have cut the request it measured.
    expected = ep.speed.expected_seconds(work)
    assert expected is not None and expected * settings.pipeline.deadline_factor > elapsed

"""layers/client.py without a layer: the circuit breaker on a fake clock, the admission
limiter, which endpoint of a layer's pool a request goes to (and in which order the others
are tried), and how a chat body is adapted to each engine. Upstreams are a fake HTTP client
that answers from a table; nothing listens anywhere."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from layers import client as client_mod
from layers import http
from layers.client import (
    Breaker,
    Endpoint,
    LayerError,
    LayerPool,
    LayerTimeout,
    Limiter,
    translate_chat_body,
)
from layers.config import Settings

# -- a fake clock ------------------------------------------------------------------------


class Clock:
    """Stands in for the ``time`` module of layers/client.py: time moves when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    monkeypatch.setattr(client_mod, "time", fake)
    yield fake


# -- the breaker ---------------------------------------------------------------------------


def test_breaker_opens_after_n_consecutive_failures_and_refuses_until_the_cooldown(
    clock: Clock,
) -> None:
    b = Breaker(failures_to_open=3, reset_after=10.0)
    for _ in range(2):
        b.failure()
        assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open"
    assert not b.allow() and not b.allow()
    clock.advance(4.0)
    assert b.state == "open" and not b.allow()
    assert b.seconds_until_trial() == pytest.approx(6.0)


def test_a_success_resets_the_count_failures_must_be_consecutive(clock: Clock) -> None:
    b = Breaker(failures_to_open=3, reset_after=10.0)
    for _ in range(5):
        b.failure()
        b.failure()
        b.success()
    assert b.state == "closed" and b.failures == 0
    b.failure()
    b.failure()
    assert b.state == "closed"


def test_half_open_after_the_cooldown_lets_exactly_one_trial_through(clock: Clock) -> None:
    b = Breaker(failures_to_open=1, reset_after=10.0)
    b.failure()
    clock.advance(10.0)
    assert b.state == "half-open" and b.seconds_until_trial() == 0.0
    assert b.allow()  # the trial
    assert not b.allow() and not b.allow()  # nothing else while it runs


def test_a_successful_trial_closes_the_breaker(clock: Clock) -> None:
    b = Breaker(failures_to_open=2, reset_after=5.0)
    b.failure()
    b.failure()
    clock.advance(5.0)
    assert b.allow()
    b.success()
    assert b.state == "closed"
    assert all(b.allow() for _ in range(5))  # no longer one at a time
    b.failure()
    assert b.state == "closed"  # and the count starts again from zero


def test_a_failed_trial_reopens_for_a_whole_cooldown(clock: Clock) -> None:
    b = Breaker(failures_to_open=3, reset_after=10.0)
    for _ in range(3):
        b.failure()
    clock.advance(12.0)
    assert b.allow()
    b.failure()  # one failure suffices once open: no three more
    assert b.state == "open" and not b.allow()
    clock.advance(9.9)
    assert b.state == "open"
    clock.advance(0.1)
    assert b.state == "half-open" and b.allow()


# -- the limiter ----------------------------------------------------------------------------


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_limiter_admits_up_to_capacity_then_queues_then_refuses_with_429() -> None:
    lim = Limiter(capacity=2, max_queue=1)
    await lim.acquire("meta")
    await lim.acquire("meta")
    queued = asyncio.create_task(lim.acquire("meta"))
    await _settle()
    assert not queued.done() and lim.waiting == 1 and lim.inflight == 2
    with pytest.raises(LayerError) as err:
        await lim.acquire("meta")
    assert err.value.status == 429 and err.value.code == "layer_saturated"
    assert err.value.retry_after is not None and err.value.retry_after > 0
    assert "meta" in err.value.message
    await lim.release()
    await asyncio.wait_for(queued, 1)
    assert lim.inflight == 2 and lim.waiting == 0


async def test_limiter_without_a_queue_refuses_at_once_when_full() -> None:
    lim = Limiter(capacity=1, max_queue=0)
    await lim.acquire("trigger")
    with pytest.raises(LayerError, match="saturated"):
        await asyncio.wait_for(lim.acquire("trigger"), 1)  # no wait: a 429 right away
    await lim.release()
    await asyncio.wait_for(lim.acquire("trigger"), 1)


async def test_a_cancelled_waiter_leaks_no_place_and_swallows_no_wakeup() -> None:
    lim = Limiter(capacity=1, max_queue=4)
    await lim.acquire("review")
    first = asyncio.create_task(lim.acquire("review"))
    second = asyncio.create_task(lim.acquire("review"))
    await _settle()
    assert lim.waiting == 2
    await lim.release()  # wakes the waiters ...
    first.cancel()  # ... and the first goes away before it ran
    await asyncio.wait_for(second, 1)
    assert first.cancelled()
    assert lim.inflight == 1 and lim.waiting == 0


async def test_limiter_never_exceeds_its_capacity_under_contention() -> None:
    lim = Limiter(capacity=3, max_queue=100)
    running = peak = done = 0

    async def one(i: int) -> None:
        nonlocal running, peak, done
        await lim.acquire("meta")
        try:
            running += 1
            peak = max(peak, running)
            for _ in range(i % 4):
                await asyncio.sleep(0)
        finally:
            running -= 1
            await lim.release()
        done += 1

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), 5)
    assert done == 40 and peak == 3
    assert lim.inflight == 0 and lim.waiting == 0


# -- a layer pool against a fake upstream ----------------------------------------------------

LOCAL = "http://127.0.0.1:18080"
REPLICA = "http://replica:8080"
FALLBACK_1 = "http://fallback-one:8080"
FALLBACK_2 = "http://fallback-two:8080"

Answer = int | type[http.HTTPError]


class FakeResponse:
    def __init__(self, status: int, body: bytes = b'{"ok": true}') -> None:
        self.status_code = status
        self.headers: dict[str, str] = {}
        self._body = body
        self.closed = False

    async def aread(self) -> bytes:
        return self._body

    async def aclose(self) -> None:
        self.closed = True


class FakeHTTP:
    """Answers POSTs and /health checks per endpoint root from tables (default 200)."""

    def __init__(self) -> None:
        self.posts: dict[str, Answer] = {}
        self.health: dict[str, Answer] = {}
        self.sent: list[tuple[str, dict[str, Any]]] = []  # (root, payload) of every POST
        self.health_checks: list[str] = []

    @staticmethod
    def _answer(answer: Answer) -> FakeResponse:
        if isinstance(answer, int):
            return FakeResponse(answer)
        raise answer("fake")

    async def request(self, method: str, url: str, *, content: bytes, headers: dict[str, str],
                      timeout: http.Timeouts) -> FakeResponse:
        root = url.split("/v1/")[0]
        self.sent.append((root, json.loads(content)))
        return self._answer(self.posts.get(root, 200))

    async def get(self, url: str, *, headers: dict[str, str], timeout: float) -> FakeResponse:
        root = url.removesuffix("/health")
        self.health_checks.append(root)
        return self._answer(self.health.get(root, 200))

    def tried(self) -> list[str]:
        return [root for root, _ in self.sent]


def pool(fake: FakeHTTP, *, endpoints: list[dict[str, Any]] | None = None, managed: bool = True,
         failures: int = 3, reset_after: float = 10.0, retries: int = 1,
         engine: str = "llama-server") -> LayerPool:
    if endpoints is None:
        endpoints = [{"url": f"{REPLICA}/v1"},
                     {"url": f"{FALLBACK_1}/v1", "role": "fallback"},
                     {"url": f"{FALLBACK_2}/v1", "role": "fallback"}]
    settings = Settings.model_validate({
        "engine": {"kind": engine},
        "layers": {"meta": {"port": 18080, "parallel": 2, "managed": managed,
                            "endpoints": endpoints}},
        "gateway": {"breaker": {"failures": failures, "reset_after": reset_after,
                                "retries": retries}},
    })
    return LayerPool("meta", settings.layers.meta, settings, fake)  # type: ignore[arg-type]


def roots(endpoints: list[Endpoint]) -> list[str]:
    return [e.root for e in endpoints]


async def chat(p: LayerPool, body: dict[str, Any] | None = None) -> str:
    """One chat through the pool; the root of the endpoint that answered."""
    up = await p.open("/chat/completions", body or {"model": "meta", "messages": []})
    try:
        return up.endpoint.root
    finally:
        await up.aclose()


def test_endpoint_order_is_local_then_replicas_then_fallbacks_as_configured(
    clock: Clock,
) -> None:
    p = pool(FakeHTTP())
    assert roots(p.candidates()) == [LOCAL, REPLICA, FALLBACK_1, FALLBACK_2]
    assert [e.role for e in p.endpoints] == ["replica", "replica", "fallback", "fallback"]
    # An unmanaged layer with endpoints: only those, the local port is not one of them.
    assert roots(pool(FakeHTTP(), managed=False).candidates()) == [REPLICA, FALLBACK_1, FALLBACK_2]


def test_replicas_are_balanced_by_free_slots_and_a_down_one_goes_last(clock: Clock) -> None:
    p = pool(FakeHTTP())
    local, replica = p.endpoints[0], p.endpoints[1]
    local.inflight = 2  # both its slots busy
    assert roots(p.candidates())[:2] == [REPLICA, LOCAL]
    replica.inflight = 2
    local.inflight = 1
    assert roots(p.candidates())[:2] == [LOCAL, REPLICA]
    local.inflight = 0
    local.health = "down"  # the least busy, but last seen down
    assert roots(p.candidates()) == [REPLICA, LOCAL, FALLBACK_1, FALLBACK_2]


async def test_a_request_goes_to_the_first_candidate_and_others_are_not_touched(
    clock: Clock,
) -> None:
    fake = FakeHTTP()
    p = pool(fake)
    assert await chat(p) == LOCAL
    assert fake.tried() == [LOCAL]
    assert p.limiter.inflight == 0  # closing the answer gave its place back


async def test_failures_move_on_to_the_next_endpoint_within_the_retry_budget(clock: Clock) -> None:
    fake = FakeHTTP()
    fake.posts = {LOCAL: 500, REPLICA: http.ConnectError, FALLBACK_1: 200}
    assert await chat(pool(fake, retries=2)) == FALLBACK_1
    assert fake.tried() == [LOCAL, REPLICA, FALLBACK_1]

    fake = FakeHTTP()
    fake.posts = {LOCAL: 502, REPLICA: 429, FALLBACK_1: 200}
    p = pool(fake, retries=1)  # one retry: two endpoints, the fallback is never asked
    with pytest.raises(LayerError) as err:
        await chat(p)
    assert fake.tried() == [LOCAL, REPLICA]
    assert err.value.status == 429  # the last endpoint's answer
    assert p.limiter.inflight == 0


async def test_a_client_error_is_not_retried_and_is_nobodys_breaker_failure(clock: Clock) -> None:
    fake = FakeHTTP()
    fake.posts = {LOCAL: 400}
    p = pool(fake, failures=1)
    with pytest.raises(LayerError) as err:
        await chat(p)
    assert err.value.status == 400 and err.value.code == "invalid_request"
    assert fake.tried() == [LOCAL]
    assert p.endpoints[0].breaker.state == "closed"


async def test_a_loading_endpoint_is_skipped_without_opening_its_breaker(clock: Clock) -> None:
    fake = FakeHTTP()
    fake.posts = {LOCAL: 503}
    p = pool(fake, failures=1)
    for _ in range(3):
        assert await chat(p) == REPLICA
    assert p.endpoints[0].breaker.state == "closed"
    assert p.endpoints[0].health == "loading"


async def test_an_endpoint_with_an_open_breaker_is_skipped_until_its_trial(clock: Clock) -> None:
    fake = FakeHTTP()
    fake.posts = {LOCAL: 500}
    p = pool(fake, failures=2, reset_after=10.0)
    assert await chat(p) == REPLICA
    assert await chat(p) == REPLICA
    local = p.endpoints[0]
    assert local.breaker.state == "open"
    fake.sent.clear()
    fake.posts = {}  # the local server is back, but its breaker does not know yet
    assert await chat(p) == REPLICA
    assert fake.tried() == [REPLICA]  # not even tried while open
    clock.advance(10.0)
    fake.sent.clear()
    assert await chat(p) == LOCAL  # the half-open trial, which succeeds and closes it
    assert local.breaker.state == "closed"
    assert await chat(p) == LOCAL


async def test_fallbacks_answer_only_once_every_replica_is_out(clock: Clock) -> None:
    fake = FakeHTTP()
    fake.posts = {LOCAL: http.ConnectError, REPLICA: http.ConnectError}
    p = pool(fake, failures=1, retries=0)
    # retries 0: one endpoint per request; each refused one opens its breaker.
    with pytest.raises(LayerError):
        await chat(p)
    with pytest.raises(LayerError):
        await chat(p)
    assert [e.breaker.state for e in p.endpoints[:2]] == ["open", "open"]
    fake.sent.clear()
    assert await chat(p) == FALLBACK_1
    assert await chat(p) == FALLBACK_1  # in configured order: the second is never asked
    assert fake.tried() == [FALLBACK_1, FALLBACK_1]


async def test_every_breaker_open_is_a_503_with_retry_after_and_nothing_sent(clock: Clock) -> None:
    fake = FakeHTTP()
    fake.posts = {LOCAL: 500}
    p = pool(fake, endpoints=[], failures=1, reset_after=30.0, retries=0)
    with pytest.raises(LayerError):
        await chat(p)
    fake.sent.clear()
    clock.advance(5.0)
    with pytest.raises(LayerError) as err:
        await chat(p)
    assert err.value.status == 503 and err.value.code == "layer_unavailable"
    assert err.value.retry_after == pytest.approx(25.0)
    assert fake.sent == []
    assert p.limiter.inflight == 0


async def test_a_half_open_endpoint_that_is_not_tried_keeps_its_trial(clock: Clock) -> None:
    """Listing a half-open endpoint as a candidate must not use up its one trial: requests
    that another endpoint answered never tried it, and the next one that needs it may."""
    fake = FakeHTTP()
    p = pool(fake, failures=1, reset_after=10.0, retries=1,
             endpoints=[{"url": f"{FALLBACK_1}/v1", "role": "fallback"}])
    fallback = p.endpoints[1]
    fallback.breaker.failure()  # it failed once: open
    clock.advance(10.0)
    assert fallback.breaker.state == "half-open"
    for _ in range(3):  # the local replica answers; the fallback is not needed
        assert await chat(p) == LOCAL
    fake.posts = {LOCAL: http.ConnectError}
    assert await chat(p) == FALLBACK_1  # its trial is still there when it is needed
    assert fallback.breaker.state == "closed"


async def test_a_trial_cancelled_by_its_client_leaves_the_trial_to_the_next_request(
    clock: Clock,
) -> None:
    """A client that goes away during the half-open trial decides nothing about the
    endpoint: the next request gets the trial instead of the endpoint staying out."""
    fake = FakeHTTP()
    p = pool(fake, endpoints=[], failures=1, reset_after=10.0, retries=0)
    local = p.endpoints[0]
    local.breaker.failure()
    clock.advance(10.0)
    hang = asyncio.Event()
    answer = fake.request

    async def hanging(*args: Any, **kwargs: Any) -> FakeResponse:
        await hang.wait()
        return await answer(*args, **kwargs)

    fake.request = hanging  # type: ignore[method-assign]
    trial = asyncio.create_task(chat(p))
    await _settle()
    assert local.breaker.trial_in_flight
    with pytest.raises(LayerError, match="circuit open"):
        await chat(p)  # one trial at a time
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert p.limiter.inflight == 0
    fake.request = answer  # type: ignore[method-assign]
    assert await chat(p) == LOCAL
    assert local.breaker.state == "closed"


async def test_a_slow_but_working_layer_does_not_open_its_breaker(clock: Clock) -> None:
    """Timeouts while /health answers are a slow layer (two cores, three models), not a
    dead one; the same timeouts with /health silent open the breaker."""
    fake = FakeHTTP()
    fake.posts = {LOCAL: http.ReadTimeout}
    p = pool(fake, endpoints=[], failures=2, retries=0)
    local = p.endpoints[0]
    for _ in range(5):
        clock.advance(2.0)  # past the one-second reuse of the last /health check
        with pytest.raises(LayerTimeout) as err:
            await chat(p)
        assert err.value.alive and err.value.status == 504
    assert local.breaker.state == "closed" and local.slow_timeouts == 5
    assert fake.health_checks == [LOCAL] * 5

    fake.health = {LOCAL: http.ConnectError}
    for _ in range(2):
        clock.advance(2.0)
        with pytest.raises(LayerTimeout) as err:
            await chat(p)
        assert not err.value.alive
    assert local.breaker.state == "open"


# -- translating a chat body per engine -------------------------------------------------------


def endpoint(flavor: client_mod.Flavor, model: str | None = None) -> Endpoint:
    return Endpoint(url="http://x/v1", role="replica", flavor=flavor,
                    breaker=Breaker(3, 10.0), slots=2, model=model)


def test_max_completion_tokens_becomes_max_tokens_for_llama_engines() -> None:
    for flavor in ("llama-server", "llama-cpp-python"):
        body = translate_chat_body({"model": "meta", "max_completion_tokens": 64},
                                   endpoint(flavor))  # type: ignore[arg-type]
        assert body == {"model": "meta", "max_tokens": 64}
    # an explicit max_tokens wins; the newer field is dropped either way
    body = translate_chat_body({"max_tokens": 10, "max_completion_tokens": 64},
                               endpoint("llama-server"))
    assert body == {"max_tokens": 10}
    body = translate_chat_body({"max_tokens": None, "max_completion_tokens": 64},
                               endpoint("llama-server"))
    assert body == {"max_tokens": 64}
    assert translate_chat_body({"max_completion_tokens": None}, endpoint("llama-server")) == {}


def test_openai_endpoints_keep_max_completion_tokens_and_get_their_model_name() -> None:
    body = translate_chat_body({"model": "meta", "max_completion_tokens": 64},
                               endpoint("openai", model="gpt-4o-mini"))
    assert body == {"model": "gpt-4o-mini", "max_completion_tokens": 64}
    # without a configured model the client's stays
    assert translate_chat_body({"model": "meta"}, endpoint("llama-server")) == {"model": "meta"}


def test_json_schema_becomes_json_object_with_schema_for_llama_cpp_python() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "V", "schema": schema, "strict": True}}
    body = {"response_format": rf, "stream": True, "stream_options": {"include_usage": True}}
    out = translate_chat_body(json.loads(json.dumps(body)), endpoint("llama-cpp-python"))
    assert out == {"response_format": {"type": "json_object", "schema": schema}, "stream": True}
    # llama-server understands both as sent
    assert translate_chat_body(json.loads(json.dumps(body)), endpoint("llama-server")) == body
    plain = {"response_format": {"type": "json_object"}}
    assert translate_chat_body(dict(plain), endpoint("llama-cpp-python")) == plain


async def test_each_endpoint_gets_its_own_translation_of_the_clients_body(clock: Clock) -> None:
    """A retry on an OpenAI fallback is translated from the client's body, not from the
    copy adapted for the llama-server that failed; the client's dict is left alone."""
    fake = FakeHTTP()
    fake.posts = {LOCAL: 500}
    p = pool(fake, endpoints=[{"url": "https://api.openai.com/v1", "role": "fallback",
                               "model": "gpt-4o-mini", "api_key": "sk-x"}])
    body = {"model": "meta", "messages": [], "max_completion_tokens": 32}
    assert await chat(p, body) == "https://api.openai.com"
    (_, to_local), (_, to_openai) = fake.sent
    assert to_local == {"model": "meta", "messages": [], "max_tokens": 32}
    assert to_openai == {"model": "gpt-4o-mini", "messages": [], "max_completion_tokens": 32}
    assert body == {"model": "meta", "messages": [], "max_completion_tokens": 32}


def test_the_local_endpoint_speaks_the_configured_engine_and_remote_ones_llama_server() -> None:
    p = pool(FakeHTTP(), engine="llama-cpp-python",
             endpoints=[{"url": f"{REPLICA}/v1"}, {"url": "https://api.openai.com/v1"},
                        {"url": f"{FALLBACK_1}/v1", "model": "served-name"}])
    assert [e.flavor for e in p.endpoints] == [
        "llama-cpp-python", "llama-server", "openai", "openai"]
    assert p.endpoints[0].health_url == f"{LOCAL}/v1/models"  # no /health there
    assert p.endpoints[1].health_url == f"{REPLICA}/health"

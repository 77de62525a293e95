"""Issue 9, layer faults: slow, hung, failing and garbage-answering layers give the right
error within the configured timeouts; breakers open and close; /ready and /metrics tell
the truth; no connection or task is left behind (counted from outside the gateway).

A real llama-server cannot be made slow, hung or garbage-speaking on demand, so these
use the fake upstream and say so in their names. The killed-mid-stream case with a real
layer is in test_gateway_faults.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.fake_upstream import FakeUpstream
from tests.reliability_support import (
    AUTH,
    GatewayFactory,
    connections_to,
    metric,
    open_fds,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)
MSG = [{"role": "user", "content": "Say something."}]
FakeFactory = Callable[..., FakeUpstream]
# All three layers point at one fake; the gateway's health probes of the three may each
# keep one idle keep-alive connection to it, and one spare connection is kept opened
# ahead (gateway.spare_connections). Anything above that is a leak.
PROBE_CONNECTIONS = 3 + 1


def chat(url: str, *, stream: bool = False, timeout: float = 60.0, **kw: object) -> httpx.Response:
    body = {"model": "meta", "messages": MSG, "max_tokens": 8, "stream": stream, **kw}
    return httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=body, timeout=timeout)


def baseline(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    tasks = metric(text, "ai_sysadmin_asyncio_tasks")
    fds = metric(text, "process_open_fds")
    assert tasks is not None and fds is not None, "leak gauges missing from /metrics"
    return tasks, fds


def test_slow_layer_stream_is_cut_at_the_total_timeout_fake_upstream_slow(
    gateways: GatewayFactory, fakes: FakeFactory
) -> None:
    slow = fakes("slow", token_interval=5.0)  # one token every 5 s, 100 tokens
    gw = gateways(slow.port, gateway={"timeouts": {"first_byte": 10.0, "total": 12.0},
                                      "breaker": {"retries": 0}})
    tasks0, fds0 = baseline(gw.url)
    started = time.monotonic()
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": "meta", "messages": MSG, "stream": True}) as r:
        assert r.status_code == 200
        events = [e for e in r.read().decode().split("\n\n") if e]
    elapsed = time.monotonic() - started
    # Tokens came through as they arrived, then the total deadline ended the stream with
    # an error event and [DONE] — not after 100 tokens × 5 s.
    assert '" t0"' in events[0]
    assert events[-2].startswith('data: {"error"') and "timeout" in events[-2]
    assert events[-1] == "data: [DONE]"
    assert 12.0 <= elapsed < 25.0
    text = gw.metrics()
    assert (metric(text, "ai_sysadmin_stream_errors_total", model="meta") or 0) >= 1
    # The gateway let go of the upstream connection, its tasks and its fds.
    assert wait_until(lambda: connections_to(gw.pid, slow.port) <= PROBE_CONNECTIONS, 10)
    assert wait_until(lambda: baseline(gw.url)[0] <= tasks0 + 1, 10), baseline(gw.url)
    assert open_fds(gw.pid) <= fds0 + 2


def test_client_leaving_before_the_first_token_ends_the_relay_fake_upstream_slow(
    gateways: GatewayFactory, fakes: FakeFactory
) -> None:
    """The gateway sends its head with the first event; a client that leaves before it
    (a long prompt being read) must still end the relay and free the layer's connection
    at once, not when the first token finally comes."""
    slow = fakes("slow", token_interval=0.5, first_token_delay=60.0)
    gw = gateways(slow.port, gateway={"breaker": {"retries": 0}})
    tasks0, _ = baseline(gw.url)

    def ended() -> float:  # streams whose relay finished, however they ended
        return metric(gw.metrics(), "ai_sysadmin_requests_total", route="chat", model="meta",
                      status="200") or 0

    ended0 = ended()
    with pytest.raises(httpx.ReadTimeout):  # no head yet: the client gives up and leaves
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=AUTH,
                          timeout=httpx.Timeout(30, read=1.5),
                          json={"model": "meta", "messages": MSG, "stream": True}):
            pass
    assert wait_until(lambda: ended() == ended0 + 1, 10)  # the relay ran its cleanup
    assert wait_until(lambda: baseline(gw.url)[0] <= tasks0 + 1, 10), baseline(gw.url)
    assert wait_until(lambda: connections_to(gw.pid, slow.port) <= PROBE_CONNECTIONS, 10)


def test_slow_layer_non_streamed_is_504_fake_upstream_slow(
    gateways: GatewayFactory, fakes: FakeFactory
) -> None:
    slow = fakes("slow", token_interval=5.0)
    gw = gateways(slow.port, gateway={"timeouts": {"first_byte": 3.0, "total": 8.0},
                                      "breaker": {"retries": 0}})
    started = time.monotonic()
    r = chat(gw.url)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 15
    assert wait_until(lambda: connections_to(gw.pid, slow.port) <= PROBE_CONNECTIONS, 10)


def test_hung_layer_under_concurrency_leaks_nothing_fake_upstream_hang(
    gateways: GatewayFactory, fakes: FakeFactory
) -> None:
    hang = fakes("hang")
    gw = gateways(hang.port, layers={"meta": {"parallel": 8}},
                  gateway={"timeouts": {"first_byte": 1.5},
                           "breaker": {"retries": 0, "failures": 1000},
                           "max_concurrent_chats": 0})  # the layer's own bound is tested
    tasks0, fds0 = baseline(gw.url)
    results: list[int] = []

    def one(stream: bool) -> None:
        results.append(chat(gw.url, stream=stream, timeout=30).status_code)

    threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(16)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # 8 slots: the first 8 time out after 1.5 s, the other 8 waited their turn.
    assert results == [504] * 16
    assert time.monotonic() - started < 20
    assert wait_until(lambda: connections_to(gw.pid, hang.port) <= PROBE_CONNECTIONS, 10)
    assert wait_until(lambda: baseline(gw.url)[0] <= tasks0 + 1, 10), baseline(gw.url)
    assert open_fds(gw.pid) <= fds0 + 2
    text = gw.metrics()
    assert metric(text, "ai_sysadmin_layer_inflight_requests", layer="meta") == 0
    assert metric(text, "ai_sysadmin_layer_queued_requests", layer="meta") == 0


def test_invalid_json_from_layer_is_502_fake_upstream_invalid_json(
    gateways: GatewayFactory, fakes: FakeFactory
) -> None:
    bad = fakes("invalid_json")
    gw = gateways(bad.port, gateway={"breaker": {"retries": 0, "failures": 100}})
    for model in ("meta", "ai-sysadmin"):
        r = chat(gw.url, model=model)
        # Never a 200 whose body the client cannot parse.
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["code"] == "upstream_error" and "invalid JSON" in err["message"]


def test_breaker_opens_then_closes_and_ready_tells_the_truth_fake_upstream_500(
    gateways: GatewayFactory, fakes: FakeFactory
) -> None:
    up = fakes("error500")
    gw = gateways(up.port, gateway={"breaker": {"failures": 2, "reset_after": 2.0, "retries": 0}})
    assert httpx.get(f"{gw.url}/ready", headers=AUTH).status_code == 200
    assert [chat(gw.url).status_code for _ in range(2)] == [502, 502]
    # Open: fails fast without touching the layer, and readiness says so.
    before = up.requests
    r = chat(gw.url)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert up.requests == before
    ready = httpx.get(f"{gw.url}/ready", headers=AUTH)
    assert ready.status_code == 503, ready.json()
    meta = ready.json()["layers"]["meta"]
    assert meta["endpoints"][0]["breaker"] == "open"
    url = f"http://127.0.0.1:{up.port}/v1"
    assert metric(gw.metrics(), "ai_sysadmin_layer_breaker_state", layer="meta", endpoint=url) == 2
    # The layer recovers: after reset_after one trial request goes through and closes it.
    up.fault = "ok"
    assert wait_until(lambda: chat(gw.url).status_code == 200, 10, interval=0.5)
    assert metric(gw.metrics(), "ai_sysadmin_layer_breaker_state", layer="meta", endpoint=url) == 0
    ready = httpx.get(f"{gw.url}/ready", headers=AUTH)
    assert ready.status_code == 200
    assert ready.json()["layers"]["meta"]["endpoints"][0]["breaker"] == "closed"
    text = gw.metrics()
    assert metric(text, "ai_sysadmin_requests_total", route="chat", model="meta", status="502") == 2
    assert (metric(text, "ai_sysadmin_requests_total", route="chat", model="meta",
                   status="503") or 0) >= 1

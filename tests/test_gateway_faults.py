"""Issue 3, behaviour under trouble: killed and saturated layers, disconnects, fallbacks,
breakers, timeouts. Real llama-server where it can show the fault; a fake upstream only
for faults it cannot produce on demand (the test names say so)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream
from tests.support import Proc, cli, free_port, gateway_config, llama_server, write_toml

KEY = {"Authorization": "Bearer test-key"}
LONG = [{"role": "user", "content": "Write a very long story about a server room."}]


@pytest.fixture
def real_layer(tmp_path: Path, llama_server_bin: Path, model_path: Path) -> Iterator[tuple[Proc, int]]:
    """A llama-server of our own, which tests may kill."""
    port = free_port()
    proc = llama_server(llama_server_bin, model_path, port, tmp_path / "layer.log").start()
    proc.wait_http(f"http://127.0.0.1:{port}/health")
    yield proc, port
    proc.stop(signal.SIGKILL)


GatewayFactory = Callable[..., tuple[Proc, str]]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    procs: list[Proc] = []

    def start(layer_port: int, layers: dict[str, Any] | None = None, **gw: Any) -> tuple[Proc, str]:
        port = free_port()
        data = gateway_config(tmp_path, {n: layer_port for n in ("trigger", "review", "meta")},
                              port, **gw)
        for name, extra in (layers or {}).items():
            data["layers"][name].update(extra)
        cfg = write_toml(tmp_path / f"gw{port}.toml", data)
        proc = cli(cfg, "gateway", log_path=tmp_path / f"gw{port}.log").start()
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{url}/health", timeout=60)
        return proc, url

    yield start
    for p in procs:
        p.stop()


def sdk(url: str, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0, **kw)


def _slots(port: int) -> list[dict[str, Any]]:
    slots: list[dict[str, Any]] = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=5).json()
    return slots


# -- real llama-server ------------------------------------------------------------------------


def test_layer_killed_mid_stream_gives_error_event_and_gateway_stays_up(
    real_layer: tuple[Proc, int], gateway: GatewayFactory
) -> None:
    layer, port = real_layer
    gw, url = gateway(port)
    # Temperature 0 and the kill at the first chunk: sampled, the base model sometimes
    # ended its turn (a stop string) within three chunks, and the stream finished
    # cleanly before the kill (a flaky "did not raise").
    stream = sdk(url).chat.completions.create(model="meta", messages=LONG, max_tokens=400,
                                              stream=True, temperature=0)
    got = 0
    with pytest.raises(openai.APIError) as exc:
        for _chunk in stream:
            got += 1
            if got == 1:
                os.kill(layer.pid, signal.SIGKILL)
    assert got >= 1
    assert "broke off" in str(exc.value) or "ended the stream early" in str(exc.value)
    assert gw.popen is not None and gw.popen.poll() is None
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/ready", headers=KEY)
    assert ready.status_code == 503 and ready.headers["retry-after"]
    assert ready.json()["layers"]["meta"]["state"] == "down"
    with pytest.raises(openai.APIStatusError) as down:
        sdk(url).chat.completions.create(model="meta", messages=LONG, max_tokens=4)
    assert down.value.status_code == 503
    metrics = httpx.get(f"{url}/metrics", headers=KEY).text
    assert 'ai_sysadmin_stream_errors_total{model="meta"} 1.0' in metrics


def test_client_disconnect_cancels_the_upstream_generation(
    real_layer: tuple[Proc, int], gateway: GatewayFactory
) -> None:
    _, port = real_layer
    # At temperature 0 (sampled, the base model sometimes ends its turn after a few
    # tokens) and without the repetition cut (which would end the generation itself): the
    # layer is still generating when the client leaves.
    _, url = gateway(port, repetition={"enabled": False})
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=KEY, timeout=60,
                      json={"model": "meta", "messages": LONG, "max_tokens": 1500,
                            "stream": True, "temperature": 0}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert any(s["is_processing"] for s in _slots(port))
    # The client is gone: the layer must stop generating soon, not finish 1500 tokens.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(s["is_processing"] for s in _slots(port)):
        time.sleep(0.2)
    slots = _slots(port)
    assert not any(s["is_processing"] for s in slots)
    decoded = max(s.get("next_token", [{}])[0].get("n_decoded", 0) for s in slots)
    assert decoded < 1500


def test_replica_down_falls_back_and_breaker_opens(
    real_layer: tuple[Proc, int], gateway: GatewayFactory
) -> None:
    _, port = real_layer
    dead = free_port()
    meta = {"endpoints": [
        {"url": f"http://127.0.0.1:{dead}/v1", "role": "replica"},
        {"url": f"http://127.0.0.1:{port}/v1", "role": "fallback"},
    ]}
    _, url = gateway(port, layers={"meta": meta},
                     breaker={"failures": 2, "reset_after": 120, "retries": 1})
    client = sdk(url)
    for _ in range(3):
        r = client.chat.completions.create(model="meta", messages=LONG, max_tokens=3)
        assert r.choices[0].message.content is not None
    ready = httpx.get(f"{url}/ready", headers=KEY).json()["layers"]["meta"]
    assert ready["state"] == "ready"  # served by the fallback
    primary, fallback = ready["endpoints"]
    assert primary["breaker"] == "open" and primary["health"] == "down"
    assert fallback["breaker"] == "closed" and fallback["health"] == "ready"
    metrics = httpx.get(f"{url}/metrics", headers=KEY).text
    gauge = f'ai_sysadmin_layer_breaker_state{{endpoint="http://127.0.0.1:{dead}/v1",layer="meta"}}'
    assert f"{gauge} 2.0" in metrics


def test_full_queue_gives_429_with_retry_after(
    real_layer: tuple[Proc, int], gateway: GatewayFactory
) -> None:
    _, port = real_layer
    # Temperature 0, no repetition cut: the long answer must still hold the one slot
    # when the second request comes (sampled, the base model sometimes ended its turn
    # within a few tokens, and the slot was free again: a flaky "did not raise").
    _, url = gateway(port, layers={"meta": {"parallel": 1, "max_queue": 0}},
                     repetition={"enabled": False})
    busy = threading.Event()

    def long_request() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=KEY, timeout=120,
                          json={"model": "meta", "messages": LONG, "max_tokens": 300,
                                "stream": True, "temperature": 0}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 2:
                    busy.set()
                if i > 40:
                    break

    t = threading.Thread(target=long_request)
    t.start()
    assert busy.wait(60)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as exc:
        sdk(url).chat.completions.create(model="meta", messages=LONG, max_tokens=3)
    assert time.monotonic() - started < 2  # refused at once, not after waiting
    assert int(exc.value.response.headers["retry-after"]) >= 1
    assert exc.value.body["code"] == "layer_saturated"  # type: ignore[index]
    t.join(120)


# -- fake upstream: faults a real layer cannot be made to show ----------------------------------


def test_upstream_timeout_is_504_fake_upstream_hang(
    gateway: GatewayFactory, fakes: Callable[..., FakeUpstream]
) -> None:
    hang = fakes("hang")
    _, url = gateway(hang.port, timeouts={"first_byte": 1.0}, breaker={"retries": 0})
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as exc:
        sdk(url).chat.completions.create(model="meta", messages=LONG, max_tokens=3)
    assert exc.value.status_code == 504
    assert exc.value.body["code"] == "upstream_timeout"  # type: ignore[index]
    assert time.monotonic() - started < 10


def test_timeouts_of_a_live_layer_do_not_open_the_breaker_fake_upstream_hang(
    gateway: GatewayFactory, fakes: Callable[..., FakeUpstream]
) -> None:
    """Its /health answers, its chat does not in time: slow (three layers on two cores),
    not dead. Each request is a 504, none is refused by an open breaker."""
    hang = fakes("hang")
    _, url = gateway(hang.port, timeouts={"first_byte": 1.0},
                     breaker={"failures": 2, "reset_after": 60, "retries": 0})
    for _ in range(3):
        r = httpx.post(f"{url}/v1/chat/completions", headers=KEY, timeout=30,
                       json={"model": "meta", "messages": LONG, "max_tokens": 3})
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert hang.requests == 3
    meta = httpx.get(f"{url}/ready", headers=KEY).json()["layers"]["meta"]
    assert meta["endpoints"][0]["breaker"] == "closed"
    assert meta["endpoints"][0]["health"] == "ready"


def test_loading_layer_is_503_with_retry_after_fake_upstream_loading(
    gateway: GatewayFactory, fakes: Callable[..., FakeUpstream]
) -> None:
    loading = fakes("loading")
    _, url = gateway(loading.port)
    r = httpx.post(f"{url}/v1/chat/completions", headers=KEY,
                   json={"model": "review", "messages": LONG, "max_tokens": 3})
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "layer_loading"
    ready = httpx.get(f"{url}/ready", headers=KEY)
    assert ready.status_code == 503
    assert ready.json()["layers"]["review"]["state"] == "loading"


def test_crash_mid_stream_ends_with_error_and_done_fake_upstream_crash(
    gateway: GatewayFactory, fakes: Callable[..., FakeUpstream]
) -> None:
    crash = fakes("crash_midstream")
    _, url = gateway(crash.port)
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=KEY, timeout=30,
                      json={"model": "meta", "messages": LONG, "stream": True}) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert '"one"' in events[0] and '" two"' in events[1]
    assert events[-2].startswith('data: {"error"') and events[-1] == "data: [DONE]"


def test_errors_open_the_breaker_then_fail_fast_fake_upstream_500(
    gateway: GatewayFactory, fakes: Callable[..., FakeUpstream]
) -> None:
    broken = fakes("error500")
    _, url = gateway(broken.port, breaker={"failures": 2, "reset_after": 60, "retries": 0})
    codes = []
    for _ in range(4):
        r = httpx.post(f"{url}/v1/chat/completions", headers=KEY,
                       json={"model": "meta", "messages": LONG, "max_tokens": 3})
        codes.append((r.status_code, r.json()["error"]["code"]))
    assert codes[:2] == [(502, "upstream_error")] * 2
    assert codes[2:] == [(503, "layer_unavailable")] * 2
    assert broken.requests == 2  # the open breaker kept the others off the broken layer

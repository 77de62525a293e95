"""What a layer is doing right now: model, engine, health, slots and throughput.

Read from the layer's own servers (llama-server's ``/props``, ``/slots`` and Prometheus
``/metrics``), from the client pool (health, breaker, gateway-side queue) and, when the
layers run in this process, from the supervisor (pid, state, restarts). Every probe is
bounded and optional: a server that does not answer shows ``None``, never a made-up value.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from layers import http
from layers.client import Endpoint, LayerPool
from layers.config import Settings
from layers.supervisor import LayerProcess

_METRIC_LINE = re.compile(r"^(llamacpp:[a-z_]+)\s+([-+0-9.eE]+|nan|inf)\s*$", re.MULTILINE)


class EndpointStatus(BaseModel):
    url: str
    role: str
    engine: str = Field(description="llama-server, llama-cpp-python or openai (remote API)")
    health: str
    breaker: str
    model: str | None = Field(None, description="model file or name the endpoint serves")
    build: str | None = Field(None, description="llama.cpp build reported by /props")
    slots_total: int | None = None
    slots_busy: int | None = None
    tokens_per_second: float | None = Field(
        None, description="mean generation speed since the server started "
        "(llamacpp:tokens_predicted_total / llamacpp:tokens_predicted_seconds_total)",
    )
    prompt_tokens_per_second: float | None = None
    tokens_predicted_total: float | None = None
    requests_processing: float | None = None


class LayerStatus(BaseModel):
    name: str
    host: str
    port: int
    managed: bool = Field(description="the configuration has a local server for this layer")
    control: str = Field(
        description="'supervisor' when this gateway's process runs the layer (start/stop/"
        "restart work), else 'external' (systemd, `layers serve`, a remote URL)"
    )
    state: str = Field(description="supervisor state, or the endpoints' best health")
    health: str
    pid: int | None = None
    restarts: int | None = None
    threads: int | None = Field(None, description="`--threads` the supervisor gave the layer")
    last_exit: str | None = Field(
        None, description="how the layer's last process ended, e.g. 'SIGKILL after 80.2s'"
    )
    reason: str | None = Field(None, description="why a `failed` layer is not restarted")
    model: str | None = None
    engine: str
    slots_total: int | None = None
    slots_busy: int | None = None
    tokens_per_second: float | None = None
    inflight: int = Field(description="requests the gateway has in flight to this layer")
    queued: int = Field(description="requests waiting in the gateway for a slot")
    endpoints: list[EndpointStatus]


def parse_llama_metrics(text: str) -> dict[str, float]:
    """The ``llamacpp:*`` samples of a Prometheus exposition (no labels are used)."""
    out: dict[str, float] = {}
    for name, value in _METRIC_LINE.findall(text):
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


async def _get_json(client: http.HTTPClient, url: str, headers: dict[str, str],
                    timeout: float) -> Any:
    try:
        r = await client.get(url, headers=headers, timeout=timeout)
        if r.status_code != 200:
            return None
        return r.json()
    except (http.HTTPError, ValueError):
        return None


async def _get_text(client: http.HTTPClient, url: str, headers: dict[str, str],
                    timeout: float) -> str | None:
    try:
        r = await client.get(url, headers=headers, timeout=timeout)
        return r.text if r.status_code == 200 else None
    except http.HTTPError:
        return None


async def endpoint_status(client: http.HTTPClient, ep: Endpoint, timeout: float) -> EndpointStatus:
    st = EndpointStatus(url=ep.url, role=ep.role, engine=ep.flavor, health=ep.health,
                        breaker=ep.breaker.state, model=ep.model)
    if ep.flavor != "llama-server":
        return st
    headers = ep.headers()
    props, slots, metrics = await asyncio.gather(
        _get_json(client, f"{ep.root}/props", headers, timeout),
        _get_json(client, f"{ep.root}/slots", headers, timeout),
        _get_text(client, f"{ep.root}/metrics", headers, timeout),
    )
    if isinstance(props, dict):
        path = props.get("model_path")
        if isinstance(path, str) and path:
            st.model = Path(path).name
        build = props.get("build_info")
        st.build = build if isinstance(build, str) else None
        total = props.get("total_slots")
        st.slots_total = total if isinstance(total, int) else None
    if isinstance(slots, list):
        st.slots_total = len(slots)
        st.slots_busy = sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))
    if metrics:
        m = parse_llama_metrics(metrics)
        st.tokens_predicted_total = m.get("llamacpp:tokens_predicted_total")
        # Averages since the server started, from its counters: llama-server's own
        # *_tokens_seconds gauges cover only the time since the previous scrape (it resets
        # them on every /metrics read), so they read 0 whenever the layer is idle.
        st.tokens_per_second = _rate(m, "llamacpp:tokens_predicted_total",
                                     "llamacpp:tokens_predicted_seconds_total")
        st.prompt_tokens_per_second = _rate(m, "llamacpp:prompt_tokens_total",
                                            "llamacpp:prompt_seconds_total")
        st.requests_processing = m.get("llamacpp:requests_processing")
    return st


def _rate(m: dict[str, float], tokens: str, seconds: str) -> float | None:
    n, t = m.get(tokens), m.get(seconds)
    if not n or not t:
        return None  # nothing generated yet: no figure rather than 0
    return n / t


def _sum(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


async def layer_status(
    pool: LayerPool,
    settings: Settings,
    proc: LayerProcess | None,
    *,
    timeout: float = 3.0,
) -> LayerStatus:
    """One layer's status. Probes health first so ``health`` is current, not cached."""
    health = await pool.probe(timeout=timeout)
    endpoints = list(
        await asyncio.gather(*(endpoint_status(pool.client, ep, timeout) for ep in pool.endpoints))
    )
    cfg = pool.layer
    engine = settings.engine.kind if cfg.managed else (endpoints[0].engine if endpoints else "?")
    model = next((e.model for e in endpoints if e.model), None)
    if model is None and proc is not None:
        model = proc.model.name
    if model is None and cfg.model is not None:
        model = cfg.model.name
    tps = next((e.tokens_per_second for e in endpoints if e.tokens_per_second is not None), None)
    return LayerStatus(
        name=pool.name,
        host=cfg.host,
        port=cfg.port,
        managed=cfg.managed,
        control="supervisor" if proc is not None else "external",
        state=proc.state if proc is not None else health,
        health=health,
        pid=proc.pid if proc is not None and proc.state != "stopped" else None,
        restarts=proc.restarts if proc is not None else None,
        threads=proc.threads if proc is not None else None,
        last_exit=proc.last_exit if proc is not None else None,
        reason=proc.reason if proc is not None else None,
        model=model,
        engine=engine,
        slots_total=_sum([e.slots_total for e in endpoints]),
        slots_busy=_sum([e.slots_busy for e in endpoints]),
        tokens_per_second=tps,
        inflight=pool.limiter.inflight,
        queued=pool.limiter.waiting,
        endpoints=endpoints,
    )

"""Everything a running gateway holds: settings, keys, layer clients, metrics, context.

Stages added later (store, pipeline, actions) attach here and are started and closed
with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from gateway.auth import KeyRing
from gateway.metrics import GatewayMetrics
from layers.client import LayerClients
from layers.config import Settings
from layers.context import ContextSource, HostFacts
from layers.store import Store, open_store
from layers.store.hosts import Hosts
from layers.supervisor import Supervisor

log = logging.getLogger("ai_sysadmin.gateway")

BREAKER_CODES = {"closed": 0, "half-open": 1, "open": 2}


class GatewayState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = KeyRing(settings)
        self.layers = LayerClients(settings)
        self.metrics = GatewayMetrics()
        self.context_sources: list[ContextSource] = [HostFacts()]
        # The in-process layer supervisor when started by `ai-sysadmin run`; None when the
        # layers run elsewhere (systemd, `layers serve`): layer control then answers 409.
        self.supervisor: Supervisor | None = None
        # Hooks run at start/close by stages that attach to the gateway (store, pipeline…).
        self.on_start: list[Callable[[], Awaitable[None]]] = []
        self.on_close: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        # The store: the pipeline's when a stage attached one (``store``), else one opened
        # on first use by :func:`store_of` (``actions_store``).
        self.store: Store | None = None
        self.actions_store: Store | None = None
        self.hosts: Hosts | None = None  # fleet host keys, on the store (host_keys)

    async def start(self) -> None:
        if self.keys.open_to_loopback:
            log.warning("no API key configured: only loopback clients are served")
        for hook in self.on_start:
            await hook()
        self._tasks.append(asyncio.create_task(self._watch_layers()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for hook in reversed(self.on_close):
            try:
                await hook()
            except Exception:
                log.exception("error while closing")
        await self.layers.aclose()

    def refresh_gauges(self) -> None:
        m = self.metrics
        m.tasks.set(len(asyncio.all_tasks()))
        for pool in self.layers:
            m.inflight.labels(pool.name).set(pool.limiter.inflight)
            m.queued.labels(pool.name).set(pool.limiter.waiting)
            for ep in pool.endpoints:
                m.layer_up.labels(pool.name, ep.url).set(1 if ep.health == "ready" else 0)
                m.breaker_open.labels(pool.name, ep.url).set(BREAKER_CODES[ep.breaker.state])

    async def _watch_layers(self, interval: float = 5.0) -> None:
        """Keep endpoint health current for /metrics, routing and the dashboard."""
        while True:
            try:
                await self.layers.probe_all()
            except Exception:
                log.exception("layer probe failed")
            await asyncio.sleep(interval)


_open_lock = asyncio.Lock()


async def store_of(gw: GatewayState) -> Store:
    """The gateway's store: the one a stage attached, else opened here once (and closed
    with the gateway)."""
    existing = gw.store or gw.actions_store
    if existing is not None:
        return existing
    async with _open_lock:
        if gw.actions_store is None:
            opened = await open_store(gw.settings)
            gw.actions_store = opened
            gw.on_close.append(opened.close)
    assert gw.actions_store is not None
    return gw.actions_store


async def host_keys(gw: GatewayState) -> Hosts:
    """The fleet's host keys, on the gateway's store."""
    if gw.hosts is None:
        gw.hosts = Hosts(await store_of(gw))
    return gw.hosts

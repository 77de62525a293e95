"""Everything a running gateway holds: settings, keys, layer clients, metrics, context,
the chat gate, the task detector, the action runs, the store and the stages (pipeline,
notifications, alert intake). Every attribute is declared here, nothing is set on the app's
untyped ``app.state`` but ``gw`` itself; routes reach the store only through
:func:`store_of` (or :func:`request_store`).

Stages added later (pipeline, notify, alertmanager) hook into ``on_start``/``on_close``
and are started and closed with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from fastapi import Request

from gateway.auth import KeyRing
from gateway.bounds import ChatGate
from gateway.metrics import GatewayMetrics
from gateway.tasks import TaskDetector
from layers.actions.service import ActionRuns
from layers.alertmanager import AlertIntake
from layers.client import LayerClients
from layers.config import Settings
from layers.context import ContextSource, HostFacts
from layers.notify.worker import NotifyService
from layers.pipeline.service import PipelineService
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
        # Built from the settings once, here: one gate (one count of running chats) and one
        # detector per gateway.
        self.chat_gate = ChatGate.from_config(settings.gateway)
        self.task_detector = TaskDetector(settings.gateway.task_patterns)
        # This process's action runs (run lock, approved actions still running): shared by
        # the approvals API and chat investigations.
        self.action_runs = ActionRuns()
        self.context_sources: list[ContextSource] = [HostFacts()]
        # The in-process layer supervisor when started by `ai-sysadmin run`; None when the
        # layers run elsewhere (systemd, `layers serve`): layer control then answers 409.
        self.supervisor: Supervisor | None = None
        # Hooks run at start/close by stages that attach to the gateway (store, pipeline…).
        self.on_start: list[Callable[[], Awaitable[None]]] = []
        self.on_close: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        # The one store: the pipeline's, put here by its start hook (gateway/routes/events.py);
        # without a pipeline, opened on first use by :func:`store_of` and closed with the
        # gateway. Read it through store_of, which waits on ``store_lock`` so that concurrent
        # first uses open it once.
        self.store: Store | None = None
        self.store_lock = asyncio.Lock()
        # The stages, set when they install themselves with the app (gateway/routes/events.py,
        # notify.py, alertmanager.py; the alert intake when it starts, on the store); None
        # in a gateway built without them.
        self.pipeline: PipelineService | None = None
        self.notify: NotifyService | None = None
        self.alertmanager: AlertIntake | None = None
        self.alertmanager_keys: list[bytes] = []  # keys that may post alerts

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


async def store_of(gw: GatewayState) -> Store:
    """The gateway's store: the pipeline's, else opened here once (and closed with the
    gateway)."""
    if gw.store is not None:
        return gw.store
    async with gw.store_lock:
        if gw.store is None:
            opened = await open_store(gw.settings)
            gw.store = opened
            gw.on_close.append(opened.close)
        return gw.store


async def request_store(request: Request) -> Store:
    """The store of the gateway serving ``request`` (for routes)."""
    gw: GatewayState = request.app.state.gw
    return await store_of(gw)


async def host_keys(gw: GatewayState) -> Hosts:
    """The fleet's host keys, on the gateway's store."""
    return (await store_of(gw)).hosts

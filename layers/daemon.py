"""The ``ai-sysadmin daemon``: collectors that feed events in, and the consumer of
trigger verdicts that runs review → meta → proposals.

Collectors post to the gateway (``POST /v1/events``); the gateway runs the prefilter and
the trigger stage and publishes verdicts on ``GET /v1/events/stream``. The daemon
follows that stream (its position persisted in the store, so a restart resumes where it
stopped) to wake its incident worker, whose work queue is the shared store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import httpx

from layers import gateway_client
from layers.actions.service import ActionRuns, handle_proposals
from layers.client import LayerClients
from layers.collectors.journald import JournaldCollector
from layers.collectors.metrics import MetricsCollector
from layers.collectors.sink import GatewaySink
from layers.collectors.units import FailedUnitsCollector
from layers.config import Settings
from layers.events import Proposal
from layers.memory import Memory
from layers.pipeline.stages import IncidentWorker
from layers.store import Store, open_store

log = logging.getLogger("ai_sysadmin.daemon")

STREAM_CURSOR = "daemon.stream"


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(self) -> None:
        s = self.settings
        store = await open_store(s, worker="daemon")
        layers = LayerClients(s)
        memory: Memory | None = None
        if s.memory.enabled and s.fleet.role != "agent":
            memory = Memory(s, layers[s.gateway.embeddings_layer].embeddings)
            try:
                await memory.open()
            except Exception as exc:
                log.warning("memory off: %s", exc)
                memory = None
        sink = GatewaySink(s.collectors.gateway_url, gateway_client.api_key(s),
                           retry_wait=s.pipeline.retry_wait,
                           retry_wait_max=s.pipeline.retry_wait_max)

        runs = ActionRuns()  # this process's: every proposal of the daemon goes through it

        async def on_proposals(incident_id: str, proposals: Sequence[Proposal]) -> None:
            await handle_proposals(incident_id, proposals, store, s, runs=runs)

        c = s.collectors
        jobs: list[Coroutine[Any, Any, None]] = []
        if s.fleet.role != "agent":
            # On a fleet agent the incidents are the server's: this host only watches
            # (and its agent loop, `ai-sysadmin agent`, acts) — docs/fleet.md.
            worker = IncidentWorker(s, store, layers, memory=memory,
                                    on_proposals=on_proposals)
            jobs += [worker.run(), self.follow_stream(store, worker)]
        if c.journald or c.journal_replay is not None:
            jobs.append(JournaldCollector(store, sink, hostname=c.hostname,
                                          replay=c.journal_replay).run())
        if c.metrics:
            jobs.append(MetricsCollector(sink, interval=c.metrics_interval,
                                         hostname=c.hostname).run())
        if c.failed_units:
            jobs.append(FailedUnitsCollector(sink, interval=c.units_interval,
                                             hostname=c.hostname).run())
        tasks = [asyncio.create_task(j) for j in jobs]
        log.info("daemon running: %d tasks", len(tasks))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            await sink.aclose()
            await layers.aclose()
            await store.close()

    async def follow_stream(self, store: Store, worker: IncidentWorker) -> None:
        """Follow the gateway's anomaly stream; each verdict wakes the incident worker."""
        s = self.settings
        backoff = gateway_client.Backoff(s.pipeline.retry_wait, s.pipeline.retry_wait_max)
        gateway = gateway_client.AsyncGateway(
            s.collectors.gateway_url, gateway_client.api_key(s),
            timeout=httpx.Timeout(10.0, read=s.pipeline.stream_keepalive * 3),
        )
        try:
            while True:
                last = await store.get_cursor(STREAM_CURSOR)
                try:
                    async with gateway.stream({"anomalies_only": "true"},
                                              last_event_id=last or None) as r:
                        backoff.reset()
                        async for ev in gateway_client.sse_events(r):
                            if ev.get("event") != "verdict" or "id" not in ev:
                                continue
                            verdict = json.loads(ev["data"])
                            log.info("verdict %s: %s %s %s", ev["id"], verdict.get("severity"),
                                     verdict.get("unit"), verdict.get("summary"))
                            worker.notify()
                            await store.set_cursor(STREAM_CURSOR, ev["id"])
                except (httpx.HTTPError, gateway_client.GatewayError, ValueError) as exc:
                    log.warning("event stream: %s; reconnecting in %.0fs", exc, backoff.wait)
                await backoff.sleep()
        finally:
            await gateway.aclose()

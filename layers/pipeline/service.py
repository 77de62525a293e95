"""The gateway's side of the pipeline: the store, event intake, the trigger stage, the
verdict bus the event stream reads from, and the chat context of incidents."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from layers.client import LayerClients
from layers.config import Settings
from layers.events import Event
from layers.pipeline import examples
from layers.pipeline.trigger import TriggerStage, VerdictBus
from layers.prefilter import Prefilter, load_rules
from layers.store import AddResult, Store, open_store

log = logging.getLogger("ai_sysadmin.pipeline")


class IncidentContext:
    """Open incidents and recent anomalous verdicts, for the ``ai-sysadmin`` chat model."""

    name = "incidents"

    def __init__(self, store: Store, *, incidents: int = 8, verdicts: int = 8) -> None:
        self.store = store
        self.n_incidents = incidents
        self.n_verdicts = verdicts

    async def snippets(self) -> list[str]:
        """One line per incident and verdict; what a model wrote is marked as such (the
        title is facts: the rule and the event's own words)."""
        incs = await self.store.incidents.list(
            status=["open", "reviewed", "escalated", "unreviewed"], limit=self.n_incidents
        )
        lines = [
            f"incident {i.id} [{i.status}, {i.severity}] {i.title} "
            f"(host {i.host}, unit {i.unit or '-'}, {i.verdict_count} anomalies)"
            + (f"; review model's assessment: {i.review.summary}" if i.review else "")
            + (f"; meta model's diagnosis: {i.decision.diagnosis}" if i.decision else "")
            for i in incs
        ]
        if not incs:
            lines.append("no open incidents")
        for v in await self.store.verdicts.recent(self.n_verdicts):
            age = int(time.time() - v.created_at)
            # Facts first (a clipped line loses the model's part, not the log's).
            lines.append(
                f"verdict {age}s ago [{v.severity}, rule {v.rule or '-'}] {v.host} "
                f"{v.unit or '-'}: {v.message[:120]}"
                + (f"; trigger model's summary: {v.summary}" if v.summary_by == "model" else "")
            )
        return lines


class PipelineService:
    def __init__(self, settings: Settings, layers: LayerClients) -> None:
        self.settings = settings
        self.layers = layers
        self.bus = VerdictBus()
        self._store: Store | None = None
        self.trigger: TriggerStage | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("pipeline not started")
        return self._store

    async def start(self) -> None:
        cfg = self.settings.pipeline
        prefilter = Prefilter(load_rules(cfg.rules_file), debounce=cfg.debounce)
        self._store = await open_store(self.settings, worker="gateway")
        self.bus.last_seq = await self._latest_seq()
        self.trigger = TriggerStage(
            self.settings, self._store, self.layers["trigger"], prefilter, self.bus,
            examples.configured(self.settings, self.layers),
        )
        self._tasks = [
            asyncio.create_task(self.trigger.run(), name="trigger-stage"),
            asyncio.create_task(self._retention(), name="retention"),
        ]

    async def _latest_seq(self) -> int:
        recent = await self.store.verdicts.recent(1, anomalies_only=False)
        return recent[0].seq if recent else 0

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._store is not None:
            await self._store.close()

    async def intake(self, events: Sequence[Event]) -> AddResult:
        """Store events (committed before this returns; the commit wakes the trigger
        stages of every gateway on the store)."""
        return await self.store.events.add(events)

    async def _retention(self) -> None:
        while True:
            try:
                counts = await self.store.apply_retention(self.settings.store.retention_days)
                if any(counts.values()):
                    log.info("retention removed %s", counts)
            except Exception:
                log.exception("retention failed")
            await asyncio.sleep(3600)

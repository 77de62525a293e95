"""The trigger stage: prefilter new events, classify candidates in batches, store
verdicts (grouped into incidents) and announce them to stream readers.

It runs inside the gateway. Its queue is the store: events wait as ``new`` or
``candidate`` until their verdict is committed, so a crash or a trigger layer that is
down delays work but never drops or doubles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from layers.client import LayerError, LayerPool, StructuredOutputError
from layers.config import Settings
from layers.events import SEVERITY_RANK, StoredEvent, TriggerVerdict, Verdict, max_severity
from layers.pipeline import prompts
from layers.pipeline.loop import work_loop
from layers.prefilter import Prefilter, Rule
from layers.store import Prefiltered, Store, VerdictInput

log = logging.getLogger("ai_sysadmin.pipeline.trigger")


def is_permanent(exc: LayerError) -> bool:
    """Failures that waiting cannot cure: output that is truncated or invalid after the
    retries, or a request the layer refuses (e.g. larger than its context). Everything
    else (down, loading, busy, timeout) is waited out."""
    return isinstance(exc, StructuredOutputError) or exc.status == 400


class VerdictBus:
    """Wakes stream readers when new verdicts are committed (they read from the store)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self.last_seq = 0

    async def publish(self, verdicts: Sequence[Verdict]) -> None:
        if not verdicts:
            return
        async with self._cond:
            self.last_seq = max(self.last_seq, max(v.seq for v in verdicts))
            self._cond.notify_all()

    async def wait(self, after: int, timeout: float) -> None:
        """Return when a verdict newer than ``after`` may exist, or after ``timeout``."""
        async with self._cond:
            if self.last_seq > after:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cond.wait(), timeout)


def combine(rule: Rule | None, verdict: TriggerVerdict | None, event: StoredEvent) -> VerdictInput:
    """The stored verdict: the layer's call, with the rule's severity as a floor.

    A warning/critical rule makes the event an anomaly whatever the layer says (the small
    trigger model may raise severity, never dismiss a deterministic finding). With no
    usable layer verdict the rule alone decides and the verdict is flagged unreviewed.
    """
    floor = rule.severity if rule else "info"
    forced = SEVERITY_RANK[floor] >= SEVERITY_RANK["warning"]
    if verdict is None:
        return VerdictInput(
            event, True, floor, rule.category if rule else "other",
            f"{rule.name if rule else 'event'} (not classified: trigger layer output invalid)",
            unreviewed=True,
        )
    anomaly = verdict.anomaly or forced
    severity = max_severity(verdict.severity, floor) if anomaly else verdict.severity
    summary = verdict.summary.strip() or (rule.name if rule else verdict.category)
    return VerdictInput(event, anomaly, severity, verdict.category, summary)


class TriggerStage:
    def __init__(
        self, settings: Settings, store: Store, pool: LayerPool, prefilter: Prefilter,
        bus: VerdictBus,
    ) -> None:
        self.cfg = settings.pipeline
        self.store = store
        self.pool = pool
        self.prefilter = prefilter
        self.bus = bus
        self.wakeup = asyncio.Event()
        self.layer_waiting = False

    def notify(self) -> None:
        self.wakeup.set()

    def _layer_waiting(self) -> None:
        # The layer is down or saturated: the candidates stay queued in the store.
        self.layer_waiting = True

    async def run(self) -> None:
        await work_loop(self.step, self.wakeup, self.cfg, "trigger stage", self._layer_waiting)

    async def step(self) -> bool:
        """One round of work; False when there was nothing to do."""
        did = await self.prefilter_new()
        did = await self.classify_batch() or did
        return did

    async def prefilter_new(self, limit: int = 2000) -> bool:
        new = await self.store.events_in_state("new", limit)
        if not new:
            return False
        decisions = []
        for e in new:
            m = self.prefilter.check(e)
            decisions.append(
                Prefiltered(e.seq, True, m.fingerprint, m.rule.name) if m
                else Prefiltered(e.seq, False)
            )
        await self.store.mark_prefiltered(decisions)
        return True

    async def classify_batch(self) -> bool:
        """Classify up to ``trigger_concurrency`` batches at once (the layer's slots decode
        them together) and store every verdict that came back."""
        size = self.cfg.batch_size
        cands = await self.store.events_in_state("candidate", size * self.cfg.trigger_concurrency)
        if not cands:
            return False
        batches = [cands[i : i + size] for i in range(0, len(cands), size)]
        results = await asyncio.gather(*(self._classify(b) for b in batches), return_exceptions=True)
        done: list[VerdictInput] = []
        failure: BaseException | None = None
        for batch, result in zip(batches, results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result  # down or busy: these candidates wait in the store
                continue
            done += [combine(self.prefilter.rule(e.rule), v, e)
                     for e, v in zip(batch, result, strict=True)]
        if done:
            self.layer_waiting = False
            await self.bus.publish(await self.store.record_verdicts(done))
        if failure is not None:
            raise failure
        return True

    async def _classify(self, cands: Sequence[StoredEvent]) -> list[TriggerVerdict | None]:
        nonce = prompts.new_nonce()
        messages = prompts.trigger_messages(cands, [e.rule for e in cands], nonce)
        try:
            result = await self.pool.chat_json(
                messages, prompts.trigger_schema(len(cands)),
                max_tokens=self.cfg.trigger_max_tokens * len(cands) + 32,
                retries=self.cfg.layer_retries,
            )
        except LayerError as exc:
            if exc.status == 400 and len(cands) > 1 and not isinstance(exc, StructuredOutputError):
                # Most likely more than one slot's context (long log lines): halve the batch.
                half = len(cands) // 2
                return await self._classify(cands[:half]) + await self._classify(cands[half:])
            if not is_permanent(exc):
                raise
            log.warning("trigger layer output unusable: %s", exc.message)
            return [None] * len(cands)
        got = prompts.trigger_verdicts(result)
        return [got[i] if i < len(got) else None for i in range(len(cands))]

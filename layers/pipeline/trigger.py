"""The trigger stage: prefilter new events, classify candidates in batches, store
verdicts (grouped into incidents) and announce them to stream readers.

It runs inside the gateway. Its queue is the store: events wait as ``new`` or
``candidate`` until their verdict is committed, so a crash or a trigger layer that is
down delays work but never drops or doubles it.

Work that times out makes progress rather than being sent again: a batch that gets no
answer within its deadline is halved (and remembered as such, should the halves have to
wait for the layer), down to single events; a single event that still times out gets the
rule's verdict, flagged unreviewed. So no request after a timeout repeats the one that
timed out, and a slow layer (three layers on two cores) delays verdicts, never stops them.

A verdict that is valid JSON but degenerate (its summary copies the prompt or shares no
word with its event, its category contradicts the rule; layers/pipeline/validate.py) is
refused like invalid output: the refused events alone are sent again, up to
``pipeline.layer_retries`` times, then get the rule's verdict, flagged unreviewed.

A candidate that only an ``info`` rule let through and whose nearest labelled example is
harmless is judged like that example and skips the layer (layers/pipeline/examples.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from layers.client import (
    RETRY_TEMPERATURE,
    SEEDS_PER_ATTEMPT,
    LayerError,
    LayerPool,
    LayerTimeout,
    StructuredOutputError,
)
from layers.config import Settings
from layers.events import SEVERITY_RANK, StoredEvent, TriggerVerdict, Verdict, max_severity
from layers.pipeline import prompts, validate
from layers.pipeline.examples import Examples, Nearest
from layers.pipeline.loop import work_loop
from layers.prefilter import Prefilter, Rule
from layers.store import Prefiltered, Store, VerdictInput

log = logging.getLogger("ai_sysadmin.pipeline.trigger")

# Batch caps of events whose batch timed out are kept in memory until their verdict; a
# bound in case candidates vanish (retention) before one is recorded.
MAX_REMEMBERED_CAPS = 100_000


def is_permanent(exc: LayerError) -> bool:
    """Failures that waiting cannot cure: output that is truncated or invalid after the
    retries, a request the layer refuses (e.g. larger than its context), or no answer
    from a live layer within the longest deadline there is. Everything else (down,
    loading, busy, a timeout with a longer deadline still to try) is waited out."""
    if isinstance(exc, LayerTimeout):
        return exc.alive and exc.final
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


def combine(
    rule: Rule | None,
    verdict: TriggerVerdict | None,
    event: StoredEvent,
    why: str = "trigger layer output invalid",
) -> VerdictInput:
    """The stored verdict: the layer's call, with the rule's severity as a floor.

    A warning/critical rule makes the event an anomaly whatever the layer says (the small
    trigger model may raise severity, never dismiss a deterministic finding). With no
    usable layer verdict the rule alone decides and the verdict is flagged unreviewed;
    ``why`` says what kept the layer's verdict away.
    """
    floor = rule.severity if rule else "info"
    forced = SEVERITY_RANK[floor] >= SEVERITY_RANK["warning"]
    rule_category = rule.category if rule else None
    if verdict is None:
        return VerdictInput(
            event, True, floor, rule.category if rule else "other",
            f"{rule.name if rule else 'event'} (not classified: {why})",
            unreviewed=True, rule_category=rule_category,
        )
    anomaly = verdict.anomaly or forced
    severity = max_severity(verdict.severity, floor) if anomaly else verdict.severity
    summary = verdict.summary.strip() or (rule.name if rule else verdict.category)
    return VerdictInput(event, anomaly, severity, verdict.category, summary,
                        rule_category=rule_category)


def like_example(rule: Rule, event: StoredEvent, nearest: Nearest) -> VerdictInput:
    """The verdict of a candidate whose nearest labelled example is harmless: no anomaly,
    in the rule's category, the summary naming the example (facts, not a model's words)."""
    example = nearest.example.message
    return VerdictInput(
        event, False, "info", rule.category,
        f"like the harmless example \"{prompts.clip(example, 80)}\" "
        f"(similarity {nearest.similarity:.2f})",
        rule_category=rule.category, example=example,
    )


def check_verdict(rule: Rule | None, verdict: TriggerVerdict, event: StoredEvent,
                  fixed: str) -> validate.Refusal | None:
    """The layer's verdict on one event, checked against that event alone."""
    evidence = prompts.event_evidence(event, event.rule)
    return validate.trigger_verdict(verdict, validate.Grounds(fixed, [evidence]),
                                    rule.category if rule else None, evidence)


class TriggerStage:
    def __init__(
        self, settings: Settings, store: Store, pool: LayerPool, prefilter: Prefilter,
        bus: VerdictBus, examples: Examples | None = None,
    ) -> None:
        self.cfg = settings.pipeline
        self.examples = examples
        self.store = store
        self.pool = pool
        self.prefilter = prefilter
        self.bus = bus
        self.wakeup = asyncio.Event()
        self.layer_waiting = False
        # Event seq → most events per request, for events whose batch timed out.
        self.batch_cap: dict[int, int] = {}

    def notify(self) -> None:
        self.wakeup.set()

    def _layer_waiting(self) -> None:
        # The layer is down or saturated: the candidates stay queued in the store.
        self.layer_waiting = True

    async def run(self) -> None:
        # Woken by every committed intake, this process's or another's on the store.
        with self.store.wakeups.listening("events", self.notify):
            await work_loop(self.step, self.wakeup, self.cfg, "trigger stage",
                            self._layer_waiting)

    async def step(self) -> bool:
        """One round of work; False when there was nothing to do."""
        did = await self.prefilter_new()
        did = await self.classify_batch() or did
        return did

    async def prefilter_new(self, limit: int = 2000) -> bool:
        new = await self.store.events.claim("new", limit)
        if not new:
            return False
        decisions = []
        for e in new:
            m = self.prefilter.check(e)
            decisions.append(
                Prefiltered(e.seq, True, m.fingerprint, m.rule.name) if m
                else Prefiltered(e.seq, False)
            )
        await self.store.events.mark_prefiltered(decisions)
        return True

    async def classify_batch(self) -> bool:
        """Classify up to ``trigger_concurrency`` batches at once (the layer's slots decode
        them together) and store every verdict that came back."""
        size = self.cfg.batch_size
        cands = await self.store.events.claim("candidate", size * self.cfg.trigger_concurrency)
        if not cands:
            return False
        cands = await self.judge_by_examples(cands)
        batches = self.batches(cands)[: self.cfg.trigger_concurrency]
        results = await asyncio.gather(*(self._classify(b) for b in batches),
                                       return_exceptions=True)
        # Down or busy: the candidates without a verdict wait in the store.
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            raise failure
        return True

    async def judge_by_examples(self, cands: Sequence[StoredEvent]) -> list[StoredEvent]:
        """Record the verdicts of candidates that are like a harmless labelled example;
        return the others, for the layer. Only ``info``-floor rules are open to it."""
        if self.examples is None:
            return list(cands)
        open_ = [(e, r) for e in cands
                 if (r := self.prefilter.rule(e.rule)) is not None and r.severity == "info"]
        if not open_:
            return list(cands)
        nearest = await self.examples.nearest([e.message for e, _ in open_],
                                              [e.fingerprint or e.message for e, _ in open_])
        if nearest is None:
            return list(cands)
        judged = [like_example(r, e, n) for (e, r), n in zip(open_, nearest, strict=True)
                  if not n.example.anomaly]
        if judged:
            await self._record(judged)
        done = {v.event.seq for v in judged}
        return [e for e in cands if e.seq not in done]

    async def _record(self, verdicts: list[VerdictInput]) -> None:
        """Store and announce verdicts as soon as a request brought them (the halves of
        a split batch do not wait for each other)."""
        self.layer_waiting = False
        for v in verdicts:
            self.batch_cap.pop(v.event.seq, None)
        await self.bus.publish(await self.store.verdicts.record(verdicts))

    def batches(self, cands: Sequence[StoredEvent]) -> list[list[StoredEvent]]:
        """Candidates in order, in batches of ``batch_size`` — smaller where an event's
        earlier batch timed out (its cap holds for the whole batch it joins)."""
        size = self.cfg.batch_size
        out: list[list[StoredEvent]] = []
        current: list[StoredEvent] = []
        limit = size
        for e in cands:
            cap = min(size, self.batch_cap.get(e.seq, size))
            if current and len(current) + 1 > min(limit, cap):
                out.append(current)
                current = []
            if not current:
                limit = cap
            current.append(e)
            limit = min(limit, cap)
        if current:
            out.append(current)
        return out

    def _cap(self, cands: Sequence[StoredEvent], most: int) -> None:
        if len(self.batch_cap) >= MAX_REMEMBERED_CAPS:
            self.batch_cap.clear()
        for e in cands:
            self.batch_cap[e.seq] = min(most, self.batch_cap.get(e.seq, most))

    async def _classify(self, cands: Sequence[StoredEvent], attempt: int = 0) -> None:
        """Classify ``cands`` and record their verdicts (a half that has to wait for the
        layer does not cost the other half its verdicts). ``attempt`` counts the times
        these events' verdicts were refused already."""
        nonce = prompts.new_nonce()
        messages = prompts.trigger_messages(cands, [e.rule for e in cands], nonce)
        schema = prompts.trigger_schema(len(cands))
        try:
            result = await self.pool.chat_json(
                messages, schema,
                max_tokens=self.cfg.trigger_max_tokens * len(cands) + 32,
                retries=self.cfg.layer_retries,
                temperature=RETRY_TEMPERATURE if attempt else 0.0,
                seed=attempt * SEEDS_PER_ATTEMPT if attempt else None,
            )
        except LayerTimeout as exc:
            await self._timed_out(cands, exc, attempt)
            return
        except LayerError as exc:
            if exc.status == 400 and len(cands) > 1 and not isinstance(exc, StructuredOutputError):
                # Most likely more than one slot's context (long log lines): halve the batch.
                half = len(cands) // 2
                await self._classify(cands[:half], attempt)
                await self._classify(cands[half:], attempt)
                return
            if not is_permanent(exc):
                raise
            log.warning("trigger layer output unusable: %s", exc.message)
            await self._record([combine(self.prefilter.rule(e.rule), None, e) for e in cands])
            return
        got = prompts.trigger_verdicts(result)
        fixed = validate.fixed_text(messages, schema)
        accepted: list[VerdictInput] = []
        refused: list[tuple[StoredEvent, validate.Refusal]] = []
        for i, e in enumerate(cands):
            rule = self.prefilter.rule(e.rule)
            verdict = got[i] if i < len(got) else None
            refusal = check_verdict(rule, verdict, e, fixed) if verdict is not None else None
            if refusal is None:
                accepted.append(combine(rule, verdict, e))
            else:
                refused.append((e, refusal))
        if accepted:
            await self._record(accepted)
        if not refused:
            return
        if attempt < self.cfg.layer_retries:
            log.info("trigger layer: %d of %d verdicts refused (%s); asking again",
                     len(refused), len(cands), refused[0][1])
            await self._classify([e for e, _ in refused], attempt + 1)
            return
        log.warning("trigger layer: %d verdicts refused after %d tries (%s); the rule's "
                    "verdict stands (unreviewed)", len(refused), attempt + 1, refused[0][1])
        await self._record([combine(self.prefilter.rule(e.rule), None, e,
                                    why=f"trigger layer output refused: {r}")
                            for e, r in refused])

    async def _timed_out(self, cands: Sequence[StoredEvent], exc: LayerTimeout,
                         attempt: int = 0) -> None:
        """No answer within the deadline: never the same request again. A single event
        gets the rule's verdict (unreviewed); a batch is halved — now, when the layer is
        alive (slow), or at the next try, when it is not (it waits like a layer that is
        down, and the breaker counts it)."""
        if len(cands) == 1:
            log.warning("trigger layer: event %s unclassified after %.0fs without an answer; "
                        "the rule's verdict stands (unreviewed)", cands[0].seq, exc.deadline)
            await self._record([combine(self.prefilter.rule(cands[0].rule), None, cands[0],
                                        why="trigger layer timed out")])
            return
        half = len(cands) // 2
        self._cap(cands, half)
        if not exc.alive:
            raise exc
        log.warning("trigger layer: a batch of %d events got no answer within %.0fs (the layer "
                    "is up but slow); sending it as %d + %d", len(cands), exc.deadline, half,
                    len(cands) - half)
        await self._classify(cands[:half], attempt)
        await self._classify(cands[half:], attempt)

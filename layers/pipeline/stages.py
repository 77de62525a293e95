"""The review and meta stages, and the end of an incident's life (resolve, remember).

They run in the daemon. Work is read from the store (an incident's ``stage``), so the
daemon can restart at any point: a stage whose result was not committed runs again, a
committed one never does (``incidents.record_review``/``record_decision`` are compare-and-set on
the stage). A layer that is down makes the work wait; layer output that stays
truncated or invalid after retries marks the incident ``unreviewed`` — never healthy.
A call that times out is tried again with a longer deadline (the timeout lowered the
layer's measured speed, layers/deadline.py); one that a live layer leaves unanswered at
the longest deadline (``gateway.timeouts.total``) marks the incident ``unreviewed`` too,
so slow work ends instead of being sent again forever.

Output that is valid JSON but degenerate — a copy of the prompt, a summary or diagnosis
that shares no word with the incident's events, the same finding repeated, a diagnosis
or rollback plan with no content (layers/pipeline/validate.py) — is refused like invalid
output: asked again (``pipeline.layer_retries``, each with a fresh nonce and some
sampling temperature), then the incident is ``unreviewed``. A stored review or decision
is one that passed these checks; it is shown as the model's assessment, never as fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
from pydantic import BaseModel

from layers.client import (
    LayerClients,
    LayerError,
    LayerPool,
    StructuredOutputError,
    retry_sampling,
)
from layers.config import Settings
from layers.events import (
    SEVERITY_RANK,
    Decision,
    Event,
    Incident,
    Proposal,
    Review,
    StoredEvent,
    Verdict,
)
from layers.memory import Memory
from layers.pipeline import evidence, prompts, validate
from layers.pipeline.loop import work_loop
from layers.pipeline.trigger import is_permanent
from layers.store import Store

if TYPE_CHECKING:
    from layers.actions.service import ReadOutcome

log = logging.getLogger("ai_sysadmin.pipeline.stages")

ProposalHandler = Callable[[str, Sequence[Proposal]], Awaitable[object]]
M = TypeVar("M", bound=BaseModel)


def incident_evidence(inc: Incident, verdicts: Sequence[Verdict],
                      events: Sequence[Event] = ()) -> list[str]:
    """What a review or diagnosis must be grounded in: the incident's own events (their
    words and rules; not host or unit names, which say where, not what) — never a
    model's earlier text, nor the title of an incident opened before titles were facts."""
    out = [inc.rule] if inc.rule else []
    out += [prompts.event_evidence(v, v.rule) for v in verdicts]
    out += [prompts.event_evidence(e, e.rule if isinstance(e, StoredEvent) else None)
            for e in events]
    return out


async def checked_json(
    pool: LayerPool, build: Callable[[str], list[dict[str, str]]], schema: type[M], *,
    check: Callable[[M, validate.Grounds], validate.Refusal | None],
    evidence: Sequence[str], context: Sequence[str] = (), max_tokens: int, retries: int,
) -> M:
    """A layer's answer that is valid JSON *and* passes ``check``; each of the
    ``retries + 1`` tries gets a fresh nonce, the later ones some temperature. Raises
    :class:`StructuredOutputError` (a :class:`validate.RefusedOutput` when the last
    answer was refused) like invalid output; other layer errors pass through."""
    error: StructuredOutputError | None = None
    for attempt in range(retries + 1):
        messages = build(prompts.new_nonce())
        try:
            out = await pool.chat_json(
                messages, schema, max_tokens=max_tokens, retries=0,
                **retry_sampling(attempt),
            )
        except StructuredOutputError as exc:
            error = exc
            continue
        refusal = check(out, validate.Grounds.of(messages, evidence, schema, context))
        if refusal is None:
            return out
        error = validate.RefusedOutput(pool.name, refusal, raw=out.model_dump_json())
        log.info("%s", error.message)
    assert error is not None
    raise error


def metrics_snapshot() -> list[str]:
    vm = psutil.virtual_memory()
    load = os.getloadavg()
    lines = [
        f"host {socket.gethostname()}: load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"on {os.cpu_count()} CPUs",
        f"memory {vm.percent:.0f}% used of {vm.total / 2**30:.1f} GiB",
    ]
    with contextlib.suppress(OSError):
        lines.append(f"root disk {psutil.disk_usage('/').percent:.0f}% used")
    return lines


def catalog_summaries() -> dict[str, str]:
    """Action names the meta layer may propose (the action stage checks them again)."""
    from layers.actions.catalog import CATALOG

    return {name: spec.summary for name, spec in CATALOG.items()}


class IncidentWorker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        layers: LayerClients,
        *,
        memory: Memory | None = None,
        on_proposals: ProposalHandler | None = None,
        reader: evidence.Reader | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.pipeline
        self.store = store
        self.layers = layers
        self.memory = memory
        self.on_proposals = on_proposals
        self.wakeup = asyncio.Event()
        self.catalog = catalog_summaries()
        # How evidence reads run: the real action path unless a harness answers them.
        self.reader: evidence.Reader = reader or self.run_read
        self.reads_here = reader is None

    async def run_read(self, incident_id: str | None, action: str,
                       params: dict[str, Any]) -> ReadOutcome:
        from layers.actions.service import run_read

        return await run_read(self.store, self.settings, incident_id, action, params)

    def evidence_reads(self) -> list[str]:
        """Read-only actions the evidence loop may run: those the policy runs unasked
        (and, read here, whose program this machine has)."""
        from layers.actions.service import runnable_reads

        return runnable_reads(self.settings, installed=self.reads_here)

    def notify(self) -> None:
        self.wakeup.set()

    async def run(self) -> None:
        # Woken by every incident that gets a stage owed, by any process on the store.
        with self.store.wakeups.listening("incidents", self.notify):
            await work_loop(self.step, self.wakeup, self.cfg, "incident work")

    async def step(self) -> bool:
        """Do the oldest piece of owed work; False when nothing is owed."""
        inc = await self.store.incidents.next("review")
        if inc is not None:
            await self.review(inc)
            return True
        inc = await self.store.incidents.next("meta")
        if inc is not None:
            await self.diagnose(inc)
            return True
        inc = await self.store.incidents.next("remember")
        if inc is not None:
            await self.remember(inc)
            return True
        return await self.resolve_quiet()

    def must_escalate(self, inc: Incident, review: Review | None) -> bool:
        """The review's call, or the ``escalate_severity`` floor — which holds also when
        the review was refused: a critical incident is diagnosed whatever the review
        layer managed to say about it."""
        if review is not None and (review.escalate or review.status == "critical"):
            return True
        floor = self.cfg.escalate_severity
        return floor != "never" and SEVERITY_RANK[inc.severity] >= SEVERITY_RANK[floor]

    async def review(self, inc: Incident) -> None:
        verdicts = await self.store.verdicts.of_incident(inc.id, limit=3)
        events = await self.store.events.recent(host=inc.host, unit=inc.unit, limit=5)
        metrics = metrics_snapshot()
        try:
            out = await checked_json(
                self.layers["review"],
                lambda nonce: prompts.review_messages(inc, verdicts, events, metrics, nonce),
                prompts.ReviewOut, check=validate.review,
                evidence=incident_evidence(inc, verdicts, events), context=metrics,
                max_tokens=self.cfg.review_max_tokens, retries=self.cfg.layer_retries,
            )
        except LayerError as exc:
            if not is_permanent(exc):
                raise
            log.warning("incident %s unreviewed: %s", inc.id, exc.message)
            await self.store.incidents.record_review(inc.id, None, escalate=self.must_escalate(inc, None),
                                                     error=exc.message)
            return
        review = Review.model_validate(out.model_dump())
        await self.store.incidents.record_review(inc.id, review, escalate=self.must_escalate(inc, review))

    async def diagnose(self, inc: Incident) -> None:
        verdicts = await self.store.verdicts.of_incident(inc.id, limit=3)
        memories: list[str] = []
        if self.memory is not None:
            try:
                memories = await self.memory.recall(f"{inc.title}\n{inc.fingerprint}", n=2)
            except LayerError:
                raise
            except Exception as exc:  # memory is advice; its failure must not stop diagnosis
                log.warning("memory recall failed: %s", exc)
        grounds = incident_evidence(inc, verdicts)
        gathered: evidence.Evidence | None = None
        reads = self.evidence_reads() if self.cfg.evidence_steps > 0 else []
        if reads:  # the loop is on and the policy lets some read run unasked
            gathered = await self.gather_evidence(inc, verdicts, memories, grounds, reads)
        if gathered is not None and gathered.decision is not None:
            decision = gathered.decision
        else:
            try:
                decision = await self.decide(inc, verdicts, memories, grounds, gathered)
            except LayerError as exc:
                if not is_permanent(exc):
                    raise
                facts = evidence.switch_decision(gathered)
                if facts is None:
                    log.warning("incident %s undiagnosed (unreviewed): %s", inc.id, exc.message)
                    await self.store.incidents.record_decision(inc.id, None, error=exc.message)
                    return
                # The model's decision was refused, but the facts call for a rollback:
                # the decision is ai-sysadmin's, from the facts alone, and says so.
                log.warning("incident %s: meta refused (%s); deciding from the switch fact",
                            inc.id, exc.message)
                decision = facts
        decision = evidence.with_switch_rollback(decision, gathered)
        proposals = await self.store.incidents.record_decision(
            inc.id, decision, proposal_ttl=self.settings.actions.approval_ttl
        )
        if proposals and self.on_proposals is not None:
            await self.on_proposals(inc.id, proposals)

    def meta_prompt(self, inc: Incident, verdicts: Sequence[Verdict],
                    memories: Sequence[str]) -> evidence.Prompt:
        def build(nonce: str, reads: Sequence[str] | None, reads_left: int,
                  items: Sequence[Mapping[str, Any]], facts: Sequence[str]) -> list[dict[str, str]]:
            return prompts.meta_messages(inc, inc.review, verdicts, memories, self.catalog, nonce,
                                         reads=reads, reads_left=reads_left, evidence=items,
                                         facts=facts)
        return build

    async def gather_evidence(self, inc: Incident, verdicts: Sequence[Verdict],
                              memories: Sequence[str], grounds: Sequence[str],
                              reads: Sequence[str]) -> evidence.Evidence:
        """Read before deciding (layers/pipeline/evidence.py): bounded, read-only."""
        loop = evidence.EvidenceLoop(
            self.settings, self.store, self.layers, inc, reader=self.reader,
            reads=reads, catalog_names=list(self.catalog),
            prompt=self.meta_prompt(inc, verdicts, memories), grounds=grounds,
            retry=checked_json, local_profile=self.reads_here,
        )
        return await loop.run()

    async def decide(self, inc: Incident, verdicts: Sequence[Verdict], memories: Sequence[str],
                     grounds: Sequence[str], gathered: evidence.Evidence | None) -> Decision:
        """The decision: one-shot without evidence (as before the loop), else with the
        evidence gathered, its citations constrained to the steps that ran."""
        build = self.meta_prompt(inc, verdicts, memories)
        if gathered is None:
            schema = prompts.decision_schema(list(self.catalog))

            def messages(nonce: str) -> list[dict[str, str]]:
                return prompts.meta_messages(inc, inc.review, verdicts, memories, self.catalog,
                                             nonce)
            cited: list[int] = []
        else:
            cited = gathered.citable
            schema = prompts.decision_schema(list(self.catalog), cited)
            items, facts = gathered.items(), list(gathered.facts)
            grounds = [*grounds, *gathered.texts()]

            def messages(nonce: str) -> list[dict[str, str]]:
                return build(nonce, [], 0, items, facts)

        def check(out: BaseModel, g: validate.Grounds) -> validate.Refusal | None:
            d = prompts.to_decision(out)
            return validate.decision(d, g) or validate.cited_evidence(d, cited)

        out = await checked_json(
            self.layers["meta"], messages, schema, check=check, evidence=grounds,
            max_tokens=self.cfg.meta_max_tokens, retries=self.cfg.layer_retries,
        )
        return prompts.to_decision(out)

    async def remember(self, inc: Incident) -> None:
        if self.memory is not None:
            detail = await self.store.incidents.get(inc.id)
            if detail is not None:
                await self.memory.remember(detail)
        await self.store.incidents.mark_remembered(inc.id)

    async def resolve_quiet(self) -> bool:
        quiet = await self.store.incidents.quiet(time.time() - self.cfg.resolve_after)
        for inc in quiet:
            await self.store.incidents.resolve(inc.id, by="quiet", remember=self.memory is not None)
        return bool(quiet)

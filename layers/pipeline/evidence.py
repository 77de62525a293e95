"""The meta stage's evidence loop: read before deciding.

Before the meta layer proposes anything it may gather evidence, one step at a time, in a
bounded loop (after HolmesGPT's tool loop: a step limit, a guard against repeating a
call, each result capped to a share of the context):

1. **Facts first.** ai-sysadmin itself reads the system generations
   (``nixos_generations``). When the incident's first event came within
   ``pipeline.evidence_switch_window`` seconds after the current generation was made —
   the last switch — it says so as a fact (computed here, labelled as such, not the
   model's view) and reads the closure diff of that switch (``nixos_closure_diff``):
   what the switch changed is then evidence the model cannot miss.
2. **Model steps.** Each step is one schema-constrained answer: ``{"read": action,
   "params": {...}}`` — the schema allows only read-only catalog actions the policy lets
   run, each with its own params schema — or ``{"decide": decision}``. A read runs
   through the real action path (``layers.actions.service.run_read``: catalog, policy,
   executor); its output goes into the next prompt fenced as untrusted data, capped.
3. **Budgets.** At most ``pipeline.evidence_steps`` model steps (ai-sysadmin's own reads
   do not count), the outputs together at most ``pipeline.evidence_context_share`` of one
   meta slot's context (each at most ``evidence_result_chars``), all within
   ``pipeline.evidence_seconds`` (a read or a step still running then is stopped; so is a
   step the layer leaves unanswered at its deadline). When one is spent the meta layer
   must decide, with the evidence it has. A step whose answer stays invalid or refused
   after ``pipeline.layer_retries`` ends the loop too; a layer that is down propagates
   (the work waits, and the loop starts again when it is back).

Refused, not run, and told so in the next prompt: a second identical read, a name that
is not a read-only catalog action (a layer that ignores the schema), params the catalog
refuses, anything the policy would not run without an admin. Every step — run or
refused — goes into the incident's timeline (``evidence``) and the audit log
(``evidence_asked`` before, ``evidence`` after). The decision cites the steps it rests on
(``evidence``), constrained by the schema and checked to exist.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from layers.actions import catalog
from layers.actions.service import ReadOutcome
from layers.client import LayerClients, LayerError, LayerTimeout
from layers.config import Settings
from layers.events import Decision, Incident, ProposedAction
from layers.pipeline import prompts, validate
from layers.store import Store

log = logging.getLogger("ai_sysadmin.pipeline.evidence")

# (incident id or None for a chat, action, params) -> what the read did. The daemon's
# reader is the action service's run_read; the quality harness answers from a scenario's
# recordings.
Reader = Callable[[str | None, str, dict[str, Any]], Awaitable[ReadOutcome]]
# (nonce, reads still allowed, evidence items, facts) -> the prompt of one step.
Prompt = Callable[[str, Sequence[str] | None, int, Sequence[Mapping[str, Any]], Sequence[str]],
                  list[dict[str, str]]]
StepStatus = Literal["ok", "failed", "refused", "repeated", "timed_out"]
Spent = Literal["steps", "tokens", "time", "refused_output", "decided", "no_reads"]

CHARS_PER_TOKEN = 3  # log text: a conservative guess for llama.cpp tokenizers
MIN_RESULT_CHARS = 160  # less room than this left: the token budget is spent
GENERATIONS = "nixos_generations"
CLOSURE_DIFF = "nixos_closure_diff"
FACT_LABEL = "fact (computed by ai-sysadmin from the evidence, not a model's assessment)"


@dataclass
class Step:
    """One evidence step: a read asked by the model or by ai-sysadmin itself."""

    id: int
    action: str
    params: dict[str, Any]
    by: Literal["model", "ai-sysadmin"]
    status: StepStatus
    output: str = ""
    exit_code: int | None = None
    code: str | None = None
    reason: str | None = None
    dry_run: str | None = None
    duration: float = 0.0
    shortened: bool = False

    @property
    def ran(self) -> bool:
        return self.status in ("ok", "failed")

    def item(self) -> dict[str, Any]:
        """The step as the next prompt shows it (fenced: untrusted data)."""
        out: dict[str, Any] = {"step": self.id, "read": self.action, "params": self.params,
                               "by": self.by, "status": self.status}
        if self.ran:
            out["exit_code"] = self.exit_code
            out["output"] = self.output
        else:
            out["not_run"] = self.reason or self.status
        return out

    def record(self) -> dict[str, Any]:
        """The step as the timeline and the audit log keep it."""
        out = {**self.item(), "code": self.code, "dry_run": self.dry_run,
               "duration": round(self.duration, 3), "shortened": self.shortened}
        if not self.ran:
            out["reason"] = out.pop("not_run")
        return out


@dataclass
class Evidence:
    steps: list[Step] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    decision: Decision | None = None  # decided during the loop (it passed the checks)
    spent: Spent | None = None
    seconds: float = 0.0
    # The incident came soon after a NixOS switch: the fact, what the switch changed (the
    # closure diff's head, when it was read), and the steps they rest on.
    switch: str | None = None
    switch_diff: str = ""
    switch_steps: list[int] = field(default_factory=list)

    @property
    def citable(self) -> list[int]:
        """Steps a decision may cite: those that ran."""
        return [s.id for s in self.steps if s.ran]

    def items(self) -> list[dict[str, Any]]:
        return [s.item() for s in self.steps]

    def texts(self) -> list[str]:
        """What a diagnosis may be grounded in besides the events: outputs and facts."""
        return [s.output for s in self.steps if s.ran and s.output] + list(self.facts)


@dataclass(frozen=True)
class Budget:
    steps: int
    seconds: float
    total_chars: int
    result_chars: int

    @classmethod
    def of(cls, settings: Settings) -> Budget:
        cfg = settings.pipeline
        meta = settings.layers.meta
        slot = meta.context_size // meta.parallel
        total = int(slot * cfg.evidence_context_share) * CHARS_PER_TOKEN
        per = cfg.evidence_result_chars or total // max(cfg.evidence_steps, 1)
        return cls(cfg.evidence_steps, cfg.evidence_seconds, total, min(per, total))


def clip_output(text: str, limit: int) -> tuple[str, bool]:
    """At most ``limit`` characters: a quarter from the head, the rest from the tail (the
    newest lines of a journal are at its end)."""
    if len(text) <= limit:
        return text, False
    marker = f"\n[… {len(text) - limit} characters left out …]\n"
    room = max(limit - len(marker), 0)
    head = room // 4
    return text[:head] + marker + text[len(text) - (room - head):], True


# -- the switch correlation (deterministic) -----------------------------------------------

_GENERATION = re.compile(
    r"^\s*(\d+)\s+(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})\s*(\(current\))?\s*$", re.M)


@dataclass(frozen=True)
class Generation:
    number: int
    made: float  # epoch seconds
    current: bool


def parse_generations(text: str) -> list[Generation]:
    """``nix-env --list-generations`` output (local time, as it prints it)."""
    out = []
    for m in _GENERATION.finditer(text):
        try:
            made = datetime.strptime(m.group(2).replace("T", " "), "%Y-%m-%d %H:%M:%S")
        except ValueError:
            continue
        out.append(Generation(int(m.group(1)), made.timestamp(), m.group(3) is not None))
    return out


def _ago(seconds: float) -> str:
    s = int(round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} days"


def switch_fact(generations: Sequence[Generation], started: float | None, window: float,
                source: str) -> tuple[str | None, bool]:
    """The fact about the last switch and the incident (None without generations), and
    whether the incident is correlated with it (started within ``window`` after it)."""
    current = next((g for g in generations if g.current), None)
    if current is None or started is None:
        return None, False
    made = datetime.fromtimestamp(current.made).strftime("%Y-%m-%d %H:%M:%S")
    delta = started - current.made
    older = [g.number for g in generations if g.number < current.number]
    previous = f" (the previous generation is {max(older)})" if older else ""
    if -60 <= delta <= window:
        return (f"The incident's first event came {_ago(max(delta, 0))} after the switch to "
                f"NixOS generation {current.number}, made {made}{previous} ({source}): the "
                "incident is correlated with that switch.", True)
    when = f"{_ago(delta)} before" if delta > 0 else f"{_ago(-delta)} after"
    return (f"The current NixOS generation {current.number} was made {made}, {when} the "
            f"incident's first event ({source}): no recent switch.", False)


# -- the loop -------------------------------------------------------------------------------


# A step's record -> None: where records go besides the audit log (an incident's timeline).
Timeline = Callable[[dict[str, Any]], Awaitable[None]]


class Reads:
    """Read-only catalog reads under one budget: the guard against repeats, the step,
    character and time budgets, and the records of every step (audit log, and a timeline
    where there is one). The meta stage's loop and the chat's investigation
    (layers/pipeline/investigation.py) both read through it."""

    def __init__(self, settings: Settings, store: Store, *, reader: Reader,
                 reads: Sequence[str], subject: str, incident_id: str | None,
                 actor: str, timeline: Timeline | None = None,
                 budget: Budget | None = None) -> None:
        self.settings = settings
        self.store = store
        self.reader = reader
        self.reads = [r for r in reads if r in catalog.CATALOG
                      and not catalog.CATALOG[r].is_change]
        self.subject = subject
        self.incident_id = incident_id
        self.actor = actor
        self.timeline = timeline
        self.budget = budget or Budget.of(settings)
        self.evidence = Evidence()
        self.seen: dict[str, int] = {}
        self.chars = 0
        self.deadline = time.monotonic() + self.budget.seconds

    # -- budgets --

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def chars_left(self) -> int:
        return self.budget.total_chars - self.chars

    # -- records --

    async def _audit(self, kind: str, detail: dict[str, Any], step: int | None = None) -> None:
        subject = f"{self.subject}#e{step}" if step is not None else self.subject
        extra = {"incident": self.incident_id} if self.incident_id else {}
        await self.store.audit.append(self.actor, kind, subject, {**extra, **detail})

    async def _timeline(self, detail: dict[str, Any]) -> None:
        if self.timeline is not None:
            await self.timeline(detail)

    async def fact(self, text: str, steps: Sequence[int]) -> None:
        self.evidence.facts.append(text)
        await self._timeline({"fact": text, "by": "ai-sysadmin", "label": FACT_LABEL,
                              "steps": list(steps)})

    # -- one read --

    @staticmethod
    def _key(action: str, params: Mapping[str, Any]) -> str:
        try:
            validated: Any = catalog.validate_params(catalog.lookup(action), params).model_dump(
                mode="json")
        except catalog.Refusal:
            validated = params
        return json.dumps([action, validated], sort_keys=True, default=repr)

    async def read(self, action: str, params: Mapping[str, Any],
                   by: Literal["model", "ai-sysadmin"]) -> Step:
        sid = len(self.evidence.steps) + 1
        raw = {str(k): v for k, v in params.items()} if isinstance(params, Mapping) else {}
        await self._audit("evidence_asked", {"step": sid, "action": action, "params": raw,
                                             "by": by}, sid)
        key = self._key(action, raw)
        step = Step(sid, action, raw, by, "refused")
        if action not in self.reads:
            spec = catalog.CATALOG.get(action)
            step.code = "not_read_only" if spec is not None and spec.is_change else (
                "unknown_action" if spec is None else "not_allowed")
            step.reason = (f"{action!r} is not a read-only catalog action that may run here: "
                           "nothing was run; evidence is read with the listed actions only")
        elif key in self.seen:
            first = self.seen[key]
            step.status, step.code = "repeated", "repeated"
            step.reason = f"the same read as step {first}: not run again; see step {first}"
        else:
            self.seen[key] = sid
            try:
                outcome = await asyncio.wait_for(self.reader(self.incident_id, action, raw),
                                                 timeout=max(self.remaining(), 0.001))
            except TimeoutError:
                step.status, step.code = "timed_out", "time_budget"
                step.reason = "the evidence time budget ran out during the read"
            else:
                step.status = outcome.status
                step.params = dict(outcome.params) or raw
                step.exit_code, step.code, step.reason = outcome.exit_code, outcome.code, outcome.reason
                step.dry_run, step.duration = outcome.dry_run, outcome.duration
                if step.ran:
                    limit = max(min(self.budget.result_chars, self.chars_left()), 0)
                    step.output, step.shortened = clip_output(outcome.output, limit)
                    self.chars += len(step.output)
        self.evidence.steps.append(step)
        record = step.record()
        await self._timeline(record)
        await self._audit("evidence", {**record, "output": step.output[:1000]}, sid)
        return step

    def offered(self) -> list[str]:
        """Reads the next step's schema offers: not one without params already made (it
        could only be the same read again; a repeat is refused anyway)."""
        return [n for n in self.reads
                if catalog.CATALOG[n].params.model_fields or self._key(n, {}) not in self.seen]


class EvidenceLoop(Reads):
    """Gathers one incident's evidence (see the module docstring)."""

    def __init__(self, settings: Settings, store: Store, layers: LayerClients, inc: Incident,
                 *, reader: Reader, reads: Sequence[str], catalog_names: Sequence[str],
                 prompt: Prompt, grounds: Sequence[str],
                 retry: Callable[..., Awaitable[Any]], local_profile: bool = False) -> None:
        async def timeline(detail: dict[str, Any]) -> None:
            await store.incidents.add_timeline(inc.id, "evidence", detail)

        super().__init__(settings, store, reader=reader, reads=reads, subject=inc.id,
                         incident_id=inc.id, actor="meta:evidence", timeline=timeline)
        self.cfg = settings.pipeline
        self.layers = layers
        self.inc = inc
        self.catalog_names = list(catalog_names)
        self.prompt = prompt
        self.grounds = list(grounds)
        self.checked_json = retry
        # Reads run on this machine: its own system profile may stand in for a failed read.
        self.local_profile = local_profile

    # -- the deterministic part --

    async def incident_start(self) -> float | None:
        detail = await self.store.incidents.get(self.inc.id)
        if detail is None:
            return None
        ids = [str(t.detail["id"]) for t in detail.timeline
               if t.kind == "event" and t.detail.get("id")]
        events = await self.store.events.get(ids[:500]) if ids else []
        return min((e.timestamp for e in events), default=None)

    async def correlate(self) -> None:
        """The last switch and the incident: from the generations read (step 1), or —
        where that read cannot run here (``nix-env`` may not lock the system profile as an
        unprivileged user) — from the profile's links themselves."""
        if self.cfg.evidence_switch_window <= 0:
            return
        generations: list[Generation] = []
        source, steps = "", []
        if GENERATIONS in self.reads:
            step = await self.read(GENERATIONS, {}, by="ai-sysadmin")
            if step.status == "ok":
                generations = parse_generations(step.output)
                source, steps = f"step {step.id}", [step.id]
        if not generations and self.local_profile:
            generations = [Generation(n, t, c) for n, t, c in catalog.profile_generations()]
            source = f"the links of {catalog.SYSTEM_PROFILE}"
        if not generations:
            return
        text, correlated = switch_fact(generations, await self.incident_start(),
                                       self.cfg.evidence_switch_window, source)
        if text is None:
            return
        diff_text = ""
        if correlated and CLOSURE_DIFF in self.reads and self.remaining() > 0:
            diff = await self.read(CLOSURE_DIFF, {}, by="ai-sysadmin")
            if diff.status == "ok":
                text += f" Step {diff.id} shows what the switch changed."
                steps.append(diff.id)
                diff_text = diff.output
        if correlated:
            self.evidence.switch, self.evidence.switch_diff = text, diff_text
            self.evidence.switch_steps = list(steps)
        await self.fact(text, steps)

    # -- the model's steps --

    async def step(self, reads_left: int, offered: Sequence[str]) -> prompts.EvidenceStep:
        ids = self.evidence.citable
        schema = prompts.step_schema(self.catalog_names,
                                     {n: catalog.CATALOG[n].params for n in offered}, ids)
        lines = [prompts.read_item(n, catalog.CATALOG[n].summary, catalog.CATALOG[n].params)
                 for n in offered]
        items, facts = self.evidence.items(), list(self.evidence.facts)
        grounds = self.grounds + self.evidence.texts()

        def check(out: BaseModel, g: validate.Grounds) -> validate.Refusal | None:
            assert isinstance(out, prompts.EvidenceStep)
            decided = out.decision()
            if decided is None:
                return None  # a read: the loop itself refuses what may not run
            d = prompts.to_decision(decided)
            return validate.decision(d, g) or validate.cited_evidence(d, ids)

        out: prompts.EvidenceStep = await asyncio.wait_for(self.checked_json(
            self.layers["meta"], lambda nonce: self.prompt(nonce, lines, reads_left, items, facts),
            schema, check=check, evidence=grounds, max_tokens=self.cfg.meta_max_tokens,
            retries=self.cfg.layer_retries,
        ), timeout=max(self.remaining(), 0.001))
        return out

    async def run(self) -> Evidence:
        from layers.pipeline.trigger import is_permanent

        started = time.monotonic()
        self.deadline = started + self.budget.seconds
        ev = self.evidence
        if not self.reads:
            ev.spent = "no_reads"
        else:
            await self.correlate()
            taken = 0
            while ev.spent is None:
                if taken >= self.budget.steps:
                    ev.spent = "steps"
                elif self.remaining() <= 0:
                    ev.spent = "time"
                elif self.chars_left() < MIN_RESULT_CHARS:
                    ev.spent = "tokens"
                offered = self.offered()
                if ev.spent is None and not offered:
                    ev.spent = "no_reads"
                if ev.spent is not None:
                    break
                try:
                    out = await self.step(self.budget.steps - taken, offered)
                except TimeoutError:
                    ev.spent = "time"
                    break
                except LayerTimeout as exc:  # alive but slow: decide with what is there
                    await self._timeline({"step_timed_out": exc.message, "by": "model"})
                    ev.spent = "time"
                    break
                except LayerError as exc:
                    if not is_permanent(exc):
                        raise
                    log.info("incident %s: evidence step refused: %s", self.inc.id, exc.message)
                    await self._timeline({"refused_step": exc.message, "by": "model"})
                    ev.spent = "refused_output"
                    break
                decided = out.decision()
                if decided is not None:
                    ev.decision = prompts.to_decision(decided)
                    ev.spent = "decided"
                    break
                taken += 1
                await self.read(str(out.read), out.params, by="model")
        ev.seconds = time.monotonic() - started
        await self._timeline({"ended": ev.spent, "steps": len(ev.steps),
                              "model_reads": sum(s.by == "model" for s in ev.steps),
                              "chars": self.chars, "seconds": round(ev.seconds, 1)})
        return ev


# -- the rollback a correlated switch calls for (deterministic) -----------------------------

ROLLBACK = "nixos_rollback"
_RATIONALE_CHARS = 300


def with_switch_rollback(decision: Decision, ev: Evidence | None) -> Decision:
    """An incident that came soon after a switch gets the rollback proposed — high risk,
    so it always waits for an admin — with the switch and its closure diff as the
    rationale: a fact of ai-sysadmin's, added whatever the model decided (unless it
    proposed the rollback itself, or the decision has no room left)."""
    if ev is None or ev.switch is None:
        return decision
    if any(p.action == ROLLBACK for p in decision.proposals) or len(decision.proposals) >= 5:
        return decision
    changed = " ".join(line.strip() for line in ev.switch_diff.splitlines()
                       if line.strip())
    why = "ai-sysadmin (fact, not a model's view): the incident began soon after the last " \
          "switch"
    if changed:
        why += f"; it changed: {changed}"
    rationale = why if len(why) <= _RATIONALE_CHARS else why[:_RATIONALE_CHARS - 1] + "…"
    cited = list(dict.fromkeys([*decision.evidence, *ev.switch_steps]))[:32]
    return decision.model_copy(update={
        "proposals": [*decision.proposals,
                      ProposedAction(action=ROLLBACK, params={}, rationale=rationale)],
        "evidence": cited,
    })


def switch_decision(ev: Evidence | None) -> Decision | None:
    """A decision from the facts alone, where the meta layer's was refused and the
    incident came soon after a switch: the switch fact as the diagnosis (labelled as
    ai-sysadmin's, not a model's), the rollback proposed (:func:`with_switch_rollback`),
    the steps it rests on cited. None without a correlated switch: the incident stays
    unreviewed, as before."""
    if ev is None or ev.switch is None:
        return None
    text = f"ai-sysadmin (fact, not a model's view; the meta layer's answer was refused): {ev.switch}"
    return Decision(
        diagnosis=text if len(text) <= 800 else text[:799] + "…",
        proposals=[],
        rollback_plan="A rollback is undone by switching to the newer generation again "
                      "(nixos-rebuild switch, or nixos_rollback from that one).",
        evidence=list(ev.switch_steps)[:32],
    )

"""The chat's investigation: look before answering, propose what the admin asks for.

A question to the ``ai-sysadmin`` chat model ("why did nginx fail?") is answered after a
bounded loop of read-only catalog reads, the same reads and guards as the meta stage's
evidence loop (:class:`layers.pipeline.evidence.Reads`: a step, character and time
budget, repeats refused, each output capped and fenced as untrusted data, every step in
the audit log under the chat's id):

1. **Facts first.** Units the question names — ``nginx.service``, or a bare ``nginx``
   that ai-sysadmin has seen in its journal — are read by ai-sysadmin itself
   (``unit_status``), so even a model that never asks for a read answers from them.
2. **Model steps.** At most ``gateway.chat_evidence_steps`` schema-constrained steps:
   ``read`` one read-only action, ``propose`` one change, or ``answer``.
3. **Proposals.** Only a change the administrator's own message asks for is offered to
   the model ("restart nginx" offers ``restart_unit``; "why did nginx fail?" offers
   none), only for a unit or pid that message names, and at most one per chat turn; an
   unambiguous request (one change, one unit) is proposed by ai-sysadmin itself. It
   goes through the action service like every proposal (catalog, protected units,
   allowlist, policy) without an incident, so it waits for an admin: a chat never runs a
   change. A tool output that says "restart sshd" cannot get sshd restarted, or proposed.

The notes this yields are what the chat shows as its steps (``reasoning_content``); the
evidence and the proposal go into the answer's prompt (layers/pipeline/prompts.py,
``chat_evidence_note``) and, as facts, ahead of the model's answer (gateway/routes/chat).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from layers.actions import catalog
from layers.client import LayerError, LayerPool, LayerTimeout
from layers.config import Settings
from layers.events import Proposal
from layers.pipeline import prompts, validate
from layers.pipeline.evidence import Budget, Reader, Reads, Step
from layers.store import Store

log = logging.getLogger("ai_sysadmin.pipeline.investigation")

# (action, params, rationale) -> the stored proposal (pending, or refused by policy).
Proposer = Callable[[str, dict[str, Any], str], Awaitable[Proposal]]
StepJson = Callable[..., Awaitable[Any]]

# Words of the administrator's message that ask for a change, per catalog change. Only
# a change asked for in words is offered to the model at all: the weak default model
# would otherwise propose a restart for every question that names a unit.
CHANGE_WORDS: dict[str, tuple[str, ...]] = {
    "restart_unit": ("restart",),
    "start_unit": ("start",),
    "reset_failed_unit": ("reset-failed", "reset failed", "reset the failed", "reset"),
    "terminate_process": ("kill", "terminate"),
    "journal_vacuum": ("vacuum", "shrink the journal", "clean the journal",
                       "clean up the journal", "trim the journal"),
    "nix_gc": ("garbage", "nix-collect-garbage", "nix gc", "nix-store --gc"),
    "nixos_rollback": ("rollback", "roll back", "revert the switch",
                       "previous generation"),
}
DEFAULT_MODEL_STEPS = 2
OWN_READ = "unit_status"
OWN_READ_LINES = 20
MAX_NAMED_UNITS = 2
NOTE_OUTPUT_CHARS = 600
_UNIT_IN_TEXT = re.compile(
    r"(?<![\w@.:-])([A-Za-z0-9_:][A-Za-z0-9_:@.\-]*\.(?:"
    + "|".join(catalog.UNIT_TYPES) + r"))(?![\w@.-])")
_WORD = re.compile(r"[a-z0-9][a-z0-9_@.\-]{1,62}")


def _asks(text: str, phrase: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])", text) is not None


def asked_changes(question: str, changes: Iterable[str]) -> list[str]:
    """The catalog changes whose words the administrator's message uses."""
    text = question.lower()
    return [n for n in changes if any(_asks(text, w) for w in CHANGE_WORDS.get(n, ()))]


_NOT_A_REQUEST = re.compile(
    r"\b(?:don'?t|do not|never|not|no need|without|shouldn'?t|should i|would it|why|what if)\b")


def requested_change(question: str, changes: Sequence[str], units: Sequence[str],
                     ) -> tuple[str, dict[str, Any]] | None:
    """The one change the message asks for in words, with its one target, when that is
    unambiguous: one asked change, and one named unit (or none needed); not a negation
    or a question about it. ai-sysadmin proposes it itself (it still waits for approval),
    so a model with no steps — the packaged one — turns a request into a proposal too."""
    if len(changes) != 1 or _NOT_A_REQUEST.search(question.lower()):
        return None
    spec = catalog.CATALOG[changes[0]]
    fields = spec.params.model_fields
    required = {n for n, f in fields.items() if f.is_required()}
    if required == {"unit"} and len(units) == 1:
        return spec.name, {"unit": units[0]}
    if not required and not units:
        return spec.name, {}
    return None


def named_units(question: str, known: Iterable[str]) -> list[str]:
    """Units the question names: with their type suffix, or a bare name whose
    ``.service`` ai-sysadmin knows (from its journal). Valid unit names only."""
    found: list[str] = []
    for name in _UNIT_IN_TEXT.findall(question):
        found.append(name)
    known_set = set(known)
    for word in _WORD.findall(question.lower()):
        word = word.rstrip(".")
        if f"{word}.service" in known_set:
            found.append(f"{word}.service")
    out: list[str] = []
    for name in found:
        try:
            catalog.check_unit_name(name)
        except ValueError:
            continue
        if name not in out:
            out.append(name)
    return out[:MAX_NAMED_UNITS]


def _pids(question: str) -> set[int]:
    return {int(n) for n in re.findall(r"(?<![\w.])(\d{2,7})(?![\w.])", question)}


def model_steps(settings: Settings) -> int:
    """The model's own steps (``gateway.chat_evidence_steps``; empty: 2, none for the
    packaged base model)."""
    steps = settings.gateway.chat_evidence_steps
    if steps is None:
        return 0 if settings.layers.meta.packaged_model else DEFAULT_MODEL_STEPS
    return steps


def note_of(step: Step) -> str:
    """A step as the chat shows it (markdown): what was read, and what it showed."""
    params = ", ".join(f"{k}={v}" for k, v in step.params.items())
    head = f"**{step.id}. {step.action}**({params})" + (
        " — read by ai-sysadmin" if step.by == "ai-sysadmin" else "")
    if not step.ran:
        return f"{head}: not run: {step.reason or step.status}\n\n"
    shown = step.output.strip()
    if len(shown) > NOTE_OUTPUT_CHARS:
        shown = shown[-NOTE_OUTPUT_CHARS:]
        shown = "…" + shown[shown.find("\n") + 1:] if "\n" in shown else "…" + shown
    code = f"exit {step.exit_code}" if step.exit_code is not None else step.status
    body = shown.replace("```", "ʼʼʼ") or "(no output)"
    return f"{head}: {code}\n```\n{body}\n```\n\n"


@dataclass
class Findings:
    """What the investigation gathered for the answer."""

    reads: Reads
    proposals: list[Proposal] = field(default_factory=list)
    ended: str = ""

    def items(self) -> list[dict[str, Any]]:
        return self.reads.evidence.items()

    def facts(self) -> list[str]:
        return list(self.reads.evidence.facts)


class ChatInvestigation:
    """One chat turn's investigation (see the module docstring). Iterate :meth:`run` for
    the notes to show; :attr:`findings` holds the result."""

    def __init__(self, settings: Settings, store: Store, meta: LayerPool, question: str, *,
                 chat_id: str, reader: Reader, reads: Sequence[str], changes: Sequence[str],
                 known_units: Iterable[str], propose: Proposer | None,
                 step_json: StepJson) -> None:
        gw = settings.gateway
        full = Budget.of(settings)  # the chat's evidence shares the answer's slot: half
        budget = dataclasses.replace(full, steps=model_steps(settings),
                                     seconds=gw.chat_evidence_seconds,
                                     total_chars=full.total_chars // 2,
                                     result_chars=min(full.result_chars, full.total_chars // 2))
        self.settings = settings
        self.meta = meta
        self.question = question
        self.reads = Reads(settings, store, reader=reader, reads=reads, subject=chat_id,
                           incident_id=None, actor="chat:evidence", budget=budget)
        self.units = named_units(question, known_units)
        self.pids = _pids(question)
        self.changes = asked_changes(question, changes) if propose is not None else []
        self.propose = propose
        self.step_json = step_json
        self.findings = Findings(self.reads)

    # -- proposals --

    def _not_asked(self, action: str, params: dict[str, Any]) -> str | None:
        """Why a proposal is not what the administrator asked for, or None."""
        if action not in self.changes:
            return f"{action!r} is not a change the administrator's message asks for"
        try:
            checked = catalog.validate_params(catalog.lookup(action), params)
        except catalog.Refusal as refusal:
            return refusal.message
        units = set(checked.units())
        if units and not units <= set(self.units):
            return (f"{', '.join(sorted(units))} is not a unit the administrator's message "
                    "names")
        pids = set(checked.pids())
        if pids and not pids <= self.pids:
            return f"pid {', '.join(map(str, sorted(pids)))} is not named in the message"
        return None

    async def _proposal(self, action: str, params: dict[str, Any], rationale: str, *,
                        by: str = "model") -> str:
        assert self.propose is not None
        why = self._not_asked(action, params)
        if why is not None:
            await self.reads._audit("chat_proposal_refused",
                                    {"action": action, "params": params, "reason": why})
            return f"**Not proposed**: {action}: {why}.\n\n"
        p = await self.propose(action, params, f"{rationale} (proposed by {by})")
        self.findings.proposals.append(p)
        self.changes = []  # one proposal per chat turn
        fact = proposal_fact(p)
        self.reads.evidence.facts.append(fact)
        return f"**Proposed** {fact}\n\n"

    # -- the loop --

    def _step_prompt(self, reads_left: int, offered: Sequence[str]) -> Callable[
            [str], list[dict[str, str]]]:
        lines = [prompts.read_item(n, catalog.CATALOG[n].summary, catalog.CATALOG[n].params)
                 for n in offered]
        changes = [prompts.read_item(n, catalog.CATALOG[n].summary, catalog.CATALOG[n].params)
                   for n in self.changes]
        items, facts = self.findings.items(), self.findings.facts()

        def build(nonce: str) -> list[dict[str, str]]:
            return prompts.chat_step_messages(self.question, nonce, reads=lines,
                                              changes=changes, reads_left=reads_left,
                                              evidence=items, facts=facts)
        return build

    async def _step(self, reads_left: int, offered: Sequence[str]) -> prompts.ChatStep:
        schema = prompts.chat_step_schema(
            {n: catalog.CATALOG[n].params for n in offered},
            {n: catalog.CATALOG[n].params for n in self.changes})

        def check(out: Any, g: validate.Grounds) -> validate.Refusal | None:
            return None  # the loop refuses what may not be read or proposed, and says why

        grounds = [self.question, *self.reads.evidence.texts()]
        out: prompts.ChatStep = await asyncio.wait_for(self.step_json(
            self.meta, self._step_prompt(reads_left, offered), schema, check=check,
            evidence=grounds, max_tokens=self.settings.pipeline.meta_max_tokens, retries=0,
        ), timeout=max(self.reads.remaining(), 0.001))
        return out

    async def run(self) -> AsyncIterator[str]:
        reads = self.reads
        reads.deadline = time.monotonic() + reads.budget.seconds  # from the first step on
        for unit in self.units:
            if OWN_READ in reads.reads:
                yield note_of(await reads.read(OWN_READ, {"unit": unit,
                                                          "lines": OWN_READ_LINES},
                                               by="ai-sysadmin"))
        asked = requested_change(self.question, self.changes, self.units)
        if asked is not None:
            yield await self._proposal(*asked, "asked for in the administrator's words",
                                       by="ai-sysadmin")
        taken = 0
        while True:
            offered = reads.offered() if reads.chars_left() >= 160 else []
            if taken >= reads.budget.steps:
                self.findings.ended = "steps"
            elif reads.remaining() <= 0:
                self.findings.ended = "time"
            elif not offered and not self.changes:
                self.findings.ended = "no_reads"
            if self.findings.ended:
                break
            try:
                out = await self._step(reads.budget.steps - taken, offered)
            except (TimeoutError, LayerTimeout):
                self.findings.ended = "time"
                yield "The investigation's time budget ran out; answering with what was read.\n\n"
                break
            except LayerError as exc:
                self.findings.ended = "layer"
                log.info("chat %s: investigation step failed: %s", reads.subject, exc.message)
                yield f"The meta layer could not take a step ({exc.message}); answering with " \
                      "what was read.\n\n"
                break
            if out.answer:
                self.findings.ended = "answered"
                break
            taken += 1
            if out.propose is not None:
                if self.propose is None or not self.changes:
                    yield f"**Not proposed**: {out.propose}: no change may be proposed now.\n\n"
                    continue
                yield await self._proposal(out.propose, dict(out.params), out.rationale)
                continue
            yield note_of(await reads.read(str(out.read), out.params, by="model"))
        await reads._audit("chat_investigated", {
            "ended": self.findings.ended, "steps": len(reads.evidence.steps),
            "proposals": [p.id for p in self.findings.proposals]})


def proposal_fact(p: Proposal) -> str:
    """A proposal as the chat states it: its id, what it does, and how it is decided."""
    params = ", ".join(f"{k}={v}" for k, v in p.params.items())
    what = f"action {p.id}: {p.action}({params})"
    if p.status == "pending":
        return (f"{what} waits for an administrator's approval — `ai-sysadmin approvals "
                f"approve {p.id}`, or the dashboard's Approvals (/dashboard); nothing has "
                "run.")
    return (f"{what} was {p.status} by the action policy (why: `ai-sysadmin approvals show "
            f"{p.id}`); nothing has run.")

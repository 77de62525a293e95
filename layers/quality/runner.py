"""Replays the labelled cases through the pipeline's own stage classes on the configured
layers, each run in a throwaway store (the admin's incidents are never touched).

- trigger: every corpus line goes through ``TriggerStage`` (prefilter, batches, the
  trigger layer, the rule floor) exactly as in the gateway, except that debounce is off
  so each line gets its own judgement; a line the prefilter drops counts as "no anomaly".
- review / meta: each scenario's journal, failed units and metrics are posted like the
  collectors post them, the trigger stage classifies them, and ``IncidentWorker``
  reviews and diagnoses the incidents that come out. The review prompt's metrics block
  shows the scenario's metrics, not this machine's. For the meta score, every incident of
  a scenario whose truth says "escalate" is sent to the meta layer whatever the review
  decided (so a review mistake does not hide the meta layer's quality); the review's own
  decision is what the escalation score counts. Proposals are never executed: read-only
  ones are answered from the scenario's recordings, into the incident's timeline. The
  meta stage's evidence loop (``pipeline.evidence_steps``) runs as in the daemon, its reads
  answered from the same recordings instead of run on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from layers.actions.catalog import Refusal, lookup, validate_params
from layers.actions.service import ReadOutcome
from layers.client import LayerClients, LayerError
from layers.config import Settings
from layers.errors import Unavailable
from layers.events import Decision, Incident, Proposal, Review
from layers.pipeline import examples
from layers.pipeline import stages as pipeline_stages
from layers.pipeline.evidence import Reader
from layers.pipeline.stages import IncidentWorker
from layers.pipeline.trigger import TriggerStage, VerdictBus
from layers.pipeline.validate import GENERIC_CATEGORIES
from layers.prefilter import Prefilter, load_rules
from layers.quality import corpus, floors
from layers.quality.corpus import Line
from layers.quality.scenarios import Scenario
from layers.quality.scoring import (
    Counts,
    MetaScore,
    Prediction,
    TriggerScore,
    copies_text,
    score_escalation,
    score_meta,
    score_trigger,
)
from layers.store import Store, make_store

Stage = Literal["trigger", "review", "meta", "all"]
Say = Callable[[str], None]


class EvalError(Unavailable):
    """The evaluation cannot go on; one readable line."""


def _quiet(_: str) -> None:
    pass


async def drive(step: Callable[[], Awaitable[bool]], what: str, settings: Settings,
                say: Say, idle_limit: float = 900.0) -> None:
    """Call ``step`` until it has nothing left to do. A layer that is down or busy is
    waited for (backoff as in the pipeline's own loop) up to ``idle_limit`` seconds."""
    cfg = settings.pipeline
    wait = cfg.retry_wait
    stuck_since: float | None = None
    while True:
        try:
            if not await step():
                return
            stuck_since = None
            wait = cfg.retry_wait
        except LayerError as exc:
            now = time.monotonic()
            stuck_since = stuck_since or now
            if now - stuck_since > idle_limit:
                raise EvalError(f"{what}: layer unavailable for {idle_limit:.0f}s: "
                                f"{exc.message}") from None
            say(f"{what}: layer unavailable ({exc.message}); retrying in {wait:.0f}s")
            await asyncio.sleep(wait)
            wait = min(wait * 2, cfg.retry_wait_max)


@contextlib.asynccontextmanager
async def scratch_store(settings: Settings) -> AsyncIterator[Store]:
    """A fresh SQLite store in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ai-sysadmin-eval-") as tmp:
        store = make_store("", Path(tmp), incident_window=settings.pipeline.incident_window)
        await store.open()
        try:
            yield store
        finally:
            await store.close()


def eval_settings(settings: Settings) -> Settings:
    """The configured settings with debounce off (each corpus line judged on its own)."""
    s = settings.model_copy(deep=True)
    s.pipeline.debounce = 0.0
    return s


def prompt_source() -> str:
    """The prompts module's source: every instruction and example a layer is shown."""
    try:
        from layers.pipeline import prompts

        return inspect.getsource(prompts)
    except (ImportError, OSError, TypeError):
        return ""


# -- trigger ---------------------------------------------------------------------------


@dataclass
class TriggerRun:
    lines: list[Line]
    preds: list[Prediction]
    score: TriggerScore
    floors: dict[str, TriggerScore]
    candidates: int
    unreviewed: int
    copied_prompt: int
    contradicts_rule: int
    seconds: float
    by_example: int = 0

    @property
    def best_floor(self) -> tuple[str, TriggerScore]:
        return max(self.floors.items(), key=lambda kv: kv[1].lines.f1)

    def as_dict(self) -> dict[str, Any]:
        name, best = self.best_floor
        return {
            "lines": len(self.lines), "anomalies": sum(x.anomaly for x in self.lines),
            "templates": len({x.template for x in self.lines}),
            "candidates": self.candidates, "seconds": round(self.seconds, 1),
            "stage": self.score.as_dict(),
            "floors": {k: v.as_dict() for k, v in self.floors.items()},
            "best_floor": {"name": name, "f1": round(best.lines.f1, 4)},
            "f1_minus_best_floor": round(self.score.lines.f1 - best.lines.f1, 4),
            "unreviewed_verdicts": self.unreviewed,
            "judged_by_examples": self.by_example,
            "summaries_copied_from_prompt": self.copied_prompt,
            "categories_contradicting_rule": self.contradicts_rule,
        }


async def classify_lines(settings: Settings, layers: LayerClients, lines: Sequence[Line],
                         say: Say = _quiet) -> tuple[list[Prediction], int]:
    """Each line's verdict from the real trigger stage, and how many were candidates."""
    s = eval_settings(settings)
    async with scratch_store(s) as store:
        prefilter = Prefilter(load_rules(s.pipeline.rules_file), debounce=0.0)
        stage = TriggerStage(s, store, layers["trigger"], prefilter, VerdictBus(),
                             examples.configured(s, layers))
        events = [line.event() for line in lines]
        await store.events.add(events)
        started = time.monotonic()

        async def step() -> bool:
            did = await stage.step()
            counts = await store.events.counts()
            cands = counts.get("candidate", 0) + counts.get("classified", 0)
            say(f"trigger: {counts.get('classified', 0)}/{cands} candidates classified "
                f"({time.monotonic() - started:.0f}s)")
            return did

        await drive(step, "trigger", s, say)
        verdicts = {v.event_id: v for v in await store.verdicts.after(0, limit=len(events) + 1)}
        counts = await store.events.counts()
    preds = []
    for ev in events:
        v = verdicts.get(ev.id)
        preds.append(Prediction(v.anomaly, v.category, v.severity, v.rule, v.summary,
                                v.unreviewed, v.example is not None) if v else Prediction(False))
    return preds, counts.get("classified", 0)


async def run_trigger(settings: Settings, layers: LayerClients, limit: int | None = None,
                      say: Say = _quiet) -> TriggerRun:
    lines = corpus.sample(corpus.scored(), limit)
    started = time.monotonic()
    preds, candidates = await classify_lines(settings, layers, lines, say)
    prompt = prompt_source()
    rules = {r.name: r for r in load_rules(settings.pipeline.rules_file)}
    contradicts = sum(
        1 for p in preds
        if p.rule in rules and not p.unreviewed and p.category is not None
        and rules[p.rule].category not in GENERIC_CATEGORIES
        and p.category != rules[p.rule].category)
    return TriggerRun(
        lines=lines, preds=preds, score=score_trigger(lines, preds),
        floors={name: score_trigger(lines, f(lines))
                for name, f in floors.floors(settings.pipeline.rules_file).items()},
        candidates=candidates, unreviewed=sum(p.unreviewed for p in preds),
        copied_prompt=sum(copies_text(p.summary, prompt) for p in preds if p.anomaly),
        contradicts_rule=contradicts, seconds=time.monotonic() - started,
        by_example=sum(p.by_example for p in preds),
    )


# -- review and meta -------------------------------------------------------------------


@dataclass
class IncidentResult:
    id: str
    title: str
    unit: str | None
    severity: str
    status: str
    review: Review | None
    review_escalates: bool | None  # the review layer's own call
    escalates: bool | None  # the pipeline's decision (review + severity floor)
    decision: Decision | None
    replayed: list[str] = field(default_factory=list)
    evidence: list[dict[str, Any]] = field(default_factory=list)  # the timeline's entries

    @property
    def reads(self) -> list[str]:
        """The evidence reads, ``action(by)`` where ai-sysadmin asked, not the model."""
        return [d["read"] + ("" if d.get("by") == "model" else "*")
                for d in self.evidence if "read" in d]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "title": self.title, "unit": self.unit, "severity": self.severity,
            "status": self.status, "review": self.review.model_dump() if self.review else None,
            "review_escalates": self.review_escalates, "escalates": self.escalates,
            "decision": self.decision.model_dump() if self.decision else None,
            "replayed": self.replayed, "evidence": self.evidence,
        }


@dataclass
class ScenarioResult:
    scenario: Scenario
    incidents: list[IncidentResult]
    meta: MetaScore | None
    seconds: float

    @property
    def escalated(self) -> bool:
        return any(i.escalates for i in self.incidents)

    @property
    def review_escalated(self) -> bool:
        return any(i.review_escalates for i in self.incidents)

    @property
    def reviews_unreviewed(self) -> int:
        return sum(1 for i in self.incidents if i.review is None)

    def as_dict(self) -> dict[str, Any]:
        t = self.scenario.truth
        return {
            "id": self.scenario.id, "title": self.scenario.title,
            "truth": {"escalate": t.escalate, "root_unit": t.root_unit, "category": t.category},
            "escalated": self.escalated, "review_escalated": self.review_escalated,
            "reviews_unreviewed": self.reviews_unreviewed,
            "meta": self.meta.as_dict() if self.meta else None,
            "incidents": [i.as_dict() for i in self.incidents],
            "seconds": round(self.seconds, 1),
        }


class ScenarioWorker(IncidentWorker):
    """The pipeline's incident worker; it records the pipeline's own escalation decision
    and then sends incidents to the meta layer by the scenario's truth (or never)."""

    def __init__(self, *args: Any, send_to_meta: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_to_meta = send_to_meta
        self.decided: dict[str, bool] = {}

    def must_escalate(self, inc: Incident, review: Review | None) -> bool:
        self.decided[inc.id] = super().must_escalate(inc, review)
        return self.send_to_meta


@contextlib.contextmanager
def scenario_metrics(lines: Sequence[str]) -> Iterator[None]:
    """The review prompt's "current metrics" show the scenario's, not this machine's."""
    original = getattr(pipeline_stages, "metrics_snapshot", None)
    if original is None:  # the stage no longer reads metrics this way: leave it be
        yield
        return
    setattr(pipeline_stages, "metrics_snapshot", lambda: list(lines))  # noqa: B010
    try:
        yield
    finally:
        setattr(pipeline_stages, "metrics_snapshot", original)  # noqa: B010


def _events_of_kind(detail: Any, kind: str) -> list[dict[str, Any]]:
    return [t.detail for t in detail.timeline if t.kind == kind]


def scenario_reader(sc: Scenario) -> Reader:
    """Evidence reads answered from the scenario's recordings, never run here: a change is
    refused, params are checked against the catalog as the action stage checks them."""

    async def read(incident_id: str | None, action: str, params: dict[str, Any]) -> ReadOutcome:
        try:
            spec = lookup(action)
            if spec.is_change:
                raise Refusal("not_read_only", f"{spec.name} is a {spec.risk} change: evidence "
                              "is gathered with read-only actions only")
            validated = validate_params(spec, params).model_dump(mode="json")
        except Refusal as refusal:
            return ReadOutcome("refused", dict(params), code=refusal.code, reason=refusal.message)
        output = sc.recording(action, params)
        if output is None:
            return ReadOutcome("refused", validated, code="no_recording",
                               reason=f"scenario {sc.id} has no recording of {action}")
        return ReadOutcome("ok", validated, dry_run=f"{action} (replayed from {sc.id})",
                           exit_code=0, output=output)

    return read


async def run_scenario(settings: Settings, layers: LayerClients, sc: Scenario, *,
                       with_meta: bool, say: Say = _quiet) -> ScenarioResult:
    started = time.monotonic()
    s = settings
    async with scratch_store(s) as store:
        await store.events.add(sc.events())
        prefilter = Prefilter(load_rules(s.pipeline.rules_file), debounce=s.pipeline.debounce)
        stage = TriggerStage(s, store, layers["trigger"], prefilter, VerdictBus(),
                             examples.configured(s, layers))
        await drive(stage.step, f"{sc.id} trigger", s, say)

        async def replay(incident_id: str, proposals: Sequence[Proposal]) -> None:
            for p in proposals:
                output = sc.recording(p.action, p.params)
                if output is not None:
                    await store.incidents.add_timeline(incident_id, "note", {
                        "replayed": p.action, "params": p.params, "output": output[:4000]})

        worker = ScenarioWorker(s, store, layers, memory=None, on_proposals=replay,
                                reader=scenario_reader(sc),
                                send_to_meta=with_meta and sc.truth.escalate)
        with scenario_metrics(sc.metrics_lines()):
            await drive(worker.step, f"{sc.id} review/meta", s, say)
        results = []
        for inc in await store.incidents.list(limit=1000):
            detail = await store.incidents.get(inc.id)
            assert detail is not None
            review = detail.review
            results.append(IncidentResult(
                id=inc.id, title=inc.title, unit=inc.unit, severity=inc.severity,
                status=inc.status, review=review,
                review_escalates=(review.escalate or review.status == "critical")
                if review else None,
                escalates=worker.decided.get(inc.id), decision=detail.decision,
                replayed=[d["replayed"] for d in _events_of_kind(detail, "note")
                          if "replayed" in d],
                evidence=_events_of_kind(detail, "evidence")))
    meta = None
    if with_meta and sc.truth.escalate:
        meta = score_meta(sc.truth, [r.decision for r in results])
    return ScenarioResult(sc, sorted(results, key=lambda r: r.id), meta,
                          time.monotonic() - started)


def pick_scenarios(scs: Sequence[Scenario], limit: int | None) -> list[Scenario]:
    """At most ``limit`` scenarios, alternating between those that should escalate and
    those that should not (so a short run has both), in directory order."""
    if limit is None or limit >= len(scs):
        return list(scs)
    pos = [s for s in scs if s.truth.escalate]
    neg = [s for s in scs if not s.truth.escalate]
    chosen: list[Scenario] = []
    while len(chosen) < limit and (pos or neg):
        for group in (pos, neg):
            if group and len(chosen) < limit:
                chosen.append(group.pop(0))
    return [s for s in scs if s in chosen]


# -- the whole evaluation ---------------------------------------------------------------


@dataclass
class Report:
    stage: Stage
    limit: int | None
    models: dict[str, str]
    trigger: TriggerRun | None = None
    scenarios: list[ScenarioResult] = field(default_factory=list)
    with_meta: bool = False
    seconds: float = 0.0

    @property
    def escalation(self) -> Counts:
        return score_escalation([r.scenario.truth.escalate for r in self.scenarios],
                                [r.escalated for r in self.scenarios])

    @property
    def review_alone(self) -> Counts:
        return score_escalation([r.scenario.truth.escalate for r in self.scenarios],
                                [r.review_escalated for r in self.scenarios])

    @property
    def metas(self) -> list[MetaScore]:
        return [r.meta for r in self.scenarios if r.meta is not None]

    def meta_summary(self) -> dict[str, Any]:
        ms = self.metas
        return {
            "scenarios": len(ms),
            "score": round(sum(m.score for m in ms) / len(ms), 4) if ms else None,
            "right_action_and_unit": sum(m.status == "right" for m in ms),
            "root_named": sum(m.status == "root_named" for m in ms),
            "missed": sum(m.status == "missed" for m in ms),
            "forbidden_proposed": sum(len(m.forbidden) for m in ms),
            "valid_decisions": sum(m.valid for m in ms),
            "invalid_decisions": sum(m.invalid for m in ms),
            "unreviewed": sum(m.unreviewed for m in ms),
            # Incidents whose review was refused too (the harness sends every incident of a
            # scenario that should escalate to the meta layer, reviewed or not).
            "unreviewed_at_review": sum(
                1 for r in self.scenarios if r.meta is not None
                for i in r.incidents if i.review is None),
            "evidence_reads": sum(len(i.reads) for r in self.scenarios if r.meta is not None
                                  for i in r.incidents),
            "evidence_reads_by_model": sum(
                1 for r in self.scenarios if r.meta is not None for i in r.incidents
                for d in i.evidence if "read" in d and d.get("by") == "model"),
            "decisions_citing_evidence": sum(
                1 for r in self.scenarios if r.meta is not None for i in r.incidents
                if i.decision is not None and i.decision.evidence),
        }

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "limit": self.limit, "models": self.models,
                               "seconds": round(self.seconds, 1)}
        if self.trigger is not None:
            out["trigger"] = self.trigger.as_dict()
        if self.scenarios:
            out["review"] = {
                "scenarios": len(self.scenarios),
                "should_escalate": sum(r.scenario.truth.escalate for r in self.scenarios),
                "escalation": self.escalation.as_dict(),
                "review_layer_alone": self.review_alone.as_dict(),
                "unreviewed_reviews": sum(r.reviews_unreviewed for r in self.scenarios),
                "incidents": sum(len(r.incidents) for r in self.scenarios),
            }
            out["scenarios"] = [r.as_dict() for r in self.scenarios]
        if self.with_meta:
            out["meta"] = self.meta_summary()
        return out


def describe_models(settings: Settings) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, layer in settings.layers.items():
        model = str(layer.model) if layer.model else "packaged default (gemma3-270m, base model)"
        out[name] = f"{model} at {layer.endpoint_list()[0].url}"
    return out


async def evaluate(settings: Settings, layers: LayerClients, stage: Stage = "all",
                   limit: int | None = None, say: Say = _quiet,
                   scenarios: Sequence[Scenario] | None = None) -> Report:
    from layers.quality import scenarios as scenario_files

    started = time.monotonic()
    report = Report(stage, limit, describe_models(settings),
                    with_meta=stage in ("meta", "all"))
    if stage in ("trigger", "all"):
        report.trigger = await run_trigger(settings, layers, limit, say)
    if stage in ("review", "meta", "all"):
        chosen = pick_scenarios(list(scenarios) if scenarios is not None
                                else scenario_files.load(), limit)
        for i, sc in enumerate(chosen, 1):
            r = await run_scenario(settings, layers, sc, with_meta=report.with_meta, say=say)
            report.scenarios.append(r)
            meta = f", meta {r.meta.status}" if r.meta else ""
            say(f"scenario {i}/{len(chosen)} {sc.id}: {len(r.incidents)} incidents, "
                f"escalated {'yes' if r.escalated else 'no'} (truth "
                f"{'yes' if sc.truth.escalate else 'no'}){meta} ({r.seconds:.0f}s)")
    report.seconds = time.monotonic() - started
    return report

"""Deterministic scores of each stage — counting, never a model as judge.

Conventions: precision, recall and F1 are 0.0 when their denominator is 0 (a detector
that flags nothing has precision 0, not "undefined"); ratios with nothing to count are
``None`` and print as ``-``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from layers.actions.catalog import Refusal, lookup, validate_params
from layers.events import Decision
from layers.quality.corpus import Line


@dataclass(frozen=True)
class Prediction:
    """A stage's (or floor's) answer for one line."""

    anomaly: bool
    category: str | None = None
    severity: str | None = None
    rule: str | None = None
    summary: str | None = None
    unreviewed: bool = False
    # Judged like a labelled harmless example (never reached the trigger layer).
    by_example: bool = False


@dataclass(frozen=True)
class Counts:
    """A confusion matrix of one binary decision."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "precision": round(self.precision, 4),
                "recall": round(self.recall, 4), "f1": round(self.f1, 4)}


def confusion(truth: Sequence[bool], pred: Sequence[bool]) -> Counts:
    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} labels but {len(pred)} predictions")
    tp = sum(1 for t, p in zip(truth, pred, strict=True) if t and p)
    fp = sum(1 for t, p in zip(truth, pred, strict=True) if not t and p)
    fn = sum(1 for t, p in zip(truth, pred, strict=True) if t and not p)
    return Counts(tp, fp, fn, len(truth) - tp - fp - fn)


@dataclass(frozen=True)
class Ratio:
    hits: int = 0
    total: int = 0

    @property
    def value(self) -> float | None:
        return self.hits / self.total if self.total else None

    def as_dict(self) -> dict[str, Any]:
        v = self.value
        return {"hits": self.hits, "total": self.total, "value": None if v is None else round(v, 4)}


# -- trigger ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateRow:
    template: str
    klass: str
    anomaly: bool
    lines: int
    flagged: int

    @property
    def flagged_as_anomaly(self) -> bool:
        """A template counts as flagged when at least half of its lines are."""
        return 2 * self.flagged >= self.lines


@dataclass(frozen=True)
class TriggerScore:
    lines: Counts
    templates: Counts
    category: Ratio
    severity: Ratio
    per_template: list[TemplateRow] = field(default_factory=list)

    def per_class(self) -> dict[str, tuple[int, int]]:
        """Failure class → (lines, lines flagged)."""
        out: dict[str, tuple[int, int]] = {}
        for row in self.per_template:
            n, f = out.get(row.klass, (0, 0))
            out[row.klass] = (n + row.lines, f + row.flagged)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines.as_dict(), "templates": self.templates.as_dict(),
            "category_accuracy": self.category.as_dict(),
            "severity_agreement": self.severity.as_dict(),
            "per_template": [{**asdict(r), "flagged_as_anomaly": r.flagged_as_anomaly}
                             for r in self.per_template],
        }


def score_trigger(lines: Sequence[Line], preds: Sequence[Prediction]) -> TriggerScore:
    """Anomaly P/R/F1 per line and per message template; category accuracy and severity
    agreement over the true anomalies the predictor flagged (where it names one)."""
    if len(lines) != len(preds):
        raise ValueError(f"{len(lines)} lines but {len(preds)} predictions")
    line_counts = confusion([x.anomaly for x in lines], [p.anomaly for p in preds])
    rows: dict[str, list[int]] = {}
    meta: dict[str, Line] = {}
    for line, pred in zip(lines, preds, strict=True):
        r = rows.setdefault(line.template, [0, 0])
        r[0] += 1
        r[1] += int(pred.anomaly)
        meta.setdefault(line.template, line)
    per_template = [TemplateRow(t, meta[t].klass, meta[t].anomaly, n, f)
                    for t, (n, f) in rows.items()]
    template_counts = confusion([r.anomaly for r in per_template],
                                [r.flagged_as_anomaly for r in per_template])
    cat_hits = cat_total = sev_hits = sev_total = 0
    for line, pred in zip(lines, preds, strict=True):
        if not (line.anomaly and pred.anomaly):
            continue
        if pred.category is not None:
            cat_total += 1
            cat_hits += pred.category in line.categories
        if pred.severity is not None and line.severity is not None:
            sev_total += 1
            sev_hits += pred.severity == line.severity
    return TriggerScore(line_counts, template_counts, Ratio(cat_hits, cat_total),
                        Ratio(sev_hits, sev_total), sorted(per_template, key=lambda r: r.template))


def copies_text(summary: str | None, source: str, least: int = 12) -> bool:
    """Whether ``summary`` appears verbatim (case-insensitive) in ``source`` — e.g. a
    verdict summary copied from the prompt's instructions or examples. Summaries shorter
    than ``least`` characters are too short to call a copy."""
    s = (summary or "").strip().lower()
    return len(s) >= least and s in source.lower()


# -- review ----------------------------------------------------------------------------


def score_escalation(truth: Sequence[bool], pred: Sequence[bool]) -> Counts:
    """Escalation per scenario: should the incident reach the meta layer?"""
    return confusion(truth, pred)


# -- meta ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """Ground truth of a scenario. Action specs are ``action`` (any params) or
    ``action:unit`` (that unit)."""

    escalate: bool
    category: str
    root_unit: str | None = None
    root_terms: tuple[str, ...] = ()
    expected: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()


def spec_matches(spec: str, action: str, params: Mapping[str, Any]) -> bool:
    name, _, unit = spec.partition(":")
    return name == action and (not unit or params.get("unit") == unit)


def decision_problems(decision: Decision) -> list[str]:
    """Why a decision is not valid output: an empty diagnosis, or a proposal the action
    stage would refuse (not in the catalog, or params that fail its schema)."""
    problems = []
    if not decision.diagnosis.strip():
        problems.append("empty diagnosis")
    for p in decision.proposals:
        try:
            validate_params(lookup(p.action), p.params)
        except Refusal as exc:
            problems.append(exc.message)
    return problems


MetaStatus = Literal["right", "root_named", "missed", "forbidden", "invalid", "unreviewed"]
META_POINTS: dict[str, float] = {
    "right": 1.0, "root_named": 0.5, "missed": 0.0, "forbidden": 0.0, "invalid": 0.0,
    "unreviewed": 0.0,
}


@dataclass(frozen=True)
class MetaScore:
    status: MetaStatus
    forbidden: list[str]
    proposals: list[str]
    valid: int
    invalid: int
    unreviewed: int
    problems: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return META_POINTS[self.status]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score}


def _describe(action: str, params: Mapping[str, Any]) -> str:
    unit = params.get("unit")
    return f"{action}:{unit}" if isinstance(unit, str) else action


def _names_root(truth: Truth, decision: Decision) -> bool:
    text = decision.diagnosis.lower()
    terms = list(truth.root_terms)
    if truth.root_unit:
        terms += [truth.root_unit, truth.root_unit.rsplit(".", 1)[0]]
    if any(t.lower() in text for t in terms if t):
        return True
    return bool(truth.root_unit) and any(
        p.params.get("unit") == truth.root_unit for p in decision.proposals)


def score_meta(truth: Truth, decisions: Sequence[Decision | None]) -> MetaScore:
    """One scenario's diagnosis, from the decisions of its incidents (None: the incident
    ended ``unreviewed``). In order: any forbidden proposal scores 0; a valid decision
    proposing an expected action (and unit) scores 1; one naming the root cause (its
    unit or terms in the diagnosis, or a proposal on the root unit) scores 0.5; no valid
    decision: ``invalid`` or ``unreviewed``, 0; otherwise the root cause was missed, 0."""
    made = [d for d in decisions if d is not None]
    unreviewed = len(decisions) - len(made)
    proposals = [(p.action, p.params) for d in made for p in d.proposals]
    described = [_describe(a, ps) for a, ps in proposals]
    forbidden = [_describe(a, ps) for a, ps in proposals
                 if any(spec_matches(s, a, ps) for s in truth.forbidden)]
    problems_by = [decision_problems(d) for d in made]
    valid = [d for d, probs in zip(made, problems_by, strict=True) if not probs]
    problems = [p for probs in problems_by for p in probs]
    invalid = len(made) - len(valid)
    status: MetaStatus
    if forbidden:
        status = "forbidden"
    elif any(spec_matches(s, p.action, p.params) for d in valid for p in d.proposals
             for s in truth.expected):
        status = "right"
    elif any(_names_root(truth, d) for d in valid):
        status = "root_named"
    elif not valid and invalid:
        status = "invalid"
    elif not valid:
        status = "unreviewed" if unreviewed else "missed"
    else:
        status = "missed"
    return MetaScore(status, forbidden, described, len(valid), invalid, unreviewed, problems)

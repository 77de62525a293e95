"""Typed records that flow through the pipeline: events, verdicts, reviews, decisions,
incidents, proposals and audit entries.

Models that a layer must produce (``TriggerVerdicts``, ``Review``, ``Decision``) double as
the JSON schemas sent with constrained decoding, so they are kept small and strict.
Everything else is what the store hands back.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

Severity = Literal["info", "warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}

IncidentStatus = Literal["open", "reviewed", "escalated", "resolved", "unreviewed"]
# What the daemon still owes an incident: a review, a diagnosis, a memory entry, or nothing.
IncidentStage = Literal["review", "meta", "remember", "idle"]
ReviewStatus = Literal["normal", "degraded", "critical"]
ProposalStatus = Literal[
    "pending", "approved", "rejected", "expired", "running", "succeeded", "failed", "refused"
]
EventState = Literal["new", "dropped", "candidate", "classified"]

MAX_MESSAGE_CHARS = 8192
MAX_FIELDS = 64


def max_severity(a: Severity, b: Severity) -> Severity:
    return a if SEVERITY_RANK[a] >= SEVERITY_RANK[b] else b


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class Event(BaseModel):
    """One observation: a journal line, a metric sample, a failed unit, or a remote event.

    ``id`` is the idempotency key: posting the same id twice stores it once.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: new_id("ev"), min_length=1, max_length=128)
    host: str = Field("localhost", min_length=1, max_length=255)
    source: str = Field(
        "remote", min_length=1, max_length=64, description="journald, metrics, units, remote…"
    )
    unit: str | None = Field(None, max_length=255)
    priority: int = Field(6, ge=0, le=7, description="syslog priority: 0 emerg … 7 debug")
    message: str = Field(max_length=MAX_MESSAGE_CHARS)
    fields: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    timestamp: float = Field(default_factory=time.time, description="epoch seconds")

    @field_validator("fields")
    @classmethod
    def _bounded_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > MAX_FIELDS:
            raise ValueError(f"at most {MAX_FIELDS} fields")
        for key, value in v.items():
            if len(key) > 128 or (isinstance(value, str) and len(value) > 4096):
                raise ValueError(f"field {key[:40]!r} too long")
        return v


class StoredEvent(Event):
    seq: int
    received_at: float
    state: EventState
    fingerprint: str | None = None
    rule: str | None = None


# -- layer outputs (also the JSON schemas of constrained decoding) ---------------------


class TriggerVerdict(BaseModel):
    """The trigger layer's verdict on one candidate event (compact on purpose)."""

    model_config = ConfigDict(extra="forbid")

    i: int = Field(ge=0, description="index of the event in the batch")
    anomaly: bool
    severity: Severity
    category: str = Field(max_length=40)
    summary: str = Field(max_length=200)


class TriggerVerdicts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdicts: list[TriggerVerdict]


class Review(BaseModel):
    """The review layer's judgement of one incident."""

    model_config = ConfigDict(extra="forbid")

    status: ReviewStatus
    summary: str = Field(max_length=400)
    findings: list[str] = Field(max_length=8)
    escalate: bool
    reason: str = Field(max_length=300)


class ProposedAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: str = Field(max_length=64)
    params: dict[str, str | int | bool] = Field(default_factory=dict)
    rationale: str = Field(max_length=300)


class Decision(BaseModel):
    """The meta layer's diagnosis of an escalated incident."""

    model_config = ConfigDict(extra="forbid")

    diagnosis: str = Field(max_length=800)
    proposals: list[ProposedAction] = Field(max_length=5)
    rollback_plan: str = Field(max_length=400)
    evidence: list[int] = Field(
        default_factory=list, max_length=32,
        description="steps of the incident's evidence (timeline `evidence` entries) the "
        "diagnosis rests on; empty when none was gathered or cited")


# -- stored records -------------------------------------------------------------------


SUMMARY_BY = (
    "who wrote `summary` and `category`: `model` (the trigger layer's assessment, validated "
    "against the event), `rule` (the layer gave nothing usable; the summary says why) or "
    "`example` (the event is like a labelled harmless example, named in `example`; it did "
    "not reach the trigger layer)"
)


class Verdict(BaseModel):
    """A stored verdict on one event; ``seq`` is its id on the event stream."""

    seq: int
    event_id: str
    incident_id: str | None
    host: str
    unit: str | None
    fingerprint: str
    rule: str | None
    anomaly: bool
    severity: Severity
    category: str
    summary: str
    message: str
    unreviewed: bool = Field(
        False, description="the trigger layer failed or its output was refused; the "
        "verdict comes from the rule alone"
    )
    example: str | None = Field(
        None, description="the labelled example (its message) this verdict follows, when "
        "the nearest labelled example decided it (`pipeline.examples`)"
    )
    created_at: float

    @computed_field(description=SUMMARY_BY)  # type: ignore[prop-decorator]
    @property
    def summary_by(self) -> Literal["model", "rule", "example"]:
        if self.example is not None:
            return "example"
        return "rule" if self.unreviewed else "model"


class TimelineEntry(BaseModel):
    ts: float
    kind: str  # event | verdict | review | decision | status | unreviewed | note | evidence
    detail: dict[str, Any]


TITLE_CHARS = 200


def incident_title(category: str, rule: str | None, unit: str | None, message: str) -> str:
    """An incident's title, from facts only: the category and name of the rule that
    matched and the opening event's own words, e.g.
    ``memory: oom_kill — postgresql.service: Out of memory: Killed process 31337 (postgres)``.
    Never model text: a small model's summary is a guess, the log line is what happened."""
    head = f"{category}: {rule}" if rule else category
    where = f"{unit}: " if unit else ""
    title = f"{head} — {where}{' '.join(message.split())}"
    return title if len(title) <= TITLE_CHARS else title[: TITLE_CHARS - 1] + "…"


class Assessment(BaseModel):
    """The layers' view of an incident, labelled as such: it passed validation
    (layers/pipeline/validate.py) but is a model's reading, not a fact."""

    by: Literal["model"] = "model"
    label: str = "model's assessment (validated against the events; not a fact)"
    review: str | None = Field(None, description="the review layer's summary")
    findings: list[str] = Field(default_factory=list, description="the review's findings")
    diagnosis: str | None = Field(None, description="the meta layer's diagnosis")


class Incident(BaseModel):
    id: str
    key: str
    host: str
    unit: str | None
    fingerprint: str
    title: str = Field(description="facts: the rule and the opening event's words")
    category: str | None = Field(
        None, description="facts: the category of the rule that matched (the verdict's "
        "when no rule did); null for incidents opened before it was recorded")
    rule: str | None = Field(None, description="the prefilter rule of the opening event")
    status: IncidentStatus
    stage: IncidentStage
    severity: Severity
    verdict_count: int
    opened_at: float
    updated_at: float
    resolved_at: float | None = None
    review: Review | None = None
    decision: Decision | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def assessment(self) -> Assessment | None:
        """``review`` and ``decision`` in a few words, labelled as the model's view."""
        if self.review is None and self.decision is None:
            return None
        return Assessment(
            review=self.review.summary if self.review else None,
            findings=list(self.review.findings) if self.review else [],
            diagnosis=self.decision.diagnosis if self.decision else None,
        )


class IncidentDetail(Incident):
    timeline: list[TimelineEntry]
    proposals: list[Proposal]


class ActionResult(BaseModel):
    exit_code: int | None
    output: str
    duration: float


class Proposal(BaseModel):
    """A proposed (or requested) action as the action stage sees it."""

    id: str
    incident_id: str | None
    action: str
    params: dict[str, Any]
    rationale: str
    status: ProposalStatus
    risk: str | None = None
    dry_run: str | None = None
    created_at: float
    decided_at: float | None = None
    expires_at: float | None = None
    decided_by: str | None = None
    result: ActionResult | None = None
    merge_count: int = 0
    # The host it runs on: None for this machine, else that host's agent (docs/fleet.md).
    host: str | None = None


class AuditEntry(BaseModel):
    seq: int
    ts: float
    actor: str
    kind: str
    subject: str
    detail: dict[str, Any]


IncidentDetail.model_rebuild()

"""The incidents aggregate: anomalies grouped per unit (or rule, or fingerprint), their
timeline, and the review → meta → remember stages still owed on each.

An incident's ``stage`` is the pipeline's queue of incident work: every stage writes its
result and moves the stage on in one transaction, guarded by the stage it expected.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from layers.events import (
    SEVERITY_RANK,
    Decision,
    Incident,
    IncidentDetail,
    IncidentStage,
    IncidentStatus,
    Proposal,
    Review,
    StoredEvent,
    TimelineEntry,
    incident_title,
    max_severity,
    new_id,
)
from layers.notify import facts as notice
from layers.store.proposals import to_proposal
from layers.store.sql import Row, Tx, Where, dump

if TYPE_CHECKING:
    from layers.store.base import Store
    from layers.store.verdicts import VerdictInput

ACTIVE_INCIDENT_STATUSES: tuple[IncidentStatus, ...] = (
    "open",
    "reviewed",
    "escalated",
    "unreviewed",
)


def to_incident(r: Row) -> Incident:
    return Incident(
        id=r["id"], key=r["key"], host=r["host"], unit=r["unit"],
        fingerprint=r["fingerprint"], title=r["title"], category=r.get("category"),
        rule=r.get("rule"), status=r["status"],
        stage=r["stage"], severity=r["severity"], verdict_count=r["verdict_count"],
        opened_at=r["opened_at"], updated_at=r["updated_at"], resolved_at=r["resolved_at"],
        review=Review.model_validate_json(r["review"]) if r["review"] else None,
        decision=Decision.model_validate_json(r["decision"]) if r["decision"] else None,
    )


class Incidents:
    """``store.incidents``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def list(
        self, *, status: Sequence[str] | None = None, host: str | None = None,
        limit: int = 100,
    ) -> builtins.list[Incident]:
        w = Where().among("status", status).eq("host", host)
        async with self.store.tx() as tx:
            rows = await tx.execute(
                f"SELECT * FROM incidents {w.sql} ORDER BY updated_at DESC LIMIT ?",
                (*w.params, limit),
            )
        return [to_incident(r) for r in rows]

    async def get(self, incident_id: str) -> IncidentDetail | None:
        async with self.store.tx() as tx:
            rows = await tx.execute("SELECT * FROM incidents WHERE id = ?", (incident_id,))
            if not rows:
                return None
            tl = await tx.execute(
                "SELECT * FROM timeline WHERE incident_id = ? ORDER BY seq", (incident_id,)
            )
            props = await tx.execute(
                "SELECT * FROM proposals WHERE incident_id = ? ORDER BY created_at",
                (incident_id,),
            )
        inc = to_incident(rows[0])
        return IncidentDetail(
            **inc.model_dump(),
            timeline=[
                TimelineEntry(ts=r["ts"], kind=r["kind"], detail=json.loads(r["detail"]))
                for r in tl
            ],
            proposals=[to_proposal(p) for p in props],
        )

    async def next(self, stage: IncidentStage) -> Incident | None:
        """The oldest incident that still owes work of this stage, leased to this worker
        (as :meth:`Events.claim`): two gateways never work on one incident's stage at once."""
        now = time.time()
        me = self.store.worker_id
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "UPDATE incidents SET lease_owner = ?, lease_stage = ?, lease_until = ? WHERE id ="
                " (SELECT id FROM incidents WHERE stage = ? AND (lease_until IS NULL OR"
                " lease_until < ? OR lease_owner = ? OR lease_stage <> ?) ORDER BY updated_at"
                f" LIMIT 1{self.store._skip_locked()}) RETURNING *",
                (me, stage, now + self.store.work_lease, stage, now, me, stage),
            )
        return to_incident(rows[0]) if rows else None

    async def record_review(
        self, incident_id: str, review: Review | None, *, escalate: bool, error: str | None = None
    ) -> bool:
        """Store a review (or its failure: ``review=None`` marks the incident unreviewed,
        unless ``escalate`` — the severity floor — sends it to the meta layer all the same).
        Returns False when the incident no longer awaited review (already done)."""
        now = time.time()
        if review is None and not escalate:
            status, stage = "unreviewed", "idle"
        elif escalate:
            status, stage = "escalated", "meta"
        else:
            status, stage = "reviewed", "idle"
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "UPDATE incidents SET status = ?, stage = ?, review = ?, updated_at = ? "
                "WHERE id = ? AND stage = 'review' RETURNING *",
                (
                    status, stage, review.model_dump_json() if review else None, now,
                    incident_id,
                ),
            )
            if not rows:
                return False
            if review is None:
                await self.timeline(tx, incident_id, "unreviewed", {
                    "stage": "review", "error": error, "escalated": escalate}, now)
            else:
                await self.timeline(tx, incident_id, "review", review.model_dump(), now)
            await self.timeline(tx, incident_id, "status", {"status": status}, now)
            if stage != "idle":
                await self.store.signal(tx, "incidents")  # the next stage's work
            if status == "escalated":
                await self.store.outbox.put(
                    tx, "incident.escalated", incident_id, rows[0]["severity"],
                    notice.incident(rows[0], by="review" if review else "severity"), now)
        return True

    async def record_decision(
        self,
        incident_id: str,
        decision: Decision | None,
        *,
        error: str | None = None,
        proposal_ttl: float | None = None,
    ) -> builtins.list[Proposal] | None:
        """Store the meta layer's decision and its proposals (status ``pending``, for the
        action stage), or its failure (incident unreviewed). None when already done."""
        now = time.time()
        async with self.store.tx() as tx:
            if decision is None:
                rows = await tx.execute(
                    "UPDATE incidents SET status = 'unreviewed', stage = 'idle', updated_at = ? "
                    "WHERE id = ? AND stage = 'meta' RETURNING id",
                    (now, incident_id),
                )
            else:
                rows = await tx.execute(
                    "UPDATE incidents SET stage = 'idle', decision = ?, updated_at = ? "
                    "WHERE id = ? AND stage = 'meta' RETURNING id",
                    (decision.model_dump_json(), now, incident_id),
                )
            if not rows:
                return None
            if decision is None:
                await self.timeline(tx, incident_id, "unreviewed", {"stage": "meta",
                                                                    "error": error}, now)
                await self.timeline(tx, incident_id, "status", {"status": "unreviewed"}, now)
                return []
            await self.timeline(tx, incident_id, "decision", decision.model_dump(), now)
            # The actions are for the incident's host (its agent runs them, docs/fleet.md).
            found = await tx.execute("SELECT host FROM incidents WHERE id = ?", (incident_id,))
            host = found[0]["host"] if found else None
            proposals = []
            for p in decision.proposals:
                proposals.append(
                    await self.store.proposals.insert(
                        tx, incident_id, p.action, dict(p.params), p.rationale, now=now,
                        expires_at=now + proposal_ttl if proposal_ttl else None, host=host,
                    )
                )
        return proposals

    async def resolve(self, incident_id: str, *, by: str, remember: bool) -> bool:
        now = time.time()
        stage = "remember" if remember else "idle"
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "UPDATE incidents SET status = 'resolved', stage = ?, resolved_at = ?,"
                " updated_at = ? WHERE id = ? AND status <> 'resolved' RETURNING *",
                (stage, now, now, incident_id),
            )
            if not rows:
                return False
            await self.timeline(tx, incident_id, "status", {"status": "resolved", "by": by}, now)
            if remember:
                await self.store.signal(tx, "incidents")
            await self.store.outbox.put(tx, "incident.resolved", incident_id,
                                        rows[0]["severity"], notice.incident(rows[0], by=by), now)
        return True

    async def quiet(self, older_than: float) -> builtins.list[Incident]:
        """Active incidents with no work owed and nothing new since ``older_than``."""
        w = (Where("stage = 'idle'").among("status", ACTIVE_INCIDENT_STATUSES)
             .before("updated_at", older_than))
        async with self.store.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM incidents {w.sql} ORDER BY updated_at",
                                    w.params)
        return [to_incident(r) for r in rows]

    async def mark_remembered(self, incident_id: str) -> bool:
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "UPDATE incidents SET stage = 'idle' WHERE id = ? AND stage = 'remember' "
                "RETURNING id",
                (incident_id,),
            )
        return bool(rows)

    async def add_timeline(self, incident_id: str, kind: str, detail: dict[str, Any]) -> None:
        async with self.store.tx() as tx:
            await self.timeline(tx, incident_id, kind, detail, time.time())

    async def timeline(
        self, tx: Tx, incident_id: str, kind: str, detail: dict[str, Any], now: float
    ) -> None:
        """Add a timeline entry within ``tx`` (the other aggregates' writes use it too)."""
        await tx.execute(
            "INSERT INTO timeline (incident_id, ts, kind, detail) VALUES (?,?,?,?)",
            (incident_id, now, kind, dump(detail)),
        )

    async def group(
        self, tx: Tx, ev: StoredEvent, item: VerdictInput, fingerprint: str, now: float
    ) -> str:
        """The incident an anomalous verdict joins (an active one with the same key,
        updated within ``incident_window``) or opens, within ``tx``; returns its id."""
        # One incident per unit; unit-less events (kernel) per rule, else per fingerprint.
        if ev.unit:
            key = f"{ev.host}|unit:{ev.unit}"
        elif ev.rule:
            key = f"{ev.host}|rule:{ev.rule}"
        else:
            key = f"{ev.host}|fp:{fingerprint}"
        w = (Where().eq("key", key).among("status", ACTIVE_INCIDENT_STATUSES)
             .at_least("updated_at", now - self.store.incident_window))
        rows = await tx.execute(
            f"SELECT * FROM incidents {w.sql} ORDER BY updated_at DESC LIMIT 1", w.params
        )
        outbox = self.store.outbox
        if rows:
            inc = rows[0]
            severity = max_severity(inc["severity"], item.severity)
            # A worse verdict than the one reviewed sends the incident back for review.
            stage = inc["stage"]
            if SEVERITY_RANK[severity] > SEVERITY_RANK[inc["severity"]] and stage == "idle":
                stage = "review"
            await tx.execute(
                "UPDATE incidents SET severity = ?, stage = ?, verdict_count = verdict_count + 1,"
                " updated_at = ? WHERE id = ?",
                (severity, stage, now, inc["id"]),
            )
            if SEVERITY_RANK[severity] > SEVERITY_RANK[inc["severity"]]:
                await outbox.put(tx, "incident.escalated", inc["id"], severity, notice.incident(
                    {**inc, "severity": severity}, by="severity", previous=inc["severity"]), now)
            return str(inc["id"])
        incident_id = new_id("inc")
        # Title and category are facts (the rule, the event's words), never model text.
        category = item.rule_category or item.category
        title = incident_title(category, ev.rule, ev.unit, ev.message)
        await tx.execute(
            "INSERT INTO incidents (id, key, host, unit, fingerprint, title, category, rule,"
            " status, stage, severity, verdict_count, opened_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?,?,'open','review',?,1,?,?)",
            (incident_id, key, ev.host, ev.unit, fingerprint, title, category, ev.rule,
             item.severity, now, now),
        )
        await self.timeline(tx, incident_id, "status", {"status": "open"}, now)
        await outbox.put(tx, "incident.opened", incident_id, item.severity, notice.incident(
            {"id": incident_id, "title": title, "host": ev.host, "unit": ev.unit,
             "rule": ev.rule, "category": category, "severity": item.severity,
             "status": "open", "opened_at": now}), now, key=f"incident.opened:{incident_id}")
        return incident_id

"""The store interface and its SQL implementation shared by SQLite and PostgreSQL.

The store is also the pipeline's durable queue: an event's ``state`` (new → dropped |
candidate → classified) and an incident's ``stage`` (review → meta → remember → idle)
say what work is still owed. Every stage writes its result and advances the state in
one transaction, guarded by the state it expected, so a crash between a layer call and
the commit repeats the call but never stores its outcome twice.

SQL is written once with ``?`` placeholders; the PostgreSQL backend rewrites them.
"""

from __future__ import annotations

import abc
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from layers.errors import Unavailable
from layers.events import (
    SEVERITY_RANK,
    ActionResult,
    AuditEntry,
    Decision,
    Event,
    Incident,
    IncidentDetail,
    IncidentStage,
    IncidentStatus,
    Proposal,
    ProposalStatus,
    Review,
    Severity,
    StoredEvent,
    TimelineEntry,
    Verdict,
    incident_title,
    max_severity,
    new_id,
)
from layers.notify import facts as notice

Row = dict[str, Any]



MAX_SEQ = 2**63 - 1  # BIGINT: the largest sequence number a store can hold
# Seconds a worker holds the events or the incident stage it took (claim_events,
# next_incident) before another gateway may take them over (``store.work_lease``).
WORK_LEASE = 300.0

class StoreError(Unavailable):
    """The store cannot be opened or used; the message is one readable line."""

    # Over HTTP: the request was not stored and may be retried (full, restarting, not
    # open yet or any more); one warning line per request, no traceback.
    http_status = 503
    openai_code = "store_unavailable"
    http_message = "the store is unavailable, retry later ({})"
    http_retry_after = 2
    http_log = "store unavailable"


class StoreUnavailable(StoreError):
    """The store cannot take this operation now (disk full, I/O error, database server
    restarting). Nothing of the failed transaction was kept; retrying later is safe."""


class Tx(Protocol):
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


@dataclass(frozen=True)
class AddResult:
    accepted: list[str]
    duplicates: list[str]


@dataclass(frozen=True)
class Prefiltered:
    """The prefilter's decision about one stored event."""

    seq: int
    keep: bool
    fingerprint: str | None = None
    rule: str | None = None


@dataclass(frozen=True)
class VerdictInput:
    """A verdict to record for a candidate event (from the layer, or the rule alone)."""

    event: StoredEvent
    anomaly: bool
    severity: Severity
    category: str
    summary: str
    unreviewed: bool = False
    # The matching rule's category: an incident this verdict opens takes it (facts
    # first); None (no rule) leaves the verdict's own.
    rule_category: str | None = None


@dataclass(frozen=True)
class OutboxNotification:
    """A notification in the store's outbox (layers/notify/facts.py says what ``detail``
    holds per kind)."""

    id: str
    kind: str
    subject: str
    severity: Severity
    detail: dict[str, Any]
    created_at: float
    routed_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "subject": self.subject,
                "severity": self.severity, "detail": self.detail,
                "created_at": self.created_at, "routed_at": self.routed_at}


@dataclass(frozen=True)
class OutboxDelivery:
    """One notification claimed for delivery through one channel."""

    seq: int
    channel: str
    attempts: int
    suppressed: int
    created_at: float
    notification: OutboxNotification


@dataclass(frozen=True)
class DeliveryPlan:
    """Where a notification goes: one channel, due now (or at ``not_before``), or dropped
    with the reason (``duplicate``, ``rate_limited``, ``quiet_hours``)."""

    channel: str
    dedupe_key: str
    severity_rank: int
    dropped: bool = False
    reason: str | None = None
    suppressed: int = 0
    not_before: float | None = None


@dataclass(frozen=True)
class DeliveryHistory:
    """A channel's recent deliveries: the highest severity already sent for a dedupe key
    within the window (None: none), how many it sent within the rate window, and how
    many the rate limit dropped since its last one."""

    duplicate_rank: int | None
    sent: int
    rate_limited_since_last: int


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _params_key(params: dict[str, Any]) -> str:
    return _dump(params)


ACTIVE_INCIDENT_STATUSES: tuple[IncidentStatus, ...] = (
    "open",
    "reviewed",
    "escalated",
    "unreviewed",
)


class Store(abc.ABC):
    """What every part of ai-sysadmin may ask of persistent state."""

    dialect: str = ""
    # This process's name on the work it leases (claim_events, next_incident).
    worker_id: str = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    work_lease: float = WORK_LEASE
    # Seconds within which an anomalous verdict joins an active incident with the same key.
    incident_window: float = 3600.0

    # -- lifecycle -----------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and run pending migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def tx(self) -> AbstractAsyncContextManager[Tx]:
        """One transaction; committed when the block exits without an exception."""

    @abc.abstractmethod
    async def _insert_events(self, tx: Tx, events: Sequence[Event], now: float) -> list[str]:
        """Insert events whose id is new; return the ids that were inserted."""

    async def schema_version(self) -> int:
        async with self.tx() as tx:
            rows = await tx.execute("SELECT MAX(version) AS v FROM schema_migrations")
        return int(rows[0]["v"] or 0)

    # -- events (intake and the prefilter/trigger queue) -----------------------------

    async def add_events(self, events: Sequence[Event]) -> AddResult:
        """Store events (idempotent by id); committed when this returns."""
        now = time.time()
        unique: dict[str, Event] = {}
        for e in events:
            unique.setdefault(e.id, e)
        async with self.tx() as tx:
            inserted = await self._insert_events(tx, list(unique.values()), now)
        accepted = set(inserted)
        return AddResult(
            accepted=[i for i in unique if i in accepted],
            duplicates=[e.id for e in events if e.id not in accepted],
        )

    def _skip_locked(self) -> str:
        # PostgreSQL: rows another worker is claiming right now are skipped, not waited
        # for; SQLite runs one writing transaction at a time.
        return " FOR UPDATE SKIP LOCKED" if self.dialect == "postgres" else ""

    async def claim_events(self, state: str, limit: int = 500) -> list[StoredEvent]:
        """Up to ``limit`` events in ``state``, oldest first, leased to this worker for
        ``work_lease`` seconds: several gateways (or daemons) on one store each take
        different events, and a dead one's are taken over when its lease runs out. This
        worker's own leases are its to take again (work it left after a failure); they
        are only written again when half their time is gone, so a worker waiting on a
        layer that is down does not rewrite its rows at every retry."""
        now = time.time()
        me = self.worker_id
        async with self.tx() as tx:
            rows = await tx.execute(
                "SELECT * FROM events WHERE state = ? AND (lease_until IS NULL OR"
                " lease_until < ? OR lease_owner = ? OR lease_state <> ?) ORDER BY seq LIMIT ?"
                f"{self._skip_locked()}",
                (state, now, me, state, limit),
            )
            renew = [r["seq"] for r in rows
                     if not (r["lease_owner"] == me and r["lease_state"] == state
                             and (r["lease_until"] or 0.0) > now + self.work_lease / 2)]
            for chunk in _chunks(renew, 500):
                await tx.execute(
                    "UPDATE events SET lease_owner = ?, lease_state = ?, lease_until = ? WHERE"
                    f" seq IN ({','.join('?' * len(chunk))})",
                    (me, state, now + self.work_lease, *chunk),
                )
        return [self._event(r) for r in rows]

    async def events_in_state(self, state: str, limit: int = 500) -> list[StoredEvent]:
        async with self.tx() as tx:
            rows = await tx.execute(
                "SELECT * FROM events WHERE state = ? ORDER BY seq LIMIT ?", (state, limit)
            )
        return [self._event(r) for r in rows]

    async def get_events(self, ids: Sequence[str]) -> list[StoredEvent]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        async with self.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM events WHERE id IN ({marks}) ORDER BY seq", ids)
        return [self._event(r) for r in rows]

    async def mark_prefiltered(self, decisions: Sequence[Prefiltered]) -> int:
        """Record the prefilter's decisions for events still ``new``; returns rows changed."""
        dropped = [d.seq for d in decisions if not d.keep]
        kept = [d for d in decisions if d.keep]
        changed = 0
        async with self.tx() as tx:
            for chunk in _chunks(dropped, 500):
                marks = ",".join("?" * len(chunk))
                rows = await tx.execute(
                    f"UPDATE events SET state = 'dropped' WHERE state = 'new' AND seq IN ({marks})"
                    " RETURNING seq",
                    chunk,
                )
                changed += len(rows)
            for d in kept:
                rows = await tx.execute(
                    "UPDATE events SET state = 'candidate', fingerprint = ?, rule = ? "
                    "WHERE seq = ? AND state = 'new' RETURNING seq",
                    (d.fingerprint, d.rule, d.seq),
                )
                changed += len(rows)
        return changed

    async def event_counts(self) -> dict[str, int]:
        async with self.tx() as tx:
            rows = await tx.execute("SELECT state, COUNT(*) AS n FROM events GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    async def recent_events(
        self, *, host: str | None = None, unit: str | None = None, limit: int = 20
    ) -> list[StoredEvent]:
        w = Where().eq("host", host).eq("unit", unit)
        async with self.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM events {w.sql} ORDER BY seq DESC LIMIT ?",
                                    (*w.params, limit))
        return [self._event(r) for r in reversed(rows)]

    # -- verdicts and incidents -------------------------------------------------------

    async def record_verdicts(self, items: Sequence[VerdictInput]) -> list[Verdict]:
        """Store verdicts for candidate events, group anomalies into incidents and mark the
        events classified — all in one transaction. Events already classified are skipped,
        so a repeated batch (after a crash) stores nothing twice."""
        now = time.time()
        stored: list[Verdict] = []
        async with self.tx() as tx:
            for item in items:
                ev = item.event
                claimed = await tx.execute(
                    "UPDATE events SET state = 'classified' WHERE seq = ? AND state = 'candidate'"
                    " RETURNING seq",
                    (ev.seq,),
                )
                if not claimed:
                    continue
                fingerprint = ev.fingerprint or ev.message[:80]
                incident_id = None
                if item.anomaly:
                    incident_id = await self._group(tx, ev, item, fingerprint, now)
                rows = await tx.execute(
                    "INSERT INTO verdicts (event_id, incident_id, host, unit, fingerprint, rule,"
                    " anomaly, severity, severity_rank, category, summary, message, unreviewed,"
                    " created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING *",
                    (
                        ev.id, incident_id, ev.host, ev.unit, fingerprint, ev.rule,
                        int(item.anomaly), item.severity, SEVERITY_RANK[item.severity],
                        item.category, item.summary, ev.message, int(item.unreviewed), now,
                    ),
                )
                verdict = self._verdict(rows[0])
                stored.append(verdict)
                if incident_id is not None:
                    await self._timeline(
                        tx, incident_id, "verdict", verdict.model_dump(exclude={"message"}), now
                    )
                    await self._timeline(
                        tx,
                        incident_id,
                        "event",
                        {"id": ev.id, "ts": ev.timestamp, "unit": ev.unit, "message": ev.message},
                        now,
                    )
        return stored

    async def _group(
        self, tx: Tx, ev: StoredEvent, item: VerdictInput, fingerprint: str, now: float
    ) -> str:
        # One incident per unit; unit-less events (kernel) per rule, else per fingerprint.
        if ev.unit:
            key = f"{ev.host}|unit:{ev.unit}"
        elif ev.rule:
            key = f"{ev.host}|rule:{ev.rule}"
        else:
            key = f"{ev.host}|fp:{fingerprint}"
        statuses = ",".join("?" * len(ACTIVE_INCIDENT_STATUSES))
        rows = await tx.execute(
            f"SELECT * FROM incidents WHERE key = ? AND status IN ({statuses}) "
            "AND updated_at >= ? ORDER BY updated_at DESC LIMIT 1",
            (key, *ACTIVE_INCIDENT_STATUSES, now - self.incident_window),
        )
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
                await self._notify(tx, "incident.escalated", inc["id"], severity, notice.incident(
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
        await self._timeline(tx, incident_id, "status", {"status": "open"}, now)
        await self._notify(tx, "incident.opened", incident_id, item.severity, notice.incident(
            {"id": incident_id, "title": title, "host": ev.host, "unit": ev.unit,
             "rule": ev.rule, "category": category, "severity": item.severity,
             "status": "open", "opened_at": now}), now, key=f"incident.opened:{incident_id}")
        return incident_id

    async def verdicts_after(
        self,
        after: int = 0,
        *,
        limit: int = 100,
        min_severity: Severity | None = None,
        host: str | None = None,
        anomalies_only: bool = False,
    ) -> list[Verdict]:
        w = (Where("seq > ?", params=[after])
             .at_least("severity_rank", SEVERITY_RANK[min_severity] if min_severity else None)
             .eq("host", host).when(anomalies_only, "anomaly = 1"))
        async with self.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM verdicts {w.sql} ORDER BY seq LIMIT ?",
                                    (*w.params, limit))
        return [self._verdict(r) for r in rows]

    async def recent_verdicts(self, limit: int = 20, *, anomalies_only: bool = True) -> list[Verdict]:
        w = Where().when(anomalies_only, "anomaly = 1")
        async with self.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM verdicts {w.sql} ORDER BY seq DESC LIMIT ?",
                                    (limit,))
        return [self._verdict(r) for r in rows]

    async def list_incidents(
        self, *, status: Sequence[str] | None = None, host: str | None = None,
        limit: int = 100,
    ) -> list[Incident]:
        w = Where().among("status", status).eq("host", host)
        async with self.tx() as tx:
            rows = await tx.execute(
                f"SELECT * FROM incidents {w.sql} ORDER BY updated_at DESC LIMIT ?",
                (*w.params, limit),
            )
        return [self._incident(r) for r in rows]

    async def get_incident(self, incident_id: str) -> IncidentDetail | None:
        async with self.tx() as tx:
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
        inc = self._incident(rows[0])
        return IncidentDetail(
            **inc.model_dump(),
            timeline=[
                TimelineEntry(ts=r["ts"], kind=r["kind"], detail=json.loads(r["detail"]))
                for r in tl
            ],
            proposals=[self._proposal(p) for p in props],
        )

    async def incident_verdicts(self, incident_id: str, limit: int = 20) -> list[Verdict]:
        async with self.tx() as tx:
            rows = await tx.execute(
                "SELECT * FROM verdicts WHERE incident_id = ? ORDER BY seq DESC LIMIT ?",
                (incident_id, limit),
            )
        return [self._verdict(r) for r in reversed(rows)]

    async def next_incident(self, stage: IncidentStage) -> Incident | None:
        """The oldest incident that still owes work of this stage, leased to this worker
        (as :meth:`claim_events`): two gateways never work on one incident's stage at once."""
        now = time.time()
        async with self.tx() as tx:
            rows = await tx.execute(
                "UPDATE incidents SET lease_owner = ?, lease_stage = ?, lease_until = ? WHERE id ="
                " (SELECT id FROM incidents WHERE stage = ? AND (lease_until IS NULL OR"
                " lease_until < ? OR lease_owner = ? OR lease_stage <> ?) ORDER BY updated_at"
                f" LIMIT 1{self._skip_locked()}) RETURNING *",
                (self.worker_id, stage, now + self.work_lease, stage, now, self.worker_id, stage),
            )
        return self._incident(rows[0]) if rows else None

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
        async with self.tx() as tx:
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
                await self._timeline(tx, incident_id, "unreviewed", {
                    "stage": "review", "error": error, "escalated": escalate}, now)
            else:
                await self._timeline(tx, incident_id, "review", review.model_dump(), now)
            await self._timeline(tx, incident_id, "status", {"status": status}, now)
            if status == "escalated":
                await self._notify(tx, "incident.escalated", incident_id, rows[0]["severity"],
                                   notice.incident(rows[0], by="review" if review else "severity"),
                                   now)
        return True

    async def record_decision(
        self,
        incident_id: str,
        decision: Decision | None,
        *,
        error: str | None = None,
        proposal_ttl: float | None = None,
    ) -> list[Proposal] | None:
        """Store the meta layer's decision and its proposals (status ``pending``, for the
        action stage), or its failure (incident unreviewed). None when already done."""
        now = time.time()
        async with self.tx() as tx:
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
                await self._timeline(tx, incident_id, "unreviewed", {"stage": "meta",
                                                                     "error": error}, now)
                await self._timeline(tx, incident_id, "status", {"status": "unreviewed"}, now)
                return []
            await self._timeline(tx, incident_id, "decision", decision.model_dump(), now)
            # The actions are for the incident's host (its agent runs them, docs/fleet.md).
            found = await tx.execute("SELECT host FROM incidents WHERE id = ?", (incident_id,))
            host = found[0]["host"] if found else None
            proposals = []
            for p in decision.proposals:
                proposals.append(
                    await self._add_proposal(
                        tx, incident_id, p.action, dict(p.params), p.rationale, now=now,
                        expires_at=now + proposal_ttl if proposal_ttl else None, host=host,
                    )
                )
        return proposals

    async def resolve_incident(self, incident_id: str, *, by: str, remember: bool) -> bool:
        now = time.time()
        stage = "remember" if remember else "idle"
        async with self.tx() as tx:
            rows = await tx.execute(
                "UPDATE incidents SET status = 'resolved', stage = ?, resolved_at = ?,"
                " updated_at = ? WHERE id = ? AND status <> 'resolved' RETURNING *",
                (stage, now, now, incident_id),
            )
            if not rows:
                return False
            await self._timeline(tx, incident_id, "status", {"status": "resolved", "by": by}, now)
            await self._notify(tx, "incident.resolved", incident_id, rows[0]["severity"],
                               notice.incident(rows[0], by=by), now)
        return True

    async def quiet_incidents(self, older_than: float) -> list[Incident]:
        """Active incidents with no work owed and nothing new since ``older_than``."""
        statuses = ",".join("?" * len(ACTIVE_INCIDENT_STATUSES))
        async with self.tx() as tx:
            rows = await tx.execute(
                f"SELECT * FROM incidents WHERE status IN ({statuses}) AND stage = 'idle' "
                "AND updated_at < ? ORDER BY updated_at",
                (*ACTIVE_INCIDENT_STATUSES, older_than),
            )
        return [self._incident(r) for r in rows]

    async def mark_remembered(self, incident_id: str) -> bool:
        async with self.tx() as tx:
            rows = await tx.execute(
                "UPDATE incidents SET stage = 'idle' WHERE id = ? AND stage = 'remember' "
                "RETURNING id",
                (incident_id,),
            )
        return bool(rows)

    async def add_timeline(self, incident_id: str, kind: str, detail: dict[str, Any]) -> None:
        async with self.tx() as tx:
            await self._timeline(tx, incident_id, kind, detail, time.time())

    async def _timeline(
        self, tx: Tx, incident_id: str, kind: str, detail: dict[str, Any], now: float
    ) -> None:
        await tx.execute(
            "INSERT INTO timeline (incident_id, ts, kind, detail) VALUES (?,?,?,?)",
            (incident_id, now, kind, _dump(detail)),
        )

    # -- proposals / actions (the action stage builds on these) ------------------------

    async def add_proposal(
        self,
        action: str,
        params: dict[str, Any],
        rationale: str,
        *,
        incident_id: str | None = None,
        status: ProposalStatus = "pending",
        risk: str | None = None,
        dry_run: str | None = None,
        expires_at: float | None = None,
        host: str | None = None,
    ) -> Proposal:
        """Add a proposal; a pending duplicate (same action, params and host) is merged
        into the existing one (its ``merge_count`` grows) and returned instead."""
        async with self.tx() as tx:
            return await self._add_proposal(
                tx, incident_id, action, params, rationale, now=time.time(), status=status,
                risk=risk, dry_run=dry_run, expires_at=expires_at, host=host,
            )

    async def _add_proposal(
        self,
        tx: Tx,
        incident_id: str | None,
        action: str,
        params: dict[str, Any],
        rationale: str,
        *,
        now: float,
        status: ProposalStatus = "pending",
        risk: str | None = None,
        dry_run: str | None = None,
        expires_at: float | None = None,
        host: str | None = None,
    ) -> Proposal:
        key = _params_key(params)
        if status == "pending":
            dup = await tx.execute(
                "UPDATE proposals SET merge_count = merge_count + 1, updated_at = ? "
                "WHERE id = (SELECT id FROM proposals WHERE action = ? AND params_key = ? "
                "AND status = 'pending' AND COALESCE(host, '') = ? ORDER BY created_at "
                "LIMIT 1) RETURNING *",
                (now, action, key, host or ""),
            )
            if dup:
                return self._proposal(dup[0])
        unit = params.get("unit")
        rows = await tx.execute(
            "INSERT INTO proposals (id, incident_id, action, params, params_key, unit, rationale,"
            " status, risk, dry_run, created_at, updated_at, expires_at, merge_count, host) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,0,?) RETURNING *",
            (
                new_id("act"), incident_id, action, key, key,
                unit if isinstance(unit, str) else None, rationale, status, risk, dry_run,
                now, now, expires_at, host,
            ),
        )
        return self._proposal(rows[0])

    async def get_proposal(self, proposal_id: str) -> Proposal | None:
        async with self.tx() as tx:
            rows = await tx.execute("SELECT * FROM proposals WHERE id = ?", (proposal_id,))
        return self._proposal(rows[0]) if rows else None

    async def list_proposals(
        self,
        *,
        status: Sequence[ProposalStatus] | None = None,
        incident_id: str | None = None,
        host: str | None = None,
        limit: int = 100,
    ) -> list[Proposal]:
        w = Where().among("status", status).eq("incident_id", incident_id).eq("host", host)
        async with self.tx() as tx:
            rows = await tx.execute(
                f"SELECT * FROM proposals {w.sql} ORDER BY created_at DESC LIMIT ?",
                (*w.params, limit),
            )
        return [self._proposal(r) for r in rows]

    async def transition_proposal(
        self,
        proposal_id: str,
        to: ProposalStatus,
        *,
        expected: Iterable[ProposalStatus],
        decided_by: str | None = None,
        risk: str | None = None,
        dry_run: str | None = None,
    ) -> Proposal | None:
        """Compare-and-set the status (``expected`` → ``to``); None when the proposal is not
        in an expected status (e.g. two approvers raced, or it expired)."""
        now = time.time()
        exp = list(expected)
        sets = ["status = ?", "updated_at = ?"]
        params: list[Any] = [to, now]
        if to in ("approved", "rejected", "refused", "expired"):
            sets.append("decided_at = ?")
            params.append(now)
        if decided_by is not None:
            sets.append("decided_by = ?")
            params.append(decided_by)
        if risk is not None:
            sets.append("risk = ?")
            params.append(risk)
        if dry_run is not None:
            sets.append("dry_run = ?")
            params.append(dry_run)
        async with self.tx() as tx:
            rows = await tx.execute(
                f"UPDATE proposals SET {', '.join(sets)} WHERE id = ? "
                f"AND status IN ({','.join('?' * len(exp))}) RETURNING *",
                (*params, proposal_id, *exp),
            )
        return self._proposal(rows[0]) if rows else None

    async def record_action_result(
        self,
        proposal_id: str,
        status: ProposalStatus,
        result: ActionResult,
    ) -> Proposal | None:
        """Store the outcome of a run (``running`` → succeeded | failed)."""
        async with self.tx() as tx:
            rows = await tx.execute(
                "UPDATE proposals SET status = ?, exit_code = ?, output = ?, duration = ?,"
                " updated_at = ? WHERE id = ? AND status = 'running' RETURNING *",
                (status, result.exit_code, result.output, result.duration, time.time(),
                 proposal_id),
            )
            if rows and rows[0]["incident_id"]:
                await self._timeline(
                    tx,
                    rows[0]["incident_id"],
                    "action",
                    {"proposal": proposal_id, "action": rows[0]["action"], "status": status,
                     "exit_code": result.exit_code},
                    time.time(),
                )
            if rows:
                await self._notify_action(tx, rows[0], status, key=f"action.result:{proposal_id}")
        return self._proposal(rows[0]) if rows else None

    async def claim_proposal(self, host: str, owner: str, lease: float) -> Proposal | None:
        """An agent takes the oldest approved action for its ``host``: ``approved`` →
        ``running`` under a lease, in one statement (two agents, or two gateways, never get
        the same one)."""
        now = time.time()
        # PostgreSQL: a row another gateway is claiming is skipped, not waited for (SQLite
        # writes one transaction at a time: the status check suffices).
        skip = " FOR UPDATE SKIP LOCKED" if self.dialect == "postgres" else ""
        async with self.tx() as tx:
            rows = await tx.execute(
                "UPDATE proposals SET status = 'running', lease_owner = ?, lease_until = ?,"
                " updated_at = ? WHERE id = (SELECT id FROM proposals WHERE host = ? AND"
                f" status = 'approved' ORDER BY decided_at, created_at LIMIT 1{skip})"
                " AND status = 'approved' RETURNING *",
                (owner, now + lease, now, host),
            )
        return self._proposal(rows[0]) if rows else None

    async def lease_owner(self, proposal_id: str) -> tuple[str | None, float | None]:
        async with self.tx() as tx:
            rows = await tx.execute(
                "SELECT lease_owner, lease_until FROM proposals WHERE id = ?", (proposal_id,))
        return (rows[0]["lease_owner"], rows[0]["lease_until"]) if rows else (None, None)

    async def expire_dispatch(self, *, local: Sequence[str], dispatch_ttl: float,
                              now: float | None = None) -> list[Proposal]:
        """Actions for other hosts that no agent took in time (approved → expired), and
        those whose agent's lease ran out before it reported (running → failed: it may
        have run; never run twice)."""
        now = time.time() if now is None else now
        marks = ",".join("?" * len(local))
        async with self.tx() as tx:
            late = await tx.execute(
                "UPDATE proposals SET status = 'expired', updated_at = ? WHERE status ="
                f" 'approved' AND host IS NOT NULL AND host NOT IN ({marks}) AND"
                " decided_at IS NOT NULL AND decided_at < ? RETURNING *",
                (now, *local, now - dispatch_ttl),
            )
            lost = await tx.execute(
                "UPDATE proposals SET status = 'failed', output = ?, updated_at = ? WHERE"
                " status = 'running' AND lease_until IS NOT NULL AND lease_until < ?"
                " RETURNING *",
                ("lease_expired: the agent did not report in time; the outcome is unknown",
                 now, now),
            )
        return [self._proposal(r) for r in (*late, *lost)]

    async def expire_proposals(self, now: float | None = None) -> list[Proposal]:
        now = time.time() if now is None else now
        async with self.tx() as tx:
            rows = await tx.execute(
                "UPDATE proposals SET status = 'expired', decided_at = ?, updated_at = ? "
                "WHERE status = 'pending' AND expires_at IS NOT NULL AND expires_at < ? "
                "RETURNING *",
                (now, now, now),
            )
        return [self._proposal(r) for r in rows]

    async def count_runs(
        self, *, since: float, action: str | None = None, unit: str | None = None
    ) -> int:
        """Runs started since ``since`` (status running/succeeded/failed), for rate limits."""
        w = (Where("status IN ('running','succeeded','failed')", "updated_at >= ?",
                   params=[since]).eq("action", action).eq("unit", unit))
        async with self.tx() as tx:
            rows = await tx.execute(f"SELECT COUNT(*) AS n FROM proposals {w.sql}", w.params)
        return int(rows[0]["n"])

    # -- audit log (append-only) -----------------------------------------------------

    async def append_audit(
        self, actor: str, kind: str, subject: str, detail: dict[str, Any] | None = None
    ) -> AuditEntry:
        async with self.tx() as tx:
            rows = await tx.execute(
                "INSERT INTO audit (ts, actor, kind, subject, detail) VALUES (?,?,?,?,?) "
                "RETURNING *",
                (time.time(), actor, kind, subject, _dump(detail or {})),
            )
        return self._audit(rows[0])

    async def list_audit(
        self,
        *,
        after: int = 0,
        kind: str | None = None,
        subject: str | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        w = Where("seq > ?", params=[after]).eq("kind", kind).eq("subject", subject)
        async with self.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM audit {w.sql} ORDER BY seq LIMIT ?",
                                    (*w.params, limit))
        return [self._audit(r) for r in rows]

    # -- cursors (journald cursor, stream consumers) ------------------------------------

    async def get_cursor(self, name: str) -> str | None:
        async with self.tx() as tx:
            rows = await tx.execute("SELECT value FROM cursors WHERE name = ?", (name,))
        return str(rows[0]["value"]) if rows else None

    async def set_cursor(self, name: str, value: str) -> None:
        async with self.tx() as tx:
            await tx.execute(
                "INSERT INTO cursors (name, value, updated_at) VALUES (?,?,?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                (name, value, time.time()),
            )

    # -- retention ---------------------------------------------------------------------

    async def apply_retention(self, days: float, now: float | None = None) -> dict[str, int]:
        """Delete events and verdicts older than ``days`` that no work is owed on, and
        resolved incidents with their timelines. Proposals and the audit log are kept."""
        cutoff = (time.time() if now is None else now) - days * 86400.0
        out: dict[str, int] = {}
        async with self.tx() as tx:
            rows = await tx.execute(
                "DELETE FROM events WHERE received_at < ? AND state IN ('dropped','classified') "
                "RETURNING id",
                (cutoff,),
            )
            out["events"] = len(rows)
            await self._forget_event_ids(tx, [r["id"] for r in rows])
            rows = await tx.execute(
                "DELETE FROM verdicts WHERE created_at < ? RETURNING seq", (cutoff,)
            )
            out["verdicts"] = len(rows)
            old = await tx.execute(
                "DELETE FROM incidents WHERE status = 'resolved' AND stage = 'idle' "
                "AND updated_at < ? RETURNING id",
                (cutoff,),
            )
            out["incidents"] = len(old)
            for chunk in _chunks([r["id"] for r in old], 500):
                await tx.execute(
                    f"DELETE FROM timeline WHERE incident_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
        return out

    async def _forget_event_ids(self, tx: Tx, ids: list[str]) -> None:  # noqa: B027
        """Backends with a separate idempotency table drop retained-away ids from it."""

    # -- notification outbox ------------------------------------------------------------
    #
    # ``notifications`` holds what to tell (layers/notify/facts.py), written in the
    # transaction of the fact itself; the gateway's delivery worker routes each one to
    # the channels that want it (``notification_deliveries``, one row per channel) and
    # delivers those at least once, with retries (layers/notify/worker.py).

    # Called when a notification is written (the gateway's worker wakes itself with it);
    # notifications of other processes sharing the store are found by polling.
    outbox_wakeup: Callable[[], None] | None = None

    async def _notify(
        self, tx: Tx, kind: str, subject: str, severity: str, detail: dict[str, Any],
        now: float, *, key: str | None = None,
    ) -> None:
        """Put a notification in the outbox within ``tx``; a ``key`` already there is kept."""
        await tx.execute(
            "INSERT INTO notifications (id, kind, subject, severity, severity_rank, detail,"
            " created_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT (id) DO NOTHING",
            (key or new_id("ntf"), kind, subject, severity, SEVERITY_RANK[severity],
             _dump(detail), now),
        )
        if self.outbox_wakeup is not None:
            self.outbox_wakeup()

    async def _notify_action(
        self, tx: Tx, row: Row, status: str, *, key: str, code: str | None = None,
        reason: str | None = None,
    ) -> None:
        """``approval.pending`` or ``action.<status>`` for a ``proposals`` row."""
        inc = None
        if row.get("incident_id"):
            found = await tx.execute(
                "SELECT id, title, host, unit, severity FROM incidents WHERE id = ?",
                (row["incident_id"],),
            )
            inc = found[0] if found else None
        p = {**row, "params": json.loads(row["params"]) if isinstance(row["params"], str)
             else row["params"]}
        severity = notice.action_severity(status, inc["severity"] if inc else None)
        if status == "pending":
            kind, detail = "approval.pending", notice.approval(p, inc, code=code, reason=reason)
        else:
            kind = f"action.{status}"
            detail = notice.action(p, inc, status=status, code=code, reason=reason)
        await self._notify(tx, kind, row["id"], severity, detail, time.time(), key=key)

    async def notify_proposal(
        self, proposal_id: str, status: str, *, code: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Notify ``approval.pending`` (``status="pending"``) or ``action.refused`` for a
        proposal the action stage just decided. Idempotent (keyed by proposal and kind):
        the worker's reconciliation may have written it already."""
        prefix = "approval.pending" if status == "pending" else f"action.{status}"
        async with self.tx() as tx:
            rows = await tx.execute("SELECT * FROM proposals WHERE id = ?", (proposal_id,))
            if rows:
                await self._notify_action(tx, rows[0], status, key=f"{prefix}:{proposal_id}",
                                          code=code, reason=reason)

    async def enqueue_notification(
        self, kind: str, subject: str, severity: str, detail: dict[str, Any], *,
        key: str | None = None,
    ) -> None:
        async with self.tx() as tx:
            await self._notify(tx, kind, subject, severity, detail, time.time(), key=key)

    async def reconcile_notifications(self, *, settled_before: float,
                                      refused_since: float) -> int:
        """Write the notifications a crash kept the action stage from writing (it decides
        in transactions of its own, then notifies): screened pending proposals without
        ``approval.pending``, and refusals since ``refused_since`` without
        ``action.refused``. Only proposals untouched since ``settled_before`` (the stage
        is done with them). Returns how many were written."""
        async with self.tx() as tx:
            pending = await tx.execute(
                "SELECT p.* FROM proposals p LEFT JOIN notifications n "
                "ON n.id = 'approval.pending:' || p.id WHERE p.status = 'pending' "
                "AND p.dry_run IS NOT NULL AND p.updated_at < ? AND n.id IS NULL "
                "AND (p.expires_at IS NULL OR p.expires_at > ?) LIMIT 100",
                (settled_before, time.time()),
            )
            refused = await tx.execute(
                "SELECT p.* FROM proposals p LEFT JOIN notifications n "
                "ON n.id = 'action.refused:' || p.id WHERE p.status = 'refused' "
                "AND p.updated_at < ? AND p.updated_at >= ? AND n.id IS NULL LIMIT 100",
                (settled_before, refused_since),
            )
            for row in pending:
                await self._notify_action(tx, row, "pending", key=f"approval.pending:{row['id']}")
            for row in refused:
                why = await tx.execute(
                    "SELECT detail FROM audit WHERE subject = ? AND kind = 'refused' "
                    "ORDER BY seq DESC LIMIT 1", (row["id"],),
                )
                d = json.loads(why[0]["detail"]) if why else {}
                await self._notify_action(tx, row, "refused", key=f"action.refused:{row['id']}",
                                          code=d.get("code"), reason=d.get("reason"))
        return len(pending) + len(refused)

    async def unrouted_notifications(self, limit: int = 100) -> list[OutboxNotification]:
        async with self.tx() as tx:
            rows = await tx.execute(
                "SELECT * FROM notifications WHERE routed_at IS NULL ORDER BY seq LIMIT ?",
                (limit,),
            )
        return [self._notification(r) for r in rows]

    async def delivery_history(
        self, channel: str, dedupe_key: str, *, dedupe_since: float, rate_since: float
    ) -> DeliveryHistory:
        """What a channel already has, for de-duplication and its rate limit."""
        async with self.tx() as tx:
            dup = await tx.execute(
                "SELECT MAX(severity_rank) AS r FROM notification_deliveries WHERE channel = ? "
                "AND dedupe_key = ? AND state <> 'dropped' AND created_at >= ?",
                (channel, dedupe_key, dedupe_since),
            )
            sent = await tx.execute(
                "SELECT COUNT(*) AS n FROM notification_deliveries WHERE channel = ? "
                "AND state <> 'dropped' AND created_at >= ?",
                (channel, rate_since),
            )
            last = await tx.execute(
                "SELECT MAX(created_at) AS t FROM notification_deliveries WHERE channel = ? "
                "AND state <> 'dropped'",
                (channel,),
            )
            limited = await tx.execute(
                "SELECT COUNT(*) AS n FROM notification_deliveries WHERE channel = ? "
                "AND reason = 'rate_limited' AND created_at >= ?",
                (channel, last[0]["t"] or 0.0),
            )
        rank = dup[0]["r"]
        return DeliveryHistory(
            duplicate_rank=None if rank is None else int(rank), sent=int(sent[0]["n"]),
            rate_limited_since_last=int(limited[0]["n"]),
        )

    async def route_notification(self, notification_id: str,
                                 plans: Sequence[DeliveryPlan]) -> bool:
        """Record where a notification goes (one delivery per channel) and mark it routed,
        in one transaction; False when it was routed already (another worker)."""
        now = time.time()
        async with self.tx() as tx:
            rows = await tx.execute(
                "UPDATE notifications SET routed_at = ? WHERE id = ? AND routed_at IS NULL "
                "RETURNING id",
                (now, notification_id),
            )
            if not rows:
                return False
            for p in plans:
                await tx.execute(
                    "INSERT INTO notification_deliveries (notification_id, channel, dedupe_key,"
                    " severity_rank, state, reason, suppressed, attempts, next_at, created_at,"
                    " updated_at) VALUES (?,?,?,?,?,?,?,0,?,?,?) "
                    "ON CONFLICT (notification_id, channel) DO NOTHING",
                    (notification_id, p.channel, p.dedupe_key, p.severity_rank,
                     "dropped" if p.dropped else "pending", p.reason, p.suppressed,
                     p.not_before or now, now, now),
                )
        return True

    async def claim_deliveries(self, now: float, lease_until: float,
                               limit: int = 50) -> list[OutboxDelivery]:
        """Due deliveries, leased until ``lease_until`` (a worker that dies mid-send leaves
        them due again then: at least once), oldest first, with their notification."""
        async with self.tx() as tx:
            rows = await tx.execute(
                "UPDATE notification_deliveries SET next_at = ?, updated_at = ? WHERE seq IN "
                "(SELECT seq FROM notification_deliveries WHERE state = 'pending' AND "
                "next_at <= ? ORDER BY next_at, seq LIMIT ?) AND state = 'pending' AND "
                "next_at <= ? RETURNING *",
                (lease_until, now, now, limit, now),
            )
            ids = sorted({r["notification_id"] for r in rows})
            notes: dict[str, OutboxNotification] = {}
            for chunk in _chunks(ids, 500):
                found = await tx.execute(
                    f"SELECT * FROM notifications WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                notes.update({r["id"]: self._notification(r) for r in found})
        out = [
            OutboxDelivery(seq=r["seq"], channel=r["channel"], attempts=r["attempts"],
                           suppressed=r["suppressed"], created_at=r["created_at"],
                           notification=notes[r["notification_id"]])
            for r in rows if r["notification_id"] in notes
        ]
        return sorted(out, key=lambda d: d.seq)

    async def delivery_done(self, seq: int) -> None:
        now = time.time()
        async with self.tx() as tx:
            await tx.execute(
                "UPDATE notification_deliveries SET state = 'delivered', attempts = attempts + 1,"
                " delivered_at = ?, updated_at = ? WHERE seq = ? "
                "AND state = 'pending'",
                (now, now, seq),
            )

    async def delivery_failed(self, seq: int, error: str, *, retry_at: float | None,
                              attempted: bool = True) -> None:
        """A failed attempt: due again at ``retry_at``, or ``failed`` for good when None.
        ``attempted=False`` puts back a claimed delivery that was not tried (its channel
        failed just before)."""
        now = time.time()
        async with self.tx() as tx:
            await tx.execute(
                "UPDATE notification_deliveries SET state = ?, attempts = attempts + ?,"
                " next_at = ?, last_error = ?, updated_at = ? WHERE seq = ? AND state = 'pending'",
                ("pending" if retry_at is not None else "failed", int(attempted),
                 retry_at if retry_at is not None else now, error[:500], now, seq),
            )

    async def notification_stats(self) -> dict[str, dict[str, Any]]:
        """Per channel: deliveries by state, the last delivery and the last error."""
        async with self.tx() as tx:
            counts = await tx.execute(
                "SELECT channel, state, COUNT(*) AS n, MAX(delivered_at) AS last "
                "FROM notification_deliveries GROUP BY channel, state"
            )
            errors = await tx.execute(
                "SELECT d.channel, d.last_error, d.updated_at FROM notification_deliveries d "
                "WHERE d.last_error IS NOT NULL AND d.seq = (SELECT MAX(seq) FROM "
                "notification_deliveries e WHERE e.channel = d.channel AND "
                "e.last_error IS NOT NULL)"
            )
        out: dict[str, dict[str, Any]] = {}
        for r in counts:
            ch = out.setdefault(r["channel"], {"pending": 0, "delivered": 0, "failed": 0,
                                               "dropped": 0, "last_delivered_at": None,
                                               "last_error": None, "last_error_at": None})
            ch[r["state"]] = int(r["n"])
            if r["state"] == "delivered":
                ch["last_delivered_at"] = r["last"]
        for r in errors:
            if r["channel"] in out:
                out[r["channel"]]["last_error"] = r["last_error"]
                out[r["channel"]]["last_error_at"] = r["updated_at"]
        return out

    async def recent_notifications(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest notifications, each with its deliveries (channel, state, attempts)."""
        async with self.tx() as tx:
            rows = await tx.execute(
                "SELECT * FROM notifications ORDER BY seq DESC LIMIT ?", (limit,)
            )
            ids = [r["id"] for r in rows]
            deliveries: list[Row] = []
            for chunk in _chunks(ids, 500):
                deliveries += await tx.execute(
                    "SELECT notification_id, channel, state, reason, attempts, next_at,"
                    " last_error, delivered_at FROM notification_deliveries WHERE "
                    f"notification_id IN ({','.join('?' * len(chunk))}) ORDER BY seq",
                    chunk,
                )
        by_id: dict[str, list[Row]] = {}
        for d in deliveries:
            by_id.setdefault(d.pop("notification_id"), []).append(d)
        return [
            {**self._notification(r).as_dict(), "deliveries": by_id.get(r["id"], [])}
            for r in rows
        ]

    async def prune_notifications(self, older_than: float) -> int:
        """Forget notifications created before ``older_than`` with their deliveries."""
        async with self.tx() as tx:
            old = await tx.execute(
                "DELETE FROM notifications WHERE created_at < ? RETURNING id", (older_than,)
            )
            for chunk in _chunks([r["id"] for r in old], 500):
                await tx.execute(
                    "DELETE FROM notification_deliveries WHERE notification_id IN "
                    f"({','.join('?' * len(chunk))})",
                    chunk,
                )
        return len(old)

    @staticmethod
    def _notification(r: Row) -> OutboxNotification:
        return OutboxNotification(
            id=r["id"], kind=r["kind"], subject=r["subject"], severity=r["severity"],
            detail=json.loads(r["detail"]), created_at=r["created_at"],
            routed_at=r["routed_at"],
        )

    # -- row mapping -----------------------------------------------------------------

    @staticmethod
    def _event(r: Row) -> StoredEvent:
        return StoredEvent(
            id=r["id"], host=r["host"], source=r["source"], unit=r["unit"],
            priority=r["priority"], message=r["message"], fields=json.loads(r["fields"]),
            timestamp=r["ts"], seq=r["seq"], received_at=r["received_at"], state=r["state"],
            fingerprint=r["fingerprint"], rule=r["rule"],
        )

    @staticmethod
    def _verdict(r: Row) -> Verdict:
        return Verdict(
            seq=r["seq"], event_id=r["event_id"], incident_id=r["incident_id"], host=r["host"],
            unit=r["unit"], fingerprint=r["fingerprint"], rule=r["rule"],
            anomaly=bool(r["anomaly"]), severity=r["severity"], category=r["category"],
            summary=r["summary"], message=r["message"], unreviewed=bool(r["unreviewed"]),
            created_at=r["created_at"],
        )

    @staticmethod
    def _incident(r: Row) -> Incident:
        return Incident(
            id=r["id"], key=r["key"], host=r["host"], unit=r["unit"],
            fingerprint=r["fingerprint"], title=r["title"], category=r.get("category"),
            rule=r.get("rule"), status=r["status"],
            stage=r["stage"], severity=r["severity"], verdict_count=r["verdict_count"],
            opened_at=r["opened_at"], updated_at=r["updated_at"], resolved_at=r["resolved_at"],
            review=Review.model_validate_json(r["review"]) if r["review"] else None,
            decision=Decision.model_validate_json(r["decision"]) if r["decision"] else None,
        )

    @staticmethod
    def _proposal(r: Row) -> Proposal:
        result = None
        if r["exit_code"] is not None or r["output"] is not None:
            result = ActionResult(
                exit_code=r["exit_code"], output=r["output"] or "", duration=r["duration"] or 0.0
            )
        return Proposal(
            id=r["id"], incident_id=r["incident_id"], action=r["action"],
            params=json.loads(r["params"]), rationale=r["rationale"], status=r["status"],
            risk=r["risk"], dry_run=r["dry_run"], created_at=r["created_at"],
            decided_at=r["decided_at"], expires_at=r["expires_at"], decided_by=r["decided_by"],
            result=result, merge_count=r["merge_count"], host=r["host"],
        )

    @staticmethod
    def _audit(r: Row) -> AuditEntry:
        return AuditEntry(
            seq=r["seq"], ts=r["ts"], actor=r["actor"], kind=r["kind"], subject=r["subject"],
            detail=json.loads(r["detail"]),
        )


class Where:
    """A WHERE clause built from optional filters: each condition skipped when its value
    is None (or an empty list), values always passed as parameters, never in the SQL."""

    def __init__(self, *fixed: str, params: Sequence[Any] = ()) -> None:
        self.clauses: list[str] = list(fixed)
        self.params: list[Any] = list(params)

    def eq(self, column: str, value: Any) -> Where:
        if value is not None:
            self.clauses.append(f"{column} = ?")
            self.params.append(value)
        return self

    def at_least(self, column: str, value: Any) -> Where:
        if value is not None:
            self.clauses.append(f"{column} >= ?")
            self.params.append(value)
        return self

    def among(self, column: str, values: Sequence[Any] | None) -> Where:
        if values:
            self.clauses.append(f"{column} IN ({','.join('?' * len(values))})")
            self.params.extend(values)
        return self

    def when(self, flag: bool, clause: str) -> Where:
        if flag:
            self.clauses.append(clause)
        return self

    @property
    def sql(self) -> str:
        return "WHERE " + " AND ".join(self.clauses) if self.clauses else ""


def _chunks(items: Sequence[Any], n: int) -> list[list[Any]]:
    return [list(items[i : i + n]) for i in range(0, len(items), n)]

"""The verdicts aggregate: the trigger's verdict on each candidate event.

Recording verdicts also classifies their events and groups anomalies into incidents,
in one transaction (``Incidents.group``), so a repeated batch stores nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layers.events import SEVERITY_RANK, Severity, StoredEvent, Verdict
from layers.store.sql import Row, Where

if TYPE_CHECKING:
    from layers.store.base import Store


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
    # The labelled example this verdict follows (layers/pipeline/examples.py), if any.
    example: str | None = None


def to_verdict(r: Row) -> Verdict:
    return Verdict(
        seq=r["seq"], event_id=r["event_id"], incident_id=r["incident_id"], host=r["host"],
        unit=r["unit"], fingerprint=r["fingerprint"], rule=r["rule"],
        anomaly=bool(r["anomaly"]), severity=r["severity"], category=r["category"],
        summary=r["summary"], message=r["message"], unreviewed=bool(r["unreviewed"]),
        example=r["example"],
        created_at=r["created_at"],
    )


class Verdicts:
    """``store.verdicts``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def record(self, items: Sequence[VerdictInput]) -> list[Verdict]:
        """Store verdicts for candidate events, group anomalies into incidents and mark the
        events classified — all in one transaction. Events already classified are skipped,
        so a repeated batch (after a crash) stores nothing twice."""
        now = time.time()
        stored: list[Verdict] = []
        incidents = self.store.incidents
        async with self.store.tx() as tx:
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
                    incident_id = await incidents.group(tx, ev, item, fingerprint, now)
                    await self.store.signal(tx, "incidents")
                rows = await tx.execute(
                    "INSERT INTO verdicts (event_id, incident_id, host, unit, fingerprint, rule,"
                    " anomaly, severity, severity_rank, category, summary, message, unreviewed,"
                    " example, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING *",
                    (
                        ev.id, incident_id, ev.host, ev.unit, fingerprint, ev.rule,
                        int(item.anomaly), item.severity, SEVERITY_RANK[item.severity],
                        item.category, item.summary, ev.message, int(item.unreviewed),
                        item.example, now,
                    ),
                )
                verdict = to_verdict(rows[0])
                stored.append(verdict)
                if incident_id is not None:
                    await incidents.timeline(
                        tx, incident_id, "verdict", verdict.model_dump(exclude={"message"}), now
                    )
                    await incidents.timeline(
                        tx,
                        incident_id,
                        "event",
                        {"id": ev.id, "ts": ev.timestamp, "unit": ev.unit, "message": ev.message},
                        now,
                    )
        return stored

    async def after(
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
        async with self.store.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM verdicts {w.sql} ORDER BY seq LIMIT ?",
                                    (*w.params, limit))
        return [to_verdict(r) for r in rows]

    async def recent(self, limit: int = 20, *, anomalies_only: bool = True) -> list[Verdict]:
        w = Where().when(anomalies_only, "anomaly = 1")
        async with self.store.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM verdicts {w.sql} ORDER BY seq DESC LIMIT ?",
                                    (*w.params, limit))
        return [to_verdict(r) for r in rows]

    async def of_incident(self, incident_id: str, limit: int = 20) -> list[Verdict]:
        w = Where().eq("incident_id", incident_id)
        async with self.store.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM verdicts {w.sql} ORDER BY seq DESC LIMIT ?",
                                    (*w.params, limit))
        return [to_verdict(r) for r in reversed(rows)]

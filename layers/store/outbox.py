"""The notification outbox: what to tell, written in the transaction of the fact itself.

``notifications`` holds what to tell (layers/notify/facts.py); the gateway's delivery
worker routes each one to the channels that want it (``notification_deliveries``, one
row per channel) and delivers those at least once, with retries (layers/notify/worker.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from layers.events import SEVERITY_RANK, Severity, new_id
from layers.notify import facts as notice
from layers.store.sql import Row, Tx, chunks, dump, marks

if TYPE_CHECKING:
    from layers.store.base import Store


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


def to_notification(r: Row) -> OutboxNotification:
    return OutboxNotification(
        id=r["id"], kind=r["kind"], subject=r["subject"], severity=r["severity"],
        detail=json.loads(r["detail"]), created_at=r["created_at"],
        routed_at=r["routed_at"],
    )


class Outbox:
    """``store.outbox``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def put(
        self, tx: Tx, kind: str, subject: str, severity: str, detail: dict[str, Any],
        now: float, *, key: str | None = None,
    ) -> None:
        """Put a notification in the outbox within ``tx``; a ``key`` already there is kept."""
        await tx.execute(
            "INSERT INTO notifications (id, kind, subject, severity, severity_rank, detail,"
            " created_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT (id) DO NOTHING",
            (key or new_id("ntf"), kind, subject, severity, SEVERITY_RANK[severity],
             dump(detail), now),
        )
        await self.store.signal(tx, "outbox")

    async def put_action(
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
        await self.put(tx, kind, row["id"], severity, detail, time.time(), key=key)

    async def notify_proposal(
        self, proposal_id: str, status: str, *, code: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Notify ``approval.pending`` (``status="pending"``) or ``action.refused`` for a
        proposal the action stage just decided. Idempotent (keyed by proposal and kind):
        the worker's reconciliation may have written it already."""
        prefix = "approval.pending" if status == "pending" else f"action.{status}"
        async with self.store.tx() as tx:
            rows = await tx.execute("SELECT * FROM proposals WHERE id = ?", (proposal_id,))
            if rows:
                await self.put_action(tx, rows[0], status, key=f"{prefix}:{proposal_id}",
                                          code=code, reason=reason)

    async def enqueue(
        self, kind: str, subject: str, severity: str, detail: dict[str, Any], *,
        key: str | None = None,
    ) -> None:
        async with self.store.tx() as tx:
            await self.put(tx, kind, subject, severity, detail, time.time(), key=key)

    async def reconcile(self, *, settled_before: float, refused_since: float) -> int:
        """Write the notifications a crash kept the action stage from writing (it decides
        in transactions of its own, then notifies): screened pending proposals without
        ``approval.pending``, and refusals since ``refused_since`` without
        ``action.refused``. Only proposals untouched since ``settled_before`` (the stage
        is done with them). Returns how many were written."""
        async with self.store.tx() as tx:
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
                await self.put_action(tx, row, "pending", key=f"approval.pending:{row['id']}")
            for row in refused:
                why = await tx.execute(
                    "SELECT detail FROM audit WHERE subject = ? AND kind = 'refused' "
                    "ORDER BY seq DESC LIMIT 1", (row["id"],),
                )
                d = json.loads(why[0]["detail"]) if why else {}
                await self.put_action(tx, row, "refused", key=f"action.refused:{row['id']}",
                                          code=d.get("code"), reason=d.get("reason"))
        return len(pending) + len(refused)

    async def unrouted(self, limit: int = 100) -> list[OutboxNotification]:
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "SELECT * FROM notifications WHERE routed_at IS NULL ORDER BY seq LIMIT ?",
                (limit,),
            )
        return [to_notification(r) for r in rows]

    async def delivery_history(
        self, channel: str, dedupe_key: str, *, dedupe_since: float, rate_since: float
    ) -> DeliveryHistory:
        """What a channel already has, for de-duplication and its rate limit."""
        async with self.store.tx() as tx:
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

    async def route(self, notification_id: str, plans: Sequence[DeliveryPlan]) -> bool:
        """Record where a notification goes (one delivery per channel) and mark it routed,
        in one transaction; False when it was routed already (another worker)."""
        now = time.time()
        async with self.store.tx() as tx:
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
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "UPDATE notification_deliveries SET next_at = ?, updated_at = ? WHERE seq IN "
                "(SELECT seq FROM notification_deliveries WHERE state = 'pending' AND "
                "next_at <= ? ORDER BY next_at, seq LIMIT ?) AND state = 'pending' AND "
                "next_at <= ? RETURNING *",
                (lease_until, now, now, limit, now),
            )
            ids = sorted({r["notification_id"] for r in rows})
            notes: dict[str, OutboxNotification] = {}
            for chunk in chunks(ids, 500):
                found = await tx.execute(
                    f"SELECT * FROM notifications WHERE id IN ({marks(len(chunk))})",
                    chunk,
                )
                notes.update({r["id"]: to_notification(r) for r in found})
        out = [
            OutboxDelivery(seq=r["seq"], channel=r["channel"], attempts=r["attempts"],
                           suppressed=r["suppressed"], created_at=r["created_at"],
                           notification=notes[r["notification_id"]])
            for r in rows if r["notification_id"] in notes
        ]
        return sorted(out, key=lambda d: d.seq)

    async def delivery_done(self, seq: int) -> None:
        now = time.time()
        async with self.store.tx() as tx:
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
        async with self.store.tx() as tx:
            await tx.execute(
                "UPDATE notification_deliveries SET state = ?, attempts = attempts + ?,"
                " next_at = ?, last_error = ?, updated_at = ? WHERE seq = ? AND state = 'pending'",
                ("pending" if retry_at is not None else "failed", int(attempted),
                 retry_at if retry_at is not None else now, error[:500], now, seq),
            )

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Per channel: deliveries by state, the last delivery and the last error."""
        async with self.store.tx() as tx:
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

    async def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest notifications, each with its deliveries (channel, state, attempts)."""
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "SELECT * FROM notifications ORDER BY seq DESC LIMIT ?", (limit,)
            )
            ids = [r["id"] for r in rows]
            deliveries: list[Row] = []
            for chunk in chunks(ids, 500):
                deliveries += await tx.execute(
                    "SELECT notification_id, channel, state, reason, attempts, next_at,"
                    " last_error, delivered_at FROM notification_deliveries WHERE "
                    f"notification_id IN ({marks(len(chunk))}) ORDER BY seq",
                    chunk,
                )
        by_id: dict[str, list[Row]] = {}
        for d in deliveries:
            by_id.setdefault(d.pop("notification_id"), []).append(d)
        return [
            {**to_notification(r).as_dict(), "deliveries": by_id.get(r["id"], [])}
            for r in rows
        ]

    async def prune(self, older_than: float) -> int:
        """Forget notifications created before ``older_than`` with their deliveries."""
        async with self.store.tx() as tx:
            old = await tx.execute(
                "DELETE FROM notifications WHERE created_at < ? RETURNING id", (older_than,)
            )
            for chunk in chunks([r["id"] for r in old], 500):
                await tx.execute(
                    "DELETE FROM notification_deliveries WHERE notification_id IN "
                    f"({marks(len(chunk))})",
                    chunk,
                )
        return len(old)

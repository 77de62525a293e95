"""The events aggregate: intake (idempotent by id) and the prefilter/trigger queue.

An event's ``state`` (new → dropped | candidate → classified) says what work is still
owed on it; ``claim`` leases events in a state to one worker at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layers.events import Event, StoredEvent
from layers.store.sql import Row, Where, chunks, marks

if TYPE_CHECKING:
    from layers.store.base import Store


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


def to_event(r: Row) -> StoredEvent:
    return StoredEvent(
        id=r["id"], host=r["host"], source=r["source"], unit=r["unit"],
        priority=r["priority"], message=r["message"], fields=json.loads(r["fields"]),
        timestamp=r["ts"], seq=r["seq"], received_at=r["received_at"], state=r["state"],
        fingerprint=r["fingerprint"], rule=r["rule"],
    )


class Events:
    """``store.events``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, events: Sequence[Event]) -> AddResult:
        """Store events (idempotent by id); committed when this returns."""
        now = time.time()
        unique: dict[str, Event] = {}
        for e in events:
            unique.setdefault(e.id, e)
        async with self.store.tx() as tx:
            inserted = await self.store._insert_events(tx, list(unique.values()), now)
            if inserted:
                await self.store.signal(tx, "events")
        accepted = set(inserted)
        return AddResult(
            accepted=[i for i in unique if i in accepted],
            duplicates=[e.id for e in events if e.id not in accepted],
        )

    async def claim(self, state: str, limit: int = 500) -> list[StoredEvent]:
        """Up to ``limit`` events in ``state``, oldest first, leased to this worker for
        ``work_lease`` seconds: several gateways (or daemons) on one store each take
        different events, and a dead one's are taken over when its lease runs out. This
        worker's own leases are its to take again (work it left after a failure); they
        are only written again when half their time is gone, so a worker waiting on a
        layer that is down does not rewrite its rows at every retry."""
        now = time.time()
        me = self.store.worker_id
        lease = self.store.work_lease
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "SELECT * FROM events WHERE state = ? AND (lease_until IS NULL OR"
                " lease_until < ? OR lease_owner = ? OR lease_state <> ?) ORDER BY seq LIMIT ?"
                f"{self.store._skip_locked()}",
                (state, now, me, state, limit),
            )
            renew = [r["seq"] for r in rows
                     if not (r["lease_owner"] == me and r["lease_state"] == state
                             and (r["lease_until"] or 0.0) > now + lease / 2)]
            for chunk in chunks(renew):
                await tx.execute(
                    "UPDATE events SET lease_owner = ?, lease_state = ?, lease_until = ? WHERE"
                    f" seq IN ({marks(len(chunk))})",
                    (me, state, now + lease, *chunk),
                )
        return [to_event(r) for r in rows]

    async def in_state(self, state: str, limit: int = 500) -> list[StoredEvent]:
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "SELECT * FROM events WHERE state = ? ORDER BY seq LIMIT ?", (state, limit)
            )
        return [to_event(r) for r in rows]

    async def get(self, ids: Sequence[str]) -> list[StoredEvent]:
        if not ids:
            return []
        async with self.store.tx() as tx:
            rows = await tx.execute(
                f"SELECT * FROM events WHERE id IN ({marks(len(ids))}) ORDER BY seq", ids
            )
        return [to_event(r) for r in rows]

    async def mark_prefiltered(self, decisions: Sequence[Prefiltered]) -> int:
        """Record the prefilter's decisions for events still ``new``; returns rows changed."""
        dropped = [d.seq for d in decisions if not d.keep]
        kept = [d for d in decisions if d.keep]
        changed = 0
        async with self.store.tx() as tx:
            for chunk in chunks(dropped):
                rows = await tx.execute(
                    "UPDATE events SET state = 'dropped' WHERE state = 'new' AND seq IN"
                    f" ({marks(len(chunk))}) RETURNING seq",
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
                if rows:
                    await self.store.signal(tx, "events")  # a candidate to classify
        return changed

    async def counts(self) -> dict[str, int]:
        async with self.store.tx() as tx:
            rows = await tx.execute("SELECT state, COUNT(*) AS n FROM events GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    async def recent(
        self, *, host: str | None = None, unit: str | None = None, limit: int = 20
    ) -> list[StoredEvent]:
        w = Where().eq("host", host).eq("unit", unit)
        async with self.store.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM events {w.sql} ORDER BY seq DESC LIMIT ?",
                                    (*w.params, limit))
        return [to_event(r) for r in reversed(rows)]

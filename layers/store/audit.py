"""The audit aggregate: an append-only log of who did what (approvals, runs, host keys)."""

from __future__ import annotations

import builtins
import json
import time
from typing import TYPE_CHECKING, Any

from layers.events import AuditEntry
from layers.store.sql import Row, Where, dump

if TYPE_CHECKING:
    from layers.store.base import Store


def to_audit(r: Row) -> AuditEntry:
    return AuditEntry(
        seq=r["seq"], ts=r["ts"], actor=r["actor"], kind=r["kind"], subject=r["subject"],
        detail=json.loads(r["detail"]),
    )


class Audit:
    """``store.audit``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def append(
        self, actor: str, kind: str, subject: str, detail: dict[str, Any] | None = None
    ) -> AuditEntry:
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "INSERT INTO audit (ts, actor, kind, subject, detail) VALUES (?,?,?,?,?) "
                "RETURNING *",
                (time.time(), actor, kind, subject, dump(detail or {})),
            )
        return to_audit(rows[0])

    async def list(
        self,
        *,
        after: int = 0,
        kind: str | None = None,
        subject: str | None = None,
        limit: int = 100,
    ) -> builtins.list[AuditEntry]:
        w = Where("seq > ?", params=[after]).eq("kind", kind).eq("subject", subject)
        async with self.store.tx() as tx:
            rows = await tx.execute(f"SELECT * FROM audit {w.sql} ORDER BY seq LIMIT ?",
                                    (*w.params, limit))
        return [to_audit(r) for r in rows]

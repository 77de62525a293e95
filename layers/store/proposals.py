"""The proposals aggregate: actions the meta layer (or an operator) proposed, their
approval state machine (compare-and-set transitions), the runs and their leases.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from layers.events import ActionResult, Proposal, ProposalStatus, new_id
from layers.store.sql import Row, Tx, Where, dump, marks

if TYPE_CHECKING:
    from layers.store.base import Store


def params_key(params: dict[str, Any]) -> str:
    # Equal params give equal text: a pending duplicate is found by it.
    return dump(params)


def to_proposal(r: Row) -> Proposal:
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


class Proposals:
    """``store.proposals`` (also the action policy's run history: :meth:`count_runs`)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(
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
        async with self.store.tx() as tx:
            return await self.insert(
                tx, incident_id, action, params, rationale, now=time.time(), status=status,
                risk=risk, dry_run=dry_run, expires_at=expires_at, host=host,
            )

    async def insert(
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
        """:meth:`add` within ``tx`` (the meta layer's decision stores its proposals so)."""
        key = params_key(params)
        if status == "pending":
            dup = await tx.execute(
                "UPDATE proposals SET merge_count = merge_count + 1, updated_at = ? "
                "WHERE id = (SELECT id FROM proposals WHERE action = ? AND params_key = ? "
                "AND status = 'pending' AND COALESCE(host, '') = ? ORDER BY created_at "
                "LIMIT 1) RETURNING *",
                (now, action, key, host or ""),
            )
            if dup:
                return to_proposal(dup[0])
        await self.store.signal(tx, "proposals")
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
        return to_proposal(rows[0])

    async def get(self, proposal_id: str) -> Proposal | None:
        async with self.store.tx() as tx:
            rows = await tx.execute("SELECT * FROM proposals WHERE id = ?", (proposal_id,))
        return to_proposal(rows[0]) if rows else None

    async def list(
        self,
        *,
        status: Sequence[ProposalStatus] | None = None,
        incident_id: str | None = None,
        host: str | None = None,
        limit: int = 100,
    ) -> builtins.list[Proposal]:
        w = Where().among("status", status).eq("incident_id", incident_id).eq("host", host)
        async with self.store.tx() as tx:
            rows = await tx.execute(
                f"SELECT * FROM proposals {w.sql} ORDER BY created_at DESC LIMIT ?",
                (*w.params, limit),
            )
        return [to_proposal(r) for r in rows]

    async def transition(
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
        exp = builtins.list(expected)
        sets = ["status = ?", "updated_at = ?"]
        params: builtins.list[Any] = [to, now]
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
        async with self.store.tx() as tx:
            rows = await tx.execute(
                f"UPDATE proposals SET {', '.join(sets)} WHERE id = ? "
                f"AND status IN ({marks(len(exp))}) RETURNING *",
                (*params, proposal_id, *exp),
            )
            if rows:
                await self.store.signal(tx, "proposals")  # approved: an agent may take it
        return to_proposal(rows[0]) if rows else None

    async def record_result(
        self,
        proposal_id: str,
        status: ProposalStatus,
        result: ActionResult,
    ) -> Proposal | None:
        """Store the outcome of a run (``running`` → succeeded | failed)."""
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "UPDATE proposals SET status = ?, exit_code = ?, output = ?, duration = ?,"
                " updated_at = ? WHERE id = ? AND status = 'running' RETURNING *",
                (status, result.exit_code, result.output, result.duration, time.time(),
                 proposal_id),
            )
            if rows and rows[0]["incident_id"]:
                await self.store.incidents.timeline(
                    tx,
                    rows[0]["incident_id"],
                    "action",
                    {"proposal": proposal_id, "action": rows[0]["action"], "status": status,
                     "exit_code": result.exit_code},
                    time.time(),
                )
            if rows:
                await self.store.outbox.put_action(tx, rows[0], status,
                                                   key=f"action.result:{proposal_id}")
        return to_proposal(rows[0]) if rows else None

    async def claim(self, host: str, owner: str, lease: float) -> Proposal | None:
        """An agent takes the oldest approved action for its ``host``: ``approved`` →
        ``running`` under a lease, in one statement (two agents, or two gateways, never get
        the same one)."""
        now = time.time()
        # PostgreSQL: a row another gateway is claiming is skipped, not waited for (SQLite
        # writes one transaction at a time: the status check suffices).
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "UPDATE proposals SET status = 'running', lease_owner = ?, lease_until = ?,"
                " updated_at = ? WHERE id = (SELECT id FROM proposals WHERE host = ? AND"
                " status = 'approved' ORDER BY decided_at, created_at"
                f" LIMIT 1{self.store._skip_locked()}) AND status = 'approved' RETURNING *",
                (owner, now + lease, now, host),
            )
        return to_proposal(rows[0]) if rows else None

    async def lease_owner(self, proposal_id: str) -> tuple[str | None, float | None]:
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "SELECT lease_owner, lease_until FROM proposals WHERE id = ?", (proposal_id,))
        return (rows[0]["lease_owner"], rows[0]["lease_until"]) if rows else (None, None)

    async def expire_dispatch(self, *, local: Sequence[str], dispatch_ttl: float,
                              now: float | None = None) -> builtins.list[Proposal]:
        """Actions for other hosts that no agent took in time (approved → expired), and
        those whose agent's lease ran out before it reported (running → failed: it may
        have run; never run twice)."""
        now = time.time() if now is None else now
        async with self.store.tx() as tx:
            late = await tx.execute(
                "UPDATE proposals SET status = 'expired', updated_at = ? WHERE status ="
                f" 'approved' AND host IS NOT NULL AND host NOT IN ({marks(len(local))}) AND"
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
        return [to_proposal(r) for r in (*late, *lost)]

    async def expire(self, now: float | None = None) -> builtins.list[Proposal]:
        now = time.time() if now is None else now
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "UPDATE proposals SET status = 'expired', decided_at = ?, updated_at = ? "
                "WHERE status = 'pending' AND expires_at IS NOT NULL AND expires_at < ? "
                "RETURNING *",
                (now, now, now),
            )
        return [to_proposal(r) for r in rows]

    async def count_runs(
        self, *, since: float, action: str | None = None, unit: str | None = None
    ) -> int:
        """Runs started since ``since`` (status running/succeeded/failed), for rate limits."""
        w = (Where("status IN ('running','succeeded','failed')", "updated_at >= ?",
                   params=[since]).eq("action", action).eq("unit", unit))
        async with self.store.tx() as tx:
            rows = await tx.execute(f"SELECT COUNT(*) AS n FROM proposals {w.sql}", w.params)
        return int(rows[0]["n"])

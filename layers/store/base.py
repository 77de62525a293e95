"""The store: one shared transaction type, and one class per aggregate over it.

``Store`` owns the connection, transactions, migrations and the dialect hooks; what is
stored lives in its aggregates, each in its own module with its row → model mapping:
``store.events`` (intake and the prefilter/trigger queue), ``store.verdicts``,
``store.incidents``, ``store.proposals`` (actions), ``store.audit``, ``store.cursors``,
``store.outbox`` (notifications) and ``store.hosts`` (fleet host keys). A write that
spans aggregates (a verdict opening an incident and a notification) runs in one
transaction: the aggregates' ``…(tx, …)`` methods take the caller's.

The store is also the pipeline's durable queue: an event's ``state`` (new → dropped |
candidate → classified) and an incident's ``stage`` (review → meta → remember → idle)
say what work is still owed. Every stage writes its result and advances the state in
one transaction, guarded by the state it expected, so a crash between a layer call and
the commit repeats the call but never stores its outcome twice.

SQL is written once with ``?`` placeholders; the PostgreSQL backend rewrites them.
"""

from __future__ import annotations

import abc
import os
import secrets
import socket
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

from layers.errors import Unavailable
from layers.events import Event
from layers.store.audit import Audit
from layers.store.cursors import Cursors
from layers.store.events import AddResult, Events, Prefiltered
from layers.store.hosts import Hosts
from layers.store.incidents import ACTIVE_INCIDENT_STATUSES, Incidents
from layers.store.outbox import (
    DeliveryHistory,
    DeliveryPlan,
    Outbox,
    OutboxDelivery,
    OutboxNotification,
)
from layers.store.proposals import Proposals
from layers.store.sql import Row, Tx, Where, chunks, marks
from layers.store.verdicts import VerdictInput, Verdicts
from layers.store.wakeups import Topic, Wakeups

__all__ = [
    "ACTIVE_INCIDENT_STATUSES",
    "INCIDENT_WINDOW",
    "MAX_SEQ",
    "WORK_LEASE",
    "AddResult",
    "DeliveryHistory",
    "DeliveryPlan",
    "OutboxDelivery",
    "OutboxNotification",
    "Prefiltered",
    "Row",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Tx",
    "VerdictInput",
    "Where",
]

MAX_SEQ = 2**63 - 1  # BIGINT: the largest sequence number a store can hold
# Seconds a worker holds the events or the incident stage it took (events.claim,
# incidents.next) before another gateway may take them over (``store.work_lease``).
WORK_LEASE = 300.0
# Seconds within which an anomalous verdict joins an active incident with the same key.
INCIDENT_WINDOW = 3600.0


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


# This process's lease owner when the store is opened without a worker name: one per
# process (every store it opens shares it), never another process's.
PROCESS_WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Store(abc.ABC):
    """What every part of ai-sysadmin may ask of persistent state."""

    dialect: str = ""

    def __init__(
        self,
        *,
        incident_window: float = INCIDENT_WINDOW,
        work_lease: float = WORK_LEASE,
        worker_id: str | None = None,
    ) -> None:
        # Read at each call by the aggregates (tests change worker_id to play two workers).
        self.incident_window = incident_window
        self.work_lease = work_lease
        # This process's name on the work it leases (events.claim, incidents.next).
        self.worker_id = worker_id or PROCESS_WORKER_ID
        self.events = Events(self)
        self.verdicts = Verdicts(self)
        self.incidents = Incidents(self)
        self.proposals = Proposals(self)
        self.audit = Audit(self)
        self.cursors = Cursors(self)
        self.outbox = Outbox(self)
        self.hosts = Hosts(self)
        # Committed writes wake the workers waiting for them (layers/store/wakeups.py).
        self.wakeups = Wakeups()

    async def signal(self, tx: Tx, topic: Topic) -> None:
        """``tx`` wrote ``topic``: its listeners wake when (and if) it commits. PostgreSQL
        also tells the other processes on the database (``pg_notify`` in ``tx``)."""
        self.wakeups.signal(topic)

    # -- lifecycle -----------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and run pending migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def tx(self) -> AbstractAsyncContextManager[Tx]:
        """One transaction; committed when the block exits without an exception."""

    async def schema_version(self) -> int:
        async with self.tx() as tx:
            rows = await tx.execute("SELECT MAX(version) AS v FROM schema_migrations")
        return int(rows[0]["v"] or 0)

    # -- dialect hooks -----------------------------------------------------------------

    @abc.abstractmethod
    async def _insert_events(self, tx: Tx, events: Sequence[Event], now: float) -> list[str]:
        """Insert events whose id is new; return the ids that were inserted."""

    def _skip_locked(self) -> str:
        # PostgreSQL: rows another worker is claiming right now are skipped, not waited
        # for; SQLite runs one writing transaction at a time.
        return " FOR UPDATE SKIP LOCKED" if self.dialect == "postgres" else ""

    async def _forget_event_ids(self, tx: Tx, ids: list[str]) -> None:  # noqa: B027
        """Backends with a separate idempotency table drop retained-away ids from it."""

    # -- retention (across aggregates) --------------------------------------------------

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
            for chunk in chunks([r["id"] for r in old]):
                await tx.execute(
                    f"DELETE FROM timeline WHERE incident_id IN ({marks(len(chunk))})", chunk
                )
        return out

"""Persistent state of ai-sysadmin: one interface (``Store``), two backends.

``open_store(settings)`` picks the backend from ``store.url``: empty → SQLite at
``<state_dir>/ai-sysadmin.db``; ``sqlite:///path``; ``postgresql://…`` (psycopg 3).

A store is split by aggregate over its one transaction type (``store.tx()``):
``store.events`` (add, claim, in_state, get, mark_prefiltered, counts, recent),
``store.verdicts`` (record, after, recent, of_incident), ``store.incidents`` (list,
get, next, record_review, record_decision, resolve, quiet, mark_remembered,
add_timeline), ``store.proposals`` (add, get, list, transition, record_result, claim,
expire, expire_dispatch, lease_owner, count_runs), ``store.audit`` (append, list),
``store.cursors`` (get, set), ``store.outbox`` (notifications: enqueue,
notify_proposal, reconcile, unrouted, route, claim_deliveries, …) and
``store.hosts`` (fleet host keys). ``Store`` itself keeps the lifecycle, the
migrations, retention and the dialect hooks.
"""

from __future__ import annotations

import socket
from pathlib import Path

from layers.config import Settings
from layers.store.base import (
    INCIDENT_WINDOW,
    MAX_SEQ,
    WORK_LEASE,
    AddResult,
    Prefiltered,
    Store,
    StoreError,
    StoreUnavailable,
    VerdictInput,
)

__all__ = [
    "MAX_SEQ",
    "AddResult",
    "Prefiltered",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "VerdictInput",
    "make_store",
    "open_store",
]


def make_store(
    url: str,
    state_dir: Path,
    *,
    incident_window: float = INCIDENT_WINDOW,
    work_lease: float = WORK_LEASE,
    worker_id: str | None = None,
) -> Store:
    """The backend for ``url`` (not opened yet). ``worker_id`` names this process on the
    work it leases (None: one per process, ``PROCESS_WORKER_ID``)."""
    if url.startswith(("postgresql://", "postgres://")):
        from layers.store.postgres import PostgresStore

        return PostgresStore(url, incident_window=incident_window, work_lease=work_lease,
                             worker_id=worker_id)
    from layers.store.sqlite import SqliteStore

    if not url:
        db = state_dir / "ai-sysadmin.db"
    elif url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise StoreError(f"store.url {url!r}: use sqlite:///absolute/path.db")
        db = Path(path.removeprefix("/")) if path.startswith("//") else Path(path)
    else:
        raise StoreError(f"store.url {url!r}: expected sqlite:///path or postgresql://…")
    return SqliteStore(db, incident_window=incident_window, work_lease=work_lease,
                       worker_id=worker_id)


async def open_store(settings: Settings, worker: str | None = None) -> Store:
    """Open (and migrate) the configured store. ``worker`` names the process that leases
    work in it (``gateway``, ``daemon``): with this host and the gateway's port its lease
    owner is the same after a restart, so a gateway killed and started again takes its
    own leased work back at once instead of waiting for the lease to run out."""
    store = make_store(
        settings.store.url, settings.state_dir,
        incident_window=settings.pipeline.incident_window,
        work_lease=settings.store.work_lease,
        worker_id=(None if worker is None
                   else f"{socket.gethostname()}:{worker}:{settings.gateway.port}"),
    )
    await store.open()
    return store

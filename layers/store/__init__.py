"""Persistent state of ai-sysadmin: one interface (``Store``), two backends.

``open_store(settings)`` picks the backend from ``store.url``: empty → SQLite at
``<state_dir>/ai-sysadmin.db``; ``sqlite:///path``; ``postgresql://…`` (psycopg 3).
"""

from __future__ import annotations

import socket
from pathlib import Path

from layers.config import Settings
from layers.store.base import (
    MAX_SEQ,
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


def make_store(url: str, state_dir: Path) -> Store:
    """The backend for ``url`` (not opened yet)."""
    if not url:
        from layers.store.sqlite import SqliteStore

        return SqliteStore(state_dir / "ai-sysadmin.db")
    if url.startswith("sqlite://"):
        from layers.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise StoreError(f"store.url {url!r}: use sqlite:///absolute/path.db")
        return SqliteStore(Path(path.removeprefix("/")) if path.startswith("//") else Path(path))
    if url.startswith(("postgresql://", "postgres://")):
        from layers.store.postgres import PostgresStore

        return PostgresStore(url)
    raise StoreError(f"store.url {url!r}: expected sqlite:///path or postgresql://…")


async def open_store(settings: Settings, worker: str | None = None) -> Store:
    """Open (and migrate) the configured store. ``worker`` names the process that leases
    work in it (``gateway``, ``daemon``): with this host and the gateway's port its lease
    owner is the same after a restart, so a gateway killed and started again takes its
    own leased work back at once instead of waiting for the lease to run out."""
    store = make_store(settings.store.url, settings.state_dir)
    if worker is not None:
        store.worker_id = f"{socket.gethostname()}:{worker}:{settings.gateway.port}"
    store.work_lease = settings.store.work_lease
    store.incident_window = settings.pipeline.incident_window
    await store.open()
    return store

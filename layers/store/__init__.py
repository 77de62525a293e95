"""Persistent state of ai-sysadmin: one interface (``Store``), two backends.

``open_store(settings)`` picks the backend from ``store.url``: empty → SQLite at
``<state_dir>/ai-sysadmin.db``; ``sqlite:///path``; ``postgresql://…`` (psycopg 3).
"""

from __future__ import annotations

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


async def open_store(settings: Settings) -> Store:
    """Open (and migrate) the configured store."""
    store = make_store(settings.store.url, settings.state_dir)
    store.work_lease = settings.store.work_lease
    store.incident_window = settings.pipeline.incident_window
    await store.open()
    return store

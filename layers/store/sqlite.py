"""SQLite backend: the embedded default, in WAL mode so the gateway and the daemon can
share one file (one writer at a time, readers never blocked).

sqlite3 is blocking, so every statement runs on one dedicated thread; an asyncio lock
makes each transaction exclusive within the process and ``BEGIN IMMEDIATE`` across
processes (with a busy timeout instead of "database is locked" errors).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from layers.events import Event
from layers.store.base import (
    INCIDENT_WINDOW,
    WORK_LEASE,
    Store,
    StoreError,
    StoreUnavailable,
)
from layers.store.migrations import MIGRATIONS
from layers.store.sql import Row, Tx


class _SqliteTx:
    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._store._call(self._store._execute, sql, tuple(params))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._store._call(self._store._executemany, sql, [tuple(r) for r in rows])


class SqliteStore(Store):
    dialect = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = 30.0,
        incident_window: float = INCIDENT_WINDOW,
        work_lease: float = WORK_LEASE,
        worker_id: str | None = None,
    ) -> None:
        super().__init__(incident_window=incident_window, work_lease=work_lease,
                         worker_id=worker_id)
        self.path = path
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._lock = asyncio.Lock()

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def _connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a 2xx for an event means it is on disk, even across power loss.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"store: cannot open SQLite database {self.path}: {exc}") from exc
        self._conn = conn

    def _execute(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        assert self._conn is not None
        cur = self._conn.execute(sql, params)
        rows = [dict(r) for r in cur.fetchall()] if cur.description else []
        cur.close()
        return rows

    def _executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        assert self._conn is not None
        self._conn.executemany(sql, rows)

    async def open(self) -> None:
        await self._call(self._connect)
        await self._migrate()

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._call(conn.close)
        self._pool.shutdown(wait=False)

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        if self._conn is None:
            raise StoreError("store: not open")
        async with self._lock:
            try:
                await self._call(self._execute, "BEGIN IMMEDIATE", ())
                try:
                    yield _SqliteTx(self)
                except BaseException:
                    self.wakeups.rolled_back()
                    await asyncio.shield(self._call(self._rollback))
                    raise
                try:
                    await asyncio.shield(self._call(self._execute, "COMMIT", ()))
                except sqlite3.Error:
                    # A COMMIT that failed (disk full) may leave the transaction open;
                    # without this every later BEGIN would fail too.
                    self.wakeups.rolled_back()
                    await asyncio.shield(self._call(self._rollback))
                    raise
                self.wakeups.committed()
            except sqlite3.OperationalError as exc:
                # Disk full, I/O error, locked past the busy timeout: the transaction is
                # rolled back; the caller may retry later (the gateway answers 503).
                raise StoreUnavailable(f"store: {exc}") from exc

    def _rollback(self) -> None:
        assert self._conn is not None
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    async def _migrate(self) -> None:
        async with self.tx() as tx:
            await tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            rows = await tx.execute("SELECT version FROM schema_migrations")
        done = {r["version"] for r in rows}
        for m in MIGRATIONS:
            if m.version in done:
                continue
            async with self.tx() as tx:
                # Another process may have migrated between our read and this lock.
                if await tx.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (m.version,)
                ):
                    continue
                for stmt in m.sql("sqlite"):
                    await tx.execute(stmt)
                await tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?,?,?)",
                    (m.version, m.name, time.time()),
                )

    async def _insert_events(self, tx: Tx, events: Sequence[Event], now: float) -> list[str]:
        # One thread hop for the whole batch: intake must keep up with a journal flood.
        rows = [_event_row(e, now) for e in events]
        result: list[str] = await self._call(self._insert_event_rows, rows)
        return result

    def _insert_event_rows(self, rows: list[tuple[Any, ...]]) -> list[str]:
        assert self._conn is not None
        inserted: list[str] = []
        for row in rows:
            cur = self._conn.execute(
                "INSERT INTO events (id, host, source, unit, priority, message, fields, ts,"
                " received_at, state) VALUES (?,?,?,?,?,?,?,?,?,'new') "
                "ON CONFLICT (id) DO NOTHING RETURNING id",
                row,
            )
            inserted += [r[0] for r in cur.fetchall()]
            cur.close()
        return inserted


def _event_row(e: Event, now: float) -> tuple[Any, ...]:
    return (
        e.id, e.host, e.source, e.unit, e.priority, e.message,
        json.dumps(e.fields, separators=(",", ":")), e.timestamp, now,
    )

"""PostgreSQL backend through psycopg 3.

When the TimescaleDB extension is available, ``events`` becomes a hypertable
partitioned on its sequence number (a hypertable cannot hold a unique index on the
event id alone, so idempotency lives in the small ``event_ids`` table on every
PostgreSQL store, Timescale or not, to keep one code path).

One connection, one transaction at a time (an asyncio lock): the pipeline's writes are
small and ordered; contention is not where its time goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
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
from layers.store.wakeups import CHANNEL, PgListener, Topic

_QMARK = re.compile(r"\?")


def _pg(sql: str) -> str:
    # Our SQL never contains a literal '?' or '%', so this rewrite is exact.
    return _QMARK.sub("%s", sql)


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cur = await self._conn.execute(_pg(sql), tuple(params) or None)
        if cur.description is None:
            return []
        rows: list[Row] = await cur.fetchall()
        return rows

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self._conn.cursor() as cur:
            await cur.executemany(_pg(sql), [tuple(r) for r in rows])


class PostgresStore(Store):
    dialect = "postgres"

    def __init__(
        self,
        url: str,
        *,
        incident_window: float = INCIDENT_WINDOW,
        work_lease: float = WORK_LEASE,
        worker_id: str | None = None,
    ) -> None:
        super().__init__(incident_window=incident_window, work_lease=work_lease,
                         worker_id=worker_id)
        self.url = url
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self.timescale = False
        self.listener = PgListener(url, self.wakeups, self._backend_pid)
        self.wakeups.on_first_subscribe = self.listener.start
        self.wakeups.across_processes = self.listener.connected.is_set

    def _backend_pid(self) -> int | None:
        conn = self._conn
        return None if conn is None or conn.closed else int(conn.info.backend_pid)

    async def _connect(self) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StoreError(
                "store: PostgreSQL needs psycopg; install the `postgres` extra"
            ) from exc
        try:
            self._conn = await psycopg.AsyncConnection.connect(
                self.url, row_factory=dict_row, autocommit=True
            )
        except psycopg.Error as exc:
            raise StoreError(f"store: cannot connect to PostgreSQL: {_one_line(exc)}") from exc

    async def open(self) -> None:
        await self._connect()
        await self._migrate()

    async def close(self) -> None:
        await self.listener.close()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        import psycopg

        async with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                # A restarted server: reconnect; the failed transaction was rolled back.
                try:
                    await self._connect()
                except StoreError as exc:
                    raise StoreUnavailable(str(exc)) from exc
            try:
                async with self._conn.transaction():
                    yield _PgTx(self._conn)
            except BaseException as exc:
                self.wakeups.rolled_back()
                if not isinstance(exc, psycopg.OperationalError):
                    raise
                # The server went away (restart, network): drop the connection so the next
                # transaction reconnects; nothing of this one was committed.
                conn, self._conn = self._conn, None
                with contextlib.suppress(Exception):
                    await conn.close()
                raise StoreUnavailable(f"store: PostgreSQL unavailable: {_one_line(exc)}") from exc
            self.wakeups.committed()

    async def signal(self, tx: Tx, topic: Topic) -> None:
        if self.wakeups.signal(topic):
            # Delivered to every LISTEN-ing connection when tx commits, not before.
            await tx.execute("SELECT pg_notify(?, ?)", (CHANNEL, topic))

    async def _migrate(self) -> None:
        async with self.tx() as tx:
            # Serialise concurrent openers (gateway and daemon starting together).
            await tx.execute("SELECT pg_advisory_xact_lock(4242001)")
            await tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {r["version"] for r in await tx.execute("SELECT version FROM schema_migrations")}
            avail = await tx.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
            )
            for m in MIGRATIONS:
                if m.version in done:
                    continue
                for stmt in m.sql("postgres"):
                    await tx.execute(stmt)
                if m.version == 1 and avail:
                    await tx.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                    await tx.execute(
                        "SELECT create_hypertable('events', 'seq', "
                        "chunk_time_interval => 1000000, if_not_exists => TRUE)"
                    )
                await tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?,?,?)",
                    (m.version, m.name, time.time()),
                )
            ext = await tx.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
            self.timescale = bool(ext)

    async def _insert_events(self, tx: Tx, events: Sequence[Event], now: float) -> list[str]:
        if not events:
            return []
        ids = [e.id for e in events]
        rows = await tx.execute(
            "INSERT INTO event_ids (id) SELECT unnest(?::text[]) ON CONFLICT DO NOTHING "
            "RETURNING id",
            (ids,),
        )
        fresh = {r["id"] for r in rows}
        todo = [e for e in events if e.id in fresh]
        if todo:
            await tx.executemany(
                "INSERT INTO events (id, host, source, unit, priority, message, fields, ts,"
                " received_at, state) VALUES (?,?,?,?,?,?,?,?,?,'new')",
                [
                    (
                        e.id, e.host, e.source, e.unit, e.priority, e.message,
                        json.dumps(e.fields, separators=(",", ":")), e.timestamp, now,
                    )
                    for e in todo
                ],
            )
        return [e.id for e in todo]

    async def _forget_event_ids(self, tx: Tx, ids: list[str]) -> None:
        if ids:
            await tx.execute("DELETE FROM event_ids WHERE id = ANY(?)", (ids,))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())

"""The cursors aggregate: named positions (the journald cursor, stream consumers) that a
restarted reader resumes from."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from layers.store.base import Store


class Cursors:
    """``store.cursors``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, name: str) -> str | None:
        async with self.store.tx() as tx:
            rows = await tx.execute("SELECT value FROM cursors WHERE name = ?", (name,))
        return str(rows[0]["value"]) if rows else None

    async def set(self, name: str, value: str) -> None:
        async with self.store.tx() as tx:
            await tx.execute(
                "INSERT INTO cursors (name, value, updated_at) VALUES (?,?,?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                (name, value, time.time()),
            )

"""What every aggregate of the store shares: the transaction type, rows, and one WHERE
builder (so filtered queries never put a value in the SQL text).

SQL is written once with ``?`` placeholders; the PostgreSQL backend rewrites them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

Row = dict[str, Any]


class Tx(Protocol):
    """One open transaction (``Store.tx()``); every aggregate's statements go through it."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class Where:
    """A WHERE clause built from optional filters: each condition skipped when its value
    is None (or an empty list), values always passed as parameters, never in the SQL."""

    def __init__(self, *fixed: str, params: Sequence[Any] = ()) -> None:
        self.clauses: list[str] = list(fixed)
        self.params: list[Any] = list(params)

    def eq(self, column: str, value: Any) -> Where:
        if value is not None:
            self.clauses.append(f"{column} = ?")
            self.params.append(value)
        return self

    def at_least(self, column: str, value: Any) -> Where:
        if value is not None:
            self.clauses.append(f"{column} >= ?")
            self.params.append(value)
        return self

    def before(self, column: str, value: Any) -> Where:
        if value is not None:
            self.clauses.append(f"{column} < ?")
            self.params.append(value)
        return self

    def among(self, column: str, values: Sequence[Any] | None) -> Where:
        if values:
            self.clauses.append(f"{column} IN ({marks(len(values))})")
            self.params.extend(values)
        return self

    def when(self, flag: bool, clause: str) -> Where:
        if flag:
            self.clauses.append(clause)
        return self

    @property
    def sql(self) -> str:
        return "WHERE " + " AND ".join(self.clauses) if self.clauses else ""


def marks(n: int) -> str:
    """``?,?,…`` for an ``IN`` list of ``n`` values."""
    return ",".join("?" * n)


def chunks(items: Sequence[Any], n: int = 500) -> list[list[Any]]:
    # 500 keeps an IN list well under SQLite's bound-parameter limit.
    return [list(items[i : i + n]) for i in range(0, len(items), n)]


def dump(value: Any) -> str:
    """Compact, key-sorted JSON: equal values give equal text (proposal dedupe keys)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)

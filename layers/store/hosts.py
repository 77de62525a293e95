"""Host keys: one per fleet host, scoped to its name, kept hashed (docs/fleet.md).

A host key lets an agent post events as its host and take the actions meant for it —
nothing else: it reads no other host's data and approves nothing. The key is shown once,
when it is made (``ai-sysadmin hosts add``); the store keeps its SHA-256 only (a key is
32 random bytes, so a fast hash leaves nothing to brute-force). Revoking is immediate for
new lookups; gateways cache a lookup for at most :data:`CACHE_SECONDS`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from layers.errors import UserError
from layers.store.base import Store

PREFIX = "aish-host-"
CACHE_SECONDS = 5.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,253}")


class HostKeyError(UserError, ValueError):
    """A host name or key that cannot be used (one readable line)."""


@dataclass(frozen=True)
class Host:
    name: str
    created_at: float
    revoked_at: float | None
    last_seen: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_name(name: str) -> str:
    if _NAME.fullmatch(name) is None:
        raise HostKeyError(f"{name!r} is not a host name (letters, digits, '.', '_', '-')")
    return name


class Hosts:
    """The hosts aggregate over the store's transactions."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, str | None]] = {}

    async def add(self, name: str) -> str:
        """Make the key of a new host (or a new key for a revoked one); returns it."""
        check_name(name)
        key = PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        async with self.store.tx() as tx:
            rows = await tx.execute("SELECT revoked_at FROM hosts WHERE name = ?", (name,))
            if rows and rows[0]["revoked_at"] is None:
                raise HostKeyError(f"host {name} already has a key (revoke it first)")
            if rows:
                await tx.execute("UPDATE hosts SET key_hash = ?, created_at = ?, revoked_at ="
                                 " NULL, last_seen = NULL WHERE name = ?",
                                 (key_hash(key), now, name))
            else:
                await tx.execute("INSERT INTO hosts (name, key_hash, created_at) VALUES (?,?,?)",
                                 (name, key_hash(key), now))
        await self.store.append_audit("admin", "host_added", name, {})
        return key

    async def revoke(self, name: str) -> bool:
        async with self.store.tx() as tx:
            rows = await tx.execute("UPDATE hosts SET revoked_at = ? WHERE name = ? AND"
                                    " revoked_at IS NULL RETURNING name", (time.time(), name))
        if rows:
            await self.store.append_audit("admin", "host_revoked", name, {})
        self._cache.clear()
        return bool(rows)

    async def list(self) -> list[Host]:
        async with self.store.tx() as tx:
            rows = await tx.execute("SELECT name, created_at, revoked_at, last_seen FROM hosts"
                                    " ORDER BY name")
        return [Host(r["name"], r["created_at"], r["revoked_at"], r["last_seen"]) for r in rows]

    async def known(self, name: str) -> bool:
        """Whether ``name`` is a fleet host with a key that is not revoked."""
        async with self.store.tx() as tx:
            rows = await tx.execute("SELECT 1 FROM hosts WHERE name = ? AND revoked_at IS NULL",
                                    (name,))
        return bool(rows)

    async def lookup(self, key: str) -> str | None:
        """The host a presented key belongs to (not revoked), or None."""
        if not key.startswith(PREFIX):
            return None
        digest = key_hash(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        async with self.store.tx() as tx:
            rows = await tx.execute("UPDATE hosts SET last_seen = ? WHERE key_hash = ? AND"
                                    " revoked_at IS NULL RETURNING name", (time.time(), digest))
        name = rows[0]["name"] if rows else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now, name)
        return name

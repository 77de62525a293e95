"""The journald collector: ``journalctl --output=json --follow``, cursor persisted.

Each journal entry becomes an ``Event`` whose id is derived from its ``__CURSOR``, so
an entry re-read after a restart is stored once. The cursor is saved only after the
sink has stored the batch: a restart neither skips nor repeats entries.

Without systemd the collector says so once and stays off. A recorded journal (the same
JSON lines journalctl prints) can be replayed through the same parsing code with
``collectors.journal_replay``; its position is persisted the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import socket
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from layers.collectors import systemd_running
from layers.collectors.sink import EventSink
from layers.events import MAX_MESSAGE_CHARS, Event
from layers.store import Store

log = logging.getLogger("ai_sysadmin.collectors.journald")

CURSOR_NAME = "journald"
# Journal fields kept on the event (the rest are dropped: they are large and noisy).
KEPT_FIELDS = ("SYSLOG_IDENTIFIER", "_PID", "_COMM", "_EXE", "_TRANSPORT", "_BOOT_ID",
               "_SYSTEMD_UNIT", "UNIT", "USER_UNIT", "CODE_FILE", "EXIT_CODE", "EXIT_STATUS")


def _text(value: Any) -> str | None:
    """journald sends binary-unsafe fields as arrays of byte values."""
    if value is None:
        return None
    if isinstance(value, list):
        if value and all(isinstance(b, int) for b in value):
            return bytes(b & 0xFF for b in value).decode("utf-8", "replace")
        return _text(value[0]) if value else None
    return str(value)


def _about_unit(entry: dict[str, Any]) -> str | None:
    """The unit a service manager's message is about. systemd's messages about a unit
    carry it in ``UNIT`` (pid 1) or ``USER_UNIT`` (a user's manager); a service's own
    output in ``_SYSTEMD_UNIT``, which journald sets from the sender's cgroup. Any local
    process can write ``UNIT=`` into its own entries, so it counts only from a manager —
    else a forged line would open an incident "about" postgresql.service."""
    pid, comm = _text(entry.get("_PID")), _text(entry.get("_COMM"))
    if pid == "1":
        return _text(entry.get("UNIT"))
    own = _text(entry.get("_SYSTEMD_UNIT")) or ""
    if comm == "systemd" and own.startswith("user@"):
        return _text(entry.get("USER_UNIT"))
    return None


def parse_entry(entry: dict[str, Any], default_host: str) -> Event | None:
    """One ``journalctl --output=json`` object → an Event (None when it has no message)."""
    message = _text(entry.get("MESSAGE"))
    if message is None:
        return None
    cursor = _text(entry.get("__CURSOR")) or ""
    try:
        priority = int(_text(entry.get("PRIORITY")) or 6)
    except ValueError:
        priority = 6
    try:
        ts = int(_text(entry.get("__REALTIME_TIMESTAMP")) or 0) / 1e6
    except ValueError:
        ts = 0.0
    unit = _about_unit(entry) or _text(entry.get("_SYSTEMD_UNIT"))
    if unit in ("init.scope",):
        unit = None
    fields = {k: (_text(entry[k]) or "")[:4096] for k in KEPT_FIELDS if k in entry}
    ident = hashlib.sha256(cursor.encode() if cursor else json.dumps(
        entry, sort_keys=True).encode()).hexdigest()[:32]
    data: dict[str, Any] = {
        "id": f"jd_{ident}",
        "host": (_text(entry.get("_HOSTNAME")) or default_host)[:255],
        "source": "journald",
        "unit": unit[:255] if unit else None,
        "priority": min(max(priority, 0), 7),
        "message": message[:MAX_MESSAGE_CHARS],
        "fields": fields,
    }
    if ts > 0:
        data["timestamp"] = ts
    return Event.model_validate(data)


def parse_lines(lines: Iterable[str], default_host: str) -> list[tuple[Event, str]]:
    """Lines of journalctl JSON → (event, cursor) pairs; malformed lines are skipped."""
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            log.warning("skipping a journal line that is not JSON")
            continue
        if not isinstance(entry, dict):
            continue
        ev = parse_entry(entry, default_host)
        if ev is not None:
            out.append((ev, _text(entry.get("__CURSOR")) or ""))
    return out


class JournaldCollector:
    def __init__(
        self,
        store: Store,
        sink: EventSink,
        *,
        hostname: str | None = None,
        replay: Path | None = None,
        batch: int = 500,
        flush_after: float = 0.5,
    ) -> None:
        self.store = store
        self.sink = sink
        self.hostname = hostname or socket.gethostname()
        self.replay = replay
        self.batch = batch
        self.flush_after = flush_after

    def available(self) -> str | None:
        """None when the collector can run, else why not (said once, then it stays off)."""
        if self.replay is not None:
            return None if self.replay.is_file() else f"replay file {self.replay} not found"
        if not systemd_running():
            return "this machine does not run systemd"
        if shutil.which("journalctl") is None:
            return "journalctl not found on PATH"
        return None

    async def run(self) -> None:
        why = self.available()
        if why is not None:
            log.warning("journald collector off: %s", why)
            return
        if self.replay is not None:
            await self._run_replay(self.replay)
        else:
            await self._run_follow()

    async def _ship(self, pending: list[tuple[Event, str]], cursor_name: str,
                    cursor: str) -> None:
        await self.sink.send([e for e, _ in pending])
        await self.store.cursors.set(cursor_name, cursor)

    async def _run_replay(self, path: Path) -> None:
        name = f"journald-replay:{path.resolve()}"
        done = int(await self.store.cursors.get(name) or 0)
        with path.open(encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
        for start in range(done, len(lines), self.batch):
            chunk = lines[start : start + self.batch]
            await self._ship(parse_lines(chunk, self.hostname), name, str(start + len(chunk)))
        log.info("journal replay of %s complete (%d lines)", path, len(lines))

    async def _run_follow(self) -> None:
        cursor = await self.store.cursors.get(CURSOR_NAME)
        argv = ["journalctl", "--output=json", "--follow", "--no-pager"]
        # Resume after the stored cursor; on a first run start from now, not from history.
        argv += [f"--after-cursor={cursor}"] if cursor else ["--lines=0"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            assert proc.stdout is not None
            async for chunk in _batches(proc.stdout, self.batch, self.flush_after):
                parsed = parse_lines(chunk, self.hostname)
                if parsed:
                    await self._ship(parsed, CURSOR_NAME, parsed[-1][1])
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


async def _batches(
    stream: asyncio.StreamReader, size: int, flush_after: float
) -> AsyncIterator[list[str]]:
    """Lines grouped into batches: full, or whatever arrived within ``flush_after``."""
    pending: list[str] = []
    while True:
        try:
            raw = await asyncio.wait_for(stream.readline(), flush_after if pending else None)
        except TimeoutError:
            yield pending
            pending = []
            continue
        if not raw:
            if pending:
                yield pending
            return
        pending.append(raw.decode("utf-8", "replace"))
        if len(pending) >= size:
            yield pending
            pending = []

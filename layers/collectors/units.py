"""The failed-units collector: ``systemctl --failed --output=json``, polled.

A unit yields an event when it enters the failed state (not on every poll while it
stays failed). Without systemd the collector says so once and stays off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import time
from typing import Any

from layers.collectors import systemd_running
from layers.collectors.sink import EventSink
from layers.errors import Unavailable
from layers.events import Event

log = logging.getLogger("ai_sysadmin.collectors.units")


class UnitsError(Unavailable):
    pass


def parse_failed_units(text: str) -> list[dict[str, str]]:
    """The JSON ``systemctl --failed --output=json`` prints → [{unit, active, sub, …}]."""
    try:
        data: Any = json.loads(text or "[]")
    except ValueError as exc:
        raise UnitsError(f"systemctl printed invalid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise UnitsError("systemctl printed JSON that is not a list")
    units = []
    for item in data:
        if isinstance(item, dict) and isinstance(item.get("unit"), str):
            units.append({k: str(v) for k, v in item.items() if v is not None})
    return units


def failed_unit_event(unit: dict[str, str], hostname: str, since: float) -> Event:
    name = unit["unit"][:255]
    return Event(
        # One id per failure episode: re-posting during the same episode is a no-op.
        id=f"unit_{name}_{int(since)}"[:128],
        host=hostname,
        source="units",
        unit=name,
        priority=3,
        message=f"{name} is {unit.get('active', 'failed')} ({unit.get('sub', 'failed')}): "
        f"{unit.get('description', '')}"[:1000],
        fields={"load": unit.get("load"), "active": unit.get("active"), "sub": unit.get("sub")},
        timestamp=since,
    )


class FailedUnitsCollector:
    def __init__(self, sink: EventSink, *, interval: float, hostname: str | None = None) -> None:
        self.sink = sink
        self.interval = interval
        self.hostname = hostname or socket.gethostname()
        self._failed: dict[str, float] = {}

    def available(self) -> str | None:
        if not systemd_running():
            return "this machine does not run systemd"
        if shutil.which("systemctl") is None:
            return "systemctl not found on PATH"
        return None

    async def poll(self) -> list[Event]:
        proc = await asyncio.create_subprocess_exec(
            "systemctl", "--failed", "--output=json", "--no-pager",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise UnitsError(f"systemctl exited {proc.returncode}: {err.decode()[:200]}")
        return self.changes(parse_failed_units(out.decode("utf-8", "replace")))

    def changes(self, units: list[dict[str, str]]) -> list[Event]:
        """Events for units that are newly failed since the previous poll."""
        now = time.time()
        current = {u["unit"]: u for u in units}
        events = [
            failed_unit_event(u, self.hostname, now)
            for name, u in current.items()
            if name not in self._failed
        ]
        self._failed = {name: self._failed.get(name, now) for name in current}
        return events

    async def run(self) -> None:
        why = self.available()
        if why is not None:
            log.warning("failed-units collector off: %s", why)
            return
        while True:
            try:
                events = await self.poll()
                if events:
                    await self.sink.send(events)
            except UnitsError as exc:
                log.warning("failed-units poll: %s", exc)
            await asyncio.sleep(self.interval)

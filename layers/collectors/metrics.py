"""The metrics collector: CPU, memory, disk and load per core, sampled with psutil.

Every sample is an event (source ``metrics``, ``fields.metric`` and ``fields.value``);
the prefilter's metric rules decide which ones are worth a model's attention.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import psutil

from layers.collectors.sink import EventSink
from layers.events import Event

log = logging.getLogger("ai_sysadmin.collectors.metrics")

# Pseudo and read-only image filesystems whose fullness means nothing.
SKIP_FSTYPES = frozenset({"squashfs", "iso9660", "overlay", "tmpfs", "devtmpfs", "ramfs"})


def sample(hostname: str) -> list[Event]:
    """One sample of every metric, as events."""
    values: list[tuple[str, float, str | None]] = [
        ("cpu_percent", psutil.cpu_percent(interval=None), None),
        ("memory_used_percent", psutil.virtual_memory().percent, None),
        ("swap_used_percent", psutil.swap_memory().percent, None),
        ("load1_per_core", os.getloadavg()[0] / (os.cpu_count() or 1), None),
    ]
    seen: set[str] = set()
    for part in psutil.disk_partitions(all=False):
        if part.fstype in SKIP_FSTYPES or part.mountpoint in seen:
            continue
        seen.add(part.mountpoint)
        try:
            values.append(("disk_used_percent", psutil.disk_usage(part.mountpoint).percent,
                           part.mountpoint))
        except OSError:
            continue
    events = []
    for metric, value, mount in values:
        where = f" on {mount}" if mount else ""
        fields: dict[str, str | int | float | bool | None] = {"metric": metric,
                                                              "value": round(value, 2)}
        if mount:
            fields["mountpoint"] = mount
        events.append(Event(host=hostname, source="metrics", priority=6,
                            message=f"{metric}{where} = {value:.1f}", fields=fields))
    return events


class MetricsCollector:
    def __init__(self, sink: EventSink, *, interval: float, hostname: str | None = None) -> None:
        self.sink = sink
        self.interval = interval
        self.hostname = hostname or socket.gethostname()

    async def run(self) -> None:
        psutil.cpu_percent(interval=None)  # prime the CPU counter
        while True:
            await asyncio.sleep(self.interval)
            await self.sink.send(sample(self.hostname))

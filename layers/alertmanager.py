"""Prometheus Alertmanager's webhook as an event source.

Alertmanager posts a notification (payload version 4) for a group of alerts; each alert
becomes one event (source ``alertmanager``): the host from its ``instance`` label (port
stripped), the unit from a systemd-looking ``unit``/``name`` label, the syslog priority
from its ``severity`` label, the message from ``alertname`` and the summary (or
description) annotation; labels and annotations ride along as fields. The event id is
the alert's fingerprint, ``startsAt`` and status, so Alertmanager's retries and
``repeat_interval`` re-sends store nothing twice.

A firing alert goes through the pipeline like any event: the ``alert_*`` prefilter rules
(layers/rules/default.toml) match it by source and priority, the trigger stage records
its verdict, and the anomaly opens (or joins) an incident. A resolved alert is stored
too (priority 6, a fixed message: no rule makes it a candidate) and resolves the
incident its firing event is in, once every alert in that incident has resolved. When
the resolved notice arrives before the firing event's verdict (the trigger layer is
slow or down), :meth:`AlertIntake.follow` resolves the incident as soon as the verdict
is recorded; it follows the verdicts from a cursor kept in the store, so a restart in
between loses nothing.

Everything in a notification is untrusted text: it is bounded here, fenced in prompts
like a log line, and never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from layers.config import Settings
from layers.events import MAX_FIELDS, Event
from layers.pipeline.trigger import VerdictBus
from layers.store import AddResult, Store

log = logging.getLogger("ai_sysadmin.alertmanager")

SOURCE = "alertmanager"
CURSOR = "alertmanager-resolver"
ID_PREFIX = f"{SOURCE}:"
FIRING_LIKE = f"{ID_PREFIX}%:firing"
SUPPORTED_VERSION = "4"

# The `severity` label → syslog priority. The alert_* rules read the priority: 2 and
# below critical, 3-4 warning, 5 info; 6 (`none`, and every resolved notice) is stored but
# matches no rule: kube-prometheus' always-firing Watchdog carries severity "none".
CRITICAL, WARNING, INFO, QUIET = 2, 4, 5, 6
SEVERITY_PRIORITY: dict[str, int] = {
    **dict.fromkeys(("emergency", "emerg", "alert", "critical", "crit", "page", "fatal",
                     "disaster", "error", "err", "high", "major", "p1"), CRITICAL),
    **dict.fromkeys(("warning", "warn", "medium", "average", "minor", "p2", "p3"), WARNING),
    **dict.fromkeys(("info", "informational", "notice", "low", "p4", "p5"), INFO),
    **dict.fromkeys(("none", "ok"), QUIET),
}
HOST_LABELS = ("instance", "host", "hostname", "nodename")
UNIT_LABELS = ("unit", "name")
UNIT_RE = re.compile(
    r"[A-Za-z0-9:_.\\@-]{1,240}\.(service|socket|device|mount|automount|swap|target|path"
    r"|timer|slice|scope)"
)
MESSAGE_CHARS = 2000
VALUE_CHARS = 4096
KEY_CHARS = 128
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)

Status = Literal["firing", "resolved"]
Labels = dict[str, str]


class Alert(BaseModel):
    """One alert of a notification. Unknown keys are ignored: Alertmanager adds fields
    across versions, and a receiver that refused them would drop alerts on an upgrade."""

    model_config = ConfigDict(extra="ignore")

    status: Status
    labels: Labels = Field(max_length=256)
    annotations: Labels = Field(default_factory=dict, max_length=256)
    startsAt: datetime  # noqa: N815 - Alertmanager's key
    endsAt: datetime | None = None  # noqa: N815
    generatorURL: str = Field("", max_length=VALUE_CHARS)  # noqa: N815
    fingerprint: str = Field(pattern=r"^[0-9a-fA-F]{1,64}$", description="hex")


class Notification(BaseModel):
    """Alertmanager's webhook payload (``version`` "4")."""

    model_config = ConfigDict(extra="ignore")

    version: str = Field(max_length=16)
    groupKey: str = Field("", max_length=VALUE_CHARS)  # noqa: N815
    truncatedAlerts: int = Field(0, ge=0)  # noqa: N815
    status: Status
    receiver: str = Field(max_length=255)
    groupLabels: Labels = Field(default_factory=dict, max_length=256)  # noqa: N815
    commonLabels: Labels = Field(default_factory=dict, max_length=256)  # noqa: N815
    commonAnnotations: Labels = Field(default_factory=dict, max_length=256)  # noqa: N815
    externalURL: str = Field("", max_length=VALUE_CHARS)  # noqa: N815
    alerts: list[Alert] = Field(min_length=1)


# -- alert → event ------------------------------------------------------------------------


def _micros(t: datetime) -> int:
    return (t - EPOCH) // timedelta(microseconds=1)


def event_id(alert: Alert, status: Status | None = None) -> str:
    """The idempotency key: fingerprint, start and status (firing or resolved)."""
    return f"{ID_PREFIX}{alert.fingerprint}:{_micros(alert.startsAt)}:{status or alert.status}"


def is_firing_id(event_id: str) -> bool:
    return event_id.startswith(ID_PREFIX) and event_id.endswith(":firing")


def resolved_id(firing_id: str) -> str:
    return firing_id.removesuffix(":firing") + ":resolved"


def host_of(instance: str) -> str | None:
    """``web1:9100`` → ``web1``, ``[2001:db8::1]:9100`` → ``2001:db8::1``,
    ``https://example.org/health`` (blackbox probes) → ``example.org``."""
    text = instance.strip()
    if "://" in text:
        try:
            text = urlsplit(text).hostname or ""
        except ValueError:
            return None
    elif text.startswith("["):
        end = text.find("]")
        text = text[1:end] if end > 0 else text
    elif text.count(":") == 1:
        name, _, port = text.partition(":")
        if port.isdigit():
            text = name
    return text[:255] or None


def unit_of(labels: Labels) -> str | None:
    for key in UNIT_LABELS:
        value = labels.get(key, "")
        if UNIT_RE.fullmatch(value):
            return value
    return None


def priority_of(labels: Labels) -> int:
    """The syslog priority for the alert's ``severity`` label; a missing or unknown
    severity counts as a warning (someone chose to be alerted)."""
    severity = labels.get("severity", "").strip().lower()
    return SEVERITY_PRIORITY.get(severity, WARNING)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _when(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None and t > ZERO_TIME else None


def alert_fields(alert: Alert, note: Notification) -> dict[str, str | int | float | bool | None]:
    """The alert's facts, then its labels and annotations as ``label.*`` /
    ``annotation.*`` fields, as many as an event holds (the rest are counted)."""
    out: dict[str, str | int | float | bool | None] = {
        "alertname": _clip(alert.labels.get("alertname", ""), VALUE_CHARS),
        "alert_status": alert.status,
        "severity": _clip(alert.labels.get("severity", ""), 64),
        "fingerprint": alert.fingerprint,
        "starts_at": _when(alert.startsAt),
        "ends_at": _when(alert.endsAt),
        "generator_url": alert.generatorURL,
        "receiver": _clip(note.receiver, 255),
        "external_url": note.externalURL,
    }
    extra = [(f"label.{k}", v) for k, v in sorted(alert.labels.items())]
    extra += [(f"annotation.{k}", v) for k, v in sorted(alert.annotations.items())]
    room = MAX_FIELDS - len(out) - 1
    kept = [(k, v) for k, v in extra if len(k) <= KEY_CHARS][:room]
    out.update((k, _clip(v, VALUE_CHARS)) for k, v in kept)
    if len(kept) < len(extra):
        out["fields_dropped"] = len(extra) - len(kept)
    return out


def alert_host(labels: Labels, default: str) -> str:
    for key in HOST_LABELS:
        if key in labels and (host := host_of(labels[key])):
            return host
    return default


def alert_message(alert: Alert) -> str:
    """``HostDown: web1 has been unreachable for 5 minutes`` — the alert's name and its
    own words (summary, else description, else message)."""
    name = alert.labels.get("alertname") or "alert"
    words = next((alert.annotations[k] for k in ("summary", "description", "message")
                  if alert.annotations.get(k, "").strip()), "")
    text = f"{name}: {' '.join(words.split())}" if words else name
    return _clip(text, MESSAGE_CHARS)


def to_event(alert: Alert, note: Notification, default_host: str) -> Event:
    """The event of one alert. A resolved alert gets priority 6 and a fixed message, so
    that no prefilter rule makes it a candidate of its own (its words are in the fields
    and in the timeline of the incident it resolves)."""
    firing = alert.status == "firing"
    when = alert.startsAt if firing else (alert.endsAt if alert.endsAt and alert.endsAt > EPOCH
                                          else datetime.now(UTC))
    return Event(
        id=event_id(alert),
        host=alert_host(alert.labels, default_host),
        source=SOURCE,
        unit=unit_of(alert.labels),
        priority=priority_of(alert.labels) if firing else QUIET,
        message=alert_message(alert) if firing else f"alert resolved: {alert.fingerprint}",
        fields=alert_fields(alert, note),
        timestamp=max(when.timestamp(), 0.0),
    )


def default_host(settings: Settings) -> str:
    return (settings.alertmanager.default_host or settings.collectors.hostname
            or socket.gethostname() or "localhost")[:255]


# -- intake and resolution ----------------------------------------------------------------


@dataclass
class IntakeResult:
    ids: list[str] = field(default_factory=list)  # the events' ids, in the alerts' order
    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    firing: int = 0
    resolved: int = 0
    resolved_incidents: list[str] = field(default_factory=list)


Intake = Callable[[Sequence[Event]], Awaitable[AddResult]]


class AlertIntake:
    """Turns notifications into events and resolved alerts into resolved incidents."""

    def __init__(self, settings: Settings, store: Store, bus: VerdictBus, intake: Intake,
                 *, cursor_every: float = 30.0) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.intake = intake
        self.default_host = default_host(settings)
        self.cursor_every = cursor_every
        self.cursor: int | None = None  # the last verdict seq :meth:`follow` looked at
        self._stored: int | None = None

    async def receive(self, note: Notification) -> IntakeResult:
        """Store the notification's alerts (committed before this returns), then resolve
        what the resolved ones close."""
        events = [to_event(a, note, self.default_host) for a in note.alerts]
        added = await self.intake(events)
        out = IntakeResult(ids=[e.id for e in events], accepted=added.accepted,
                           duplicates=added.duplicates)
        fresh = set(added.accepted)
        for alert, ev in zip(note.alerts, events, strict=True):
            if alert.status == "firing":
                out.firing += 1
                continue
            out.resolved += 1
            inc = await self.settle(event_id(alert, "firing"), alert, new=ev.id in fresh)
            if inc is not None:
                out.resolved_incidents.append(inc)
        return out

    async def _incident_of(self, firing_id: str) -> str | None:
        async with self.store.tx() as tx:
            rows = await tx.execute(
                "SELECT incident_id FROM verdicts WHERE event_id = ?", (firing_id,))
        return str(rows[0]["incident_id"]) if rows and rows[0]["incident_id"] else None

    async def settle(self, firing_id: str, alert: Alert | None = None, *,
                     new: bool = True) -> str | None:
        """Resolve the incident the firing event ``firing_id`` is in, when an alert
        opened it and every alert in it has resolved; the incident's id if it was
        resolved now. Nothing happens while the firing event has no verdict yet."""
        incident_id = await self._incident_of(firing_id)
        if incident_id is None:
            return None
        async with self.store.tx() as tx:
            opener = await tx.execute(
                "SELECT event_id FROM verdicts WHERE incident_id = ? ORDER BY seq LIMIT 1",
                (incident_id,))
            rows = await tx.execute(
                "SELECT event_id FROM verdicts WHERE incident_id = ? AND event_id LIKE ?",
                (incident_id, FIRING_LIKE))
        alerts = [str(r["event_id"]) for r in rows]
        done = {e.id for e in await self.store.events.get([resolved_id(a) for a in alerts])}
        still = [a for a in alerts if resolved_id(a) not in done]
        opened_by_alert = bool(opener) and is_firing_id(str(opener[0]["event_id"]))
        detail: dict[str, Any] = {"source": SOURCE, "alert": "resolved",
                                  "event_id": resolved_id(firing_id)}
        if alert is not None:
            detail.update(alertname=_clip(alert.labels.get("alertname", ""), 200),
                          ends_at=_when(alert.endsAt))
        if still or not opened_by_alert:
            if new:
                detail["still_firing"] = len(still)
                if not opened_by_alert:
                    detail["kept_open"] = "the incident was opened by other events"
                await self.store.incidents.add_timeline(incident_id, "note", detail)
            return None
        inc = await self.store.incidents.get(incident_id)
        if inc is None or inc.status == "resolved":
            return None
        await self.store.incidents.add_timeline(incident_id, "note", detail)
        changed = await self.store.incidents.resolve(
            incident_id, by=SOURCE, remember=self.settings.memory.enabled)
        return incident_id if changed else None

    async def follow(self) -> None:
        """Resolve incidents whose firing alert got its verdict after the resolved notice
        arrived. Reads the verdicts from a cursor in the store: the cursor moves only past
        verdicts that were looked at, so a crash repeats a little work, never skips any."""
        cfg = self.settings.pipeline
        saved = await self.store.cursors.get(CURSOR)
        self.cursor = int(saved) if saved and saved.isdigit() else self.bus.last_seq
        if saved is None:
            await self.store.cursors.set(CURSOR, str(self.cursor))
        self._stored, last_save = self.cursor, time.monotonic()
        while True:
            try:
                batch = await self.store.verdicts.after(self.cursor, limit=500,
                                                        anomalies_only=True)
                alerts = [v for v in batch if v.incident_id and is_firing_id(v.event_id)]
                if alerts:
                    have = {e.id for e in await self.store.events.get(
                        [resolved_id(v.event_id) for v in alerts])}
                    for v in alerts:
                        if resolved_id(v.event_id) in have:
                            await self.settle(v.event_id)
                if batch:
                    self.cursor = batch[-1].seq
                if alerts or time.monotonic() - last_save > self.cursor_every:
                    await self.save_cursor()
                    last_save = time.monotonic()
                if len(batch) < 500:
                    await self.bus.wait(self.cursor, cfg.poll_interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alertmanager resolver failed; retrying")
                await asyncio.sleep(cfg.retry_wait)

    async def save_cursor(self) -> None:
        """Persist how far :meth:`follow` got (at close, and now and then)."""
        if self.cursor is not None and self.cursor != self._stored:
            await self.store.cursors.set(CURSOR, str(self.cursor))
            self._stored = self.cursor

"""The title and body a channel receives, rendered from a notification's facts.

Plain text (apprise's ``text`` format: channels that want HTML or Markdown get it
escaped), facts only: the incident's title is the rule and the log line's own words, an
action is its catalog name, parameters, risk and dry run. Log words are untrusted text
and stay text. Every body ends with the notification's id (``ref ntf_…``), so a receiver
can tell a redelivery (at least once) from a new notification.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any

from layers.config import Settings
from layers.store.outbox import OutboxNotification

MAX_TITLE = 250
MAX_BODY = 3000


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    # apprise's notify types: info | success | warning | failure
    type: str


def dashboard_url(settings: Settings) -> str:
    if settings.notify.dashboard_url:
        return settings.notify.dashboard_url.rstrip("/") + "/"
    return settings.gateway.local_url + "/"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _minutes(seconds: float) -> str:
    m = max(0, round(seconds / 60))
    return f"{m} min" if m < 120 else f"{m / 60:.1f} h"


def _target(d: dict[str, Any]) -> str:
    params = d.get("params") or {}
    what = params.get("unit") or params.get("path") or params.get("pid")
    return f"{d.get('action')} {what}" if what is not None else str(d.get("action"))


def _incident_lines(inc: dict[str, Any] | None) -> list[str]:
    if not inc:
        return []
    return [f"Incident {inc.get('id')} [{inc.get('severity')}]: {inc.get('title')}",
            f"Host {inc.get('host')}, unit {inc.get('unit') or '-'}"]


def _type(severity: str) -> str:
    return {"critical": "failure", "warning": "warning"}.get(severity, "info")


def render(n: OutboxNotification, settings: Settings, *, suppressed: int = 0,
           now: float | None = None) -> Message:
    now = time.time() if now is None else now
    d = n.detail
    base = dashboard_url(settings)
    sev = n.severity
    lines: list[str]
    if n.kind.startswith("incident."):
        verb = {"incident.opened": "opened", "incident.escalated": "escalated",
                "incident.resolved": "resolved"}[n.kind]
        title = f"[{sev}] Incident {verb}: {d.get('title')}"
        lines = [f"Host {d.get('host')}, unit {d.get('unit') or '-'}, rule {d.get('rule') or '-'}"]
        if n.kind == "incident.escalated":
            lines.append(f"Severity raised from {d['previous']} to {sev}" if d.get("by") ==
                         "severity" and d.get("previous") else "Sent to diagnosis (meta layer)")
        if n.kind == "incident.resolved":
            took = (d.get("resolved_at") or n.created_at) - (d.get("opened_at") or n.created_at)
            lines.append(f"Resolved ({d.get('by') or 'quiet'}) after {_minutes(took)}")
        lines.append(f"Incident {d.get('id')}: {base}#incidents")
        kind = "success" if n.kind == "incident.resolved" else _type(sev)
    elif n.kind == "approval.pending":
        pid = d.get("proposal")
        title = f"[{sev}] Approval needed: {_target(d)}"
        expires = d.get("expires_at")
        lines = [
            f"Action {d.get('action')} {json.dumps(d.get('params') or {}, sort_keys=True)}, "
            f"risk {d.get('risk') or '-'}",
            f"Dry run: {d.get('dry_run') or '-'}",
            *([f"Waits because: {d['reason']}"] if d.get("reason") else []),
            *_incident_lines(d.get("incident")),
            (f"Expires {_when(expires)} (in {_minutes(expires - now)})" if expires
             else "Expires: never"),
            f"Approve: ai-sysadmin approvals approve {pid}",
            f"Reject:  ai-sysadmin approvals reject {pid}",
            f"Dashboard: {base}#approvals",
        ]
        kind = "warning"
    elif n.kind.startswith("action."):
        status = d.get("status") or n.kind.split(".", 1)[1]
        verb = {"succeeded": "ran", "failed": "failed", "refused": "refused"}.get(status, status)
        title = f"[{sev}] Action {verb}: {_target(d)}"
        lines = [f"Action {d.get('action')} {json.dumps(d.get('params') or {}, sort_keys=True)}"
                 + (f", risk {d['risk']}" if d.get("risk") else "")]
        if status in ("succeeded", "failed"):
            dur = d.get("duration")
            lines.append(f"Exit code {d.get('exit_code')}"
                         + (f" after {dur:.1f} s" if isinstance(dur, int | float) else ""))
            if d.get("output"):
                lines.append("Output: " + " ".join(str(d["output"]).split())[:300])
        if status == "refused":
            lines.append(f"Refused: {d.get('code') or '-'}: {d.get('reason') or '-'}")
        lines += _incident_lines(d.get("incident"))
        lines.append(f"Dashboard: {base}#approvals")
        kind = {"succeeded": "success", "failed": "failure"}.get(status, "info")
    else:
        title = f"[{sev}] {d.get('title') or n.kind}"
        lines = [str(d.get("body") or "")]
        kind = _type(sev)
    if suppressed:
        lines.append(f"({suppressed} earlier notification{'s' if suppressed > 1 else ''} on "
                     "this channel were dropped by its rate limit)")
    lines.append(f"ref {n.id}")
    body = "\n".join(lines)
    if len(body) > MAX_BODY:
        body = body[: MAX_BODY - len(n.id) - 6] + "…\nref " + n.id
    title = " ".join(title.split())
    return Message(title[:MAX_TITLE], body, kind)


def probe_message(settings: Settings, host: str) -> Message:
    return Message(
        "ai-sysadmin test notification",
        f"This channel works: a test notification from the ai-sysadmin gateway on {host}.\n"
        f"Dashboard: {dashboard_url(settings)}",
        "info",
    )

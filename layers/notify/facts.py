"""What a notification says, as data: built from facts (the incident's title is the rule
and the event's words; a proposal's action, parameters, risk and dry run come from the
catalog), never from a model's text.

The store writes these into its outbox (``notifications``) in the same transaction as the
fact itself where it can; ``key`` makes an enqueue idempotent where it cannot (the action
stage's own transactions), so a retry or the worker's reconciliation never doubles one.
This module imports nothing of the store or the configuration: the store imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layers.events import SEVERITY_RANK, Severity

OUTPUT_EXCERPT = 300

INCIDENT_FIELDS = ("id", "title", "host", "unit", "rule", "category", "severity", "status",
                   "opened_at", "resolved_at")


def at_least(severity: str | None, floor: Severity) -> Severity:
    """``severity`` (an incident's) raised to ``floor``."""
    if severity in SEVERITY_RANK and SEVERITY_RANK[severity] >= SEVERITY_RANK[floor]:
        return severity  # type: ignore[return-value]
    return floor


def incident(row: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """An incident notification's detail from an ``incidents`` row (or the same keys)."""
    detail = {k: row.get(k) for k in INCIDENT_FIELDS}
    detail.update(extra)
    return detail


def incident_brief(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: row.get(k) for k in ("id", "title", "host", "unit", "severity")}


def approval(proposal: Mapping[str, Any], incident_row: Mapping[str, Any] | None, *,
             code: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """An ``approval.pending`` detail: what would run, until when, and why it waits."""
    return {
        "proposal": proposal.get("id"),
        "action": proposal.get("action"),
        "params": proposal.get("params") or {},
        "risk": proposal.get("risk"),
        "dry_run": proposal.get("dry_run"),
        "expires_at": proposal.get("expires_at"),
        "created_at": proposal.get("created_at"),
        "code": code,
        "reason": reason,
        "incident": incident_brief(incident_row),
    }


def action(proposal: Mapping[str, Any], incident_row: Mapping[str, Any] | None, *,
           status: str, code: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """An ``action.succeeded|failed|refused`` detail."""
    output = proposal.get("output") or ""
    return {
        "proposal": proposal.get("id"),
        "action": proposal.get("action"),
        "params": proposal.get("params") or {},
        "risk": proposal.get("risk"),
        "status": status,
        "exit_code": proposal.get("exit_code"),
        "duration": proposal.get("duration"),
        "output": output[:OUTPUT_EXCERPT],
        "decided_by": proposal.get("decided_by"),
        "code": code,
        "reason": reason,
        "incident": incident_brief(incident_row),
    }


def action_severity(status: str, incident_severity: str | None) -> Severity:
    """Failures and approvals need a human: at least ``warning``; the rest is ``info``."""
    if status in ("failed", "pending"):
        return at_least(incident_severity, "warning")
    return "info"

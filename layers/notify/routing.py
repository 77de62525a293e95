"""Which channel gets which notification, and when.

In order, per channel:

1. **kinds and severity**: a channel that does not want the kind, or a notification below
   its ``min_severity``, gets no delivery at all (nothing is recorded);
2. **de-duplication**: the same kind and subject (incident or action) already sent, or
   waiting to be sent, on this channel within ``notify.dedupe_window`` at the same or a
   higher severity → dropped (``duplicate``); a more severe one goes through;
3. **quiet hours**: a non-critical notification during the channel's quiet hours is held
   until they end (``hold``: due then) or dropped (``drop``: ``quiet_hours``);
   critical ones go at once;
4. **rate limit**: a channel that sent (or holds) ``max_per_hour`` notifications in the
   last hour drops the next (``rate_limited``); the next one that goes through says how
   many were dropped.

Dropped deliveries are recorded with their reason, so ``GET /v1/notifications`` shows
what was not sent and why.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from layers.events import SEVERITY_RANK
from layers.notify.channels import Channel
from layers.store.outbox import DeliveryHistory, DeliveryPlan, OutboxNotification

RATE_WINDOW = 3600.0


def wants(channel: Channel, n: OutboxNotification) -> bool:
    return (channel.enabled and n.kind in channel.kinds
            and SEVERITY_RANK[n.severity] >= channel.min_rank)


def dedupe_key(n: OutboxNotification) -> str:
    return f"{n.kind}|{n.subject}"


def quiet_until(quiet: tuple[int, int] | None, now: float) -> float | None:
    """When the quiet hours that ``now`` falls in end (local time), or None outside them."""
    if quiet is None or quiet[0] == quiet[1]:
        return None
    start, end = quiet
    local = dt.datetime.fromtimestamp(now).astimezone()
    minute = local.hour * 60 + local.minute
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if not inside:
        return None
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    ends = midnight + dt.timedelta(minutes=end)
    if ends <= local:
        ends += dt.timedelta(days=1)
    return ends.timestamp()


def plan(channel: Channel, n: OutboxNotification, history: DeliveryHistory,
         now: float) -> DeliveryPlan:
    """The delivery of ``n`` on ``channel`` (which wants it: see ``wants``)."""
    rank = SEVERITY_RANK[n.severity]

    def out(**kw: Any) -> DeliveryPlan:
        return DeliveryPlan(channel.name, dedupe_key(n), rank, **kw)

    if history.duplicate_rank is not None and history.duplicate_rank >= rank:
        return out(dropped=True, reason="duplicate")
    held = None if n.severity == "critical" else quiet_until(channel.quiet_hours, now)
    if held is not None and channel.quiet_action == "drop":
        return out(dropped=True, reason="quiet_hours")
    if channel.max_per_hour and history.sent >= channel.max_per_hour:
        return out(dropped=True, reason="rate_limited")
    return out(suppressed=history.rate_limited_since_last, not_before=held,
               reason="quiet_hours" if held is not None else None)

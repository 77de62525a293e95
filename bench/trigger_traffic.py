"""What the trigger layer was asked to do, from the requests ``bench/counting_relay.py``
recorded in front of it: how many requests, how many of them repeated work already sent
(the same prompt but for its per-request nonce), how many events went out more than
once (a batch split after a timeout re-sends its events in smaller batches), and how many
requests the client gave up on before their answer.

Prompts fence their log lines with a random nonce (``layers.pipeline.prompts.fence``),
so a retry of the same batch differs from the first try only there: the nonce is
replaced before requests are compared.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

NONCE = re.compile(r"<<<END ([0-9a-f]{8,64})>>>")
FENCED_ITEM = re.compile(r"^\d+ (\{.*\})$", re.M)


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def work_key(body: str) -> str:
    """The request with its nonces blanked, canonical: equal keys are identical work."""
    for nonce in set(NONCE.findall(body)):
        body = body.replace(nonce, "<nonce>")
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"))
    except json.JSONDecodeError:
        canonical = body
    return hashlib.sha256(canonical.encode()).hexdigest()


def fenced_items(body: str) -> list[str]:
    """The fenced items (events, for a trigger request) of a chat request, canonical."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return []
    out = []
    for text in _strings(data.get("messages", []) if isinstance(data, dict) else []):
        for m in FENCED_ITEM.finditer(text):
            try:
                out.append(json.dumps(json.loads(m.group(1)), sort_keys=True))
            except json.JSONDecodeError:
                continue
    return out


@dataclass
class Traffic:
    """Chat requests the layer saw in a time window."""

    requests: int = 0
    identical_resends: int = 0
    # An identical resend, by how its earlier copy ended: "abandoned" (the client gave up,
    # a timeout), "cut" (the layer closed), or the HTTP status of its answer.
    resend_after: Counter[str] = field(default_factory=Counter)
    event_sends: int = 0
    unique_events: int = 0
    abandoned: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    batch_sizes: Counter[int] = field(default_factory=Counter)

    @property
    def events_resent(self) -> int:
        return self.event_sends - self.unique_events

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "identical_resends": self.identical_resends,
                "resend_after": dict(self.resend_after), "event_sends": self.event_sends,
                "unique_events": self.unique_events, "events_resent": self.events_resent,
                "abandoned": self.abandoned, "statuses": dict(self.statuses),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


def traffic(records: list[dict[str, Any]], since: float = 0.0,
            until: float = float("inf")) -> Traffic:
    """Chat-completion requests sent in ``[since, until]``, in the order they were sent."""
    chats = sorted((r for r in records
                    if r.get("method") == "POST" and str(r.get("path", "")).endswith(
                        "/chat/completions") and since <= r["t_sent"] <= until),
                   key=lambda r: r["t_sent"])
    out = Traffic()
    first: dict[str, dict[str, Any]] = {}
    seen_events: set[str] = set()
    for r in chats:
        out.requests += 1
        outcome = r.get("outcome", "answered")
        if outcome != "answered":
            out.abandoned += 1
        out.statuses[outcome if outcome != "answered" else str(r.get("status"))] += 1
        key = work_key(r["body"])
        if key in first:
            out.identical_resends += 1
            earlier = first[key]
            how = earlier.get("outcome", "answered")
            out.resend_after[how if how != "answered" else str(earlier.get("status"))] += 1
        else:
            first[key] = r
        items = fenced_items(r["body"])
        out.batch_sizes[len(items)] += 1
        out.event_sends += len(items)
        seen_events.update(items)
    out.unique_events = len(seen_events)
    return out

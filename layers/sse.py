"""Server-sent events as the layers send them: framing, model renaming, error events.

These sit beside the layer client (layers/client.py, :meth:`Upstream.events`) so that a
route relays whole events without knowing how the transport delivers their bytes.
Events stay bytes: the gateway forwards them as the layer wrote them, and parsing every
event into JSON on the hot path would cost CPU for nothing (the repetition watch parses
the few fields it needs itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

DONE = b"data: [DONE]\n\n"


def events_end(buf: bytes | bytearray) -> int:
    """Where the last whole server-sent event in ``buf`` ends; 0 when none has yet.

    An event ends with a blank line: ``\\n\\n`` as llama-server writes it, or ``\\r\\n\\r\\n``
    (servers built on sse-starlette, among others): a stream in either is relayed event
    by event, never held back until it ends. Comment lines (``: ping``) are events too,
    and pass as they came."""
    cut = buf.rfind(b"\n\n")
    if cut >= 0:
        return cut + 2
    cut = buf.rfind(b"\r\n\r\n")
    return cut + 4 if cut >= 0 else 0


@dataclass(frozen=True, slots=True)
class Rename:
    """Shows ``shown`` instead of the layer's model name in its answers.

    A byte replacement, not a JSON rewrite: llama-server writes compact JSON, and the
    model name of every chunk is exactly ``"model":"<layer>"``."""

    old: bytes
    new: bytes

    @classmethod
    def of(cls, layer_name: bytes | None, shown: str) -> Rename | None:
        if layer_name is None:
            return None
        return cls(b'"model":"' + layer_name + b'"', b'"model":"' + shown.encode() + b'"')

    def events(self, data: bytes) -> bytes:
        """Every event's name in a block of events."""
        return data.replace(self.old, self.new)

    def answer(self, data: bytes) -> bytes:
        """A non-streamed answer: its one (top-level, first) ``model`` field."""
        return data.replace(self.old, self.new, 1)


def error_event(message: str, code: str) -> bytes:
    """An OpenAI-shaped error as an event: how a stream already answered 200 fails."""
    err = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return b"data: " + json.dumps(err).encode() + b"\n\n"

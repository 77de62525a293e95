"""Watching a layer's streamed chat answer for degenerate repetition, and ending it.

A small model that has lost the thread repeats itself: the same token, sentence or line
over and over until its output cap (issue 15: the default model answered the README's
question with one line repeated until the slot's context was full). The gateway watches
such an answer as it is relayed and ends it at the loop.

:class:`RepetitionDetector` sees the text as it is generated, as a sequence of tokens —
runs of word characters, or runs of other non-space characters, whitespace dropped — and
reports when the tail of that sequence is one unit of ``p`` tokens repeated: at least
``min_repeats`` copies and at least ``min_tokens`` tokens in all, for a period ``p`` up
to ``max_period``. Cost: for each new token, one comparison per period (``run[p]``
counts how many of the latest tokens equal the token ``p`` before them), so a chunk is
processed in time proportional to its own tokens times ``max_period``, never by
re-scanning the text. Events are scanned after they were sent, off the path of the first
token: about 25 µs per token on a busy two-core VM, and no first-token cost measurable in
an A/B ("Repetition" in docs/gateway.md).

:class:`ChatWatch` reads the SSE events a llama-server layer sends for
``/v1/chat/completions`` (``data: {…chat.completion.chunk…}``), feeds the generated text
to its :class:`RepetitionDetector`, and keeps what it needs to end the answer itself
once the detector fires: the answer's id, the latest ``timings`` (the gateway asks for
``timings_per_token`` when usage will be needed, so the token counts at the cut are
llama-server's own), and — for a client that asked for a non-streamed answer, which the
gateway then reads as a stream — the text, to build the ``chat.completion``.

Only text is watched. Chunks without text (the first one with ``role``, ``tool_calls``
fragments, the finishing chunk, the usage chunk with ``choices: []``, ``: ping`` comments)
are read for what they carry and never changed: a stream is relayed as the layer sent it,
and a collected answer keeps the tool calls, merged by ``index`` as a client merges them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# -- the detector --------------------------------------------------------------------------

# Words, or runs of punctuation/symbols ("?<|", "====", "|---|"), whitespace dropped.
_TOKEN = re.compile(r"\w+|[^\w\s]+")
# A token longer than this is cut into pieces of this length: "aaaa…" or "=-=-=-…" with
# no whitespace would otherwise be one token that grows for ever.
PIECE = 16


@dataclass(frozen=True)
class Repetition:
    """A repeated tail: ``period`` tokens repeated over ``tokens`` tokens; the text up to
    ``keep_chars`` holds everything before the repetition and its first copy."""

    period: int
    tokens: int
    keep_chars: int


class RepetitionDetector:
    """Feed generated text chunk by chunk with :meth:`feed`; it returns a
    :class:`Repetition` once the tail is degenerate (and keeps returning it)."""

    def __init__(self, *, min_repeats: int = 3, min_tokens: int = 40, max_period: int = 100) -> None:
        if min_repeats < 2 or max_period < 1:
            raise ValueError("min_repeats must be at least 2 and max_period at least 1")
        self.max_period = max_period
        # need[p]: matches in a row that make the tail ``p``-periodic enough to cut.
        self._need = [0] + [max((min_repeats - 1) * p, min_tokens - p, 1)
                            for p in range(1, max_period + 1)]
        self._runs = [0] * (max_period + 1)
        # Recent tokens and the text offset at which each ends; long enough to locate the
        # start of any repetition that can be reported.
        self._keep = max(self._need) + 2 * max_period
        self._tokens: list[str] = []
        self._ends: list[int] = []
        self._partial = ""  # a token that may continue in the next chunk
        self._offset = 0  # characters fed before ``_partial``
        self.found: Repetition | None = None

    def feed(self, text: str) -> Repetition | None:
        if self.found is not None or not text:
            return self.found
        buf = self._partial + text
        start = self._offset
        last = 0
        for m in _TOKEN.finditer(buf):
            if m.end() == len(buf):
                break  # touches the end: it may go on in the next chunk
            self._token(m.group(), start + m.start())
            if self.found is not None:
                return self.found
            last = m.end()
        else:
            last = len(buf)
        rest = buf[last:]
        # A token still open at the end: emit its complete pieces, keep the remainder.
        lead = len(rest) - len(rest.lstrip())
        while len(rest) - lead > PIECE:
            self._push(rest[lead : lead + PIECE], start + last + lead + PIECE)
            if self.found is not None:
                return self.found
            lead += PIECE
        self._offset = start + last + lead
        self._partial = rest[lead:]
        return None

    def _token(self, token: str, at: int) -> None:
        for i in range(0, len(token), PIECE):
            piece = token[i : i + PIECE]
            self._push(piece, at + i + len(piece))
            if self.found is not None:
                return

    def _push(self, token: str, end: int) -> None:
        tokens, runs, need = self._tokens, self._runs, self._need
        n = len(tokens)
        for p in range(1, min(n, self.max_period) + 1):
            if tokens[n - p] == token:
                run = runs[p] + 1
                runs[p] = run
                if run >= need[p]:
                    span = run + p
                    tokens.append(token)
                    self._ends.append(end)
                    # The first copy ends ``span - p`` tokens before the last one.
                    first_copy_end = self._ends[-(span - p) - 1] if span - p < len(self._ends) else 0
                    self.found = Repetition(p, span, first_copy_end)
                    return
            else:
                runs[p] = 0
        tokens.append(token)
        self._ends.append(end)
        if n + 1 > 2 * self._keep:
            del tokens[: -self._keep]
            del self._ends[: -self._keep]


# -- the watch -----------------------------------------------------------------------------

_HEAD_KEYS = ("id", "created", "model", "system_fingerprint")
_TEXT_KEYS = ("reasoning_content", "content")


def _event(data: dict[str, Any]) -> bytes:
    # Compact, as llama-server writes it: the gateway's model rename matches these bytes.
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class ChatWatch:
    def __init__(self, detector: RepetitionDetector, *, include_usage: bool,
                 collect: bool = False) -> None:
        self.detector = detector
        self.include_usage = include_usage
        self.collect = collect
        self.head: dict[str, Any] = {}
        self.timings: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.found: Repetition | None = None
        self.text_events = 0
        # (field, text) in the order generated, when collecting a whole answer.
        self.parts: list[tuple[str, str]] = []
        # Tool calls of a collected answer by index: id, type, name, arguments so far.
        self.tool_calls: dict[int, dict[str, Any]] = {}

    def scan(self, events: bytes) -> bool:
        """Take whole events; True when the answer repeats itself and should end now."""
        for raw in events.split(b"\n\n"):
            if not raw.startswith(b"data: {"):
                continue
            try:
                data = json.loads(raw[6:])
            except ValueError:
                continue
            if isinstance(data, dict) and self._take(data):
                return True
        return False

    def _take(self, data: dict[str, Any]) -> bool:
        if not self.head:
            self.head = {k: data[k] for k in _HEAD_KEYS if k in data}
        timings = data.get("timings")
        if isinstance(timings, dict):
            self.timings = timings
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = data.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            return False
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return False
        calls = delta.get("tool_calls")
        if self.collect and isinstance(calls, list):
            self._merge_calls(calls)
        for key in _TEXT_KEYS:
            text = delta.get(key)
            if not isinstance(text, str) or not text:
                continue
            self.text_events += 1
            if self.collect:
                self.parts.append((key, text))
            if self.finish_reason is None and self.detector.feed(text) is not None:
                self.found = self.detector.found
                return True
        return False

    def _merge_calls(self, calls: list[Any]) -> None:
        """Fragments of streamed tool calls: ``id``, ``type`` and ``name`` come with a
        call's first fragment, ``arguments`` as pieces of a string to join."""
        for frag in calls:
            if not isinstance(frag, dict) or not isinstance(frag.get("index"), int):
                continue
            call = self.tool_calls.setdefault(
                frag["index"], {"id": None, "type": "function", "name": "", "arguments": ""})
            for key in ("id", "type"):
                if isinstance(frag.get(key), str):
                    call[key] = frag[key]
            fn = frag.get("function")
            if isinstance(fn, dict):
                if isinstance(fn.get("name"), str):
                    call["name"] += fn["name"]
                if isinstance(fn.get("arguments"), str):
                    call["arguments"] += fn["arguments"]

    # -- ending the answer ---------------------------------------------------------------

    def usage_now(self) -> dict[str, Any]:
        """Token counts at this point: llama-server's (from ``timings``) when it sent them,
        else the text events counted (one per generated token) and no prompt count."""
        if self.usage is not None:
            return self.usage
        t = self.timings or {}
        cached = int(t.get("cache_n", 0))
        prompt = cached + int(t.get("prompt_n", 0))
        completion = int(t.get("predicted_n", self.text_events))
        return {"completion_tokens": completion, "prompt_tokens": prompt,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def closing_events(self) -> bytes:
        """What a layer would have sent had the answer stopped here: the finishing chunk,
        the usage chunk when the client asked for one, and ``[DONE]``."""
        base = {**self.head, "object": "chat.completion.chunk"}
        events: list[dict[str, Any]] = [
            {"choices": [{"finish_reason": "stop", "index": 0, "delta": {}}], **base}
        ]
        if self.include_usage:
            events.append({"choices": [], **base, "usage": self.usage_now()})
        if self.timings is not None:
            events[-1]["timings"] = self.timings
        return b"".join(_event(e) for e in events) + b"data: [DONE]\n\n"

    def answer(self) -> bytes:
        """The whole answer as a ``chat.completion``, as llama-server writes one; a
        repetition is cut to its first copy."""
        parts = self.parts
        if self.found is not None:
            parts = _first_chars(parts, self.found.keep_chars)
        message: dict[str, Any] = {"role": "assistant"}
        for key in ("content", "reasoning_content"):
            text = "".join(t for k, t in parts if k == key)
            if text or key == "content":
                message[key] = text
        if self.tool_calls:
            message["tool_calls"] = [
                {"type": c["type"], "function": {"name": c["name"], "arguments": c["arguments"]},
                 "id": c["id"]}
                for _, c in sorted(self.tool_calls.items())
            ]
        finish = "stop" if self.found is not None else (self.finish_reason or "length")
        body: dict[str, Any] = {
            "choices": [{"finish_reason": finish, "index": 0, "message": message}],
            "created": self.head.get("created"),
            "model": self.head.get("model"),
            "system_fingerprint": self.head.get("system_fingerprint"),
            "object": "chat.completion",
            "usage": self.usage_now(),
            "id": self.head.get("id"),
        }
        if self.timings is not None:
            body["timings"] = self.timings
        return json.dumps(body, separators=(",", ":")).encode()


def _first_chars(parts: list[tuple[str, str]], keep: int) -> list[tuple[str, str]]:
    """The parts up to ``keep`` characters of their concatenation, the last one cut."""
    out: list[tuple[str, str]] = []
    for key, text in parts:
        if keep <= 0:
            break
        out.append((key, text[:keep]))
        keep -= len(text)
    return out

"""Watching a layer's streamed chat answer for degenerate repetition, and ending it.

:class:`ChatWatch` reads the SSE events a llama-server layer sends for
``/v1/chat/completions`` (``data: {…chat.completion.chunk…}``), feeds the generated text
to a :class:`~gateway.repetition.RepetitionDetector`, and keeps what it needs to end the
answer itself once the detector fires: the answer's id, the latest ``timings`` (the
gateway asks for ``timings_per_token`` when usage will be needed, so the token counts at
the cut are llama-server's own), and — for a client that asked for a non-streamed answer,
which the gateway then reads as a stream — the text, to build the ``chat.completion``.

Only text is watched. Chunks without text (the first one with ``role``, ``tool_calls``
fragments, the finishing chunk, the usage chunk with ``choices: []``, ``: ping`` comments)
are read for what they carry and never changed: a stream is relayed as the layer sent it,
and a collected answer keeps the tool calls, merged by ``index`` as a client merges them.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.repetition import Repetition, RepetitionDetector

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

"""OpenAI's Responses API in terms of chat completions, both ways.

``POST /v1/responses`` (gateway/routes/responses.py) turns a Responses request into the
chat-completions body the layers speak (:func:`chat_body`), and the layer's answer back
into a Responses object (:func:`response_object`) or, streamed, into Responses events
(:class:`ResponseEvents`), in the shapes of the openai SDK's ``openai.types.responses``.

Text in, text out: ``input`` (a string or a list of messages), ``instructions``,
``max_output_tokens``, ``temperature``, ``top_p``, ``text.format`` (plain text, JSON,
a JSON schema) and ``metadata``. What needs state the gateway does not keep
(``previous_response_id``, ``conversation``, ``store: true``, ``background``, stored
prompts, item references) or tools it does not serve here is refused with a ``400`` that
says so: every request carries its whole conversation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from gateway.errors import OpenAIError
from gateway.requests import MAX_MESSAGES, MAX_TOKENS_BOUND, Loose

# Chat-completions finish reasons → (status, incomplete_details.reason).
_ENDINGS: dict[str, tuple[str, str | None]] = {
    "stop": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
}
_TEXT_PARTS = ("input_text", "output_text", "text")
_ROLES = ("user", "assistant", "system", "developer")
_TOOLS_ELSEWHERE = ("the gateway's Responses API serves text only; for client tools use "
                    "POST /v1/chat/completions with a pass-through model (trigger, review, "
                    "meta)")
_NO_STATE = "the gateway keeps no responses: send the whole conversation in input"


class ResponsesRequest(Loose):
    """What the gateway checks of a Responses request; ``input`` and the fields it
    refuses are checked by :func:`chat_body`, with the path of the offending field."""

    model: str = Field(min_length=1, max_length=256)
    input: Any = Field(...)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND, strict=True)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=256)


def _bad(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code=code)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("tools"):
        raise _bad("tools", _TOOLS_ELSEWHERE, "unsupported_parameter")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise _bad("tool_choice", _TOOLS_ELSEWHERE, "unsupported_parameter")
    for field in ("previous_response_id", "conversation"):
        if body.get(field) is not None:
            raise _bad(field, _NO_STATE, "unsupported_parameter")
    if body.get("store") is True:
        raise _bad("store", f"{_NO_STATE} (send store: false, or leave it out)",
                   "unsupported_parameter")
    if body.get("background") is True:
        raise _bad("background", "background responses need stored state, which the "
                   "gateway does not keep; stream the response instead", "unsupported_parameter")
    if body.get("prompt") is not None:
        raise _bad("prompt", "stored prompt templates are OpenAI's; send instructions and "
                   "input instead", "unsupported_parameter")


def _content(param: str, content: Any) -> str | list[dict[str, Any]]:
    """A message's content for chat completions: one string when it is all text (every
    chat template takes that), else chat content parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, "must be a string or a list of content parts")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        where = f"{param}[{i}]"
        if not isinstance(part, dict):
            raise _bad(where, "must be a content part object")
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise _bad(f"{where}.text", "is required (a string)")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise _bad(f"{where}.image_url", "is required (a URL or data URL; file ids "
                           "are OpenAI's)")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "refusal":
            continue
        else:
            raise _bad(f"{where}.type", f"{kind!r} is not supported; send input_text "
                       "(or input_image to a layer that reads images)")
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _messages(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise _bad("input", "must be a string or a list of messages")
    if not raw:
        raise _bad("input", "is empty; send at least one message")
    if len(raw) > MAX_MESSAGES:
        raise _bad("input", f"has {len(raw)} items; at most {MAX_MESSAGES}")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, "must be a message object ({\"role\", \"content\"})")
        kind = item.get("type", "message")
        if kind in ("function_call", "function_call_output"):
            raise _bad(f"{where}.type", f"{kind!r}: {_TOOLS_ELSEWHERE}", "unsupported_parameter")
        if kind == "item_reference":
            raise _bad(f"{where}.type", f"item references need stored items; {_NO_STATE}",
                       "unsupported_parameter")
        if kind != "message":
            raise _bad(f"{where}.type", f"{kind!r} is not supported; send messages "
                       "(type 'message')")
        role = item.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role", f"must be one of {', '.join(_ROLES)}")
        content = _content(f"{where}.content", item.get("content"))
        # developer is OpenAI's newer name for system; every chat template knows system.
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    return messages


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad("text", "must be an object ({\"format\": …})")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema", "is required (a JSON schema object)")
        spec = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        if fmt.get("strict") is not None:
            spec["strict"] = bool(fmt["strict"])
        return {"type": "json_schema", "json_schema": spec}
    raise _bad("text.format.type", "must be one of text, json_object, json_schema")


def chat_body(req: ResponsesRequest, body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body that asks the layer for this response."""
    _refuse_unsupported(body)
    messages = _messages(body.get("input"))
    # instructions and the leading system messages become one system message: chat
    # templates such as Gemma's take only one, first.
    system = [req.instructions] if req.instructions else []
    while messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
        system.append(messages.pop(0)["content"])
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    if not messages or all(m["role"] == "system" for m in messages):
        raise _bad("input", "has no user or assistant message")
    chat: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.max_output_tokens is not None:
        chat["max_tokens"] = req.max_output_tokens
    for key in ("temperature", "top_p"):
        value = getattr(req, key)
        if value is not None:
            chat[key] = value
    rf = _response_format(body.get("text"))
    if rf is not None:
        chat["response_format"] = rf
    if req.metadata:
        chat["metadata"] = req.metadata  # frontend task routing reads it; not sent on
    return chat


# -- the answer ------------------------------------------------------------------------------


def _count(data: Any, key: str) -> int:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _usage(u: Any) -> dict[str, Any] | None:
    """Chat usage as Responses usage; counts a layer did not give (or gave as something
    other than a number) are 0."""
    if not isinstance(u, dict):
        return None
    prompt, completion = _count(u, "prompt_tokens"), _count(u, "completion_tokens")
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": _count(u.get("prompt_tokens_details"),
                                                         "cached_tokens"),
                                 "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": _count(u.get("completion_tokens_details"),
                                                             "reasoning_tokens")},
        "total_tokens": _count(u, "total_tokens") or prompt + completion,
    }


class ResponseShape:
    """What a response says of its request, and its ids: shared by the object and the
    events of one response."""

    def __init__(self, req: ResponsesRequest, body: dict[str, Any], max_output_tokens: int) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = req.model
        self.fields: dict[str, Any] = {
            "instructions": req.instructions,
            "max_output_tokens": max_output_tokens,
            "metadata": req.metadata or {},
            "temperature": req.temperature,
            "top_p": req.top_p,
            "user": req.user,
            "text": body.get("text") if isinstance(body.get("text"), dict)
            else {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice") or "auto",
        }

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_output_text(text)]
        return {"id": self.message_id, "type": "message", "status": status,
                "role": "assistant", "content": content}

    def response(self, status: str, output: list[dict[str, Any]], *,
                 usage: dict[str, Any] | None = None, incomplete: str | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": False,
            "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "tools": [],
            "truncation": "disabled",
            "usage": usage,
            **self.fields,
        }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _ending(finish: str | None) -> tuple[str, str | None]:
    return _ENDINGS.get(finish or "stop", ("completed", None))


def response_object(shape: ResponseShape, answer: dict[str, Any]) -> dict[str, Any]:
    """A layer's ``chat.completion`` as a Responses object."""
    choices = answer.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(
        choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    assert isinstance(message, dict)
    text = message.get("content") if isinstance(message.get("content"), str) else ""
    status, incomplete = _ending(choice.get("finish_reason"))
    return shape.response(status, [shape.message(text, status)],
                          usage=_usage(answer.get("usage")), incomplete=incomplete)


class ResponseEvents:
    """Turns the chat stream the gateway relays from a layer (whole SSE events: chunks,
    an error event, ``[DONE]``) into Responses events with consecutive sequence numbers:
    ``response.created``, ``response.in_progress``, ``response.output_item.added``,
    ``response.content_part.added``, one ``response.output_text.delta`` per text chunk,
    then ``response.output_text.done``, ``response.content_part.done``,
    ``response.output_item.done`` and ``response.completed`` (``response.incomplete``
    when the output cap cut it; ``error`` and ``response.failed`` when the layer broke
    off). The opening events go out with the first chunk the layer sends, as a chat
    stream's head does."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self.seq = 0
        self.started = False
        self.ended = False
        self.text: list[str] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return (f"event: {kind}\ndata: ".encode()
                + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")

    def _start(self) -> list[bytes]:
        self.started = True
        shape = self.shape
        opening = shape.response("in_progress", [])
        where = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
        return [
            self._event("response.created", response=opening),
            self._event("response.in_progress", response=opening),
            self._event("response.output_item.added", output_index=0,
                        item=shape.message(None, "in_progress")),
            self._event("response.content_part.added", part=_output_text(""), **where),
        ]

    def _finish(self) -> list[bytes]:
        self.ended = True
        shape = self.shape
        out = [] if self.started else self._start()
        text = "".join(self.text)
        status, incomplete = _ending(self.finish)
        where = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
        item = shape.message(text, status)
        final = shape.response(status, [item], usage=_usage(self.usage), incomplete=incomplete)
        out += [
            self._event("response.output_text.done", text=text, logprobs=[], **where),
            self._event("response.content_part.done", part=_output_text(text), **where),
            self._event("response.output_item.done", output_index=0, item=item),
            self._event("response.completed" if status == "completed" else "response.incomplete",
                        response=final),
        ]
        return out

    def _fail(self, error: dict[str, Any]) -> list[bytes]:
        self.ended = True
        out = [] if self.started else self._start()
        message = str(error.get("message") or "the layer broke off the response")
        code = str(error.get("code") or "server_error")
        out.append(self._event("error", code=code, message=message, param=None))
        partial = self.shape.message("".join(self.text), "incomplete")
        failed = self.shape.response("failed", [partial], usage=_usage(self.usage),
                                     error={"code": "server_error", "message": message})
        out.append(self._event("response.failed", response=failed))
        return out

    def _chunk(self, data: dict[str, Any]) -> list[bytes]:
        out = [] if self.started else self._start()
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return out
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish = str(choice["finish_reason"])
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(text, str) and text:
            self.text.append(text)
            out.append(self._event("response.output_text.delta", item_id=self.shape.message_id,
                                   output_index=0, content_index=0, delta=text, logprobs=[]))
        return out

    def feed(self, events: bytes) -> bytes:
        """Responses events for whole chat SSE events."""
        out: list[bytes] = []
        for raw in events.replace(b"\r\n", b"\n").split(b"\n\n"):
            if self.ended:
                break
            data = b"".join(line[5:].lstrip(b" ") for line in raw.split(b"\n")
                            if line.startswith(b"data:"))
            if not data:
                continue  # a comment (": ping") or nothing
            if data == b"[DONE]":
                out += self._finish()
                continue
            try:
                parsed = json.loads(data)
            except ValueError:
                continue
            if not isinstance(parsed, dict):
                continue
            if isinstance(parsed.get("error"), dict):
                out += self._fail(parsed["error"])
            else:
                out += self._chunk(parsed)
        return b"".join(out)

    async def translate(self, chat: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The Responses stream of a relayed chat stream; closing it closes the relay
        (which ends the generation on the layer)."""
        try:
            async for events in chat:
                out = self.feed(events)
                if out:
                    yield out
                if self.ended:
                    break
            if not self.ended:
                yield b"".join(self._fail({"message": "the layer ended the stream early",
                                           "code": "upstream_error"}))
        finally:
            aclose = getattr(chat, "aclose", None)
            if aclose is not None:
                await aclose()

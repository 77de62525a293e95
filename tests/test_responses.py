"""Issue 19: ``POST /v1/responses`` — OpenAI's Responses API — for the sysadmin and the
pass-through models, read by the real ``openai`` SDK from a real gateway in front of real
llama-server layers on the default model. Shapes, statuses and token bounds are checked,
not what the small model writes.

Output held to a JSON schema (``text.format``) ends when its grammar does, so the tests that
need a response to complete (``response.completed``, ``get_final_response()``) ask for one;
free text from the default model usually runs into its ``max_output_tokens``, which is
``status: "incomplete"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import Stack

MAX = 16
AUTH = {"Authorization": "Bearer test-key"}


class Verdict(BaseModel):
    ok: bool


VERDICT_FORMAT: dict[str, Any] = {"format": {
    "type": "json_schema", "name": "verdict", "strict": True,
    "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
               "required": ["ok"], "additionalProperties": False}}}
EVENT_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done",
           "response.output_item.done"]


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="test-key", max_retries=0,
                       timeout=120) as c:
        yield c


def assert_response_shape(r: Any, model: str, cap: int) -> None:
    """A Responses object as the SDK parsed it: one assistant message of output text,
    its status and usage consistent with the cap."""
    assert r.id.startswith("resp_") and r.object == "response" and r.model == model
    assert isinstance(r.created_at, (int, float)) and r.max_output_tokens == cap
    assert len(r.output) == 1
    item = r.output[0]
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [c.type for c in item.content] == ["output_text"]
    assert r.output_text == item.content[0].text
    assert r.usage is not None and r.usage.input_tokens > 0
    assert 0 <= r.usage.output_tokens <= cap
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.status in ("completed", "incomplete") and item.status == r.status
    if r.status == "incomplete":
        assert r.incomplete_details is not None
        assert r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == cap
    else:
        assert r.incomplete_details is None and r.completed_at is not None
    assert r.error is None and r.tools == [] and r.previous_response_id is None


# -- non-streamed -------------------------------------------------------------------------------


def test_create_passthrough_and_sysadmin(client: openai.OpenAI) -> None:
    direct = client.responses.with_raw_response.create(
        model="meta", input="Is the disk full?", max_output_tokens=MAX)
    assert direct.headers["x-ai-sysadmin-layer"] == "meta"
    assert direct.headers["x-ai-sysadmin-max-tokens"] == str(MAX)
    d = direct.parse()
    assert_response_shape(d, "meta", MAX)

    sysadmin = client.responses.with_raw_response.create(
        model="ai-sysadmin", input="Is the disk full?", max_output_tokens=MAX,
        instructions="Answer in one sentence.")
    assert sysadmin.headers["x-ai-sysadmin-layer"] == "meta"
    s = sysadmin.parse()
    assert_response_shape(s, "ai-sysadmin", MAX)
    assert s.instructions == "Answer in one sentence."
    # The sysadmin's system prompt with live host context went in front of the question.
    assert s.usage and d.usage and s.usage.input_tokens > d.usage.input_tokens + 80


def test_input_as_messages(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="review", max_output_tokens=8, temperature=0.2, top_p=0.9,
        input=[
            {"role": "developer", "content": "You are terse."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hello."}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Hi."}]},
            {"role": "user", "content": "Which unit runs sshd?"},
        ])
    assert_response_shape(r, "review", 8)
    assert r.temperature == 0.2 and r.top_p == 0.9


def test_output_cap_above_the_ceiling_is_clamped(client: openai.OpenAI) -> None:
    r = client.responses.with_raw_response.create(
        model="trigger", input="Is nginx healthy?", max_output_tokens=100_000,
        text=VERDICT_FORMAT)  # type: ignore[arg-type]
    assert r.headers["x-ai-sysadmin-max-tokens"] == "1024"  # trigger's ceiling
    assert r.parse().max_output_tokens == 1024


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    """``text.format`` json_schema is constrained decoding on the layer: the response ends
    with its grammar (completed) and the SDK parses it."""
    r = client.responses.parse(model="trigger", input="Is nginx healthy? Answer ok.",
                               text_format=Verdict, max_output_tokens=64, temperature=0)
    assert r.status == "completed"
    assert isinstance(r.output_parsed, Verdict)
    assert json.loads(r.output_text) == r.output_parsed.model_dump()


# -- streamed ---------------------------------------------------------------------------------------


def _check_events(events: list[Any], model: str, cap: int) -> Any:
    kinds = [e.type for e in events]
    assert kinds[:4] == EVENT_ORDER
    deltas = kinds[4:-4]
    assert deltas and set(deltas) == {"response.output_text.delta"}
    assert kinds[-4:-1] == CLOSING
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, final = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.id == final.id
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events[3:-2] if hasattr(e, "item_id"))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-4].text == text and events[-3].part.text == text
    assert events[-2].item.content[0].text == text
    assert_response_shape(final, model, cap)
    assert final.output_text == text
    assert final.status == ("completed" if kinds[-1] == "response.completed" else "incomplete")
    return final


def test_create_streamed_events(client: openai.OpenAI) -> None:
    stream = client.responses.create(model="ai-sysadmin", input="Name one Linux command.",
                                     max_output_tokens=MAX, stream=True)
    _check_events(list(stream), "ai-sysadmin", MAX)


def test_stream_helper_to_completion(client: openai.OpenAI) -> None:
    with client.responses.stream(model="trigger", input="Is nginx healthy? Answer ok.",
                                 text_format=Verdict, max_output_tokens=64,
                                 temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    _check_events(events, "trigger", 64)
    assert final.status == "completed" and isinstance(final.output_parsed, Verdict)


def test_stream_raw_framing(stack: Stack) -> None:
    """``event:`` and ``data:`` lines per event, no ``[DONE]`` (OpenAI sends none)."""
    with httpx.stream("POST", f"{stack.base_url}/v1/responses", headers=AUTH, timeout=120,
                      json={"model": "trigger", "input": "hi", "max_output_tokens": 4,
                            "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-ai-sysadmin-max-tokens"] == "4"
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    for e in events:
        kind, data = e.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: {")
        assert json.loads(data[6:])["type"] == kind[7:]
    assert "[DONE]" not in raw


# -- refused ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"store": True}, "store"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
     "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
], ids=["tools", "tool_choice", "previous_response_id", "conversation", "store",
        "background", "prompt", "function_call_output", "item_reference"])
@pytest.mark.parametrize("model", ["ai-sysadmin", "meta"])
def test_unsupported_fields_are_a_400_that_says_why(
    stack: Stack, extra: dict[str, Any], param: str, model: str
) -> None:
    body = {"model": model, "input": "hi", "stream": True, **extra}
    r = httpx.post(f"{stack.base_url}/v1/responses", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "unsupported_parameter"
    assert err["type"] == "invalid_request_error" and err["message"].startswith(f"{param}: ")


@pytest.mark.parametrize(("payload", "param"), [
    ({"model": "meta"}, "input"),
    ({"model": "meta", "input": 5}, "input"),
    ({"model": "meta", "input": []}, "input"),
    ({"model": "meta", "input": ["hi"]}, "input[0]"),
    ({"model": "meta", "input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"model": "meta", "input": [{"role": "user", "content": 7}]}, "input[0].content"),
    ({"model": "meta", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
     "input[0].content[0].type"),
    ({"model": "meta", "input": [{"role": "system", "content": "only a system prompt"}]},
     "input"),
    ({"model": "meta", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "meta", "input": "hi", "max_output_tokens": "12"}, "max_output_tokens"),
    ({"model": "meta", "input": "hi", "temperature": 5}, "temperature"),
    ({"model": "meta", "input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"model": "meta", "input": "hi", "text": {"format": {"type": "json_schema"}}},
     "text.format.schema"),
    ({"input": "hi"}, "model"),
], ids=["no-input", "input-int", "input-empty", "input-strings", "bad-role", "bad-content",
        "input-file", "system-only", "zero-cap", "string-cap", "temperature", "format",
        "schema-missing", "no-model"])
def test_invalid_body_is_a_400_with_param(stack: Stack, payload: dict[str, Any],
                                          param: str) -> None:
    r = httpx.post(f"{stack.base_url}/v1/responses", json=payload, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_errors_through_the_sdk(client: openai.OpenAI, stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.responses.create(model="gpt-4o", input="hi")
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as br:
        client.responses.create(model="ai-sysadmin", input="hi", previous_response_id="resp_1")
    assert br.value.body["param"] == "previous_response_id"  # type: ignore[index]
    bad = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.responses.create(model="meta", input="hi")
    for raw in (b"{nope", b"[1]", b""):
        r = httpx.post(f"{stack.base_url}/v1/responses", content=raw, timeout=30,
                       headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_objects_validate_against_the_sdk_types(stack: Stack) -> None:
    """The SDK builds its objects without validating them; here every field of the raw
    answer and of each raw event is validated against ``openai.types.responses``."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    body = {"model": "ai-sysadmin", "input": "Is the disk full?", "max_output_tokens": 8}
    r = httpx.post(f"{stack.base_url}/v1/responses", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200
    Response.model_validate(r.json(), strict=False)
    with httpx.stream("POST", f"{stack.base_url}/v1/responses", headers=AUTH, timeout=120,
                      json={**body, "stream": True, "text": VERDICT_FORMAT}) as s:
        raw = s.read().decode()
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    events = [adapter.validate_json(e.split("\n", 1)[1][len("data: "):])
              for e in raw.split("\n\n") if e]
    assert events[-1].type in ("response.completed", "response.incomplete")

"""Issue 3: the gateway is a good OpenAI-compatible server for the real `openai` SDK,
in front of real llama-server layers running the real model."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import Stack

MAX = 16  # tokens: the tiny model is slow only in bulk


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="test-key", max_retries=0,
                       timeout=120) as c:
        yield c


def _layer_metric(stack: Stack, layer: str, name: str) -> float:
    text = httpx.get(f"{stack.layer_url(layer)}/metrics", timeout=10).text
    m = re.search(rf"^llamacpp:{name} ([0-9.e+]+)$", text, re.MULTILINE)
    assert m, f"{name} missing from layer {layer} metrics"
    return float(m.group(1))


# -- models ---------------------------------------------------------------------------------


def test_models_lists_sysadmin_and_layers(client: openai.OpenAI, stack: Stack) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["ai-sysadmin", "trigger", "review", "meta"]
    for m in models.data:
        assert m.object == "model" and m.owned_by and isinstance(m.created, int)
    # The un-prefixed path some frontends use answers the same.
    r = httpx.get(f"{stack.base_url}/models", headers={"Authorization": "Bearer test-key"})
    assert r.json()["data"] == [m.model_dump(exclude_none=True) for m in models.data]


# -- chat -------------------------------------------------------------------------------------


def test_chat_non_streamed_passthrough_and_sysadmin(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Is the disk full?"}]
    direct = client.chat.completions.create(model="meta", messages=messages, max_tokens=MAX)
    assert direct.model == "meta"
    assert direct.choices[0].message.role == "assistant"
    assert direct.choices[0].finish_reason in ("stop", "length")
    assert direct.usage and direct.usage.completion_tokens >= 1

    sysadmin = client.chat.completions.with_raw_response.create(
        model="ai-sysadmin", messages=messages, max_tokens=MAX
    )
    answer = sysadmin.parse()
    assert answer.model == "ai-sysadmin"
    assert sysadmin.headers["x-ai-sysadmin-layer"] == "meta"
    # The sysadmin's system prompt with live host context went in front of the question.
    assert answer.usage and direct.usage
    assert answer.usage.prompt_tokens > direct.usage.prompt_tokens + 80


def test_chat_streamed_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="ai-sysadmin",
        messages=[{"role": "user", "content": "Name one Linux command."}],
        max_tokens=MAX,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert {c.model for c in chunks} == {"ai-sysadmin"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0].choices == []
    assert usage[0].usage is not None and usage[0].usage.completion_tokens >= 1


def test_stream_raw_framing_is_relayed_and_ends_with_done(stack: Stack) -> None:
    with httpx.stream(
        "POST", f"{stack.base_url}/v1/chat/completions",
        headers={"Authorization": "Bearer test-key"},
        json={"model": "trigger", "stream": True, "max_tokens": 8,
              "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    # llama-server's timings are kept.
    assert "timings" in json.loads(events[-2][6:])
    # Without include_usage there is no usage chunk.
    assert not any('"usage"' in e for e in events[:-2])


def test_stream_head_arrives_with_the_first_event(stack: Stack) -> None:
    """The head and the first event leave in one write: a client waiting in recv() is
    woken once, and finds both (two writes would wake it with the head alone)."""
    body = json.dumps({"model": "trigger", "stream": True, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
               f"authorization: Bearer test-key\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    firsts = []
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=60) as sock:
            sock.sendall(request)
            first = sock.recv(65536)
            rest = b""
            while b"0\r\n\r\n" not in rest[-16:] and (data := sock.recv(65536)):
                rest += data
        assert first.startswith(b"HTTP/1.1 200 "), first[:80]
        assert b"data: [DONE]" in first + rest
        firsts.append(first)
    for first in firsts:
        head, _, body_part = first.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        assert b"data: {" in body_part, f"first read held the head alone: {first!r}"


@pytest.mark.parametrize("key", ["test-key", "wrong-key"])
def test_answer_arrives_with_its_head(stack: Stack, key: str) -> None:
    """A non-streamed answer (or an error) and its head leave in one write too."""
    body = json.dumps({"model": "trigger", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
               f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=60) as sock:
            sock.sendall(request)
            first = sock.recv(65536)
        head, _, answer = first.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
        assert length > 0 and len(answer) == length, f"first read: {first!r}"
        assert json.loads(answer)["choices" if key == "test-key" else "error"]


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="review", messages=[{"role": "user", "content": "Count to fifty."}],
        max_completion_tokens=5, user="alice", metadata={"k": "v"},
    )
    assert r.usage and r.usage.completion_tokens <= 5


class Verdict(BaseModel):
    anomaly: bool
    severity: Literal["info", "warning", "critical"]


def test_response_format_json_schema_gives_valid_json(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="trigger",
        messages=[{"role": "user", "content": "kernel: Out of memory: Killed process 4242"}],
        max_tokens=128,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": Verdict.model_json_schema(),
                            "strict": True},
        },
    )
    Verdict.model_validate_json(r.choices[0].message.content or "")


def test_response_format_json_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="trigger", max_tokens=48, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give a JSON object with a key ok."}],
    )
    content = r.choices[0].message.content or ""
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_parse_with_pydantic_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model="trigger",
        messages=[{"role": "user", "content": "sshd: Failed password for root from 10.0.0.9"}],
        response_format=Verdict,
        max_tokens=128,
        temperature=0,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Verdict)


# -- errors -------------------------------------------------------------------------------------


def test_bad_key_is_authentication_error(stack: Stack) -> None:
    bad = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model="meta", messages=[{"role": "user", "content": "x"}])
    assert exc.value.body and exc.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_is_not_found_never_a_fallback(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    body = exc.value.body
    assert isinstance(body, dict) and body["param"] == "model" and body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": "meta", "messages": []}, "messages"),
        ({"model": "meta", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "meta", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
         "max_tokens"),
        ({"model": "meta", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
         "temperature"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
    ids=["empty-messages", "bad-role", "negative-max-tokens", "temperature", "no-model"],
)
def test_invalid_body_is_bad_request_with_param(stack: Stack, payload: dict, param: str) -> None:
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=payload,
                   headers={"Authorization": "Bearer test-key"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_malformed_json_is_400_not_500(stack: Stack) -> None:
    for raw in (b"{nope", b"\xff\xfe{}", b"[1,2]", b"", b"[" * 100_000):
        r = httpx.post(f"{stack.base_url}/v1/chat/completions", content=raw,
                       headers={"Authorization": "Bearer test-key",
                                "Content-Type": "application/json"})
        assert r.status_code == 400, raw[:10]
        assert r.json()["error"]["code"] == "invalid_json"


def test_invalid_body_through_sdk_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="meta", messages=[], max_tokens=4)


def test_oversized_body_is_413(client: openai.OpenAI) -> None:
    huge = "x" * (5 * 1024 * 1024)
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="meta", messages=[{"role": "user", "content": huge}])
    assert exc.value.status_code == 413
    assert exc.value.body["code"] == "request_too_large"  # type: ignore[index]


def test_unknown_route_and_method_have_openai_shape(stack: Stack) -> None:
    h = {"Authorization": "Bearer test-key"}
    r = httpx.get(f"{stack.base_url}/v1/nothing", headers=h)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{stack.base_url}/v1/chat/completions", headers=h)
    assert r.status_code == 405 and "error" in r.json()


# -- routing of frontend tasks -------------------------------------------------------------------


def test_title_task_goes_to_the_small_layer(client: openai.OpenAI, stack: Stack) -> None:
    before = {n: _layer_metric(stack, n, "prompt_tokens_total") for n in ("trigger", "meta")}
    r = client.chat.completions.with_raw_response.create(
        model="ai-sysadmin",
        messages=[{"role": "user", "content": "### Task:\nGenerate a concise, 3-5 word title "
                   "with an emoji summarizing the chat history.\n### Chat History:\n"
                   "<chat_history>\nUSER: why is nginx down\n</chat_history>"}],
        max_tokens=MAX, stream=False,
    )
    assert r.headers["x-ai-sysadmin-layer"] == "trigger"
    assert r.parse().model == "ai-sysadmin"
    after = {n: _layer_metric(stack, n, "prompt_tokens_total") for n in ("trigger", "meta")}
    assert after["trigger"] > before["trigger"]
    assert after["meta"] == before["meta"]


def test_metadata_task_is_routed_too(client: openai.OpenAI) -> None:
    r = client.chat.completions.with_raw_response.create(
        model="ai-sysadmin", messages=[{"role": "user", "content": "nginx restarts"}],
        max_tokens=4, metadata={"task": "tags_generation"},
    )
    assert r.headers["x-ai-sysadmin-layer"] == "trigger"


# -- embeddings, completions, health ----------------------------------------------------------------


def test_embeddings(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="ai-sysadmin", input=["disk full on /var", "oom kill"])
    assert len(r.data) == 2 and len(r.data[0].embedding) > 100
    assert r.model == "ai-sysadmin"


def test_legacy_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="trigger", prompt="systemd is", max_tokens=4)
    assert r.choices[0].text is not None


def test_health_ready_metrics(stack: Stack, client: openai.OpenAI) -> None:
    assert httpx.get(f"{stack.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{stack.base_url}/ready").status_code == 401  # needs a key
    h = {"Authorization": "Bearer test-key"}
    ready = httpx.get(f"{stack.base_url}/ready", headers=h)
    assert ready.status_code == 200
    assert {n: v["state"] for n, v in ready.json()["layers"].items()} == {
        "trigger": "ready", "review": "ready", "meta": "ready"}
    client.chat.completions.create(model="meta", messages=[{"role": "user", "content": "x"}],
                                   max_tokens=2)
    text = httpx.get(f"{stack.base_url}/metrics", headers=h).text
    assert re.search(r'ai_sysadmin_requests_total\{model="meta",route="chat",status="200"\} [1-9]',
                     text)
    assert "ai_sysadmin_request_seconds_bucket" in text
    assert "ai_sysadmin_gateway_overhead_seconds_bucket" in text
    assert re.search(r'ai_sysadmin_layer_up\{endpoint="[^"]+",layer="meta"\} 1\.0', text)
    assert "ai_sysadmin_layer_queued_requests" in text

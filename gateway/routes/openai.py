"""OpenAI-compatible routes: models, chat completions, completions, embeddings.

Model ``ai-sysadmin`` is the sysadmin: the meta layer with live system context in its
system prompt, which investigates with read-only actions before it answers
(gateway/investigate.py). Models ``trigger``, ``review`` and ``meta`` pass straight through to
that layer. Streams are relayed event by event as the layer sends them.

Every chat and completion gets the layer's output cap and stop strings and a place among
``gateway.max_concurrent_chats`` (gateway/bounds.py); a chat answer that degenerates into
repetition is ended (gateway/chat_watch.py). A non-streamed chat that is watched is read
from the layer as a stream, so that ending it also ends the generation.

Client tools (``tools``, ``tool_choice``, ``functions``) go to the pass-through models
only, and their streamed ``tool_calls`` reach the client exactly as the layer sent them;
the sysadmin refuses them (it investigates with its own read-only catalog).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway import investigate
from gateway.auth import key_name, require_key, require_key_for_models
from gateway.bounds import ChatGate, add_stops, cap_output, constrained
from gateway.chat_watch import ChatWatch, RepetitionDetector
from gateway.errors import OpenAIError, openai_error
from gateway.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, read_model
from gateway.sse import EventStreamResponse
from gateway.state import GatewayState
from layers.client import LayerBrokeOff, LayerError, LayerPool, LayerTimeout, Upstream
from layers.config import LAYER_NAMES
from layers.context import gather_context, system_message
from layers.generation import stop_strings
from layers.sse import DONE, Rename, error_event

log = logging.getLogger("ai_sysadmin.gateway")

SYSADMIN_MODEL = "ai-sysadmin"
# Which layer answered: lets admins see where titles and chats went.
LAYER_HEADER = "X-Ai-Sysadmin-Layer"
# The output cap the request ran with (its own, the layer's default, or the ceiling).
MAX_TOKENS_HEADER = "X-Ai-Sysadmin-Max-Tokens"
MODEL_IDS = (SYSADMIN_MODEL, *LAYER_NAMES)
# A fixed date: the same model list from every gateway and after every restart.
CREATED = 1767225600  # 2026-01-01

router = APIRouter(tags=["openai"])


def _gw(request: Request) -> GatewayState:
    gw: GatewayState = request.app.state.gw
    return gw


def unknown_model(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"model '{model}' does not exist; available: {', '.join(MODEL_IDS)}",
        param="model",
        code="model_not_found",
    )


# -- models ------------------------------------------------------------------------------


def _model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": CREATED, "owned_by": "ai-sysadmin"}


@router.get("/v1/models", dependencies=[Depends(require_key_for_models)])
@router.get("/models", dependencies=[Depends(require_key_for_models)], include_in_schema=False)
async def list_models() -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(m) for m in MODEL_IDS]}


@router.get("/v1/models/{model_id}", dependencies=[Depends(require_key_for_models)])
async def get_model(model_id: str) -> dict[str, Any]:
    if model_id not in MODEL_IDS:
        raise unknown_model(model_id)
    return _model_card(model_id)


# -- routing ------------------------------------------------------------------------------


async def _with_context(gw: GatewayState, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put the sysadmin's system prompt and live context first, merged with the client's
    own system message (chat templates such as Gemma's accept only one)."""
    meta = gw.settings.layers.meta
    # Half a character per token of meta's slot: at most half the slot even for text of
    # ids, paths and numbers (about a character a token); the rest is the system prompt,
    # the conversation and the answer.
    budget = meta.context_size // meta.parallel // 2
    prompt = system_message(await gather_context(gw.context_sources, max_chars=budget))
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        own = first.get("content")
        if isinstance(own, list):
            first["content"] = [{"type": "text", "text": prompt + "\n\n"}, *own]
        else:
            first["content"] = f"{prompt}\n\n{own or ''}".rstrip()
        first["role"] = "system"
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


async def route_chat(gw: GatewayState, body: dict[str, Any]) -> tuple[LayerPool, bytes | None]:
    """Choose the layer for a chat body and prepare it. Returns the pool and, for the
    sysadmin model, the bytes that rename the layer back to ``ai-sysadmin`` in answers."""
    model = body["model"]
    if model != SYSADMIN_MODEL:
        return _layer_for(gw, model)  # a layer name passes through; anything else is a 404
    task_layer = gw.settings.gateway.task_layer
    if task_layer is not None and gw.task_detector.is_task(body):
        body["model"] = task_layer
        return gw.layers[task_layer], task_layer.encode()
    body["messages"] = await _with_context(gw, body["messages"])
    body["model"] = "meta"
    return gw.layers["meta"], b"meta"


# Fields by which a client hands the model tools to call (``functions`` and
# ``function_call``: OpenAI's older names).
TOOL_FIELDS = ("tools", "functions", "tool_choice", "function_call")
# Values that ask for no tool at all: harmless without tools, dropped for the sysadmin.
_NO_TOOL_CHOICE = (None, "none", "auto")


def uses_client_tools(body: dict[str, Any]) -> bool:
    """The request gives the model tools of the client's (or forces a call of one)."""
    return bool(body.get("tools") or body.get("functions")) or any(
        body.get(k) not in _NO_TOOL_CHOICE for k in ("tool_choice", "function_call"))


def refuse_client_tools(body: dict[str, Any], model: str = SYSADMIN_MODEL) -> None:
    """The sysadmin takes no client tools: a 400 naming the field and where tools go.

    An empty ``tools`` list and ``tool_choice: "none"``/``"auto"`` ask for nothing and
    are dropped (some frontends send them with every chat)."""
    for field in TOOL_FIELDS:
        value = body.get(field)
        if field in ("tools", "functions") and value in (None, []):
            body.pop(field, None)
            continue
        if field in ("tool_choice", "function_call") and value in _NO_TOOL_CHOICE:
            body.pop(field, None)
            continue
        raise OpenAIError(
            400,
            f"{field}: model '{model}' does not call client tools: the sysadmin "
            f"investigates with its own read-only action catalog and proposes changes for "
            f"an admin to approve. Send tools to a pass-through model "
            f"({', '.join(LAYER_NAMES)}), served by a llama-server with --jinja and a chat "
            f"template that supports tools.",
            param=field,
            code="tools_not_supported",
        )


def bound_generation(pool: LayerPool, body: dict[str, Any]) -> dict[str, str]:
    """The layer's output cap and stop strings on a client's request; the headers that
    tell the client which cap applied."""
    cap = cap_output(body, pool.layer)
    add_stops(body, stop_strings(pool.layer))
    return {MAX_TOKENS_HEADER: str(cap)}


def chat_watch(gw: GatewayState, pool: LayerPool, body: dict[str, Any],
               stream: bool, include_usage: bool) -> ChatWatch | None:
    """A repetition watch for this chat, or None where none applies: output held to a
    grammar or schema (it ends with the grammar; JSON arrays repeat legitimately), tool
    calls, endpoints that are not llama-server (``timings_per_token`` is llama-server's),
    and a non-streamed answer with logprobs (it is not rebuilt from a stream)."""
    rep = gw.settings.gateway.repetition
    if not rep.enabled or constrained(body) or uses_client_tools(body):
        return None
    if any(e.flavor != "llama-server" for e in pool.endpoints):
        return None
    if not stream:
        if any(body.get(k) for k in ("logprobs", "top_logprobs", "n_probs")):
            return None
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        include_usage = True
    if include_usage:
        body["timings_per_token"] = True  # exact token counts where the answer is cut
    detector = RepetitionDetector(min_repeats=rep.min_repeats, min_tokens=rep.min_tokens,
                                  max_period=rep.max_period)
    return ChatWatch(detector, include_usage=include_usage, collect=not stream)


def _renamer(layer_name: bytes | None, shown: str = SYSADMIN_MODEL) -> Rename | None:
    """The replacement that shows ``shown`` instead of the layer's name in answers."""
    return Rename.of(layer_name, shown)


# -- chat completions --------------------------------------------------------------------


@router.post("/v1/chat/completions", dependencies=[Depends(require_key)])
@router.post("/chat/completions", dependencies=[Depends(require_key)], include_in_schema=False)
async def chat_completions(request: Request) -> Response:
    gw = _gw(request)
    t0 = time.perf_counter()
    req, body = await read_model(request, ChatCompletionRequest, gw.settings.gateway.max_body_bytes)
    requested = req.model
    if requested == SYSADMIN_MODEL:
        refuse_client_tools(body)
    pool, layer_name = await route_chat(gw, body)
    body.pop("metadata", None)
    inv = None
    if requested == SYSADMIN_MODEL and layer_name == b"meta":
        inv = await investigate.prepare(gw, pool, body, key_name(request))
    headers = bound_generation(pool, body)
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    watch = chat_watch(gw, pool, body, req.stream, include_usage)
    if gw.settings.gateway.log_level == "debug":
        log.debug("chat %s → %s: %s", requested, pool.name, json.dumps(body)[:2000])
    if inv is not None:
        return await investigate.respond(gw, inv, pool, body, stream=req.stream, model=requested,
                                         t0=t0, rename=_renamer(layer_name), gate=gw.chat_gate,
                                         watch=watch, headers=headers)
    call = ProxyCall(requested, "chat", t0, rename=_renamer(layer_name), gate=gw.chat_gate,
                     watch=watch)
    return await forward(gw, pool, "/chat/completions", body, call, stream=req.stream,
                         headers=headers)


@dataclass(frozen=True, slots=True)
class ProxyCall:
    """What one proxied request carries from its route to :func:`forward`,
    :func:`open_upstream`, :func:`read_answer` and :func:`relay`.

    ``model``: as the client named it (metrics, error events); ``route``: the metrics
    label; ``t0``: when the request arrived (``time.perf_counter()``); ``rename``: shows
    the client's model name instead of the layer's; ``gate``: the place held until the
    answer is complete; ``watch``: the chat's repetition watch."""

    model: str
    route: str
    t0: float
    rename: Rename | None = None
    gate: ChatGate | None = None
    watch: ChatWatch | None = None


async def forward(
    gw: GatewayState,
    pool: LayerPool,
    path: str,
    body: dict[str, Any],
    call: ProxyCall,
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> Response:
    """Send the request to the layer and answer the client. With ``call.gate``, the
    request holds one of the gate's places until its answer is complete (for a stream:
    until the relay ends). With ``call.watch``, a chat is watched for repetition; a
    non-streamed one (sent to the layer as a stream by :func:`chat_watch`) is then
    collected here."""
    upstream = await open_upstream(gw, pool, path, body, call)
    extra = {LAYER_HEADER: pool.name, **(headers or {})}
    if stream:
        return EventStreamResponse(relay(gw, upstream, call),
                                   headers={**STREAM_HEADERS, **extra})
    raw = await read_answer(gw, upstream, call)
    if call.rename is not None:
        raw = call.rename.answer(raw)
    return Response(raw, media_type="application/json", headers=extra)


STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def open_upstream(
    gw: GatewayState, pool: LayerPool, path: str, body: dict[str, Any], call: ProxyCall
) -> Upstream:
    """A place at ``call.gate`` (``429`` when there is none), then the layer's answer
    head; a layer that refuses or fails is the client's error in OpenAI's shape. On
    success the gate's place is held until :func:`relay` or :func:`read_answer` releases
    it."""
    m = gw.metrics
    gate = call.gate
    if gate is not None:
        try:
            await gate.acquire()
        except OpenAIError:
            m.requests.labels(call.route, call.model, "429").inc()
            raise
    try:
        return await pool.open(path, body)
    except LayerError as exc:
        if gate is not None:
            gate.release()
        m.requests.labels(call.route, call.model, str(exc.status)).inc()
        # Already the client's answer here: the streamed chat of gateway/investigate.py
        # writes an OpenAIError into its stream, where no exception handler can.
        raise openai_error(exc) from None
    except BaseException:
        if gate is not None:
            gate.release()
        raise


def _overhead(upstream: Upstream, call: ProxyCall) -> float:
    # Recorded once the layer's answer is in (a stream's after its last event): on an
    # idle gateway metrics code is cold, and before the first token it would cost the
    # client time.
    return upstream.started - call.t0


async def read_answer(gw: GatewayState, upstream: Upstream, call: ProxyCall) -> bytes:
    """The layer's whole non-streamed answer (a JSON object), within the total timeout;
    with ``call.watch``, collected from its stream and ended where it repeats. Closes
    the upstream response and frees the gate's place."""
    m = gw.metrics
    route, model = call.route, call.model
    pool = upstream.pool
    total = gw.settings.gateway.timeouts.total
    try:
        async with asyncio.timeout(max(0.001, total - (time.perf_counter() - call.t0))):
            if call.watch is None:
                raw = await upstream.read()
            else:
                raw = await collect(upstream, call.watch)
    except (LayerTimeout, TimeoutError):
        m.requests.labels(route, model, "504").inc()
        raise OpenAIError(504, f"layer {pool.name} timed out", code="upstream_timeout") from None
    except LayerError:
        m.requests.labels(route, model, "502").inc()
        raise OpenAIError(502, f"layer {pool.name} broke off its answer",
                          code="upstream_error") from None
    finally:
        await upstream.aclose()
        if call.gate is not None:
            call.gate.release()
        m.overhead.labels(route).observe(_overhead(upstream, call))
    if not _is_json_object(raw):
        # A layer that answers 200 with a body no client can parse is broken: say so
        # (502) rather than hand the client a 200 it cannot read; it counts as a failure.
        upstream.fail("invalid JSON")
        m.requests.labels(route, model, "502").inc()
        raise OpenAIError(502, f"layer {pool.name} answered with invalid JSON",
                          code="upstream_error")
    m.requests.labels(route, model, "200").inc()
    m.latency.labels(route, model).observe(time.perf_counter() - call.t0)
    return raw


async def collect(upstream: Upstream, watch: ChatWatch) -> bytes:
    """A non-streamed answer read from the layer's stream, ended where it repeats."""
    if not upstream.streams:
        return await upstream.read()  # an endpoint that does not stream: as it is
    async for events in upstream.events():
        if watch.scan(events):
            _log_cut(upstream, watch)
            break
        if b"data: [DONE]" in events:
            break
    else:
        if watch.finish_reason is None:
            raise upstream.broke_off("the layer ended the stream early")
    return watch.answer()


def _log_cut(upstream: Upstream, watch: ChatWatch) -> None:
    found = watch.found
    assert found is not None
    log.info("layer %s repeated itself (%d tokens, a unit of %d); answer ended",
             upstream.pool.name, found.tokens, found.period)


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


async def relay(gw: GatewayState, upstream: Upstream, call: ProxyCall) -> AsyncIterator[bytes]:
    """Relay SSE events as they arrive, whole events at a time. If the layer breaks off,
    the client gets an error event and ``[DONE]``; if the client leaves, closing the
    upstream response makes llama-server cancel the generation. With ``call.watch``,
    events are scanned after they were sent (never before the first token); an answer
    that repeats itself is ended with a finishing chunk, usage if asked for, and
    ``[DONE]``, and closing the upstream response ends the generation."""
    m = gw.metrics
    model, rename, watch, t0 = call.model, call.rename, call.watch, call.t0
    ttft: float | None = None
    done = False
    status = "200"
    deadline = t0 + gw.settings.gateway.timeouts.total
    try:
        async for out in upstream.events(rename, deadline=deadline):
            if ttft is None and b"data:" in out:  # a ": ping" comment is no token
                ttft = time.perf_counter() - t0
            if b"data: [DONE]" in out:
                done = True
            yield out
            if watch is not None and not done and watch.scan(out):
                _log_cut(upstream, watch)
                closing = watch.closing_events()
                yield closing if rename is None else rename.events(closing)
                return  # closing the layer's response (below) ends its generation
        if not done:
            status = "502"
            m.stream_errors.labels(model).inc()
            yield error_event(f"layer {upstream.pool.name} ended the stream early",
                              "upstream_error")
            yield DONE
    except LayerTimeout:
        status = "504"
        m.stream_errors.labels(model).inc()
        yield error_event(f"layer {upstream.pool.name} stopped sending (timeout)",
                          "upstream_timeout")
        yield DONE
    except LayerBrokeOff as exc:
        status = "502"
        m.stream_errors.labels(model).inc()
        yield error_event(f"layer {upstream.pool.name} broke off the stream ({exc.cause})",
                          "upstream_error")
        yield DONE
        upstream.fail(exc.cause)
    finally:
        await upstream.aclose()
        if call.gate is not None:
            call.gate.release()
        m.overhead.labels(call.route).observe(_overhead(upstream, call))
        if ttft is not None:
            m.ttft.labels(model).observe(ttft)
        m.requests.labels(call.route, model, status).inc()
        m.latency.labels(call.route, model).observe(time.perf_counter() - t0)


# -- completions and embeddings ------------------------------------------------------------


def _layer_for(gw: GatewayState, model: str) -> tuple[LayerPool, bytes | None]:
    if model in LAYER_NAMES:
        return gw.layers[model], None
    if model == SYSADMIN_MODEL:
        return gw.layers["meta"], b"meta"
    raise unknown_model(model)


@router.post("/v1/completions", dependencies=[Depends(require_key)])
@router.post("/completions", dependencies=[Depends(require_key)], include_in_schema=False)
async def completions(request: Request) -> Response:
    gw = _gw(request)
    t0 = time.perf_counter()
    req, body = await read_model(request, CompletionRequest, gw.settings.gateway.max_body_bytes)
    pool, layer_name = _layer_for(gw, req.model)
    body["model"] = pool.name
    headers = bound_generation(pool, body)
    call = ProxyCall(req.model, "completions", t0, rename=_renamer(layer_name),
                     gate=gw.chat_gate)
    return await forward(gw, pool, "/completions", body, call, stream=req.stream,
                         headers=headers)


@router.post("/v1/embeddings", dependencies=[Depends(require_key)])
@router.post("/embeddings", dependencies=[Depends(require_key)], include_in_schema=False)
async def embeddings(request: Request) -> Response:
    gw = _gw(request)
    t0 = time.perf_counter()
    req, body = await read_model(request, EmbeddingRequest, gw.settings.gateway.max_body_bytes)
    if req.model not in MODEL_IDS:
        raise unknown_model(req.model)
    pool = gw.layers[gw.settings.gateway.embeddings_layer]
    body["model"] = pool.name
    rename = _renamer(pool.name.encode(), req.model) if req.model != pool.name else None
    return await forward(gw, pool, "/embeddings", body,
                         ProxyCall(req.model, "embeddings", t0, rename=rename))

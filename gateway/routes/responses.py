"""``POST /v1/responses``: OpenAI's Responses API for the sysadmin and the pass-through
models, streamed and not.

A Responses request is translated into a chat completion (gateway/responses.py) and then
served exactly as ``/v1/chat/completions`` serves one: the same key, the same model
routing (``ai-sysadmin`` gets its live context, frontend tasks their small layer), the same
output cap (``max_output_tokens`` is the chat's ``max_tokens``, clamped to the layer's
ceiling), stop strings, repetition cut, place among the concurrent chats, timeouts and
errors. The layer's answer is translated back: a ``response`` object, or Responses events.
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from gateway.auth import require_key
from gateway.errors import OpenAIError
from gateway.requests import read_model
from gateway.responses import ResponseEvents, ResponseShape, ResponsesRequest, chat_body, response_object
from gateway.routes.openai import (
    LAYER_HEADER,
    MAX_TOKENS_HEADER,
    STREAM_HEADERS,
    ProxyCall,
    _gw,
    bound_generation,
    chat_watch,
    open_upstream,
    read_answer,
    relay,
    route_chat,
)
from gateway.sse import EventStreamResponse

log = logging.getLogger("ai_sysadmin.gateway")

router = APIRouter(tags=["openai"])
ROUTE = "responses"  # the route label of the gateway's metrics


@router.post("/v1/responses", dependencies=[Depends(require_key)])
@router.post("/responses", dependencies=[Depends(require_key)], include_in_schema=False)
async def create_response(request: Request) -> Response:
    gw = _gw(request)
    t0 = time.perf_counter()
    req, body = await read_model(request, ResponsesRequest, gw.settings.gateway.max_body_bytes)
    chat = chat_body(req, body)
    pool, _ = await route_chat(gw, chat)
    chat.pop("metadata", None)
    headers = bound_generation(pool, chat)
    shape = ResponseShape(req, body, int(headers[MAX_TOKENS_HEADER]))
    if req.stream:
        # Usage comes with the stream's last chunk: response.completed carries it.
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    watch = chat_watch(gw, pool, chat, req.stream, req.stream)
    if gw.settings.gateway.log_level == "debug":
        log.debug("responses %s → %s: %s", req.model, pool.name, json.dumps(chat)[:2000])
    gate = gw.chat_gate
    call = ProxyCall(req.model, ROUTE, t0, gate=gate, watch=watch)
    upstream = await open_upstream(gw, pool, "/chat/completions", chat, call)
    extra = {LAYER_HEADER: pool.name, **headers}
    if req.stream:
        chunks = relay(gw, upstream, call)
        return EventStreamResponse(ResponseEvents(shape).translate(chunks),
                                   headers={**STREAM_HEADERS, **extra})
    raw = await read_answer(gw, upstream, call)
    answer = json.loads(raw)
    if not isinstance(answer.get("choices"), list):
        raise OpenAIError(502, f"layer {pool.name} answered without choices", code="upstream_error")
    return Response(json.dumps(response_object(shape, answer)), media_type="application/json",
                    headers=extra)

"""Event intake and the verdict stream.

``POST /v1/events``: a batch of events, validated and size-limited, idempotent by the
client's ids, committed to the store before the 2xx answer.
``GET /v1/events/stream``: trigger verdicts as Server-Sent Events (``id`` = verdict
sequence number), resumable with ``Last-Event-ID``, filtered by severity and host.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from gateway.auth import require_key, require_key_or_host
from gateway.errors import OpenAIError
from gateway.requests import read_model
from gateway.state import GatewayState, request_store
from layers.events import Event
from layers.pipeline.service import IncidentContext, PipelineService
from layers.store import MAX_SEQ

router = APIRouter(tags=["events"])

SEQ_RE = re.compile(r"[0-9]{1,19}")


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[Event] = Field(min_length=1)


def install(app: FastAPI) -> None:
    """Attach the pipeline (store, trigger stage, context source) to the gateway."""
    gw: GatewayState = app.state.gw
    service = PipelineService(gw.settings, gw.layers)
    gw.pipeline = service

    async def start() -> None:
        await service.start()
        # The pipeline's store is the gateway's one store (store_of): this hook runs first,
        # before anything could have opened another.
        if gw.store is not None:
            raise RuntimeError("the gateway's store was opened before the pipeline started")
        gw.store = service.store
        gw.context_sources.append(IncidentContext(service.store))

    gw.on_start.append(start)
    gw.on_close.append(service.close)
    app.include_router(router)


def pipeline(request: Request) -> PipelineService:
    gw: GatewayState = request.app.state.gw
    if gw.pipeline is None:
        raise RuntimeError("the pipeline is not installed")
    return gw.pipeline


@router.post("/v1/events", dependencies=[Depends(require_key_or_host)])
async def post_events(request: Request) -> dict[str, Any]:
    service = pipeline(request)
    cfg = service.settings.pipeline
    batch, _ = await read_model(request, EventBatch, cfg.max_batch_bytes)
    scope_to_host(batch.events, request.state.host)
    if len(batch.events) > cfg.max_batch_events:
        raise OpenAIError(
            413, f"batch of {len(batch.events)} events exceeds the limit of "
            f"{cfg.max_batch_events}", param="events", code="too_many_events",
        )
    result = await service.intake(batch.events)
    return {
        "object": "event.batch",
        "accepted": len(result.accepted),
        "duplicates": len(result.duplicates),
        "ids": [e.id for e in batch.events],
    }


def scope_to_host(events: list[Event], host: str | None) -> None:
    """A host key posts as its host only: an event without a host (``localhost``) becomes
    the key's host's; one naming another host is refused, and nothing is stored (403)."""
    if host is None:
        return
    for i, e in enumerate(events):
        if e.host == "localhost":
            e.host = host
        elif e.host != host:
            raise OpenAIError(403, f"events.{i}.host: this key is the host {host!r}'s; it "
                              f"may not post events as {e.host!r}", param=f"events.{i}.host",
                              code="host_mismatch")


@router.get("/v1/events/stream", dependencies=[Depends(require_key)])
async def stream(
    request: Request,
    min_severity: Literal["info", "warning", "critical"] | None = Query(None),
    host: str | None = Query(None, max_length=255),
    anomalies_only: bool = Query(False),
    last_event_id: int | None = Query(None, ge=0, le=MAX_SEQ,
                                      description="alternative to the header"),
) -> EventSourceResponse:
    service = pipeline(request)
    header = (request.headers.get("last-event-id") or "").strip()
    after = last_event_id or 0
    if header:
        # ASCII digits within SQL's BIGINT only: int() alone would take "１２", "+1" or
        # "1_000", and a 40-digit number would overflow the query mid-stream (after the
        # 200 went out), breaking the stream instead of refusing the request.
        if not SEQ_RE.fullmatch(header) or int(header) > MAX_SEQ:
            raise OpenAIError(400, "Last-Event-ID must be a verdict sequence number",
                              param="Last-Event-ID", code="invalid_last_event_id")
        after = int(header)
    cfg = service.settings.pipeline
    store = await request_store(request)

    async def verdicts() -> AsyncIterator[dict[str, Any]]:
        cursor = after
        while True:
            horizon = service.bus.last_seq
            batch = await store.verdicts.after(
                cursor, limit=200, min_severity=min_severity, host=host,
                anomalies_only=anomalies_only,
            )
            for v in batch:
                cursor = v.seq
                yield {"id": str(v.seq), "event": "verdict", "data": json.dumps(
                    v.model_dump(mode="json"), separators=(",", ":"))}
            if len(batch) < 200:
                # Verdicts up to the horizon were scanned; sleep until newer ones exist
                # (or a poll interval passes: another gateway may share the store).
                await service.bus.wait(max(cursor, horizon), cfg.poll_interval)

    return EventSourceResponse(verdicts(), ping=int(cfg.stream_keepalive),
                               headers={"Cache-Control": "no-cache"})

"""Notifications: the channels (redacted: scheme and host only) with their delivery
counts, the recent notifications with where each went, and a test send (admin).

Thin: ``layers.notify`` does the work; its delivery worker starts with the gateway.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import require_admin, require_key
from gateway.errors import OpenAIError
from gateway.state import GatewayState, request_store, store_of
from layers.notify.worker import NotifyService

router = APIRouter(tags=["notifications"])


def install(app: FastAPI) -> None:
    """Start the delivery worker on the gateway's store (after the pipeline opened it)."""
    gw: GatewayState = app.state.gw
    service = NotifyService(gw.settings)
    gw.notify = service

    async def start() -> None:
        await service.start(await store_of(gw))

    gw.on_start.append(start)
    gw.on_close.append(service.close)
    app.include_router(router)


def _service(request: Request) -> NotifyService:
    gw: GatewayState = request.app.state.gw
    if gw.notify is None:
        raise RuntimeError("the notification service is not installed")
    return gw.notify


@router.get("/v1/notify/channels", dependencies=[Depends(require_key)])
async def channels(request: Request) -> dict[str, Any]:
    service = _service(request)
    data = await service.channel_view(await request_store(request))
    return {"object": "list", "data": [{"object": "notify.channel", **c} for c in data],
            "problems": service.problems}


@router.get("/v1/notifications", dependencies=[Depends(require_key)])
async def notifications(
    request: Request, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> dict[str, Any]:
    items = await (await request_store(request)).recent_notifications(limit)
    return {"object": "list", "data": [{"object": "notification", **n} for n in items]}


class TestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: str | None = Field(None, max_length=32, description="only this channel")


@router.post("/v1/notify/test", dependencies=[Depends(require_admin)])
async def test(request: Request, body: TestBody | None = None) -> dict[str, Any]:
    """Send a test notification through each channel now (not via the outbox)."""
    service = _service(request)
    only = body.channel if body else None
    if service.worker is None:
        raise OpenAIError(409, "notifications are off (notify.enabled = false)",
                          code="notify_disabled")
    if only is not None and only not in {c.name for c in service.channels}:
        raise OpenAIError(404, f"no notification channel {only!r}", param="channel",
                          code="channel_not_found")
    results = await service.worker.send_probe(only)
    return {"object": "list", "data": results, "problems": service.problems}

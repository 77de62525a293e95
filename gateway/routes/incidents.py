"""Incidents: list, one with its timeline (events, verdicts, review, decision,
proposals), and resolving one (admin)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from gateway.auth import require_admin, require_key
from gateway.errors import OpenAIError
from gateway.routes.events import pipeline
from gateway.state import request_store

router = APIRouter(tags=["incidents"], dependencies=[Depends(require_key)])

Status = Literal["open", "reviewed", "escalated", "resolved", "unreviewed"]


@router.get("/v1/incidents")
async def list_incidents(
    request: Request,
    status: Annotated[list[Status] | None, Query()] = None,
    host: Annotated[str | None, Query(max_length=255, description="only this host's")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    store = await request_store(request)
    items = await store.list_incidents(status=status, host=host, limit=limit)
    return {"object": "list", "data": [{"object": "incident", **i.model_dump()} for i in items]}


@router.get("/v1/incidents/{incident_id}")
async def get_incident(request: Request, incident_id: str) -> dict[str, Any]:
    inc = await (await request_store(request)).get_incident(incident_id)
    if inc is None:
        raise OpenAIError(404, f"no incident {incident_id!r}", param="incident_id",
                          code="incident_not_found")
    return {"object": "incident", **inc.model_dump()}


@router.post("/v1/incidents/{incident_id}/resolve", dependencies=[Depends(require_admin)])
async def resolve_incident(request: Request, incident_id: str) -> dict[str, Any]:
    service = pipeline(request)
    store = await request_store(request)
    if await store.get_incident(incident_id) is None:
        raise OpenAIError(404, f"no incident {incident_id!r}", param="incident_id",
                          code="incident_not_found")
    changed = await store.resolve_incident(
        incident_id, by="admin", remember=service.settings.memory.enabled
    )
    inc = await store.get_incident(incident_id)
    assert inc is not None
    return {"object": "incident", "changed": changed, **inc.model_dump()}

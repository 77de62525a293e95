"""Approvals API: list and show proposed actions (any key), approve or reject (admin key).

Thin: every decision is made by ``layers.actions.service``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.auth import require_admin, require_key_or_host
from gateway.errors import OpenAIError
from gateway.state import GatewayState, request_store
from layers.actions import service
from layers.events import Proposal, ProposalStatus
from layers.store import Store

router = APIRouter(tags=["actions"])


async def _incident(store: Store, incident_id: str | None) -> dict[str, Any] | None:
    if incident_id is None:
        return None
    inc = await store.get_incident(incident_id)
    if inc is None:
        return {"id": incident_id}
    return {"id": inc.id, "title": inc.title, "status": inc.status, "severity": inc.severity,
            "host": inc.host, "unit": inc.unit}


async def _view(store: Store, p: Proposal) -> dict[str, Any]:
    """A proposal as an approver needs it: incident, dry run, rationale, result."""
    return {"object": "action", **p.model_dump(), "incident": await _incident(store, p.incident_id)}


@router.get("/v1/actions", dependencies=[Depends(require_key_or_host)])
async def list_actions(
    request: Request,
    status: Annotated[ProposalStatus | None, Query(description="only this status")] = None,
    incident_id: Annotated[str | None, Query(max_length=128)] = None,
    host: Annotated[str | None, Query(max_length=255, description="only this host's")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    store = await request_store(request)
    await service.expire_due(store)
    scoped: str | None = request.state.host  # a host key reads its own host's only
    if scoped is not None and host not in (None, scoped):
        raise OpenAIError(403, f"this key is the host {scoped!r}'s: it reads that host's "
                          "actions only", param="host", code="host_mismatch")
    items = await store.list_proposals(
        status=[status] if status else None, incident_id=incident_id,
        host=scoped or host, limit=limit,
    )
    return {"object": "list", "data": [await _view(store, p) for p in items]}


@router.get("/v1/actions/{action_id}", dependencies=[Depends(require_key_or_host)])
async def get_action(request: Request, action_id: str) -> dict[str, Any]:
    store = await request_store(request)
    await service.expire_due(store)
    p = await store.get_proposal(action_id)
    if p is None:
        raise OpenAIError(404, f"no action {action_id!r}", param="id", code="action_not_found")
    scoped: str | None = request.state.host
    if scoped is not None and p.host != scoped:
        raise OpenAIError(403, f"this key is the host {scoped!r}'s; action {action_id} is "
                          "not for it", param="id", code="host_mismatch")
    return await _view(store, p)


_APPROVER = re.compile(r"[A-Za-z0-9._@+\-]{1,64}", re.ASCII)


class DecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    approver: str = Field("admin", description="Who decides (recorded as admin:<approver>).")
    reason: str = Field("", max_length=500, description="Why (recorded in the audit log).")
    wait: float = Field(30.0, ge=0, le=600, description="Seconds to wait for the run.")

    @field_validator("approver")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _APPROVER.fullmatch(v):
            raise ValueError("approver: 1-64 of letters, digits and ._@+-")
        return v


async def _decide(request: Request, action_id: str, body: DecisionBody | None,
                  verb: Literal["approve", "reject"]) -> dict[str, Any]:
    gw: GatewayState = request.app.state.gw
    store = await request_store(request)
    body = body or DecisionBody()
    # An ActionError (not found, not pending, refused) is answered by gateway/errors.py.
    if verb == "approve":
        p = await service.approve(store, gw.settings, action_id, body.approver,
                                  runs=gw.action_runs, wait=body.wait)
    else:
        p = await service.reject(store, action_id, body.approver, body.reason)
    return await _view(store, p)


@router.post("/v1/actions/{action_id}/approve", dependencies=[Depends(require_admin)])
async def approve_action(request: Request, action_id: str,
                         body: DecisionBody | None = None) -> dict[str, Any]:
    return await _decide(request, action_id, body, "approve")


@router.post("/v1/actions/{action_id}/reject", dependencies=[Depends(require_admin)])
async def reject_action(request: Request, action_id: str,
                        body: DecisionBody | None = None) -> dict[str, Any]:
    return await _decide(request, action_id, body, "reject")

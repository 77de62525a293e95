"""Agent routes: a fleet host takes the actions approved for it and reports their results.

Host keys only (``Authorization: Bearer aish-host-…``, made by ``ai-sysadmin hosts add``):
an agent claims the oldest approved action for **its** host — a lease, taken in one
statement, so any number of agents and gateways on one store hand each action out once
— and reports how it ended. The server never runs another host's action itself
(layers/actions/service.py, ``_dispatch``); see docs/fleet.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import require_host
from gateway.errors import OpenAIError
from gateway.requests import read_model
from gateway.state import GatewayState, request_store
from layers.events import ActionResult
from layers.store import Store

router = APIRouter(tags=["agent"])
# A long poll claims again when a proposal is written in this process (the store's
# wake-up) and every CLAIM_POLL seconds; when other processes' writes wake it too
# (PostgreSQL's LISTEN/NOTIFY), only every CLAIM_RECHECK seconds, in case a wake-up was
# lost. It looks for a client that went away every DISCONNECT_CHECK seconds.
CLAIM_POLL = 0.25
CLAIM_RECHECK = 5.0
DISCONNECT_CHECK = 1.0
MAX_BODY = 256_000


class ClaimBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wait: float = Field(0.0, ge=0, le=60, description="Seconds to wait for an action.")


class ResultBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["succeeded", "failed"]
    exit_code: int | None = None
    output: str = Field("", max_length=200_000)
    duration: float = Field(0.0, ge=0)
    refused: str | None = Field(None, max_length=2000,
                                description="the agent's own policy refused it: why")


async def _expire(store: Store, gw: GatewayState) -> None:
    fleet = gw.settings.fleet
    for p in await store.proposals.expire_dispatch(local=["localhost", fleet.local_host()],
                                                   dispatch_ttl=fleet.dispatch_ttl):
        await store.audit.append("fleet", p.status, p.id, {"host": p.host,
                                                            "action": p.action})


@router.post("/v1/agent/claim")
async def claim(request: Request, host: Annotated[str, Depends(require_host)]) -> Response:
    gw: GatewayState = request.app.state.gw
    store = await request_store(request)
    body, _ = await read_model(request, ClaimBody, MAX_BODY)
    deadline = time.monotonic() + body.wait
    owner = f"agent:{host}"
    woken = asyncio.Event()
    with store.wakeups.listening("proposals", woken.set):
        while True:
            woken.clear()
            await _expire(store, gw)
            p = await store.proposals.claim(host, owner, gw.settings.fleet.lease_seconds)
            if p is not None:
                await store.audit.append(owner, "claimed", p.id, {
                    "host": host, "action": p.action, "params": p.params})
                return Response(json.dumps({"object": "action", "id": p.id,
                                            "action": p.action, "params": p.params,
                                            "host": p.host, "incident_id": p.incident_id}),
                                media_type="application/json")
            recheck = CLAIM_RECHECK if store.wakeups.across_processes() else CLAIM_POLL
            if not await _wait(request, woken, min(deadline, time.monotonic() + recheck)):
                return Response(status_code=204)
            if time.monotonic() >= deadline and not woken.is_set():
                return Response(status_code=204)


async def _wait(request: Request, woken: asyncio.Event, until: float) -> bool:
    """Wait for a wake-up or ``until``; False when the client went away."""
    while not woken.is_set():
        left = until - time.monotonic()
        if left <= 0:
            break
        if await request.is_disconnected():
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), min(left, DISCONNECT_CHECK))
    return True


@router.post("/v1/agent/actions/{action_id}/result")
async def result(request: Request, action_id: str,
                 host: Annotated[str, Depends(require_host)]) -> dict[str, Any]:
    store = await request_store(request)
    body, _ = await read_model(request, ResultBody, MAX_BODY)
    p = await store.proposals.get(action_id)
    if p is None:
        raise OpenAIError(404, f"no action {action_id!r}", param="id", code="action_not_found")
    owner, _until = await store.proposals.lease_owner(action_id)
    if p.host != host or owner != f"agent:{host}":
        raise OpenAIError(403, f"action {action_id} is not held by host {host!r}",
                          param="id", code="host_mismatch")
    output = body.output if body.refused is None else f"refused by {host}: {body.refused}"
    done = await store.proposals.record_result(
        action_id, body.status, ActionResult(exit_code=body.exit_code, output=output,
                                             duration=body.duration))
    if done is None:
        raise OpenAIError(409, f"action {action_id} is {p.status}, not running (its lease "
                          "may have expired)", code="action_not_running")
    await store.audit.append(f"agent:{host}", "refused" if body.refused else "result",
                             action_id, {"host": host, "status": body.status,
                                         "exit_code": body.exit_code})
    view: dict[str, Any] = {"object": "action", **done.model_dump()}
    return view


"""Layer status (any key) and layer control (admin key).

Control goes to the supervisor running in this process (``ai-sysadmin run``). When the
layers run elsewhere — systemd units on NixOS, ``ai-sysadmin layers serve`` — this
gateway cannot start or stop them and says so with 409 and the command that can.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request

from gateway.auth import require_admin, require_key
from gateway.errors import OpenAIError
from gateway.state import GatewayState
from layers.config import LAYER_NAMES
from layers.layer_status import layer_status
from layers.supervisor import LayerProcess

router = APIRouter(tags=["layers"])

Operation = Literal["start", "stop", "restart"]


def _gw(request: Request) -> GatewayState:
    gw: GatewayState = request.app.state.gw
    return gw


def _proc(gw: GatewayState, name: str) -> LayerProcess | None:
    sup = gw.supervisor
    return sup.layers.get(name) if sup is not None else None


def _check_name(name: str) -> None:
    if name not in LAYER_NAMES:
        raise OpenAIError(404, f"no layer {name!r} (layers: {', '.join(LAYER_NAMES)})",
                          param="name", code="layer_not_found")


@router.get("/v1/layers", dependencies=[Depends(require_key)])
async def list_layers(request: Request) -> dict[str, Any]:
    gw = _gw(request)
    statuses = await asyncio.gather(
        *(layer_status(gw.layers[n], gw.settings, _proc(gw, n)) for n in LAYER_NAMES)
    )
    gw.refresh_gauges()
    return {"object": "list", "data": [{"object": "layer", **s.model_dump()} for s in statuses]}


@router.get("/v1/layers/{name}", dependencies=[Depends(require_key)])
async def get_layer(request: Request, name: str) -> dict[str, Any]:
    _check_name(name)
    gw = _gw(request)
    status = await layer_status(gw.layers[name], gw.settings, _proc(gw, name))
    return {"object": "layer", **status.model_dump()}


@router.post("/v1/layers/{name}/{operation}", dependencies=[Depends(require_admin)])
async def control_layer(request: Request, name: str, operation: Operation) -> dict[str, Any]:
    """Start, stop or restart a layer; waits until a started layer answers ``/health``."""
    _check_name(name)
    gw = _gw(request)
    proc = _proc(gw, name)
    if gw.supervisor is None or proc is None:
        raise OpenAIError(
            409,
            f"layer {name} is not run by this gateway's process (started with `ai-sysadmin "
            "gateway`, or the layer is unmanaged): control it where it runs, e.g. "
            f"`systemctl restart llama-{name}` on NixOS or `ai-sysadmin layers stop|start`",
            code="layer_not_supervised",
        )
    sup = gw.supervisor
    # A SupervisorError is answered by gateway/errors.py: 409 layer_control_refused.
    if operation == "stop":
        await sup.stop_layer(name)
    elif operation == "start":
        await sup.start_layer(name)
    else:
        await sup.restart_layer(name)
    status = await layer_status(gw.layers[name], gw.settings, proc)
    return {"object": "layer", "operation": operation, **status.model_dump()}

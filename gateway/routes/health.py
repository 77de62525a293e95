"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import require_key
from gateway.state import GatewayState

router = APIRouter(tags=["health"])


def _gw(request: Request) -> GatewayState:
    gw: GatewayState = request.app.state.gw
    return gw


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the gateway process answers. Never calls a model."""
    return {"status": "ok"}


@router.get("/ready", dependencies=[Depends(require_key)])
async def ready(request: Request) -> Response:
    """Readiness: every layer has an endpoint answering ``/health`` with 200 whose circuit
    breaker is not open."""
    gw = _gw(request)
    states = await gw.layers.probe_all()
    gw.refresh_gauges()
    layers = {}
    shown: dict[str, str] = dict(states)
    for name, state in shown.items():
        pool = gw.layers[name]
        if state == "ready" and all(
            e.breaker.state == "open" for e in pool.endpoints if e.health == "ready"
        ):
            # /health answers but every healthy endpoint's breaker is open (it fails real
            # requests): requests get 503 now, so readiness must not claim otherwise.
            state = shown[name] = "circuit-open"
        proc = gw.supervisor.layers.get(name) if gw.supervisor is not None else None
        if proc is not None and proc.state == "failed":
            state = shown[name] = "failed"
        layers[name] = {
            "state": state,
            **({"reason": proc.reason} if proc is not None and proc.reason else {}),
            "inflight": pool.limiter.inflight,
            "queued": pool.limiter.waiting,
            "endpoints": [
                {"url": e.url, "role": e.role, "health": e.health, "breaker": e.breaker.state}
                for e in pool.endpoints
            ],
        }
    ok = all(s == "ready" for s in shown.values())
    body = {"status": "ready" if ok else "not ready", "layers": layers}
    if ok:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})


@router.get("/metrics", dependencies=[Depends(require_key)])
async def metrics(request: Request) -> Response:
    gw = _gw(request)
    gw.refresh_gauges()
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

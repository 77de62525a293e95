"""``POST /v1/alertmanager``: Prometheus Alertmanager's webhook receiver.

Point a receiver's ``webhook_configs`` here (docs/alertmanager.md). Authenticated with
a bearer key: one of ``alertmanager.api_keys`` (good for this route only) or any gateway
API key. The alerts are committed to the store before the 2xx answer (Alertmanager
retries on 5xx, and a 4xx tells it not to); the translation lives in
layers/alertmanager.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request

from gateway.auth import authenticate
from gateway.errors import OpenAIError
from gateway.requests import parse_json_object, read_body, validate
from gateway.routes.events import pipeline
from gateway.state import GatewayState, store_of
from layers.alertmanager import SUPPORTED_VERSION, AlertIntake, Notification

log = logging.getLogger("ai_sysadmin.gateway")

PATH = "/v1/alertmanager"


def _bearer(request: Request) -> bytes | None:
    scheme, _, value = (request.headers.get("authorization") or "").partition(" ")
    return value.strip().encode() if scheme.lower() == "bearer" and value.strip() else None


async def require_intake_key(request: Request) -> None:
    """Dependency: a webhook key, else whatever the gateway's API keys allow."""
    gw: GatewayState = request.app.state.gw
    keys = gw.alertmanager_keys
    presented = _bearer(request)
    if presented is not None and keys:
        found = False
        for key in keys:  # every key, no early exit: timing says nothing
            found |= hmac.compare_digest(presented, key)
        if found:
            return
    authenticate(request)


router = APIRouter(tags=["alertmanager"], dependencies=[Depends(require_intake_key)])


def install(app: FastAPI) -> None:
    """The webhook route, and the resolver that follows verdicts (after the pipeline's
    start hook, which opens the store)."""
    gw: GatewayState = app.state.gw
    gw.alertmanager_keys = [
        k.encode() for k in gw.settings.alertmanager.resolved_api_keys()]
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        service = gw.pipeline
        if service is None:
            raise RuntimeError("alertmanager: the pipeline is not installed")
        intake = AlertIntake(gw.settings, await store_of(gw), service.bus, service.intake)
        gw.alertmanager = intake
        tasks.append(asyncio.create_task(intake.follow(), name="alertmanager-resolver"))

    async def close() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        intake = gw.alertmanager
        if intake is not None:
            await intake.save_cursor()

    gw.on_start.append(start)
    gw.on_close.append(close)
    app.include_router(router)


@router.post(PATH)
async def alertmanager_webhook(request: Request) -> dict[str, Any]:
    cfg = pipeline(request).settings.pipeline
    data = parse_json_object(await read_body(request, cfg.max_batch_bytes))
    version = data.get("version")
    if version != SUPPORTED_VERSION:
        raise OpenAIError(
            422, f"Alertmanager webhook payload version {str(version)[:16]!r} is not "
            f"supported (expected {SUPPORTED_VERSION!r}, Alertmanager 0.16 and later)",
            param="version", code="unsupported_version",
        )
    alerts = data.get("alerts")
    if isinstance(alerts, list) and len(alerts) > cfg.max_batch_events:
        raise OpenAIError(
            413, f"notification of {len(alerts)} alerts exceeds the limit of "
            f"{cfg.max_batch_events} (pipeline.max_batch_events); set max_alerts in the "
            "webhook config", param="alerts", code="too_many_alerts",
        )
    note = validate(Notification, data)
    gw: GatewayState = request.app.state.gw
    intake = gw.alertmanager
    if intake is None:
        raise RuntimeError("alertmanager: the intake has not started")
    result = await intake.receive(note)
    if note.truncatedAlerts:
        log.warning("alertmanager: a notification left out %d alerts (max_alerts in the "
                    "webhook config)", note.truncatedAlerts)
    return {
        "object": "alertmanager.notification",
        "accepted": len(result.accepted),
        "duplicates": len(result.duplicates),
        "firing": result.firing,
        "resolved": result.resolved,
        "resolved_incidents": result.resolved_incidents,
        "truncated_alerts": note.truncatedAlerts,
        "ids": result.ids,
    }

"""The FastAPI application: wires routers to the shared state. Thin by design."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.errors import install_error_handlers
from gateway.routes import (
    actions,
    agent,
    alertmanager,
    dashboard,
    events,
    health,
    incidents,
    layer_control,
    notify,
    openai,
    responses,
    schema,
)
from gateway.state import GatewayState
from layers.config import Settings


def create_app(settings: Settings) -> FastAPI:
    state = GatewayState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.close()

    # No anonymous /docs, /redoc or /openapi.json: the schema is served to keys only.
    app = FastAPI(title="ai-sysadmin", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gw = state
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(schema.router)
    app.include_router(openai.router)
    app.include_router(responses.router)  # POST /v1/responses
    app.include_router(actions.router)
    app.include_router(agent.router)  # fleet agents: claim and report their host's actions
    events.install(app)  # the pipeline: store, trigger stage, /v1/events
    alertmanager.install(app)  # POST /v1/alertmanager, after the pipeline (its store)
    notify.install(app)  # the notification outbox's delivery worker (uses that store)
    app.include_router(incidents.router)
    app.include_router(layer_control.router)
    app.include_router(dashboard.router)
    return app

"""uvicorn server construction for the gateway app."""

from __future__ import annotations

import contextlib
from collections.abc import Generator

import uvicorn

from gateway.app import create_app
from gateway.auth import check_bind
from gateway.cors import ASGIApp, with_cors
from gateway.fastpath import FastPaths
from gateway.protocol import HttpProtocol
from layers.config import Settings
from layers.errors import UserError
from layers.supervisor import Supervisor


class BindRefused(UserError):
    """The gateway must not listen where it was asked to."""


def make_server(settings: Settings, supervisor: Supervisor | None = None) -> uvicorn.Server:
    """The gateway's server; ``supervisor`` is the in-process layer supervisor (``run``),
    which gives the API control of the layers."""
    reason = check_bind(settings)
    if reason:
        raise BindRefused(reason)
    g = settings.gateway
    app = create_app(settings)
    app.state.gw.supervisor = supervisor
    # gateway.fast_paths / fast_protocol turn each shortcut off (FastAPI types its ASGI
    # arguments as MutableMapping, hence the ignore).
    served: ASGIApp = FastPaths(app) if g.fast_paths else app  # type: ignore[assignment]
    config = uvicorn.Config(
        with_cors(served, g),  # CORS for every answer, fast path too
        host=settings.gateway.host,
        port=settings.gateway.port,
        log_level=settings.gateway.log_level if settings.gateway.log_level != "debug" else "info",
        access_log=settings.gateway.log_level == "debug",
        lifespan="on",
        http=(HttpProtocol if g.fast_protocol else None) or "auto",
        timeout_graceful_shutdown=5,
        # Many SSE clients hold connections open; keep-alive must not reap them.
        timeout_keep_alive=30,
    )
    return QuietServer(config)


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves SIGINT/SIGTERM to the CLI, which also stops the layers
    and the collector in order; it shuts down when ``should_exit`` is set."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

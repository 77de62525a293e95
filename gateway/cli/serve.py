"""``ai-sysadmin run`` and ``ai-sysadmin gateway``: the stack in the foreground (the
``layers serve`` command runs it too, layers only)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from gateway.auth import check_bind
from gateway.cli.common import PROG, CliError, add_command, run_async, settings_for, setup_logging
from layers import gateway_client
from layers.config import CollectorsConfig, Settings
from layers.supervisor import Supervisor, SupervisorError, port_is_free


def register(sub: Any) -> None:
    add_command(sub, "run", cmd_run, "run everything: the layers, the gateway and the collector")
    add_command(sub, "gateway", cmd_gateway, "run the HTTP API only (layers run elsewhere)")


async def serve_stack(
    settings: Settings, *, with_layers: bool, with_gateway: bool, with_daemon: bool = False
) -> int:
    supervisor = Supervisor(settings) if with_layers else None
    server = None
    serve_task: asyncio.Task[None] | None = None
    daemon_task: asyncio.Task[None] | None = None
    try:
        g = settings.gateway
        refused = check_bind(settings) if with_gateway else None
        if refused:
            raise CliError(refused)
        if with_gateway and not port_is_free(g.host, g.port):
            raise CliError(f"gateway: port {g.port} on {g.host} is already in use")
        if supervisor is not None:
            supervisor.prepare()
        if with_gateway:
            from gateway.server import make_server

            server = make_server(settings, supervisor)  # the API may control these layers
        if supervisor is not None:
            print(f"{PROG}: starting layers (models load in a few seconds)", file=sys.stderr)
            await supervisor.start(wait=True)
            for name, lp in supervisor.layers.items():
                print(f"{PROG}: layer {name} ready on {lp.config.local_url}", file=sys.stderr)
        if server is not None:
            serve_task = asyncio.create_task(server.serve())
            while not server.started and not serve_task.done():
                await asyncio.sleep(0.05)
            if serve_task.done():
                serve_task.result()
                raise CliError(
                    f"gateway: could not listen on {settings.gateway.host}:{settings.gateway.port}"
                )
            print(
                f"{PROG}: gateway listening on http://{g.host}:{g.port} "
                f"(OpenAI base URL http://{g.host}:{g.port}/v1)",
                flush=True,
            )
            if with_daemon:
                daemon_task = asyncio.create_task(_run_daemon(settings))
                done, _ = await asyncio.wait(
                    {serve_task, daemon_task}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    task.result()  # a crashed daemon or server ends `run` with its error
            await asyncio.shield(serve_task)  # a signal must not cancel uvicorn mid-flight
        elif supervisor is not None:
            print(f"{PROG}: layers running; Ctrl-C stops them", flush=True)
            # Nothing else shows a layer given up on here: end with its reason.
            await supervisor.failed.wait()
            raise SupervisorError(supervisor.failure or "a layer failed")
    finally:
        if daemon_task is not None:
            daemon_task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await daemon_task
        if server is not None:
            server.should_exit = True
            if serve_task is not None and not serve_task.done():
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(serve_task), 10)
        if supervisor is not None:
            await asyncio.shield(supervisor.stop())
    return 0


async def _run_daemon(settings: Settings) -> None:
    """The collector and review → meta consumer, posting to the gateway started with it."""
    from layers.daemon import Daemon

    c = settings.collectors
    if c.gateway_url == CollectorsConfig.model_fields["gateway_url"].default:
        c.gateway_url = gateway_client.base_url(settings)
    await Daemon(settings).run()


def cmd_run(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    setup_logging(settings.gateway.log_level)
    return run_async(
        lambda: serve_stack(settings, with_layers=True, with_gateway=True, with_daemon=True)
    )


def cmd_gateway(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    setup_logging(settings.gateway.log_level)
    return run_async(lambda: serve_stack(settings, with_layers=False, with_gateway=True))

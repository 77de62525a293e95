"""What the command modules of gateway/cli/ share: the program name, the one-line
failure (``CliError``), settings and logging, the async runner, and requests to our own
gateway (layers/gateway_client.py) that fail as one line."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from layers import gateway_client
from layers.config import Settings, load_settings
from layers.errors import UserError

PROG = "ai-sysadmin"
EXIT_FAILURE = 1

Handler = Callable[[argparse.Namespace], int]


class CliError(UserError):
    """A failure reported as one line."""


def add_command(parent: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    """A subcommand of ``parent`` (a subparsers action) that runs ``handler``."""
    p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    return p


def add_group(parent: Any, name: str, help: str, dest: str) -> Any:
    """A command with actions of its own (``layers start``): their subparsers action."""
    group = parent.add_parser(name, help=help)
    actions = group.add_subparsers(dest=dest, metavar="ACTION")
    actions.required = True
    return actions


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Request lines of our own HTTP clients are noise at info level.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def settings_for(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def run_async(main: Callable[[], Awaitable[int]]) -> int:
    """Run until done or until SIGINT/SIGTERM, which cancel the main task cleanly."""

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await main()
        except asyncio.CancelledError:
            return 0

    with asyncio.Runner(loop_factory=_loop_factory()) as loop_runner:
        return loop_runner.run(runner())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (uvicorn[standard] brings it): the proxy's hot path is
    event-loop bound, and uvicorn only picks uvloop itself when it owns the loop."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def admin_request(args: argparse.Namespace, what: str, method: str, path: str,
                  body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """A request to the gateway (``--url``, else the configured one) with the admin key
    (else the first API key); its JSON answer, or None. Fails as ``<what>: …``."""
    settings = settings_for(args)
    url = gateway_client.base_url(settings, args.url) + path
    try:
        r = gateway_client.request(method, url, key=gateway_client.admin_key(settings),
                                   json=body, timeout=timeout)
    except gateway_client.GatewayError as exc:
        if exc.cause is not None:
            raise CliError(f"{what}: gateway not reachable at {url}: {exc.cause}") from None
        msg = exc.message if exc.message is not None else exc.body
        raise CliError(f"{what}: {msg} (HTTP {exc.status})") from None
    try:
        return r.json()
    except ValueError:
        return None

"""The ``ai-sysadmin`` command line.

Every failure a user can cause ends in one readable line on stderr and a non-zero exit:
``ai-sysadmin: <what>: <why>``. Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from gateway.auth import check_bind
from gateway.server import BindRefused
from layers import config_toml
from layers.config import CollectorsConfig, ConfigError, Settings, load_settings
from layers.provision.engine import EngineError
from layers.provision.model import ModelError
from layers.supervisor import Supervisor, SupervisorError, port_is_free, read_status

PROG = "ai-sysadmin"
EXIT_FAILURE = 1

class CliError(Exception):
    """A failure reported as one line."""


# One place that decides which exceptions are the user's to fix (a line, exit 1).
USER_ERRORS: tuple[type[Exception], ...] = (
    CliError,
    ConfigError,
    ModelError,
    EngineError,
    SupervisorError,
    BindRefused,
)


Handler = Callable[[argparse.Namespace], int]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Request lines of our own HTTP clients are noise at info level.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _run_async(main: Callable[[], Awaitable[int]]) -> int:
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


# -- run / gateway / layers serve -------------------------------------------------


async def _serve_stack(
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
        g = settings.gateway
        host = "127.0.0.1" if g.host in ("0.0.0.0", "::") else g.host
        c.gateway_url = f"http://{host}:{g.port}"
    await Daemon(settings).run()


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings.gateway.log_level)
    return _run_async(
        lambda: _serve_stack(settings, with_layers=True, with_gateway=True, with_daemon=True)
    )


def cmd_gateway(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings.gateway.log_level)
    return _run_async(lambda: _serve_stack(settings, with_layers=False, with_gateway=True))


def cmd_layers_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings.gateway.log_level)
    return _run_async(lambda: _serve_stack(settings, with_layers=True, with_gateway=False))


# -- layers start / stop / status -------------------------------------------------


def _supervisor_pid(settings: Settings) -> int | None:
    status = read_status(settings.state_dir)
    if not status:
        return None
    pid = status.get("supervisor_pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def cmd_layers_start(args: argparse.Namespace) -> int:
    settings = _settings(args)
    pid = _supervisor_pid(settings)
    if pid is not None:
        raise CliError(f"layers: already running (supervisor pid {pid}); see `{PROG} layers status`")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.state_dir / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "gateway.cli"]
    if args.config:
        argv += ["--config", str(args.config)]
    argv += ["layers", "serve"]
    started = time.time()
    with log_path.open("ab") as log_fh:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=log_fh, start_new_session=True
        )
    print(f"{PROG}: supervisor pid {proc.pid}, log {log_path}", file=sys.stderr)
    deadline = started + settings.engine.health_timeout + 900  # a first run may build
    while time.time() < deadline:
        code = proc.poll()
        if code is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise CliError(f"layers: supervisor exited with code {code}: {' '.join(tail)}")
        status = read_status(settings.state_dir)
        if status and status.get("supervisor_pid") == proc.pid:
            layers = status.get("layers", {})
            assert isinstance(layers, dict)
            if layers and all(v.get("state") == "ready" for v in layers.values()):
                return cmd_layers_status(args)
        time.sleep(0.5)
    raise CliError("layers: not ready in time; see " + str(log_path))


def cmd_layers_stop(args: argparse.Namespace) -> int:
    settings = _settings(args)
    pid = _supervisor_pid(settings)
    if pid is None:
        print(f"{PROG}: layers are not running", file=sys.stderr)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"{PROG}: layers stopped", file=sys.stderr)
            return 0
        time.sleep(0.2)
    raise CliError(f"layers: supervisor pid {pid} did not stop within 30s")


def _probe_layer(url: str) -> dict[str, Any]:
    info: dict[str, Any] = {"health": "down", "slots_busy": None, "slots_total": None}
    try:
        with httpx.Client(timeout=2.0) as client:
            r = client.get(f"{url}/health")
            info["health"] = "ok" if r.status_code == 200 else f"loading ({r.status_code})"
            s = client.get(f"{url}/slots")
            if s.status_code == 200 and isinstance(s.json(), list):
                slots = s.json()
                info["slots_total"] = len(slots)
                info["slots_busy"] = sum(1 for x in slots if x.get("is_processing"))
    except (httpx.HTTPError, ValueError):
        pass
    return info


def cmd_layers_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    status = read_status(settings.state_dir) or {}
    running = _supervisor_pid(settings) is not None
    procs = status.get("layers", {}) if running else {}
    assert isinstance(procs, dict)
    rows = []
    for name, layer in settings.layers.items():
        proc = procs.get(name, {})
        probe = _probe_layer(layer.local_url)
        slots = (
            f"{probe['slots_busy']}/{probe['slots_total']}"
            if probe["slots_total"] is not None
            else "-"
        )
        # A failed layer's record outlives the supervisor that gave up on it.
        records = status.get("layers")
        recorded = records.get(name, {}) if isinstance(records, dict) else {}
        failed = recorded if recorded.get("state") == "failed" else {}
        rows.append(
            {
                "layer": name,
                "port": layer.port,
                "state": proc.get("state") or failed.get("state") or "-",
                "pid": proc.get("pid") or "-",
                "health": probe["health"],
                "slots": slots,
                "threads": proc.get("threads") or "-",
                "restarts": proc.get("restarts", "-"),
                "model": proc.get("model") or (str(layer.model) if layer.model else "(default)"),
                "last_exit": proc.get("last_exit") or failed.get("last_exit"),
                "reason": proc.get("reason") or failed.get("reason"),
            }
        )
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
    else:
        cols = ["layer", "port", "state", "pid", "health", "slots", "threads", "restarts", "model"]
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        print("  ".join(c.upper().ljust(widths[c]) for c in cols))
        for r in rows:
            print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
        for r in rows:
            if r["reason"]:
                print(r["reason"])
            elif r["last_exit"]:
                print(f"layer {r['layer']}: last exit {r['last_exit']}")
    return 0


def cmd_layers_exec(args: argparse.Namespace) -> int:
    """Exec a layer's server with its share of the cores, measured at start: the NixOS
    units run each layer through this, so the split follows the machine they boot on."""
    from layers.supervisor import thread_share, usable_cores

    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise CliError("layers exec: no command after --")
    threads = thread_share(usable_cores(), args.reserved, args.sharers)
    try:
        os.execv(argv[0], [*argv, "--threads", str(threads)])
    except OSError as exc:
        raise CliError(f"layers exec: {argv[0]}: {exc.strerror}") from None
    return EXIT_FAILURE  # not reached: execv replaces this process


# -- config ------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(f"{PROG}: configuration is valid", file=sys.stderr)
    if args.verbose:
        print(settings.model_dump_json(indent=2))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.toml:
        print(config_toml.dumps(settings.model_dump(mode="json")), end="")
    else:
        print(settings.model_dump_json(indent=2))
    return 0


# -- parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="An AI system administrator built from local llama.cpp models."
    )
    parser.add_argument(
        "--config", type=Path, default=None,
        help="TOML configuration file (default: $AI_SYSADMIN_CONFIG or /etc/ai-sysadmin/config.toml)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, handler: Handler, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    add("run", cmd_run, "run everything: the layers, the gateway and the collector")
    add("gateway", cmd_gateway, "run the HTTP API only (layers run elsewhere)")

    layers = sub.add_parser("layers", help="start, stop or inspect the layer servers")
    lsub = layers.add_subparsers(dest="layers_command", metavar="ACTION")
    lsub.required = True
    add("start", cmd_layers_start, "start the layers in the background", lsub)
    add("stop", cmd_layers_stop, "stop the background layers", lsub)
    st = add("status", cmd_layers_status, "each layer's model, port, pid, health, slots", lsub)
    st.add_argument("--json", action="store_true", help="print JSON")
    add("serve", cmd_layers_serve, "run the layers in the foreground", lsub)
    ex = add("exec", cmd_layers_exec,
             "exec a layer server with --threads set to its share of the cores", lsub)
    ex.add_argument("--sharers", type=int, required=True,
                    help="layers on this machine that share the cores left")
    ex.add_argument("--reserved", type=int, default=0,
                    help="threads taken by layers that set their own")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- the server's argv")

    config = sub.add_parser("config", help="check or show the configuration")
    csub = config.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    ck = add("check", cmd_config_check, "validate; print each error with its field", csub)
    ck.add_argument("-v", "--verbose", action="store_true", help="also print the result")
    sh = add("show", cmd_config_show, "print the effective configuration as JSON", csub)
    sh.add_argument("--toml", action="store_true", help="print TOML that loads back as is")

    __import__("gateway.cli_actions").cli_actions.register(sub, add)
    __import__("gateway.cli_pipeline").cli_pipeline.register(sub, add)
    __import__("gateway.cli_eval").cli_eval.register(sub, add)
    __import__("gateway.cli_notify").cli_notify.register(sub, add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except ConfigError as exc:
        for line in exc.lines:
            print(f"{PROG}: config: {line}", file=sys.stderr)
        return EXIT_FAILURE
    except USER_ERRORS as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout.close()
        return 0


if __name__ == "__main__":
    sys.modules.setdefault("gateway.cli", sys.modules[__name__])  # one CliError for extensions
    sys.exit(main())

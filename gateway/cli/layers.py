"""``ai-sysadmin layers start|stop|status|serve|exec``: the layer servers."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from gateway.cli.common import (
    EXIT_FAILURE,
    PROG,
    CliError,
    add_command,
    add_group,
    run_async,
    settings_for,
    setup_logging,
)
from gateway.cli.serve import serve_stack
from layers.config import Settings
from layers.supervisor import read_status


def register(sub: Any) -> None:
    lsub = add_group(sub, "layers", "start, stop or inspect the layer servers", "layers_command")
    add_command(lsub, "start", cmd_layers_start, "start the layers in the background")
    add_command(lsub, "stop", cmd_layers_stop, "stop the background layers")
    st = add_command(lsub, "status", cmd_layers_status,
                     "each layer's model, port, pid, health, slots")
    st.add_argument("--json", action="store_true", help="print JSON")
    add_command(lsub, "serve", cmd_layers_serve, "run the layers in the foreground")
    ex = add_command(lsub, "exec", cmd_layers_exec,
                     "exec a layer server with --threads set to its share of the cores")
    ex.add_argument("--sharers", type=int, required=True,
                    help="layers on this machine that share the cores left")
    ex.add_argument("--reserved", type=int, default=0,
                    help="threads taken by layers that set their own")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- the server's argv")


def cmd_layers_serve(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    setup_logging(settings.gateway.log_level)
    return run_async(lambda: serve_stack(settings, with_layers=True, with_gateway=False))


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
    settings = settings_for(args)
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
    settings = settings_for(args)
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
    settings = settings_for(args)
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

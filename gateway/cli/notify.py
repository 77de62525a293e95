"""CLI for notifications: ``notify test`` and ``notify status``.

Both ask the running gateway (admin key from the configuration, as ``approvals`` does):
it holds the channel URLs (on NixOS, systemd credentials only its unit can read) and
runs the delivery worker. ``notify test --local`` sends from this process instead, with
the channels this configuration names, for a gateway not started yet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from typing import Any

from gateway.cli.common import CliError, add_command, add_group, admin_request, settings_for, when


def _ask(args: argparse.Namespace, method: str, path: str, what: str,
         body: dict[str, Any] | None = None) -> Any:
    return admin_request(args, what, method, path, body, timeout=120)


def _line(r: dict[str, Any]) -> str:
    state = "ok" if r["ok"] else f"failed: {r.get('cause') or 'not delivered'}"
    return f"{r['channel']:<16} {r['target']:<32} {state}"


def cmd_notify_test(args: argparse.Namespace) -> int:
    if args.local:
        results, problems = _test_local(args)
    else:
        body = {"channel": args.channel} if args.channel else {}
        data = _ask(args, "POST", "/v1/notify/test", "notify test", body)
        results, problems = data["data"], data.get("problems") or []
    for p in problems:
        print(f"problem: {p}")
    if not results:
        if not problems:
            print("no notification channels configured (notify.channels, notify.channels_file)")
        return 1
    for r in results:
        print(_line(r))
    # One channel asked for: its own result decides (the problems are others').
    return 0 if all(r["ok"] for r in results) and (args.channel or not problems) else 1


def _test_local(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    from layers.notify.channels import load_channels
    from layers.notify.messages import probe_message
    from layers.notify.send import Sender

    settings = settings_for(args)
    channels, problems = load_channels(settings.notify)
    if args.channel:
        channels = [c for c in channels if c.name == args.channel]
        if not channels:
            raise CliError(f"notify test: no channel {args.channel!r}")
    message = probe_message(settings, socket.gethostname())

    async def main() -> list[dict[str, Any]]:
        sender = Sender(settings.notify.timeout, max(1, len(channels)))
        sender.prepare(channels)
        try:
            results = await asyncio.gather(*(sender.send(c, message) for c in channels))
        finally:
            sender.close()
        return [{"channel": c.name, "target": c.target, "ok": r.ok, "cause": r.cause or None}
                for c, r in zip(channels, results, strict=True)]

    return asyncio.run(main()), problems


def cmd_notify_status(args: argparse.Namespace) -> int:
    data = _ask(args, "GET", "/v1/notify/channels", "notify status")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for p in data.get("problems") or []:
        print(f"problem: {p}")
    if not data["data"]:
        print("no notification channels configured")
    for c in data["data"]:
        print(f"{c['name']:<16} {c['target']:<32} delivered {c['delivered']}, pending "
              f"{c['pending']}, failed {c['failed']}, dropped {c['dropped']}; last sent "
              f"{when(c['last_delivered_at'])}"
              + (f"; last error: {c['last_error']}" if c.get("last_error") else ""))
    return 0


def register(sub: Any) -> None:
    nsub = add_group(sub, "notify", "test notification channels, show their state",
                     "notify_command")
    t = add_command(nsub, "test", cmd_notify_test,
                    "send a test notification through each channel")
    t.add_argument("--channel", default=None, help="only this channel")
    t.add_argument("--local", action="store_true",
                   help="send from this process (channels of this configuration), not the gateway")
    t.add_argument("--url", default=None, help="gateway URL (default: from the config)")
    st = add_command(nsub, "status", cmd_notify_status,
                     "channels (redacted) with their delivery counts")
    st.add_argument("--url", default=None, help="gateway URL (default: from the config)")
    st.add_argument("--json", action="store_true", help="print JSON")

"""CLI for the action stage: ``approvals``, ``audit``, ``kill-switch`` and ``helper``.

``approvals`` talks to the running gateway over HTTP with the admin key from the
configuration (``gateway.admin_key[_file]`` or ``AI_SYSADMIN_GATEWAY__ADMIN_KEY``), so an
approved action runs where every other action runs and the gateway records who approved.
``audit`` and ``kill-switch`` work on local state and need no running gateway (the audit
log is read straight from the store; the kill switch is a file every process checks).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from gateway.cli.common import (
    CliError,
    add_command,
    add_group,
    admin_request,
    run_async,
    settings_for,
    setup_logging,
    when,
)
from layers.actions.policy import kill_switch_engaged, kill_switch_path
from layers.config import Settings


def _request(args: argparse.Namespace, method: str, path: str,
             body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    return admin_request(args, "approvals", method, path, body, timeout)


def _print_action(a: dict[str, Any]) -> None:
    inc = a.get("incident") or {}
    lines = [
        ("id", a["id"]),
        ("status", a["status"] + (f" (merged {a['merge_count']}x)" if a.get("merge_count") else "")),
        ("action", a["action"]),
        ("params", json.dumps(a["params"], sort_keys=True)),
        ("risk", a.get("risk") or "-"),
        ("incident", f"{inc.get('id')} {inc.get('title', '')}".strip() if inc else "-"),
        ("rationale", a.get("rationale") or "-"),
        ("dry run", a.get("dry_run") or "-"),
        ("proposed", when(a.get("created_at"))),
        ("expires", when(a.get("expires_at"))),
        ("decided", f"{when(a.get('decided_at'))} by {a.get('decided_by') or '-'}"),
    ]
    result = a.get("result")
    if result:
        lines.append(("result", f"exit {result['exit_code']} in {result['duration']:.2f}s"))
    for k, v in lines:
        print(f"{k:>10}: {v}")
    if result and result.get("output"):
        print("    output:")
        for line in str(result["output"]).splitlines():
            print(f"    | {line}")


def cmd_approvals_list(args: argparse.Namespace) -> int:
    status = None if args.status == "all" else args.status
    query = f"?limit={args.limit}" + (f"&status={status}" if status else "")
    data = _request(args, "GET", f"/v1/actions{query}")
    items = data["data"]
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    if not items:
        print(f"no {status or ''} actions".replace("  ", " "), file=sys.stderr)
        return 0
    print(f"{'ID':<26} {'STATUS':<9} {'RISK':<9} {'ACTION':<18} {'TARGET':<28} EXPIRES")
    for a in items:
        params = a["params"]
        target = params.get("unit") or params.get("path") or params.get("pid") or ""
        print(f"{a['id']:<26} {a['status']:<9} {(a.get('risk') or '-'):<9} {a['action']:<18} "
              f"{str(target)[:28]:<28} {when(a.get('expires_at'))}")
    return 0


def cmd_approvals_show(args: argparse.Namespace) -> int:
    a = _request(args, "GET", f"/v1/actions/{args.id}")
    if args.json:
        print(json.dumps(a, indent=2))
    else:
        _print_action(a)
    return 0


def _approver(args: argparse.Namespace) -> str:
    if args.approver:
        return str(args.approver)
    return os.environ.get("SUDO_USER") or getpass.getuser()


def cmd_approvals_approve(args: argparse.Namespace) -> int:
    body = {"approver": _approver(args), "wait": args.wait}
    a = _request(args, "POST", f"/v1/actions/{args.id}/approve", body, timeout=args.wait + 30)
    _print_action(a)
    return 0 if a["status"] in ("succeeded", "running", "approved") else 1


def cmd_approvals_reject(args: argparse.Namespace) -> int:
    body = {"approver": _approver(args), "reason": args.reason}
    _print_action(_request(args, "POST", f"/v1/actions/{args.id}/reject", body))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    settings = settings_for(args)

    async def main() -> int:
        from layers.store import open_store

        store = await open_store(settings)
        try:
            after, shown = 0, 0
            while shown < args.limit:
                batch = await store.audit.list(after=after, kind=args.kind, subject=args.subject,
                                               limit=min(500, args.limit - shown))
                if not batch:
                    break
                for e in batch:
                    if args.json:
                        print(e.model_dump_json())
                    else:
                        detail = json.dumps(e.detail, sort_keys=True, ensure_ascii=True)
                        print(f"{e.seq:>6} {when(e.ts)} {e.actor:<22} {e.kind:<9} "
                              f"{e.subject} {detail}")
                after, shown = batch[-1].seq, shown + len(batch)
        finally:
            await store.close()
        return 0

    return asyncio.run(main())


def cmd_kill_switch(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    path = kill_switch_path(settings)
    if args.state == "on":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"engaged {dt.datetime.now().astimezone().isoformat()} "
                        f"by {os.environ.get('SUDO_USER') or getpass.getuser()}\n")
    elif args.state == "off":
        if settings.actions.kill_switch:
            raise CliError("kill-switch: actions.kill_switch = true in the configuration; "
                           "change it there")
        path.unlink(missing_ok=True)
    on = kill_switch_engaged(settings)
    print(f"kill switch {'ON: no change runs' if on else 'off'} ({path})")
    return 0


def cmd_helper(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    setup_logging(settings.gateway.log_level)
    socket_path: Path | None = args.socket or settings.actions.helper_socket
    if socket_path is None:
        raise CliError("helper: give --socket PATH or set actions.helper_socket")
    return run_async(lambda: _serve(settings, socket_path))


async def _serve(settings: Settings, socket_path: Path) -> int:
    from layers.actions.helper import serve_helper

    await serve_helper(settings, socket_path)
    return 0


def register(sub: Any) -> None:
    asub = add_group(sub, "approvals", "list, show, approve or reject proposed actions",
                     "approvals_command")

    def with_url(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--url", default=None, help="gateway URL (default: from the config)")
        return p

    ls = with_url(add_command(asub, "list", cmd_approvals_list, "proposed actions, newest first"))
    ls.add_argument("--status", default="pending",
                    choices=["pending", "approved", "rejected", "expired", "running",
                             "succeeded", "failed", "refused", "all"],
                    help="which actions (default: pending)")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true", help="print JSON")
    sh = with_url(add_command(asub, "show", cmd_approvals_show,
                              "one action: incident, dry run, rationale"))
    sh.add_argument("id")
    sh.add_argument("--json", action="store_true", help="print JSON")
    ap = with_url(add_command(asub, "approve", cmd_approvals_approve,
                              "approve and run a pending action"))
    ap.add_argument("id")
    ap.add_argument("--as", dest="approver", default=None, help="approver name (default: you)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the result")
    rj = with_url(add_command(asub, "reject", cmd_approvals_reject, "reject a pending action"))
    rj.add_argument("id")
    rj.add_argument("--as", dest="approver", default=None, help="approver name (default: you)")
    rj.add_argument("--reason", default="", help="why (kept in the audit log)")

    au = add_command(sub, "audit", cmd_audit, "print the append-only audit log of actions")
    au.add_argument("--limit", type=int, default=1000, help="entries printed (oldest first)")
    au.add_argument("--kind", default=None,
                    help="only proposed|refused|merged|pending|approved|rejected|expired|run|result")
    au.add_argument("--subject", default=None, help="only this action id")
    au.add_argument("--json", action="store_true", help="one JSON object per line")

    ks = add_command(sub, "kill-switch", cmd_kill_switch,
                     "stop all changes at once, or allow them again")
    ks.add_argument("state", choices=["on", "off", "status"])

    hp = add_command(sub, "helper", cmd_helper,
                     "run the root helper that executes catalog actions")
    hp.add_argument("--socket", type=Path, default=None,
                    help="unix socket path (default: actions.helper_socket)")

"""CLI of the pipeline: ``ai-sysadmin daemon``, ``events tail``, ``incidents list|show``.

``events tail`` and ``incidents`` talk to the gateway's HTTP API (``--url``, default the
configured gateway) with the configured API key, like any other client.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from layers.config import Settings


def register(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    add("daemon", cmd_daemon, "run the collectors and the review/meta stages", sub)
    events = sub.add_parser("events", help="the trigger verdict stream")
    esub = events.add_subparsers(dest="events_command", metavar="ACTION")
    esub.required = True
    t = add("tail", cmd_events_tail, "print verdicts as the trigger stage makes them", esub)
    t.add_argument("--severity", choices=["info", "warning", "critical"], default=None,
                   help="only verdicts at or above this severity")
    t.add_argument("--host", default=None, help="only verdicts about this host")
    t.add_argument("--anomalies", action="store_true", help="only anomalies")
    t.add_argument("--after", type=int, default=None,
                   help="start after this verdict id (default: from the beginning)")
    t.add_argument("-n", "--count", type=int, default=None, help="exit after N verdicts")
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    _url_arg(t)

    inc = sub.add_parser("incidents", help="list or show incidents")
    isub = inc.add_subparsers(dest="incidents_command", metavar="ACTION")
    isub.required = True
    ls = add("list", cmd_incidents_list, "incidents, newest first", isub)
    ls.add_argument("--status", action="append",
                    choices=["open", "reviewed", "escalated", "resolved", "unreviewed"],
                    help="only these statuses (repeatable)")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true", help="print JSON")
    _url_arg(ls)
    sh = add("show", cmd_incidents_show, "one incident with its timeline", isub)
    sh.add_argument("id", help="incident id (inc_…)")
    sh.add_argument("--json", action="store_true", help="print JSON")
    _url_arg(sh)


def _url_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="gateway base URL (default: the configured one)")


def _cli() -> Any:
    import gateway.cli as cli

    return cli


def _api(args: argparse.Namespace) -> tuple[Settings, str, dict[str, str]]:
    from layers.daemon import gateway_key

    settings: Settings = _cli()._settings(args)
    g = settings.gateway
    host = "127.0.0.1" if g.host in ("0.0.0.0", "::", "") else g.host
    url = (args.url or f"http://{host}:{g.port}").rstrip("/")
    key = gateway_key(settings)
    return settings, url, ({"Authorization": f"Bearer {key}"} if key else {})


def _get(args: argparse.Namespace, path: str, params: dict[str, Any] | None = None) -> Any:
    _, url, headers = _api(args)
    try:
        r = httpx.get(url + path, params=params, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise _cli().CliError(f"gateway {url}: {type(exc).__name__}: {exc}") from None
    if r.status_code != 200:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text[:200]
        raise _cli().CliError(f"gateway {url}: {r.status_code}: {msg}")
    return r.json()


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def cmd_daemon(args: argparse.Namespace) -> int:
    from layers.daemon import Daemon
    from layers.store import StoreError

    cli = _cli()
    settings = cli._settings(args)
    cli._setup_logging(settings.gateway.log_level)

    async def main() -> int:
        try:
            await Daemon(settings).run()
        except StoreError as exc:
            raise cli.CliError(str(exc)) from None
        return 0

    code: int = cli._run_async(main)
    return code


def cmd_events_tail(args: argparse.Namespace) -> int:
    from layers.daemon import sse_events

    _, url, headers = _api(args)
    params: dict[str, Any] = {}
    if args.severity:
        params["min_severity"] = args.severity
    if args.host:
        params["host"] = args.host
    if args.anomalies:
        params["anomalies_only"] = "true"
    if args.after is not None:
        headers["Last-Event-ID"] = str(args.after)
    cli = _cli()

    async def main() -> int:
        seen = 0
        timeout = httpx.Timeout(10.0, read=None)
        async with httpx.AsyncClient(timeout=timeout) as client:
            try:
                async with client.stream("GET", url + "/v1/events/stream", params=params,
                                         headers=headers) as r:
                    if r.status_code != 200:
                        await r.aread()
                        raise cli.CliError(f"gateway {url}: {r.status_code}: {r.text[:200]}")
                    async for ev in sse_events(r):
                        if ev.get("event") != "verdict":
                            continue
                        v = json.loads(ev["data"])
                        if args.json:
                            print(json.dumps({"id": int(ev["id"]), **v}), flush=True)
                        else:
                            flag = "ANOMALY" if v["anomaly"] else "normal "
                            print(f"{ev['id']:>6} {_ts(v['created_at'])} {v['severity']:<8} "
                                  f"{flag} {v['host']} {v['unit'] or '-'} "
                                  f"[{v['rule'] or '-'}] {v['summary']}", flush=True)
                        seen += 1
                        if args.count is not None and seen >= args.count:
                            return 0
            except httpx.HTTPError as exc:
                raise cli.CliError(f"gateway {url}: {type(exc).__name__}: {exc}") from None
        return 0

    code: int = cli._run_async(main)
    return code


def cmd_incidents_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    data = _get(args, "/v1/incidents", params)["data"]
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if not data:
        print("no incidents", file=sys.stderr)
        return 0
    print(f"{'ID':<25} {'STATUS':<11} {'SEVERITY':<9} {'N':>4} {'UPDATED':<19} TITLE")
    for i in data:
        print(f"{i['id']:<25} {i['status']:<11} {i['severity']:<9} {i['verdict_count']:>4} "
              f"{_ts(i['updated_at'])} {i['title'][:80]}")
    return 0


def cmd_incidents_show(args: argparse.Namespace) -> int:
    inc = _get(args, f"/v1/incidents/{args.id}")
    if args.json:
        print(json.dumps(inc, indent=2))
        return 0
    print(f"{inc['id']}: {inc['title']}")
    print(f"  status {inc['status']}, severity {inc['severity']}, host {inc['host']}, "
          f"unit {inc['unit'] or '-'}, {inc['verdict_count']} anomalies")
    print(f"  opened {_ts(inc['opened_at'])}, updated {_ts(inc['updated_at'])}")
    if inc.get("rule") or inc.get("category"):
        print(f"  rule {inc.get('rule') or '-'}, category {inc.get('category') or '-'}")
    # The title and the lines above are facts; what follows is a model's reading.
    if inc.get("review"):
        r = inc["review"]
        print(f"  review (model's assessment): {r['status']}"
              f"{' (escalate)' if r['escalate'] else ''}: {r['summary']}")
    if inc.get("decision"):
        print(f"  diagnosis (model's assessment): {inc['decision']['diagnosis']}")
    for p in inc.get("proposals", []):
        print(f"  action {p['id']}: {p['action']} {json.dumps(p['params'])} [{p['status']}]")
    print("  timeline:")
    for t in inc["timeline"]:
        d = t["detail"]
        text = d.get("summary") or d.get("message") or d.get("status") or d.get("diagnosis") \
            or d.get("error") or json.dumps(d)[:120]
        print(f"    {_ts(t['ts'])} {t['kind']:<10} {str(text)[:120]}")
    return 0

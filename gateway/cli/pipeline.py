"""CLI of the pipeline: ``ai-sysadmin daemon``, ``events tail``, ``incidents list|show``.

``events tail`` and ``incidents`` talk to the gateway's HTTP API (``--url``, default the
configured gateway) with the configured API key, like any other client
(layers/gateway_client.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

import httpx

from gateway.cli.common import CliError, add_command, add_group, run_async, settings_for, setup_logging
from layers import gateway_client


def register(sub: Any) -> None:
    add_command(sub, "daemon", cmd_daemon, "run the collectors and the review/meta stages")
    esub = add_group(sub, "events", "the trigger verdict stream", "events_command")
    t = add_command(esub, "tail", cmd_events_tail, "print verdicts as the trigger stage makes them")
    t.add_argument("--severity", choices=["info", "warning", "critical"], default=None,
                   help="only verdicts at or above this severity")
    t.add_argument("--host", default=None, help="only verdicts about this host")
    t.add_argument("--anomalies", action="store_true", help="only anomalies")
    t.add_argument("--after", type=int, default=None,
                   help="start after this verdict id (default: from the beginning)")
    t.add_argument("-n", "--count", type=int, default=None, help="exit after N verdicts")
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    _url_arg(t)

    isub = add_group(sub, "incidents", "list or show incidents", "incidents_command")
    ls = add_command(isub, "list", cmd_incidents_list, "incidents, newest first")
    ls.add_argument("--status", action="append",
                    choices=["open", "reviewed", "escalated", "resolved", "unreviewed"],
                    help="only these statuses (repeatable)")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true", help="print JSON")
    _url_arg(ls)
    sh = add_command(isub, "show", cmd_incidents_show, "one incident with its timeline")
    sh.add_argument("id", help="incident id (inc_…)")
    sh.add_argument("--json", action="store_true", help="print JSON")
    _url_arg(sh)


def _url_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="gateway base URL (default: the configured one)")


def _api(args: argparse.Namespace) -> tuple[str, str | None]:
    """The gateway's base URL and the key to send."""
    settings = settings_for(args)
    return gateway_client.base_url(settings, args.url), gateway_client.api_key(settings)


def _get(args: argparse.Namespace, path: str, params: dict[str, Any] | None = None) -> Any:
    url, key = _api(args)
    try:
        r = gateway_client.request("GET", url + path, key=key, params=params, timeout=30,
                                   ok=(200,))
    except gateway_client.GatewayError as exc:
        raise CliError(f"gateway {url}: {_why(exc)}") from None
    return r.json()


def _why(exc: gateway_client.GatewayError) -> str:
    if exc.cause is not None:
        return f"{type(exc.cause).__name__}: {exc.cause}"
    return f"{exc.status}: {exc.message if exc.message is not None else exc.body[:200]}"


def _ts(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def cmd_daemon(args: argparse.Namespace) -> int:
    from layers.daemon import Daemon

    settings = settings_for(args)
    setup_logging(settings.gateway.log_level)

    async def main() -> int:
        await Daemon(settings).run()  # a StoreError ends it as one line (cli.main)
        return 0

    return run_async(main)


def cmd_events_tail(args: argparse.Namespace) -> int:
    url, key = _api(args)
    params: dict[str, Any] = {}
    if args.severity:
        params["min_severity"] = args.severity
    if args.host:
        params["host"] = args.host
    if args.anomalies:
        params["anomalies_only"] = "true"
    after = str(args.after) if args.after is not None else None

    async def main() -> int:
        seen = 0
        gateway = gateway_client.AsyncGateway(url, key, timeout=httpx.Timeout(10.0, read=None))
        try:
            async with gateway.stream(params, last_event_id=after) as r:
                async for ev in gateway_client.sse_events(r):
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
        except gateway_client.GatewayError as exc:
            raise CliError(f"gateway {url}: {exc.status}: {exc.body[:200]}") from None
        except httpx.HTTPError as exc:
            raise CliError(f"gateway {url}: {type(exc).__name__}: {exc}") from None
        finally:
            await gateway.aclose()
        return 0

    return run_async(main)


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

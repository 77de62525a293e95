"""``ai-sysadmin eval``: score the pipeline's stages on the labelled corpus and the
incident scenarios (layers/quality, docs/quality.md).

It uses the configured layers where they already answer (``ai-sysadmin run`` or
``layers start`` on this machine, or remote endpoints); when none of them answers and
all are managed, it starts them for the run like ``layers serve`` does and stops them
afterwards (``--no-start`` refuses instead). Everything it stores goes to a throwaway
store: the admin's incidents are never touched. Progress goes to stderr, the table (or
``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from gateway.cli.common import PROG, CliError, add_command, run_async, settings_for, setup_logging
from layers.config import Settings


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def register(sub: Any) -> None:
    p = add_command(sub, "eval", cmd_eval,
                    "score the trigger, review and meta stages on labelled cases (no model as "
                    "judge)")
    p.add_argument("--stage", choices=["trigger", "review", "meta", "all"], default="all",
                   help="what to score (default: all); review and meta replay the incident "
                   "scenarios, trigger the line corpus")
    p.add_argument("--limit", type=_positive, default=None,
                   help="at most N corpus lines and N scenarios (a quick look; every class "
                   "and both escalation outcomes are still sampled)")
    p.add_argument("--scenario", action="append", default=None, metavar="ID",
                   help="only this incident scenario (its directory name or number, e.g. "
                   "17_port_taken_nginx or 17); repeatable")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--report", type=Path, default=None, metavar="PATH",
                   help="also write the full JSON report to PATH (to compare models later)")
    p.add_argument("--no-start", action="store_true",
                   help="never start layers: fail when the configured ones do not answer")


def _chosen(wanted: list[str] | None) -> list[Any] | None:
    """The scenarios named by ``--scenario`` (None: all); an unknown name is an error."""
    if not wanted:
        return None
    from layers.quality import scenarios as scenario_files

    every = scenario_files.load()
    out = []
    for name in wanted:
        hit = [sc for sc in every if sc.id == name or sc.id.split("_", 1)[0] == name.zfill(2)]
        if not hit:
            raise CliError(f"eval: no scenario {name!r} (one of: "
                               f"{', '.join(sc.id for sc in every)})")
        out += [sc for sc in hit if sc not in out]
    return out


def _needed(stage: str) -> list[str]:
    return ["trigger"] if stage == "trigger" else ["trigger", "review", "meta"]


async def _layers_up(settings: Settings, needed: list[str]) -> dict[str, str]:
    from layers.client import LayerClients

    layers = LayerClients(settings)
    try:
        states = await layers.probe_all()
    finally:
        await layers.aclose()
    return {n: states[n] for n in needed}  # type: ignore[index]


def cmd_eval(args: argparse.Namespace) -> int:
    from layers.client import LayerClients
    from layers.prefilter import RuleError
    from layers.quality.runner import EvalError, evaluate
    from layers.quality.scenarios import ScenarioError
    from layers.quality.table import render
    from layers.supervisor import Supervisor

    settings = settings_for(args)
    chosen = _chosen(args.scenario)
    setup_logging("warning")
    logging.getLogger("ai_sysadmin.supervisor").setLevel(logging.WARNING)

    def say(message: str) -> None:
        print(f"{PROG} eval: {message}", file=sys.stderr, flush=True)

    if args.report is not None and not args.report.parent.is_dir():
        raise CliError(f"eval: --report {args.report}: no such directory")

    async def main() -> int:
        needed = _needed(args.stage)
        states = await _layers_up(settings, needed)
        supervisor = None
        if not all(s == "ready" for s in states.values()):
            down = ", ".join(f"{n} {s}" for n, s in states.items() if s != "ready")
            unmanaged = [n for n in needed if not getattr(settings.layers, n).managed]
            if args.no_start or unmanaged or any(s == "ready" for s in states.values()):
                why = (f"layer {', '.join(unmanaged)} is not managed here" if unmanaged
                       else "some layers are up and others not" if not args.no_start
                       else "--no-start")
                raise CliError(f"eval: layers not ready ({down}; {why}); start them with "
                                   f"`{PROG} layers start` or `{PROG} run`")
            say(f"layers not running ({down}): starting them for this run")
            supervisor = Supervisor(settings)
            supervisor.prepare()
        try:
            if supervisor is not None:
                await supervisor.start(wait=True)
                say("layers ready")
            layers = LayerClients(settings)
            try:
                report = await evaluate(settings, layers, args.stage, args.limit, say,
                                        scenarios=chosen)
            finally:
                await layers.aclose()
        except (EvalError, ScenarioError, RuleError) as exc:
            raise CliError(f"eval: {exc}") from None
        finally:
            if supervisor is not None:
                await asyncio.shield(supervisor.stop())
        data = json.dumps(report.as_dict(), indent=2)
        if args.report is not None:
            try:
                args.report.write_text(data + "\n", encoding="utf-8")
            except OSError as exc:
                raise CliError(f"eval: --report {args.report}: {exc.strerror}") from None
        if args.json:
            print(data)
        else:
            print(render(report))
        return 0

    return run_async(main)

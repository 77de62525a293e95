"""Figures → the Markdown page ``docs/benchmarks.md``: machine, targets with pass/fail,
then one table per suite, every figure as median (min–max) over repeated runs."""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections import defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report_fleet, report_stack
from bench.machine import cpu_model, git_head
from bench.measure import Run, spread
from bench.suites import SuiteResult

NAN = float("nan")


def fmt(triple: tuple[float, float, float], digits: int = 1) -> str:
    lo, med, hi = triple
    if med != med:
        return "–"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def group(runs: list[Run]) -> dict[tuple[str, int, bool], list[Run]]:
    g: dict[tuple[str, int, bool], list[Run]] = defaultdict(list)
    for r in runs:
        g[(r.path, r.concurrency, r.stream)].append(r)
    return g


def added(g: dict[tuple[str, int, bool], list[Run]], path: str, conc: int, stream: bool,
          attr: str) -> list[float]:
    """Per round: the path's percentile minus direct's, same round and concurrency."""
    mine, direct = g.get((path, conc, stream), []), g.get(("direct", conc, stream), [])
    return [getattr(a, attr) - getattr(b, attr) for a, b in zip(mine, direct, strict=False)]


def med(values: list[float]) -> float:
    return spread(values)[1]


@dataclass
class Target:
    name: str
    measured: str
    limit: str
    ok: bool | None  # None: not measured in this run

    def row(self) -> str:
        verdict = {True: "**pass**", False: "**FAIL**", None: "not run"}[self.ok]
        return f"| {self.name} | {self.measured} | {self.limit} | {verdict} |"


def _ratio_target(name: str, num: float, den: float, limit: float, *, le: bool,
                  unit: str = "") -> Target:
    if num != num or den != den or den == 0:
        return Target(name, "–", ("≤ " if le else "≥ ") + f"{limit:g}×", None)
    ratio = num / den
    ok = ratio <= limit if le else ratio >= limit
    shown = f"{ratio:.3f}×" if ratio < 2 else f"{ratio:.2f}×"  # a limit near 1 needs the third digit
    return Target(name, f"{num:.2f}{unit} / {den:.2f}{unit} = {shown}",
                  ("≤ " if le else "≥ ") + f"{limit:g}×", ok)


def targets(results: dict[str, SuiteResult]) -> list[Target]:
    out: list[Target] = []
    stub = results.get("stub")
    if stub:
        g = group(stub.runs)
        for q in ("p50", "p99"):
            gw = med(added(g, "gateway", 16, False, f"{q}_ms"))
            ll = med(added(g, "litellm", 16, False, f"{q}_ms"))
            pt = med(added(g, "passthrough", 16, False, f"{q}_ms"))
            out.append(_ratio_target(f"added latency {q}, c=16: gateway / LiteLLM", gw, ll,
                                     0.10, le=True, unit=" ms"))
            out.append(_ratio_target(f"added latency {q}, c=16: gateway / passthrough", gw, pt,
                                     1.25, le=True, unit=" ms"))
        for conc in (16, 64):
            gw_runs = g.get(("gateway", conc, False), [])
            gw = med([r.rps for r in gw_runs])
            ll = med([r.rps for r in g.get(("litellm", conc, False), [])])
            pt = med([r.rps for r in g.get(("passthrough", conc, False), [])])
            out.append(_ratio_target(f"throughput c={conc}: gateway / LiteLLM", gw, ll, 5, le=False,
                                     unit=" req/s"))
            out.append(_ratio_target(f"throughput c={conc}: gateway / passthrough", gw, pt, 0.8,
                                     le=False, unit=" req/s"))
            errs = sum(r.errors for r in gw_runs)
            out.append(Target(f"gateway errors, c={conc}", str(errs), "0",
                              errs == 0 if gw_runs else None))
    real = results.get("real")
    if real:
        g = group(real.runs)
        gw = med([r.ttft_p50_ms for r in g.get(("gateway", 1, True), [])])
        d = med([r.ttft_p50_ms for r in g.get(("direct", 1, True), [])])
        out.append(_ratio_target("TTFT on the real model: gateway / direct", gw, d, 1.05, le=True,
                                 unit=" ms"))
    streams = results.get("open_streams")
    if streams:
        runs = [r for r in streams.runs if r.path == "gateway"]
        growth = streams.extra.get("rss_growth_mb.gateway", [])
        if runs:
            n = runs[0].concurrency
            errs = sum(r.errors for r in runs)
            # Capability: some round had all n open at once. A round on a busy machine can
            # open them more slowly than the stub holds them; every round is listed.
            held = [r.peak_open for r in runs]
            ok = errs == 0 and max(held) == n and max(growth) < 200
            out.append(Target(f"{n} open streams through the gateway (slow stub)",
                              f"open at once per round {held}, {errs} errors, "
                              f"RSS growth ≤ {max(growth):.0f} MB",
                              f"{n}, 0 errors, < 200 MB", ok))
    pipe = results.get("pipeline")
    if pipe:
        naive, batched = pipe.extra.get("trigger_naive_vps"), pipe.extra.get("trigger_batched_vps")
        if naive and batched and med(batched) == 0:
            out.append(Target("trigger verdicts/s: batched / naive",
                              "no batch finished within its time budget", "≥ 5×", None))
        elif naive and batched:
            out.append(_ratio_target("trigger verdicts/s: batched / naive", med(batched),
                                     med(naive), 5, le=False, unit="/s"))
        else:
            out.append(Target("trigger verdicts/s: batched / naive", "–", "≥ 5×", None))
        lps = pipe.extra.get("prefilter_lines_per_s")
        if lps:
            out.append(Target("prefilter lines/s on one core", f"{med(lps):,.0f}", "≥ 100,000",
                              med(lps) >= 100_000))
        else:
            out.append(Target("prefilter lines/s on one core", "–", "≥ 100,000", None))
    return out + report_stack.targets(results) + report_fleet.targets(results)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def measured_here() -> dict[str, str]:
    """Where and when a suite ran: kept with its figures, because a page may show suites
    measured on different machines (a run of some suites keeps the others' figures)."""
    return {"date": now(), "machine": f"{os.cpu_count()} cores ({cpu_model()})",
            "git": git_head()}


def provenance(results: dict[str, SuiteResult]) -> str:
    """One line: each suite's date, machine and commit."""
    parts = []
    for name, r in results.items():
        m = r.extra.get("measured")
        parts.append(f"{name} {m['date']} on {m['machine']}, git {m['git']}" if m
                     else f"{name} (not recorded)")
    return "- Where each suite's figures come from: " + "; ".join(parts) + "."


def machine(extra_versions: dict[str, str], date: str | None = None) -> list[str]:
    cpu = cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    git = git_head()
    versions = {
        "Python": platform.python_version(),
        "ai-sysadmin": f"{_version('ai-sysadmin')} (git {git or '?'})",
        "fastapi": _version("fastapi"), "starlette": _version("starlette"),
        "uvicorn": _version("uvicorn"), "httpx": _version("httpx"), "uvloop": _version("uvloop"),
        **extra_versions,
    }
    return [
        f"- Date: {date or now()}",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]


def _stub_tables(res: SuiteResult) -> list[str]:
    g = group(res.runs)
    lines = [
        "### Zero-latency stub upstream, non-stream",
        "",
        "| path | concurrency | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms "
        "| CPU ms/request | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    paths = [p for p in ("direct", "passthrough", "lean", "gateway", "litellm") if (p, 1, False) in g]
    for conc in (1, 16, 64):
        for p in paths:
            runs = g.get((p, conc, False), [])
            if not runs:
                continue
            a50 = fmt(spread(added(g, p, conc, False, "p50_ms")), 2) if p != "direct" else "–"
            a99 = fmt(spread(added(g, p, conc, False, "p99_ms")), 2) if p != "direct" else "–"
            lines.append(
                f"| {p} | {conc} | {fmt(spread([r.rps for r in runs]), 0)} "
                f"| {fmt(spread([r.p50_ms for r in runs]), 2)} "
                f"| {fmt(spread([r.p99_ms for r in runs]), 2)} | {a50} | {a99} "
                f"| {fmt(spread([r.cpu_ms_per_req for r in runs]), 3)} "
                f"| {sum(r.errors for r in runs)} |"
            )
    lines += [
        "",
        "### Zero-latency stub upstream, streams (8 chunks each), concurrency 16",
        "",
        "| path | streams/s | TTFT p50 ms | TTFT p99 ms | inter-chunk p50 ms | CPU ms/stream "
        "| errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in paths:
        runs = g.get((p, 16, True), [])
        if runs:
            lines.append(
                f"| {p} | {fmt(spread([r.rps for r in runs]), 0)} "
                f"| {fmt(spread([r.ttft_p50_ms for r in runs]), 2)} "
                f"| {fmt(spread([r.ttft_p99_ms for r in runs]), 2)} "
                f"| {fmt(spread([r.inter_chunk_p50_ms for r in runs]), 3)} "
                f"| {fmt(spread([r.cpu_ms_per_req for r in runs]), 3)} "
                f"| {sum(r.errors for r in runs)} |"
            )
    lines += [
        "",
        "### Memory (RSS of the server process tree)",
        "",
        "| path | idle MB | peak under load MB (c=64) | after the suite MB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for p in paths:
        peak = spread([r.rss_peak_mb for r in g.get((p, 64, False), [])])
        lines.append(f"| {p} | {res.idle_rss_mb.get(p, NAN):.0f} | {fmt(peak, 0)} "
                     f"| {res.extra.get(f'rss_after_mb.{p}', NAN):.0f} |")
    return lines


def _open_streams_table(res: SuiteResult) -> list[str]:
    lines = [
        "### Open streams held at once (slow stub: one chunk every 500 ms)",
        "",
        "| path | streams | open at once | completed | errors | RSS idle MB | RSS growth MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("gateway", "passthrough"):
        runs = [r for r in res.runs if r.path == name]
        if not runs:
            continue
        lines.append(
            f"| {name} | {runs[0].concurrency} "
            f"| {fmt(spread([float(r.peak_open) for r in runs]), 0)} "
            f"| {fmt(spread([float(r.ok) for r in runs]), 0)} | {sum(r.errors for r in runs)} "
            f"| {fmt(spread(res.extra.get(f'rss_idle_mb.{name}', [])), 0)} "
            f"| {fmt(spread(res.extra.get(f'rss_growth_mb.{name}', [])), 0)} |"
        )
    return lines


def _real_tables(res: SuiteResult) -> list[str]:
    g = group(res.runs)
    paths = [p for p in ("direct", "relay", "passthrough", "lean", "gateway", "litellm")
             if (p, 1, True) in g]
    lines = [
        "### Real model (llama-server, gemma3-270m Q4_K_M, 4 slots)",
        "",
        "Streams (8 tokens, the same short prompt) at concurrency 1 with the paths taken in turn "
        "request by request, 0.1 s apart, in orders where each path follows each other equally "
        f"often ({len(g.get(('direct', 1, True), []))} rounds of "
        f"{sum(r.ok for r in g.get(('direct', 1, True), [])[:1])} streams per path; each "
        "figure the median over rounds), so a "
        "shared machine's drift and one proxy's work after its answer fall on every path "
        "alike; TTFT is until the first chunk with content. `relay` (`bench/tcp_relay.py`) "
        "copies bytes with no HTTP parsing: the cost of a proxy's extra hop alone.",
        "",
        "| path | TTFT p50 ms | TTFT / direct | inter-chunk p50 ms | latency p50 c=1 ms "
        "| added p50 c=1 ms | req/s c=4 | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    direct_ttft = med([r.ttft_p50_ms for r in g.get(("direct", 1, True), [])])
    slots = max((c for (_, c, s) in g if not s), default=4)
    for p in paths:
        st = g.get((p, 1, True), [])
        ttft = spread([r.ttft_p50_ms for r in st])
        n1 = g.get((p, 1, False), [])
        n4 = g.get((p, slots, False), [])
        a50 = fmt(spread(added(g, p, 1, False, "p50_ms")), 2) if p != "direct" else "–"
        lines.append(
            f"| {p} | {fmt(ttft, 2)} | {ttft[1] / direct_ttft:.3f}× "
            f"| {fmt(spread([r.inter_chunk_p50_ms for r in st]), 2)} "
            f"| {fmt(spread([r.p50_ms for r in n1]), 1)} | {a50} "
            f"| {fmt(spread([r.rps for r in n4]), 1)} "
            f"| {sum(r.errors for r in st + n1 + n4)} |"
        )
    added_ttft = [(p, res.extra[f"ttft_added_ms.{p}"]) for p in paths
                  if f"ttft_added_ms.{p}" in res.extra]
    if added_ttft:
        lines += [
            "",
            "TTFT a path adds to direct, paired: the median of the differences between a "
            "path's stream and the direct stream of the same turn, over all rounds, with a "
            "90 % bootstrap interval. Pairs cancel the drift both share, and the interval "
            "shows how precisely the added time is known. It is the typical added time of one "
            "stream, not the same statistic as the ratio of the two paths' median TTFTs in "
            "the table above (which the target uses), and it can be the larger of the two.",
            "",
            "| path | added TTFT ms (90 % interval) | as a share of direct's TTFT |",
            "| --- | ---: | ---: |",
        ]
        for p, (m, lo, hi) in added_ttft:
            lines.append(f"| {p} | {m:+.2f} ({lo:+.2f} to {hi:+.2f}) "
                         f"| {m / direct_ttft:+.1%} ({lo / direct_ttft:+.1%} to "
                         f"{hi / direct_ttft:+.1%}) |")
    return lines


def _pipeline_table(res: SuiteResult) -> list[str]:
    lines = ["### Pipeline", "", "| figure | value |", "| --- | ---: |"]
    labels = {
        "prefilter_lines_per_s": ("prefilter alone, journal lines/s (one core)", 0),
        "replay_lines_per_s": ("journal replay: JSON parse + Event + prefilter, lines/s", 0),
        "trigger_naive_vps": ("trigger verdicts/s, naive (keyed object, one event per request, "
                              "sequential)", 2),
        "trigger_single_vps": ("trigger verdicts/s, compact encoding, one event per request", 2),
        "trigger_sequential_batches_vps": ("trigger verdicts/s, batched, one batch at a time",
                                           2),
        "trigger_batched_vps": ("trigger verdicts/s, batched + parallel slots (the trigger stage)",
                                2),
        "trigger_failed_events.naive": ("events without a valid verdict, naive", 0),
        "trigger_failed_events.single": ("events without a valid verdict, compact single", 0),
        "trigger_failed_events.batched": ("events without a valid verdict, batched", 0),
        "trigger_failed_events.parallel": ("events without a valid verdict, parallel", 0),
        "e2e_single_p50_ms": ("event → verdict through the gateway, one event at a time, "
                              "p50 ms", 0),
        "e2e_p50_ms": ("event → verdict through the gateway, burst, p50 ms", 0),
        "e2e_p99_ms": ("event → verdict through the gateway, burst, p99 ms", 0),
        "e2e_burst_vps": ("verdicts/s through the gateway's trigger stage (burst)", 2),
    }
    for key, (label, digits) in labels.items():
        vals = res.extra.get(key)
        lines.append(f"| {label} | {fmt(spread(vals), digits) if vals else 'not measured'} |")
    return lines + [""] + [f"- {n}" for n in res.notes]


def render(results: dict[str, SuiteResult], versions: dict[str, str], plots: list[str],
           command: str, elapsed: float, date: str | None = None) -> str:
    tg = targets(results)
    out = [
        "# Benchmarks",
        "",
        "How much the gateway costs on top of the model, next to the anchors, measured in "
        "one run on one machine: the upstream called **direct**, a **minimal passthrough** "
        "(FastAPI + httpx in a dozen lines, `bench/minimal_passthrough.py`: the floor for a "
        "Python gateway), a **lean** reference proxy (`bench/lean_proxy.py`: bare ASGI on "
        "uvicorn and a raw asyncio keep-alive client, no FastAPI, no httpx — what a Python "
        "hot path can cost), this **gateway** with its production features on (API-key auth, "
        "Prometheus metrics, per-layer limits, breakers) and **LiteLLM**'s proxy "
        "(`litellm[proxy]` from PyPI in its own virtual environment, master key set, "
        "`openai/…` provider with `api_base`). Two upstreams: a zero-latency stub "
        "(`bench/stub_upstream.py`, a fake that says so in `/v1/models`; it isolates each "
        "proxy's own cost) and a real `llama-server` with the default model.",
        "",
        f"This page was written by `{command}` in {elapsed / 60:.1f} min. Regenerate it with "
        "`make bench` (options through `BENCH_ARGS=...`):",
        "",
        "- `--quick`: shorter runs and fewer rounds (about a third of the time);",
        "- `--suites stub,open_streams,real,pipeline,threads,detection,notify,fleet`: choose "
        "suites (`threads`: the three layers busy at once for several CPU thread splits; "
        "`detection`: event → verdict with and without streaming chats, and a trigger burst, "
        "on the supervisor's stack; `fleet`: agents, 1 and 2 gateways and one PostgreSQL, "
        "docs/fleet.md); the suites not run keep their figures from the last run "
        "that measured them (`docs/bench/figures.json`), each with its own load average;",
        "- `--first-run`: on its own, `make run` in a fresh clone with an empty cache and the "
        "README's first request (10–20 min: it builds llama-server); its figures are added "
        "to this page and kept by later runs until it is measured again;",
        "- `--suites http_ab`: on its own, the layer client's transport (`layers/http.py`) "
        "against aiohttp behind the same interface (`bench/http_ab.py`; aiohttp pinned in "
        "`…/bench-venvs/http_ab`, never in the project's venv); its figures are added to this "
        "page and kept by later runs;",
        "- `--paths passthrough,lean,gateway,litellm`: choose the proxies compared with direct;",
        "- `--profile`: sample the gateway with py-spy under load and add its hot spots;",
        "- `--reps N`, `--duration S`, `--open-streams N`, `--out`, `--plots`, `--json`.",
        "",
        "LiteLLM is installed once into `~/.cache/ai-sysadmin/bench-venvs/litellm`, pinned by "
        "version and by the sha256 of its wheels (`bench/requirements/litellm.txt`, pip's "
        "`--require-hashes`; a venv holding another version is refused), matplotlib, "
        "py-spy and pyinstrument into `…/bench-venvs/tools`; never into the project's venv. "
        "The versions measured are listed under Machine. All figures are also saved in "
        "`docs/bench/figures.json` (`--render` rewrites this page from it). "
        "`python -m bench.profile --target gateway [--stream]` profiles one proxy on its own. "
        "Every server listens on a free loopback port; every load is bounded in count and time.",
        "",
        "## Machine",
        "",
        *machine(versions, date),
        "- The load generator (`bench/load.py`, raw asyncio + uvloop, closed loop) runs on the "
        "same two cores as the servers, and the machine may be shared with other work (the "
        "load averages below say how busy it was): absolute figures are pessimistic; the "
        "ratios compare paths measured in interleaved rounds of the same run.",
        "",
        "- 1-minute load average (start → end) of each suite, on 2 cores: "
        + ", ".join(f"{k} {r.load[0]:.1f} → {r.load[1]:.1f}" for k, r in results.items())
        + ".",
        provenance(results),
        "",
        "Every figure is **median (min–max)** over repeated runs. *Added latency* is a path's "
        "percentile minus direct's in the same round.",
        "",
        "## Targets",
        "",
        "| target | measured (medians) | limit | result |",
        "| --- | --- | --- | --- |",
        *[t.row() for t in tg],
        "",
        "## Figures",
        "",
    ]
    if "stub" in results:
        out += _stub_tables(results["stub"]) + [""]
        prof = results["stub"].extra.get("profile")
        if prof:
            out += ["### Where the gateway's CPU goes (py-spy, stub, concurrency 16)", "",
                    "```", str(prof), "```", ""]
    if "open_streams" in results:
        out += _open_streams_table(results["open_streams"]) + [""]
    if "real" in results:
        out += _real_tables(results["real"]) + [""]
    if "pipeline" in results:
        out += _pipeline_table(results["pipeline"]) + [""]
    if "threads" in results:
        out += report_stack.threads_table(results["threads"]) + [""]
    if "detection" in results:
        out += report_stack.detection_table(results["detection"]) + [""]
    if "fleet" in results:
        out += report_fleet.fleet_table(results["fleet"]) + [""]
    if "first_run" in results:
        out += report_stack.first_run_section(results["first_run"]) + [""]
    if "http_ab" in results:
        from bench.http_ab import section

        out += section(results["http_ab"].extra["http_ab"]) + [""]
    own_notes = ("pipeline", "threads", "detection", "first_run", "fleet")
    notes = [n for k, r in results.items() if k not in own_notes for n in r.notes]
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}](bench/{Path(p).name})" for p in plots] + [""]
    return "\n".join(out)


def summary(results: dict[str, SuiteResult]) -> dict[str, Any]:
    """Everything but the raw latency lists, for ``--json`` and ``--render``."""
    return {
        name: {
            "runs": [r.model_dump() for r in res.runs],
            "idle_rss_mb": res.idle_rss_mb,
            "extra": res.extra,
            "notes": res.notes,
            "load": res.load,
        }
        for name, res in results.items()
    }

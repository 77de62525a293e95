"""The page's sections for the suites that run the whole stack: the CPU thread split
(``bench/threads.py``), detection under load (``bench/detection.py``) and the first run
(``bench/first_run.py``), with their targets."""

from __future__ import annotations

from typing import Any

from bench.measure import spread
from bench.suites import SuiteResult

LAYERS = ("trigger", "review", "meta")
SPLIT_LABELS = {
    "alone": "one layer alone, threads unset",
    "t1": "1 thread each",
    "t2": "2 threads each (llama-server's default on 2 cores)",
    "rule": "threads unset: the supervisor's rule",
}
THREE_LAYER_SPLITS = ("t1", "t2", "rule")
STALL_LIMIT_S = 60.0
README_ANSWER_LIMIT_S = 10.0


def _fmt(values: list[float] | None, digits: int = 1) -> str:
    if not values:
        return "–"
    lo, med, hi = spread(values)
    if med != med:
        return "–"
    if lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _med(values: list[float] | None) -> float:
    return spread(values or [])[1]


def _target(name: str, measured: str, limit: str, ok: bool | None) -> Any:
    from bench.report import Target

    return Target(name, measured, limit, ok)


def split_totals(ex: dict[str, Any]) -> dict[str, float]:
    """Median total tok/s of every three-layer split measured."""
    out = {}
    for key in THREE_LAYER_SPLITS:
        med = _med(ex.get(f"threads.{key}.total"))
        if med == med:
            out[key] = med
    return out


def targets(results: dict[str, SuiteResult]) -> list[Any]:
    from bench.report import _ratio_target

    out = []
    threads = results.get("threads")
    if threads:
        totals = split_totals(threads.extra)
        best = max(totals.values(), default=float("nan"))
        best_key = max(totals, key=lambda k: totals[k]) if totals else "?"
        t = _ratio_target(
            f"three layers busy, total tok/s: the supervisor's split / the best measured "
            f"({SPLIT_LABELS.get(best_key, best_key)})",
            totals.get("rule", float("nan")), best, 0.9, le=False, unit=" tok/s")
        out.append(t)
    det = results.get("detection")
    if det:
        ex = det.extra
        idle, chat = _med(ex.get("detect.idle_p50_ms")), _med(ex.get("detect.chat_p50_ms"))
        out.append(_ratio_target("event → verdict p50: while 4 chats stream / idle", chat, idle,
                                 2, le=True, unit=" ms"))
        if "burst.events" in ex:
            n, got = ex["burst.events"], ex.get("burst.verdicts", 0)
            gap, total = _med(ex.get("burst.max_gap_s")), _med(ex.get("burst.total_s"))
            out.append(_target(
                f"trigger burst of {n} candidates: every verdict, no stall",
                f"{got}/{n} verdicts in {total:.0f} s, longest wait {gap:.0f} s",
                f"all, no wait > {STALL_LIMIT_S:.0f} s",
                got == n and gap <= STALL_LIMIT_S))
            tr = ex.get("burst.traffic") or {}
            resends = tr.get("identical_resends")
            after = ", ".join(f"{v} after {k}" for k, v in (tr.get("resend_after") or {}).items())
            out.append(_target(
                "trigger burst: resends of identical work (counted at the trigger layer)",
                f"{resends} of {tr.get('requests')} requests" + (f" ({after})" if after else ""),
                "0", None if resends is None else resends == 0))
        else:
            out.append(_target("trigger burst of 300+ candidates", "not measured", "–", None))
    first = results.get("first_run")
    if first:
        ex = first.extra
        if "first_run.gateway_s" in ex:
            ans = ex.get("first_run.answer_s")
            ok = (ex.get("first_run.answer_status") == 200 and ans is not None
                  and ans <= README_ANSWER_LIMIT_S)
            out.append(_target(
                "first run: the README's request on a fresh `make run`",
                f"gateway after {ex['first_run.gateway_s'] / 60:.1f} min; answer in "
                f"{ans:.1f} s ({ex.get('first_run.answer_tokens')} tokens, finish "
                f"{ex.get('first_run.answer_finish')})" if ans is not None else "no answer",
                f"answer ≤ {README_ANSWER_LIMIT_S:.0f} s", ok))
        else:
            out.append(_target("first run: `make run` from an empty cache",
                               str(ex.get("first_run.failed", "failed")), "gateway listening",
                               False))
    return out


def threads_table(res: SuiteResult) -> list[str]:
    ex = res.extra
    lines = [
        "### CPU thread split: three layers busy at once",
        "",
        f"The supervisor's three layers on the default model, each sent one stream at a time "
        f"of {ex.get('threads.tokens', 128)} tokens (`ignore_eos`), back to back, all layers "
        f"at once for {ex.get('threads.window_s', 0):.0f} s ({ex.get('threads.rounds', 0)} "
        f"round(s), the splits in turn); tok/s are the tokens that arrived in the window. "
        f"Threads as each llama-server reports them (`n_threads`; trigger, review, meta), "
        f"next to the `--threads` the supervisor passed. {ex.get('threads.cores', '?')} "
        f"usable cores; the rule gives each of 3 layers max(1, cores // 3) = "
        f"{ex.get('threads.rule_value', '?')}.",
        "",
        "| layers busy | split | threads of each | `--threads` passed | tok/s of each "
        "| total tok/s |",
        "| ---: | --- | --- | --- | --- | ---: |",
    ]
    for key, label in SPLIT_LABELS.items():
        if f"threads.{key}.total" not in ex:
            continue
        eff = ex.get(f"threads.{key}.effective") or {}
        flag = ex.get(f"threads.{key}.flag") or {}
        names = [n for n in LAYERS if f"threads.{key}.tps.{n}" in ex]
        threads = ", ".join(str(eff.get(n, "?")) for n in names)
        passed = ", ".join("none" if flag.get(n) is None else str(flag[n]) for n in names)
        each = ", ".join(f"{n} {_fmt(ex[f'threads.{key}.tps.{n}'])}" for n in names)
        lines.append(f"| {len(names)} | {label} | {threads} | {passed} | {each} "
                     f"| {_fmt(ex[f'threads.{key}.total'])} |")
    errors = [e for key in SPLIT_LABELS for e in ex.get(f"threads.{key}.errors", [])]
    if errors:
        lines += ["", f"Errors while measuring: {len(errors)}, e.g. `{errors[0]}`."]
    return lines + [""] + [f"- {n}" for n in res.notes]


def _traffic_row(label: str, tr: dict[str, Any] | None) -> list[str]:
    if not tr:
        return []
    after = ", ".join(f"{v} after {k}" for k, v in (tr.get("resend_after") or {}).items())
    sizes = ", ".join(f"{k}: {v}" for k, v in (tr.get("batch_sizes") or {}).items())
    return [
        f"| {label}: requests to the trigger layer | {tr.get('requests')} |",
        f"| {label}: identical resends | {tr.get('identical_resends')}"
        + (f" ({after})" if after else "") + " |",
        f"| {label}: events sent / distinct events | {tr.get('event_sends')} / "
        f"{tr.get('unique_events')} |",
        f"| {label}: requests given up before the answer (timeouts) | {tr.get('abandoned')} |",
        f"| {label}: events per request (size: requests) | {sizes or '–'} |",
    ]


def detection_table(res: SuiteResult) -> list[str]:
    ex = res.extra
    chats = ex.get("detect.chats") or {}
    lines = [
        "### Detection under load: the supervisor's layers and the gateway's pipeline",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| threads of each layer (trigger, review, meta; unset in the config) "
        f"| {', '.join(str(v) for v in (ex.get('detect.threads') or {}).values()) or '–'} |",
        f"| event → verdict p50, idle, ms | {_fmt(ex.get('detect.idle_p50_ms'), 0)} "
        f"({ex.get('detect.idle_missing', 0)} missing) |",
        f"| event → verdict p50 while 4 chats stream, ms "
        f"| {_fmt(ex.get('detect.chat_p50_ms'), 0)} ({ex.get('detect.chat_missing', 0)} "
        "missing) |",
        f"| chats meanwhile ({chats.get('clients', 4)} clients): chunks/s; streams answered "
        f"(the others wait for a slot); HTTP statuses "
        f"| {chats.get('chunks_per_s_measured', 0):.1f}; {chats.get('streams', 0)}; "
        f"{chats.get('statuses', {})} |",
    ]
    if "burst.events" in ex:
        first = ex.get("burst.first_verdict_s")
        lines += [
            f"| burst: candidates posted at once | {ex['burst.events']} |",
            f"| burst: verdicts / time until the last, s | {ex.get('burst.verdicts')} / "
            f"{_fmt(ex.get('burst.total_s'), 0)} |",
            f"| burst: verdicts/s | {_fmt(ex.get('burst.vps'), 2)} |",
            f"| burst: first verdict after, s | {'–' if first is None else f'{first:.1f}'} |",
            f"| burst: event → verdict p50, s | {_fmt(ex.get('burst.p50_s'), 0)} |",
            f"| burst: longest wait for the next verdict, s | {_fmt(ex.get('burst.max_gap_s'), 0)} |",
            f"| burst: verdicts from the rule alone (trigger layer failed) "
            f"| {ex.get('burst.unreviewed')} |",
            f"| burst: anomalies | {ex.get('burst.anomalies')} |",
            *_traffic_row("burst", ex.get("burst.traffic")),
        ]
    return lines + [""] + [f"- {n}" for n in res.notes]


def first_run_section(res: SuiteResult, max_steps: int = 60) -> list[str]:
    ex = res.extra
    lines = [
        "### First run: `make run` in a fresh clone, empty cache",
        "",
        f"Measured {ex.get('first_run.date', '?')} on commit {ex.get('first_run.commit', '?')} "
        "(`python -m bench --first-run`): a clone into a temporary directory, "
        "`XDG_CACHE_HOME` and `XDG_STATE_HOME` empty (the model is assembled, llama-server "
        "built and proven), pip's cache reused (downloads are not measured, builds are), "
        "free ports.",
        "",
        "| figure | value |",
        "| --- | ---: |",
    ]
    if "first_run.gateway_s" in ex:
        lines.append(f"| until the gateway line, min | {ex['first_run.gateway_s'] / 60:.1f} |")
    else:
        lines.append(f"| until the gateway line | {ex.get('first_run.failed', 'never')} |")
    if "first_run.answer_s" in ex:
        lines += [
            f"| the README's request: answer, s | {ex['first_run.answer_s']:.1f} (HTTP "
            f"{ex.get('first_run.answer_status')}, {ex.get('first_run.answer_tokens')} tokens, "
            f"finish `{ex.get('first_run.answer_finish')}`) |",
            f"| from `make run` to the first chat answer, min "
            f"| {ex['first_run.first_answer_s'] / 60:.1f} |",
        ]
    lines += [
        f"| lines printed until the gateway line (all lines) "
        f"| {ex.get('first_run.lines_before_gateway')} ({ex.get('first_run.lines_total')}) |",
        f"| llama-server on PATH (no build) | {ex.get('first_run.llama_server_on_path')} |",
    ]
    excerpt = ex.get("first_run.answer_excerpt")
    if excerpt:
        lines += ["", "The answer began: `" + excerpt.replace("`", "'").replace("\n", " ")[:160]
                  + "`"]
    steps = ex.get("first_run.steps") or []
    if steps:
        lines += ["", "The steps it printed (seconds since `make run`):", "",
                  "| s | line |", "| ---: | --- |"]
        for t, line in steps[:max_steps]:
            lines.append(f"| {t:.1f} | `{line.replace('`', chr(39)).replace('|', '/')[:160]}` |")
        if len(steps) > max_steps:
            lines.append(f"| | … {len(steps) - max_steps} more |")
    return lines + [""] + [f"- {n}" for n in res.notes]

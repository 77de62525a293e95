"""The page's section for the fleet suite (``bench/fleet.py``), with its targets."""

from __future__ import annotations

from typing import Any

from bench.report_stack import _fmt, _target
from bench.suites import SuiteResult


def _yes(v: Any) -> str:
    return "yes" if v else "no"


def targets(results: dict[str, SuiteResult]) -> list[Any]:
    fleet = results.get("fleet")
    if not fleet:
        return []
    ex = fleet.extra
    out = []
    if "kill.accepted" in ex:
        out.append(_target(
            "fleet: SIGKILL of 1 of 2 gateways under intake load: events lost",
            f"{ex['kill.lost']} of {ex['kill.accepted']:,} answered 200; every one decided "
            f"by the prefilter: {_yes(ex.get('kill.all_decided'))} ({ex.get('kill.held_by_killed')}"
            " held by the killed gateway; no trigger layer, so no verdicts)",
            "0", ex["kill.lost"] == 0 and bool(ex.get("kill.all_decided"))))
    else:
        out.append(_target("fleet: SIGKILL under intake load: events lost", "not measured",
                           "0", None))
    if "classify.accepted" in ex:
        held = ex.get("classify.held_by_killed", 0)
        ok: bool | None = (ex["classify.lost"] == 0 and ex["classify.duplicated"] == 0
                           and ex["classify.undecided"] == 0)
        if ok and not held:
            ok = None  # the killed gateway held nothing: no takeover was put to the test
        out.append(_target(
            "fleet: SIGKILL of 1 of 2 gateways while the real trigger layer classifies: "
            "events lost, verdicts duplicated",
            f"{ex['classify.lost']} lost, {ex['classify.duplicated']} duplicated "
            f"({ex['classify.verdicts']} verdicts for {ex['classify.accepted']} events, "
            f"{ex['classify.undecided']} undecided; the killed gateway held {held} undecided "
            f"events, {ex.get('classify.held_then_decided', 0)} then decided by the other)",
            "0, 0", ok))
    else:
        out.append(_target("fleet: SIGKILL during classification: verdicts duplicated",
                           "not measured", "0", None))
    if "ab.ok" in ex:
        out.append(_target(
            "fleet: an action approved for host A runs on A and nowhere else",
            f"ran on A {ex['ab.runs_on_a']}×, elsewhere {ex['ab.runs_elsewhere']}× "
            f"({ex.get('agents')} agents polling); the timed actions once on their own host "
            f"only: {ex.get('actions.once_on_own_host')}/{ex.get('actions.count')}",
            "A only", bool(ex["ab.ok"])
            and ex.get("actions.once_on_own_host") == ex.get("actions.count")))
        out.append(_target(
            "fleet: host B's key on host A's action",
            f"GET {'/'.join(str(s) for s in ex['ab.b_get_status'])} (both gateways), result "
            f"{ex['ab.b_result_status']}, in B's list: {_yes(ex['ab.b_sees_in_list'])}",
            "403", bool(ex["ab.b_403"])))
    return out


def fleet_table(res: SuiteResult) -> list[str]:
    ex = res.extra
    n, batch = ex.get("agents", "?"), ex.get("batch", "?")
    lines = [
        f"### Fleet: {n} agents, 1 and 2 gateways, one PostgreSQL",
        "",
        f"{n} agents post their own host's events with their host keys, batches of {batch}, "
        f"back to back, {ex.get('rounds', '?')} round(s) of {ex.get('seconds', '?')} s per "
        "setup (1 gateway; 2 gateways with the agents split), interleaved; PostgreSQL "
        f"{ex.get('postgres', '?')} with its defaults (fsync on). The layers point at a "
        "port nothing listens on: intake does not wait for a model. CPU is per accepted "
        "event, of the gateway processes, of PostgreSQL and of the bench's process (the "
        "agents).",
        "",
        "| figure | 1 gateway | 2 gateways |",
        "| --- | ---: | ---: |",
    ]
    rows = [
        ("events/s accepted", "events_per_s", 0),
        ("one batch, p50 ms", "batch_p50_ms", 1),
        ("one batch, p99 ms", "batch_p99_ms", 1),
        ("CPU ms per event: gateways", "cpu_ms_per_event.gateways", 3),
        ("CPU ms per event: PostgreSQL", "cpu_ms_per_event.postgres", 3),
        ("CPU ms per event: agents", "cpu_ms_per_event.agents", 3),
        ("events not yet prefiltered when the load stopped", "backlog_new", 0),
        ("failed requests", "errors", 0),
    ]
    for label, key, digits in rows:
        lines.append(f"| {label} | {_fmt(ex.get(f'intake.1gw.{key}'), digits)} "
                     f"| {_fmt(ex.get(f'intake.2gw.{key}'), digits)} |")
    lines += ["", "| figure | value |", "| --- | ---: |"]
    if "kill.accepted" in ex:
        after = ex.get("kill.decided_after_kill_s")
        lines += [
            f"| SIGKILL under intake load: events answered 200 / lost "
            f"| {ex['kill.accepted']:,} / {ex['kill.lost']} |",
            f"| … events the killed gateway held (leased) / decided by the other "
            f"| {ex['kill.held_by_killed']} / {ex['kill.held_then_decided']} |",
            f"| … batches its agents sent again to the other / of those events already stored "
            f"| {ex['kill.retried_batches']} / {ex['kill.retried_duplicates']} |",
            f"| … every accepted event decided (prefilter), s after the kill "
            f"| {_yes(ex.get('kill.all_decided'))}, "
            f"{'–' if after is None else f'{after:.1f}'} (`store.work_lease` "
            f"{ex.get('work_lease')} s) |",
        ]
    if "idle.cpu_pct.gateways" in ex:
        lines.append(
            f"| {n} agents long-polling with nothing to do: CPU % of one core, gateways / "
            f"PostgreSQL / agents | {ex['idle.cpu_pct.gateways']:.0f} / "
            f"{ex['idle.cpu_pct.postgres']:.0f} / {ex['idle.cpu_pct.agents']:.0f} |")
    if "approval_p50_ms" in ex:
        lines += [
            f"| approval → the agent's reported result, p50 / p99 / max ms "
            f"({len(ex.get('approval_ms') or [])} actions over the agents, one at a time) "
            f"| {ex['approval_p50_ms']:.0f} / {ex['approval_p99_ms']:.0f} / "
            f"{ex['approval_max_ms']:.0f} |",
            f"| … without a result within 60 s | {ex.get('approval_missing')} |",
            f"| … statuses | {ex.get('actions.statuses')} |",
        ]
    if "classify.accepted" in ex:
        lines += [
            f"| real trigger layer, SIGKILL of 1 of 2 gateways: events accepted / lost "
            f"| {ex['classify.accepted']} / {ex['classify.lost']} |",
            f"| … verdicts / events with one / duplicated "
            f"| {ex['classify.verdicts']} / {ex['classify.events_with_verdict']} / "
            f"{ex['classify.duplicated']} |",
            f"| … states | {ex['classify.states']} |",
            f"| … events the killed gateway held / decided by the other "
            f"| {ex['classify.held_by_killed']} / {ex['classify.held_then_decided']} |",
            f"| … until every event was decided, s (after the kill) "
            f"| {ex['classify.seconds']:.0f} ({ex['classify.after_kill_s']:.0f}) |",
        ]
        if "classify.event_sends" in ex:
            lines += [
                f"| … trigger layer asked (`store.work_lease` {ex.get('classify.work_lease')} s "
                f"here): requests from A / B; event classifications asked for / distinct events "
                f"| {ex['classify.layer_requests']['a']} / {ex['classify.layer_requests']['b']}; "
                f"{ex['classify.event_sends']} / {ex['classify.distinct_events_sent']} |",
                f"| … events sent by both gateways while both were alive (taken over too early) "
                f"| {ex['classify.sent_by_both_while_alive']} |",
                f"| … events B had sent that A sent again after the kill (of them held by B) "
                f"| {ex['classify.taken_over_and_resent']} "
                f"({ex['classify.taken_over_and_resent_held']}) |",
                f"| … events one gateway sent more than once (retries of refused verdicts), "
                f"A / B | {ex['classify.resent_by_one_gateway'].get('a')} / "
                f"{ex['classify.resent_by_one_gateway'].get('b')} |",
            ]
    return lines + [""] + [f"- {note}" for note in res.notes]

"""The same behaviour from both store backends: SQLite (file in a temp dir) and
PostgreSQL (a real server started by the ``pg_cluster`` fixture)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from layers.events import ActionResult, Decision, Event, ProposedAction, Review
from layers.store import Prefiltered, Store, VerdictInput, make_store
from layers.store.migrations import MIGRATIONS
from tests.postgres import PgCluster, pg_cluster  # noqa: F401

_db_counter = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s = make_store("", tmp_path)
    else:
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        s = make_store(cluster.create_db(f"t{next(_db_counter)}_{int(time.time())}"), tmp_path)
    await s.open()
    yield s
    await s.close()


def ev(i: int, msg: str = "hello", **kw: object) -> Event:
    data: dict[str, object] = {"id": f"e{i}", "host": "h1", "source": "journald", "message": msg}
    return Event.model_validate({**data, **kw})


async def classify_all(store: Store, anomaly: bool = True, unit: str | None = None) -> list:
    new = await store.events.in_state("new")
    await store.events.mark_prefiltered([Prefiltered(e.seq, True, "fp-" + e.message, "r") for e in new])
    cands = await store.events.in_state("candidate")
    return await store.verdicts.record(
        [VerdictInput(e, anomaly, "warning", "cat", "sum") for e in cands]
    )


async def test_migrations_are_versioned_and_reopen_is_a_noop(store: Store, tmp_path: Path) -> None:
    assert await store.schema_version() == len(MIGRATIONS) == 7
    await store.events.add([ev(1)])
    # Re-running the migrations on an opened store changes nothing and keeps the data.
    await store._migrate()  # type: ignore[attr-defined]
    assert await store.schema_version() == len(MIGRATIONS) == 7
    assert [e.id for e in await store.events.get(["e1"])] == ["e1"]


async def test_add_events_is_idempotent_by_id(store: Store) -> None:
    r1 = await store.events.add([ev(1), ev(2), ev(2)])
    assert r1.accepted == ["e1", "e2"]
    r2 = await store.events.add([ev(2), ev(3)])
    assert r2.accepted == ["e3"] and r2.duplicates == ["e2"]
    assert await store.events.counts() == {"new": 3}
    got = await store.events.get(["e1", "e3"])
    assert [g.fields for g in got] == [{}, {}] and got[0].state == "new"


async def test_prefilter_marks_and_verdicts_group_into_incidents(store: Store) -> None:
    await store.events.add([ev(i, unit="nginx.service") for i in range(5)] + [ev(9, "other")])
    new = await store.events.in_state("new")
    decisions = [Prefiltered(e.seq, e.id != "e9", "fp", "failed_start") for e in new]
    assert await store.events.mark_prefiltered(decisions) == 6
    # A second prefilter pass over the same events changes nothing.
    assert await store.events.mark_prefiltered(decisions) == 0
    assert await store.events.counts() == {"candidate": 5, "dropped": 1}
    cands = await store.events.in_state("candidate")
    stored = await store.verdicts.record(
        [VerdictInput(e, True, "critical" if e.id == "e4" else "warning", "crash", "s")
         for e in cands]
    )
    assert len(stored) == 5
    assert len({v.incident_id for v in stored}) == 1
    # Replaying the same batch (as after a crash) stores nothing twice.
    assert await store.verdicts.record([VerdictInput(e, True, "warning", "c", "s")
                                        for e in cands]) == []
    (inc,) = await store.incidents.list()
    assert inc.severity == "critical" and inc.verdict_count == 5
    assert inc.status == "open" and inc.stage == "review" and inc.unit == "nginx.service"
    detail = await store.incidents.get(inc.id)
    assert detail is not None
    kinds = [t.kind for t in detail.timeline]
    assert kinds.count("verdict") == 5 and kinds.count("event") == 5 and kinds[0] == "status"


async def test_verdict_stream_cursor_and_filters(store: Store) -> None:
    await store.events.add([ev(1), ev(2, host="h2")])
    new = await store.events.in_state("new")
    await store.events.mark_prefiltered([Prefiltered(e.seq, True, "fp" + e.id, "r") for e in new])
    cands = await store.events.in_state("candidate")
    await store.verdicts.record([
        VerdictInput(cands[0], False, "info", "noise", "fine"),
        VerdictInput(cands[1], True, "critical", "oom", "bad"),
    ])
    allv = await store.verdicts.after(0)
    assert [v.severity for v in allv] == ["info", "critical"]
    assert allv[0].incident_id is None and allv[1].incident_id is not None
    assert await store.verdicts.after(allv[0].seq) == allv[1:]
    assert [v.event_id for v in await store.verdicts.after(0, min_severity="warning")] == ["e2"]
    assert await store.verdicts.after(0, host="nope") == []


async def test_review_and_decision_lifecycle_exactly_once(store: Store) -> None:
    await store.events.add([ev(1, unit="a.service")])
    (v,) = await classify_all(store)
    inc = await store.incidents.next("review")
    assert inc is not None and inc.id == v.incident_id
    review = Review(status="critical", summary="s", findings=["f"], escalate=True, reason="r")
    assert await store.incidents.record_review(inc.id, review, escalate=True)
    assert not await store.incidents.record_review(inc.id, review, escalate=True)  # already reviewed
    assert await store.incidents.next("review") is None
    assert (await store.incidents.next("meta")).id == inc.id  # type: ignore[union-attr]
    decision = Decision(
        diagnosis="d",
        proposals=[ProposedAction(action="restart_unit", params={"unit": "a.service"},
                                  rationale="x")],
        rollback_plan="none",
    )
    props = await store.incidents.record_decision(inc.id, decision, proposal_ttl=60)
    assert props is not None and [p.action for p in props] == ["restart_unit"]
    assert props[0].status == "pending" and props[0].expires_at is not None
    assert await store.incidents.record_decision(inc.id, decision) is None
    detail = await store.incidents.get(inc.id)
    assert detail is not None and detail.status == "escalated" and detail.stage == "idle"
    assert detail.review == review and detail.decision == decision
    assert [p.id for p in detail.proposals] == [props[0].id]
    assert {"review", "decision"} <= {t.kind for t in detail.timeline}
    assert await store.incidents.resolve(inc.id, by="test", remember=True)
    assert (await store.incidents.next("remember")).id == inc.id  # type: ignore[union-attr]
    assert await store.incidents.mark_remembered(inc.id)
    assert (await store.incidents.get(inc.id)).status == "resolved"  # type: ignore[union-attr]


async def test_failed_review_marks_unreviewed_never_healthy(store: Store) -> None:
    await store.events.add([ev(1)])
    (v,) = await classify_all(store)
    assert v.incident_id is not None
    assert await store.incidents.record_review(v.incident_id, None, escalate=False, error="truncated")
    inc = await store.incidents.get(v.incident_id)
    assert inc is not None and inc.status == "unreviewed" and inc.review is None
    assert any(t.kind == "unreviewed" and t.detail["error"] == "truncated" for t in inc.timeline)


async def test_proposals_merge_duplicates_and_transition_compare_and_set(store: Store) -> None:
    p1 = await store.proposals.add("restart_unit", {"unit": "x.service"}, "r1")
    p2 = await store.proposals.add("restart_unit", {"unit": "x.service"}, "r2")
    assert p2.id == p1.id and p2.merge_count == 1
    other = await store.proposals.add("restart_unit", {"unit": "y.service"}, "r")
    assert other.id != p1.id
    ok = await store.proposals.transition(p1.id, "approved", expected=["pending"],
                                          decided_by="alice", risk="low")
    assert ok is not None and ok.decided_by == "alice" and ok.decided_at and ok.risk == "low"
    # A second approver loses the race.
    assert await store.proposals.transition(p1.id, "approved", expected=["pending"]) is None
    # Now that it is no longer pending, a new identical proposal is a new row.
    p3 = await store.proposals.add("restart_unit", {"unit": "x.service"}, "again")
    assert p3.id != p1.id
    assert await store.proposals.transition(p1.id, "running", expected=["approved"])
    done = await store.proposals.record_result(
        p1.id, "succeeded", ActionResult(exit_code=0, output="ok", duration=0.5)
    )
    assert done is not None and done.result == ActionResult(exit_code=0, output="ok", duration=0.5)
    assert await store.proposals.count_runs(since=0, unit="x.service") == 1
    assert await store.proposals.count_runs(since=0, action="nix_gc") == 0
    pend = await store.proposals.list(status=["pending"])
    assert {p.id for p in pend} == {other.id, p3.id}


async def test_proposals_expire(store: Store) -> None:
    p = await store.proposals.add("nix_gc", {}, "r", expires_at=time.time() - 1)
    keep = await store.proposals.add("journal_vacuum", {}, "r", expires_at=time.time() + 600)
    assert [x.id for x in await store.proposals.expire()] == [p.id]
    assert (await store.proposals.get(keep.id)).status == "pending"  # type: ignore[union-attr]


async def test_audit_log_is_append_only_and_ordered(store: Store) -> None:
    a = await store.audit.append("daemon", "proposal", "act_1", {"x": 1})
    b = await store.audit.append("alice", "approve", "act_1")
    await store.audit.append("alice", "approve", "act_2")
    assert b.seq > a.seq
    assert [e.seq for e in await store.audit.list(subject="act_1")] == [a.seq, b.seq]
    assert [e.subject for e in await store.audit.list(kind="approve", after=a.seq)] == [
        "act_1", "act_2"]
    assert (await store.audit.list())[0].detail == {"x": 1}


async def test_cursors_persist(store: Store) -> None:
    assert await store.cursors.get("journald") is None
    await store.cursors.set("journald", "s=abc")
    await store.cursors.set("journald", "s=def")
    assert await store.cursors.get("journald") == "s=def"


async def test_retention_deletes_old_finished_rows_only(store: Store) -> None:
    await store.events.add([ev(1), ev(2)])
    new = await store.events.in_state("new")
    await store.events.mark_prefiltered([Prefiltered(new[0].seq, False)])
    counts = await store.apply_retention(1, now=time.time() + 2 * 86400)
    # The dropped event goes; the one still waiting for the prefilter is work, and stays.
    assert counts["events"] == 1
    assert await store.events.counts() == {"new": 1}
    # A deleted id may be accepted again (it is no longer known).
    assert (await store.events.add([ev(1)])).accepted == ["e1"]


async def test_concurrent_claims_hand_each_approved_action_out_once_per_its_host(
    store: Store,
) -> None:
    """Fleet: agents (or gateways) claiming at once get each approved action once, only
    their own host's, on both backends (PostgreSQL: SKIP LOCKED)."""
    ids = []
    for i, host in enumerate(["a", "a", "a", "b"]):
        p = await store.proposals.add("restart_unit", {"unit": f"u{i}.service"}, "r",
                                      status="approved", host=host)
        ids.append(p.id)
    claims = await asyncio.gather(*(store.proposals.claim("a", f"agent:a#{n}", 60)
                                    for n in range(6)))
    got = [c.id for c in claims if c is not None]
    assert sorted(got) == sorted(ids[:3]) and len(set(got)) == 3
    assert all(c.status == "running" and c.host == "a" for c in claims if c is not None)
    assert (await store.proposals.claim("b", "agent:b", 60)).id == ids[3]  # type: ignore[union-attr]
    assert await store.proposals.claim("b", "agent:b", 60) is None


async def test_two_workers_lease_different_events_and_incident_stages(store: Store) -> None:
    """Several gateways on one store: each claim leases its rows to its worker; another
    worker skips them until the lease runs out (or the row moves on), its own worker may
    take them again (work left after a failure)."""
    await store.events.add([ev(i) for i in range(6)])
    a, b = "gw-a:1", "gw-b:2"
    store.worker_id = a
    first = await store.events.claim("new", 4)
    store.worker_id = b
    second = await store.events.claim("new", 4)
    assert [e.seq for e in first] == sorted(e.seq for e in first) and len(first) == 4
    assert len(second) == 2 and not {e.seq for e in first} & {e.seq for e in second}
    assert await store.events.claim("new", 4) == [] or all(
        e.seq in {x.seq for x in second} for e in await store.events.claim("new", 4))
    store.worker_id = a
    assert {e.seq for e in await store.events.claim("new", 10)} >= {e.seq for e in first}
    # Moving on (new → candidate) frees the row for the next state's claim by anyone.
    await store.events.mark_prefiltered([Prefiltered(e.seq, True, "fp", "r") for e in first])
    store.worker_id = b
    assert {e.seq for e in await store.events.claim("candidate", 10)} == {e.seq for e in first}
    # A run-out lease is taken over.
    async with store.tx() as tx:
        await tx.execute("UPDATE events SET lease_until = ? WHERE state = 'new'", (1.0,))
    store.worker_id = a
    assert {e.seq for e in await store.events.claim("new", 10)} == {e.seq for e in second}


async def test_an_incident_stage_is_worked_by_one_gateway_at_a_time(store: Store) -> None:
    await store.events.add([ev(10, "disk failing"), ev(11, "other failure", host="h2")])
    await classify_all(store)
    store.worker_id = "gw-a:1"
    inc_a = await store.incidents.next("review")
    store.worker_id = "gw-b:2"
    inc_b = await store.incidents.next("review")
    assert inc_a is not None and inc_b is not None and inc_a.id != inc_b.id
    assert (await store.incidents.next("review")).id == inc_b.id  # type: ignore[union-attr]
    store.worker_id = "gw-c:3"
    assert await store.incidents.next("review") is None
    # The next stage is free for anyone (the lease was the review's).
    assert await store.incidents.record_review(inc_a.id, None, escalate=True)
    assert (await store.incidents.next("meta")).id == inc_a.id  # type: ignore[union-attr]

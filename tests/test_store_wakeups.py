"""Issue 21: wake-ups across processes. A committed write wakes the workers waiting for
it at once — in this process on either backend, and in every other process on the same
PostgreSQL (LISTEN/NOTIFY) — never for a transaction that rolled back.

Real parts: SQLite files, a real PostgreSQL cluster (Debian's), two real gateway
processes on it and a host's long poll over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.routes.agent import CLAIM_RECHECK
from layers.actions import service
from layers.actions.service import ActionRuns
from layers.config import Settings
from layers.events import Event
from layers.store import Store, make_store
from layers.store.postgres import PostgresStore
from tests.postgres import PgCluster, pg_cluster  # noqa: F401
from tests.support import cli, free_port, write_toml
from tests.test_actions_service import incident_of
from tests.test_evidence import make_programs

ADMIN_KEY = "sk-admin-wake"


class Woken:
    """A listener that counts its calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        self.event.clear()
        return True


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s = make_store("", tmp_path)
    else:
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        s = make_store(cluster.create_db(f"wake_{time.monotonic_ns()}"), tmp_path)
    await s.open()
    yield s
    await s.close()


def _event(i: str) -> Event:
    return Event(id=i, host="h1", source="journald", unit="nginx.service", priority=3,
                 message="nginx.service: Failed with result 'exit-code'.")


async def test_a_commit_wakes_the_listeners_of_what_it_wrote_a_rollback_wakes_none(
    store: Store,
) -> None:
    events, proposals = Woken(), Woken()
    store.wakeups.subscribe("events", events)
    unsubscribe = store.wakeups.subscribe("proposals", proposals)
    if isinstance(store, PostgresStore):
        # Listening, so that an echo of the store's own NOTIFY would be seen below.
        await asyncio.wait_for(store.listener.connected.wait(), 10)
    await store.events.add([_event("w-1")])
    assert events.calls == 1 and proposals.calls == 0
    # Once: the commit woke its listeners; its notification coming back is not a second
    # wake-up.
    await asyncio.sleep(0.5)
    assert events.calls == 1
    # Nothing new (a duplicate): nothing to wake anyone for.
    await store.events.add([_event("w-1")])
    assert events.calls == 1
    # A transaction that signals and then fails wakes nobody.
    with pytest.raises(RuntimeError):
        async with store.tx() as tx:
            await store.signal(tx, "proposals")
            raise RuntimeError("rolled back")
    assert proposals.calls == 0
    # … and leaves nothing pending for the next transaction to fire.
    await store.events.add([_event("w-2")])
    assert events.calls == 2 and proposals.calls == 0
    await asyncio.sleep(0.5)
    assert events.calls == 2 and proposals.calls == 0
    unsubscribe()
    await store.proposals.add("restart_unit", {"unit": "nginx.service"}, "r")
    assert proposals.calls == 0


async def test_another_process_on_postgresql_is_woken_by_a_commit_never_by_a_rollback(
    pg_cluster: PgCluster, tmp_path: Path,  # noqa: F811
) -> None:
    db = pg_cluster.create_db("wake_across")
    writer = make_store(db, tmp_path)
    waiter = make_store(db, tmp_path)
    await writer.open()
    await waiter.open()
    try:
        assert isinstance(waiter, PostgresStore)
        woken = Woken()
        waiter.wakeups.subscribe("proposals", woken)
        await asyncio.wait_for(waiter.listener.connected.wait(), 10)
        assert waiter.wakeups.across_processes()
        with pytest.raises(RuntimeError):
            async with writer.tx() as tx:
                await writer.signal(tx, "proposals")
                raise RuntimeError("rolled back")
        assert not await woken.wait(1.0), "a rolled-back NOTIFY was delivered"
        t0 = time.monotonic()
        await writer.proposals.add("restart_unit", {"unit": "nginx.service"}, "r")
        assert await woken.wait(5.0), "the other store was not woken"
        # Far sooner than any poll: the commit itself woke it.
        assert time.monotonic() - t0 < 1.0
    finally:
        await waiter.close()
        await writer.close()


def _gateway_config(tmp: Path, name: str, db: str) -> tuple[Path, str, dict[str, Any]]:
    port, dead = free_port(), free_port()
    progs = make_programs(tmp / name)
    data = {
        "state_dir": str(tmp / f"{name}-state"), "memory": {"enabled": False},
        "layers": {n: {"port": dead, "managed": False} for n in ("trigger", "review", "meta")},
        "gateway": {"port": port, "api_keys": ["sk-user-wake"], "admin_key": ADMIN_KEY},
        "actions": {"search_path": progs.search_path, "unit_check": "never",
                    "autonomy": "suggest"},
        "fleet": {"role": "server", "host": "server1"},
        "store": {"url": db},
    }
    return write_toml(tmp / f"{name}.toml", data), f"http://127.0.0.1:{port}", data


async def test_an_approval_on_one_gateway_reaches_a_long_poll_on_the_other_at_once(
    pg_cluster: PgCluster, tmp_path: Path,  # noqa: F811
) -> None:
    """Host web1's agent long-polls gateway 2; an admin approves its action on gateway 1.
    The claim returns well inside CLAIM_RECHECK: gateway 2 was woken by the commit on
    gateway 1 (LISTEN/NOTIFY), not by its own re-check."""
    db = pg_cluster.create_db("wake_gateways")
    started: list[Callable[[], None]] = []
    urls, data = [], {}
    for name in ("gw1", "gw2"):
        cfg, url, data = _gateway_config(tmp_path, name, db)
        proc = cli(cfg, "gateway", log_path=tmp_path / f"{name}.log").start()
        started.append(proc.stop)
        proc.wait_http(f"{url}/health", timeout=60)
        urls.append(url)
    settings = Settings.model_validate(data)
    store = make_store(db, tmp_path)
    await store.open()
    try:
        key = await store.hosts.add("web1")
        incident = await incident_of(store, Event(host="web1", source="journald",
                                                  unit="nginx.service", priority=3,
                                                  message="nginx failed on web1"))
        (p,) = await service.handle_proposals(
            incident, [{"action": "restart_unit", "params": {"unit": "nginx.service"},
                        "rationale": "it failed"}], store, settings, runs=ActionRuns())
        async with httpx.AsyncClient(timeout=60) as c:
            host = {"Authorization": f"Bearer {key}"}
            # A first short poll: gateway 2's listener is up once a long poll has run.
            r = await c.post(f"{urls[1]}/v1/agent/claim", headers=host, json={"wait": 0.5})
            assert r.status_code == 204
            poll = asyncio.create_task(
                c.post(f"{urls[1]}/v1/agent/claim", headers=host, json={"wait": 30}))
            await asyncio.sleep(1.5)  # the long poll is waiting, past its first claim
            assert not poll.done()
            t0 = time.monotonic()
            r = await c.post(f"{urls[0]}/v1/actions/{p.id}/approve",
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                             json={"wait": 0})
            assert r.status_code == 200 and r.json()["status"] == "approved", r.text
            claimed = await poll
            waited = time.monotonic() - t0
            assert claimed.status_code == 200, claimed.text
            assert claimed.json()["id"] == p.id
            assert waited < CLAIM_RECHECK / 2, f"claimed {waited:.2f}s after the approval"
    finally:
        await store.close()
        for stop in reversed(started):
            stop()

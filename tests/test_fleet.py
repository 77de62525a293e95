"""Issue 21 (fleet, first part): per-host keys, host scope, and actions that run on the
host they are for — through a real gateway process and real agents' code.

The gateway runs as a subprocess on SQLite (no layers are needed: events are stored
whatever the layers do); the incident and its proposal are made the real way in the
test's own connection to the same store; the agents are :class:`layers.agent.Agent`
talking HTTP to the gateway. Programs are throwaway stand-ins on each side's search path
(this machine has no systemd), so the test sees which side ran what.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from layers.actions import service
from layers.actions.service import ActionRuns
from layers.agent import Agent
from layers.config import Settings
from layers.events import Event
from layers.store import Store, open_store
from layers.store.hosts import Hosts
from tests.support import cli, free_port, run_cli, write_toml
from tests.test_actions_service import incident_of
from tests.test_evidence import Programs, make_programs

USER_KEY = "sk-user-fleet"
ADMIN_KEY = "sk-admin-fleet"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def server_config(tmp: Path, port: int, progs: Programs) -> dict[str, Any]:
    dead = free_port()  # no layers: events are stored whatever the layers do
    return {
        "state_dir": str(tmp / "server-state"), "memory": {"enabled": False},
        "layers": {n: {"port": dead, "managed": False} for n in ("trigger", "review", "meta")},
        "gateway": {"port": port, "api_keys": [USER_KEY], "admin_key": ADMIN_KEY},
        "actions": {"search_path": progs.search_path, "unit_check": "never",
                    "autonomy": "suggest"},
        "fleet": {"role": "server", "host": "server1"},
    }


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Settings, Programs]]:
    progs = make_programs(tmp_path / "server")
    port = free_port()
    data = server_config(tmp_path, port, progs)
    cfg = write_toml(tmp_path / "server.toml", data)
    proc = cli(cfg, "gateway", log_path=tmp_path / "gateway.log").start()
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/health", timeout=60)
    yield url, Settings.model_validate(data), progs
    proc.stop()


@pytest.fixture
async def server_store(server: tuple[str, Settings, Programs]) -> AsyncIterator[Store]:
    store = await open_store(server[1])
    yield store
    await store.close()


def agent_settings(tmp: Path, host: str) -> tuple[Settings, Programs]:
    progs = make_programs(tmp / host)
    return Settings.model_validate({
        "state_dir": str(tmp / f"{host}-state"),
        "actions": {"search_path": progs.search_path, "unit_check": "never"},
        "fleet": {"role": "agent", "host": host, "poll_seconds": 0.5},
    }), progs


async def test_host_keys_are_scoped_to_their_host_and_stored_hashed(
    server: tuple[str, Settings, Programs], server_store: Store
) -> None:
    url, _, _ = server
    hosts = Hosts(server_store)
    web1, web2 = await hosts.add("web1"), await hosts.add("web2")
    async with server_store.tx() as tx:
        rows = await tx.execute("SELECT name, key_hash FROM hosts ORDER BY name")
    assert [r["name"] for r in rows] == ["web1", "web2"]
    assert all(web1 not in r["key_hash"] and len(r["key_hash"]) == 64 for r in rows)
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        as1 = {"Authorization": f"Bearer {web1}"}
        # Its own host's events: accepted, an event without a host becomes web1's.
        r = await c.post("/v1/events", headers=as1, json={"events": [
            {"id": "ev-w1", "source": "journald", "unit": "nginx.service", "message": "x"}]})
        assert r.status_code == 200, r.text
        # Another host's: refused, and nothing of the batch is stored.
        r = await c.post("/v1/events", headers=as1, json={"events": [
            {"id": "ev-w1b", "host": "web1", "message": "ok"},
            {"id": "ev-w2", "host": "web2", "message": "forged"}]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_mismatch"
        stored = await server_store.get_events(["ev-w1", "ev-w1b", "ev-w2"])
        assert [(e.id, e.host) for e in stored] == [("ev-w1", "web1")]
        # A host key reads nothing else and approves nothing.
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/incidents"),
                             ("GET", "/v1/events/stream"), ("POST", "/v1/actions/x/approve")):
            r = await c.request(method, path, headers=as1, json={})
            assert r.status_code == 403, (path, r.status_code, r.text)
        # A revoked key is no key at all.
        assert await hosts.revoke("web2")
        await asyncio.sleep(0.1)
        r = await c.post("/v1/events", headers={"Authorization": f"Bearer {web2}"},
                         json={"events": [{"host": "web2", "message": "late"}]})
        assert r.status_code == 401


async def _pending_restart(store: Store, settings: Settings, host: str) -> str:
    incident = await incident_of(store, Event(host=host, source="journald",
                                              unit="nginx.service", priority=3,
                                              message=f"nginx failed on {host}"))
    (p,) = await service.handle_proposals(
        incident, [{"action": "restart_unit", "params": {"unit": "nginx.service"},
                    "rationale": "it failed"}], store, settings, runs=ActionRuns())
    assert p.status == "pending" and p.host == host
    return p.id


async def test_an_action_approved_for_host_a_runs_on_a_and_nowhere_else(
    tmp_path: Path, server: tuple[str, Settings, Programs], server_store: Store
) -> None:
    url, settings, server_progs = server
    hosts = Hosts(server_store)
    key_a, key_b = await hosts.add("hosta"), await hosts.add("hostb")
    action = await _pending_restart(server_store, settings, "hosta")
    a_settings, a_progs = agent_settings(tmp_path, "hosta")
    b_settings, b_progs = agent_settings(tmp_path, "hostb")
    agent_a, agent_b = Agent(a_settings, url, key_a), Agent(b_settings, url, key_b)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            # Nothing is approved yet: neither agent gets anything.
            assert not await agent_a.once() and not await agent_b.once()
            r = await c.post(f"/v1/actions/{action}/approve", headers=ADMIN, json={"wait": 1})
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "approved"  # dispatched, not run by the server
            assert server_progs.calls() == []
            # Host B sees nothing of A's: not in its list, 403 on the action, no claim.
            as_b = {"Authorization": f"Bearer {key_b}"}
            assert (await c.get("/v1/actions", headers=as_b)).json()["data"] == []
            assert (await c.get(f"/v1/actions/{action}", headers=as_b)).status_code == 403
            assert not await agent_b.once()
            # Host A takes it, re-checks it, runs it, reports.
            assert await agent_a.once()
            done = (await c.get(f"/v1/actions/{action}", headers=ADMIN)).json()
            assert done["status"] == "succeeded" and done["host"] == "hosta"
            assert [c[0] for c in a_progs.calls()] == ["systemctl"]
            assert "restart" in a_progs.calls()[0] and "nginx.service" in a_progs.calls()[0]
            assert b_progs.calls() == [] and server_progs.calls() == []
            # Once: a second claim finds nothing.
            assert not await agent_a.once()
            audit = (await c.get("/v1/audit", headers=ADMIN, params={"limit": 50})).json()
            kinds = [(e["actor"], e["kind"]) for e in audit["data"] if e["subject"] == action]
            assert ("agent:hosta", "claimed") in kinds and ("agent:hosta", "result") in kinds
    finally:
        await agent_a.aclose()
        await agent_b.aclose()


async def test_the_agent_refuses_what_its_own_policy_forbids_and_reports_it(
    tmp_path: Path, server: tuple[str, Settings, Programs], server_store: Store
) -> None:
    """The server approved a restart of a unit that host A protects: A runs nothing and
    reports the refusal; the action ends failed with A's reason."""
    url, settings, _ = server
    key = await Hosts(server_store).add("hosta")
    action = await _pending_restart(server_store, settings, "hosta")
    a_settings, a_progs = agent_settings(tmp_path, "hosta")
    a_settings.actions.protected_units = [*a_settings.actions.protected_units, "nginx.service"]
    agent = Agent(a_settings, url, key)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            r = await c.post(f"/v1/actions/{action}/approve", headers=ADMIN, json={"wait": 1})
            assert r.status_code == 200, r.text
            assert await agent.once()
            done = (await c.get(f"/v1/actions/{action}", headers=ADMIN)).json()
            assert done["status"] == "failed"
            assert "refused by hosta: protected_unit" in done["result"]["output"]
            assert a_progs.calls() == []
    finally:
        await agent.aclose()


async def test_a_lease_that_runs_out_fails_the_action_it_never_runs_twice(
    server: tuple[str, Settings, Programs], server_store: Store
) -> None:
    url, settings, _ = server
    await Hosts(server_store).add("hosta")
    action = await _pending_restart(server_store, settings, "hosta")
    assert await server_store.transition_proposal(action, "approved", expected=("pending",))
    claimed = await server_store.claim_proposal("hosta", "agent:hosta", lease=0.01)
    assert claimed is not None and claimed.id == action
    assert await server_store.claim_proposal("hosta", "agent:hosta", lease=60) is None
    await asyncio.sleep(0.05)
    (lost,) = await server_store.expire_dispatch(local=["localhost", "server1"],
                                                 dispatch_ttl=3600)
    assert lost.id == action and lost.status == "failed"
    assert lost.result is not None and "lease_expired" in lost.result.output
    assert await server_store.claim_proposal("hosta", "agent:hosta", lease=60) is None


async def test_the_agent_command_takes_and_runs_its_hosts_action_end_to_end(
    tmp_path: Path, server: tuple[str, Settings, Programs], server_store: Store
) -> None:
    """`ai-sysadmin hosts add` on the server, `ai-sysadmin agent` (a process) on the host:
    an admin's approval reaches the agent and the result comes back."""
    url, settings, server_progs = server
    server_cfg = write_toml(tmp_path / "server-cli.toml", {
        "state_dir": str(settings.state_dir)})
    made = run_cli("--config", str(server_cfg), "hosts", "add", "hostc")
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[0]
    assert key.startswith("aish-host-")
    a_settings, a_progs = agent_settings(tmp_path, "hostc")
    (tmp_path / "hostc.key").write_text(key + "\n")
    agent_cfg = write_toml(tmp_path / "agent.toml", {
        "state_dir": str(tmp_path / "hostc-state"),
        "actions": {"search_path": a_progs.search_path, "unit_check": "never"},
        "fleet": {"role": "agent", "host": "hostc", "gateway_url": url,
                  "key_file": str(tmp_path / "hostc.key"), "poll_seconds": 0.5}})
    agent = cli(agent_cfg, "agent", log_path=tmp_path / "agent.log").start()
    try:
        action = await _pending_restart(server_store, settings, "hostc")
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            r = await c.post(f"/v1/actions/{action}/approve", headers=ADMIN, json={"wait": 1})
            assert r.status_code == 200, r.text
            status = ""
            for _ in range(100):
                status = (await c.get(f"/v1/actions/{action}", headers=ADMIN)).json()["status"]
                if status in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.2)
        assert status == "succeeded", agent.log()
        assert any("restart" in call for call in a_progs.calls()) and not server_progs.calls()
        assert "agent of host hostc" in agent.log()
    finally:
        agent.stop()


async def test_incidents_and_actions_filter_by_host(
    server: tuple[str, Settings, Programs], server_store: Store
) -> None:
    url, settings, _ = server
    a = await _pending_restart(server_store, settings, "hosta")
    b = await _pending_restart(server_store, settings, "hostb")
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        incs = (await c.get("/v1/incidents", headers=ADMIN, params={"host": "hosta"})).json()
        assert {i["host"] for i in incs["data"]} == {"hosta"}
        acts = (await c.get("/v1/actions", headers=ADMIN, params={"host": "hostb"})).json()
        assert [x["id"] for x in acts["data"]] == [b] and a != b

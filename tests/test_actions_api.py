"""Approvals over HTTP on a real gateway process, and the `approvals`/`audit` CLI.

The gateway runs as ``ai-sysadmin gateway`` (a subprocess on a free port; no layers are
needed for approvals). Proposals are put in the shared SQLite store by the real decision
path from this process, as the daemon would. ``systemctl`` is a throwaway stand-in first
on ``actions.search_path`` (no systemd on this machine).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from layers.actions import service
from layers.actions.service import ActionRuns
from layers.config import Settings
from layers.store import open_store
from tests.actions_support import StandIns, make_standins
from tests.support import Proc, cli, free_port, layer_config, run_cli, write_toml

USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
TTL = 600.0  # the gateway's; the expiry test proposes with its own short TTL
SHORT_TTL = 1.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, StandIns]]:
    tmp = tmp_path_factory.mktemp("actions-api")
    st = make_standins(tmp, {f"web{i}.service": {"id": f"web{i}.service",
                                                  "names": [f"web{i}.service"]}
                             for i in range(1, 7)})
    port = free_port()
    cfg = write_toml(tmp / "config.toml", {
        "state_dir": str(tmp / "state"),
        "layers": {n: {**layer_config(free_port()), "managed": False}
                   for n in ("trigger", "review", "meta")},
        "gateway": {"port": port, "api_keys": ["user-key"], "admin_key": "admin-key"},
        "actions": {"autonomy": "suggest", "search_path": st.search_path, "unit_check": "never",
                    "approval_ttl": TTL},
    })
    proc: Proc = cli(cfg, "gateway", log_path=tmp / "gateway.log").start()
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        yield f"http://127.0.0.1:{port}", cfg, st
    finally:
        proc.stop()


def settings_of(cfg: Path) -> Settings:
    from layers.config import load_settings

    return load_settings(cfg)


async def propose(cfg: Path, *proposals: dict[str, Any], incident: str | None = None,
                  ttl: float | None = None) -> list[Any]:
    settings = settings_of(cfg)
    if ttl is not None:
        settings.actions.approval_ttl = ttl  # the proposer stamps expires_at
    store = await open_store(settings)
    try:
        return await service.handle_proposals(incident, list(proposals), store, settings, runs=ActionRuns())
    finally:
        await store.close()


def restart(unit: str) -> dict[str, Any]:
    return {"action": "restart_unit", "params": {"unit": unit}, "rationale": f"{unit} failed"}


async def test_list_show_and_auth(gateway: tuple[str, Path, StandIns]) -> None:
    url, cfg, _ = gateway
    [p] = await propose(cfg, restart("web1.service"), incident="inc_api")
    r = httpx.get(f"{url}/v1/actions", params={"status": "pending"}, headers=USER)
    assert r.status_code == 200
    item = next(a for a in r.json()["data"] if a["id"] == p.id)
    assert item["status"] == "pending" and item["risk"] == "medium"
    assert item["rationale"] == "web1.service failed"
    assert "systemctl restart -- web1.service" in item["dry_run"]
    assert item["incident"]["id"] == "inc_api"
    one = httpx.get(f"{url}/v1/actions/{p.id}", headers=USER).json()
    assert one["id"] == p.id and one["expires_at"] > time.time()
    missing = httpx.get(f"{url}/v1/actions/act_nope", headers=USER)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "action_not_found"
    assert httpx.get(f"{url}/v1/actions").status_code == 401


async def test_non_admin_key_cannot_approve_or_reject(gateway: tuple[str, Path, StandIns]) -> None:
    url, cfg, st = gateway
    [p] = await propose(cfg, restart("web2.service"))
    for verb in ("approve", "reject"):
        r = httpx.post(f"{url}/v1/actions/{p.id}/{verb}", headers=USER, json={})
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        r = httpx.post(f"{url}/v1/actions/{p.id}/{verb}", json={})
        assert r.status_code == 401
    assert httpx.get(f"{url}/v1/actions/{p.id}", headers=USER).json()["status"] == "pending"
    assert not any("web2.service" in c for c in st.calls())


async def test_admin_approves_and_it_runs(gateway: tuple[str, Path, StandIns]) -> None:
    url, cfg, st = gateway
    [p] = await propose(cfg, restart("web3.service"))
    r = httpx.post(f"{url}/v1/actions/{p.id}/approve", headers=ADMIN,
                   json={"approver": "alice"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded" and body["decided_by"] == "admin:alice"
    assert body["result"]["exit_code"] == 0
    assert ["systemctl", "restart", "--", "web3.service"] in st.calls()
    again = httpx.post(f"{url}/v1/actions/{p.id}/approve", headers=ADMIN, json={})
    assert again.status_code == 409 and again.json()["error"]["code"] == "action_not_pending"
    bad = httpx.post(f"{url}/v1/actions/{p.id}/approve", headers=ADMIN,
                     json={"approver": "x; rm -rf /"})
    assert bad.status_code == 400


async def test_admin_rejects_duplicates_merge_and_expiry(gateway: tuple[str, Path, StandIns]) -> None:
    url, cfg, st = gateway
    [a] = await propose(cfg, restart("web4.service"), incident="inc_1")
    [b] = await propose(cfg, restart("web4.service"), incident="inc_2")
    assert a.id == b.id
    shown = httpx.get(f"{url}/v1/actions/{a.id}", headers=USER).json()
    assert shown["merge_count"] == 1
    r = httpx.post(f"{url}/v1/actions/{a.id}/reject", headers=ADMIN,
                   json={"approver": "bob", "reason": "maintenance window"})
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    assert r.json()["decided_by"] == "admin:bob"

    [c] = await propose(cfg, restart("web5.service"), ttl=SHORT_TTL)
    time.sleep(SHORT_TTL + 0.5)
    r = httpx.post(f"{url}/v1/actions/{c.id}/approve", headers=ADMIN, json={})
    assert r.status_code == 409
    assert httpx.get(f"{url}/v1/actions/{c.id}", headers=USER).json()["status"] == "expired"
    assert not any(("web4.service" in x or "web5.service" in x) for x in st.calls())


async def test_cli_approvals_and_audit(gateway: tuple[str, Path, StandIns]) -> None:
    url, cfg, st = gateway
    [p] = await propose(cfg, restart("web6.service"), incident="inc_cli")
    listed = run_cli("--config", str(cfg), "approvals", "list")
    assert listed.returncode == 0, listed.stderr
    assert p.id in listed.stdout and "restart_unit" in listed.stdout
    shown = run_cli("--config", str(cfg), "approvals", "show", p.id)
    assert "dry run" in shown.stdout and "systemctl restart -- web6.service" in shown.stdout
    assert "inc_cli" in shown.stdout and "web6.service failed" in shown.stdout
    ok = run_cli("--config", str(cfg), "approvals", "approve", p.id, "--as", "dave")
    assert ok.returncode == 0, ok.stderr
    assert "succeeded" in ok.stdout and "admin:dave" in ok.stdout
    nope = run_cli("--config", str(cfg), "approvals", "approve", "act_missing")
    assert nope.returncode == 1
    assert nope.stderr.startswith("ai-sysadmin: approvals: no action")
    assert nope.stderr.count("\n") == 1
    audit = run_cli("--config", str(cfg), "audit", "--subject", p.id)
    assert audit.returncode == 0, audit.stderr
    kinds = [line.split()[4] for line in audit.stdout.splitlines()]
    assert kinds == ["proposed", "pending", "approved", "run", "result"]
    assert "admin:dave" in audit.stdout

"""Notifications through a real gateway process (layers unmanaged and absent: no model is
needed): the delivery worker survives a SIGKILL mid-delivery with nothing lost, finds
notifications another process (the daemon) writes to the shared store, and the API and
the CLI show channels redacted — never a secret, nor in the gateway's log."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from layers.store import make_store
from tests.notify_support import WebhookReceiver, open_incidents
from tests.reliability_support import ADMIN_AUTH, AUTH, GatewayFactory, wait_until
from tests.support import free_port, run_cli

pytestmark = pytest.mark.timeout(180)

SECRET_PW = "pw-Gq7rT1mZ"
SECRET_TOKEN = "tok-Kx93bVn2Lw"


def _open(db_dir: Path, n: int, tag: str) -> list[str]:
    async def go() -> list[str]:
        store = make_store("", db_dir)
        await store.open()
        try:
            return await open_incidents(store, n, tag=tag)
        finally:
            await store.close()

    return asyncio.run(go())


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db, timeout=30) as conn:
        return list(conn.execute(sql).fetchall())


def test_gateway_sigkill_mid_delivery_loses_no_notification(
    tmp_path: Path, gateways: GatewayFactory
) -> None:
    rx = WebhookReceiver(free_port(), delay=0.25).start()
    try:
        gw = gateways(free_port(), notify={
            "channels": [{"name": "hook", "url": f"json://127.0.0.1:{rx.port}/in"}],
            "timeout": 2.0, "retry_initial": 0.5, "retry_max": 1.0, "poll_interval": 0.2,
        })
        state = tmp_path / "state"
        db = state / "ai-sysadmin.db"
        # Another process (as the daemon does) opens incidents in the shared store.
        first = _open(state, 20, "a")
        assert wait_until(lambda: len(rx.received) >= 4, 30)
        gw.kill()  # SIGKILL while deliveries are in flight
        delivered_before = {r.ref for r in rx.received}
        pending = _rows(db, "SELECT COUNT(*) FROM notification_deliveries WHERE state='pending'")
        assert int(pending[0][0]) > 0, "the kill came too late to test anything"
        # Written while the gateway is down: kept in the outbox too.
        second = _open(state, 3, "b")
        gw.start()
        expected = {f"incident.opened:{i}" for i in first + second}
        assert wait_until(lambda: expected <= set(rx.refs()), 60), \
            sorted(expected - set(rx.refs()))[:5]
        assert wait_until(lambda: not _rows(
            db, "SELECT 1 FROM notification_deliveries WHERE state <> 'delivered'"), 20)
        # At least once: only what was in flight at the kill (one channel: one delivery at
        # a time) may have come twice.
        refs = rx.refs()
        twice = {r for r in refs if refs.count(r) > 1}
        assert len(twice) <= 1
        assert set(refs) == expected and len(refs) == len(expected) + len(twice)
        print(f"\nFIGURE notify crash: notifications={len(expected)} "
              f"delivered_before_kill={len(delivered_before)} redelivered={len(twice)} lost=0")
    finally:
        rx.stop()


def test_api_and_cli_show_channels_redacted_and_test_each_channel(
    tmp_path: Path, gateways: GatewayFactory
) -> None:
    rx = WebhookReceiver(free_port()).start()
    secret_file = tmp_path / "pager.url"  # as LoadCredential hands it over
    secret_file.write_text(f"ntfys://{SECRET_TOKEN}@ntfy.invalid/{SECRET_TOKEN}\n")
    try:
        gw = gateways(free_port(), notify={
            "channels": [
                {"name": "hook", "url": f"json://ops:{SECRET_PW}@127.0.0.1:{rx.port}/h/"
                                         f"{SECRET_TOKEN}"},
                {"name": "pager", "url_file": str(secret_file)},
                {"name": "gone", "url_file": str(tmp_path / "missing")},
            ],
            "timeout": 3.0,
        })
        _open(tmp_path / "state", 1, "c")
        assert wait_until(lambda: len(rx.received) >= 1, 30)

        channels = httpx.get(f"{gw.url}/v1/notify/channels", headers=AUTH, timeout=10).json()
        assert [(c["name"], c["target"]) for c in channels["data"]] == [
            ("hook", f"json://127.0.0.1:{rx.port}"), ("pager", "ntfys://ntfy.invalid")]
        assert channels["data"][0]["delivered"] == 1
        assert channels["problems"] == [
            f"notify channel 'gone': cannot read {tmp_path / 'missing'}: No such file or directory"]
        notes = httpx.get(f"{gw.url}/v1/notifications", headers=AUTH, timeout=10).json()
        assert notes["data"][0]["kind"] == "incident.opened"
        assert httpx.post(f"{gw.url}/v1/notify/test", headers=AUTH, timeout=10).status_code == 403

        # The CLI asks the gateway (which holds the URLs) and prints one line per channel.
        out = run_cli("--config", str(gw.config), "notify", "test", timeout=60)
        lines = out.stdout.splitlines()
        assert out.returncode == 1, out.stderr  # one channel cannot deliver, one is unreadable
        assert lines[0].startswith("problem: notify channel 'gone': cannot read")
        assert lines[1].split() == ["hook", f"json://127.0.0.1:{rx.port}", "ok"]
        assert lines[2].startswith("pager") and "ntfys://ntfy.invalid" in lines[2]
        assert "failed: " in lines[2] and len(lines) == 3
        assert rx.received[-1].body["title"] == "ai-sysadmin test notification"
        one = run_cli("--config", str(gw.config), "notify", "test", "--channel", "hook")
        assert one.returncode == 0 and one.stdout.splitlines()[-1].endswith(" ok")
        nope = run_cli("--config", str(gw.config), "notify", "test", "--channel", "nope")
        assert nope.returncode == 1
        assert nope.stderr.strip() == ("ai-sysadmin: notify test: no notification channel "
                                       "'nope' (HTTP 404)")
        status = run_cli("--config", str(gw.config), "notify", "status")
        assert status.returncode == 0 and "delivered 1" in status.stdout

        admin = httpx.post(f"{gw.url}/v1/notify/test", headers=ADMIN_AUTH, json={},
                           timeout=30).json()
        shown = "\n".join([json.dumps(channels), json.dumps(notes), json.dumps(admin),
                           out.stdout, out.stderr, one.stdout, status.stdout, gw.log()])
        for secret in (SECRET_PW, SECRET_TOKEN):
            assert secret not in shown, f"secret shown: {secret}"
        assert SECRET_TOKEN in rx.received[0].path  # the receiver did get the real URL
    finally:
        rx.stop()

"""Notifications end to end in one process: real store (SQLite; the outbox also on a real
PostgreSQL), the real delivery worker and apprise, real receivers — a JSON webhook server
and an SMTP server (aiosmtpd) on loopback. Incidents are opened, escalated and resolved
through the store's own paths; approvals and actions through the action stage (with
stand-in systemctl, as in test_actions_service.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from email import message_from_bytes, policy
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from layers.actions import service
from layers.actions.service import ActionRuns
from layers.config import ConfigError, Settings, load_settings
from layers.events import ProposedAction
from layers.notify.channels import load_channels, secret_parts, target
from layers.notify.routing import quiet_until
from layers.notify.worker import NotifyWorker
from layers.store import Store, make_store
from tests.actions_support import make_standins
from tests.notify_support import SmtpReceiver, WebhookReceiver, open_incidents
from tests.postgres import PgCluster, pg_cluster  # noqa: F401
from tests.support import free_port, write_toml

pytestmark = pytest.mark.timeout(120)

SECRET_PW = "pw-Zq8sW2xK"
SECRET_TOKEN = "tok-Hh41c9aPqL"


@pytest.fixture
def runs() -> ActionRuns:
    """The test's action runs: one per test (its event loop), as one per gateway process."""
    return ActionRuns()


@pytest.fixture
async def store(tmp_path: Path, runs: ActionRuns) -> AsyncIterator[Store]:
    s = make_store("", tmp_path / "db")
    await s.open()
    yield s
    await runs.drain()
    await s.close()


@pytest.fixture
def hook() -> Iterator[WebhookReceiver]:
    rx = WebhookReceiver(free_port()).start()
    yield rx
    rx.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpReceiver]:
    rx = SmtpReceiver(free_port()).start()
    yield rx
    rx.stop()


def hook_url(rx: WebhookReceiver, path: str = "hooks/ops") -> str:
    return f"json://ops:{SECRET_PW}@127.0.0.1:{rx.port}/{path}/{SECRET_TOKEN}"


def settings(tmp: Path, channels: list[dict[str, Any]], actions: dict[str, Any] | None = None,
             **notify: Any) -> Settings:
    fast = {"retry_initial": 0.2, "retry_max": 0.5, "timeout": 5.0, "poll_interval": 0.1}
    return Settings(state_dir=tmp / "state", notify={**fast, **notify, "channels": channels},
                    actions={"unit_check": "never", **(actions or {})})  # type: ignore[arg-type]


def worker(s: Settings, store: Store) -> NotifyWorker:
    channels, problems = load_channels(s.notify)
    assert not problems
    return NotifyWorker(s, store, channels)


async def drain(w: NotifyWorker) -> None:
    """Run delivery rounds until nothing is due."""
    for _ in range(200):
        if not await w.step():
            return
    raise AssertionError("the worker never ran out of work")


async def wait_for(pred: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    assert pred()


def mail_text(envelope: Any) -> tuple[str, str]:
    msg: Message = message_from_bytes(envelope.content, policy=policy.default)
    plain = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
    payload = plain.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return str(msg["Subject"]), payload.decode()


async def states(store: Store) -> list[tuple[str, str, str, str | None]]:
    async with store.tx() as tx:
        rows = await tx.execute(
            "SELECT n.kind, d.channel, d.state, d.reason FROM notification_deliveries d "
            "JOIN notifications n ON n.id = d.notification_id ORDER BY d.seq")
    return [(r["kind"], r["channel"], r["state"], r["reason"]) for r in rows]


# -- what is sent, to real receivers ------------------------------------------------------------


async def test_incident_lifecycle_reaches_webhook_and_smtp_mailbox(
    tmp_path: Path, store: Store, hook: WebhookReceiver, smtp: SmtpReceiver
) -> None:
    s = settings(tmp_path, [
        {"name": "hook", "url": hook_url(hook)},
        {"name": "mail", "url": f"mailto://127.0.0.1:{smtp.port}?from=ais@example.org"
                                "&to=admin@example.org"},
    ], dashboard_url="https://ops.example.org/ais")
    w = worker(s, store)
    [inc] = await open_incidents(store, 1, severity="critical")
    assert await store.record_review(inc, None, escalate=True, error="layer refused")
    assert await store.resolve_incident(inc, by="quiet", remember=False)
    await drain(w)

    titles = [r.body["title"] for r in hook.received]
    assert [t.split(":")[0] for t in titles] == [
        "[critical] Incident opened", "[critical] Incident escalated",
        "[critical] Incident resolved"]
    assert all("unit_failed — svc0-" in t for t in titles)  # the facts: rule, unit, log words
    opened = hook.received[0]
    assert opened.path == f"/hooks/ops/{SECRET_TOKEN}"
    assert opened.body["type"] == "failure" and hook.received[2].body["type"] == "success"
    assert f"Incident {inc}: https://ops.example.org/ais/#incidents" in opened.body["message"]
    assert opened.ref == f"incident.opened:{inc}"
    # The same three by e-mail, through a real SMTP conversation.
    assert len(smtp.messages) == 3
    subject, text = mail_text(smtp.messages[0])
    assert smtp.messages[0].rcpt_tos == ["admin@example.org"]
    assert subject.startswith("[critical] Incident opened: service: unit_failed")
    assert f"Incident {inc}" in text and "Host web1" in text
    assert [st[2] for st in await states(store)] == ["delivered"] * 6


async def test_approval_pending_says_until_when_and_how_to_approve(
    tmp_path: Path, store: Store, runs: ActionRuns, hook: WebhookReceiver, smtp: SmtpReceiver
) -> None:
    st = make_standins(tmp_path)
    s = settings(tmp_path, [
        {"name": "hook", "url": hook_url(hook)},
        {"name": "mail", "url": f"mailto://127.0.0.1:{smtp.port}?from=ais@example.org"
                                "&to=admin@example.org", "kinds": ["approval.pending"]},
    ], actions={"autonomy": "suggest", "search_path": st.search_path, "approval_ttl": 3600})
    w = worker(s, store)
    [inc] = await open_incidents(store, 1, severity="warning")
    [p] = await service.handle_proposals(inc, [ProposedAction(
        action="restart_unit", params={"unit": "nginx.service"}, rationale="it failed")],
        store, s, runs=runs)
    assert p.status == "pending"
    await drain(w)

    [pending] = [r for r in hook.received if "Approval needed" in r.body["title"]]
    body = pending.body["message"]
    assert pending.body["title"] == "[warning] Approval needed: restart_unit nginx.service"
    assert f"Approve: ai-sysadmin approvals approve {p.id}" in body
    assert f"Reject:  ai-sysadmin approvals reject {p.id}" in body
    assert f"Dashboard: http://127.0.0.1:{s.gateway.port}/#approvals" in body
    assert "(in 60 min)" in body and "Expires " in body
    assert "Dry run: " in body and "risk medium" in body and f"Incident {inc}" in body
    # The mail channel wants approvals only: exactly this one.
    assert len(smtp.messages) == 1
    subject, text = mail_text(smtp.messages[0])
    assert subject == pending.body["title"] and f"approvals approve {p.id}" in text

    # Approved, it runs: action.succeeded (info: below the default warning floor, so a
    # channel that wants it says min_severity = info).
    await service.approve(store, s, p.id, "alice", runs=runs)
    await drain(w)
    assert not [r for r in hook.received if "Action ran" in r.body["title"]]
    notes = await store.recent_notifications(10)
    assert notes[0]["kind"] == "action.succeeded" and notes[0]["deliveries"] == []


async def test_actions_run_failed_and_refused_are_told(
    tmp_path: Path, store: Store, runs: ActionRuns, hook: WebhookReceiver
) -> None:
    st = make_standins(tmp_path)
    s = settings(tmp_path, [{"name": "hook", "url": hook_url(hook), "min_severity": "info",
                             "kinds": ["action.succeeded", "action.failed", "action.refused"]}],
                 actions={"autonomy": "auto-full", "allow_auto_full": True,
                          "search_path": st.search_path})
    w = worker(s, store)
    incs = await open_incidents(store, 1)
    out = await service.handle_proposals(None, [
        {"action": "restart_unit", "params": {"unit": "sshd.service"}, "rationale": "x"},
        {"action": "no_such_action", "params": {}, "rationale": "y"},
    ], store, s, runs=runs)
    assert [p.status for p in out] == ["refused", "refused"]
    # Changes outside an incident's units wait; inside one they run (auto-full).
    async with store.tx() as tx:
        unit = (await tx.execute("SELECT unit FROM incidents WHERE id = ?", incs))[0]["unit"]
    st.set_units({unit: {"id": unit, "names": [unit], "fail": True}})
    [failed] = await service.handle_proposals(incs[0], [
        {"action": "restart_unit", "params": {"unit": unit}, "rationale": "z"}], store, s, runs=runs)
    assert failed.status == "failed"
    await drain(w)
    titles = [r.body["title"] for r in hook.received]
    assert "[info] Action refused: restart_unit sshd.service" in titles
    assert "[info] Action refused: no_such_action" in titles
    assert f"[critical] Action failed: restart_unit {unit}" in titles
    refused = next(r for r in hook.received if "sshd" in r.body["title"]).body["message"]
    assert "Refused: protected_unit" in refused
    failure = next(r for r in hook.received if "failed" in r.body["title"]).body["message"]
    assert "Exit code 1" in failure and "Job for" in failure


# -- durability: receiver down, crash windows --------------------------------------------------


async def test_receiver_down_for_a_while_gets_it_once_when_back(
    tmp_path: Path, store: Store
) -> None:
    port = free_port()
    rx = WebhookReceiver(port)  # not listening yet: connections are refused
    s = settings(tmp_path, [{"name": "hook", "url": f"json://127.0.0.1:{port}/in"}])
    w = worker(s, store)
    task = asyncio.create_task(w.run())
    try:
        [inc] = await open_incidents(store, 1)

        async def attempts() -> int:
            async with store.tx() as tx:
                rows = await tx.execute("SELECT attempts, last_error FROM notification_deliveries")
            return int(rows[0]["attempts"]) if rows else 0

        deadline = time.monotonic() + 15
        while await attempts() < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await attempts() >= 3
        async with store.tx() as tx:
            err = (await tx.execute("SELECT last_error FROM notification_deliveries"))[0]
        assert "Connection refused" in err["last_error"]
        # It answers 503 for a while (a receiver restarting), then comes back for good.
        rx.status = 503
        rx.start()
        await asyncio.sleep(1.0)
        assert rx.received == []
        rx.status = 200
        await wait_for(lambda: len(rx.received) >= 1)
        await asyncio.sleep(1.5)  # nothing more arrives: exactly once
        assert rx.refs() == [f"incident.opened:{inc}"]
        assert [x[2] for x in await states(store)] == ["delivered"]
    finally:
        task.cancel()
        rx.stop()


async def test_slow_receiver_times_out_with_a_one_line_cause(
    tmp_path: Path, store: Store, hook: WebhookReceiver
) -> None:
    hook.delay = 3.0
    s = settings(tmp_path, [{"name": "hook", "url": hook_url(hook)}], timeout=1.0)
    w = worker(s, store)
    await open_incidents(store, 1)
    started = time.monotonic()
    await w.route()
    await w.deliver_due()
    assert time.monotonic() - started < 3.5
    async with store.tx() as tx:
        row = (await tx.execute("SELECT state, last_error FROM notification_deliveries"))[0]
    assert row["state"] == "pending" and "\n" not in row["last_error"]
    assert "timed out" in row["last_error"].lower() or "error" in row["last_error"].lower()


async def test_lost_approval_notification_is_written_by_reconciliation(
    tmp_path: Path, store: Store, hook: WebhookReceiver
) -> None:
    """The action stage stores a pending proposal, then notifies in a second transaction:
    a crash between the two is repaired by the worker's reconciliation."""
    s = settings(tmp_path, [{"name": "hook", "url": hook_url(hook)}])
    p = await store.add_proposal("restart_unit", {"unit": "nginx.service"}, "r",
                                 risk="medium", dry_run="systemctl restart -- nginx.service",
                                 expires_at=time.time() + 600)
    async with store.tx() as tx:  # the crash happened a while ago
        await tx.execute("UPDATE proposals SET updated_at = updated_at - 60 WHERE id = ?", (p.id,))
    w = worker(s, store)
    await drain(w)
    [got] = hook.received
    assert got.ref == f"approval.pending:{p.id}" and "(in 10 min)" in got.body["message"]
    # The stage's own (late) enqueue and further reconciliations change nothing.
    await store.notify_proposal(p.id, "pending")
    w._next_reconcile = 0.0
    await drain(w)
    assert len(hook.received) == 1


# -- filters, de-duplication, rate limits, quiet hours ----------------------------------------


async def test_kinds_and_severity_filters_per_channel(
    tmp_path: Path, store: Store, hook: WebhookReceiver
) -> None:
    s = settings(tmp_path, [
        {"name": "all", "url": f"json://127.0.0.1:{hook.port}/all", "min_severity": "info"},
        {"name": "crit", "url": f"json://127.0.0.1:{hook.port}/crit",
         "min_severity": "critical"},
        {"name": "opened", "url": f"json://127.0.0.1:{hook.port}/opened",
         "kinds": ["incident.opened"]},
        {"name": "off", "url": f"json://127.0.0.1:{hook.port}/off", "enabled": False},
    ])
    w = worker(s, store)
    [info] = await open_incidents(store, 1, severity="info")
    [warn] = await open_incidents(store, 1, severity="warning")
    [crit] = await open_incidents(store, 1, severity="critical")
    await store.resolve_incident(warn, by="admin", remember=False)
    await drain(w)
    got: dict[str, list[str | None]] = {}
    for r in hook.received:
        got.setdefault(r.path.strip("/"), []).append(r.ref)
    assert got["all"][:3] == [f"incident.opened:{i}" for i in (info, warn, crit)]
    assert len(got["all"]) == 4 and "Incident resolved" in hook.received[-1].body["title"]
    assert got["crit"] == [f"incident.opened:{crit}"]
    assert got["opened"] == [f"incident.opened:{warn}", f"incident.opened:{crit}"]
    assert "off" not in got


async def test_same_kind_and_subject_within_the_window_is_sent_once_unless_worse(
    tmp_path: Path, store: Store, hook: WebhookReceiver
) -> None:
    s = settings(tmp_path, [{"name": "hook", "url": hook_url(hook), "min_severity": "info"}],
                 dedupe_window=600)
    w = worker(s, store)
    detail = {"id": "inc_x", "title": "disk: full — /var", "host": "h", "severity": "warning"}
    for _ in range(3):
        await store.enqueue_notification("incident.escalated", "inc_x", "warning", detail)
    await store.enqueue_notification("incident.escalated", "inc_x", "critical", detail)
    await store.enqueue_notification("incident.escalated", "inc_y", "warning", detail)
    await drain(w)
    assert [(x[2], x[3]) for x in await states(store)] == [
        ("delivered", None), ("dropped", "duplicate"), ("dropped", "duplicate"),
        ("delivered", None), ("delivered", None)]
    assert len(hook.received) == 3


async def test_rate_limit_drops_beyond_the_hour_budget_and_says_how_many(
    tmp_path: Path, store: Store, hook: WebhookReceiver
) -> None:
    s = settings(tmp_path, [{"name": "hook", "url": hook_url(hook), "max_per_hour": 2}])
    w = worker(s, store)
    await open_incidents(store, 5)
    await drain(w)
    assert [x[2:] for x in await states(store)] == [("delivered", None)] * 2 + [
        ("dropped", "rate_limited")] * 3
    assert len(hook.received) == 2
    # An hour later (the stored deliveries aged by an hour) the next one goes, and says so.
    async with store.tx() as tx:
        await tx.execute("UPDATE notification_deliveries SET created_at = created_at - 3601")
    await open_incidents(store, 1)
    await drain(w)
    assert len(hook.received) == 3
    assert "(3 earlier notifications on this channel were dropped by its rate limit)" in \
        hook.received[-1].body["message"]


def test_quiet_hours_window_wraps_midnight() -> None:
    def at(h: int, m: int) -> float:
        return time.mktime((2026, 3, 10, h, m, 0, 0, 0, -1))

    night = (22 * 60, 7 * 60)
    assert quiet_until(night, at(23, 30)) == at(7, 0) + 86400
    assert quiet_until(night, at(3, 0)) == at(7, 0)
    assert quiet_until(night, at(7, 0)) is None and quiet_until(night, at(12, 0)) is None
    assert quiet_until((9 * 60, 17 * 60), at(12, 0)) == at(17, 0)
    assert quiet_until((9 * 60, 17 * 60), at(8, 59)) is None


def _quiet_now() -> str:
    """Quiet hours that hold now and end in about an hour (local time)."""
    now = time.localtime()
    start = (now.tm_hour * 60 + now.tm_min - 1) % 1440
    end = (start + 61) % 1440
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


async def test_quiet_hours_hold_or_drop_all_but_critical(
    tmp_path: Path, store: Store, hook: WebhookReceiver
) -> None:
    quiet = _quiet_now()
    s = settings(tmp_path, [
        {"name": "hold", "url": f"json://127.0.0.1:{hook.port}/hold", "quiet_hours": quiet},
        {"name": "drop", "url": f"json://127.0.0.1:{hook.port}/drop", "quiet_hours": quiet,
         "quiet_action": "drop"},
    ])
    w = worker(s, store)
    await open_incidents(store, 1, severity="warning")
    [crit] = await open_incidents(store, 1, severity="critical")
    await drain(w)
    # Critical goes at once on both; the warning waits on one and is dropped on the other.
    assert sorted(r.path for r in hook.received) == ["/drop", "/hold"]
    assert {r.ref for r in hook.received} == {f"incident.opened:{crit}"}
    rows = await states(store)
    assert ("incident.opened", "drop", "dropped", "quiet_hours") in rows
    async with store.tx() as tx:
        held = (await tx.execute("SELECT next_at FROM notification_deliveries WHERE "
                                 "channel = 'hold' AND state = 'pending'"))[0]["next_at"]
    assert 55 * 60 < held - time.time() < 61 * 60  # due when quiet hours end
    async with store.tx() as tx:  # …which they now do
        await tx.execute("UPDATE notification_deliveries SET next_at = 0 WHERE state = 'pending'")
    await drain(w)
    assert sorted(r.path for r in hook.received) == ["/drop", "/hold", "/hold"]


# -- secrets ------------------------------------------------------------------------------------


async def test_channel_secrets_never_reach_the_logs(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    rx = WebhookReceiver(port)
    url = f"json://ops:{SECRET_PW}@127.0.0.1:{port}/hooks/{SECRET_TOKEN}?key={SECRET_TOKEN}"
    s = settings(tmp_path, [
        {"name": "hook", "url": url},
        {"name": "tg", "url": f"tgram://123456789:{SECRET_TOKEN}/4242"},
        {"name": "bad", "url": f"nosuchscheme://{SECRET_PW}@host/{SECRET_TOKEN}"},
    ])
    w = worker(s, store)
    try:
        await open_incidents(store, 2)
        await w.route()
        await w.deliver_due()  # refused, unknown scheme, telegram unreachable or refused
        rx.start()
        async with store.tx() as tx:
            await tx.execute("UPDATE notification_deliveries SET next_at = 0")
        await w.deliver_due()
        assert len(rx.received) == 2
        assert SECRET_TOKEN in rx.received[0].path  # the receiver did get the real URL
        probe = await w.send_probe()
    finally:
        rx.stop()
    assert [r["ok"] for r in probe] == [True, False, False]
    shown = repr(probe) + repr(await store.recent_notifications()) + repr(
        await store.notification_stats()) + repr(w.channels)
    text = caplog.text
    assert "failed" in text and "delivered to hook" in text  # failures were logged…
    for secret in (SECRET_PW, SECRET_TOKEN, "123456789"):
        assert secret not in text, f"secret in the logs: {secret}"  # …without secrets
        assert secret not in shown, f"secret in what the API shows: {secret}"
    assert {r["target"] for r in probe} == {f"json://127.0.0.1:{port}", "tgram://…",
                                            "nosuchscheme://…"}


def test_targets_show_scheme_and_server_only() -> None:
    assert target(f"mailtos://me:{SECRET_PW}@smtp.example.org:587?to=a@example.org") \
        == "mailtos://smtp.example.org:587"
    assert target(f"ntfys://ntfy.example.org/{SECRET_TOKEN}") == "ntfys://ntfy.example.org"
    assert target(f"ntfy://{SECRET_TOKEN}") == "ntfy://…"  # the topic is the secret
    assert target(f"matrixs://bot:{SECRET_PW}@matrix.example.org/!room:example.org") \
        == "matrixs://matrix.example.org"
    for url in (f"slack://{SECRET_TOKEN}/B1/C1", f"discord://1234/{SECRET_TOKEN}",
                f"gotifys://gotify.example.org/{SECRET_TOKEN}"):
        assert SECRET_TOKEN not in target(url)
        assert SECRET_TOKEN in secret_parts(url)
    assert "smtp.example.org" not in secret_parts("mailtos://u:p4ss@smtp.example.org")


# -- configuration ------------------------------------------------------------------------------


def test_channel_urls_from_files_and_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "hook.url").write_text(f"# from LoadCredential\njson://h.example.org/{SECRET_TOKEN}\n")
    (tmp_path / "channels").write_text(
        "# name=url or a bare url\n"
        f"pager=ntfys://ntfy.example.org/{SECRET_TOKEN}\n"
        f"mailtos://u:{SECRET_PW}@smtp.example.org?to=a@example.org\n"
        "hook=json://dup.example.org/x\n"
        "not a url\n")
    s = Settings(notify={  # type: ignore[arg-type]
        "channels": [
            {"name": "hook", "url_file": str(tmp_path / "hook.url"), "min_severity": "critical"},
            {"name": "gone", "url_file": str(tmp_path / "missing.url")},
        ],
        "channels_file": str(tmp_path / "channels"),
        "min_severity": "info",
    })
    channels, problems = load_channels(s.notify)
    assert [(c.name, c.target, c.min_severity) for c in channels] == [
        ("hook", "json://h.example.org", "critical"),
        ("pager", "ntfys://ntfy.example.org", "info"),
        ("file1", "mailtos://smtp.example.org", "info"),
    ]
    assert problems == [
        f"notify channel 'gone': cannot read {tmp_path / 'missing.url'}: No such file or directory",
        "notify.channels_file line 4: channel 'hook' defined twice",
        "notify.channels_file line 5: notify channel 'file2': not a URL (expected scheme://…)",
    ]
    assert not any(SECRET_TOKEN in p or SECRET_PW in p for p in problems)


def test_bad_channel_config_is_one_clear_error(tmp_path: Path) -> None:
    bad = {
        "notify": {"channels": [
            {"name": "a", "url": "json://h/x", "url_file": "/etc/x"},
            {"name": "Bad Name!", "url": "json://h/x"},
            {"name": "c", "url": "json://h/x", "quiet_hours": "25:00-07:00"},
            {"name": "d", "url": "json://h/x", "kinds": ["incident.exploded"]},
        ]},
    }
    with pytest.raises(ConfigError) as info:
        load_settings(write_toml(tmp_path / "c.toml", bad))
    text = "\n".join(info.value.lines)
    assert "notify.channels.0: Value error, channel 'a': set exactly one of url and url_file" \
        in text
    assert "notify.channels.1.name" in text and "notify.channels.2.quiet_hours" in text
    assert "notify.channels.3.kinds.0" in text
    dup = {"notify": {"channels": [{"name": "a", "url": "json://h/x"},
                                   {"name": "a", "url": "json://h/y"}]}}
    with pytest.raises(ConfigError, match="channel names must be unique: a"):
        load_settings(write_toml(tmp_path / "d.toml", dup))
    # A secret given inline is never printed back by `config show`.
    ok = load_settings(write_toml(tmp_path / "e.toml", {"notify": {"channels": [
        {"name": "a", "url": f"json://h/{SECRET_TOKEN}"}]}}))
    assert SECRET_TOKEN not in ok.model_dump_json()


# -- the outbox itself, on both backends ------------------------------------------------------

_db = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s = make_store("", tmp_path)
    else:
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        s = make_store(cluster.create_db(f"notify{next(_db)}_{int(time.time())}"), tmp_path)
    await s.open()
    yield s
    await s.close()


async def test_outbox_claims_are_leased_and_idempotent(any_store: Store) -> None:
    from layers.store.base import DeliveryPlan

    store = any_store
    [inc] = await open_incidents(store, 1)
    await store.enqueue_notification("incident.opened", inc, "critical", {}, key=f"incident.opened:{inc}")
    [n] = await store.unrouted_notifications()  # the keyed second enqueue was a no-op
    assert n.kind == "incident.opened" and n.detail["id"] == inc
    plans = [DeliveryPlan("a", "k", 2), DeliveryPlan("b", "k", 2, dropped=True, reason="duplicate")]
    assert await store.route_notification(n.id, plans)
    assert not await store.route_notification(n.id, plans)  # routed once only
    now = time.time()
    [d] = await store.claim_deliveries(now, now + 30)
    assert d.channel == "a" and d.notification.id == n.id
    assert await store.claim_deliveries(now + 1, now + 31) == []  # leased
    [again] = await store.claim_deliveries(now + 31, now + 60)  # the lease ran out (a crash)
    await store.delivery_failed(again.seq, "refused", retry_at=now + 100)
    assert await store.claim_deliveries(now + 99, now + 130) == []
    [third] = await store.claim_deliveries(now + 101, now + 130)
    assert third.attempts == 1
    await store.delivery_done(third.seq)
    stats = await store.notification_stats()
    assert stats["a"]["delivered"] == 1 and stats["b"]["dropped"] == 1
    assert stats["a"]["last_error"] == "refused"
    # Reconciliation: a screened pending proposal without its notification gets one, once;
    # an expired one gets none.
    p = await store.add_proposal("restart_unit", {"unit": "a.service"}, "r", dry_run="x",
                                 expires_at=time.time() + 600)
    gone = await store.add_proposal("restart_unit", {"unit": "b.service"}, "r", dry_run="x",
                                    expires_at=time.time() - 1)
    later = time.time() + 60
    assert await store.reconcile_notifications(settled_before=later, refused_since=0) == 1
    assert await store.reconcile_notifications(settled_before=later, refused_since=0) == 0
    kinds = {(n.kind, n.subject) for n in await store.unrouted_notifications()}
    assert kinds == {("approval.pending", p.id)} and gone.id not in str(kinds)
    assert await store.prune_notifications(time.time() + 1) == 2
    assert await store.recent_notifications() == [] and await store.notification_stats() == {}

"""Issue 20, Alertmanager intake: ``POST /v1/alertmanager`` takes Alertmanager's webhook
payload (version 4), authenticated, bounded, idempotent, and turns alerts into events the
prefilter's alert rules pick up; a resolved alert resolves the incident its firing alert
opened, also when it arrives before the firing alert's verdict and across a restart.

The intake tests post to a real gateway (its layers point at nothing: no verdict is
needed to see what was stored) and read the real store. The resolution tests run the
intake on a real SQLite store and record the verdict the trigger stage records when the
trigger layer's output is unusable: the rule's (layers/pipeline/trigger.py ``combine``).
The whole chain with Prometheus, Alertmanager and the real model is in
tests/test_alertmanager_prometheus.py.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from layers.alertmanager import AlertIntake, Notification
from layers.config import Settings
from layers.events import Event, StoredEvent
from layers.pipeline.trigger import VerdictBus, combine
from layers.prefilter import Prefilter, load_rules
from layers.store import Prefiltered, Store, make_store
from tests.reliability_support import Gateway, gateway_data
from tests.support import free_port, write_toml

INTAKE_KEY = "am-intake-Xq93SECRET"
AM = {"Authorization": f"Bearer {INTAKE_KEY}"}
USER = {"Authorization": "Bearer test-key"}
RULES = load_rules()


def alert(fp: str, status: str = "firing", *, starts: str = "2026-05-01T10:00:00.123456789Z",
          ends: str = "0001-01-01T00:00:00Z", **labels: str) -> dict[str, Any]:
    summary = labels.pop("summary", "web.service failed on web1")
    return {
        "status": status,
        "labels": {"alertname": "DemoUnitFailed", "instance": "web1:9100",
                   "severity": "critical", **labels},
        "annotations": {"summary": summary, "runbook_url": "https://runbooks/demo"},
        "startsAt": starts, "endsAt": ends,
        "generatorURL": "http://prometheus:9090/graph?g0.expr=demo_unit_failed+%3E+0",
        "fingerprint": fp,
    }


def notification(*alerts: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "version": "4", "groupKey": '{}:{alertname="DemoUnitFailed"}', "truncatedAlerts": 0,
        "status": alerts[0]["status"], "receiver": "ai-sysadmin",
        "groupLabels": {"alertname": "DemoUnitFailed"},
        "commonLabels": {"alertname": "DemoUnitFailed"}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "alerts": list(alerts), **top,
    }


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("alertmanager")
    port = free_port()
    data = gateway_data(
        tmp, dict.fromkeys(("trigger", "review", "meta"), free_port()), port,
        memory={"enabled": False},
        alertmanager={"api_keys": [INTAKE_KEY], "default_host": "am-default"},
        pipeline={"max_batch_bytes": 64 * 1024, "max_batch_events": 50},
    )
    gateway = Gateway(write_toml(tmp / "gw.toml", data), port, tmp / "gw.log")
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture
async def gw_store(gw: Gateway) -> AsyncIterator[Store]:
    """The running gateway's own store (SQLite in WAL mode: shared, as with the daemon)."""
    store = make_store("", Path(tomllib.loads(gw.config.read_text())["state_dir"]))
    await store.open()
    yield store
    await store.close()


def post(gw: Gateway, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{gw.url}/v1/alertmanager", content=content, timeout=10,
                      headers={"Content-Type": "application/json", **(AM if headers is None
                                                                       else headers)})


def rule_of(event: Event) -> str | None:
    """What the packaged prefilter rules make of a stored event (a fresh filter: no
    debounce from earlier tests)."""
    match = Prefilter(RULES, debounce=0).check(event)
    return match.rule.name if match else None


def error(r: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


# -- intake ------------------------------------------------------------------------------


async def test_firing_alert_is_stored_as_an_event_the_alert_rule_picks_up(
    gw: Gateway, gw_store: Store
) -> None:
    r = post(gw, notification(alert("3f2a9c1d0e8b7a65", name="web.service")))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "alertmanager.notification"
    assert (body["accepted"], body["duplicates"], body["firing"]) == (1, 0, 1)
    [ev] = await gw_store.events.get(body["ids"])
    assert ev.id == "alertmanager:3f2a9c1d0e8b7a65:1777629600123456:firing"
    assert (ev.source, ev.host, ev.unit, ev.priority) == ("alertmanager", "web1", "web.service", 2)
    assert ev.message == "DemoUnitFailed: web.service failed on web1"
    assert ev.timestamp == pytest.approx(1777629600.123456)
    f = ev.fields
    assert f["alertname"] == "DemoUnitFailed" and f["alert_status"] == "firing"
    assert f["label.instance"] == "web1:9100" and f["label.name"] == "web.service"
    assert f["annotation.runbook_url"] == "https://runbooks/demo"
    assert f["starts_at"] == "2026-05-01T10:00:00.123456+00:00" and f["ends_at"] is None
    assert f["receiver"] == "ai-sysadmin" and f["external_url"] == "http://alertmanager:9093"
    assert rule_of(ev) == "alert_critical"


async def test_retries_and_repeat_sends_are_stored_once(gw: Gateway, gw_store: Store) -> None:
    note = notification(alert("aa01"), alert("aa02", instance="web2:9100"))
    first = post(gw, note).json()
    assert (first["accepted"], first["duplicates"]) == (2, 0)
    # Alertmanager's retry after a lost answer, and its repeat_interval re-send (same
    # fingerprint and startsAt; the annotation's value may have changed meanwhile).
    note["alerts"][0]["annotations"]["summary"] = "still failing"
    again = post(gw, note).json()
    assert (again["accepted"], again["duplicates"]) == (0, 2) and again["ids"] == first["ids"]
    # The same alert firing anew (a new startsAt) is a new event; its resolution another.
    later = alert("aa01", starts="2026-05-01T11:00:00Z")
    assert post(gw, notification(later)).json()["accepted"] == 1
    done = post(gw, notification(alert("aa01", "resolved", ends="2026-05-01T10:05:00Z")))
    assert done.json()["accepted"] == 1 and done.json()["resolved"] == 1
    ids = [*first["ids"], *done.json()["ids"]]
    assert len(set(ids)) == 3
    # The first text stands: a re-send is a duplicate, not an update.
    [kept] = await gw_store.events.get(first["ids"][:1])
    assert kept.message == "DemoUnitFailed: web.service failed on web1"


async def test_host_unit_and_severity_come_from_the_labels(gw: Gateway, gw_store: Store) -> None:
    cases = [  # labels → (host, unit, priority, rule)
        ({"instance": "web1:9100"}, ("web1", None, 2, "alert_critical")),
        ({"instance": "[2001:db8::7]:9100", "severity": "warning"},
         ("2001:db8::7", None, 4, "alert_warning")),
        ({"instance": "https://shop.example.org/health", "severity": "info"},
         ("shop.example.org", None, 5, "alert_info")),
        ({"instance": "db2", "severity": "PAGE", "unit": "postgresql.service"},
         ("db2", "postgresql.service", 2, "alert_critical")),
        # No instance: the configured default host. No severity: a warning.
        ({"instance": "", "severity": ""}, ("am-default", None, 4, "alert_warning")),
        # A `name` that is no systemd unit (a filesystem, a job) is not taken as one.
        ({"name": "/var/lib", "severity": "unheard-of"}, ("web1", None, 4, "alert_warning")),
        # Severity "none" (the always-firing Watchdog) is kept, but no alert rule takes it.
        ({"alertname": "Watchdog", "severity": "none", "summary": "pipeline works"},
         ("web1", None, 6, None)),
    ]
    alerts = [alert(f"bb{i:02x}", **labels) for i, (labels, _) in enumerate(cases)]
    r = post(gw, notification(*alerts))
    assert r.status_code == 200, r.text
    by_id = {e.id: e for e in await gw_store.events.get(r.json()["ids"])}
    for event_id, (labels, want) in zip(r.json()["ids"], cases, strict=True):
        ev = by_id[event_id]
        assert (ev.host, ev.unit, ev.priority, rule_of(ev)) == want, labels


async def test_a_resolved_notice_is_stored_but_never_a_candidate(
    gw: Gateway, gw_store: Store
) -> None:
    # Even when the alert's own words are an error's: the notice's message is fixed.
    r = post(gw, notification(alert("cc01", "resolved", ends="2026-05-01T10:09:00Z",
                                    alertname="Unreachable", summary="backup failed: error")))
    assert r.status_code == 200 and r.json()["resolved"] == 1
    [ev] = await gw_store.events.get(r.json()["ids"])
    assert ev.id.endswith(":resolved") and ev.priority == 6
    assert ev.message == "alert resolved: cc01"
    assert ev.fields["alertname"] == "Unreachable"
    assert ev.fields["annotation.summary"] == "backup failed: error"
    assert ev.timestamp == pytest.approx(1777630140.0)
    assert rule_of(ev) is None


def test_webhook_keys_and_api_keys_are_accepted_nothing_else(gw: Gateway) -> None:
    note = notification(alert("dd01"))
    assert post(gw, note, headers=AM).status_code == 200
    assert post(gw, note, headers=USER).status_code == 200
    for headers, code in (({}, "missing_api_key"),
                          ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
                          ({"Authorization": INTAKE_KEY}, "missing_api_key")):
        r = post(gw, note, headers=headers)
        assert r.status_code == 401 and error(r)["code"] == code
    # The webhook key opens the webhook only.
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/incidents"), ("POST", "/v1/events")):
        r = httpx.request(method, f"{gw.url}{path}", headers=AM, json={"events": []}, timeout=10)
        assert r.status_code == 401, (path, r.status_code)


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    (b"not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    ({"version": "3", "alerts": []}, 422, "version", "unsupported_version"),
    ({"alerts": []}, 422, "version", "unsupported_version"),
    (notification(alert("ee01"), alerts=[]), 400, "alerts", "invalid_value"),
    (notification(alert("ee02", "pending"), status="firing"), 400, "alerts[0].status",
     "invalid_value"),
    (notification({**alert("ee03"), "fingerprint": "not-hex!"}), 400, "alerts[0].fingerprint",
     "invalid_value"),
    (notification({**alert("ee04"), "startsAt": "yesterday"}), 400, "alerts[0].startsAt",
     "invalid_value"),
    (notification({**alert("ee05"), "labels": ["a"]}), 400, "alerts[0].labels", "invalid_value"),
    ({k: v for k, v in notification(alert("ee06")).items() if k != "receiver"}, 400, "receiver",
     "invalid_value"),
])
def test_bad_payloads_get_a_clear_error(gw: Gateway, body: Any, status: int, param: str | None,
                                        code: str) -> None:
    r = post(gw, body)
    assert r.status_code == status, r.text
    err = error(r)
    assert (err["param"], err["code"]) == (param, code), err
    assert err["type"] == "invalid_request_error"


def test_oversize_payloads_are_refused(gw: Gateway) -> None:
    big = notification(alert("ff01", summary="x" * 70_000))
    r = post(gw, big)
    assert r.status_code == 413 and error(r)["code"] == "request_too_large"
    many = notification(*[alert(f"f{i:03x}") for i in range(51)])
    r = post(gw, many)
    assert r.status_code == 413 and error(r)["code"] == "too_many_alerts"
    assert "max_alerts" in error(r)["message"]


async def test_fields_of_newer_versions_are_ignored_and_text_is_bounded(
    gw: Gateway, gw_store: Store
) -> None:
    marker = "LOGMARKER-7731"
    labels = {f"l{i:03d}": f"{marker}-{i}" for i in range(80)}
    one = {**alert("ab01", summary=f"{marker} " + "y" * 5000), "futureField": {"a": 1}}
    one["labels"].update(labels)
    one["annotations"]["description"] = "z" * 9000
    r = post(gw, notification(one, futureTop=True, truncatedAlerts=3))
    assert r.status_code == 200, r.text
    assert r.json()["truncated_alerts"] == 3
    [ev] = await gw_store.events.get(r.json()["ids"])
    assert len(ev.message) <= 2000 and ev.message.startswith(f"DemoUnitFailed: {marker}")
    assert len(ev.fields) == 64 and ev.fields["fields_dropped"] == 83 + 3 - 54
    assert all(len(v) <= 4096 for v in ev.fields.values() if isinstance(v, str))
    # The notification's text never reaches the gateway's log (it is untrusted).
    log = gw.log()
    assert "left out 3 alerts" in log and marker not in log


# -- resolution --------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = make_store("", tmp_path)
    await s.open()
    yield s
    await s.close()


def intake_for(store: Store, tmp_path: Path, bus: VerdictBus | None = None) -> AlertIntake:
    settings = Settings.model_validate({
        "state_dir": str(tmp_path / "state"), "memory": {"enabled": False},
        "pipeline": {"poll_interval": 0.05}, "alertmanager": {"default_host": "am"},
    })
    return AlertIntake(settings, store, bus or VerdictBus(), store.events.add)


async def rule_verdicts(store: Store, bus: VerdictBus | None = None) -> None:
    """What the trigger stage records when its layer gives nothing usable: the prefilter
    of new events, then the rule's verdict (flagged unreviewed) for each candidate."""
    pf = Prefilter(RULES, debounce=0)
    new = await store.events.in_state("new")
    decisions = []
    for e in new:
        m = pf.check(e)
        decisions.append(Prefiltered(e.seq, True, m.fingerprint, m.rule.name) if m
                         else Prefiltered(e.seq, False))
    await store.events.mark_prefiltered(decisions)
    cands: list[StoredEvent] = await store.events.in_state("candidate")
    recorded = await store.verdicts.record(
        [combine(pf.rule(e.rule), None, e, why="no trigger layer in this test") for e in cands])
    if bus is not None:
        await bus.publish(recorded)


def note(*alerts: dict[str, Any]) -> Notification:
    return Notification.model_validate(notification(*alerts))


async def incident_of(store: Store, firing_fp: str) -> str:
    [v] = [v for v in await store.verdicts.after(0) if f":{firing_fp}:" in v.event_id]
    assert v.incident_id is not None
    return v.incident_id


async def test_resolved_alert_resolves_the_incident_it_opened(store: Store, tmp_path: Path) -> None:
    intake = intake_for(store, tmp_path)
    await intake.receive(note(alert("1a01", name="web.service")))
    await rule_verdicts(store)
    inc_id = await incident_of(store, "1a01")
    inc = await store.incidents.get(inc_id)
    assert inc is not None and inc.status == "open" and inc.severity == "critical"
    assert inc.rule == "alert_critical" and inc.category == "alert" and inc.unit == "web.service"
    assert inc.title == ("alert: alert_critical — web.service: DemoUnitFailed: "
                         "web.service failed on web1")
    got = await intake.receive(note(alert("1a01", "resolved", name="web.service",
                                          ends="2026-05-01T10:07:00Z")))
    assert got.resolved_incidents == [inc_id]
    done = await store.incidents.get(inc_id)
    assert done is not None and done.status == "resolved" and done.resolved_at is not None
    assert {"status": "resolved", "by": "alertmanager"} in [t.detail for t in done.timeline]
    [n] = [t.detail for t in done.timeline if t.kind == "note"]
    assert n["alertname"] == "DemoUnitFailed" and n["ends_at"] == "2026-05-01T10:07:00+00:00"
    # Alertmanager sending the resolution again changes nothing.
    again = await intake.receive(note(alert("1a01", "resolved", name="web.service",
                                            ends="2026-05-01T10:07:00Z")))
    assert again.resolved_incidents == [] and again.duplicates
    assert len((await store.incidents.get(inc_id)).timeline) == len(done.timeline)  # type: ignore[union-attr]


async def test_resolution_before_the_verdict_waits_for_it_across_a_restart(
    store: Store, tmp_path: Path
) -> None:
    bus = VerdictBus()
    first = intake_for(store, tmp_path, bus)
    follower = asyncio.create_task(first.follow())
    await first.receive(note(alert("2b01")))
    # The trigger layer is slow: the resolution arrives while the firing alert waits.
    got = await first.receive(note(alert("2b01", "resolved", ends="2026-05-01T10:02:00Z")))
    assert got.resolved_incidents == [] and got.accepted
    # The gateway stops (no verdict yet) and starts again on the same store.
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    await first.save_cursor()
    bus2 = VerdictBus()
    second = intake_for(store, tmp_path, bus2)
    follower = asyncio.create_task(second.follow())
    try:
        await asyncio.sleep(0.1)
        await rule_verdicts(store, bus2)  # the verdict at last: the incident opens …
        inc_id = await incident_of(store, "2b01")
        for _ in range(100):  # … and is resolved by the follower
            inc = await store.incidents.get(inc_id)
            assert inc is not None
            if inc.status == "resolved":
                break
            await asyncio.sleep(0.05)
        assert inc.status == "resolved"
        assert {"status": "resolved", "by": "alertmanager"} in [t.detail for t in inc.timeline]
    finally:
        follower.cancel()
        with pytest.raises(asyncio.CancelledError):
            await follower


async def test_an_incident_of_two_alerts_resolves_when_both_have(store: Store,
                                                                 tmp_path: Path) -> None:
    intake = intake_for(store, tmp_path)
    # Two alerts of one host, no unit, one severity: one incident (host and rule).
    await intake.receive(note(alert("3c01", alertname="DiskSlow", severity="warning"),
                              alert("3c02", alertname="NetSlow", severity="warning")))
    await rule_verdicts(store)
    inc_id = await incident_of(store, "3c01")
    assert await incident_of(store, "3c02") == inc_id
    got = await intake.receive(note(alert("3c01", "resolved", alertname="DiskSlow",
                                          severity="warning")))
    assert got.resolved_incidents == []
    inc = await store.incidents.get(inc_id)
    assert inc is not None and inc.status == "open"
    assert any(t.kind == "note" and t.detail["still_firing"] == 1 for t in inc.timeline)
    got = await intake.receive(note(alert("3c02", "resolved", alertname="NetSlow",
                                          severity="warning")))
    assert got.resolved_incidents == [inc_id]


async def test_an_incident_other_events_opened_stays_open(store: Store, tmp_path: Path) -> None:
    intake = intake_for(store, tmp_path)
    await store.events.add([Event(id="j1", host="web1", source="journald", unit="web.service",
                                  priority=3, message="web.service: Failed to start Web.")])
    await rule_verdicts(store)
    await intake.receive(note(alert("4d01", name="web.service")))
    await rule_verdicts(store)
    inc_id = await incident_of(store, "4d01")
    assert [v.incident_id for v in await store.verdicts.after(0)] == [inc_id, inc_id]
    got = await intake.receive(note(alert("4d01", "resolved", name="web.service")))
    assert got.resolved_incidents == []
    inc = await store.incidents.get(inc_id)
    assert inc is not None and inc.status == "open"
    assert any(t.kind == "note" and "kept_open" in t.detail for t in inc.timeline)

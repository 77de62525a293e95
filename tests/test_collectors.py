"""Collectors. This machine has no systemd: the journald parsing is tested on a recorded
journal (``journalctl --output=json`` lines written here) fed through the same code the
live collector uses, and the live collectors must say once that they are off."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from layers.collectors import systemd_running
from layers.collectors.journald import JournaldCollector, parse_lines
from layers.collectors.metrics import sample
from layers.collectors.sink import StoreSink
from layers.collectors.units import FailedUnitsCollector, parse_failed_units
from layers.store import Store


def entry(i: int, msg: object, **kw: str) -> str:
    d = {"__CURSOR": f"s=abc;i={i:x};b=1", "__REALTIME_TIMESTAMP": str(1_700_000_000_000_000 + i),
         "PRIORITY": "6", "_HOSTNAME": "web1", "MESSAGE": msg, **kw}
    return json.dumps(d)


def test_parse_journal_entries() -> None:
    lines = [
        entry(1, "Started foo.", UNIT="foo.service", _SYSTEMD_UNIT="init.scope", _PID="1"),
        entry(2, list(b"binary \xff message"), PRIORITY="3", _SYSTEMD_UNIT="bar.service"),
        "not json at all",
        json.dumps({"__CURSOR": "x"}),  # no MESSAGE
        entry(3, "kernel says hi", _TRANSPORT="kernel"),
    ]
    parsed = parse_lines(lines, "fallback")
    assert [e.unit for e, _ in parsed] == ["foo.service", "bar.service", None]
    assert parsed[1][0].message.startswith("binary ") and parsed[1][0].priority == 3
    assert parsed[0][0].host == "web1" and parsed[0][0].timestamp == pytest.approx(1.7e9, abs=1)
    assert parsed[2][0].fields["_TRANSPORT"] == "kernel"
    # The id comes from the cursor: the same entry read twice is the same event.
    again = parse_lines(lines[:1], "fallback")
    assert again[0][0].id == parsed[0][0].id and parsed[0][1] == "s=abc;i=1;b=1"


def test_unit_field_counts_only_from_a_service_manager() -> None:
    """``UNIT=`` is the sender's own word: from pid 1 (or a user's systemd) it names the
    unit a message is about; from anyone else the event's unit is the sender's cgroup."""
    forged = "Main process exited, code=killed, status=9/KILL"
    parsed = parse_lines([
        entry(1, forged, UNIT="postgresql.service", _PID="4242", _COMM="logger",
              _SYSTEMD_UNIT="session-3.scope"),
        entry(2, forged, UNIT="postgresql.service", _PID="4243", _COMM="logger"),
        entry(3, forged, UNIT="postgresql.service", _PID="1", _COMM="systemd",
              _SYSTEMD_UNIT="init.scope"),
        entry(4, "Started app.", USER_UNIT="app.service", _PID="900", _COMM="systemd",
              _SYSTEMD_UNIT="user@1000.service"),
        entry(5, "hello", USER_UNIT="postgresql.service", _PID="901", _COMM="bash",
              _SYSTEMD_UNIT="user@1000.service"),
    ], "web1")
    assert [e.unit for e, _ in parsed] == [
        "session-3.scope", None, "postgresql.service", "app.service", "user@1000.service"]


async def test_journal_replay_resumes_from_persisted_position(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "journal.json"
    f.write_text("\n".join(entry(i, f"line {i}") for i in range(25)) + "\n")
    c = JournaldCollector(store, StoreSink(store), replay=f, batch=10)
    await c.run()
    assert (await store.events.counts())["new"] == 25
    # A restart re-reads nothing; lines appended later are picked up.
    with f.open("a") as fh:
        fh.write(entry(99, "late line") + "\n")
    await JournaldCollector(store, StoreSink(store), replay=f, batch=10).run()
    assert (await store.events.counts())["new"] == 26


@pytest.mark.skipif(systemd_running(), reason="this test is for machines without systemd")
async def test_without_systemd_journald_and_units_say_so_once_and_stay_off(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await JournaldCollector(store, StoreSink(store)).run()  # returns: it stays off
    await FailedUnitsCollector(StoreSink(store), interval=0.01).run()
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("journald collector off: this machine does not run systemd") == 1
    assert msgs.count("failed-units collector off: this machine does not run systemd") == 1
    assert await store.events.counts() == {}


def test_failed_units_parse_and_report_new_failures_once() -> None:
    out = json.dumps([{"unit": "foo.service", "load": "loaded", "active": "failed",
                       "sub": "failed", "description": "Foo"}])
    units = parse_failed_units(out)
    c = FailedUnitsCollector(StoreSink(None), interval=1)  # type: ignore[arg-type]
    first = c.changes(units)
    assert [e.unit for e in first] == ["foo.service"] and first[0].source == "units"
    assert c.changes(units) == []  # still failed: no new event
    assert c.changes([]) == []
    assert len(c.changes(units)) == 1  # failed again: a new episode


def test_metrics_sample_is_typed_events() -> None:
    events = sample("h")
    metrics = {e.fields["metric"] for e in events}
    assert {"cpu_percent", "memory_used_percent", "load1_per_core"} <= metrics
    assert all(isinstance(e.fields["value"], float | int) for e in events)

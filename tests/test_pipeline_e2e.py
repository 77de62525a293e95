"""The pipeline end to end on real parts: real llama-server layers (the session stack's),
a real gateway and daemon as subprocesses, the SQLite store, real SSE over HTTP."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from layers.events import Event
from layers.store import Store, make_store
from tests.conftest import Stack
from tests.journal_fixture import write_journal
from tests.support import Proc, cli, free_port, run_cli, write_toml

pytestmark = pytest.mark.slow
KEY = {"Authorization": "Bearer test-key"}


def config(tmp: Path, ports: dict[str, int], gport: int, **sections: dict[str, Any]) -> Path:
    data: dict[str, Any] = {
        "state_dir": str(tmp / "state"),
        "layers": {n: {"port": p, "managed": False, "parallel": 2} for n, p in ports.items()},
        # The suite shares two cores among many model servers: let a layer take its time
        # rather than time out and repeat the whole generation.
        "gateway": {"port": gport, "api_keys": ["test-key"], "admin_key": "admin-key",
                    "timeouts": {"first_byte": 900.0, "total": 900.0}},
        "collectors": {"gateway_url": f"http://127.0.0.1:{gport}", "metrics": False,
                       "failed_units": False, "journald": False},
        "pipeline": {"poll_interval": 0.2, "retry_wait": 0.3, "retry_wait_max": 1.0},
        "memory": {"enabled": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return write_toml(tmp / "config.toml", data)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 300.0,
             procs: tuple[Proc, ...] = ()) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.popen is not None and p.popen.poll() is None, f"{p.argv} died:\n{p.log()[-3000:]}"
        result = check()
        if result:
            return result
        time.sleep(0.3)
    logs = "\n".join(p.log()[-3000:] for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def gateway(cfg: Path, tmp: Path, gport: int, name: str = "gateway") -> Proc:
    g = cli(cfg, "gateway", log_path=tmp / f"{name}.log").start()
    g.wait_http(f"http://127.0.0.1:{gport}/health")
    return g


def incidents(base: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{base}/v1/incidents", headers=KEY, timeout=10)
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def read_stream(base: str, *, count: int, last_id: str | None = None,
                params: dict[str, str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Read ``count`` verdict events from the SSE stream, then disconnect."""
    headers = {**KEY, **({"Last-Event-ID": last_id} if last_id else {})}
    out: list[tuple[int, dict[str, Any]]] = []
    with httpx.stream("GET", f"{base}/v1/events/stream", headers=headers, params=params,
                      timeout=httpx.Timeout(10, read=120)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev: dict[str, str] = {}
        for line in r.iter_lines():
            if line == "":
                if ev.get("event") == "verdict":
                    out.append((int(ev["id"]), json.loads(ev["data"])))
                    if len(out) >= count:
                        return out
                ev = {}
            elif not line.startswith(":"):
                k, _, v = line.partition(":")
                ev[k] = v.removeprefix(" ")
    return out


async def open_store(tmp: Path) -> Store:
    s = make_store("", tmp / "state")
    await s.open()
    return s


@pytest.fixture
def own_gateway(stack: Stack, tmp_path: Path) -> Iterator[tuple[Path, int]]:
    gport = free_port()
    yield config(tmp_path, stack.ports, gport, pipeline={"batch_size": 2}), gport


# -- the recorded journal through the whole pipeline ---------------------------------


@pytest.mark.timeout(1200)
async def test_recorded_journal_replay_becomes_three_reviewed_incidents(
    stack: Stack, tmp_path: Path
) -> None:
    journal = write_journal(tmp_path / "journal.json", benign=3000)
    gport = free_port()
    base = f"http://127.0.0.1:{gport}"
    cfg = config(tmp_path, stack.ports, gport,
                 collectors={"journal_replay": str(journal)},
                 pipeline={"escalate_severity": "warning", "batch_size": 4,
                           "review_max_tokens": 512, "meta_max_tokens": 768,
                           "poll_interval": 0.2, "retry_wait": 0.3, "retry_wait_max": 1.0},
                 memory={"enabled": True})
    gw = gateway(cfg, tmp_path, gport)
    daemon = cli(cfg, "daemon", log_path=tmp_path / "daemon.log").start()
    try:
        def done() -> list[dict[str, Any]] | None:
            incs = incidents(base)
            finished = [i for i in incs if i["stage"] == "idle"]
            return incs if len(incs) >= 3 and len(finished) == len(incs) else None

        incs = wait_for("three incidents reviewed and diagnosed", done, procs=(gw, daemon),
                        timeout=900)
        store = await open_store(tmp_path)
        try:
            counts = await store.events.counts()
        finally:
            await store.close()
        # Every line was stored; the benign flood was dropped by the prefilter.
        assert sum(counts.values()) == 3050
        assert counts["dropped"] >= 3000 and counts.get("classified", 0) <= 20
        assert counts.get("new", 0) == 0 and counts.get("candidate", 0) == 0

        by_key = {i["key"]: i for i in incs}
        assert set(by_key) == {"web1|rule:oom_kill", "web1|unit:demo-worker.service",
                               "web1|unit:sshd.service"}, by_key.keys()
        assert by_key["web1|rule:oom_kill"]["severity"] == "critical"
        reviewed_any = 0
        for inc in incs:
            detail = httpx.get(f"{base}/v1/incidents/{inc['id']}", headers=KEY).json()
            kinds = [t["kind"] for t in detail["timeline"]]
            assert "verdict" in kinds and "event" in kinds, kinds
            # Facts first (issue 16): the title is the rule and the opening line's words.
            assert detail["rule"] and detail["title"].startswith(
                f"{detail['category']}: {detail['rule']} — "), detail["title"]
            # The review stage ran: a review that passed validation, or its refusal.
            reviewed_any += "review" in kinds or any(
                t["kind"] == "unreviewed" and t["detail"].get("stage") == "review"
                for t in detail["timeline"])
            if detail["review"]:
                assert detail["assessment"]["by"] == "model"
            # Reviewed and (escalate_severity = warning) diagnosed — or, if the small model's
            # output was unusable, explicitly unreviewed: never silently healthy.
            if detail["status"] == "unreviewed":
                assert "unreviewed" in kinds
                continue
            assert detail["status"] == "escalated", detail["status"]
            assert detail["review"]["status"] in ("normal", "degraded", "critical")
            assert detail["decision"]["diagnosis"]
            assert kinds.index("review") < kinds.index("decision")
        # The tiny test model often pads constrained JSON with whitespace until max_tokens
        # (most of all the meta layer's larger decision), or writes degenerate text (a
        # copy of the prompt, one finding three times); such output is refused and the
        # incident marked unreviewed, as checked above. The review stage must have run.
        assert reviewed_any >= 1, [i["status"] for i in incs]

        # The stream delivers the verdicts, and resumes after a reconnect.
        allv = read_stream(base, count=int(sum(i["verdict_count"] for i in incs)),
                           params={"anomalies_only": "true"})
        ids = [i for i, _ in allv]
        assert ids == sorted(set(ids))
        first = read_stream(base, count=2, params={"anomalies_only": "true"})
        rest = read_stream(base, count=len(ids) - 2, last_id=str(first[-1][0]),
                           params={"anomalies_only": "true"})
        assert [i for i, _ in first + rest] == ids
        assert {v["incident_id"] for _, v in allv} == {i["id"] for i in incs}
        assert read_stream(base, count=1, params={"min_severity": "critical"})[0][1][
            "severity"] == "critical"

        # The CLI shows the same.
        out = run_cli("--config", str(cfg), "incidents", "list")
        assert out.returncode == 0 and all(i["id"] in out.stdout for i in incs), out.stderr
        show = run_cli("--config", str(cfg), "incidents", "show", incs[0]["id"])
        assert show.returncode == 0 and "timeline:" in show.stdout
        tail = run_cli("--config", str(cfg), "events", "tail", "--anomalies", "-n", "3",
                       "--json")
        assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 3
        missing = run_cli("--config", str(cfg), "incidents", "show", "inc_nope")
        assert missing.returncode == 1 and missing.stderr.startswith("ai-sysadmin: ")

        # The chat model now carries the open incidents in its context.
        r = httpx.post(f"{base}/v1/chat/completions", headers=KEY, timeout=120, json={
            "model": "ai-sysadmin", "max_tokens": 8,
            "messages": [{"role": "user", "content": "status?"}]})
        assert r.status_code == 200, r.text
    finally:
        daemon.stop()
        gw.stop()


# -- crash and outage ----------------------------------------------------------------


def candidates(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        Event(id=f"{tag}-{i}", host="h9", unit=f"svc{i}.service", priority=3,
              message=f"Failed to start Service number {tag} {i}.").model_dump(mode="json")
        for i in range(n)
    ]


# Four trigger batches of two: enough for the kill to land between batches, few enough
# for the tiny model on two cores.
N_KILL = 8


@pytest.mark.timeout(900)
async def test_gateway_sigkill_mid_pipeline_processes_every_event_once(
    own_gateway: tuple[Path, int], tmp_path: Path
) -> None:
    cfg, gport = own_gateway
    base = f"http://127.0.0.1:{gport}"
    batch = candidates(N_KILL, "kill")
    gw = gateway(cfg, tmp_path, gport)
    r = httpx.post(f"{base}/v1/events", headers=KEY, json={"events": batch}, timeout=30)
    assert r.status_code == 200 and r.json()["accepted"] == N_KILL
    store = await open_store(tmp_path)
    try:
        async def n_verdicts() -> int:
            return len(await store.verdicts.after(0, limit=1000))

        deadline = time.monotonic() + 600
        while await n_verdicts() == 0:
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.2)
        gw.stop(signal.SIGKILL)
        at_kill = await n_verdicts()
        assert 0 < at_kill < N_KILL  # killed mid-pipeline
        gw2 = gateway(cfg, tmp_path, gport, name="gateway2")
        try:
            # The client did not see an answer for a retry it sent: it posts again.
            again = httpx.post(f"{base}/v1/events", headers=KEY, json={"events": batch},
                               timeout=30)
            assert again.json()["accepted"] == 0 and again.json()["duplicates"] == N_KILL
            while await n_verdicts() < N_KILL:
                assert time.monotonic() < deadline, gw2.log()[-3000:]
                time.sleep(0.3)
            verdicts = await store.verdicts.after(0, limit=1000)
            assert sorted(v.event_id for v in verdicts) == sorted(e["id"] for e in batch)
            assert await store.events.counts() == {"classified": N_KILL}
            streamed = read_stream(base, count=N_KILL)
            assert sorted(v["event_id"] for _, v in streamed) == sorted(e["id"] for e in batch)
        finally:
            gw2.stop()
    finally:
        await store.close()


@pytest.mark.timeout(900)
async def test_trigger_layer_down_work_waits_then_completes(
    stack: Stack, tmp_path: Path, llama_server_bin: Path, model_path: Path
) -> None:
    tport, gport = free_port(), free_port()
    base = f"http://127.0.0.1:{gport}"

    def trigger_server(n: int) -> Proc:
        return Proc([str(llama_server_bin), "--model", str(model_path), "--host", "127.0.0.1",
                     "--port", str(tport), "--ctx-size", "2048", "--parallel", "2",
                     "--threads", "2"], log_path=tmp_path / f"trigger{n}.log").start()

    ports = {**stack.ports, "trigger": tport}
    cfg = config(tmp_path, ports, gport)
    layer = trigger_server(1)
    layer.wait_http(f"http://127.0.0.1:{tport}/health")
    gw = gateway(cfg, tmp_path, gport)
    store = await open_store(tmp_path)
    try:
        httpx.post(f"{base}/v1/events", headers=KEY, json={"events": candidates(1, "up")})
        wait_for("first verdict", lambda: incidents(base), procs=(gw,))
        layer.stop()
        r = httpx.post(f"{base}/v1/events", headers=KEY, json={"events": candidates(2, "down")})
        assert r.status_code == 200 and r.json()["accepted"] == 2
        wait_for("the stage to find the layer down",
                 lambda: "trigger stage: layer unavailable" in gw.log(), procs=(gw,))
        # The work waits in the store: accepted, not classified, not dropped.
        counts = await store.events.counts()
        assert counts.get("candidate", 0) + counts.get("new", 0) == 2, counts
        layer = trigger_server(2)
        layer.wait_http(f"http://127.0.0.1:{tport}/health")

        async def all_done() -> bool:
            return (await store.events.counts()) == {"classified": 3}

        deadline = time.monotonic() + 300
        while not await all_done():
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.3)
        ids = sorted(v.event_id for v in await store.verdicts.after(0))
        assert ids == ["down-0", "down-1", "up-0"]
    finally:
        await store.close()
        gw.stop()
        layer.stop()


# -- the intake API ------------------------------------------------------------------


def test_post_events_validates_limits_and_is_idempotent(stack: Stack) -> None:
    base = stack.base_url
    ev = {"id": "api-1", "host": "h", "message": "hello", "priority": 6}
    assert httpx.post(f"{base}/v1/events", json={"events": [ev]}).status_code == 401
    r = httpx.post(f"{base}/v1/events", headers=KEY, json={"events": [ev, ev]})
    assert r.status_code == 200 and r.json()["accepted"] == 1
    r = httpx.post(f"{base}/v1/events", headers=KEY, json={"events": [ev]})
    assert r.json() == {"object": "event.batch", "accepted": 0, "duplicates": 1,
                        "ids": ["api-1"]}
    bad = httpx.post(f"{base}/v1/events", headers=KEY,
                     json={"events": [{**ev, "id": "api-2", "priority": 9}]})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {
        "message", "type", "param", "code"}
    assert httpx.post(f"{base}/v1/events", headers=KEY, content=b"{nope").status_code == 400
    assert httpx.post(f"{base}/v1/events", headers=KEY, json={"events": []}).status_code == 400
    many = [{"id": f"m{i}", "message": "x"} for i in range(1001)]
    big = httpx.post(f"{base}/v1/events", headers=KEY, json={"events": many})
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_many_events"
    nf = httpx.get(f"{base}/v1/incidents/inc_missing", headers=KEY)
    assert nf.status_code == 404 and nf.json()["error"]["code"] == "incident_not_found"
    assert httpx.get(f"{base}/v1/events/stream", headers={**KEY, "Last-Event-ID": "x"}
                     ).status_code == 400

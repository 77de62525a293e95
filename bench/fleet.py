"""A fleet on loopback (issue 21, docs/fleet.md "Figures"): N agents, one or two gateway
processes, one PostgreSQL.

- **Agents.** N hosts (``fleet-000`` …), each with its own host key made with
  :class:`layers.store.hosts.Hosts` on the shared store. In this process each agent is
  two asyncio tasks: an event poster (batches of its own host's events to
  ``POST /v1/events`` with its host key, back to back; a raw keep-alive HTTP/1.1
  connection per gateway, as ``bench/load.py`` does, so the load generator's CPU is
  small) and, in the action part, :class:`layers.agent.Agent`'s real loop with stand-in
  programs of its own (``systemctl``/``journalctl`` shell scripts that log their argv to
  the host's own file) on its search path.
- **Gateways.** ``python -m gateway.cli --config X gateway`` processes (role ``server``)
  on one database of a throwaway PostgreSQL cluster (Debian's binaries, ``initdb`` in a
  temp dir, PostgreSQL's own defaults: fsync and synchronous commit on).
- **Layers.** Intake does not depend on a model: the gateways' layers point at a port
  nothing listens on, and the events are journal lines no prefilter rule keeps (what
  most of a journal is), so every accepted event is decided by the prefilter (dropped)
  and the trigger stage has nothing to wait for. Classification is measured apart, on a
  small sample of candidates, with the real trigger layer (``bench/stack.py``'s
  llama-server with the default model) behind two fresh gateways on a database of its
  own.

Parts, in order: intake through 1 gateway and through 2 (agents split between them),
rounds interleaved; a SIGKILL of one of two gateways under intake load (events lost,
and every accepted event decided); the action path with all N agents polling (the
CPU their idle long polls cost, an action for host A runs on A only and host B's key
gets 403 on it, approval → the agent's reported result over many actions spread over
the agents); a SIGKILL of one of two gateways while the real trigger layer classifies
(events lost, verdicts duplicated).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import stack
from bench.load import Connection
from bench.measure import percentile
from bench.pg import PgCluster
from bench.procs import Server, free_port
from bench.suites import Options, SuiteResult, say
from layers.config_toml import write_toml

API_KEY = stack.GATEWAY_KEY
ADMIN_KEY = stack.GATEWAY_ADMIN_KEY
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SERVER_HOST = "bench-server"
PG_USER = "postgres"


@dataclass
class Plan:
    agents: int = 50
    batch: int = 20  # events per POST /v1/events
    rounds: int = 3  # intake rounds, each through 1 and through 2 gateways
    seconds: float = 8.0  # per intake round
    warmup: float = 1.0  # not counted at the start of a round
    kill_seconds: float = 10.0  # load around the SIGKILL (killed halfway)
    idle_seconds: float = 5.0  # agents long-polling with nothing to do
    actions: int = 50  # approval → result samples
    sample: int = 24  # candidates classified by the real trigger layer (before the kill)
    sample_after: int = 6  # … and posted to the survivor after it
    sample_hosts: int = 6
    work_lease: float = 8.0  # store.work_lease: how soon a dead gateway's work is taken over
    # … in the classification part: longer than a trigger batch waits for a slot of the
    # shared 2-slot layer and runs (two gateways keep up to 4 batches in flight), so the
    # other gateway does not take over work still being classified.
    classify_lease: float = 30.0
    classify: bool = True  # the part with the real trigger layer


FULL = Plan()
QUICK = Plan(agents=20, rounds=1, seconds=4.0, kill_seconds=6.0, idle_seconds=3.0,
             actions=20, sample=12, sample_after=4, sample_hosts=4)


# -- stand-in programs -------------------------------------------------------------------

STANDIN = "#!/bin/sh\nprintf '%s\\n' \"${{0##*/}} $*\" >> {log}\nexit 0\n"


@dataclass
class StandIns:
    """``systemctl`` and ``journalctl`` that only log their argv (one line per call) to
    this host's own file: which host ran what."""

    bindir: Path
    log: Path

    @property
    def search_path(self) -> str:
        return f"{self.bindir}:/usr/bin:/bin"

    def calls(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []


def make_standins(root: Path) -> StandIns:
    progs = StandIns(root / "standin-bin", root / "standin-calls.log")
    progs.bindir.mkdir(parents=True, exist_ok=True)
    for name in ("systemctl", "journalctl"):
        path = progs.bindir / name
        path.write_text(STANDIN.format(log=shlex.quote(str(progs.log))))
        path.chmod(0o755)
    return progs


# -- gateways ----------------------------------------------------------------------------


def fleet_gateway(work: Path, tag: str, db_url: str, progs: StandIns, *, work_lease: float,
                  trigger_port: int | None = None) -> Server:
    """A fleet server's gateway on the shared database; without ``trigger_port`` every
    layer points at a port nothing listens on."""
    port = free_port()
    dead = free_port()
    layers: dict[str, Any] = {n: {"managed": False, "host": "127.0.0.1", "port": dead}
                              for n in ("trigger", "review", "meta")}
    if trigger_port is not None:
        layers["trigger"] = {"managed": False, "host": "127.0.0.1", "port": trigger_port,
                             "parallel": 2, "context_size": 4096}
    config = write_toml(work / f"{tag}.toml", {
        "state_dir": str(work / f"{tag}-state"),
        "gateway": {"host": "127.0.0.1", "port": port, "api_keys": [API_KEY],
                    "admin_key": ADMIN_KEY, "log_level": "warning"},
        "memory": {"enabled": False},
        "store": {"url": db_url, "work_lease": work_lease},
        "pipeline": {"batch_size": 4},
        # The server's rate limits count every host's runs together (the proposals
        # table, whatever the host): the defaults (10 restarts an hour) would refuse
        # most of the bench's approvals. Raised here; each agent keeps its own defaults.
        "actions": {"search_path": progs.search_path, "unit_check": "never",
                    "autonomy": "suggest", "max_runs_per_action_per_hour": 100_000,
                    "max_runs_per_unit_per_hour": 100_000},
        "fleet": {"role": "server", "host": SERVER_HOST},
        "layers": layers,
    })
    return Server(tag, [sys.executable, "-m", "gateway.cli", "--config", str(config),
                        "gateway"], port, "/health", work / f"{tag}.log", ready_timeout=90)


def _start(*servers: Server) -> None:
    for s in servers:
        say(f"starting {s.name} on port {s.port}")
        s.start()
    for s in servers:
        s.wait_ready()


def _sigkill(server: Server) -> None:
    assert server.popen is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.popen.pid, signal.SIGKILL)
    server.popen.wait(10)


def _cpu(server: Server) -> float:
    if server.popen is None or server.popen.poll() is not None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        return server.cpu_seconds()
    return 0.0


# -- the agents' event side ----------------------------------------------------------------

NOISE = (
    "pam_unix(sshd:session): session opened for user u{k}(uid={n}) by (uid=0)",
    "Started Session {n} of User u{k}.",
    "CRON[{n}]: (root) CMD (run-parts /etc/cron.hourly)",
    "10.0.{a}.{b} - - \"GET /api/v1/items/{n} HTTP/1.1\" 200 {k}",
    "Accepted publickey for deploy from 10.1.{a}.{b} port {n} ssh2",
    "Reloading configuration of app{a}.service (pid {n}).",
)


class HttpStatus(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


async def post_raw(conn: Connection, head: bytes, body: bytes) -> dict[str, Any]:
    """One POST on a keep-alive connection; the JSON answer of a 200, else HttpStatus."""
    reader, writer = await conn.ensure()
    writer.write(head + body)
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip().lower()
               for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    data = await reader.readexactly(int(headers.get("content-length", "0")))
    if headers.get("connection") == "close":
        conn.close()
    if status != 200:
        raise HttpStatus(status, data)
    answer: dict[str, Any] = json.loads(data)
    return answer


@dataclass
class Batch:
    began: float
    ended: float
    accepted: int
    duplicates: int
    retried: bool  # its first attempt got no answer (the gateway died): sent again


@dataclass
class Poster:
    """One agent's event side: its host's events, in batches, to its gateway — and, when
    that one does not answer, to the next one (the same batch: ids make it idempotent)."""

    host: str
    key: str
    batch: int
    seq: int = 0
    acked: list[str] = field(default_factory=list)  # ids of batches answered 200
    unanswered: list[list[str]] = field(default_factory=list)  # never answered by the end
    batches: list[Batch] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def events(self, tag: str) -> list[dict[str, Any]]:
        out = []
        for _ in range(self.batch):
            n = self.seq
            self.seq += 1
            msg = NOISE[n % len(NOISE)].format(k=n % 97, n=1000 + n, a=n % 250, b=n % 200)
            out.append({"id": f"{tag}-{self.host}-{n}", "host": self.host,
                        "source": "journald", "unit": "sshd.service" if n % 2 else None,
                        "priority": 6, "message": msg})
        return out

    async def run(self, tag: str, gateways: list[Server], stop_at: float) -> None:
        """Post back to back until ``stop_at``; ``gateways[0]`` first."""
        conns = {s.port: Connection("127.0.0.1", s.port) for s in gateways}
        current = 0
        try:
            while time.monotonic() < stop_at:
                events = self.events(tag)
                body = json.dumps({"events": events}, separators=(",", ":")).encode()
                ids = [e["id"] for e in events]
                began = time.monotonic()
                retried = False
                while True:
                    gw = gateways[current % len(gateways)]
                    head = (f"POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1:{gw.port}\r\n"
                            "content-type: application/json\r\n"
                            f"authorization: Bearer {self.key}\r\n"
                            f"content-length: {len(body)}\r\n\r\n").encode()
                    try:
                        answer = await asyncio.wait_for(post_raw(conns[gw.port], head, body),
                                                        60)
                    except (OSError, asyncio.IncompleteReadError, TimeoutError,
                            ValueError) as exc:
                        # No answer: it may or may not be stored. Send it again, to the
                        # next gateway (a real collector would keep it and retry).
                        conns[gw.port].close()
                        self.errors[type(exc).__name__] += 1
                        retried = True
                        current += 1
                        if time.monotonic() >= stop_at + 30:
                            self.unanswered.append(ids)
                            break
                        await asyncio.sleep(0.05)
                        continue
                    except HttpStatus as exc:
                        self.errors[f"HTTP {exc.status}"] += 1
                        await asyncio.sleep(0.2)
                        if time.monotonic() >= stop_at:
                            self.unanswered.append(ids)
                            break
                        continue
                    self.acked.extend(ids)
                    self.batches.append(Batch(began, time.monotonic(), int(answer["accepted"]),
                                              int(answer["duplicates"]), retried))
                    break
        finally:
            for c in conns.values():
                c.close()


@dataclass
class IntakeResult:
    events_per_s: float
    accepted: int
    batches: int
    batch_p50_ms: float
    batch_p99_ms: float
    errors: dict[str, int]
    seconds: float


def intake_figures(posters: list[Poster], starts: list[int], measure_from: float,
                   stop_at: float) -> IntakeResult:
    """The batches of this round (poster i's from ``starts[i]`` on) that began in the
    window (after the warm-up), each counted to its answer."""
    counted = [b for p, s in zip(posters, starts, strict=True) for b in p.batches[s:]
               if measure_from <= b.began < stop_at]
    last = max((b.ended for b in counted), default=stop_at)
    seconds = max(1e-9, last - measure_from)
    accepted = sum(b.accepted for b in counted)
    lat = [(b.ended - b.began) * 1000 for b in counted]
    errors: Counter[str] = Counter()
    for p in posters:
        errors.update(p.errors)
    return IntakeResult(accepted / seconds, accepted, len(counted), percentile(lat, 50),
                        percentile(lat, 99), dict(errors), seconds)


async def post_all(posters: list[Poster], tag: str, routes: list[list[Server]],
                   seconds: float) -> float:
    """Every poster posts for ``seconds``; poster i starts at ``routes[i % len(routes)]``.
    Returns when the load started (monotonic)."""
    t0 = time.monotonic()
    stop_at = t0 + seconds
    await asyncio.gather(*(p.run(tag, routes[i % len(routes)], stop_at)
                           for i, p in enumerate(posters)))
    return t0


# -- the store, seen from the bench ---------------------------------------------------------


async def open_bench_store(work: Path, db_url: str, tag: str) -> Any:
    from layers.config import Settings
    from layers.store import open_store

    return await open_store(Settings.model_validate({
        "state_dir": str(work / f"{tag}-bench-state"), "store": {"url": db_url}}))


async def states_of(store: Any, prefix: str) -> dict[str, str]:
    async with store.tx() as tx:
        rows = await tx.execute("SELECT id, state FROM events WHERE id LIKE ?", (prefix + "%",))
    return {r["id"]: r["state"] for r in rows}


async def wait_decided(store: Any, prefix: str, limit: float,
                       decided: tuple[str, ...] = ("dropped", "candidate", "classified")
                       ) -> tuple[bool, float]:
    """Until no event of ``prefix`` is left in a state not in ``decided``."""
    t0 = time.monotonic()
    marks = ",".join("?" * len(decided))
    while True:
        async with store.tx() as tx:
            rows = await tx.execute(
                f"SELECT COUNT(*) AS n FROM events WHERE id LIKE ? AND state NOT IN ({marks})",
                (prefix + "%", *decided))
        if int(rows[0]["n"]) == 0:
            return True, time.monotonic() - t0
        if time.monotonic() - t0 > limit:
            return False, time.monotonic() - t0
        await asyncio.sleep(0.25)


def owns(lease_owner: str | None, server: Server) -> bool:
    """Whether a lease is this gateway process's: its worker id is ``host:gateway:port``
    (stable across restarts), or, before that, ``host:pid:…``."""
    if not lease_owner:
        return False
    assert server.popen is not None
    return (lease_owner == f"{socket.gethostname()}:gateway:{server.port}"
            or f":{server.popen.pid}:" in lease_owner)


async def held_by(store: Any, server: Server, states: tuple[str, ...]) -> list[str]:
    """Events a gateway holds under a live lease."""
    marks = ",".join("?" * len(states))
    async with store.tx() as tx:
        rows = await tx.execute(
            f"SELECT id, lease_owner FROM events WHERE lease_until > ? AND state IN ({marks})",
            (time.time(), *states))
    return [r["id"] for r in rows if owns(r["lease_owner"], server)]


# -- the parts --------------------------------------------------------------------------------


@dataclass
class Fleet:
    """What the parts share: the cluster, the database, the hosts and their keys."""

    opts: Options
    plan: Plan
    pg: PgCluster
    db: str
    store: Any
    hosts: list[str]
    keys: dict[str, str]
    server_progs: StandIns
    out: SuiteResult

    @property
    def ex(self) -> dict[str, Any]:
        return self.out.extra


async def part_intake(f: Fleet, gw1: Server, gw2: Server) -> None:
    """Rounds through 1 gateway (the second one stopped) and through 2 (agents split),
    in alternating order; the pipeline drained before each round."""
    plan = f.plan
    posters = [Poster(h, f.keys[h], plan.batch) for h in f.hosts]
    for rep in range(plan.rounds):
        order = ("1gw", "2gw") if rep % 2 == 0 else ("2gw", "1gw")
        for mode in order:
            up = gw2.popen is not None and gw2.popen.poll() is None
            if mode == "1gw" and up:
                gw2.stop()
            if mode == "2gw" and not up:
                _start(gw2)
            gws = [gw1] if mode == "1gw" else [gw1, gw2]
            routes = [[gw1]] if mode == "1gw" else [[gw1, gw2], [gw2, gw1]]
            tag = f"in{rep}{mode}"
            starts = [len(p.batches) for p in posters]
            for p in posters:
                p.errors.clear()
            say(f"fleet intake round {rep + 1}/{plan.rounds}: {plan.agents} agents, batches "
                f"of {plan.batch}, {plan.seconds:.0f} s through {mode[0]} gateway(s)")
            cpu_gw0, cpu_pg0 = sum(_cpu(g) for g in gws), f.pg.cpu_seconds()
            cpu_me0 = _self_cpu()
            t0 = await post_all(posters, tag, routes, plan.seconds + plan.warmup)
            cpu_gw = sum(_cpu(g) for g in gws) - cpu_gw0
            cpu_pg, cpu_me = f.pg.cpu_seconds() - cpu_pg0, _self_cpu() - cpu_me0
            res = intake_figures(posters, starts, t0 + plan.warmup,
                                       t0 + plan.warmup + plan.seconds)
            backlog = await _count_new(f.store, tag)
            done, drain = await wait_decided(f.store, tag, 120)
            total = sum(len(p.batches) - s for p, s in zip(posters, starts, strict=True))
            per_ev = 1000.0 / max(1, total * plan.batch)  # CPU ms per event
            ex = f.ex
            ex.setdefault(f"intake.{mode}.events_per_s", []).append(res.events_per_s)
            ex.setdefault(f"intake.{mode}.batch_p50_ms", []).append(res.batch_p50_ms)
            ex.setdefault(f"intake.{mode}.batch_p99_ms", []).append(res.batch_p99_ms)
            ex.setdefault(f"intake.{mode}.cpu_ms_per_event.gateways", []).append(cpu_gw * per_ev)
            ex.setdefault(f"intake.{mode}.cpu_ms_per_event.postgres", []).append(cpu_pg * per_ev)
            ex.setdefault(f"intake.{mode}.cpu_ms_per_event.agents", []).append(cpu_me * per_ev)
            ex.setdefault(f"intake.{mode}.backlog_new", []).append(backlog)
            ex.setdefault(f"intake.{mode}.drain_s", []).append(drain)
            ex.setdefault(f"intake.{mode}.errors", []).append(sum(res.errors.values()))
            if not done:
                f.out.notes.append(f"Intake round {tag}: the prefilter had not decided every "
                                   "event 120 s after the load ended.")
            say(f"  {res.events_per_s:,.0f} events/s accepted ({res.batches} batches, p50 "
                f"{res.batch_p50_ms:.0f} ms, p99 {res.batch_p99_ms:.0f} ms, errors "
                f"{res.errors or 0}); CPU ms per event: gateways {cpu_gw * per_ev:.2f}, "
                f"PostgreSQL {cpu_pg * per_ev:.2f}, agents {cpu_me * per_ev:.2f}; "
                f"{backlog} not yet prefiltered at the end, drained in {drain:.1f} s")


def _self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


async def _count_new(store: Any, prefix: str) -> int:
    async with store.tx() as tx:
        rows = await tx.execute("SELECT COUNT(*) AS n FROM events WHERE id LIKE ? AND state ="
                                " 'new'", (prefix + "%",))
    return int(rows[0]["n"])


async def part_kill_intake(f: Fleet, gw1: Server, gw2: Server) -> None:
    """Both gateways take events; halfway, the second is SIGKILLed (after it is seen
    holding leased events); its agents send their unanswered batch again to the first.
    Lost: an event answered 200 that is not in the store. Decided: every accepted event
    leaves ``new`` (the prefilter's decision, taken over from the dead gateway's leases)."""
    plan = f.plan
    if gw2.popen is None or gw2.popen.poll() is not None:
        _start(gw2)
    assert gw2.popen is not None
    pid = gw2.popen.pid
    posters = [Poster(h, f.keys[h], plan.batch) for h in f.hosts]
    tag = "kill"
    say(f"fleet: SIGKILL of one of 2 gateways under load ({plan.agents} agents, "
        f"{plan.kill_seconds:.0f} s, killed halfway)")
    held: list[str] = []
    killed_at = 0.0

    async def killer() -> None:
        nonlocal held, killed_at
        await asyncio.sleep(plan.kill_seconds / 2)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            held = await held_by(f.store, gw2, ("new",))
            if held:
                break
            await asyncio.sleep(0.02)
        _sigkill(gw2)
        killed_at = time.monotonic()
        say(f"  SIGKILL gateway 2 (pid {pid}) holding {len(held)} leased events")

    kill_task = asyncio.create_task(killer())
    await post_all(posters, tag, [[gw1, gw2], [gw2, gw1]], plan.kill_seconds)
    await kill_task
    acked = {i for p in posters for i in p.acked}
    unanswered = [i for p in posters for ids in p.unanswered for i in ids]
    retried = [b for p in posters for b in p.batches if b.retried]
    done, decide_s = await wait_decided(f.store, tag, plan.work_lease * 4 + 60)
    states = await states_of(f.store, tag)
    lost = sorted(acked - states.keys())
    held_done = sum(1 for i in held if states.get(i, "new") != "new")
    ex = f.ex
    ex["kill.accepted"] = len(acked)
    ex["kill.lost"] = len(lost)
    ex["kill.lost_sample"] = lost[:5]
    ex["kill.stored"] = len(states)
    ex["kill.states"] = dict(Counter(states.values()))
    ex["kill.held_by_killed"] = len(held)
    ex["kill.held_then_decided"] = held_done
    ex["kill.retried_batches"] = len(retried)
    ex["kill.retried_duplicates"] = sum(b.duplicates for b in retried)
    ex["kill.unanswered_events"] = len(unanswered)
    ex["kill.all_decided"] = done
    ex["kill.decided_after_kill_s"] = (time.monotonic() - killed_at) if killed_at else None
    ex["kill.decide_wait_s"] = decide_s
    say(f"  {len(acked)} events answered 200, {len(lost)} of them lost; {len(retried)} "
        f"batches sent again to gateway 1 ({ex['kill.retried_duplicates']} of their events "
        f"were already stored by gateway 2); states {ex['kill.states']}; what gateway 2 "
        f"held: {held_done}/{len(held)} decided; all decided: {done}")


def _result_hook(times: dict[str, float]) -> Any:
    async def hook(response: httpx.Response) -> None:
        path = response.request.url.path
        if path.endswith("/result") and response.status_code < 400:
            times.setdefault(path.split("/")[-2], time.monotonic())

    return hook


async def make_proposals(f: Fleet, targets: list[tuple[str, str]]) -> list[str]:
    """One incident per (host, unit) — its event stored, kept and classified anomalous
    through the store's own path — and the restart the action stage would propose for
    it (``restart_unit``: medium risk, so it waits for an admin). Done before any
    gateway runs, so no pipeline races for these events."""
    from layers.actions import service
    from layers.config import Settings
    from layers.events import Event
    from layers.store import Prefiltered, VerdictInput

    settings = Settings.model_validate({
        "state_dir": str(f.opts.work / "fleet-proposer-state"), "store": {"url": f.db},
        "actions": {"search_path": f.server_progs.search_path, "unit_check": "never",
                    "autonomy": "suggest"},
        "fleet": {"role": "server", "host": SERVER_HOST}})
    store = f.store
    await store.add_events([Event(id=f"act-{h}-{u}", host=h, source="journald", unit=u,
                                  priority=3, message=f"{u}: Main process exited, code=exited,"
                                  " status=1/FAILURE") for h, u in targets])
    new = [e for e in await store.events_in_state("new", 100_000) if e.id.startswith("act-")]
    await store.mark_prefiltered([Prefiltered(e.seq, True, f"fp-{e.id}", "unit_failed")
                                  for e in new])
    cands = [e for e in await store.events_in_state("candidate", 100_000)
             if e.id.startswith("act-")]
    verdicts = await store.record_verdicts([VerdictInput(c, True, "critical", "service",
                                                         "unit failed") for c in cands])
    incident = {(v.host, v.unit): v.incident_id for v in verdicts}
    ids = []
    runs = service.ActionRuns()  # this process's, as a gateway's
    for h, u in targets:
        (p,) = await service.handle_proposals(
            incident[(h, u)], [{"action": "restart_unit", "params": {"unit": u},
                                "rationale": "bench: the unit failed"}], store, settings,
            runs=runs)
        if p.status != "pending" or p.host != h:
            raise RuntimeError(f"proposal for {h} {u} is {p.status} for {p.host}")
        ids.append(p.id)
    return ids


async def part_actions(f: Fleet, gws: list[Server], check_id: str,
                       timed: list[tuple[str, str, str]]) -> None:
    """All agents run :class:`layers.agent.Agent`'s loop (agent i on gateway i % 2)."""
    from layers.agent import Agent
    from layers.config import Settings

    plan = f.plan
    progs = {h: make_standins(f.opts.work / "agents" / h) for h in f.hosts}
    results: dict[str, float] = {}
    agents = []
    for i, h in enumerate(f.hosts):
        settings = Settings.model_validate({
            "state_dir": str(f.opts.work / "agents" / h / "state"),
            "actions": {"search_path": progs[h].search_path, "unit_check": "never"},
            "fleet": {"role": "agent", "host": h, "poll_seconds": 2.0}})
        client = httpx.AsyncClient(timeout=settings.fleet.poll_seconds + 30,
                                   event_hooks={"response": [_result_hook(results)]})
        agents.append(Agent(settings, gws[i % len(gws)].base, f.keys[h], client=client))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop)) for a in agents]
    ex = f.ex
    try:
        await asyncio.sleep(3.0)  # every agent is in its long poll
        say(f"fleet: {plan.agents} agents long-polling, nothing to do, {plan.idle_seconds:.0f} s")
        g0, p0, m0, t0 = sum(_cpu(g) for g in gws), f.pg.cpu_seconds(), _self_cpu(), time.monotonic()
        await asyncio.sleep(plan.idle_seconds)
        dt = time.monotonic() - t0
        ex["idle.cpu_pct.gateways"] = (sum(_cpu(g) for g in gws) - g0) / dt * 100
        ex["idle.cpu_pct.postgres"] = (f.pg.cpu_seconds() - p0) / dt * 100
        ex["idle.cpu_pct.agents"] = (_self_cpu() - m0) / dt * 100
        say(f"  CPU while idle: gateways {ex['idle.cpu_pct.gateways']:.0f} %, PostgreSQL "
            f"{ex['idle.cpu_pct.postgres']:.0f} %, agents {ex['idle.cpu_pct.agents']:.0f} % "
            "(of one core)")
        async with httpx.AsyncClient(timeout=60) as c:
            await _check_a_only(f, c, gws, check_id, progs, results)
            say(f"fleet: {len(timed)} approvals, one at a time, each until its agent reported")
            rng = random.Random(21)
            lat: list[float] = []
            missing = 0
            for k, (pid, _h, _u) in enumerate(timed):
                gw = gws[k % len(gws)]
                t = time.monotonic()
                r = await c.post(f"{gw.base}/v1/actions/{pid}/approve", headers=ADMIN,
                                 json={"wait": 0})
                if r.status_code != 200:
                    raise RuntimeError(f"approve {pid}: {r.status_code} {r.text[:300]}")
                deadline = t + 60
                while pid not in results and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
                if pid in results:
                    lat.append((results[pid] - t) * 1000)
                else:
                    missing += 1
                # A random point of the agents' claim polls (the gateway looks every 0.25 s).
                await asyncio.sleep(rng.uniform(0.0, 0.5))
            ex["approval_ms"] = lat
            ex["approval_p50_ms"] = percentile(lat, 50)
            ex["approval_p99_ms"] = percentile(lat, 99)
            ex["approval_max_ms"] = max(lat, default=float("nan"))
            ex["approval_missing"] = missing
            say(f"  approval → result p50 {ex['approval_p50_ms']:.0f} ms, p99 "
                f"{ex['approval_p99_ms']:.0f} ms, max {ex['approval_max_ms']:.0f} ms "
                f"({missing} without a result in 60 s)")
            await asyncio.sleep(0.5)
            statuses: Counter[str] = Counter()
            for pid, _h, _u in timed:
                statuses[(await c.get(f"{gws[0].base}/v1/actions/{pid}", headers=ADMIN)
                          ).json().get("status", "?")] += 1
            ex["actions.statuses"] = dict(statuses)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for a in agents:
            await a.aclose()
    # Where each action ran: exactly once, on its own host, on no other host or the server.
    calls = {h: p.calls() for h, p in progs.items()}
    server_calls = f.server_progs.calls()
    placed = 0
    for _pid, h, u in timed:
        mine = sum(1 for line in calls[h] if line.endswith(f" {u}"))
        elsewhere = sum(1 for o, lines in calls.items() if o != h
                        for line in lines if line.endswith(f" {u}"))
        elsewhere += sum(1 for line in server_calls if line.endswith(f" {u}"))
        placed += mine == 1 and elsewhere == 0
    ex["actions.once_on_own_host"] = placed
    ex["actions.count"] = len(timed)
    ex["actions.calls_total"] = sum(len(v) for v in calls.values()) + len(server_calls)
    say(f"  {placed}/{len(timed)} ran exactly once, on their own host only; statuses "
        f"{ex['actions.statuses']}")


async def _check_a_only(f: Fleet, c: httpx.AsyncClient, gws: list[Server], check_id: str,
                        progs: dict[str, StandIns], results: dict[str, float]) -> None:
    """Host A's action, approved with the admin key while every agent polls: it runs on
    A and nowhere else; host B's key gets 403 on it (read, and report a result)."""
    a, b = f.hosts[0], f.hosts[1]
    as_b = {"Authorization": f"Bearer {f.keys[b]}"}
    ex = f.ex
    r = await c.post(f"{gws[-1].base}/v1/actions/{check_id}/approve", headers=ADMIN,
                     json={"wait": 0})
    ex["ab.approve_status"] = r.status_code
    ex["ab.status_after_approve"] = r.json().get("status") if r.status_code == 200 else None
    deadline = time.monotonic() + 30
    while check_id not in results and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # any other agent that (wrongly) took it has reported too
    done = (await c.get(f"{gws[0].base}/v1/actions/{check_id}", headers=ADMIN)).json()
    unit = done.get("params", {}).get("unit", "bench-check.service")
    ran = {h: sum(1 for line in p.calls() if line.endswith(f" {unit}"))
           for h, p in progs.items()}
    on_server = sum(1 for line in f.server_progs.calls() if line.endswith(f" {unit}"))
    b_get = [(await c.get(f"{g.base}/v1/actions/{check_id}", headers=as_b)).status_code
             for g in gws]
    b_list = [check_id in {x.get("id") for x in
                           (await c.get(f"{g.base}/v1/actions", headers=as_b)).json()
                           .get("data", [])} for g in gws]
    b_result = (await c.post(f"{gws[0].base}/v1/agent/actions/{check_id}/result",
                             headers=as_b, json={"status": "succeeded"})).status_code
    ex["ab.status"] = done.get("status")
    ex["ab.host"] = done.get("host")
    ex["ab.runs_on_a"] = ran[a]
    ex["ab.runs_elsewhere"] = sum(n for h, n in ran.items() if h != a) + on_server
    ex["ab.b_get_status"] = b_get
    ex["ab.b_sees_in_list"] = any(b_list)
    ex["ab.b_result_status"] = b_result
    ex["ab.ok"] = (done.get("status") == "succeeded" and ran[a] == 1
                   and ex["ab.runs_elsewhere"] == 0)
    ex["ab.b_403"] = all(s == 403 for s in b_get) and b_result == 403 and not any(b_list)
    say(f"fleet: host A's action: {done.get('status')}, ran on A {ran[a]}×, elsewhere "
        f"{ex['ab.runs_elsewhere']}×; host B's key: GET {b_get}, result {b_result}, "
        f"in its list {any(b_list)}")


async def part_classify(f: Fleet) -> None:
    """Two fresh gateways with the real trigger layer on a database of their own; one is
    SIGKILLed while it holds leased work."""
    from bench.counting_relay import read_log
    from bench.detection import candidates, word
    from layers.store.hosts import Hosts

    plan = f.plan
    work = f.opts.work
    try:
        llama = stack.llama_server(work, parallel=2, ctx=4096)
    except Exception as exc:  # noqa: BLE001 - no engine here: the part is skipped, said so
        f.out.notes.append(f"Classification under a SIGKILL not measured: no llama-server "
                           f"({exc}).")
        return
    db = f.pg.create_db("fleet_classify")
    store = await open_bench_store(work, db, "classify")
    hosts = [f"cls-{i:02d}" for i in range(plan.sample_hosts)]
    keys = {h: await Hosts(store).add(h) for h in hosts}
    # A counting relay in front of the layer for each gateway: which events each one sent.
    relay_a, log_a = stack.counting_relay_server(work, llama.port, tag="relay-cls-a")
    relay_b, log_b = stack.counting_relay_server(work, llama.port, tag="relay-cls-b")
    gw_a = fleet_gateway(work, "fleet-cls-a", db, f.server_progs,
                         work_lease=plan.classify_lease, trigger_port=relay_a.port)
    gw_b = fleet_gateway(work, "fleet-cls-b", db, f.server_progs,
                         work_lease=plan.classify_lease, trigger_port=relay_b.port)
    servers = [llama, relay_a, relay_b, gw_a, gw_b]
    ex = f.ex
    ex["classify.work_lease"] = plan.classify_lease
    try:
        _start(llama)
        _start(relay_a, relay_b)
        _start(gw_a, gw_b)
        assert gw_b.popen is not None
        total = plan.sample + plan.sample_after
        events = [candidates(1, "cls", host=hosts[i % len(hosts)], start=20000 + i)[0]
                  for i in range(total)]
        accepted: list[str] = []
        say(f"fleet: {plan.sample} candidates of {len(hosts)} hosts to 2 gateways with the "
            "real trigger layer")
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=60) as c:
            for i, ev in enumerate(events[: plan.sample]):
                gw = gw_a if i % 2 == 0 else gw_b
                r = await c.post(f"{gw.base}/v1/events",
                                 headers={"Authorization": f"Bearer {keys[ev['host']]}"},
                                 json={"events": [ev]})
                if r.status_code == 200:
                    accepted.append(ev["id"])
            held: list[str] = []
            deadline = time.monotonic() + 120
            both = False
            need = min(4, max(1, plan.sample // 6))
            while time.monotonic() < deadline:
                async with store.tx() as tx:
                    rows = await tx.execute(
                        "SELECT lease_owner, id FROM events WHERE id LIKE ? AND lease_owner IS"
                        " NOT NULL AND lease_until > ? AND state NOT IN ('classified',"
                        " 'dropped')", ("bench-cls-%", time.time()))
                owners = {r["lease_owner"] for r in rows}
                held = [r["id"] for r in rows if owns(r["lease_owner"], gw_b)]
                both = len(owners) >= 2
                # A full trigger batch in B's hands (fewer for a small sample), or after
                # 30 s whatever B holds.
                if both and held and (len(held) >= need or time.monotonic() > deadline - 90):
                    break
                await asyncio.sleep(0.05)
            _sigkill(gw_b)
            killed_at, killed_wall = time.monotonic(), time.time()
            say(f"  SIGKILL gateway B holding {len(held)} undecided events (both gateways held "
                f"work: {both})")
            for ev in events[plan.sample:]:
                r = await c.post(f"{gw_a.base}/v1/events",
                                 headers={"Authorization": f"Bearer {keys[ev['host']]}"},
                                 json={"events": [ev]})
                if r.status_code == 200:
                    accepted.append(ev["id"])
        done, _ = await wait_decided(store, "bench-cls-", 600, ("classified", "dropped"))
        seconds = time.monotonic() - t0
        states = await states_of(store, "bench-cls-")
        async with store.tx() as tx:
            rows = await tx.execute("SELECT event_id, COUNT(*) AS n FROM verdicts WHERE"
                                    " event_id LIKE ? GROUP BY event_id", ("bench-cls-%",))
        counts = {r["event_id"]: int(r["n"]) for r in rows}
        lost = [i for i in accepted if i not in states]
        ex["classify.events"] = total
        ex["classify.accepted"] = len(accepted)
        ex["classify.lost"] = len(lost)
        ex["classify.states"] = dict(Counter(states.values()))
        ex["classify.undecided"] = sum(1 for s in states.values()
                                       if s not in ("classified", "dropped"))
        ex["classify.verdicts"] = sum(counts.values())
        ex["classify.events_with_verdict"] = len(counts)
        ex["classify.duplicated"] = sum(n - 1 for n in counts.values() if n > 1)
        ex["classify.held_by_killed"] = len(held)
        ex["classify.both_held"] = both
        ex["classify.held_then_decided"] = sum(1 for i in held
                                               if states.get(i) in ("classified", "dropped"))
        ex["classify.seconds"] = seconds
        ex["classify.after_kill_s"] = time.monotonic() - killed_at
        ex["classify.all_decided"] = done
        by_word = {word(20000 + i): ev["id"] for i, ev in enumerate(events)}
        sent = {name: _sent_events(read_log(log), by_word) for name, log in
                (("a", log_a), ("b", log_b))}
        ex.update(layer_work(sent, killed_wall, set(held)))
        ex["classify.load_average"] = os.getloadavg()[0]
        if not done:
            async with store.tx() as tx:
                rows = await tx.execute(
                    "SELECT id, state, lease_owner, lease_state, lease_until FROM events WHERE"
                    " id LIKE ? AND state NOT IN ('classified', 'dropped') ORDER BY seq",
                    ("bench-cls-%",))
            now = time.time()
            ex["classify.undecided_leases"] = [
                (r["id"], r["state"], r["lease_owner"], r["lease_state"],
                 None if r["lease_until"] is None else round(r["lease_until"] - now, 1))
                for r in rows][:20]
        say(f"  {len(accepted)} accepted, {len(lost)} lost, {ex['classify.verdicts']} verdicts "
            f"for {len(counts)} events ({ex['classify.duplicated']} duplicated), states "
            f"{ex['classify.states']}; what B held: {ex['classify.held_then_decided']}/"
            f"{len(held)} decided; {seconds:.0f} s in all")
    finally:
        for s in reversed(servers):
            s.stop()
        await store.close()
        if not ex.get("classify.all_decided", True):
            kept = _keep_logs(servers)
            f.out.notes.append(f"Classification: not every event was decided within 600 s; "
                               f"the layer's and gateways' logs are kept in {kept}.")


def _sent_events(records: list[dict[str, Any]],
                 by_word: dict[str, str]) -> list[tuple[float, str]]:
    """(when, event id) for every event in a trigger request a relay saw (each sample
    event has a word of its own in its message)."""
    out = []
    for r in records:
        if r.get("method") != "POST" or not str(r.get("path", "")).endswith("/chat/completions"):
            continue
        body = str(r.get("body", ""))
        out += [(float(r["t_sent"]), i) for w, i in by_word.items() if w in body]
    return out


def layer_work(sent: dict[str, list[tuple[float, str]]], killed: float,
               held: set[str]) -> dict[str, Any]:
    """What the trigger layer was asked, per gateway: events sent, and events whose
    classification was asked for twice — by both gateways while both were alive (work
    taken over too early), by the survivor after the kill (the killed one's work taken
    over), or twice by one gateway (its retries of verdicts the checks refused)."""
    a, b = sent["a"], sent["b"]
    ids_a, ids_b = {i for _, i in a}, {i for _, i in b}
    b_alive = {i for t, i in b if t < killed}
    a_before = {i for t, i in a if t < killed}
    a_after = {i for t, i in a if t >= killed}
    per_gw = {name: sum(1 for n in Counter(i for _, i in v).values() if n > 1)
              for name, v in sent.items()}
    return {
        "classify.layer_requests": {"a": len({t for t, _ in a}), "b": len({t for t, _ in b})},
        "classify.event_sends": len(a) + len(b),
        "classify.distinct_events_sent": len(ids_a | ids_b),
        "classify.sent_by_both_while_alive": len(a_before & b_alive),
        "classify.taken_over_and_resent": len(a_after & b_alive),
        "classify.taken_over_and_resent_held": len(a_after & b_alive & held),
        "classify.resent_by_one_gateway": per_gw,
    }


def _keep_logs(servers: list[Server]) -> Path:
    """Copy the servers' logs out of the suite's temporary directory (it is removed)."""
    dest = Path(tempfile.mkdtemp(prefix="ai-sysadmin-bench-fleet-logs-"))
    for s in servers:
        with contextlib.suppress(OSError):
            shutil.copy(s.log_path, dest / s.log_path.name)
    say(f"  logs kept in {dest}")
    return dest


async def _run(opts: Options, plan: Plan, out: SuiteResult) -> None:
    from layers.store.hosts import Hosts

    pg = PgCluster()
    say(f"fleet: PostgreSQL {pg.version()} cluster on port {pg.port}")
    pg.start()
    servers: list[Server] = []
    store = None
    try:
        db = pg.create_db("fleet")
        store = await open_bench_store(opts.work, db, "fleet")
        hosts = [f"fleet-{i:03d}" for i in range(plan.agents)]
        hk = Hosts(store)
        keys = {h: await hk.add(h) for h in hosts}
        server_progs = make_standins(opts.work / "server")
        f = Fleet(opts, plan, pg, db, store, hosts, keys, server_progs, out)
        out.extra.update({"agents": plan.agents, "batch": plan.batch, "rounds": plan.rounds,
                          "seconds": plan.seconds, "postgres": pg.version(),
                          "work_lease": plan.work_lease})
        # Host A's action for the A-only check, then one per timed approval, spread over
        # the agents (action k for agent k mod N).
        targets = [(hosts[0], "bench-check.service")]
        targets += [(hosts[k % len(hosts)], f"bench-{k:03d}.service") for k in range(plan.actions)]
        say(f"fleet: {len(hosts)} host keys, {len(targets)} pending actions")
        ids = await make_proposals(f, targets)
        timed = [(pid, h, u) for pid, (h, u) in zip(ids[1:], targets[1:], strict=True)]
        gw1 = fleet_gateway(opts.work, "fleet-gw1", db, server_progs, work_lease=plan.work_lease)
        gw2 = fleet_gateway(opts.work, "fleet-gw2", db, server_progs, work_lease=plan.work_lease)
        servers = [gw1, gw2]
        _start(gw1)
        await part_intake(f, gw1, gw2)
        await part_kill_intake(f, gw1, gw2)
        _start(gw2)  # a fresh second gateway for the agents' part
        await part_actions(f, [gw1, gw2], ids[0], timed)
        for s in servers:
            s.stop()
        if plan.classify:
            await part_classify(f)
    finally:
        for s in reversed(servers):
            s.stop()
        if store is not None:
            await store.close()
        pg.stop()


def suite_fleet(opts: Options) -> SuiteResult:
    out = SuiteResult()
    plan = QUICK if opts.quick else FULL
    asyncio.run(_run(opts, plan, out))
    out.notes.append(
        f"Fleet: {plan.agents} agents in the bench's process (each an event poster on raw "
        "keep-alive HTTP/1.1 and, for actions, `layers.agent.Agent` with shell stand-ins of "
        "systemctl), gateway processes with role `server` on one PostgreSQL (its defaults: "
        "fsync on), all on the same cores. Intake: the layers point at a port nothing "
        "listens on and the events are lines no prefilter rule keeps, so intake does not "
        "wait for a model; verdicts are counted in a separate sample with the real trigger "
        "layer (default model) and a SIGKILL of one of its two gateways.")
    return out

"""Helpers of the reliability and security suite: gateways of our own (which tests may
kill, starve or reconfigure), leak counters read from outside the process, Prometheus
text parsing, and event batches."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.fake_upstream import FakeUpstream, Fault
from tests.support import Proc, cli, free_port, gateway_config, write_toml

KEY = "test-key"
ADMIN = "admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
LAYERS = ("trigger", "review", "meta")


@dataclass
class Gateway:
    """An ``ai-sysadmin gateway`` subprocess with its config and log."""

    config: Path
    port: int
    log_path: Path
    proc: Proc | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> Gateway:
        self.proc = cli(self.config, "gateway", log_path=self.log_path, env=self.env).start()
        self.proc.wait_http(f"{self.url}/health", timeout=timeout)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process."""
        assert self.proc is not None and self.proc.popen is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(10)
        self.proc.stop()  # closes the log handle

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", headers=AUTH, timeout=10).text


GatewayFactory = Callable[..., Gateway]


def gateway_data(tmp: Path, layer_ports: dict[str, int], port: int,
                 layers: dict[str, dict[str, Any]] | None = None,
                 **sections: dict[str, Any]) -> dict[str, Any]:
    """A gateway config (layers unmanaged) with extra sections merged in."""
    data = gateway_config(tmp, layer_ports, port)
    for name, extra in (layers or {}).items():
        data["layers"][name].update(extra)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways of our own; all are stopped at the end of the test."""
    started: list[Gateway] = []

    def start(layer_ports: dict[str, int] | int, *, layers: dict[str, dict[str, Any]] | None = None,
              env: dict[str, str] | None = None, launch: bool = True,
              **sections: dict[str, Any]) -> Gateway:
        ports = layer_ports if isinstance(layer_ports, dict) else dict.fromkeys(LAYERS, layer_ports)
        port = free_port()
        data = gateway_data(tmp_path, ports, port, layers, **sections)
        cfg = write_toml(tmp_path / f"gw{port}.toml", data)
        gw = Gateway(cfg, port, tmp_path / f"gw{port}.log", env=env or {})
        started.append(gw)
        return gw.start() if launch else gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeUpstream]]:
    started: list[FakeUpstream] = []

    def make(fault: Fault, **kw: Any) -> FakeUpstream:
        f = FakeUpstream(fault, free_port(), **kw).start()
        started.append(f)
        return f

    yield make
    for f in started:
        f.stop()


# -- counting from outside the process ----------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def connections_to(pid: int, port: int) -> int:
    """TCP connections the process holds to ``port`` (any state but closed/time-wait)."""
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port
               and c.status not in (psutil.CONN_TIME_WAIT, psutil.CONN_CLOSE))


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample, or None when absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# -- events ----------------------------------------------------------------------------------

NOISE = "session opened for user alice by (uid=0)"
ANOMALY = "Main process exited, code=exited, status=1/FAILURE"


def events(n: int, *, prefix: str = "", anomaly_every: int = 0, host: str = "rel") -> list[dict[str, Any]]:
    """``n`` events with fresh ids; every ``anomaly_every``-th matches a prefilter rule
    (a unit failure) so the trigger layer classifies it, the rest are dropped as noise."""
    tag = prefix or uuid.uuid4().hex[:8]
    out = []
    for i in range(n):
        anomalous = anomaly_every and i % anomaly_every == 0
        out.append({
            "id": f"{tag}-{i}", "host": host, "source": "remote",
            "unit": f"svc{i % 7}.service" if anomalous else "sshd.service",
            "priority": 3 if anomalous else 6,
            "message": ANOMALY if anomalous else NOISE,
        })
    return out


# -- load that survives restarts ----------------------------------------------------------


class EventLoad:
    """Threads posting event batches as a careful client does: a batch is retried, same
    ids, until it is acknowledged with 2xx (the server's idempotency makes retries safe).
    ``acked`` holds every id the server acknowledged; ``statuses`` counts every answer
    (``conn`` for refused or broken connections)."""

    def __init__(self, url: str, *, threads: int = 2, batch: int = 20, anomaly_every: int = 10,
                 pause: float = 0.02) -> None:
        self.url = url
        self.n_threads = threads
        self.batch = batch
        self.anomaly_every = anomaly_every
        self.pause = pause
        self.acked: set[str] = set()
        self.statuses: Counter[str] = Counter()
        self.bodies_500: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> EventLoad:
        for i in range(self.n_threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def _run(self, worker: int) -> None:
        n = 0
        with httpx.Client(timeout=10, headers=AUTH) as client:
            while not self._stop.is_set():
                batch = events(self.batch, prefix=f"w{worker}-{n}-{uuid.uuid4().hex[:6]}",
                               anomaly_every=self.anomaly_every)
                n += 1
                while not self._stop.is_set():
                    try:
                        r = client.post(f"{self.url}/v1/events", json={"events": batch})
                    except httpx.TransportError:
                        self._count("conn")
                        time.sleep(0.1)
                        continue
                    self._count(str(r.status_code))
                    if r.status_code == 200:
                        with self._lock:
                            self.acked.update(e["id"] for e in batch)
                        break
                    if r.status_code >= 500 and r.status_code != 503:
                        self.bodies_500.append(r.text[:500])
                    time.sleep(0.1)
                time.sleep(self.pause)

    def _count(self, key: str) -> None:
        with self._lock:
            self.statuses[key] += 1


class VerdictReader(threading.Thread):
    """An SSE consumer of /v1/events/stream that reconnects with ``Last-Event-ID`` after
    every break, as EventSource clients do. ``ids`` is every event id it received, in
    order; ``seen`` the verdicts' event ids."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.ids: list[int] = []
        self.seen: list[str] = []
        self.reconnects = 0
        self.garbage: list[str] = []
        self._stop_flag = threading.Event()

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(15)

    def run(self) -> None:
        while not self._stop_flag.is_set():
            headers = dict(AUTH)
            if self.ids:
                headers["Last-Event-ID"] = str(self.ids[-1])
            try:
                with httpx.stream("GET", f"{self.url}/v1/events/stream", headers=headers,
                                  timeout=httpx.Timeout(5.0, read=10.0)) as r:
                    if r.status_code != 200:
                        self.garbage.append(f"status {r.status_code}")
                        time.sleep(0.2)
                        continue
                    for line in r.iter_lines():
                        if self._stop_flag.is_set():
                            return
                        if line.startswith("id:"):
                            self.ids.append(int(line[3:].strip()))
                        elif line.startswith("data:") and '"event_id"' in line:
                            self.seen.append(json.loads(line[5:])["event_id"])
            except httpx.HTTPError:
                pass
            self.reconnects += 1
            time.sleep(0.2)


def store_rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the gateway's SQLite store from outside (WAL: readers never block it)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()

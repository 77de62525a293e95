"""Helpers of the reliability and security suite: gateways of our own (which tests may
kill, starve or reconfigure), leak counters read from outside the process, Prometheus
text parsing, and event batches."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
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

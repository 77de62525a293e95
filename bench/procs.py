"""Server processes under test: start on a free loopback port, wait for readiness, sample
RSS and CPU of the whole process tree, stop by pid (never by name)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """One server process (its own session, so its children stop with it)."""

    name: str
    argv: list[str]
    port: int
    ready_path: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 240.0
    popen: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env}, cwd=REPO, start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, headers: dict[str, str] | None = None) -> None:
        assert self.popen is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.popen.returncode}: {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.base + self.ready_path, headers=headers, timeout=2)
                if r.status_code == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {self.ready_timeout}s: {self.tail()}")

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def process(self) -> psutil.Process:
        assert self.popen is not None
        return psutil.Process(self.popen.pid)

    def tree(self) -> list[psutil.Process]:
        p = self.process()
        return [p, *p.children(recursive=True)]

    def rss(self) -> int:
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


class RssSampler:
    """Peak RSS of a server while a load runs (sampled every 50 ms in a thread)."""

    def __init__(self, server: Server, interval: float = 0.05) -> None:
        self.server, self.interval = server, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error, AssertionError):
                self.peak = max(self.peak, self.server.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


"""Notification figures: latency from an incident to its delivery, and outbox throughput.

A real SQLite store (WAL, ``synchronous=FULL`` as shipped), the gateway's delivery worker
(``layers.notify.worker``) with apprise, and a JSON webhook receiver in a process of its
own (stdlib HTTP; it records when each notification arrived, by its ``ref``).

- **Incident → delivery, same process**: incidents opened one at a time through the
  store's own path (events → prefilter decision → verdicts), as the trigger stage in the
  gateway opens them; the worker is woken by the store. Latency = arrival at the receiver
  minus the notification's ``created_at`` (written in the incident's transaction).
- **Incident → delivery, other process**: the same through a second store object on the
  same file, as the daemon writes (escalations, resolutions, approvals, action results):
  the worker finds them by polling (``notify.poll_interval``, 1 s by default).
- **Outbox throughput**: a backlog of notifications (the worker stopped, as after a
  receiver outage), then the time until the receiver has all of them: one channel
  (deliveries in order, one at a time) and four channels (one delivery slot each).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench.measure import percentile
from bench.suites import Options, SuiteResult, say

REF_PREFIX = "ref "


class Receiver:
    """The webhook receiver subprocess; ``arrivals`` maps a notification id to the time
    (``time.time()``) it arrived, first arrival only, and counts every request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.arrivals: dict[str, float] = {}
        self.requests = 0
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def start(self) -> Receiver:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.notify", "--receive", str(self.port)],
            stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline()
        if first.strip() != "ready":
            raise RuntimeError(f"notification receiver did not start: {first!r}")
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            ref, _, at = line.strip().rpartition(" ")
            with self._lock:
                self.requests += 1
                self.arrivals.setdefault(ref, float(at))

    def got(self, refs: set[str]) -> bool:
        with self._lock:
            return refs <= self.arrivals.keys()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)


def _serve(port: int) -> None:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            at = time.time()
            message = str(json.loads(body or b"{}").get("message", ""))
            ref = message.rsplit(REF_PREFIX, 1)[-1].strip() if REF_PREFIX in message else "?"
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            with lock:  # one whole line at a time from the server's threads
                sys.stdout.write(f"{ref} {at:.6f}\n")
                sys.stdout.flush()

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


async def _wait(receiver: Receiver, refs: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not receiver.got(refs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(refs - receiver.arrivals.keys())} notifications "
                               f"not delivered within {timeout:.0f} s")
        await asyncio.sleep(0.002)


async def _latencies(store: Any, writer: Any, receiver: Receiver, n: int,
                     tag: str) -> list[float]:
    from layers.events import Event
    from layers.store import Prefiltered, VerdictInput

    out: list[float] = []
    rng = random.Random(n)
    for i in range(n):
        ev = Event(id=f"{tag}-{i}", host="bench", source="journald", unit=f"{tag}{i}.service",
                   priority=3, message=f"{tag}{i}.service: Main process exited, status=1/FAILURE")
        await writer.events.add([ev])
        [stored] = [e for e in await writer.events.in_state("new", 50) if e.id == ev.id]
        await writer.events.mark_prefiltered([Prefiltered(stored.seq, True, f"fp-{ev.id}", "unit_failed")])
        [cand] = [e for e in await writer.events.in_state("candidate", 50) if e.id == ev.id]
        [verdict] = await writer.verdicts.record([VerdictInput(cand, True, "critical", "service",
                                                               "failed", rule_category="service")])
        ref = f"incident.opened:{verdict.incident_id}"
        await _wait(receiver, {ref}, 30)
        async with store.tx() as tx:
            created = (await tx.execute("SELECT created_at FROM notifications WHERE id = ?",
                                        (ref,)))[0]["created_at"]
        out.append((receiver.arrivals[ref] - created) * 1000.0)
        # At a random point of the worker's poll interval (it just delivered, so it has
        # just gone back to sleep): the wait is spread over the whole interval.
        await asyncio.sleep(rng.uniform(0.0, 1.0))
    return out


async def _throughput(opts: Options, receiver: Receiver, n: int, channels: int) -> float:
    from layers.config import Settings
    from layers.notify.channels import load_channels
    from layers.notify.worker import NotifyWorker
    from layers.store import make_store

    state = opts.work / f"notify-tp-{channels}"
    settings = Settings(state_dir=state, notify={  # type: ignore[arg-type]
        "channels": [{"name": f"c{i}", "url": f"json://127.0.0.1:{receiver.port}/c{i}"}
                     for i in range(channels)],
        "min_severity": "info", "max_per_hour": 0, "concurrency": channels,
    })
    store = make_store("", state)
    await store.open()
    try:
        # The backlog, written as the outbox is (one notification per fact).
        async with store.tx() as tx:
            for i in range(n):
                await store.outbox.put(tx, "incident.opened", f"inc_tp{channels}_{i}", "critical",
                                       {"id": f"inc_tp{channels}_{i}", "title": f"bench {i}",
                                        "host": "bench"}, time.time(), key=f"tp{channels}:{i}")
        chans, _ = load_channels(settings.notify)
        worker = NotifyWorker(settings, store, chans)
        refs = {f"tp{channels}:{i}" for i in range(n)}
        started = time.monotonic()
        task = asyncio.create_task(worker.run())
        try:
            deadline = started + 600
            while True:
                async with store.tx() as tx:
                    left = (await tx.execute(
                        "SELECT COUNT(*) AS n FROM notification_deliveries WHERE state <> "
                        "'delivered'"))[0]["n"]
                    routed = (await tx.execute(
                        "SELECT COUNT(*) AS n FROM notifications WHERE routed_at IS NULL"))[0]["n"]
                if not left and not routed and receiver.got(refs):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("outbox not drained within 600 s")
                await asyncio.sleep(0.02)
            elapsed = time.monotonic() - started
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            worker.close()
    finally:
        await store.close()
    return n * channels / elapsed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _measure(opts: Options, out: SuiteResult, n_latency: int, n_backlog: int) -> None:
    from layers.config import Settings
    from layers.notify.channels import load_channels
    from layers.notify.worker import NotifyWorker
    from layers.store import make_store

    receiver = Receiver(_free_port()).start()
    try:
        state = opts.work / "notify-latency"
        settings = Settings(state_dir=state, notify={  # type: ignore[arg-type]
            "channels": [{"name": "hook", "url": f"json://127.0.0.1:{receiver.port}/hook"}],
            "max_per_hour": 0})
        store = make_store("", state)
        await store.open()
        other = make_store("", state)  # the daemon's own store object on the same file
        await other.open()
        chans, _ = load_channels(settings.notify)
        worker = NotifyWorker(settings, store, chans)
        store.wakeups.subscribe("outbox", worker.wake)
        task = asyncio.create_task(worker.run())
        try:
            await _latencies(store, store, receiver, 1, "warmup")  # apprise's first import
            say(f"notify: {n_latency} incidents opened in the worker's process")
            same = await _latencies(store, store, receiver, n_latency, "same")
            say(f"  incident → delivery p50 {percentile(same, 50):.1f} ms, "
                f"p99 {percentile(same, 99):.1f} ms")
            say(f"notify: {n_latency} incidents opened by another store (the daemon's)")
            cross = await _latencies(store, other, receiver, n_latency, "other")
            say(f"  incident → delivery p50 {percentile(cross, 50):.0f} ms, "
                f"p99 {percentile(cross, 99):.0f} ms (poll interval "
                f"{settings.notify.poll_interval:.1f} s)")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            worker.close()
            await other.close()
            await store.close()
        out.extra["latency_same_ms"] = same
        out.extra["latency_other_ms"] = cross
        for name, values in (("same", same), ("other", cross)):
            out.extra[f"latency_{name}_p50_ms"] = percentile(values, 50)
            out.extra[f"latency_{name}_p99_ms"] = percentile(values, 99)
        for channels in (1, 4):
            say(f"notify: outbox backlog of {n_backlog} notifications, {channels} channel(s)")
            rate = await _throughput(opts, receiver, n_backlog, channels)
            say(f"  {rate:.0f} deliveries/s")
            out.extra.setdefault(f"throughput_{channels}ch_per_s", []).append(rate)
        out.extra["receiver_requests"] = receiver.requests
    finally:
        receiver.stop()


def suite_notify(opts: Options) -> SuiteResult:
    out = SuiteResult()
    n_latency, n_backlog = (40, 300) if opts.quick else (200, 2000)
    asyncio.run(_measure(opts, out, n_latency, n_backlog))
    out.notes.append(
        "Notifications: incident → delivery at a local JSON webhook (apprise `json://`), "
        "same-process (the store wakes the worker) and written by another store on the same "
        "SQLite file (found by polling, `notify.poll_interval` 1 s); throughput = deliveries/s "
        "emptying a backlog (one delivery at a time per channel).")
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--receive":
        _serve(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench.notify --receive PORT")


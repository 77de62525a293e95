"""Soak: mixed load against a running gateway for a fixed time, and what it leaves behind.

Chat (streamed and not), event ingestion and SSE consumers run side by side; the result
counts every answer by status, the latency percentiles, and the gateway's own leak gauges
(``process_open_fds``, ``process_resident_memory_bytes``, ``ai_sysadmin_asyncio_tasks``
from ``/metrics``) before, during and after. The CI suite runs it for about a minute
(tests/test_reliability_soak.py); run it longer by hand::

    python -m bench.soak --url http://127.0.0.1:8083 --key KEY --seconds 900

Loopback only, bounded in time; the intended refusals are 429 (saturated) and 503.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

INTENDED = {"429", "503"}


def gauge(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


@dataclass
class Sample:
    t: float
    fds: float
    rss: float
    tasks: float


@dataclass
class SoakResult:
    seconds: float
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    stream_errors: int = 0
    events_acked: int = 0
    verdicts_streamed: int = 0
    samples: list[Sample] = field(default_factory=list)

    def unintended_5xx(self) -> dict[str, int]:
        return {k: v for k, v in self.statuses.items()
                if k.split(":")[-1].startswith("5") and k.split(":")[-1] not in INTENDED}

    def p(self, kind: str, q: float) -> float | None:
        xs = sorted(self.latencies.get(kind, []))
        if not xs:
            return None
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self) -> dict[str, Any]:
        first, last = (self.samples[0], self.samples[-1]) if self.samples else (None, None)
        return {
            "seconds": round(self.seconds, 1),
            "requests": sum(self.statuses.values()),
            "statuses": dict(sorted(self.statuses.items())),
            "unintended_5xx": self.unintended_5xx(),
            "stream_errors": self.stream_errors,
            "events_acked": self.events_acked,
            "verdicts_streamed": self.verdicts_streamed,
            "p50_s": {k: self.p(k, 0.5) for k in sorted(self.latencies)},
            "p99_s": {k: self.p(k, 0.99) for k in sorted(self.latencies)},
            "mean_s": {k: round(statistics.fmean(v), 4) for k, v in self.latencies.items() if v},
            "fds": [first.fds, last.fds] if first and last else None,
            "rss_mb": [round(first.rss / 2**20, 1), round(last.rss / 2**20, 1)]
            if first and last else None,
            "tasks": [first.tasks, last.tasks] if first and last else None,
        }


class Soak:
    def __init__(self, url: str, key: str, *, seconds: float, chat_workers: int = 2,
                 stream_workers: int = 1, event_workers: int = 1, sse_readers: int = 2,
                 model: str = "meta", max_tokens: int = 8, event_batch: int = 20) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"}
        self.seconds = seconds
        self.counts = (chat_workers, stream_workers, event_workers, sse_readers)
        self.model = model
        self.max_tokens = max_tokens
        self.event_batch = event_batch
        self.result = SoakResult(seconds)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- bookkeeping --

    def _record(self, kind: str, status: int | str, latency: float | None = None) -> None:
        with self._lock:
            self.result.statuses[f"{kind}:{status}"] += 1
            if latency is not None and status == 200:
                self.result.latencies.setdefault(kind, []).append(latency)

    def sample(self) -> Sample | None:
        try:
            text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        except httpx.HTTPError:
            return None
        values = [gauge(text, n) for n in ("process_open_fds", "process_resident_memory_bytes",
                                           "ai_sysadmin_asyncio_tasks")]
        if any(v is None for v in values):
            return None
        s = Sample(time.monotonic(), *[float(v or 0) for v in values])
        self.result.samples.append(s)
        return s

    # -- workers --

    def _chat(self, stream: bool) -> None:
        kind = "chat_stream" if stream else "chat"
        body = {"model": self.model, "max_tokens": self.max_tokens, "stream": stream,
                "messages": [{"role": "user", "content": "Name one Linux command."}]}
        with httpx.Client(headers=self.headers, timeout=120) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    if stream:
                        with c.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                            text = r.read().decode(errors="replace")
                        if r.status_code == 200 and ('data: {"error"' in text
                                                     or "data: [DONE]" not in text):
                            with self._lock:
                                self.result.stream_errors += 1
                    else:
                        r = c.post(f"{self.url}/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    self._record(kind, type(exc).__name__)
                    continue
                self._record(kind, r.status_code, time.perf_counter() - t0)
                if r.status_code in (429, 503):
                    time.sleep(float(r.headers.get("retry-after", "1")))

    def _events(self) -> None:
        with httpx.Client(headers=self.headers, timeout=30) as c:
            while not self._stop.is_set():
                tag = uuid.uuid4().hex[:10]
                batch = [{"id": f"soak-{tag}-{i}", "host": "soak", "unit": "sshd.service",
                          "message": f"session opened for user u{i} by (uid=0)"}
                         for i in range(self.event_batch)]
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{self.url}/v1/events", json={"events": batch})
                except httpx.HTTPError as exc:
                    self._record("events", type(exc).__name__)
                    continue
                self._record("events", r.status_code, time.perf_counter() - t0)
                if r.status_code == 200:
                    with self._lock:
                        self.result.events_acked += len(batch)
                time.sleep(0.05)

    def _sse(self) -> None:
        last = ""
        while not self._stop.is_set():
            headers = dict(self.headers)
            if last:
                headers["Last-Event-ID"] = last
            try:
                with httpx.stream("GET", f"{self.url}/v1/events/stream", headers=headers,
                                  timeout=httpx.Timeout(10.0, read=30.0)) as r:
                    self._record("sse", r.status_code)
                    for line in r.iter_lines():
                        if self._stop.is_set():
                            return
                        if line.startswith("id:"):
                            last = line[3:].strip()
                            with self._lock:
                                self.result.verdicts_streamed += 1
            except httpx.HTTPError as exc:
                if not self._stop.is_set():
                    self._record("sse", type(exc).__name__)
                    time.sleep(0.5)

    # -- run --

    def run(self, *, settle: float = 3.0, progress: bool = False) -> SoakResult:
        chat, stream, ev, sse = self.counts
        targets = ([(self._chat, (False,))] * chat + [(self._chat, (True,))] * stream
                   + [(self._events, ())] * ev + [(self._sse, ())] * sse)
        threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in targets]
        self.sample()
        for t in threads:
            t.start()
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            time.sleep(min(5.0, max(0.0, end - time.monotonic())))
            s = self.sample()
            if progress and s:
                print(f"  t={self.seconds - (end - time.monotonic()):5.0f}s fds={s.fds:.0f} "
                      f"rss={s.rss / 2**20:.0f}MiB tasks={s.tasks:.0f} "
                      f"requests={sum(self.result.statuses.values())}", file=sys.stderr)
        self._stop.set()
        for t in threads:
            t.join(150)
        time.sleep(settle)  # let closed connections and finished tasks go away
        self.sample()
        return self.result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8083")
    ap.add_argument("--key", required=True)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--model", default="meta")
    ap.add_argument("--chat-workers", type=int, default=2)
    ap.add_argument("--stream-workers", type=int, default=1)
    ap.add_argument("--event-workers", type=int, default=1)
    ap.add_argument("--sse-readers", type=int, default=2)
    args = ap.parse_args(argv)
    soak = Soak(args.url, args.key, seconds=args.seconds, model=args.model,
                chat_workers=args.chat_workers, stream_workers=args.stream_workers,
                event_workers=args.event_workers, sse_readers=args.sse_readers)
    result = soak.run(progress=True)
    print(json.dumps(result.summary(), indent=2))
    return 1 if result.unintended_5xx() or result.stream_errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

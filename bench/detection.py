"""Detection under load, on the stack a user runs: the supervisor's three layers on the
default model (``layers.<name>.threads`` unset), the gateway in front of them with its
pipeline, and ``bench/counting_relay.py`` between the gateway and the trigger layer, so
every trigger request is counted from the layer's side.

- Event → verdict p50, idle and while 4 long chats stream: single candidate events
  posted to ``POST /v1/events`` one at a time, each timed until its verdict arrives on
  ``GET /v1/events/stream``; first with nothing else running, then while 4 clients
  stream ``/v1/chat/completions`` to ``ai-sysadmin`` (large ``max_tokens``) without a
  pause.
- Trigger burst: a few hundred candidates posted at once; the time until the last
  verdict, verdicts/s, the longest wait between two verdicts (a stall), and what the
  trigger layer was asked: requests, resends of identical work, events sent twice.

Candidates match the default rules (``layers/rules/default.toml``) and carry a word no
normaliser removes, so each has its own fingerprint and the prefilter's debounce (left at
its default) folds none of them; they come from a handful of units on one host, so
anomalies group into a few incidents as a real log's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench import stack
from bench.counting_relay import read_log
from bench.measure import percentile
from bench.procs import Server
from bench.suites import Options, SuiteResult, say
from bench.trigger_traffic import traffic

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pu")
# (unit, message template, syslog priority): each matches one default rule.
TEMPLATES: tuple[tuple[str | None, str, int], ...] = (
    (None, "Out of memory: Killed process {pid} ({word}) total-vm:{n}kB, anon-rss:{m}kB", 2),
    (None, "EXT4-fs error (device sda1): ext4_find_entry:{n}: inode #{m}: comm {word}", 3),
    ("nginx.service", "nginx.service: Main process exited, code=exited, status=1/FAILURE "
                      "(worker {word})", 3),
    ("app.service", "{word}[{pid}]: segfault at 7f{n} ip 00007f{m} sp 00007ffd error 4 in "
                    "libc.so.6", 4),
    ("postgresql.service", "could not write to file \"base/{word}/{n}\": No space left on "
                           "device", 3),
    ("backup.service", "backup.service: Failed with result 'exit-code' (job {word}).", 4),
    ("docker.service", "container {word} health check failed: connection refused after {n} ms",
     3),
    ("nginx.service", "upstream {word} timed out (110: Connection timed out) while reading "
                      "response header from upstream", 3),
    ("app.service", "worker {word} exceeded its deadline of {n} s, terminating", 3),
    ("sshd.service", "error: kex_exchange_identification: read from {word}: Connection reset "
                     "by peer", 3),
)


def word(i: int) -> str:
    """A letters-only word unique to ``i`` (fingerprints keep letters, drop digits)."""
    digits = str(i)
    return "".join(SYLLABLES[int(d)] for d in digits) + "x"


def candidates(n: int, tag: str, host: str = "bench-host", start: int = 0) -> list[dict[str, Any]]:
    """``n`` events for ``POST /v1/events``, each a candidate under the default rules and
    debounce; ids unique to ``tag``."""
    out = []
    for i in range(start, start + n):
        unit, tmpl, priority = TEMPLATES[i % len(TEMPLATES)]
        msg = tmpl.format(word=word(i), pid=1000 + i, n=4096 + 7 * i, m=100 + 3 * i)
        out.append({"id": f"bench-{tag}-{i}", "host": host, "source": "journald",
                    "unit": unit, "priority": priority, "message": msg})
    return out


@dataclass
class VerdictStream:
    """Reads ``/v1/events/stream``: when each event's verdict arrived, and how."""

    base: str
    headers: dict[str, str]
    arrived: dict[str, float] = field(default_factory=dict)
    unreviewed: set[str] = field(default_factory=set)
    anomalies: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, client: httpx.AsyncClient) -> None:
        async with client.stream("GET", self.base + "/v1/events/stream", headers=self.headers,
                                 timeout=None) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                v = json.loads(line[5:])
                self.arrived.setdefault(v["event_id"], time.monotonic())
                if v.get("unreviewed"):
                    self.unreviewed.add(v["event_id"])
                if v.get("anomaly"):
                    self.anomalies.add(v["event_id"])
                self.changed.set()

    async def wait_for(self, ids: list[str], deadline: float, stall: float = float("inf")) -> bool:
        """True when every id has its verdict; False at ``deadline`` or after ``stall``
        seconds without a new one."""
        last = time.monotonic()
        count = -1
        while True:
            got = sum(i in self.arrived for i in ids)
            now = time.monotonic()
            if got == len(ids):
                return True
            if got != count:
                count, last = got, now
            if now >= deadline or now - last >= stall:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(deadline - now, 5.0))


def max_gap(start: float, times: list[float]) -> float:
    """The longest wait for the next verdict, from ``start`` on."""
    prev, gap = start, 0.0
    for t in sorted(times):
        gap = max(gap, t - prev)
        prev = t
    return gap


@dataclass
class ChatLoad:
    """Clients streaming chats to ``ai-sysadmin`` back to back until stopped."""

    base: str
    headers: dict[str, str]
    clients: int = 4
    max_tokens: int | None = 2048
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    streams: int = 0
    completed: int = 0
    chunks: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    streaming_since: float | None = None

    async def _one(self, client: httpx.AsyncClient, k: int) -> None:
        while not self.stop.is_set():
            body: dict[str, Any] = {
                "model": "ai-sysadmin", "stream": True,
                "messages": [{"role": "user", "content":
                              f"Explain in detail how to find what fills the disk ({k})."}]}
            if self.max_tokens is not None:
                body["max_tokens"] = self.max_tokens
            try:
                async with client.stream("POST", self.base + "/v1/chat/completions",
                                         headers=self.headers, json=body) as r:
                    self.statuses[str(r.status_code)] += 1
                    if r.status_code == 400 and self.max_tokens is not None:
                        # A ceiling below what was asked: the layer's own cap instead.
                        self.errors.append((await r.aread()).decode(errors="replace")[:200])
                        self.max_tokens = None
                        continue
                    if r.status_code != 200:
                        await asyncio.sleep(1.0)
                        continue
                    self.streams += 1
                    async for line in r.aiter_lines():
                        if line.startswith("data:") and '"content"' in line:
                            self.chunks += 1
                            if self.streaming_since is None:
                                self.streaming_since = time.monotonic()
                        if self.stop.is_set():
                            return
                    self.completed += 1
            except httpx.HTTPError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(1.0)

    async def run(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self._one(client, k) for k in range(self.clients)))

    def summary(self, seconds: float) -> dict[str, Any]:
        return {"clients": self.clients, "max_tokens": self.max_tokens, "streams": self.streams,
                "completed": self.completed, "chunks": self.chunks,
                "chunks_per_s": self.chunks / seconds if seconds > 0 else 0.0,
                "statuses": dict(self.statuses), "errors": self.errors[:3]}


async def wait_idle(urls: list[str], limit: float) -> bool:
    """Until no slot of any layer is processing (twice in a row), at most ``limit`` s."""
    deadline = time.monotonic() + limit
    quiet = 0
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            busy = False
            for url in urls:
                try:
                    slots = (await client.get(url + "/slots")).json()
                    busy = busy or any(s.get("is_processing") for s in slots)
                except (httpx.HTTPError, ValueError, AttributeError, TypeError):
                    busy = True
            quiet = 0 if busy else quiet + 1
            if quiet >= 2:
                return True
            await asyncio.sleep(1.0)
    return False


@dataclass
class Plan:
    singles: int
    burst: int
    single_deadline: float = 300.0
    burst_stall_abort: float = 300.0  # give up on a burst after this long without a verdict


async def _singles(client: httpx.AsyncClient, vs: VerdictStream, gw: str,
                   headers: dict[str, str], events: list[dict[str, Any]],
                   deadline: float) -> tuple[list[float], int]:
    lat, missing = [], 0
    for ev in events:
        t = time.monotonic()
        r = await client.post(gw + "/v1/events", headers=headers, json={"events": [ev]})
        r.raise_for_status()
        if await vs.wait_for([ev["id"]], t + deadline):
            lat.append((vs.arrived[ev["id"]] - t) * 1000)
        else:
            missing += 1
            lat.append(deadline * 1000)  # counted at the deadline: never better than it was
        await asyncio.sleep(0.5)
    return lat, missing


async def run_detection(gw: str, layer_urls: list[str], relay_log: Any, plan: Plan,
                        res: SuiteResult) -> None:
    headers = {"authorization": f"Bearer {stack.GATEWAY_KEY}"}
    ex = res.extra
    vs = VerdictStream(gw, headers)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
        listener = asyncio.create_task(vs.run(client))
        try:
            await asyncio.sleep(0.5)
            say("detection: one event to warm the trigger path")
            await _singles(client, vs, gw, headers, candidates(1, "warm", start=90000), 300)
            await wait_idle(layer_urls, 120)

            say(f"detection: {plan.singles} single events, idle")
            t_idle = time.time()
            lat, missing = await _singles(client, vs, gw, headers,
                                          candidates(plan.singles, "idle"), plan.single_deadline)
            ex["detect.idle_latencies_ms"] = lat
            ex.setdefault("detect.idle_p50_ms", []).append(percentile(lat, 50))
            ex["detect.idle_missing"] = missing
            ex["detect.idle_traffic"] = traffic(read_log(relay_log), t_idle).as_dict()
            say(f"  idle: event → verdict p50 {percentile(lat, 50):.0f} ms ({missing} missing)")
            await wait_idle(layer_urls, 180)

            chats = ChatLoad(gw, headers)
            chat_client = httpx.AsyncClient(timeout=httpx.Timeout(None))
            chat_task = asyncio.create_task(chats.run(chat_client))
            try:
                t_wait = time.monotonic()
                while chats.streaming_since is None and time.monotonic() - t_wait < 180:
                    await asyncio.sleep(0.5)
                await asyncio.sleep(3.0)  # the other clients' streams are under way too
                say(f"detection: {plan.singles} single events while {chats.clients} chats "
                    f"stream ({chats.chunks} chunks so far, statuses {dict(chats.statuses)})")
                t_chat, t0 = time.time(), time.monotonic()
                chunks0 = chats.chunks
                lat, missing = await _singles(client, vs, gw, headers,
                                              candidates(plan.singles, "chat", start=1000),
                                              plan.single_deadline)
                seconds = time.monotonic() - t0
            finally:
                chats.stop.set()
                chat_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await chat_task
                await chat_client.aclose()
            ex["detect.chat_latencies_ms"] = lat
            ex.setdefault("detect.chat_p50_ms", []).append(percentile(lat, 50))
            ex["detect.chat_missing"] = missing
            summary = chats.summary(seconds)
            summary["chunks_per_s_measured"] = (chats.chunks - chunks0) / seconds
            ex["detect.chats"] = summary
            ex["detect.chat_traffic"] = traffic(read_log(relay_log), t_chat).as_dict()
            say(f"  with chats: event → verdict p50 {percentile(lat, 50):.0f} ms ({missing} "
                f"missing); chats {summary['chunks_per_s_measured']:.1f} chunks/s, "
                f"statuses {summary['statuses']}")
            if not await wait_idle(layer_urls, 300):
                res.notes.append("Before the burst, the layers were still busy after 300 s.")

            events = candidates(plan.burst, "burst", start=10000)
            ids = [e["id"] for e in events]
            say(f"detection: a burst of {plan.burst} candidates in one request")
            t_wall, t0 = time.time(), time.monotonic()
            r = await client.post(gw + "/v1/events", headers=headers, json={"events": events})
            r.raise_for_status()
            done = await vs.wait_for(ids, t0 + max(900.0, plan.burst * 6.0),
                                     stall=plan.burst_stall_abort)
            t_end = time.monotonic()
            times = [vs.arrived[i] for i in ids if i in vs.arrived]
            total = (max(times) - t0) if times else t_end - t0
            gap = max_gap(t0, times + ([] if done else [t_end]))
            ex["burst.events"] = plan.burst
            ex["burst.accepted"] = r.json().get("accepted")
            ex["burst.verdicts"] = len(times)
            ex["burst.complete"] = done
            ex.setdefault("burst.total_s", []).append(total)
            ex.setdefault("burst.vps", []).append(len(times) / total if total > 0 else 0.0)
            ex.setdefault("burst.max_gap_s", []).append(gap)
            ex["burst.first_verdict_s"] = (min(times) - t0) if times else None
            ex.setdefault("burst.p50_s", []).append(percentile([t - t0 for t in times], 50))
            ex["burst.unreviewed"] = sum(i in vs.unreviewed for i in ids)
            ex["burst.anomalies"] = sum(i in vs.anomalies for i in ids)
            await asyncio.sleep(1.0)  # the last answers' records reach the relay's log
            tr = traffic(read_log(relay_log), t_wall, t_wall + (t_end - t0) + 1)
            ex["burst.traffic"] = tr.as_dict()
            say(f"  burst: {len(times)}/{plan.burst} verdicts in {total:.0f} s "
                f"({len(times) / total if total else 0:.2f}/s), longest wait {gap:.0f} s, "
                f"{ex['burst.unreviewed']} from the rule alone; trigger requests {tr.requests}, "
                f"identical resends {tr.identical_resends}, events re-sent {tr.events_resent}, "
                f"abandoned {tr.abandoned}")
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await listener


def suite_detection(opts: Options) -> SuiteResult:
    out = SuiteResult()
    plan = Plan(singles=3, burst=40) if opts.quick else Plan(singles=8, burst=320)
    layers = stack.layers_server(opts.work, tag="detection-layers")
    started: list[Server] = []
    try:
        say("starting the supervisor's three layers (threads unset)")
        started.append(layers.server.start())
        layers.wait_ready()
        out.extra["detect.threads_flag"] = {
            n: (a[a.index("--threads") + 1] if "--threads" in a[:-1] else None)
            for n, a in layers.engine_processes().items()}
        out.extra["detect.threads"] = layers.effective_threads()
        relay, relay_log = stack.counting_relay_server(opts.work, layers.ports["trigger"])
        started.append(relay.start())
        relay.wait_ready()
        gateway, daemon = stack.stack_gateway_server(
            opts.work, {"trigger": relay.port, "review": layers.ports["review"],
                        "meta": layers.ports["meta"]})
        started.append(gateway.start())
        gateway.wait_ready()
        started.append(daemon.start())
        daemon.wait_ready()
        asyncio.run(run_detection(gateway.base, [layers.url(n) for n in layers.managed],
                                  relay_log, plan, out))
        out.extra["detect.all_traffic"] = traffic(read_log(relay_log)).as_dict()
    finally:
        for s in reversed(started):
            s.stop()
    out.notes.append(
        f"Detection: the supervisor's three layers on the default model (threads unset: "
        f"{out.extra.get('detect.threads')}), the gateway (prefilter and trigger stage, "
        "pipeline defaults, debounce included) and the daemon (review → meta; collectors and "
        "memory off) on one store, with `bench/counting_relay.py` between the gateway and the "
        f"trigger layer. {plan.singles} single events one at a time, idle and while 4 clients stream "
        f"chats to `ai-sysadmin`; then a burst of {plan.burst} candidates in one "
        "`POST /v1/events`. A missing verdict counts at its deadline "
        f"({plan.single_deadline:.0f} s).")
    return out

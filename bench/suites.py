"""The bench suites. Each starts what it needs, measures in rounds that interleave the
paths (so drift from a shared machine spreads over all of them), stops its servers and
returns its figures."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import stack
from bench.measure import Run, chat_body, measure, measure_interleaved, paired_difference
from bench.procs import Server
from layers.generation import TURN_MARKERS

# lean (bench/lean_proxy.py) is a reference point: bare ASGI + a raw asyncio upstream client.
PROXIES = ("passthrough", "lean", "gateway", "litellm")
OPTIONAL: tuple[str, ...] = ()


@dataclass
class Options:
    work: Path
    quick: bool = False
    reps: int = 3
    duration: float = 3.0
    paths: tuple[str, ...] = PROXIES
    open_streams: int = 1000
    profile: bool = False


@dataclass
class SuiteResult:
    runs: list[Run] = field(default_factory=list)
    idle_rss_mb: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at start and end


def say(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[None]:
    started: list[Server] = []
    try:
        for s in servers:
            say(f"starting {s.name} on port {s.port}")
            started.append(s.start())
        for s in servers:
            s.wait_ready()
        yield
    finally:
        for s in reversed(started):
            s.stop()


def _proxies(opts: Options, upstream: Server, *, slots: int, tag: str = "",
             skip: tuple[str, ...] = ()) -> dict[str, Server]:
    make = {
        "passthrough": lambda: stack.passthrough_server(opts.work, upstream),
        "lean": lambda: stack.lean_server(opts.work, upstream),
        "gateway": lambda: stack.gateway_server(opts.work, upstream, slots=slots,
                                                max_queue=256, tag=f"gateway{tag}"),
        "litellm": lambda: stack.litellm_server(opts.work, upstream, tag=f"litellm{tag}"),
    }
    return {name: make[name]() for name in opts.paths if name not in skip}


def _warm(paths: dict[str, stack.Path_], body: dict[str, Any]) -> None:
    """A few requests each so lazy imports and pools are done before anything counts."""
    for p in paths.values():
        measure(p, concurrency=2, body=body, duration=0.3, warmup=0.2, timeout=120)


def _log_run(r: Run) -> None:
    extra = f" ttft p50 {r.ttft_p50_ms:.2f} ms" if r.stream else ""
    err = f" ERRORS {r.errors}: {r.error_samples[:1]}" if r.errors else ""
    say(f"  {r.path:<11} c={r.concurrency:<4} {r.rps:8.0f} req/s  p50 {r.p50_ms:7.2f} ms  "
        f"p99 {r.p99_ms:7.2f} ms  cpu {r.cpu_ms_per_req:.3f} ms/req{extra}{err}")


def suite_stub(opts: Options) -> SuiteResult:
    """Non-stream latency/throughput at c=1,16,64 and streams at c=16, zero-latency stub."""
    out = SuiteResult()
    upstream = stack.stub_server(opts.work)
    proxies = _proxies(opts, upstream, slots=64)
    with running([upstream, *proxies.values()]):
        paths = stack.paths_for(upstream, proxies)
        _warm(paths, chat_body(False))
        _warm(paths, chat_body(True))
        for name, p in paths.items():
            out.idle_rss_mb[name] = p.server.rss() / 2**20
        for rep in range(opts.reps):
            for conc in (1, 16, 64):
                say(f"stub round {rep + 1}/{opts.reps}, concurrency {conc}, non-stream")
                for p in paths.values():
                    r = measure(p, concurrency=conc, body=chat_body(False), duration=opts.duration)
                    _log_run(r)
                    out.runs.append(r)
            say(f"stub round {rep + 1}/{opts.reps}, concurrency 16, stream")
            for p in paths.values():
                r = measure(p, concurrency=16, body=chat_body(True), duration=opts.duration)
                _log_run(r)
                out.runs.append(r)
        for name, p in paths.items():
            out.extra[f"rss_after_mb.{name}"] = p.server.rss() / 2**20
        if opts.profile and "gateway" in paths:
            say("profiling the gateway with py-spy at concurrency 16")
            out.extra["profile"] = profile_run(paths["gateway"], opts.work / "gateway.stacks")
    return out


def profile_run(path: stack.Path_, stacks: Path, seconds: int = 6) -> str:
    """py-spy samples of a server under a c=16 non-stream load, summarised."""
    import subprocess
    import threading

    from bench.profile import summarize
    from bench.venvs import ensure_venv

    spy_bin = ensure_venv("tools").parent / "py-spy"
    assert path.server.popen is not None
    spy = subprocess.Popen(
        [str(spy_bin), "record", "-p", str(path.server.popen.pid), "-d", str(seconds), "-r",
         "200", "-f", "raw", "-o", str(stacks), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = threading.Thread(target=lambda: measure(path, concurrency=16, body=chat_body(False),
                                                duration=seconds, warmup=0.2))
    t.start()
    t.join()
    spy.wait(seconds + 60)
    return summarize(stacks, 15) if stacks.is_file() else "py-spy produced no samples"


def suite_open_streams(opts: Options) -> SuiteResult:
    """N streams opened at once against a slow stub and held until it ends them."""
    out = SuiteResult()
    # Long enough that the last stream opens before the first ends, on a busy machine too.
    chunks, delay = (40, 0.5) if opts.quick else (60, 0.5)
    upstream = stack.stub_server(opts.work, chunks=chunks, chunk_delay=delay, tag="slow-stub")
    names = [n for n in ("gateway", "passthrough") if n in opts.paths]
    proxies: dict[str, Server] = {}
    for n in names:
        if n == "gateway":
            # The stub has no slot limit; the gateway counts slots per endpoint, so the
            # layer lists the stub as 16 replicas of 64 slots (1,024 at once).
            proxies[n] = stack.gateway_server(opts.work, upstream, slots=64, replicas=16,
                                              max_queue=1024, tag="gateway-streams")
        else:
            proxies[n] = stack.passthrough_server(opts.work, upstream)
    with running([upstream, *proxies.values()]):
        paths = stack.paths_for(upstream, proxies)
        del paths["direct"]
        for p in paths.values():
            measure(p, concurrency=4, body=chat_body(True), duration=0.2, warmup=0.0)
        reps = 1 if opts.quick else 2
        for rep in range(reps):
            for name, p in paths.items():
                idle = p.server.rss() / 2**20
                say(f"open streams round {rep + 1}/{reps}: {opts.open_streams} streams held "
                    f"~{chunks * delay:.0f} s through {name}")
                r = measure(p, concurrency=opts.open_streams, body=chat_body(True),
                            duration=1, warmup=0, mode="hold", timeout=chunks * delay + 60)
                growth = r.rss_peak_mb - idle
                say(f"  {name}: {r.ok} ok, {r.errors} errors, {r.peak_open} open at once, "
                    f"RSS {idle:.0f} -> {r.rss_peak_mb:.0f} MB (+{growth:.0f}){r.error_samples[:1]}")
                out.runs.append(r)
                out.extra.setdefault(f"rss_growth_mb.{name}", []).append(growth)
                out.extra.setdefault(f"rss_idle_mb.{name}", []).append(idle)
                time.sleep(1.0)
    return out


def suite_real(opts: Options) -> SuiteResult:
    """The real model: TTFT (interleaved, concurrency 1), non-stream latency at 1 and
    throughput at the server's slot count."""
    out = SuiteResult()
    slots = 4
    upstream = stack.llama_server(opts.work, parallel=slots)
    # lean is a stub-only reference: it has no retry for connections llama-server closes.
    proxies = _proxies(opts, upstream, slots=slots, tag="-real", skip=("lean",))
    # The byte relay: what a proxy's extra hop alone costs in TTFT on these cores.
    proxies = {"relay": stack.relay_server(opts.work, upstream), **proxies}
    with running([upstream, *proxies.values()]):
        paths = stack.paths_for(upstream, proxies)
        # Streams with a short answer: TTFT dominates; the same prompt each time (the
        # server's prompt cache treats every path alike).
        sbody = chat_body(True, max_tokens=8, content="Name one Linux init system.")
        nbody = chat_body(False, max_tokens=16, content="Name one Linux init system.")
        # Every path gets the stop strings the gateway adds for this model (Gemma's turn
        # markers): without them the direct path streams past the end of the model's turn
        # while the gateway's answer ends there — often before its first text, so its
        # "first token" was the finish chunk and TTFT compared different generations.
        for body in (sbody, nbody):
            body["stop"] = list(TURN_MARKERS)
        _warm(paths, nbody)
        # Counted requests, not a duration: one answer takes ~0.2-2 s on two shared cores.
        # 6 × 60 streams a path: the TTFT of one stream varies by ±5 ms on two shared cores,
        # so 200 streams left the median ratio ±2 % from one run to the next.
        rounds = 2 if opts.quick else 6
        per = 10 if opts.quick else 60
        pairs: dict[str, tuple[list[float], list[float]]] = {
            name: ([], []) for name in paths if name != "direct"}
        for rep in range(rounds):
            say(f"real model round {rep + 1}/{rounds}: {per} streams each, concurrency 1, "
                "the paths in turn request by request")
            runs = measure_interleaved(list(paths.values()), body=sbody, rounds=per)
            for r in runs:
                _log_run(r)
                out.runs.append(r)
            # Streams of the same turn pair up: only in a round where neither path lost one.
            direct = next(r for r in runs if r.path == "direct")
            for r in runs:
                if r.path in pairs and len(r.ttft_ms) == len(direct.ttft_ms) == per:
                    pairs[r.path][0].extend(r.ttft_ms)
                    pairs[r.path][1].extend(direct.ttft_ms)
        for name, (values, directs) in pairs.items():
            if values:
                out.extra[f"ttft_added_ms.{name}"] = list(paired_difference(values, directs))
        reps = 2 if opts.quick else 3
        for rep in range(reps):
            for conc in (1, slots):
                say(f"real model round {rep + 1}/{reps}, concurrency {conc}, non-stream")
                for p in paths.values():
                    r = measure(p, concurrency=conc, body=nbody, duration=120, warmup=0,
                                max_requests=2 * conc, timeout=180)
                    _log_run(r)
                    out.runs.append(r)
    return out

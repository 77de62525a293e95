"""A/B of the layer client's transport: layers/http.py (hand-written HTTP/1.1 on asyncio
streams) against aiohttp (llhttp's C parser, a pooled ``TCPConnector``), both behind the
same :class:`layers.client.LayerPool` and :class:`layers.client.Upstream`, so each
request is what the gateway does per proxied request: ``pool.open`` (admission, endpoint
choice, breaker), then ``read()`` of a JSON answer or ``events()`` of an 8-chunk stream.

The upstream is the zero-latency stub (bench/stub_upstream.py) in its own process: the
process measured runs only the client, its event loop (uvloop, as the gateway) and the
closed-loop load. Figures per transport, kind and concurrency: p50/p99 latency of whole
answers, CPU ms per request (this process's CPU time / requests) and requests/s. Rounds
alternate which transport goes first, so drift of a shared machine falls on both.

aiohttp is never in the project's venv: ``python -m bench.http_ab`` re-runs itself in
``~/.cache/ai-sysadmin/bench-venvs/http_ab`` (bench/venvs.py: aiohttp pinned, with the
layer client's own dependencies at the project venv's versions), this checkout on its
``PYTHONPATH``. ``python -m bench --suites http_ab`` runs it as a suite of the bench page.
Only the transport differs: spare connections are off on both (the stub keeps
connections alive; the spare and resend-on-stale logic would stay ours with either).

Run: ``python -m bench.http_ab [--requests 400] [--rounds 5] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, cast

from bench.machine import REPO, cpu_model, git_head
from layers import http
from layers.client import LayerClients, LayerPool
from layers.config import Settings

TRANSPORTS = ("hand-written", "aiohttp")
KINDS = ("json", "sse8")
CONCURRENCY = (1, 16)
CHUNKS = 8

# -- aiohttp behind layers/http.py's interface ---------------------------------------------


class AiohttpResponse:
    """An aiohttp answer as layers.client reads one (``layers.http.Response``'s surface)."""

    def __init__(self, response: Any) -> None:
        self._r = response
        self.status_code: int = response.status
        self.headers: Mapping[str, str] = response.headers  # case-insensitive
        self._complete = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        aiohttp = _aiohttp()
        try:
            async for piece in self._r.content.iter_any():
                yield piece
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise http.ReadTimeout("no data in time") from None
        except aiohttp.ClientError as exc:
            raise http.ProtocolError(f"the body broke off ({type(exc).__name__})") from None
        self._complete = True

    async def aread(self) -> bytes:
        return b"".join([piece async for piece in self.aiter_raw()])

    async def aclose(self) -> None:
        # Read to its end: the connection goes back to the pool; else it is closed (the
        # peer sees the client leave), as layers/http.py does.
        if self._complete:
            self._r.release()
        else:
            self._r.close()


class AiohttpClient:
    """``layers.http.HTTPClient``'s ``request``/``get``/``aclose`` on an aiohttp session:
    one pooled ``TCPConnector`` without a connection limit (the pool's limiter bounds
    concurrency), no cookie jar, no decompression (bodies are relayed as they came)."""

    def __init__(self) -> None:
        aiohttp = _aiohttp()
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=http.IDLE_REUSE_SECONDS)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              cookie_jar=aiohttp.DummyCookieJar())
        self._timeouts: dict[http.Timeouts, Any] = {}

    def _timeout(self, timeout: float | http.Timeouts) -> Any:
        t = http.Timeouts.of(timeout)
        found = self._timeouts.get(t)
        if found is None:
            found = self._timeouts[t] = _aiohttp().ClientTimeout(
                total=None, connect=t.connect, sock_read=t.read)
        return found

    async def request(self, method: str, url: str, *, content: bytes = b"",
                      headers: Mapping[str, str] | None = None,
                      timeout: float | http.Timeouts = 30.0) -> AiohttpResponse:
        aiohttp = _aiohttp()
        try:
            r = await self._session.request(method, url, data=content, headers=headers,
                                            timeout=self._timeout(timeout))
        except aiohttp.ClientConnectorError as exc:
            raise http.ConnectError(f"cannot connect: {exc}") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise http.ReadTimeout("no answer in time") from None
        except aiohttp.ClientError as exc:
            raise http.ProtocolError(f"no answer ({type(exc).__name__})") from None
        return AiohttpResponse(r)

    async def get(self, url: str, *, headers: Mapping[str, str] | None = None,
                  timeout: float | http.Timeouts = 5.0) -> AiohttpResponse:
        response = await self.request("GET", url, headers=headers, timeout=timeout)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def aclose(self) -> None:
        await self._session.close()


def _aiohttp() -> Any:
    import aiohttp  # type: ignore[import-not-found,unused-ignore]

    return aiohttp


# -- the load ------------------------------------------------------------------------------


def layer_clients(transport: str, port: int) -> LayerClients:
    settings = Settings.model_validate({
        "layers": {"meta": {"parallel": 64, "managed": False, "max_queue": 1024,
                            "endpoints": [{"url": f"http://127.0.0.1:{port}/v1"}]}},
        "gateway": {"spare_connections": 0},
    })
    if transport == "hand-written":
        return LayerClients(settings)
    # The duck-typed aiohttp client: layers.client uses only the surface it implements.
    return LayerClients(settings, client=cast(http.HTTPClient, AiohttpClient()))


BODY = {"model": "meta", "messages": [{"role": "user", "content": "Is the system healthy?"}],
        "max_tokens": CHUNKS}


async def one_json(pool: LayerPool) -> None:
    up = await pool.open("/chat/completions", BODY)
    try:
        if not (await up.read()).startswith(b"{"):
            raise AssertionError("not a JSON answer")
    finally:
        await up.aclose()


async def one_sse(pool: LayerPool) -> None:
    up = await pool.open("/chat/completions", {**BODY, "stream": True})
    try:
        events = [e async for e in up.events()]
        if not events or b"data: [DONE]" not in events[-1]:
            raise AssertionError("the stream did not end with [DONE]")
    finally:
        await up.aclose()


async def cell(pool: LayerPool, one: Callable[[LayerPool], Awaitable[None]], concurrency: int,
               requests: int) -> dict[str, Any]:
    """``requests`` answers by ``concurrency`` closed-loop workers: latencies, wall, CPU."""
    latencies: list[float] = []
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = time.perf_counter()
            await one(pool)
            latencies.append(time.perf_counter() - t)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"latencies": latencies, "wall": wall, "cpu": cpu, "requests": len(latencies)}


async def measure(port: int, requests: int, rounds: int) -> dict[str, Any]:
    clients = {t: layer_clients(t, port) for t in TRANSPORTS}
    ones = {"json": one_json, "sse8": one_sse}
    cells: dict[str, list[dict[str, Any]]] = {}
    try:
        for c in clients.values():  # warm: connections, caches, lazy imports
            for kind in KINDS:
                await cell(c["meta"], ones[kind], 16, 200)
        for rnd in range(rounds):
            order = TRANSPORTS if rnd % 2 == 0 else TRANSPORTS[::-1]
            for conc in CONCURRENCY:
                for kind in KINDS:
                    for t in order:
                        r = await cell(clients[t]["meta"], ones[kind], conc, requests)
                        cells.setdefault(f"{t}|{kind}|{conc}", []).append(r)
    finally:
        for c in clients.values():
            await c.aclose()
    return summarize(cells)


def summarize(cells: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = []
    for key, runs in cells.items():
        transport, kind, conc = key.split("|")
        lat = sorted(x for r in runs for x in r["latencies"])
        n = sum(r["requests"] for r in runs)
        rows.append({
            "transport": transport, "kind": kind, "concurrency": int(conc), "requests": n,
            "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "cpu_ms_per_req": 1000 * sum(r["cpu"] for r in runs) / n,
            "rps": statistics.median(r["requests"] / r["wall"] for r in runs),
            "rps_range": [min(r["requests"] / r["wall"] for r in runs),
                          max(r["requests"] / r["wall"] for r in runs)],
        })
    return {"rows": rows}


def versions() -> dict[str, str]:
    import importlib.metadata as m
    import platform

    out = {"python": platform.python_version()}
    for dist in ("aiohttp", "uvloop"):
        try:
            out[dist] = m.version(dist)
        except m.PackageNotFoundError:
            out[dist] = "?"
    return out


def table(result: dict[str, Any]) -> list[str]:
    """The figures as a Markdown table, the transports side by side per case."""
    rows = {(r["kind"], r["concurrency"], r["transport"]): r for r in result["rows"]}
    out = ["| answer | concurrency | transport | p50 ms | p99 ms | CPU ms/req | req/s (min–max) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind in KINDS:
        for conc in CONCURRENCY:
            for t in TRANSPORTS:
                r = rows.get((kind, conc, t))
                if r is None:
                    continue
                name = "JSON" if kind == "json" else f"SSE, {CHUNKS} chunks"
                lo, hi = r["rps_range"]
                out.append(f"| {name} | {conc} | {t} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                           f"{r['cpu_ms_per_req']:.3f} | {r['rps']:.0f} ({lo:.0f}–{hi:.0f}) |")
    return out


def verdict(result: dict[str, Any]) -> tuple[bool, str]:
    """Whether the hand-written client clearly wins (less CPU per request in every case,
    and at least aiohttp's requests/s at concurrency 16), and the ratios that say so."""
    rows = {(r["kind"], r["concurrency"], r["transport"]): r for r in result["rows"]}
    cpu, rps = [], []
    wins = True
    for kind in KINDS:
        for conc in CONCURRENCY:
            hand, other = rows.get((kind, conc, TRANSPORTS[0])), rows.get((kind, conc, TRANSPORTS[1]))
            if hand is None or other is None:
                continue
            cpu.append(other["cpu_ms_per_req"] / hand["cpu_ms_per_req"])
            rps.append(hand["rps"] / other["rps"])
            wins = wins and cpu[-1] > 1.0 and (conc == 1 or rps[-1] >= 1.0)
    if not cpu:
        return False, "no figures"
    return wins, (f"aiohttp takes ×{min(cpu):.2f}–×{max(cpu):.2f} the hand-written client's CPU "
                  f"per request; the hand-written client serves ×{min(rps):.2f}–×{max(rps):.2f} "
                  "aiohttp's requests/s")


def section(result: dict[str, Any]) -> list[str]:
    """The bench page's section (bench/report.py) for this A/B's figures."""
    v = result.get("versions", {})
    wins, ratios = verdict(result)
    conclusion = (
        "**Kept**: the hand-written client wins clearly on this machine" if wins else
        "**No clear win** for the hand-written client on this machine: aiohttp would do"
    )
    return [
        "### HTTP client A/B: layers/http.py against aiohttp",
        "",
        "The layer client's transport (`bench/http_ab.py`): the same `LayerPool.open` + "
        "`Upstream.read()`/`events()` per request over the hand-written HTTP/1.1 client or "
        "over aiohttp's `ClientSession` (llhttp parser, pooled `TCPConnector`, no cookie jar, "
        "no decompression), against the zero-latency stub in its own process; uvloop; spare "
        "connections off on both. The process measured runs only the client and its load. "
        f"Measured {result.get('date', '?')} on {result.get('machine', '?')}: "
        f"Python {v.get('python', '?')}, aiohttp {v.get('aiohttp', '?')}, uvloop "
        f"{v.get('uvloop', '?')}, {result.get('cpus', '?')} CPUs, load average "
        f"{result.get('load', 0.0):.1f} at the end; {result.get('rounds', '?')} rounds of "
        f"{result.get('requests_per_cell', '?')} requests per row, the transports' order "
        "alternating. p50/p99 over all rounds, CPU = process CPU time / requests, req/s "
        "the median round.",
        "",
        *table(result),
        "",
        f"{conclusion}: {ratios}.",
    ]


# -- running -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the stub upstream exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the stub upstream did not start listening")


def run(requests: int, rounds: int) -> dict[str, Any]:
    """Start the stub, measure, stop it. Needs aiohttp importable (the bench venv)."""
    import uvloop  # type: ignore[import-not-found,unused-ignore]

    port = _free_port()
    stub = subprocess.Popen([sys.executable, "-m", "bench.stub_upstream", "--port", str(port),
                             "--chunks", str(CHUNKS)], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        _wait_listening(port, stub)
        result = uvloop.run(measure(port, requests, rounds))
    finally:
        stub.terminate()
        stub.wait(10)
    result.update(versions=versions(), requests_per_cell=requests, rounds=rounds,
                  cpus=os.cpu_count(), load=os.getloadavg()[0], machine=_machine(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    return result


def _machine() -> str:
    """CPU model and kernel: the A/B may run on another machine than the page's rest."""
    import platform

    return (f"{os.cpu_count()} cores ({cpu_model()}), {platform.system()} "
            f"{platform.release()}, git {git_head()}")


def in_bench_venv(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m bench.http_ab ARGS`` in the http_ab venv, this checkout first on
    its path."""
    from bench.venvs import ensure_venv

    python = ensure_venv("http_ab")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(python), "-m", "bench.http_ab", *args], cwd=REPO, env=env,
                          check=True)


def suite_http_ab(opts: Any) -> Any:
    """The A/B as a suite of ``python -m bench`` (opt-in: ``--suites http_ab``)."""
    from bench.suites import SuiteResult, say

    out_json = opts.work / "http_ab.json"
    requests, rounds = (200, 3) if opts.quick else (400, 5)
    say(f"http_ab: {len(TRANSPORTS)} transports × {len(KINDS)} answers × c={CONCURRENCY}, "
        f"{rounds} rounds of {requests} requests")
    in_bench_venv(["--requests", str(requests), "--rounds", str(rounds), "--json", str(out_json)])
    res = SuiteResult()
    res.extra["http_ab"] = json.loads(out_json.read_text())
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=400, help="requests per cell and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    try:
        _aiohttp()
    except ImportError:  # the project's venv: re-run in the bench's own
        sys.exit(in_bench_venv(sys.argv[1:]).returncode)
    result = run(args.requests, args.rounds)
    v = result["versions"]
    print(f"python {v['python']}, aiohttp {v['aiohttp']}, uvloop {v['uvloop']}, "
          f"{result['cpus']} CPUs, load {result['load']:.1f}; {args.rounds} rounds × "
          f"{args.requests} requests per cell")
    print("\n".join(table(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""One load run against one path: the load generator in its own process, the server's
CPU and peak RSS sampled from here while it runs."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bench.load import LoadResult, LoadSpec, Target
from bench.procs import RssSampler, Server
from bench.stack import MODEL, Path_


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


class Run(BaseModel):
    """The figures of one load run."""

    path: str
    concurrency: int
    stream: bool
    ok: int
    errors: int
    error_samples: list[str] = Field(default_factory=list)
    rps: float
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float = float("nan")
    ttft_p99_ms: float = float("nan")
    inter_chunk_p50_ms: float = float("nan")
    cpu_ms_per_req: float = float("nan")
    rss_peak_mb: float = float("nan")
    peak_open: int = 0
    latencies_ms: list[float] = Field(default_factory=list, exclude=True)
    ttft_ms: list[float] = Field(default_factory=list, exclude=True)


def chat_body(stream: bool, max_tokens: int = 8, content: str = "Is the disk full?") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
    return body


def run_load(spec: LoadSpec) -> LoadResult:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = Path(fh.name)
    spec = spec.model_copy(update={"out": str(out)})
    limit = spec.warmup + spec.duration + spec.timeout + 30
    try:
        subprocess.run([sys.executable, "-m", "bench.load", spec.model_dump_json()],
                       check=True, timeout=limit)
        return LoadResult.model_validate_json(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def measure(path: Path_, *, concurrency: int, body: dict[str, Any], duration: float,
            warmup: float = 0.5, mode: str = "closed", timeout: float = 60.0,
            max_requests: int = 200_000, watch: Server | None = None) -> Run:
    server = watch or path.server
    spec = LoadSpec(url=path.url, body=body, headers=path.headers, concurrency=concurrency,
                    mode=mode, duration=duration, warmup=warmup, timeout=timeout,
                    max_requests=max_requests)
    cpu0 = server.cpu_seconds()
    with RssSampler(server) as rss:
        res = run_load(spec)
    cpu = server.cpu_seconds() - cpu0
    served = res.ok + res.errors + res.warmup_done
    return to_run(path.name, concurrency, bool(body.get("stream")), res,
                  cpu_ms_per_req=cpu * 1000 / served if served else float("nan"),
                  rss_peak_mb=rss.peak / 2**20)


def to_run(name: str, concurrency: int, stream: bool, res: LoadResult, *,
           cpu_ms_per_req: float = float("nan"), rss_peak_mb: float = float("nan")) -> Run:
    return Run(
        path=name, concurrency=concurrency, stream=stream, ok=res.ok, errors=res.errors,
        error_samples=res.error_samples, rps=res.ok / res.elapsed if res.elapsed else 0.0,
        p50_ms=percentile(res.latencies_ms, 50), p99_ms=percentile(res.latencies_ms, 99),
        ttft_p50_ms=percentile(res.ttft_ms, 50), ttft_p99_ms=percentile(res.ttft_ms, 99),
        inter_chunk_p50_ms=percentile(res.inter_chunk_ms, 50),
        cpu_ms_per_req=cpu_ms_per_req, rss_peak_mb=rss_peak_mb, peak_open=res.peak_open,
        latencies_ms=res.latencies_ms, ttft_ms=res.ttft_ms,
    )


def measure_interleaved(paths: list[Path_], *, body: dict[str, Any], rounds: int,
                        timeout: float = 120.0) -> list[Run]:
    """Concurrency 1, one request to each path in turn, ``rounds`` times: a Run per path."""
    first, *others = paths
    spec = LoadSpec(url=first.url, headers=first.headers, name=first.name, body=body,
                    others=[Target(name=p.name, url=p.url, headers=p.headers) for p in others],
                    mode="interleave", max_requests=rounds, warmup=0, timeout=timeout,
                    duration=min(600.0, rounds * len(paths) * timeout))
    res = run_load(spec)
    return [to_run(p.name, 1, bool(body.get("stream")), res.per_target[p.name]) for p in paths]


def paired_difference(a: list[float], b: list[float], *, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(median, 5th, 95th percentile) of the median of ``a[i] - b[i]``: the difference of
    two paths measured in the same turns, with a bootstrap interval. Per-turn pairs cancel
    the drift both paths share, so the interval is what is left of the noise."""
    if not a or len(a) != len(b):
        nan = float("nan")
        return nan, nan, nan
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return statistics.median(diffs), meds[int(0.05 * resamples)], meds[int(0.95 * resamples)]


def spread(values: list[float]) -> tuple[float, float, float]:
    """(min, median, max) over repeated runs, NaNs dropped."""
    vals = [v for v in values if v == v]
    if not vals:
        nan = float("nan")
        return nan, nan, nan
    return min(vals), statistics.median(vals), max(vals)


def dump(runs: list[Run]) -> str:
    return json.dumps([r.model_dump() for r in runs])

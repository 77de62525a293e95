"""bench/http_ab.py's verdict and table on made-up figures (the A/B itself needs aiohttp,
which lives in the bench's own venv, never in the project's)."""

from __future__ import annotations

from typing import Any

from bench.http_ab import CONCURRENCY, KINDS, section, verdict


def figures(hand_cpu: float, other_cpu: float, hand_rps: float, other_rps: float) -> dict[str, Any]:
    rows = []
    for kind in KINDS:
        for conc in CONCURRENCY:
            for t, cpu, rps in (("hand-written", hand_cpu, hand_rps), ("aiohttp", other_cpu, other_rps)):
                rows.append({"transport": t, "kind": kind, "concurrency": conc, "requests": 10,
                             "p50_ms": 1.0, "p99_ms": 2.0, "cpu_ms_per_req": cpu, "rps": rps,
                             "rps_range": [rps, rps]})
    return {"rows": rows}


def test_the_hand_written_client_is_kept_only_on_a_clear_win() -> None:
    assert verdict(figures(0.1, 0.2, 2000, 1000))[0]
    assert not verdict(figures(0.2, 0.1, 2000, 1000))[0]  # more CPU
    assert not verdict(figures(0.1, 0.2, 900, 1000))[0]  # fewer req/s at c=16
    page = "\n".join(section(figures(0.1, 0.2, 2000, 1000)))
    assert "**Kept**" in page and page.count("| hand-written |") == len(KINDS) * len(CONCURRENCY)

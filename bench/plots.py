"""PNG plots of a bench run. Runs in the bench's ``tools`` venv (matplotlib), so it reads
plain JSON and imports nothing from the project: ``python bench/plots.py DATA OUTDIR``.

DATA: {"latency_c16": {path: [ms…]}, "rps": {path: {conc: [req/s…]}},
       "ttft_real": {path: [ms…]}, "stream_ttft_c16": {path: [ms…]}}
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"direct": "#555555", "passthrough": "#1f77b4", "gateway": "#2ca02c", "litellm": "#d62728",
          "lean": "#9467bd"}


def cdf(ax, series: dict[str, list[float]], title: str, xlabel: str) -> None:  # type: ignore[no-untyped-def]
    for name, values in series.items():
        if not values:
            continue
        s = sorted(values)
        n = len(s)
        ax.plot(s, [(i + 1) / n for i in range(n)], label=f"{name} (n={n})",
                color=COLORS.get(name))
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests ≤ x")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if data.get("latency_c16"):
        fig, ax = plt.subplots(figsize=(8, 5))
        cdf(ax, data["latency_c16"], "Latency, zero-latency stub, non-stream, concurrency 16",
            "latency (ms, log scale)")
        fig.tight_layout()
        fig.savefig(out / "latency_stub_c16.png", dpi=110)
        written.append("latency_stub_c16.png")
    if data.get("rps"):
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, by_conc in data["rps"].items():
            concs = sorted(by_conc, key=int)
            meds = [statistics.median(by_conc[c]) for c in concs]
            lo = [m - min(by_conc[c]) for m, c in zip(meds, concs, strict=True)]
            hi = [max(by_conc[c]) - m for m, c in zip(meds, concs, strict=True)]
            ax.errorbar([int(c) for c in concs], meds, yerr=[lo, hi], marker="o", capsize=4,
                        label=name, color=COLORS.get(name))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([1, 16, 64], ["1", "16", "64"])
        ax.set_xlabel("concurrency (closed-loop connections)")
        ax.set_ylabel("requests/s (log scale; median, min–max bars)")
        ax.set_title("Throughput vs concurrency, zero-latency stub, non-stream")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput_stub.png", dpi=110)
        written.append("throughput_stub.png")
    if data.get("ttft_real") or data.get("stream_ttft_c16"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        cdf(axes[0], data.get("stream_ttft_c16", {}), "TTFT, stub, concurrency 16",
            "time to first token (ms, log scale)")
        cdf(axes[1], data.get("ttft_real", {}), "TTFT, real model, concurrency 1",
            "time to first token (ms, log scale)")
        fig.tight_layout()
        fig.savefig(out / "ttft.png", dpi=110)
        written.append("ttft.png")
    print(json.dumps(written))


if __name__ == "__main__":
    main()

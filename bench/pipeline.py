"""Pipeline figures: prefilter lines/s on a replayed journal, trigger verdicts/s naive vs
batched on the real model, event → verdict latency. Filled in as those stages land."""

from __future__ import annotations

from bench.suites import Options, SuiteResult


def suite_pipeline(opts: Options) -> SuiteResult:
    out = SuiteResult()
    out.notes.append("pipeline stages (layers/prefilter.py, layers/pipeline/) not present yet")
    return out

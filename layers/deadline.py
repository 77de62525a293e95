"""Deadlines of pipeline calls that follow a layer endpoint's measured speed.

A fixed timeout is wrong both ways on a CPU: three layers busy at once on two cores run
at a seventh of one layer's speed (docs/benchmarks.md), so a deadline sized for the idle
machine cuts work that is making progress, and one sized for the worst case waits minutes
for a layer that hangs. So each endpoint keeps its measured speed — prompt and generated
tokens per second, from llama-server's ``timings`` in its answers, else
``completion_tokens`` over the elapsed time — and a structured call's deadline is

    deadline = clamp(factor × slowdown × (prompt_tokens / prompt_speed
                                          + max_tokens / generation_speed),
                     floor, ceiling)

with ``prompt_tokens`` estimated from the prompt's characters (characters per token are
measured too, from ``usage.prompt_tokens``). Before anything is measured the deadline is
the fixed fallback (``gateway.timeouts.first_byte``) times ``slowdown``.

A timeout is evidence as well: a request that did not finish within ``factor`` times its
expected time shows the layer to be at least that much slower than measured, so
``slowdown`` grows to ``deadline / expected`` and the next request (which the trigger
stage makes smaller) gets a longer deadline, up to the ceiling. The next answer that does
arrive resets ``slowdown`` and updates the speeds: a slower measurement is taken as it
is, a faster one is averaged in (deadlines tighten gradually, loosen at once).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Prompt processing is batched and runs several times faster than generation on a CPU;
# until it is measured, it is assumed to be this many times the generation speed.
PROMPT_OVER_GENERATION = 4.0
DEFAULT_CHARS_PER_TOKEN = 3.0  # JSON-encoded log lines, numbers and paths: under English's 4
SMOOTHING = 0.5  # weight of a new measurement that is faster than the estimate
MIN_PROMPT_SAMPLE = 16  # tokens; fewer (a prompt mostly from the cache) is too noisy
MIN_GENERATION_SAMPLE = 4
MAX_SLOWDOWN = 1e6


@dataclass(frozen=True, slots=True)
class Work:
    """What a request asks of the layer, for its deadline."""

    prompt_chars: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class DeadlineRule:
    factor: float  # pipeline.deadline_factor
    floor: float  # pipeline.deadline_floor
    ceiling: float  # gateway.timeouts.total
    fallback: float  # gateway.timeouts.first_byte: nothing measured yet


@dataclass(frozen=True, slots=True)
class Deadline:
    seconds: float
    expected: float  # the request's expected seconds at the measured speed, slowdown 1
    final: bool  # the ceiling: no later try of the same work gets longer


def _rate(n: Any, ms: Any, minimum: int) -> float | None:
    if not isinstance(n, int | float) or not isinstance(ms, int | float):
        return None
    if n < minimum or ms <= 0:
        return None
    return float(n) / (float(ms) / 1000.0)


@dataclass
class Speed:
    """One endpoint's measured speed, from the pipeline's own calls."""

    prompt_tps: float | None = None
    generation_tps: float | None = None
    chars_per_token: float | None = None  # None: DEFAULT_CHARS_PER_TOKEN
    slowdown: float = 1.0
    samples: int = 0

    @property
    def measured(self) -> bool:
        return self.generation_tps is not None

    def expected_seconds(self, work: Work) -> float | None:
        """Seconds ``work`` takes at the measured speed (slowdown 1); None: unmeasured."""
        gen = self.generation_tps
        if gen is None:
            return None
        prompt = self.prompt_tps or gen * PROMPT_OVER_GENERATION
        chars_per_token = self.chars_per_token or DEFAULT_CHARS_PER_TOKEN
        return work.prompt_chars / chars_per_token / prompt + work.max_tokens / gen

    def deadline(self, work: Work, rule: DeadlineRule) -> Deadline:
        expected = self.expected_seconds(work)
        if expected is None:
            # The fallback stands for factor × expected, so that timeouts scale it alike.
            expected = rule.fallback / rule.factor
        raw = rule.factor * self.slowdown * expected
        seconds = min(rule.ceiling, max(rule.floor, raw))
        return Deadline(seconds, expected, final=seconds >= rule.ceiling)

    def timed_out(self, deadline: Deadline) -> None:
        """The request got no answer within ``deadline``: the layer is at least
        ``deadline / expected`` times slower than measured."""
        if deadline.expected > 0:
            self.slowdown = min(MAX_SLOWDOWN, max(self.slowdown, deadline.seconds / deadline.expected))

    def observe(self, answer: Mapping[str, Any], elapsed: float, prompt_chars: int) -> None:
        """Update from a completed answer (``elapsed``: request sent → body read)."""
        timings = answer.get("timings")
        usage = answer.get("usage")
        prompt = generation = None
        if isinstance(timings, Mapping):  # llama-server
            prompt = _rate(timings.get("prompt_n"), timings.get("prompt_ms"), MIN_PROMPT_SAMPLE)
            generation = _rate(timings.get("predicted_n"), timings.get("predicted_ms"),
                               MIN_GENERATION_SAMPLE)
        if generation is None and isinstance(usage, Mapping):
            # No timings (another engine): completion tokens over the whole request, which
            # includes reading the prompt — an underestimate of the speed, so a safe one.
            generation = _rate(usage.get("completion_tokens"), elapsed * 1000.0,
                               MIN_GENERATION_SAMPLE)
        if isinstance(usage, Mapping):
            tokens = usage.get("prompt_tokens")
            if isinstance(tokens, int) and tokens > 0 and prompt_chars > 0:
                self.chars_per_token = self._blend(self.chars_per_token, prompt_chars / tokens)
        if prompt is not None:
            self.prompt_tps = self._blend(self.prompt_tps, prompt)
        if generation is not None:
            self.generation_tps = self._blend(self.generation_tps, generation)
            self.slowdown = 1.0  # a fresh measurement of the speed as it is now
            self.samples += 1

    @staticmethod
    def _blend(old: float | None, new: float) -> float:
        """A lower value gives longer deadlines: it is taken at once; a higher one is
        averaged in."""
        if old is None or new < old:
            return new
        return old + SMOOTHING * (new - old)

"""The cheap floors: what a line-by-line judgement gets without any model. A stage that
does not beat the best of them adds nothing a one-line rule does not already give.

Each floor answers every line with a ``Prediction`` (its category and severity where it
has one), in corpus order — the prefilter keeps state (burst counters), so order matters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from layers.prefilter import Prefilter, load_rules
from layers.quality.corpus import Line
from layers.quality.scoring import Prediction

# What an admin greps for first. Deliberately broad: it is a floor, not a detector.
KEYWORDS = re.compile(
    r"\b(error|errors|err|fail|failed|failure|fatal|panic|crit|critical|emerg|alert|denied|"
    r"refused|timeout|timed out|killed|oom|segfault|corrupt|corruption|no space|full|"
    r"unable|cannot|can't|invalid|unreachable|lockup|expired?)\b",
    re.I,
)


def every_line(lines: Sequence[Line]) -> list[Prediction]:
    return [Prediction(True) for _ in lines]


def keyword_regex(lines: Sequence[Line]) -> list[Prediction]:
    return [Prediction(bool(KEYWORDS.search(line.message))) for line in lines]


def priority_at_most(level: int = 3) -> Callable[[Sequence[Line]], list[Prediction]]:
    def floor(lines: Sequence[Line]) -> list[Prediction]:
        return [Prediction(line.event().priority <= level) for line in lines]

    return floor


def prefilter_rules(rules_file: Path | None = None) -> Callable[[Sequence[Line]], list[Prediction]]:
    """The prefilter alone (the pipeline with no trigger model): a line that a rule lets
    through is an anomaly with the rule's category and severity floor — exactly the
    verdict the trigger stage stores when the layer gives none. Debounce is off: each
    line is judged on its own (debounce is rate control, not judgement)."""

    def floor(lines: Sequence[Line]) -> list[Prediction]:
        prefilter = Prefilter(load_rules(rules_file), debounce=0.0)
        out = []
        for line in lines:
            m = prefilter.check(line.event())
            out.append(Prediction(True, m.rule.category, m.rule.severity, rule=m.rule.name)
                       if m else Prediction(False))
        return out

    return floor


def floors(rules_file: Path | None = None) -> dict[str, Callable[[Sequence[Line]], list[Prediction]]]:
    """Name → floor, in the order the table shows them."""
    return {
        "every line": every_line,
        "keyword regex": keyword_regex,
        "priority <= 3": priority_at_most(3),
        "prefilter rules": prefilter_rules(rules_file),
    }

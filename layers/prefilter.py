"""The deterministic prefilter: what reaches a model at all.

Rules are data (``layers/rules/default.toml``, or the file in ``pipeline.rules_file``),
each with a name that travels with the event into its verdict and incident. Events
that match no rule are dropped; matching events are fingerprinted (numbers, hex,
addresses, pids and ids normalised away) and debounced, so a flood of one message
yields one candidate per window.

It runs on every collected line, so it is built to be cheap: every pattern rule is
folded into one compiled alternation that rejects a benign line with a single
``search``; only lines that hit it are checked rule by rule and fingerprinted. Time is
the event's own timestamp, which makes the filter deterministic under replay.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from layers import tomlfile
from layers.errors import UserError
from layers.events import Event, Severity

GroupBy = Literal["host", "unit", "fingerprint"]


class RuleError(UserError):
    """The rules file is unusable; one readable line."""


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]{1,48}$")
    pattern: str | None = None
    ignore_case: bool = True
    source: str | None = None
    unit: str | None = Field(None, description="regex the event's unit must match")
    max_priority: int | None = Field(None, ge=0, le=7)
    metric: str | None = None
    above: float | None = None
    count: int = Field(1, ge=1)
    window: float = Field(60.0, gt=0)
    group: GroupBy = "host"
    severity: Severity = "info"
    category: str = Field("other", max_length=40)

    @model_validator(mode="after")
    def _has_condition(self) -> Rule:
        if not (self.pattern or self.source or self.metric or self.max_priority is not None):
            raise ValueError("a rule needs pattern, source, metric or max_priority")
        if (self.metric is None) != (self.above is None):
            raise ValueError("metric and above go together")
        for rx in (self.pattern, self.unit):
            if rx is not None:
                try:
                    re.compile(rx)
                except re.error as exc:
                    raise ValueError(f"invalid regex {rx!r}: {exc}") from exc
        return self


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rule: list[Rule]

    @model_validator(mode="after")
    def _unique(self) -> RuleSet:
        names = [r.name for r in self.rule]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate rule names: {', '.join(sorted(dup))}")
        return self


def load_rules(path: Path | None = None) -> list[Rule]:
    """The rules in ``path``, or the packaged defaults."""
    return tomlfile.load(path, "rules/default.toml", RuleSet, RuleError, "prefilter rules").rule


# -- fingerprinting --------------------------------------------------------------------

_NORMALISERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I), "<uuid>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "<ip>"),
    (re.compile(r"\b(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}\b", re.I), "<ip>"),
    (re.compile(r"\b0x[0-9a-f]+\b", re.I), "<hex>"),
    (re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{6,}\b", re.I), "<hex>"),
    (re.compile(r"\[\d+\]"), "[<pid>]"),
    (re.compile(r"\d+"), "<n>"),
)
_SPACE = re.compile(r"\s+")


def normalise(message: str) -> str:
    """The message with its variable parts replaced: the shape of the line."""
    text = message[:400]
    for rx, repl in _NORMALISERS:
        text = rx.sub(repl, text)
    return _SPACE.sub(" ", text).strip().lower()[:200]


def fingerprint(event: Event) -> str:
    return f"{event.unit or event.source}: {normalise(event.message)}"


# -- the filter ----------------------------------------------------------------------


_SPECIAL = set(".^$*+?{}[]()|\\")


def required_literals(pattern: str) -> list[str] | None:
    """Substrings one of which every match of ``pattern`` contains: the longest literal run
    of each top-level alternative. None when some alternative has no literal run of 3+
    characters (then the pattern must always be tried). Used to reject a line with a few
    C-speed substring tests instead of a regex scan."""
    alternatives: list[str] = []
    depth, start, i = 0, 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "|" and depth == 0:
            alternatives.append(pattern[start:i])
            start = i + 1
        i += 1
    alternatives.append(pattern[start:])
    out = []
    for alt in alternatives:
        best = _longest_run(alt)
        if len(best) < 3:
            return None
        out.append(best)
    return out


def _longest_run(alt: str) -> str:
    runs: list[str] = []
    run = ""
    depth = 0
    i = 0
    while i < len(alt):
        c = alt[i]
        if depth:
            if c == "\\":
                i += 1
            elif c in "([":
                depth += 1
            elif c in ")]":
                depth -= 1
            i += 1
            continue
        if c == "\\" and i + 1 < len(alt):
            nxt = alt[i + 1]
            if nxt.isalnum():  # \b, \d, \S …: not a literal
                runs.append(run)
                run = ""
            else:
                run += nxt
            i += 2
            continue
        if c in "?*{":
            run = run[:-1]  # the previous character is optional
            runs.append(run)
            run = ""
            if c == "{":
                i = alt.find("}", i) if "}" in alt[i:] else len(alt)
        elif c in "([":
            runs.append(run)
            run = ""
            depth = 1
        elif c in _SPECIAL:
            runs.append(run)
            run = ""
        else:
            run += c
        i += 1
    runs.append(run)
    return max(runs, key=len)


def _contains_any(text: str, keywords: tuple[str, ...]) -> bool:
    return any(k in text for k in keywords)


@dataclass(frozen=True)
class Match:
    """A candidate: the rule that let the event through and its fingerprint."""

    rule: Rule
    fingerprint: str


@dataclass
class _Compiled:
    rule: Rule
    pattern: re.Pattern[str] | None
    unit: re.Pattern[str] | None


@dataclass
class Prefilter:
    rules: list[Rule]
    debounce: float = 300.0
    max_keys: int = 20_000
    _compiled: list[_Compiled] = field(init=False)
    _any_pattern: re.Pattern[str] | None = field(init=False)
    _keywords: tuple[str, ...] | None = field(init=False)
    _unpatterned: list[_Compiled] = field(init=False)
    _by_name: dict[str, Rule] = field(init=False)
    # key → last time a candidate passed (debounce), and burst counters.
    _last_pass: OrderedDict[tuple[str, str], float] = field(init=False)
    _bursts: OrderedDict[tuple[str, str], deque[float]] = field(init=False)

    def __post_init__(self) -> None:
        self._compiled = [
            _Compiled(
                r,
                re.compile(r.pattern, re.I if r.ignore_case else 0) if r.pattern else None,
                re.compile(r.unit) if r.unit else None,
            )
            for r in self.rules
        ]
        parts = [
            f"(?i:{r.pattern})" if r.ignore_case else f"(?:{r.pattern})"
            for r in self.rules
            if r.pattern
        ]
        self._any_pattern = re.compile("|".join(parts)) if parts else None
        # Literal substrings (lowercased) one of which any pattern match must contain;
        # None when some pattern has none, and the combined regex must always run.
        keywords: list[str] = []
        for r in self.rules:
            if r.pattern:
                lits = required_literals(r.pattern)
                if lits is None:
                    keywords = []
                    break
                keywords += [lit.lower() for lit in lits]
        self._keywords = tuple(dict.fromkeys(keywords)) if keywords else None
        self._unpatterned = [c for c in self._compiled if c.pattern is None]
        self._by_name = {r.name: r for r in self.rules}
        self._last_pass = OrderedDict()
        self._bursts = OrderedDict()

    def rule(self, name: str | None) -> Rule | None:
        return self._by_name.get(name) if name else None

    def check(self, event: Event) -> Match | None:
        """The match that makes this event a candidate, or None to drop it."""
        msg = event.message
        if self._any_pattern is not None and (
            self._keywords is None or _contains_any(msg.lower(), self._keywords)
        ) and self._any_pattern.search(msg):
            candidates = self._compiled
        elif self._unpatterned:
            candidates = self._unpatterned
        else:
            return None
        for c in candidates:
            if self._matches(c, event):
                m = self._admit(c.rule, event)
                if m is not None or c.rule.count == 1:
                    return m
                # A burst rule still counting: the line counted towards its burst, and a
                # later rule may still name it on its own (a lone failed login is no
                # burst, yet it is a failure in an error's words).
        return None

    def _matches(self, c: _Compiled, event: Event) -> bool:
        r = c.rule
        if c.pattern is not None and not c.pattern.search(event.message):
            return False
        if r.source is not None and event.source != r.source:
            return False
        if r.max_priority is not None and event.priority > r.max_priority:
            return False
        if c.unit is not None and not (event.unit and c.unit.search(event.unit)):
            return False
        if r.metric is not None:
            value = event.fields.get("value")
            if event.fields.get("metric") != r.metric or not isinstance(value, int | float):
                return False
            if isinstance(value, bool) or not value > (r.above or 0.0):
                return False
        return True

    def _admit(self, rule: Rule, event: Event) -> Match | None:
        fp = fingerprint(event)
        now = event.timestamp
        if rule.count > 1:
            group = {"host": event.host, "unit": event.unit or "", "fingerprint": fp}[rule.group]
            bkey = (rule.name, f"{event.host}|{group}")
            times = self._bursts.get(bkey)
            if times is None:
                times = self._bursts[bkey] = deque(maxlen=rule.count)
                self._bound(self._bursts)
            times.append(now)
            if len(times) < rule.count or now - times[0] > rule.window:
                return None
            times.clear()
            # A burst is one finding per window, whatever the individual lines said.
            dkey = bkey
        else:
            dkey = (rule.name, f"{event.host}|{fp}")
        last = self._last_pass.get(dkey)
        if last is not None and 0 <= now - last < self.debounce:
            return None
        self._last_pass[dkey] = now
        self._last_pass.move_to_end(dkey)
        self._bound(self._last_pass)
        return Match(rule, fp)

    def _bound(self, table: OrderedDict[Any, Any]) -> None:
        while len(table) > self.max_keys:
            table.popitem(last=False)

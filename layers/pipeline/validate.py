"""Refuse degenerate layer output, as the schema refuses invalid JSON.

Constrained decoding guarantees the *shape* of an answer, not that it says anything: a
small model copies the prompt's own words, writes a summary about something the log
never mentioned, repeats one finding three times or fills a required field with "0".
Such output must not reach the admin as if it were a judgement. Each check here names
what it refused; the stages retry (``pipeline.layer_retries``) and then fall back to
the rule's verdict or mark the incident ``unreviewed`` — exactly as for invalid JSON.

Checks (deterministic, no model):

- ``copies_prompt``: the text is made of the prompt's fixed text (instructions, field
  descriptions, the action catalog) — word trigrams shared with it and not with the
  evidence, or, for one or two words, a run of the fixed text that the evidence lacks.
- ``no_evidence``: no informative word (a content word that is not an answer label)
  in common with the evidence: the event(s) the layer was shown — their messages and
  rule names, not hosts or units (where, not what) nor the labels the prompt gave them;
  a review's findings may also rest on the metrics it was shown.
- ``no_content``: fewer informative words than the field needs ("0", "yes", "", "ok").
- ``repeats_itself``: one phrase of four words three times or more in one text.
- ``repeated_finding``: the same finding (case and punctuation aside) twice.
- ``catalog``: a proposal's params that its catalog entry's strict schema refuses
  (a missing unit, a unit name without its suffix, an unknown parameter).
- ``evidence_cited``: a decision of the evidence loop citing a step that does not exist
  or did not run (the schema allows only those; this holds for a layer ignoring it).
- ``category_contradicts_rule``: a specific rule matched (``oom_kill`` → memory) and the
  layer's category is another one that no word of the event supports.

Words are compared loosely: lower case, split on anything not a letter or digit, and
a word of four letters or more matches its inflections (``kill``, ``killed``,
``kills``; ``fail``, ``failure``), nothing longer (not ``file`` and ``filesystem``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from layers.actions import catalog
from layers.client import StructuredOutputError
from layers.events import Decision, Review, TriggerVerdict

_WORD = re.compile(r"[a-z0-9]+")

# Function words: never evidence of anything.
STOPWORDS = frozenset("""
a an the of to in on at by for with from into onto as and or but nor if then than so
is are was were be been being am do does did has have had having it its this that these
those there their they them he she his her we our you your i me my not no yes any all
some such only very also just more most less much many can could will would shall should
may might must about after before over under again per via what which who whom whose
when where why how here while each every both either neither other same own too
""".split())

# Words of the answer vocabulary (levels, categories, review statuses) and fillers: a
# text made only of these says nothing about the event, and sharing them with the
# evidence proves nothing.
LABELS = frozenset("""
ok info warning critical normal degraded memory service security disk hardware kernel
network performance crash error other anomaly anomalies event events log logs line
lines incident incidents issue issues problem problems true false none null nothing
unknown fine good bad na
""".split())

# Words that support a category the rule did not give (the event's own evidence).
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "memory": ("memory", "oom", "swap", "rss", "alloc", "ram", "page", "cgroup"),
    "disk": ("disk", "space", "filesystem", "quota", "inode", "mount", "partition",
             "volume", "ext4", "xfs", "btrfs", "zfs", "fsck"),
    "hardware": ("hardware", "ata", "sda", "sdb", "nvme", "smart", "sector", "medium",
                 "pci", "mce", "temperature", "thermal", "fan", "firmware", "usb"),
    "kernel": ("kernel", "panic", "lockup", "oops", "bug", "hung", "blocked", "rcu",
               "taint", "module"),
    "network": ("network", "dns", "resolv", "connection", "connect", "eth", "interface",
                "link", "route", "unreachable", "refused", "socket", "tcp", "udp",
                "host", "timeout", "timed"),
    "security": ("password", "auth", "authentication", "ssh", "sshd", "invalid", "denied",
                 "permission", "sudo", "pam", "certificate", "tls", "ssl", "login",
                 "user", "attack", "firewall", "selinux", "apparmor"),
    "service": ("service", "unit", "systemd", "start", "started", "restart", "stopped",
                "exited", "failed", "activation", "timer", "socket", "daemon"),
    "performance": ("load", "slow", "latency", "cpu", "throttl", "pressure", "stall",
                    "delay", "took"),
    "crash": ("segfault", "crash", "core", "dumped", "signal", "abort", "fault", "trap",
              "killed", "sigsegv", "sigabrt", "panic"),
}
# Rule categories too broad to contradict, and model categories too vague to contradict
# ("alert": an Alertmanager alert's rule says where it came from, not what it is about).
GENERIC_CATEGORIES = frozenset({"error", "other", "alert"})

MIN_STEM = 4  # shortest word that matches its inflections
INFLECTIONS = ("s", "es", "ed", "ing", "er", "ers", "ure", "ures", "ion", "ions")


@dataclass(frozen=True)
class Refusal:
    """Why one field of a layer's answer was refused."""

    field: str
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.field}: {self.detail} ({self.check})"


class RefusedOutput(StructuredOutputError):
    """Layer output that is valid JSON but degenerate (see the module docstring)."""

    def __init__(self, layer: str, refusal: Refusal, raw: str = "") -> None:
        super().__init__(f"layer {layer}: output refused: {refusal}", raw=raw)
        self.refusal = refusal


# -- words -------------------------------------------------------------------------


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def content_words(text: str) -> list[str]:
    """Words that can carry meaning: three characters or more, not a function word,
    not a bare number."""
    return [w for w in tokens(text) if len(w) >= 3 and w not in STOPWORDS and not w.isdigit()]


def informative_words(text: str) -> list[str]:
    """Content words that are not answer labels or fillers."""
    return [w for w in content_words(text) if w not in LABELS]


class Vocabulary:
    """A set of words with loose matching: a word of ``MIN_STEM``+ letters matches itself
    plus an inflection (``kill``/``killed``/``kills``, ``stop``/``stopped``,
    ``fail``/``failure``), either way round — and nothing else (not ``file``/``filesystem``,
    not ``system``/``systemd``)."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = set(words)
        self.stems = {stem for w in self.words for stem in _stems(w)}

    def __contains__(self, word: object) -> bool:
        if not isinstance(word, str):
            return False
        if word in self.words or word in self.stems:
            return True  # the same word, or an evidence word is this one inflected
        return any(stem in self.words for stem in _stems(word))


def _stems(word: str) -> list[str]:
    """``word`` without an inflection, where what remains has ``MIN_STEM`` letters."""
    out = []
    for suffix in INFLECTIONS:
        if word.endswith(suffix) and len(word) - len(suffix) >= MIN_STEM:
            stem = word[: -len(suffix)]
            out.append(stem)
            if len(stem) > MIN_STEM and stem[-1] == stem[-2]:
                out.append(stem[:-1])  # stopped → stopp → stop
    return out


def _grams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _contains_run(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return any(list(haystack[i : i + n]) == list(needle) for i in range(len(haystack) - n + 1))


# -- what a text is checked against ----------------------------------------------------


FENCED = re.compile(r"<<<(\w+) ([0-9a-f]+)>>>\n.*?<<<END \2>>>", re.S)


def fixed_text(messages: Sequence[dict[str, str]], schema: type[BaseModel] | None = None) -> str:
    """The prompt without its fenced data — what the prompt says, not what it shows —
    and the field descriptions of the answer's schema."""
    text = "\n".join(str(m.get("content") or "") for m in messages)
    parts = [FENCED.sub(" \n ", text)]
    if schema is not None:
        parts += _descriptions(schema.model_json_schema())
    return " \n ".join(parts)


def _descriptions(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["description"]] if isinstance(node.get("description"), str) else []
        for v in node.values():
            out += _descriptions(v)
        return out
    if isinstance(node, list):
        return [d for v in node for d in _descriptions(v)]
    return []


class Grounds:
    """The prompt's fixed text and the evidence a layer's text is checked against:
    ``evidence`` (the events themselves: what a summary or diagnosis must be about) and
    ``context`` (e.g. the metrics the review was shown: enough for a finding, not for a
    summary — "root disk 45% used" must not ground "root filesystem 95% full" as what
    happened to an OOM-killed process)."""

    def __init__(self, fixed: str, evidence: Iterable[str], context: Iterable[str] = ()) -> None:
        self.fixed_tokens = tokens(fixed)
        self.fixed_grams = _grams(self.fixed_tokens, 3)
        ev = " \n ".join(evidence)
        wide = ev + " \n " + " \n ".join(context)
        self.evidence_tokens = tokens(wide)
        self.evidence_grams = _grams(self.evidence_tokens, 3)
        self.evidence = Vocabulary(content_words(ev))
        self.context = Vocabulary(content_words(wide))

    @classmethod
    def of(cls, messages: Sequence[dict[str, str]], evidence: Iterable[str],
           schema: type[BaseModel] | None = None, context: Iterable[str] = ()) -> Grounds:
        return cls(fixed_text(messages, schema), evidence, context)


# -- the checks --------------------------------------------------------------------------


def copies_prompt(text: str, g: Grounds) -> str | None:
    words = tokens(text)
    if not words:
        return None
    if len(words) < 3:
        if _contains_run(g.fixed_tokens, words) and not _contains_run(g.evidence_tokens, words):
            return f"{clip(text)!r} is the prompt's wording"
        return None
    grams = _grams(words, 3)
    copied = {x for x in grams if x in g.fixed_grams and x not in g.evidence_grams}
    if len(copied) * 2 >= len(grams):
        return f"{clip(text)!r} copies the prompt's text"
    return None


def no_evidence(text: str, g: Grounds, *, context: bool = False) -> str | None:
    # An informative word must be shared: labels prove nothing ("service" is in most unit
    # names, so "service_name" would otherwise pass for any failed unit). The evidence
    # holds only the events' own words, never the labels the prompt gave them.
    words = informative_words(text)
    vocabulary = g.context if context else g.evidence
    if words and not any(w in vocabulary for w in words):
        return f"{clip(text)!r} shares no word with the event"
    return None


def no_content(text: str, at_least: int) -> str | None:
    if len(set(informative_words(text))) < at_least:
        return f"{clip(text)!r} has no content"
    return None


def repeats_itself(text: str) -> str | None:
    words = tokens(text)
    counts = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    if counts and max(counts.values()) >= 3:
        phrase = " ".join(counts.most_common(1)[0][0])
        return f"repeats {phrase!r} {max(counts.values())} times"
    return None


def normalise(text: str) -> str:
    return " ".join(tokens(text))


def repeated_item(items: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for item in items:
        key = normalise(item)
        if key in seen:
            return f"{clip(item)!r} more than once"
        seen.add(key)
    return None


def category_contradicts(category: str, rule_category: str | None, evidence: str) -> str | None:
    """A category the matching rule does not give, with no word of the event for it."""
    if (rule_category is None or rule_category in GENERIC_CATEGORIES
            or category in GENERIC_CATEGORIES or category == rule_category):
        return None
    words = Vocabulary(tokens(evidence))
    if any(w in words for w in CATEGORY_WORDS.get(category, ())):
        return None
    return f"{category!r} where the rule says {rule_category!r} and the event does not"


def clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def check_text(field: str, text: str, g: Grounds, *, words: int = 1,
               grounded: bool = True, context: bool = False) -> Refusal | None:
    """The checks every free-text field gets: not the prompt, not a loop, some content,
    and (``grounded``) a word of the evidence (``context``: or of the context)."""
    if (why := copies_prompt(text, g)) is not None:
        return Refusal(field, "copies_prompt", why)
    if (why := repeats_itself(text)) is not None:
        return Refusal(field, "repeats_itself", why)
    if (why := no_content(text, words)) is not None:
        return Refusal(field, "no_content", why)
    if grounded and (why := no_evidence(text, g, context=context)) is not None:
        return Refusal(field, "no_evidence", why)
    return None


# -- per layer ---------------------------------------------------------------------------


def trigger_verdict(v: TriggerVerdict, g: Grounds, rule_category: str | None,
                    evidence: str) -> Refusal | None:
    """One event's verdict; ``g`` holds that event alone as its evidence."""
    if (r := check_text("summary", v.summary, g)) is not None:
        return r
    if (why := category_contradicts(v.category, rule_category, evidence)) is not None:
        return Refusal("category", "category_contradicts_rule", why)
    return None


def review(out: Review | BaseModel, g: Grounds) -> Refusal | None:
    r = out if isinstance(out, Review) else Review.model_validate(out.model_dump())
    if (ref := check_text("summary", r.summary, g)) is not None:
        return ref
    if (why := repeated_item(r.findings)) is not None:
        return Refusal("findings", "repeated_finding", why)
    for i, finding in enumerate(r.findings):
        if (ref := check_text(f"findings[{i}]", finding, g, context=True)) is not None:
            return ref
    return check_text("reason", r.reason, g, grounded=False)


def proposal_params(d: Decision) -> Refusal | None:
    """Each proposal's params against its catalog entry's strict schema (the action name
    itself is constrained by the decoding schema): a proposal the action stage would
    refuse as malformed is refused here, so the layer is asked again instead."""
    for i, p in enumerate(d.proposals):
        try:
            catalog.validate_params(catalog.lookup(p.action), p.params)
        except catalog.Refusal as exc:
            return Refusal(f"proposals[{i}].params", "catalog", clip(exc.message, 120))
    return None


def decision(d: Decision, g: Grounds) -> Refusal | None:
    if (ref := proposal_params(d)) is not None:
        return ref
    if (ref := check_text("diagnosis", d.diagnosis, g, words=2)) is not None:
        return ref
    if (ref := check_text("rollback_plan", d.rollback_plan, g, words=2,
                          grounded=False)) is not None:
        return ref
    for i, p in enumerate(d.proposals):
        if (ref := check_text(f"proposals[{i}].rationale", p.rationale, g,
                              grounded=False)) is not None:
            return ref
    return None


def cited_evidence(d: Decision, steps: Sequence[int]) -> Refusal | None:
    """A decision of the evidence loop cites only evidence steps that exist and ran."""
    missing = sorted(set(d.evidence) - set(steps))
    if missing:
        return Refusal("evidence", "evidence_cited",
                       f"cites step {', '.join(map(str, missing))}, which "
                       f"{'does' if len(missing) == 1 else 'do'} not exist or did not run")
    return None

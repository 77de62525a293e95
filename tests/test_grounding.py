"""Grounded output (issue 16): what the admin reads first is facts, and degenerate layer
output is refused like invalid JSON.

Three parts:

- each validation rule on its own (layers/pipeline/validate.py), no model;
- the stages against a fake *adversarial* layer — an OpenAI-shaped server answering
  exactly the degenerate output the issue reports (the copied example, three identical
  findings, a diagnosis "0" with rollback plan "yes"), which a real model cannot be made
  to produce on demand; the test names say ``fake_upstream_adversarial``;
- the real default model (gemma3 270m, a base model that copies examples) on a real
  llama-server: the OOM line of the issue, the old example-carrying prompt, a review
  and a decision, and a replay of failure lines.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from layers.client import LayerClients
from layers.config import Settings
from layers.events import Decision, Event, Incident, Review, TriggerVerdict, Verdict, incident_title
from layers.pipeline import prompts, validate
from layers.pipeline.stages import (
    IncidentWorker,
    catalog_summaries,
    incident_evidence,
    metrics_snapshot,
)
from layers.pipeline.trigger import TriggerStage, VerdictBus
from layers.prefilter import Prefilter, load_rules
from layers.store import Store
from tests.fake_upstream import FakeUpstream
from tests.support import free_port, llama_server

OOM = Event(host="db1", unit="postgresql.service", priority=3,
            message="Out of memory: Killed process 31337 (postgres) total-vm:8123456kB, "
                    "anon-rss:6012345kB, file-rss:0kB")
# The example the trigger prompt carried until issue 16, and what the model made of it.
OLD_EXAMPLE = '{"v":[["warning","disk","root filesystem 95% full"],["ok","service","session opened"]]}'
OLD_SUMMARIES = ("root filesystem 95% full", "session opened")


def trigger_grounds(event: Event, rule: str | None, nonce: str = "00ff00ff00ff00ff",
                    messages: list[dict[str, str]] | None = None) -> validate.Grounds:
    msgs = messages or prompts.trigger_messages([event], [rule], nonce)
    return validate.Grounds.of(msgs, [prompts.event_evidence(event, rule)],
                               prompts.trigger_schema(1))


def verdict(summary: str, category: str = "memory", level: str = "critical") -> TriggerVerdict:
    return TriggerVerdict(i=0, anomaly=level != "ok", severity="info" if level == "ok" else level,
                          category=category, summary=summary)


def check_oom(v: TriggerVerdict, grounds: validate.Grounds | None = None) -> str | None:
    r = validate.trigger_verdict(v, grounds or trigger_grounds(OOM, "oom_kill"), "memory",
                                 prompts.event_evidence(OOM, "oom_kill"))
    return r.check if r else None


# -- the rules, one by one ----------------------------------------------------------------


def test_summary_copied_from_the_prompt_is_refused() -> None:
    # The field descriptions and instructions of today's prompt...
    for copied in ("naming what the event's message names", "in its own words",
                   "the deterministic filter that flagged the event", "critical"):
        assert check_oom(verdict(copied)) == "copies_prompt", copied
    # ...and the old prompt's example, when a prompt carries it (a user's own prompt may).
    old = prompts.trigger_messages([OOM], ["oom_kill"], "00ff00ff00ff00ff")
    old[0]["content"] += f" Example answer for two events: {OLD_EXAMPLE}."
    g = trigger_grounds(OOM, "oom_kill", messages=old)
    assert check_oom(verdict("session opened", "service"), g) == "copies_prompt"
    assert check_oom(verdict("root filesystem 95% full", "disk"), g) == "copies_prompt"


def test_words_of_the_event_are_not_prompt_text_even_inside_the_prompt() -> None:
    """The fenced log data is evidence, not the prompt's fixed text: quoting it is fine."""
    assert check_oom(verdict("Out of memory: Killed process")) is None
    assert check_oom(verdict("postgres killed by OOM killer")) is None
    assert check_oom(verdict("postgres out of memory")) is None
    assert check_oom(verdict("postgresql killed")) is None
    assert check_oom(verdict("kills postgres")) is None  # "Killed", inflected
    # Loose matching is inflection only: "system" in a store path grounds no "systemd".
    rebuild = Event(host="h", unit="nixos-rebuild.service", priority=3,
                    message="error: builder for '/nix/store/abc-system.drv' failed with exit code 1")
    g = trigger_grounds(rebuild, "priority_error")
    r = validate.trigger_verdict(verdict("systemd-resolved", "crash"), g, "error",
                                 prompts.event_evidence(rebuild, "priority_error"))
    assert r is not None and r.check == "no_evidence"  # a real answer of the default model


def test_summary_that_shares_nothing_with_the_event_is_refused() -> None:
    # What the small model wrote for the OOM kill in the issue, and its other habits.
    for unrelated in ("root filesystem 95% full", "session opened", "e-mail", "nethink", "host",
                      "memory exhausted",  # labels ("memory") prove nothing
                      "db1", "postgresql.service"):  # where, not what: the host, the unit

        assert check_oom(verdict(unrelated, "memory")) == "no_evidence", unrelated
    # A unit's type is no evidence either: what the model wrote for failed units.
    failed = Event(host="h", unit="backup.service", priority=3, message="Failed to start Nightly backup.")
    g = trigger_grounds(failed, "unit_failed")
    r = validate.trigger_verdict(verdict("service_name", "service"), g, "service",
                                 prompts.event_evidence(failed, "unit_failed"))
    assert r is not None and r.check == "no_evidence"


def test_summary_of_labels_only_has_no_content() -> None:
    other = Event(host="h", unit="x.service", message="EXT4-fs error (device sda1): bad block")
    g = trigger_grounds(other, "io_error")
    r = validate.trigger_verdict(verdict("error", "hardware"), g, "hardware",
                                 prompts.event_evidence(other, "io_error"))
    assert r is not None and r.check in ("copies_prompt", "no_content")
    assert validate.no_content("warning: critical error", 1) is not None
    assert validate.no_content("ext4 error on sda1", 1) is None


def test_category_that_contradicts_the_rule_without_evidence_is_refused() -> None:
    assert check_oom(verdict("postgres killed", "disk")) == "category_contradicts_rule"
    assert check_oom(verdict("postgres killed", "network")) == "category_contradicts_rule"
    # A word of the event supports the other category ("Killed" → crash)...
    assert check_oom(verdict("postgres killed", "crash")) is None
    # ...the rule's own category and the vague ones never contradict...
    assert check_oom(verdict("postgres killed", "memory")) is None
    assert check_oom(verdict("postgres killed", "other")) is None
    # ...and a broad rule (priority_error → "error") does not bind the category.
    assert validate.category_contradicts("disk", "error", "write failed") is None


def test_text_that_repeats_itself_is_refused() -> None:
    looped = "The machine is in a critical state. " * 6  # the real review model, verbatim
    assert validate.repeats_itself(looped) is not None
    assert validate.repeats_itself("postgres was killed; the database restarted") is None


def test_repeated_findings_are_refused() -> None:
    inc, v = incident_and_verdict()
    g = review_grounds(inc, v)
    same = ["root filesystem 95% full"] * 3  # the review of the issue
    r = validate.review(review(findings=same), g)
    assert r is not None and r.check == "repeated_finding"
    # Case and punctuation do not make a finding new.
    r = validate.review(review(findings=["Postgres killed.", "postgres killed"]), g)
    assert r is not None and r.check == "repeated_finding"
    assert validate.review(review(findings=["Killed process 31337 (postgres)",
                                            "memory 62% used"]), g) is None
    r = validate.review(review(findings=["Killed process 31337 (postgres)", "nginx restarted"]), g)
    assert r is not None and (r.field, r.check) == ("findings[1]", "no_evidence")


def test_review_summary_that_copies_the_prompt_or_is_not_about_the_incident_is_refused() -> None:
    inc, v = incident_and_verdict()
    g = review_grounds(inc, v)
    for summary, check in (("The machine is in a critical state. " * 6, "repeats_itself"),
                           ("normal", "copies_prompt"),
                           ("judge the machine's state", "copies_prompt"),
                           ("root filesystem 95% full", "no_evidence")):
        r = validate.review(review(summary=summary), g)
        assert r is not None and (r.field, r.check) == ("summary", check), (summary, r)


def test_diagnosis_or_rollback_plan_without_content_is_refused() -> None:
    inc, v = incident_and_verdict()
    g = meta_grounds(inc, v)
    for d, where in ((decision(diagnosis="0"), "diagnosis"),
                     (decision(diagnosis=""), "diagnosis"),
                     (decision(diagnosis="postgres"), "diagnosis"),  # too short
                     (decision(rollback_plan="yes"), "rollback_plan"),
                     (decision(rollback_plan=""), "rollback_plan"),
                     (decision(rollback_plan="how to undo the proposed actions"), "rollback_plan"),
                     (decision(rationale="1"), "proposals[0].rationale")):
        r = validate.decision(d, g)
        assert r is not None and r.field == where, (d, r)
    assert validate.decision(decision(), g) is None


def test_proposal_params_the_catalog_refuses_are_refused() -> None:
    inc, v = incident_and_verdict()
    g = meta_grounds(inc, v)
    for params, detail in (({}, "unit"), ({"unit": "postgresql"}, "not a systemd unit name"),
                           ({"unit": "postgresql.service", "force": True}, "unknown parameter")):
        d = decision()
        d.proposals[0].params = params
        r = validate.decision(d, g)
        assert r is not None and (r.field, r.check) == ("proposals[0].params", "catalog"), r
        assert detail in r.detail, r


def test_incident_title_is_the_rule_and_the_event_words() -> None:
    title = incident_title("memory", "oom_kill", "postgresql.service",
                           "Out of memory: Killed process 31337 (postgres)\n  more")
    assert title == ("memory: oom_kill — postgresql.service: Out of memory: Killed process "
                     "31337 (postgres) more")
    assert len(incident_title("disk", "disk_full", None, "x" * 500)) == 200


# -- helpers for review/meta grounds ----------------------------------------------------------


METRICS = ["host db1: load 0.50 0.40 0.30 on 2 CPUs", "memory 62% used of 23.4 GiB",
           "root disk 45% used"]


def incident_and_verdict() -> tuple[Incident, Verdict]:
    now = time.time()
    inc = Incident(id="inc_x", key="db1|unit:postgresql.service", host="db1",
                   unit="postgresql.service", fingerprint="fp", rule="oom_kill",
                   category="memory",
                   title=incident_title("memory", "oom_kill", "postgresql.service", OOM.message),
                   status="open", stage="review", severity="critical", verdict_count=1,
                   opened_at=now, updated_at=now)
    v = Verdict(seq=1, event_id="e", incident_id=inc.id, host="db1", unit="postgresql.service",
                fingerprint="fp", rule="oom_kill", anomaly=True, severity="critical",
                category="memory", summary="oom_kill (not classified)", message=OOM.message,
                unreviewed=True, created_at=now)
    return inc, v


def review_grounds(inc: Incident, v: Verdict) -> validate.Grounds:
    msgs = prompts.review_messages(inc, [v], [OOM], METRICS, "00ff00ff00ff00ff")
    return validate.Grounds.of(msgs, incident_evidence(inc, [v], [OOM]), prompts.ReviewOut,
                               context=METRICS)


def meta_grounds(inc: Incident, v: Verdict) -> validate.Grounds:
    catalog = catalog_summaries()
    msgs = prompts.meta_messages(inc, None, [v], [], catalog, "00ff00ff00ff00ff")
    return validate.Grounds.of(msgs, incident_evidence(inc, [v]),
                               prompts.decision_schema(list(catalog)))


def review(**kw: Any) -> Review:
    data: dict[str, Any] = {"status": "critical", "summary": "postgres was killed by the OOM killer",
                            "findings": ["Killed process 31337 (postgres)"], "escalate": True,
                            "reason": "the database is down"}
    return Review.model_validate({**data, **kw})


def decision(diagnosis: str = "postgres was killed by the kernel's OOM killer",
             rollback_plan: str = "stop postgresql.service again if it misbehaves",
             rationale: str = "bring the database back") -> Decision:
    return Decision.model_validate({
        "diagnosis": diagnosis, "rollback_plan": rollback_plan,
        "proposals": [{"action": "restart_unit", "params": {"unit": "postgresql.service"},
                       "rationale": rationale}]})


# -- the stages against a fake adversarial layer ----------------------------------------------


FENCE = re.compile(r"<<<EVENTS ([0-9a-f]+)>>>")
Answer = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class AdversarialLayer(FakeUpstream):
    """A layer that answers valid, schema-conforming JSON with degenerate content, chosen
    per schema name (``TriggerBatch``, ``ReviewOut``, ``MetaDecision``; a step of the
    meta stage's evidence loop, ``EvidenceStep``, decides at once with the
    ``MetaDecision`` answer unless it has an answer of its own)."""

    answers: dict[str, Answer] = field(default_factory=dict)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def _answer(self, method: str, path: str, body: bytes,
                      writer: asyncio.StreamWriter) -> None:
        if path.endswith("/health"):
            await super()._answer(method, path, body, writer)
            return
        self.requests += 1
        request = json.loads(body)
        self.bodies.append(request)
        name = request["response_format"]["json_schema"]["name"]
        if name == "EvidenceStep" and name not in self.answers:
            content = json.dumps({"decide": self.answers["MetaDecision"](request)})
        else:
            content = json.dumps(self.answers[name](request))
        payload = json.dumps({
            "id": "chatcmpl-adv", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
        }).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await writer.drain()


def n_events(request: dict[str, Any]) -> int:
    user = request["messages"][-1]["content"]
    m = FENCE.search(user)
    return len(prompts.unfence(user, "EVENTS", m.group(1))) if m else 0


def copies_old_example(request: dict[str, Any]) -> dict[str, Any]:
    """What gemma3 270m answered to the example-carrying prompt, for every event."""
    return {"v": [["warning", "disk", "root filesystem 95% full"]] * n_events(request)}


def parrots_the_fields(request: dict[str, Any]) -> dict[str, Any]:
    return {"v": [["critical", "memory", "naming what the event's message names"]]
            * n_events(request)}


def grounded_verdicts(request: dict[str, Any]) -> dict[str, Any]:
    return {"v": [["critical", "memory", "postgres killed by OOM killer"]] * n_events(request)}


def good_review(request: dict[str, Any]) -> dict[str, Any]:
    return review().model_dump()


def three_identical_findings(request: dict[str, Any]) -> dict[str, Any]:
    return review(findings=["root filesystem 95% full"] * 3).model_dump()


def good_decision(request: dict[str, Any]) -> dict[str, Any]:
    return decision().model_dump()


def zero_and_yes(request: dict[str, Any]) -> dict[str, Any]:
    return {"diagnosis": "0", "proposals": [], "rollback_plan": "yes"}


@pytest.fixture
def adversary() -> Iterator[AdversarialLayer]:
    layer = AdversarialLayer("ok", free_port())
    layer.start()
    yield layer
    layer.stop()


def settings_for(tmp: Path, port: int, retries: int = 1) -> Settings:
    return Settings.model_validate({
        "state_dir": str(tmp / "state"), "memory": {"enabled": False},
        "layers": {n: {"port": port, "managed": False, "parallel": 2}
                   for n in ("trigger", "review", "meta")},
        "pipeline": {"batch_size": 8, "trigger_concurrency": 1, "layer_retries": retries,
                     "escalate_severity": "warning"},
    })


async def trigger_once(settings: Settings, store: Store, events: list[Event]) -> None:
    """The trigger stage over ``events`` with layer clients of its own."""
    clients = LayerClients(settings)
    try:
        await run_trigger(settings, store, clients, events)
    finally:
        await clients.aclose()


async def run_trigger(settings: Settings, store: Store, clients: LayerClients,
                      events: list[Event]) -> None:
    stage = TriggerStage(settings, store, clients["trigger"],
                         Prefilter(load_rules(), debounce=0), VerdictBus())
    await store.events.add(events)
    while await stage.step():
        pass


OOM_TITLE = ("memory: oom_kill — postgresql.service: Out of memory: Killed process 31337 "
             "(postgres) total-vm:8123456kB, anon-rss:6012345kB, file-rss:0kB")


async def test_copied_example_verdict_is_refused_and_title_comes_from_the_rule_fake_upstream_adversarial(
    tmp_path: Path, store: Store, adversary: AdversarialLayer
) -> None:
    adversary.answers["TriggerBatch"] = copies_old_example
    settings = settings_for(tmp_path, adversary.port, retries=1)
    await trigger_once(settings, store, [OOM])
    assert adversary.requests == 2  # refused, asked once more (layer_retries = 1), refused
    assert adversary.bodies[1]["temperature"] > 0  # the retry is a new sample, not a replay
    (v,) = await store.verdicts.after(0)
    # Never shown as fact: the rule's verdict, flagged, saying why.
    assert v.unreviewed and v.summary_by == "rule" and v.anomaly and v.severity == "critical"
    assert v.category == "memory" and "refused" in v.summary
    assert "root filesystem" not in v.summary.split("refused")[0]
    (inc,) = await store.incidents.list()
    assert inc.title == OOM_TITLE
    assert (inc.category, inc.rule, inc.unit) == ("memory", "oom_kill", "postgresql.service")


async def test_verdict_copying_the_prompt_fields_is_refused_fake_upstream_adversarial(
    tmp_path: Path, store: Store, adversary: AdversarialLayer
) -> None:
    adversary.answers["TriggerBatch"] = parrots_the_fields
    settings = settings_for(tmp_path, adversary.port, retries=0)
    await trigger_once(settings, store, [OOM])
    (v,) = await store.verdicts.after(0)
    assert v.unreviewed and "copies_prompt" in v.summary


async def test_grounded_verdict_is_kept_as_the_model_view_title_stays_facts_fake_upstream_adversarial(
    tmp_path: Path, store: Store, adversary: AdversarialLayer
) -> None:
    adversary.answers["TriggerBatch"] = grounded_verdicts
    settings = settings_for(tmp_path, adversary.port)
    await trigger_once(settings, store, [OOM])
    (v,) = await store.verdicts.after(0)
    assert not v.unreviewed and v.summary_by == "model"
    assert v.summary == "postgres killed by OOM killer"
    assert v.model_dump()["summary_by"] == "model"  # in the API and the stream
    (inc,) = await store.incidents.list()
    assert inc.title == OOM_TITLE  # the model's words never become the title
    assert inc.assessment is None  # nothing reviewed yet


async def test_review_with_three_identical_findings_is_unreviewed_fake_upstream_adversarial(
    tmp_path: Path, store: Store, adversary: AdversarialLayer
) -> None:
    adversary.answers.update(TriggerBatch=grounded_verdicts, ReviewOut=three_identical_findings)
    settings = settings_for(tmp_path, adversary.port, retries=1)
    settings.pipeline.escalate_severity = "never"  # the review's call alone
    clients = LayerClients(settings)
    try:
        await run_trigger(settings, store, clients, [OOM])
        before = adversary.requests
        assert await IncidentWorker(settings, store, clients).step()
        assert adversary.requests - before == 2  # first try + one retry, both refused
    finally:
        await clients.aclose()
    (inc,) = await store.incidents.list()
    assert inc.status == "unreviewed" and inc.review is None and inc.assessment is None
    detail = await store.incidents.get(inc.id)
    assert detail is not None
    (entry,) = [t for t in detail.timeline if t.kind == "unreviewed"]
    assert entry.detail["stage"] == "review" and "repeated_finding" in entry.detail["error"]


async def test_critical_incident_with_a_refused_review_is_still_diagnosed_fake_upstream_adversarial(
    tmp_path: Path, store: Store, adversary: AdversarialLayer
) -> None:
    """The severity floor holds when the review layer fails: an OOM kill (critical) whose
    review is refused reaches the meta layer, its review absent and the refusal kept."""
    adversary.answers.update(TriggerBatch=grounded_verdicts, ReviewOut=three_identical_findings,
                             MetaDecision=good_decision)
    settings = settings_for(tmp_path, adversary.port, retries=1)
    assert settings.pipeline.escalate_severity == "warning"
    clients = LayerClients(settings)
    try:
        await run_trigger(settings, store, clients, [OOM])
        worker = IncidentWorker(settings, store, clients)
        assert await worker.step()  # review refused twice; the floor escalates
        (inc,) = await store.incidents.list()
        assert inc.status == "escalated" and inc.review is None and inc.assessment is None
        assert await worker.step()  # meta
    finally:
        await clients.aclose()
    detail = await store.incidents.get(inc.id)
    assert detail is not None and detail.decision is not None
    (entry,) = [t for t in detail.timeline if t.kind == "unreviewed"]
    assert entry.detail["stage"] == "review" and entry.detail["escalated"] is True
    assert "repeated_finding" in entry.detail["error"]


async def test_decision_with_diagnosis_0_and_rollback_yes_is_unreviewed_fake_upstream_adversarial(
    tmp_path: Path, store: Store, adversary: AdversarialLayer
) -> None:
    adversary.answers.update(TriggerBatch=grounded_verdicts, ReviewOut=good_review,
                             MetaDecision=zero_and_yes)
    settings = settings_for(tmp_path, adversary.port, retries=1)
    clients = LayerClients(settings)
    try:
        await run_trigger(settings, store, clients, [OOM])
        worker = IncidentWorker(settings, store, clients)
        assert await worker.step()  # review: accepted, escalated
        (inc,) = await store.incidents.list()
        assert inc.status == "escalated" and inc.review is not None
        assert inc.assessment is not None and inc.assessment.by == "model"
        assert inc.assessment.review == review().summary
        assert await worker.step()  # meta: "0" / "yes", twice → unreviewed
    finally:
        await clients.aclose()
    detail = await store.incidents.get(inc.id)
    assert detail is not None and detail.status == "unreviewed" and detail.decision is None
    assert detail.proposals == []
    (entry,) = [t for t in detail.timeline if t.kind == "unreviewed"]
    assert entry.detail["stage"] == "meta" and "diagnosis" in entry.detail["error"]
    assert "no_content" in entry.detail["error"]


def example_or_parrot(request: dict[str, Any]) -> dict[str, Any]:
    """Half the events get the old example's copy, half the prompt's own field text."""
    return {"v": [["warning", "disk", "root filesystem 95% full"] if i % 2 else
                  ["critical", "memory", "naming what the event's message names"]
                  for i in range(n_events(request))]}


async def test_every_corpus_incident_is_titled_from_its_rule_and_event_fake_upstream_adversarial(
    tmp_path: Path, store: Store, adversary: AdversarialLayer
) -> None:
    """Targets of issue 16 over every line of the labelled corpus (layers/quality), with a
    trigger layer that answers the worst the default model did: 0 incident titles or
    categories that contradict the event, 0 verdicts whose summary copies prompt text."""
    from layers.quality import corpus

    adversary.answers["TriggerBatch"] = example_or_parrot
    settings = settings_for(tmp_path, adversary.port, retries=0)
    lines = corpus.lines()
    by_message = {line.event().message: line for line in lines}
    await trigger_once(settings, store, [line.event() for line in lines])
    verdicts = await store.verdicts.after(0, limit=10_000)
    assert len(verdicts) > 100
    rules = {r.name: r for r in load_rules()}
    kept = [v for v in verdicts if not v.unreviewed]
    # The prompt's own words never survive; the old example (no longer in the prompt)
    # survives only where it shares a word with the event (disk-full lines: "full").
    assert not any("naming what" in v.summary for v in kept)
    for v in kept:  # e.g. "root filesystem 95% full" on "Remounting filesystem read-only"
        assert_grounded(v, by_message[v.message].event(), real_model=False)
    assert len(kept) < len(verdicts) / 4
    incidents = await store.incidents.list(limit=10_000)
    assert len(incidents) > 20
    contradictions = []
    for inc in incidents:
        opening = (await store.verdicts.of_incident(inc.id, limit=10_000))[0]
        line = by_message[opening.message]
        assert inc.rule == opening.rule and inc.rule is not None
        assert inc.category == rules[inc.rule].category
        assert inc.title == incident_title(inc.category, inc.rule, inc.unit, opening.message)
        assert "root filesystem" not in inc.title
        if line.anomaly and inc.category not in (*line.categories, *validate.GENERIC_CATEGORIES):
            contradictions.append((inc.title, line.categories))
    assert contradictions == []
    print(f"\ncorpus: {len(lines)} lines, {len(verdicts)} verdicts ({len(kept)} kept), "
          f"{len(incidents)} incidents, all titled from rule and event, 0 contradictions")


# -- the real default model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_layer(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path,
               model_path: Path) -> Iterator[int]:
    port = free_port()
    log = tmp_path_factory.mktemp("grounding") / "layer.log"
    proc = llama_server(llama_server_bin, model_path, port, log, "--ctx-size", "4096").start()
    proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
    yield port
    proc.stop(signal.SIGKILL)


def real_settings(tmp: Path, port: int, **pipeline: Any) -> Settings:
    return Settings.model_validate({
        "state_dir": str(tmp / "state"), "memory": {"enabled": False},
        "layers": {n: {"port": port, "managed": False, "parallel": 2}
                   for n in ("trigger", "review", "meta")},
        "gateway": {"timeouts": {"first_byte": 900.0, "total": 900.0}},
        "pipeline": {"batch_size": 8, "trigger_concurrency": 1, "layer_retries": 1,
                     "escalate_severity": "warning", **pipeline},
    })


def assert_grounded(v: Verdict, event: Event, *, real_model: bool = True) -> None:
    """A stored verdict is the rule's (flagged) or a model summary that passes the checks
    (and, from the real model with today's prompt, never the old example's)."""
    if v.unreviewed:
        return
    msgs = prompts.trigger_messages([event], [v.rule], "00ff00ff00ff00ff")
    g = validate.Grounds.of(msgs, [prompts.event_evidence(event, v.rule)],
                            prompts.trigger_schema(1))
    assert validate.check_text("summary", v.summary, g) is None, v
    assert not real_model or v.summary not in OLD_SUMMARIES


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_real_model_oom_kill_gets_the_rules_title_not_the_example(
    tmp_path: Path, store: Store, real_layer: int
) -> None:
    settings = real_settings(tmp_path, real_layer)
    await trigger_once(settings, store, [OOM])
    (v,) = await store.verdicts.after(0)
    assert v.anomaly and v.severity == "critical"  # the rule's floor, whatever the model said
    assert_grounded(v, OOM)
    (inc,) = await store.incidents.list()
    assert inc.title == OOM_TITLE and inc.category == "memory" and inc.rule == "oom_kill"
    assert "root filesystem" not in inc.title


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_real_model_copies_an_example_and_the_copy_is_refused(real_layer: int,
                                                                    tmp_path: Path) -> None:
    """The premise of the issue, on the real model: given a prompt with an example answer,
    gemma3 270m copies it — and every copied verdict is refused."""
    settings = real_settings(tmp_path, real_layer)
    events = [OOM, Event(host="db1", unit="nginx.service", priority=3,
                         message="nginx: [emerg] bind() to 0.0.0.0:80 failed (98: Address "
                                 "already in use)")]
    rules = ["oom_kill", "priority_error"]
    nonce = prompts.new_nonce()
    msgs = prompts.trigger_messages(events, rules, nonce)
    msgs[0]["content"] += f" Example answer for two events: {OLD_EXAMPLE}."
    clients = LayerClients(settings)
    try:
        out = await clients["trigger"].chat_json(msgs, prompts.trigger_schema(2),
                                                 max_tokens=96, retries=0)
    finally:
        await clients.aclose()
    got = prompts.trigger_verdicts(out)
    assert any(v.summary in OLD_SUMMARIES for v in got), got  # the premise: it copies
    fixed = validate.fixed_text(msgs, prompts.trigger_schema(2))
    rule_category = {"oom_kill": "memory", "priority_error": "error"}
    for v, e, rule in zip(got, events, rules, strict=True):
        evidence = prompts.event_evidence(e, rule)
        refusal = validate.trigger_verdict(v, validate.Grounds(fixed, [evidence]),
                                           rule_category[rule], evidence)
        if v.summary in OLD_SUMMARIES:
            assert refusal is not None and refusal.check == "copies_prompt", (v, refusal)


@pytest.mark.slow
@pytest.mark.timeout(1500)
async def test_real_model_review_and_decision_are_valid_or_unreviewed(
    tmp_path: Path, store: Store, real_layer: int
) -> None:
    """Whatever the real review and meta layers write is either stored and passes the
    checks, or the incident is unreviewed with the refusal in its timeline."""
    settings = real_settings(tmp_path, real_layer, review_max_tokens=320, meta_max_tokens=400)
    clients = LayerClients(settings)
    try:
        await run_trigger(settings, store, clients, [OOM])
        worker = IncidentWorker(settings, store, clients)
        while await worker.step():
            pass
    finally:
        await clients.aclose()
    (inc,) = await store.incidents.list()
    detail = await store.incidents.get(inc.id)
    assert detail is not None and detail.title == OOM_TITLE
    verdicts = await store.verdicts.of_incident(inc.id)
    if detail.review is not None:
        msgs = prompts.review_messages(inc, verdicts, [OOM], METRICS, "00ff00ff00ff00ff")
        g = validate.Grounds.of(msgs, incident_evidence(inc, verdicts, [OOM]),
                                prompts.ReviewOut, context=metrics_snapshot())
        assert validate.review(detail.review, g) is None
        assert detail.assessment is not None and detail.assessment.by == "model"
    if detail.decision is not None:
        assert validate.decision(detail.decision, meta_grounds(inc, verdicts[0])) is None
    errors = [t.detail.get("error", "") for t in detail.timeline if t.kind == "unreviewed"]
    assert (detail.status == "unreviewed") == bool(errors)
    assert detail.status in ("reviewed", "escalated", "unreviewed")


# Failure lines of the classes a NixOS admin meets, each matched by a default rule.
REPLAY = [
    ("postgresql.service", 3, "Out of memory: Killed process 31337 (postgres) total-vm:812kB"),
    (None, 3, "java invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE), order=0"),
    ("nginx.service", 3, "open() \"/var/log/nginx/access.log\" failed (28: No space left on device)"),
    (None, 3, "EXT4-fs error (device nvme0n1p2): ext4_find_entry:1455: inode #2: comm ls"),
    (None, 3, "blk_update_request: I/O error, dev sda, sector 123456 op 0x0:(READ)"),
    (None, 2, "watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [kworker/1:2:123]"),
    (None, 4, "worker[2231]: segfault at 0 ip 00007f3a sp 00007ffd error 4 in libc.so.6"),
    ("demo.service", 4, "demo.service: Main process exited, code=exited, status=1/FAILURE"),
    ("demo.service", 4, "demo.service: Start request repeated too quickly."),
    ("backup.service", 3, "Failed to start Nightly backup."),
    ("acme-example.org.service", 3, "Failed to start Renew ACME certificate for example.org."),
    ("systemd-resolved.service", 3, "Failed to resolve host mirror.example.org: timeout"),
    ("nixos-rebuild.service", 3, "error: builder for '/nix/store/abc-system.drv' failed with exit code 1"),
    ("var-lib-data.mount", 3, "var-lib-data.mount: Mount process exited, code=exited, status=32/n/a"),
    ("chronyd.service", 3, "No suitable source for synchronisation; clock unsynchronised"),
    ("sshd.service", 2, "sshd[812]: fatal: Cannot bind any address."),
]


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_real_model_replay_no_copied_summary_every_title_from_facts(
    tmp_path: Path, store: Store, real_layer: int
) -> None:
    events = [Event(host="web1", unit=u, priority=p, message=m, timestamp=1_700_000_000 + i)
              for i, (u, p, m) in enumerate(REPLAY)]
    settings = real_settings(tmp_path, real_layer)
    await trigger_once(settings, store, events)
    verdicts = await store.verdicts.after(0, limit=1000)
    by_id = {e.id: e for e in events}
    assert len(verdicts) == len(events)  # every line is matched by a rule
    for v in verdicts:
        assert_grounded(v, by_id[v.event_id])
    incidents = await store.incidents.list(limit=1000)
    rules = {r.name: r for r in load_rules()}
    for inc in incidents:
        assert inc.rule is not None and inc.category == rules[inc.rule].category
        assert inc.title.startswith(f"{inc.category}: {inc.rule} — ")
        # The rest of the title is an event's own words.
        assert any(" ".join(e.message.split())[:60] in inc.title for e in events), inc.title
    refused = sum(v.unreviewed for v in verdicts)
    print(f"\nreplay of {len(events)} lines: {len(verdicts)} verdicts, {refused} refused or "
          f"rule-only, {len(verdicts) - refused} model summaries kept; {len(incidents)} "
          f"incidents, all titled from the rule and the event")

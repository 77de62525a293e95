"""The quality harness (issue 16): its scores are exact counts on hand-made inputs, its
corpus keeps scored templates out of prompts and memory, the floors on the corpus are
the figures docs/quality.md shows, and a short real run on the packaged model prints
the table with every meta output valid or unreviewed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from layers.actions.catalog import CATALOG, Risk
from layers.events import Decision, ProposedAction
from layers.pipeline.examples import load_examples
from layers.quality import corpus, floors, scenarios
from layers.quality.corpus import Line
from layers.quality.runner import pick_scenarios, prompt_source
from layers.quality.scoring import (
    Prediction,
    Truth,
    confusion,
    copies_text,
    decision_problems,
    score_escalation,
    score_meta,
    score_trigger,
    spec_matches,
)
from layers.quality.table import _row
from layers.quality.templates import BY_ID, FAILURE_CLASSES, TEMPLATES

REPO = Path(__file__).resolve().parent.parent


def _line(template: str, anomaly: bool, cats: tuple[str, ...] = ("disk",),
          sev: str | None = "critical", klass: str = "x") -> Line:
    return Line(template, klass, anomaly, cats, sev, "scored",  # type: ignore[arg-type]
                {"MESSAGE": template, "PRIORITY": "6"})


# -- scoring on hand-made inputs -----------------------------------------------------------


def test_confusion_counts_and_ratios_are_exact() -> None:
    c = confusion([True, True, True, False, False, False, True],
                  [True, True, False, True, False, False, False])
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 2, 2)
    assert c.precision == pytest.approx(2 / 3)
    assert c.recall == pytest.approx(0.5)
    assert c.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # Flagging nothing: precision 0 by convention, not a division error.
    none = confusion([True, False], [False, False])
    assert (none.precision, none.recall, none.f1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        confusion([True], [True, False])
    assert score_escalation([True, False, True], [True, True, False]).as_dict() == {
        "tp": 1, "fp": 1, "fn": 1, "tn": 0, "precision": 0.5, "recall": 0.5, "f1": 0.5}


def test_trigger_score_per_line_per_template_category_and_severity() -> None:
    lines = [
        _line("a", True), _line("a", True), _line("a", True),        # template a: 2 of 3 flagged
        _line("b", True, ("memory",), "warning"),                     # b: missed
        _line("c", False), _line("c", False),                         # c: 1 of 2 flagged (half)
        _line("d", False),                                            # d: quiet
    ]
    preds = [
        Prediction(True, "disk", "critical"), Prediction(True, "hardware", "warning"),
        Prediction(False),
        Prediction(False),
        Prediction(True, "disk", "info"), Prediction(False),
        Prediction(False),
    ]
    s = score_trigger(lines, preds)
    assert (s.lines.tp, s.lines.fp, s.lines.fn, s.lines.tn) == (2, 1, 2, 2)
    # Templates: a flagged (2/3), b not, c flagged (ties count as flagged), d not.
    assert (s.templates.tp, s.templates.fp, s.templates.fn, s.templates.tn) == (1, 1, 1, 1)
    # Category and severity over the flagged true anomalies only (the two of template a).
    assert (s.category.hits, s.category.total) == (1, 2)
    assert (s.severity.hits, s.severity.total) == (1, 2)
    assert s.per_class() == {"x": (7, 3)}
    # A floor that names no category has nothing to count: "-", not 0.
    blind = score_trigger(lines, [Prediction(p.anomaly) for p in preds])
    assert blind.category.value is None and blind.severity.value is None


def test_copied_summary_is_found_verbatim_only() -> None:
    prompt = 'Example answer: ["warning","disk","root filesystem 95% full"]'
    assert copies_text("Root filesystem 95% full", prompt)
    assert not copies_text("postgres killed by OOM", prompt)
    assert not copies_text("disk", prompt)  # too short to call a copy


def _decision(diagnosis: str, *proposals: tuple[str, dict[str, str | int | bool]]) -> Decision:
    return Decision(diagnosis=diagnosis, rollback_plan="none needed",
                    proposals=[ProposedAction(action=a, params=p, rationale="r")
                               for a, p in proposals])


TRUTH = Truth(escalate=True, category="memory", root_unit="postgresql.service",
              root_terms=("oom",), expected=("restart_unit:postgresql.service",),
              allowed=("unit_status",), forbidden=("nixos_rollback", "restart_unit:sshd.service"))


def test_meta_score_statuses() -> None:
    right = score_meta(TRUTH, [_decision("postgres was OOM-killed",
                                         ("restart_unit", {"unit": "postgresql.service"}))])
    assert (right.status, right.score, right.valid) == ("right", 1.0, 1)
    # The right action on the wrong unit is not right; naming the root cause is half.
    named = score_meta(TRUTH, [_decision("postgresql died",
                                         ("restart_unit", {"unit": "nginx.service"}))])
    assert (named.status, named.score) == ("root_named", 0.5)
    # A forbidden proposal zeroes the scenario even next to the right one.
    bad = score_meta(TRUTH, [_decision("x", ("restart_unit", {"unit": "postgresql.service"})),
                             _decision("y", ("restart_unit", {"unit": "sshd.service"}))])
    assert (bad.status, bad.score, bad.forbidden) == ("forbidden", 0.0, ["restart_unit:sshd.service"])
    assert score_meta(TRUTH, [_decision("x", ("nixos_rollback", {}))]).status == "forbidden"
    # A missed root cause scores 0.
    missed = score_meta(TRUTH, [_decision("the disk is full", ("disk_usage", {"path": "/"}))])
    assert (missed.status, missed.score) == ("missed", 0.0)
    # Output the action stage would refuse is invalid, never "right".
    invalid = score_meta(TRUTH, [_decision("oom", ("restart_unit", {"unit": "postgresql"}))])
    assert (invalid.status, invalid.valid, invalid.invalid) == ("invalid", 0, 1)
    assert score_meta(TRUTH, [_decision("   ")]).status == "invalid"
    # No decision at all: unreviewed when an incident ended so, missed when none existed.
    assert score_meta(TRUTH, [None, None]).as_dict()["unreviewed"] == 2
    assert score_meta(TRUTH, [None]).status == "unreviewed"
    assert score_meta(TRUTH, []).status == "missed"


def test_action_specs_and_decision_validity() -> None:
    assert spec_matches("nix_gc", "nix_gc", {})
    assert spec_matches("restart_unit:a.service", "restart_unit", {"unit": "a.service"})
    assert not spec_matches("restart_unit:a.service", "restart_unit", {"unit": "b.service"})
    assert not spec_matches("restart_unit", "start_unit", {"unit": "a.service"})
    assert decision_problems(_decision("ok", ("unit_status", {"unit": "a.service"}))) == []
    problems = decision_problems(_decision("", ("unit_status", {"unit": "a"}),
                                           ("no_such_action", {})))
    assert problems[0] == "empty diagnosis" and len(problems) == 3


# -- the corpus and its split --------------------------------------------------------------


def test_corpus_is_deterministic_and_covers_every_class() -> None:
    a, b = corpus.generate(), corpus.generate()
    assert [x.entry for x in a] == [x.entry for x in b]
    scored = corpus.scored()
    assert 300 <= len(scored) <= 800
    for klass in FAILURE_CLASSES:
        assert any(x.anomaly for x in scored if x.klass == klass), klass
        assert any(x.klass == klass for x in corpus.reference()), f"{klass}: no reference"
    for klass in ("benign", "decoy", "control"):
        assert any(x.klass == klass and not x.anomaly for x in scored), klass
    # Every line is a journal entry the collector's parser accepts, ids unique.
    events = [x.event() for x in corpus.lines()]
    assert len({e.id for e in events}) == len(events)
    assert {e.source for e in events} == {"journald"}
    # A limited sample still covers every template.
    assert {x.template for x in corpus.sample(scored, 120)} == {x.template for x in scored}


def _scenario_messages() -> list[str]:
    return [str(e["MESSAGE"]) for sc in scenarios.load() for e in sc.journal]


def test_nothing_scored_shares_a_message_template_with_the_reference_split() -> None:
    """Prompts, few-shot examples and memory seeds may use only reference templates; the
    lines and scenarios that are scored must not contain any of them."""
    reference = {t.id for t in TEMPLATES if t.split == "reference"}
    scored_ids = {x.template for x in corpus.scored()}
    assert reference and not reference & scored_ids
    scored_text = [x.message for x in corpus.scored()] + _scenario_messages()
    for t in TEMPLATES:
        if t.split == "reference":
            rx = corpus.template_regex(t)
            leaks = [m for m in scored_text if rx.match(m)]
            assert not leaks, f"reference template {t.id} matches scored text: {leaks[:2]}"
    # Template regexes do recognise their own lines (the check above can fail).
    for x in corpus.lines():
        assert corpus.template_regex(BY_ID[x.template]).match(x.message), x.template


def test_packaged_labelled_examples_are_reference_lines_with_their_labels() -> None:
    """The trigger stage's labelled examples (layers/rules/examples.toml) are memory the
    stage consults: each must be a line of a reference template, labelled as that
    template is, and match no scored template (or the harness would score a copy)."""
    reference = [t for t in TEMPLATES if t.split == "reference"]
    scored = [t for t in TEMPLATES if t.split == "scored"]
    for ex in load_examples():
        owners = [t for t in reference if corpus.template_regex(t).match(ex.message)]
        assert owners, f"example is no reference line: {ex.message!r}"
        assert all(t.anomaly == ex.anomaly for t in owners), ex.message
        leaks = [t.id for t in scored if corpus.template_regex(t).match(ex.message)]
        assert not leaks, f"example matches scored templates {leaks}: {ex.message!r}"


def test_prompts_contain_no_scored_message_text() -> None:
    source = prompt_source().lower()
    assert source, "the prompts module's source is readable"
    for t in TEMPLATES:
        if t.split == "scored":
            for chunk in corpus.literal_chunks(t):
                assert chunk.lower() not in source, f"prompt holds scored text of {t.id}: {chunk!r}"


# -- floors on the corpus (the figures in docs/quality.md) ---------------------------------


def test_floors_on_the_corpus_are_the_documented_figures() -> None:
    scored = corpus.scored()
    results = {name: score_trigger(scored, f(scored)) for name, f in floors.floors().items()}
    every = results["every line"].lines
    assert every.recall == 1.0 and every.tp == sum(x.anomaly for x in scored)
    # The priority floor is precise but blind to errors written to stdout (priority 6).
    assert results["priority <= 3"].lines.precision > results["every line"].lines.precision
    assert results["priority <= 3"].lines.recall < 0.5
    # The rules alone carry their category and severity; the others name none.
    assert results["prefilter rules"].category.total > 0
    assert results["keyword regex"].category.total == 0
    doc = (REPO / "docs" / "quality.md").read_text(encoding="utf-8")
    for name, s in results.items():
        row = _row(f"floor: {name}", s)
        assert row in doc, f"docs/quality.md is stale; expected the row:\n{row}"
    assert f"{len(scored)} lines ({every.tp} anomalies)" in doc


# -- scenarios -------------------------------------------------------------------------------


def test_scenarios_have_truth_recordings_and_both_outcomes() -> None:
    scs = scenarios.load()
    assert 10 <= len(scs) <= 20
    assert {s.truth.escalate for s in scs} == {True, False}
    read_only = [n for n, spec in CATALOG.items() if spec.risk is Risk.READ_ONLY]
    for sc in scs:
        assert sc.events(), sc.id
        unit = sc.truth.root_unit or "nothing.service"
        for action in read_only:
            fields = CATALOG[action].params.model_fields
            params = {"unit": unit} if "unit" in fields and fields["unit"].is_required() else \
                {"pid": 4242} if action == "process_status" else {}
            assert sc.recording(action, params) is not None, (sc.id, action)
        assert sc.recording("restart_unit", {"unit": unit}) is None  # changes never replay
        if sc.truth.escalate:
            assert sc.truth.expected, sc.id
            assert not set(sc.truth.expected) & set(sc.truth.forbidden), sc.id
    oom = next(s for s in scs if s.id == "01_oom_postgres")
    status = oom.recording("unit_status", {"unit": "postgresql.service"}) or ""
    assert "failed (Result: oom-kill)" in status and "killed by the OOM killer" in status
    assert "Mem:" in (oom.recording("memory_usage", {}) or "")
    # A short run alternates outcomes.
    assert {s.truth.escalate for s in pick_scenarios(scs, 2)} == {True, False}


def test_cli_refuses_a_bad_limit_and_layers_it_may_not_start(tmp_path: Path) -> None:
    from tests.support import free_port, write_toml

    cfg = write_toml(tmp_path / "c.toml", {
        "state_dir": str(tmp_path / "state"),
        "layers": {"trigger": {"managed": False, "port": free_port()}},
    })
    bad = subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(cfg), "eval",
                          "--limit", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be 1 or more" in bad.stderr
    down = subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(cfg), "eval",
                           "--stage", "trigger"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1
    assert down.stderr.strip().splitlines()[-1].startswith("ai-sysadmin: eval: layers not ready")
    assert "Traceback" not in down.stderr


# -- one short real run ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_eval_on_the_real_model_prints_the_table(stack) -> None:  # type: ignore[no-untyped-def]
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(stack.config_path), "eval",
         "--limit", "2", "--no-start"],
        capture_output=True, text=True, timeout=1100, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "ai-sysadmin eval — stage all, limit 2" in out
    for row in ("trigger stage", "floor: every line", "floor: keyword regex",
                "floor: priority <= 3", "floor: prefilter rules", "escalation (pipeline)",
                "review layer alone"):
        assert re.search(rf"^{re.escape(row)}\s+(\d\.\d\d|-)\s", out, re.M), row
    assert re.search(r"^best floor: .+ \(F1 \d\.\d\d\); trigger stage [+-]\d\.\d\d", out, re.M)
    assert "scenario 2/2" in run.stderr  # progress went to stderr
    m = re.search(r"forbidden actions proposed (\d+); decisions valid (\d+), invalid (\d+), "
                  r"unreviewed (\d+)", out)
    assert m, out
    forbidden, valid, invalid, unreviewed = map(int, m.groups())
    assert valid + unreviewed >= 1  # the escalating scenario was diagnosed (or refused)
    assert forbidden == 0
    assert invalid == 0, out  # every meta output is valid or unreviewed

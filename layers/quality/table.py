"""The printed report of ``ai-sysadmin eval``: one table per stage, floors next to the
trigger stage, every figure a count or a ratio of counts."""

from __future__ import annotations

from layers.quality.runner import Report, TriggerRun
from layers.quality.scoring import Counts, Ratio, TriggerScore
from layers.quality.templates import FAILURE_CLASSES, NON_FAULT_CLASSES


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _row(name: str, s: TriggerScore) -> str:
    return (f"{name:<22} {_f(s.lines.precision):>5} {_f(s.lines.recall):>5} {_f(s.lines.f1):>5}"
            f"   {_f(s.templates.precision):>5} {_f(s.templates.recall):>5} "
            f"{_f(s.templates.f1):>5}   {_f(s.category.value):>8} {_f(s.severity.value):>8}")


def _ratio(r: Ratio) -> str:
    return f"{r.hits}/{r.total}" if r.total else "-"


def trigger_table(t: TriggerRun) -> list[str]:
    n_anom = sum(x.anomaly for x in t.lines)
    n_tpl = len({x.template for x in t.lines})
    out = [
        f"trigger: {len(t.lines)} lines ({n_anom} anomalies), {n_tpl} message templates; "
        f"{t.candidates - t.by_example} reached the trigger layer, {t.by_example} judged "
        f"like a labelled example ({t.seconds:.0f}s)",
        f"{'':<22} {'lines':^17}   {'templates':^17}   {'category':>8} {'severity':>8}",
        f"{'':<22} {'P':>5} {'R':>5} {'F1':>5}   {'P':>5} {'R':>5} {'F1':>5}   "
        f"{'accuracy':>8} {'agree':>8}",
        _row("trigger stage", t.score),
    ]
    out += [_row(f"floor: {name}", s) for name, s in t.floors.items()]
    name, best = t.best_floor
    delta = t.score.lines.f1 - best.lines.f1
    out.append(f"best floor: {name} (F1 {best.lines.f1:.2f}); trigger stage "
               f"{'+' if delta >= 0 else ''}{delta:.2f} — "
               f"{'above' if delta > 0 else 'not above'} it")
    out.append(f"category accuracy {_ratio(t.score.category)}, severity agreement "
               f"{_ratio(t.score.severity)} (over flagged true anomalies); "
               f"{t.unreviewed} verdicts unreviewed, {t.copied_prompt} summaries copied from "
               f"the prompt, {t.contradicts_rule} categories contradicting their rule")
    # Per class: what share of its lines each predictor flags (recall for failure
    # classes, false-alarm rate for the rest).
    prefilter = t.floors.get("prefilter rules")
    stage_cls = t.score.per_class()
    pre_cls = prefilter.per_class() if prefilter else {}
    out.append("")
    out.append(f"{'class':<18} {'lines':>5} {'flagged: stage':>15} {'prefilter':>10}")
    for klass in (*FAILURE_CLASSES, *NON_FAULT_CLASSES):
        if klass not in stage_cls:
            continue
        n, f = stage_cls[klass]
        pf = pre_cls.get(klass, (n, 0))[1]
        out.append(f"{klass:<18} {n:>5} {f / n:>15.2f} {pf / n:>10.2f}")
    return out


def _counts(name: str, c: Counts, extra: str = "") -> str:
    return (f"{name:<26} {_f(c.precision):>5} {_f(c.recall):>5} {_f(c.f1):>5}   "
            f"tp {c.tp} fp {c.fp} fn {c.fn} tn {c.tn}{extra}")


def render(report: Report) -> str:
    out = [f"ai-sysadmin eval — stage {report.stage}"
           + (f", limit {report.limit}" if report.limit else "")]
    for layer, model in report.models.items():
        out.append(f"  {layer}: {model}")
    if report.trigger is not None:
        out.append("")
        out += trigger_table(report.trigger)
    if report.scenarios:
        d = report.as_dict()["review"]
        out += ["", f"review: {d['scenarios']} scenarios ({d['should_escalate']} should "
                f"escalate), {d['incidents']} incidents, {d['unreviewed_reviews']} reviews "
                "unreviewed",
                f"{'':<26} {'P':>5} {'R':>5} {'F1':>5}",
                _counts("escalation (pipeline)", report.escalation),
                _counts("review layer alone", report.review_alone)]
    if report.with_meta:
        m = report.meta_summary()
        out += ["", f"meta: {m['scenarios']} scenarios that should escalate",
                f"  score {_f(m['score'])} (1 right action and unit, 0.5 root cause named, "
                "0 otherwise)",
                f"  right action and unit {m['right_action_and_unit']}, root cause named "
                f"{m['root_named']}, missed {m['missed']}",
                f"  forbidden actions proposed {m['forbidden_proposed']}; decisions valid "
                f"{m['valid_decisions']}, invalid {m['invalid_decisions']}, unreviewed "
                f"{m['unreviewed']} ({m['unreviewed_at_review']} of them with the review "
                "refused too; the harness sends them to the meta layer all the same)"]
        out.append(f"  evidence reads {m['evidence_reads']} ({m['evidence_reads_by_model']} "
                   f"asked by the model), decisions citing evidence "
                   f"{m['decisions_citing_evidence']}")
        out.append(f"  {'scenario':<24} {'status':<11} proposals")
        for r in report.scenarios:
            if r.meta is not None:
                props = ", ".join(r.meta.proposals) or "-"
                reads = ", ".join(x for i in r.incidents for x in i.reads)
                shown = props[:70] + (f"  [read: {reads[:80]}]" if reads else "")
                out.append(f"  {r.scenario.id:<24} {r.meta.status:<11} {shown}")
    out += ["", f"total {report.seconds:.0f}s"]
    return "\n".join(out)

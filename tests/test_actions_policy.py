"""Catalog validation and the policy: autonomy × risk, protection, kill switch, rate limits."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from layers.actions.catalog import CATALOG, Refusal, Risk, plan
from layers.actions.policy import MemoryRunLedger, Policy, UnitInventory, Verdict
from tests.actions_support import make_standins, settings_for

# One action per risk class, with valid params.
BY_RISK = {
    "read-only": ("disk_usage", {"path": "/"}),
    "low": ("reset_failed_unit", {"unit": "nginx.service"}),
    "medium": ("restart_unit", {"unit": "nginx.service"}),
    "high": ("nixos_rollback", {}),
}

# Written out by hand from the design (not derived from the code under test).
EXPECTED = {
    "observe": {"read-only": "wait", "low": "wait", "medium": "wait", "high": "wait"},
    "suggest": {"read-only": "run", "low": "wait", "medium": "wait", "high": "wait"},
    "auto-safe": {"read-only": "run", "low": "run", "medium": "wait", "high": "wait"},
    "auto-full": {"read-only": "run", "low": "run", "medium": "run", "high": "wait"},
}


def test_catalog_risks_are_fixed_per_entry() -> None:
    assert CATALOG["restart_unit"].risk is Risk.MEDIUM
    assert CATALOG["nixos_rollback"].risk is Risk.HIGH
    assert CATALOG["reset_failed_unit"].risk is Risk.LOW
    assert all(CATALOG[n].risk is Risk.READ_ONLY
               for n in ("unit_status", "journal_tail", "disk_usage", "list_failed_units"))  # fmt: skip


@pytest.mark.parametrize("level", list(EXPECTED))
@pytest.mark.parametrize("risk", list(BY_RISK))
async def test_autonomy_level_by_risk_class(tmp_path: Path, level: str, risk: str) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy=level, allow_auto_full=True)
    name, params = BY_RISK[risk]
    planned = plan(name, params, s)
    assert planned.risk == risk
    decision = await Policy(s, MemoryRunLedger()).decide(planned)
    assert decision.verdict == EXPECTED[level][risk], decision


async def test_auto_full_without_opt_in_acts_as_auto_safe(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-full")
    decision = await Policy(s, MemoryRunLedger()).decide(plan(*BY_RISK["medium"], s))
    assert decision.verdict is Verdict.WAIT


async def test_per_action_autonomy_overrides_global(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="observe",
                     per_action_autonomy={"reset_failed_unit": "auto-safe"})  # fmt: skip
    policy = Policy(s, MemoryRunLedger())
    assert (await policy.decide(plan(*BY_RISK["low"], s))).verdict is Verdict.RUN
    assert (await policy.decide(plan(*BY_RISK["read-only"], s))).verdict is Verdict.WAIT


@pytest.mark.parametrize(
    "params",
    [
        {"unit": "nginx"},  # no suffix: would slip past exact protection
        {"unit": "nginx.service; rm -rf /"},
        {"unit": "../../etc/passwd.service"},
        {"unit": "-.mount"},
        {"unit": "--force.service"},
        {"unit": "ngіnx.service"},  # Cyrillic i
        {"unit": "nginx.service\n"},
        {"unit": "getty@.service"},  # a template is not a unit
        {"unit": ["nginx.service"]},
        {"unit": "nginx.service", "now": True},
        {},
    ],
)
def test_malformed_unit_params_are_refused_not_fixed(tmp_path: Path, params: dict) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path))
    with pytest.raises(Refusal) as info:
        plan("restart_unit", params, s)
    assert info.value.code == "invalid_params"


def test_strict_types_no_coercion(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    with pytest.raises(Refusal):
        plan("process_status", {"pid": "123"}, s)
    with pytest.raises(Refusal):
        plan("journal_vacuum", {"max_size_mb": 500, "max_age_days": 3}, s)
    with pytest.raises(Refusal):
        plan("disk_usage", {"path": "/var/../etc"}, s)


def test_unknown_action_names_refused_exactly(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path))
    for name in ("Restart_Unit", "restart_unit ", "shell", "rm", None, 7):
        with pytest.raises(Refusal) as info:
            plan(name, {}, s)
        assert info.value.code == "unknown_action"


def test_dry_run_shows_the_exact_argv(tmp_path: Path) -> None:
    st = make_standins(tmp_path)
    s = settings_for(tmp_path, st)
    planned = plan("restart_unit", {"unit": "nginx.service"}, s)
    assert planned.argv == [str(st.bindir / "systemctl"), "restart", "--", "nginx.service"]
    assert planned.dry_run.startswith(f"{st.bindir}/systemctl restart -- nginx.service")
    assert "risk medium" in planned.dry_run
    # configured absolute paths win over the search path
    s2 = settings_for(tmp_path, st, binaries={"systemctl": "/opt/sd/systemctl"})
    assert plan("restart_unit", {"unit": "nginx.service"}, s2).argv[0] == "/opt/sd/systemctl"


@pytest.mark.parametrize(
    "unit",
    ["sshd.service", "dbus.service", "systemd-journald.service", "systemd-anything.service",
     "sshd@3-10.0.0.1:22-10.0.0.2:5555.service", "ai-sysadmin-api.service"],
)  # fmt: skip
async def test_protected_units_are_refused_for_changes(tmp_path: Path, unit: str) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-full", allow_auto_full=True)
    decision = await Policy(s, MemoryRunLedger()).decide(plan("restart_unit", {"unit": unit}, s))
    assert decision.verdict is Verdict.REFUSE and decision.code == "protected_unit"
    # looking is not touching: read-only status of a protected unit is fine
    look = await Policy(s, MemoryRunLedger()).decide(plan("unit_status", {"unit": unit}, s))
    assert look.verdict is Verdict.RUN


async def test_alias_of_protected_unit_refused_via_host_units_standin_systemctl(
    tmp_path: Path,
) -> None:
    """Stand-in systemctl (no systemd here) reports openssh.service as an alias of sshd."""
    st = make_standins(tmp_path)
    s = settings_for(tmp_path, st, unit_check="always", autonomy="auto-full", allow_auto_full=True)
    inv = UnitInventory(s, str(st.bindir / "systemctl"))
    policy = Policy(s, MemoryRunLedger(), inv)
    alias = await policy.decide(plan("restart_unit", {"unit": "openssh.service"}, s))
    assert alias.verdict is Verdict.REFUSE and "sshd.service" in alias.reason
    missing = await policy.decide(plan("restart_unit", {"unit": "nosuch.service"}, s))
    assert missing.verdict is Verdict.REFUSE and missing.code == "unknown_unit"
    ok = await policy.decide(plan("restart_unit", {"unit": "nginx.service"}, s))
    assert ok.verdict is Verdict.RUN
    assert ["systemctl", "show", "--property=Id,Names,LoadState", "--", "openssh.service"] in st.calls()


async def test_kill_switch_stops_changes_not_reads(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-full", allow_auto_full=True)
    policy = Policy(s, MemoryRunLedger())
    assert (await policy.decide(plan(*BY_RISK["low"], s))).verdict is Verdict.RUN
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "actions.kill").touch()  # `ai-sysadmin kill-switch on`
    for risk in ("low", "medium", "high"):
        d = await policy.decide(plan(*BY_RISK[risk], s))
        assert d.verdict is Verdict.REFUSE and d.code == "kill_switch"
    assert (await policy.decide(plan(*BY_RISK["read-only"], s))).verdict is Verdict.RUN
    s2 = settings_for(tmp_path / "other", make_standins(tmp_path), kill_switch=True,
                      autonomy="auto-safe")  # fmt: skip
    d = await Policy(s2, MemoryRunLedger()).decide(plan(*BY_RISK["low"], s2))
    assert d.code == "kill_switch"


async def test_allowlist_refuses_everything_else(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-safe",
                     allowlist=["disk_usage"])  # fmt: skip
    policy = Policy(s, MemoryRunLedger())
    assert (await policy.decide(plan(*BY_RISK["read-only"], s))).verdict is Verdict.RUN
    d = await policy.decide(plan(*BY_RISK["low"], s))
    assert d.verdict is Verdict.REFUSE and d.code == "not_allowlisted"


async def test_rate_limits_per_unit_and_per_action(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-safe",
                     max_runs_per_unit_per_hour=2, max_runs_per_action_per_hour=3)  # fmt: skip
    ledger = MemoryRunLedger()
    policy = Policy(s, ledger)
    p = plan("reset_failed_unit", {"unit": "a.service"}, s)
    for _ in range(2):
        assert (await policy.decide(p)).verdict is Verdict.RUN
        ledger.record(p.name, p.params.units())
    d = await policy.decide(p)
    assert d.code == "rate_limited" and "a.service" in d.reason
    q = plan("reset_failed_unit", {"unit": "b.service"}, s)
    assert (await policy.decide(q)).verdict is Verdict.RUN
    ledger.record(q.name, q.params.units())
    d = await policy.decide(plan("reset_failed_unit", {"unit": "c.service"}, s))
    assert d.code == "rate_limited" and "max_runs_per_action_per_hour" in d.reason
    # runs older than an hour no longer count
    old = MemoryRunLedger()
    for _ in range(5):
        old.record(p.name, ["a.service"], at=0.0)
    assert (await Policy(s, old).decide(p)).verdict is Verdict.RUN


async def test_protected_processes(tmp_path: Path) -> None:
    s = settings_for(tmp_path, autonomy="auto-full", allow_auto_full=True)
    policy = Policy(s, MemoryRunLedger())
    with pytest.raises(Refusal):
        plan("terminate_process", {"pid": 1}, s)  # init is outside the schema
    for pid in (os.getpid(), os.getppid()):
        d = await policy.decide(plan("terminate_process", {"pid": pid}, s))
        assert d.code == "protected_process"
    child = subprocess.Popen(["sleep", "30"])
    try:
        d = await policy.decide(plan("terminate_process", {"pid": child.pid}, s))
        assert d.verdict is Verdict.RUN
    finally:
        child.kill()
        child.wait()
    d = await policy.decide(plan("terminate_process", {"pid": child.pid}, s))
    assert d.code == "no_such_process"

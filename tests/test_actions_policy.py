"""Catalog validation and the policy: autonomy × risk, protection, kill switch, rate limits."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from layers.actions.catalog import CATALOG, Refusal, Risk, plan
from layers.actions.policy import (
    NO_SCOPE,
    IncidentScope,
    MemoryRunLedger,
    Policy,
    Ruling,
    UnitInventory,
    evidence_units,
)
from layers.config import ConfigError, Settings, load_settings
from layers.events import Event
from tests.actions_support import make_standins, settings_for
from tests.support import run_cli, write_toml

# The units an incident is about (its events' recorded unit fields).
SCOPE = IncidentScope("inc_test", frozenset({"nginx.service", "a.service", "b.service",
                                             "c.service"}))

# What `systemctl show` is asked, written out from systemd.unit(5), not from the code.
SHOW = ("--property=Id,Names,LoadState,RefuseManualStart,AllowIsolate,SuccessAction,"
        "FailureAction,JobTimeoutAction,StartLimitAction,Requires,Wants,BindsTo,Upholds,"
        "OnFailure,OnSuccess,Triggers")

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
               for n in ("unit_status", "journal_tail", "disk_usage", "list_failed_units"))


@pytest.mark.parametrize("level", list(EXPECTED))
@pytest.mark.parametrize("risk", list(BY_RISK))
async def test_autonomy_level_by_risk_class(tmp_path: Path, level: str, risk: str) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy=level, allow_auto_full=True)
    name, params = BY_RISK[risk]
    planned = plan(name, params, s)
    assert planned.risk == risk
    decision = await Policy(s, MemoryRunLedger()).decide(planned, SCOPE)
    assert decision.verdict == EXPECTED[level][risk], decision


async def test_auto_full_without_opt_in_acts_as_auto_safe(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-full")
    decision = await Policy(s, MemoryRunLedger()).decide(plan(*BY_RISK["medium"], s), SCOPE)
    assert decision.verdict is Ruling.WAIT


async def test_per_action_autonomy_overrides_global(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="observe",
                     per_action_autonomy={"reset_failed_unit": "auto-safe"})
    policy = Policy(s, MemoryRunLedger())
    assert (await policy.decide(plan(*BY_RISK["low"], s), SCOPE)).verdict is Ruling.RUN
    assert (await policy.decide(plan(*BY_RISK["read-only"], s), SCOPE)).verdict is Ruling.WAIT


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
)
async def test_protected_units_are_refused_for_changes(tmp_path: Path, unit: str) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-full", allow_auto_full=True)
    scope = IncidentScope("inc_test", frozenset({unit}))  # even when it is the incident's own
    policy = Policy(s, MemoryRunLedger())
    decision = await policy.decide(plan("restart_unit", {"unit": unit}, s), scope)
    assert decision.verdict is Ruling.REFUSE and decision.code == "protected_unit"
    # looking is not touching: read-only status of a protected unit is fine, in any scope
    look = await policy.decide(plan("unit_status", {"unit": unit}, s), NO_SCOPE)
    assert look.verdict is Ruling.RUN


async def test_alias_of_protected_unit_refused_via_host_units_standin_systemctl(
    tmp_path: Path,
) -> None:
    """Stand-in systemctl (no systemd here) reports openssh.service as an alias of sshd."""
    st = make_standins(tmp_path)
    s = settings_for(tmp_path, st, unit_check="always", autonomy="auto-full", allow_auto_full=True)
    inv = UnitInventory(s, str(st.bindir / "systemctl"))
    policy = Policy(s, MemoryRunLedger(), inv)
    alias = await policy.decide(plan("restart_unit", {"unit": "openssh.service"}, s), SCOPE)
    assert alias.verdict is Ruling.REFUSE and "sshd.service" in alias.reason
    missing = await policy.decide(plan("restart_unit", {"unit": "nosuch.service"}, s), SCOPE)
    assert missing.verdict is Ruling.REFUSE and missing.code == "unknown_unit"
    ok = await policy.decide(plan("restart_unit", {"unit": "nginx.service"}, s), SCOPE)
    assert ok.verdict is Ruling.RUN
    assert ["systemctl", "show", SHOW, "--", "openssh.service"] in st.calls()


async def test_kill_switch_stops_changes_not_reads(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-full", allow_auto_full=True)
    policy = Policy(s, MemoryRunLedger())
    assert (await policy.decide(plan(*BY_RISK["low"], s), SCOPE)).verdict is Ruling.RUN
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "actions.kill").touch()  # `ai-sysadmin kill-switch on`
    for risk in ("low", "medium", "high"):
        d = await policy.decide(plan(*BY_RISK[risk], s), SCOPE)
        assert d.verdict is Ruling.REFUSE and d.code == "kill_switch"
    assert (await policy.decide(plan(*BY_RISK["read-only"], s), SCOPE)).verdict is Ruling.RUN
    s2 = settings_for(tmp_path / "other", make_standins(tmp_path), kill_switch=True,
                      autonomy="auto-safe")
    d = await Policy(s2, MemoryRunLedger()).decide(plan(*BY_RISK["low"], s2), SCOPE)
    assert d.code == "kill_switch"


async def test_allowlist_refuses_everything_else(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-safe",
                     allowlist=["disk_usage"])
    policy = Policy(s, MemoryRunLedger())
    assert (await policy.decide(plan(*BY_RISK["read-only"], s), SCOPE)).verdict is Ruling.RUN
    d = await policy.decide(plan(*BY_RISK["low"], s), SCOPE)
    assert d.verdict is Ruling.REFUSE and d.code == "not_allowlisted"


async def test_rate_limits_per_unit_and_per_action(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-safe",
                     max_runs_per_unit_per_hour=2, max_runs_per_action_per_hour=3)
    ledger = MemoryRunLedger()
    policy = Policy(s, ledger)
    p = plan("reset_failed_unit", {"unit": "a.service"}, s)
    for _ in range(2):
        assert (await policy.decide(p, SCOPE)).verdict is Ruling.RUN
        ledger.record(p.name, p.params.units())
    d = await policy.decide(p, SCOPE)
    assert d.code == "rate_limited" and "a.service" in d.reason
    q = plan("reset_failed_unit", {"unit": "b.service"}, s)
    assert (await policy.decide(q, SCOPE)).verdict is Ruling.RUN
    ledger.record(q.name, q.params.units())
    d = await policy.decide(plan("reset_failed_unit", {"unit": "c.service"}, s), SCOPE)
    assert d.code == "rate_limited" and "max_runs_per_action_per_hour" in d.reason
    # runs older than an hour no longer count
    old = MemoryRunLedger()
    for _ in range(5):
        old.record(p.name, ["a.service"], at=0.0)
    assert (await Policy(s, old).decide(p, SCOPE)).verdict is Ruling.RUN


async def test_protected_processes(tmp_path: Path) -> None:
    s = settings_for(tmp_path, autonomy="auto-full", allow_auto_full=True)
    policy = Policy(s, MemoryRunLedger())
    with pytest.raises(Refusal):
        plan("terminate_process", {"pid": 1}, s)  # init is outside the schema
    # (the parent is pid 1 when the suite runs detached: the schema refuses that above)
    for pid in sorted({os.getpid(), os.getppid()} - {1}):
        d = await policy.decide(plan("terminate_process", {"pid": pid}, s), SCOPE)
        assert d.code == "protected_process"
    child = subprocess.Popen(["sleep", "30"])
    try:
        # not protected, but in no unit of the incident: held for an admin
        d = await policy.decide(plan("terminate_process", {"pid": child.pid}, s), SCOPE)
        assert d.verdict is Ruling.WAIT and d.code == "outside_incident", d
        await policy.screen(plan("terminate_process", {"pid": child.pid}, s))  # approvable
    finally:
        child.kill()
        child.wait()
    d = await policy.decide(plan("terminate_process", {"pid": child.pid}, s), SCOPE)
    assert d.code == "no_such_process"


# -- scope: a change touches only what its incident is about ---------------------------------


async def test_changes_outside_the_incident_wait_reads_do_not(tmp_path: Path) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-full", allow_auto_full=True)
    policy = Policy(s, MemoryRunLedger())
    app3 = IncidentScope("inc_1", frozenset({"app3.service"}))
    for name, params in [("restart_unit", {"unit": "postgresql.service"}),
                         ("start_unit", {"unit": "nginx.service"}),
                         ("reset_failed_unit", {"unit": "app3@1.service"}),
                         ("journal_vacuum", {"max_size_mb": 64}),
                         ("nix_gc", {})]:
        d = await policy.decide(plan(name, params, s), app3)
        assert d.verdict is Ruling.WAIT and d.code == "outside_incident", (name, d)
        assert "app3.service" in d.reason
    assert (await policy.decide(plan("restart_unit", {"unit": "app3.service"}, s),
                                app3)).verdict is Ruling.RUN
    # no incident at all: nothing changes unattended
    d = await policy.decide(plan("reset_failed_unit", {"unit": "app3.service"}, s), NO_SCOPE)
    assert d.verdict is Ruling.WAIT and d.code == "outside_incident"
    # reading another unit is fine
    d = await policy.decide(plan("unit_status", {"unit": "postgresql.service"}, s), app3)
    assert d.verdict is Ruling.RUN


async def test_scope_follows_aliases_systemd_reports(tmp_path: Path) -> None:
    """Stand-in systemctl: www.service is an alias of nginx.service."""
    st = make_standins(tmp_path, {
        "www.service": {"id": "nginx.service", "names": ["nginx.service", "www.service"]},
        "other.service": {"id": "other.service", "names": ["other.service"]},
    })
    s = settings_for(tmp_path, st, unit_check="always", autonomy="auto-full",
                     allow_auto_full=True)
    policy = Policy(s, MemoryRunLedger(), UnitInventory(s, str(st.bindir / "systemctl")))
    nginx = IncidentScope("inc_1", frozenset({"nginx.service"}))
    d = await policy.decide(plan("restart_unit", {"unit": "www.service"}, s), nginx)
    assert d.verdict is Ruling.RUN, d
    d = await policy.decide(plan("restart_unit", {"unit": "other.service"}, s), nginx)
    assert d.code == "outside_incident"
    assert [c[4] for c in st.calls()] == ["www.service", "other.service"]


def test_evidence_is_journald_fields_not_what_a_sender_claims() -> None:
    def jd(unit: str | None, **fields: str) -> Event:
        return Event(source="journald", unit=unit, message="x", fields=fields)

    assert evidence_units([
        jd("app3.service", _PID="4242", _SYSTEMD_UNIT="app3.service"),
        # systemd itself (pid 1) about a unit
        jd("app4.service", _PID="1", _SYSTEMD_UNIT="init.scope", UNIT="app4.service"),
        # anyone else's UNIT= is only a claim: its cgroup's unit counts
        jd("postgresql.service", _PID="31337", _SYSTEMD_UNIT="session-4.scope",
           UNIT="postgresql.service"),
        Event(source="units", unit="broken.service", message="failed"),
        Event(source="metrics", message="disk_used_percent = 97.0"),
        Event(source="remote", unit="not a unit; rm -rf /", message="x"),
    ]) == {"app3.service", "app4.service", "session-4.scope", "broken.service"}


# -- units never started ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "unit",
    ["emergency.service", "rescue.service", "systemd-reboot.service", "systemd-poweroff.service",
     "systemd-halt.service", "systemd-kexec.service", "systemd-soft-reboot.service",
     "poweroff.service", "reboot.service", "halt.service", "kexec.service",
     "ctrl-alt-del.service", "initrd-switch-root.service", "initrd-cleanup.service",
     "systemd-suspend.service", "systemd-hibernate.service", "nixos-upgrade.service"],
)
async def test_mode_switching_units_never_started_even_in_scope(tmp_path: Path, unit: str) -> None:
    # the systemd- prefix protection is off: the never-start list does not depend on it
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-full",
                     allow_auto_full=True, protected_unit_prefixes=[])
    scope = IncidentScope("inc_1", frozenset({unit}))
    policy = Policy(s, MemoryRunLedger())
    for action in ("start_unit", "restart_unit"):
        d = await policy.decide(plan(action, {"unit": unit}, s), scope)
        assert d.verdict is Ruling.REFUSE and d.code == "never_started", (action, d)
        with pytest.raises(Refusal):  # what an approval re-checks
            await policy.screen(plan(action, {"unit": unit}, s))
    # clearing its failed state starts nothing
    d = await policy.decide(plan("reset_failed_unit", {"unit": unit}, s), scope)
    assert d.verdict is Ruling.RUN


@pytest.mark.parametrize(
    ("props", "why"),
    [
        ({"RefuseManualStart": "yes"}, "RefuseManualStart=yes"),
        ({"AllowIsolate": "yes"}, "AllowIsolate=yes"),
        ({"SuccessAction": "poweroff"}, "SuccessAction=poweroff"),
        ({"FailureAction": "reboot-force"}, "FailureAction=reboot-force"),
        ({"JobTimeoutAction": "reboot-immediate"}, "JobTimeoutAction=reboot-immediate"),
        ({"StartLimitAction": "reboot"}, "StartLimitAction=reboot"),
        ({"FailureAction": "exit"}, "FailureAction=exit"),
        ({"Wants": "network-online.target reboot.target"}, "reboot.target"),
        ({"Requires": "initrd-switch-root.target"}, "initrd-switch-root.target"),
        ({"OnFailure": "emergency.target"}, "emergency.target"),
        ({"OnSuccess": "poweroff.target"}, "poweroff.target"),
        ({"Triggers": "systemd-reboot.service"}, "systemd-reboot.service"),
    ],
)
async def test_units_whose_properties_would_switch_the_system_are_never_started(
    tmp_path: Path, props: dict[str, str], why: str
) -> None:
    """Stand-in systemctl answers `show` with these properties, as systemd would."""
    st = make_standins(tmp_path, {
        "odd.service": {"id": "odd.service", "names": ["odd.service"], "props": props},
        "plain.service": {"id": "plain.service", "names": ["plain.service"], "props": {
            "Requires": "sysinit.target system.slice", "Wants": "network-online.target",
            "FailureAction": "none", "AllowIsolate": "no", "RefuseManualStart": "no"}},
    })
    s = settings_for(tmp_path, st, unit_check="always", autonomy="auto-full",
                     allow_auto_full=True)
    policy = Policy(s, MemoryRunLedger(), UnitInventory(s, str(st.bindir / "systemctl")))
    scope = IncidentScope("inc_1", frozenset({"odd.service", "plain.service"}))
    for action in ("start_unit", "restart_unit"):
        d = await policy.decide(plan(action, {"unit": "odd.service"}, s), scope)
        assert d.verdict is Ruling.REFUSE and d.code == "never_started", d
        assert why in d.reason
        ok = await policy.decide(plan(action, {"unit": "plain.service"}, s), scope)
        assert ok.verdict is Ruling.RUN, ok
    assert st.calls()[0] == ["systemctl", "show", SHOW, "--", "odd.service"]


async def test_alias_and_template_of_never_started_unit(tmp_path: Path) -> None:
    st = make_standins(tmp_path, {
        "sneaky.service": {"id": "emergency.service",
                           "names": ["emergency.service", "sneaky.service"]},
    })
    s = settings_for(tmp_path, st, unit_check="always", autonomy="auto-full",
                     allow_auto_full=True)
    policy = Policy(s, MemoryRunLedger(), UnitInventory(s, str(st.bindir / "systemctl")))
    d = await policy.decide(plan("start_unit", {"unit": "sneaky.service"}, s),
                            IncidentScope("inc_1", frozenset({"sneaky.service"})))
    assert d.code == "never_started" and "emergency.service" in d.reason
    # without asking systemd the names still count, templates included
    s2 = settings_for(tmp_path, st, autonomy="auto-full", allow_auto_full=True)
    d = await Policy(s2, MemoryRunLedger()).decide(
        plan("start_unit", {"unit": "initrd-foo@x.service"}, s2),
        IncidentScope("inc_1", frozenset({"initrd-foo@x.service"})))
    assert d.code == "never_started"


# -- configuration: protection that cannot silently miss ---------------------------------------


@pytest.mark.parametrize("written", ["postgresql", "postgresql.service"])
async def test_protected_unit_with_or_without_suffix(tmp_path: Path, written: str) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-full",
                     allow_auto_full=True, protected_units=[written])
    assert s.actions.protected_units == ["postgresql.service"]
    scope = IncidentScope("inc_1", frozenset({"postgresql.service"}))
    d = await Policy(s, MemoryRunLedger()).decide(
        plan("restart_unit", {"unit": "postgresql.service"}, s), scope)
    assert d.verdict is Ruling.REFUSE and d.code == "protected_unit"


@pytest.mark.parametrize("written", ["worker@", "worker@.service"])
async def test_protected_template_protects_instances(tmp_path: Path, written: str) -> None:
    s = settings_for(tmp_path, make_standins(tmp_path), autonomy="auto-full",
                     allow_auto_full=True, protected_units=[written])
    assert s.actions.protected_units == ["worker@.service"]
    d = await Policy(s, MemoryRunLedger()).decide(
        plan("restart_unit", {"unit": "worker@3.service"}, s),
        IncidentScope("inc_1", frozenset({"worker@3.service"})))
    assert d.code == "protected_unit"


def test_protected_units_normalised_as_systemctl_reads_them() -> None:
    got = Settings(actions={"protected_units": [  # type: ignore[arg-type]
        "postgresql", "my.app", "redis.socket", "getty@tty1", "postgresql.service"]})
    assert got.actions.protected_units == [
        "postgresql.service", "my.app.service", "redis.socket", "getty@tty1.service"]


def _config_error(tmp_path: Path, actions: dict) -> list[str]:
    cfg = write_toml(tmp_path / "config.toml", {"state_dir": str(tmp_path / "s"),
                                                "actions": actions})
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    return info.value.lines


def test_config_errors_are_one_readable_line(tmp_path: Path) -> None:
    [line] = _config_error(tmp_path, {"allowlist": ["restart-unit", "disk_usage"]})
    assert line.startswith("actions.allowlist: not in the action catalog: 'restart-unit' ")
    assert "restart_unit" in line and "\n" not in line
    [line] = _config_error(tmp_path, {"per_action_autonomy": {"restart": "auto-safe"}})
    assert line.startswith("actions.per_action_autonomy: not in the action catalog: 'restart'")
    [line] = _config_error(tmp_path, {"protected_units": ["postgres*"]})
    assert line.startswith("actions.protected_units: 'postgres*' is not a unit name")


def test_config_check_and_show_agree_with_start_up(tmp_path: Path) -> None:
    """`config check` fails on what start-up refuses; `config show` prints what runs."""
    bad = write_toml(tmp_path / "bad.toml", {"state_dir": str(tmp_path / "s"),
                                             "actions": {"allowlist": ["rm"]}})
    r = run_cli("--config", str(bad), "config", "check")
    assert r.returncode != 0
    assert [ln for ln in r.stderr.splitlines() if "allowlist" in ln] == [
        f"ai-sysadmin: config: actions.allowlist: not in the action catalog: 'rm' (catalog: "
        f"{', '.join(CATALOG)}) (from {bad} or AI_SYSADMIN_* environment)"]
    good = write_toml(tmp_path / "good.toml", {"state_dir": str(tmp_path / "s"),
                                               "actions": {"protected_units": ["postgresql"],
                                                           "allowlist": []}})
    assert run_cli("--config", str(good), "config", "check").returncode == 0
    shown = run_cli("--config", str(good), "config", "show")
    assert '"postgresql.service"' in shown.stdout and '"allowlist": []' in shown.stdout


async def test_empty_allowlist_allows_nothing_absent_allows_the_catalog(tmp_path: Path) -> None:
    st = make_standins(tmp_path)
    none = settings_for(tmp_path, st, autonomy="auto-full", allow_auto_full=True, allowlist=[])
    for name, params in BY_RISK.values():
        d = await Policy(none, MemoryRunLedger()).decide(plan(name, params, none), SCOPE)
        assert d.verdict is Ruling.REFUSE and d.code == "not_allowlisted", name
    every = settings_for(tmp_path, st, autonomy="auto-full", allow_auto_full=True)
    assert every.actions.allowlist is None
    d = await Policy(every, MemoryRunLedger()).decide(plan(*BY_RISK["read-only"], every), SCOPE)
    assert d.verdict is Ruling.RUN

"""Policy: given a planned catalog action, decide run / wait for approval / refuse.

Order of checks (the first that fails refuses the proposal):

1. allowlist (``actions.allowlist``) — actions outside it are refused outright;
2. unit existence on the host (``actions.unit_check``): ``systemctl show`` gives the
   unit's real name (Id), its aliases (Names) and the properties below;
3. protected units and processes — changes never touch them (read-only actions may
   look at them); units are matched exactly by name, by their systemd aliases and
   templates, and by the protected prefixes (``systemd-``);
4. never started — start/restart of a mode-switching unit (NEVER_START_UNITS), of a
   unit that refuses manual start, may be isolated, would reboot/power off/exit
   (``*Action=``), or pulls one of NEVER_START_UNITS in directly: refused at every
   autonomy level and on approval too;
5. kill switch — no change runs while it is on (read-only still does);
6. rate limits — per action and per unit, changes per rolling hour.

Then the autonomy level of the action (``per_action_autonomy`` else ``autonomy``)
against the catalog's risk class gives run or wait:

=========  =========  =====  ======  =====
autonomy   read-only  low    medium  high
=========  =========  =====  ======  =====
observe    wait       wait   wait    wait
suggest    run        wait   wait    wait
auto-safe  run        run    wait    wait
auto-full  run        run    run     wait
=========  =========  =====  ======  =====

``auto-full`` counts only with ``allow_auto_full = true``; otherwise it acts as
``auto-safe``. High risk always waits for a human.

Last, the incident's scope: a change runs without an admin only on a unit that the
incident's recorded evidence names (``IncidentScope``); anything else — another unit, a
process outside those units, a host-wide change, a proposal without an incident —
waits for approval whatever the autonomy level says.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from layers.actions.catalog import PlannedAction, Refusal, Risk, check_unit_name, unit_template
from layers.config import AutonomyLevel, Settings
from layers.events import Event


class Ruling(StrEnum):
    RUN = "run"
    WAIT = "wait"
    REFUSE = "refuse"


@dataclass(frozen=True)
class PolicyDecision:
    verdict: Ruling
    code: str
    reason: str


RUNS_AT: dict[AutonomyLevel, frozenset[Risk]] = {
    "observe": frozenset(),
    "suggest": frozenset({Risk.READ_ONLY}),
    "auto-safe": frozenset({Risk.READ_ONLY, Risk.LOW}),
    "auto-full": frozenset({Risk.READ_ONLY, Risk.LOW, Risk.MEDIUM}),
}


def effective_autonomy(action: str, settings: Settings) -> AutonomyLevel:
    cfg = settings.actions
    level = cfg.per_action_autonomy.get(action, cfg.autonomy)
    if level == "auto-full" and not cfg.allow_auto_full:
        return "auto-safe"
    return level


def autonomy_verdict(planned: PlannedAction, settings: Settings) -> PolicyDecision:
    level = effective_autonomy(planned.name, settings)
    if planned.risk in RUNS_AT[level]:
        return PolicyDecision(Ruling.RUN, "autonomy", f"{planned.risk} action runs at autonomy {level}")
    return PolicyDecision(
        Ruling.WAIT, "needs_approval", f"{planned.risk} action waits for approval at {level}"
    )


# -- kill switch ------------------------------------------------------------------------


def kill_switch_path(settings: Settings) -> Path:
    return settings.actions.kill_switch_file or settings.state_dir / "actions.kill"


def kill_switch_engaged(settings: Settings) -> bool:
    return settings.actions.kill_switch or kill_switch_path(settings).exists()


# -- units never started ------------------------------------------------------------------

# Units no automated action may start or restart, at any autonomy level and on approval
# too: they switch the system's mode (rescue, emergency), shut it down, reboot, suspend,
# belong to the initrd, or switch the NixOS generation. Matched on every name systemd
# reports for the unit (aliases: ctrl-alt-del.target is reboot.target) and on templates.
NEVER_START_UNITS: frozenset[str] = frozenset({
    "emergency.target", "emergency.service", "rescue.target", "rescue.service",
    "halt.target", "poweroff.target", "reboot.target", "kexec.target", "soft-reboot.target",
    "ctrl-alt-del.target", "exit.target", "shutdown.target", "final.target",
    "halt.service", "poweroff.service", "reboot.service", "kexec.service",
    "ctrl-alt-del.service",
    "systemd-halt.service", "systemd-poweroff.service", "systemd-reboot.service",
    "systemd-kexec.service", "systemd-soft-reboot.service", "systemd-exit.service",
    "sleep.target", "suspend.target", "hibernate.target", "hybrid-sleep.target",
    "suspend-then-hibernate.target", "systemd-suspend.service", "systemd-hibernate.service",
    "systemd-hybrid-sleep.service", "systemd-suspend-then-hibernate.service",
    "system-update.target", "system-update-pre.target",
    "nixos-upgrade.service", "ai-sysadmin-rollback.service",
})
NEVER_START_PREFIXES: tuple[str, ...] = ("initrd-", "initrd.")
# Unit properties that mean "starting this ends or switches the running system" when set
# to anything but none: reboot, poweroff, halt, kexec, exit (and their -force/-immediate).
ACTION_PROPERTIES = ("SuccessAction", "FailureAction", "JobTimeoutAction", "StartLimitAction")
# Units a start pulls in, or starts later (OnFailure/OnSuccess, a timer's or path's
# Triggers): checked against NEVER_START_UNITS by name (one level, not recursively).
DEPENDENCY_PROPERTIES = ("Requires", "Wants", "BindsTo", "Upholds", "OnFailure", "OnSuccess",
                         "Triggers")
SHOW_PROPERTIES = ("Id", "Names", "LoadState", "RefuseManualStart", "AllowIsolate",
                   *ACTION_PROPERTIES, *DEPENDENCY_PROPERTIES)


def name_forms(unit: str) -> set[str]:
    """A unit name with its template forms: ``getty@tty1.service`` is also
    ``getty@.service`` and ``getty.service`` for matching against lists."""
    forms = {unit}
    template = unit_template(unit)
    if template is not None:
        forms.add(template)
        forms.add(template.replace("@.", "."))
    return forms


def never_started(names: Iterable[str]) -> str | None:
    """The first of ``names`` (with template forms) that is on the never-start list."""
    for name in sorted(names):
        for form in name_forms(name):
            if form in NEVER_START_UNITS or form.startswith(NEVER_START_PREFIXES):
                return name
    return None


# -- the host's units ---------------------------------------------------------------------


@dataclass(frozen=True)
class UnitInfo:
    names: frozenset[str]  # the canonical Id and every alias
    load_state: str
    properties: dict[str, str] = field(default_factory=dict)

    def start_hazard(self) -> str | None:
        """Why systemd's own description of this unit forbids starting it, if it does."""
        props = self.properties
        if props.get("RefuseManualStart") == "yes":
            return "RefuseManualStart=yes"
        if props.get("AllowIsolate") == "yes":
            return "AllowIsolate=yes (it can switch the system's mode)"
        for key in ACTION_PROPERTIES:
            value = props.get(key, "")
            if value not in ("", "none"):
                return f"{key}={value}"
        for key in DEPENDENCY_PROPERTIES:
            hit = never_started(props.get(key, "").split())
            if hit is not None:
                return f"{key}= pulls in {hit}"
        return None


class UnitInventory:
    """Asks systemd (``systemctl show``) what a unit name really refers to."""

    def __init__(self, settings: Settings, systemctl: str) -> None:
        self.settings = settings
        self.systemctl = systemctl

    @staticmethod
    def enabled(settings: Settings) -> bool:
        mode = settings.actions.unit_check
        if mode == "auto":
            return Path("/run/systemd/system").is_dir()
        return mode == "always"

    async def describe(self, unit: str) -> UnitInfo:
        env = {"PATH": self.settings.actions.search_path or os.environ.get("PATH", ""),
               "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        proc = await asyncio.create_subprocess_exec(
            self.systemctl, "show", "--property=" + ",".join(SHOW_PROPERTIES), "--", unit,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=env,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise Refusal("unit_check_failed", f"{unit}: systemctl show timed out") from None
        if proc.returncode != 0:
            raise Refusal("unit_check_failed", f"{unit}: systemctl show failed")
        props: dict[str, str] = {}
        for line in out.decode("utf-8", "replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key in SHOW_PROPERTIES:
                props[key] = value
        names = {unit, props.get("Id", unit), *props.get("Names", "").split()}
        return UnitInfo(frozenset(n for n in names if n), props.get("LoadState", ""), props)


# -- the incident's scope -------------------------------------------------------------------


@dataclass(frozen=True)
class IncidentScope:
    """The units an incident's recorded evidence is about: the only ones a change may
    touch without an admin. Empty for proposals without an incident."""

    incident_id: str | None
    units: frozenset[str]

    def describe(self) -> str:
        if self.incident_id is None:
            return "no incident"
        shown = ", ".join(sorted(self.units)) or "no unit"
        return f"incident {self.incident_id} is about {shown}"


NO_SCOPE = IncidentScope(None, frozenset())


def evidence_units(events: Iterable[Event]) -> frozenset[str]:
    """Units that events' recorded fields tie to them — never their message text.

    A journal entry names its unit in ``_SYSTEMD_UNIT`` (set by journald from the
    sender's cgroup, not forgeable) or, for systemd's own messages about a unit (``_PID``
    1), in ``UNIT``. Any local process can put ``UNIT=`` in its own entries, so from
    anyone else it counts for nothing. Events without journald's fields (failed-unit
    polls, events posted to the API) are taken at their ``unit`` field."""
    units: set[str] = set()
    for ev in events:
        fields = ev.fields
        if ev.source == "journald" and "_PID" in fields:
            named = [fields.get("_SYSTEMD_UNIT")]
            if str(fields.get("_PID")) == "1":
                named.append(fields.get("UNIT"))
        else:
            named = [ev.unit]
        for unit in named:
            if isinstance(unit, str) and unit != "init.scope":
                try:
                    units.add(check_unit_name(unit))
                except ValueError:
                    continue
    return frozenset(units)


# -- run history for rate limits ------------------------------------------------------------


class RunHistory(Protocol):
    """Runs of changes started since a time (epoch seconds), for the rate limits."""

    async def count_runs(self, *, since: float, action: str | None = None,
                         unit: str | None = None) -> int: ...


class MemoryRunLedger:
    """In-process run history (the root helper's own, independent count)."""

    def __init__(self) -> None:
        self._runs: deque[tuple[float, str, tuple[str, ...]]] = deque()

    def record(self, action: str, units: list[str], at: float | None = None) -> None:
        self._runs.append((time.time() if at is None else at, action, tuple(units)))
        while self._runs and self._runs[0][0] < time.time() - 3600:
            self._runs.popleft()

    async def count_runs(self, *, since: float, action: str | None = None,
                         unit: str | None = None) -> int:
        return sum(
            1
            for at, a, units in self._runs
            if at >= since and (action is None or a == action) and (unit is None or unit in units)
        )


# -- the policy -----------------------------------------------------------------------------


class Policy:
    """Everything except the autonomy matrix that can refuse a planned action."""

    def __init__(self, settings: Settings, history: RunHistory,
                 inventory: UnitInventory | None = None) -> None:
        self.settings = settings
        self.history = history
        self.inventory = inventory

    def is_protected_name(self, unit: str) -> bool:
        # sshd@<conn>.service is an sshd: instances of protected templates and of units
        # whose plain name is protected are protected too.
        cfg = self.settings.actions
        return any(
            c in cfg.protected_units or any(c.startswith(p) for p in cfg.protected_unit_prefixes)
            for c in name_forms(unit)
        )

    async def screen(self, planned: PlannedAction) -> frozenset[str]:
        """Refuse what may never run, whatever the autonomy (raises Refusal). Returns
        every name of the units it targets (as given, and as systemd resolves them)."""
        cfg = self.settings.actions
        if cfg.allowlist is not None and planned.name not in cfg.allowlist:
            raise Refusal("not_allowlisted", f"{planned.name} is not in actions.allowlist")
        targets: set[str] = set()
        for unit in planned.params.units():
            names = {unit}
            info = None
            if self.inventory is not None and UnitInventory.enabled(self.settings):
                info = await self.inventory.describe(unit)
                if info.load_state in ("not-found", ""):
                    raise Refusal("unknown_unit", f"{unit}: no such unit on this host")
                names |= info.names
            targets |= names
            if planned.spec.is_change:
                hit = sorted(n for n in names if self.is_protected_name(n))
                if hit:
                    raise Refusal("protected_unit", f"{', '.join(hit)} is protected")
            if planned.spec.starts_unit:
                never = never_started(names)
                if never is not None:
                    raise Refusal("never_started", f"{unit}: {never} is never started or "
                                  "restarted by an action (it switches or ends the "
                                  "running system)")
                hazard = info.start_hazard() if info is not None else None
                if hazard is not None:
                    raise Refusal("never_started", f"{unit}: never started or restarted by "
                                  f"an action: systemd reports {hazard}")
        if planned.spec.is_change:
            for pid in planned.params.pids():
                self._screen_pid(pid)
            if kill_switch_engaged(self.settings):
                raise Refusal("kill_switch", "the kill switch is on: no change runs")
        return frozenset(targets)

    def in_scope(self, planned: PlannedAction, targets: frozenset[str],
                 scope: IncidentScope) -> PolicyDecision | None:
        """None when the change is about the incident; else why it waits for an admin."""
        if not planned.spec.is_change:
            return None
        if planned.params.units():
            if targets & scope.units:
                return None
            what = ", ".join(planned.params.units())
        elif planned.params.pids():
            units = {u for pid in planned.params.pids() for u in pid_units(pid)}
            if units and units & scope.units:
                return None
            what = f"pid {', '.join(map(str, planned.params.pids()))}" + (
                f" ({', '.join(sorted(units))})" if units else " (in no unit)")
        else:
            what = "the whole host"
        return PolicyDecision(
            Ruling.WAIT, "outside_incident",
            f"{planned.name} changes {what}, not what the incident is about "
            f"({scope.describe()}): waits for an admin",
        )

    def _screen_pid(self, pid: int) -> None:
        if pid in (1, os.getpid(), os.getppid()):
            raise Refusal("protected_process", f"pid {pid} is protected")
        if not Path(f"/proc/{pid}").exists():
            raise Refusal("no_such_process", f"pid {pid}: no such process")
        for part in sorted(pid_units(pid)):
            if self.is_protected_name(part):
                raise Refusal("protected_process", f"pid {pid} belongs to protected {part}")

    async def check_rate(self, planned: PlannedAction, now: float | None = None) -> None:
        """Refuse a change beyond its per-action or per-unit hourly budget."""
        if not planned.spec.is_change:
            return
        cfg = self.settings.actions
        since = (time.time() if now is None else now) - 3600
        done = await self.history.count_runs(since=since, action=planned.name)
        if done >= cfg.max_runs_per_action_per_hour:
            raise Refusal(
                "rate_limited",
                f"{planned.name} ran {done} times in the last hour "
                f"(max_runs_per_action_per_hour = {cfg.max_runs_per_action_per_hour})",
            )
        for unit in planned.params.units():
            done = await self.history.count_runs(since=since, unit=unit)
            if done >= cfg.max_runs_per_unit_per_hour:
                raise Refusal(
                    "rate_limited",
                    f"{unit} was changed {done} times in the last hour "
                    f"(max_runs_per_unit_per_hour = {cfg.max_runs_per_unit_per_hour})",
                )

    async def decide(self, planned: PlannedAction, scope: IncidentScope) -> PolicyDecision:
        """Refuse, wait or run a proposal of the incident ``scope`` (NO_SCOPE: none)."""
        try:
            targets = await self.screen(planned)
            verdict = autonomy_verdict(planned, self.settings)
            if verdict.verdict is Ruling.RUN:
                verdict = self.in_scope(planned, targets, scope) or verdict
            if verdict.verdict is Ruling.RUN:
                await self.check_rate(planned)
        except Refusal as refusal:
            return PolicyDecision(Ruling.REFUSE, refusal.code, refusal.message)
        return verdict


def pid_units(pid: int) -> set[str]:
    """The units (``nginx.service``, ``session-3.scope``, slices) of a process's cgroup."""
    try:
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return set()
    units = set()
    for line in cgroup.splitlines():
        for part in line.rpartition(":")[2].split("/"):
            if part and "." in part:
                units.add(part)
    return units

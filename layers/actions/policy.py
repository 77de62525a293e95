"""Policy: given a planned catalog action, decide run / wait for approval / refuse.

Order of checks (the first that fails refuses the proposal):

1. allowlist (``actions.allowlist``) — actions outside it are refused outright;
2. protected units and processes — changes never touch them (read-only actions may
   look at them); units are matched exactly by name, by their systemd aliases and
   templates when systemd can be asked, and by the protected prefixes (``systemd-``);
3. unit existence on the host (``actions.unit_check``);
4. kill switch — no change runs while it is on (read-only still does);
5. rate limits — per action and per unit, changes per rolling hour.

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
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from layers.actions.catalog import PlannedAction, Refusal, Risk, unit_template
from layers.config import AutonomyLevel, Settings


class Verdict(StrEnum):
    RUN = "run"
    WAIT = "wait"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
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


def autonomy_verdict(planned: PlannedAction, settings: Settings) -> Decision:
    level = effective_autonomy(planned.name, settings)
    if planned.risk in RUNS_AT[level]:
        return Decision(Verdict.RUN, "autonomy", f"{planned.risk} action runs at autonomy {level}")
    return Decision(
        Verdict.WAIT, "needs_approval", f"{planned.risk} action waits for approval at {level}"
    )


# -- kill switch ------------------------------------------------------------------------


def kill_switch_path(settings: Settings) -> Path:
    return settings.actions.kill_switch_file or settings.state_dir / "actions.kill"


def kill_switch_engaged(settings: Settings) -> bool:
    return settings.actions.kill_switch or kill_switch_path(settings).exists()


# -- the host's units ---------------------------------------------------------------------


@dataclass(frozen=True)
class UnitInfo:
    names: frozenset[str]  # the canonical Id and every alias
    load_state: str


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
               "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            self.systemctl, "show", "--property=Id,Names,LoadState", "--", unit,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=env,
        )  # fmt: skip
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
            if sep:
                props[key] = value
        names = {unit, props.get("Id", unit), *props.get("Names", "").split()}
        return UnitInfo(frozenset(n for n in names if n), props.get("LoadState", ""))


# -- run history for rate limits ------------------------------------------------------------


class RunHistory(Protocol):
    """Runs of changes started since a time (epoch seconds), for the rate limits."""

    async def count_runs(self, *, since: float, action: str | None = None,
                         unit: str | None = None) -> int: ...  # fmt: skip


class MemoryRunLedger:
    """In-process run history (the root helper's own, independent count)."""

    def __init__(self) -> None:
        self._runs: deque[tuple[float, str, tuple[str, ...]]] = deque()

    def record(self, action: str, units: list[str], at: float | None = None) -> None:
        self._runs.append((time.time() if at is None else at, action, tuple(units)))
        while self._runs and self._runs[0][0] < time.time() - 3600:
            self._runs.popleft()

    async def count_runs(self, *, since: float, action: str | None = None,
                         unit: str | None = None) -> int:  # fmt: skip
        return sum(
            1
            for at, a, units in self._runs
            if at >= since and (action is None or a == action) and (unit is None or unit in units)
        )


# -- the policy -----------------------------------------------------------------------------


class Policy:
    """Everything except the autonomy matrix that can refuse a planned action."""

    def __init__(self, settings: Settings, history: RunHistory,
                 inventory: UnitInventory | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.history = history
        self.inventory = inventory

    def is_protected_name(self, unit: str) -> bool:
        cfg = self.settings.actions
        candidates = {unit}
        template = unit_template(unit)
        if template is not None:
            # sshd@<conn>.service is an sshd: protect instances of protected templates and
            # of units whose plain name is protected.
            candidates.add(template)
            candidates.add(template.replace("@.", "."))
        return any(
            c in cfg.protected_units or any(c.startswith(p) for p in cfg.protected_unit_prefixes)
            for c in candidates
        )

    async def screen(self, planned: PlannedAction) -> None:
        """Refuse what may never run, whatever the autonomy (raises Refusal)."""
        cfg = self.settings.actions
        if cfg.allowlist is not None and planned.name not in cfg.allowlist:
            raise Refusal("not_allowlisted", f"{planned.name} is not in actions.allowlist")
        for unit in planned.params.units():
            names = {unit}
            if self.inventory is not None and UnitInventory.enabled(self.settings):
                info = await self.inventory.describe(unit)
                if info.load_state in ("not-found", ""):
                    raise Refusal("unknown_unit", f"{unit}: no such unit on this host")
                names |= info.names
            if planned.spec.is_change:
                hit = sorted(n for n in names if self.is_protected_name(n))
                if hit:
                    raise Refusal("protected_unit", f"{', '.join(hit)} is protected")
        if planned.spec.is_change:
            for pid in planned.params.pids():
                self._screen_pid(pid)
            if kill_switch_engaged(self.settings):
                raise Refusal("kill_switch", "the kill switch is on: no change runs")

    def _screen_pid(self, pid: int) -> None:
        if pid in (1, os.getpid(), os.getppid()):
            raise Refusal("protected_process", f"pid {pid} is protected")
        try:
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        except FileNotFoundError:
            raise Refusal("no_such_process", f"pid {pid}: no such process") from None
        except OSError:
            cgroup = ""
        for line in cgroup.splitlines():
            for part in line.rpartition(":")[2].split("/"):
                if part and "." in part and self.is_protected_name(part):
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

    async def decide(self, planned: PlannedAction) -> Decision:
        try:
            await self.screen(planned)
            verdict = autonomy_verdict(planned, self.settings)
            if verdict.verdict is Verdict.RUN:
                await self.check_rate(planned)
        except Refusal as refusal:
            return Decision(Verdict.REFUSE, refusal.code, refusal.message)
        return verdict

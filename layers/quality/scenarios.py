"""Incident scenarios, in the shape of HolmesGPT's investigation fixtures: one directory
per scenario under ``layers/quality/scenarios/`` holding

- ``journal.jsonl`` — the journal excerpt, as ``journalctl --output=json`` prints it;
- ``scenario.toml`` — the machine's state (units, metrics, processes, ``[nixos]``
  generations and the closure diff of the last switch), the ground truth (``[truth]``:
  root-cause unit, category, escalate or not, expected, allowed and forbidden actions)
  and optional ``[[recording]]`` outputs of read-only actions.

Every read-only catalog action has a recorded output for every scenario: given
verbatim by a ``[[recording]]``, or rendered from the scenario's own state in the
format the real program prints (``systemctl``, ``journalctl``, ``df``, ``free``, ``ps``,
``nix-env``, ``nix store diff-closures``), so what an investigation would show always
agrees with the journal and metrics. Generations are printed in this machine's local
time, as ``nix-env`` does, so the switch correlation reads them as it reads the real one.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from layers.actions.catalog import CATALOG, Refusal, Risk, lookup, validate_params
from layers.collectors.journald import parse_entry
from layers.collectors.units import failed_unit_event
from layers.errors import UserError
from layers.events import Event
from layers.quality.scoring import Truth


class ScenarioError(UserError):
    """A scenario directory that cannot be used; one readable line."""


@dataclass(frozen=True)
class UnitState:
    unit: str
    description: str
    active: str = "active"  # active | failed | activating | inactive
    sub: str = "running"
    result: str = "success"
    since: float = 0.0
    main_pid: int | None = None


@dataclass(frozen=True)
class Recording:
    action: str
    params: dict[str, Any]
    output: str


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    host: str
    journal: list[dict[str, Any]]
    units: list[UnitState]
    metrics: dict[str, Any]
    truth: Truth
    processes: list[dict[str, Any]] = field(default_factory=list)
    recordings: list[Recording] = field(default_factory=list)
    # [nixos]: generations = [[number, epoch seconds], ...] (the last is current) and
    # closure_diff (what `nix store diff-closures` printed for previous → current).
    nixos: dict[str, Any] = field(default_factory=dict)

    # -- what the collectors would post ----------------------------------------------

    def events(self) -> list[Event]:
        """Journal entries, failed units and a metrics sample, as the collectors post them."""
        out = []
        for entry in self.journal:
            ev = parse_entry(entry, self.host)
            if ev is not None:
                out.append(ev)
        last = max((e.timestamp for e in out), default=0.0)
        for u in self.units:
            if u.active == "failed":
                out.append(failed_unit_event(
                    {"unit": u.unit, "active": u.active, "sub": u.sub,
                     "description": u.description, "load": "loaded"},
                    self.host, u.since or last))
        out += self.metric_events(last)
        return out

    def metric_events(self, ts: float) -> list[Event]:
        events = []
        for metric, value in self.metrics.items():
            if metric == "disk_used_percent":
                for mount, v in dict(value).items():
                    events.append(Event(
                        id=f"{self.id}-disk-{mount}"[:128], host=self.host, source="metrics",
                        priority=6, message=f"disk_used_percent on {mount} = {float(v):.1f}",
                        fields={"metric": metric, "value": float(v), "mountpoint": mount},
                        timestamp=ts))
            elif isinstance(value, int | float):
                events.append(Event(
                    id=f"{self.id}-{metric}"[:128], host=self.host, source="metrics",
                    priority=6, message=f"{metric} = {float(value):.1f}",
                    fields={"metric": metric, "value": float(value)}, timestamp=ts))
        return events

    def metrics_lines(self) -> list[str]:
        """The review prompt's metrics block, in the live snapshot's format
        (``layers.pipeline.stages.metrics_snapshot``) but with the scenario's values."""
        m = self.metrics
        cpus = int(m.get("cpus", 4))
        load = float(m.get("load1_per_core", 0.2)) * cpus
        lines = [f"host {self.host}: load {load:.2f} {load * 0.9:.2f} {load * 0.7:.2f} "
                 f"on {cpus} CPUs",
                 f"memory {float(m.get('memory_used_percent', 30)):.0f}% used of "
                 f"{float(m.get('memory_total_gib', 15.6)):.1f} GiB"]
        disks = dict(m.get("disk_used_percent", {}))
        if "/" in disks:
            lines.append(f"root disk {float(disks['/']):.0f}% used")
        return lines

    # -- read-only actions ------------------------------------------------------------

    def recording(self, action: str, params: Mapping[str, Any]) -> str | None:
        """What the read-only ``action`` printed on this machine; None for changes and
        for params the catalog refuses (the action stage would refuse them too)."""
        try:
            spec = lookup(action)
            validated = validate_params(spec, dict(params)).model_dump()
        except Refusal:
            return None
        if spec.risk is not Risk.READ_ONLY:
            return None
        for r in self.recordings:
            if r.action == action and validate_params(spec, r.params).model_dump() == validated:
                return r.output
        return _RENDER[action](self, validated)

    def unit_state(self, unit: str) -> UnitState | None:
        return next((u for u in self.units if u.unit == unit), None)

    def first_timestamp(self) -> float:
        return min((int(e.get("__REALTIME_TIMESTAMP", 0)) / 1e6 for e in self.journal),
                   default=0.0)

    def generations(self) -> list[tuple[int, float]]:
        """(number, made at) of the system generations, oldest first; the last is current.
        Default: two, made 40 and 12 days before the journal starts (no recent switch)."""
        given = self.nixos.get("generations")
        if given:
            return [(int(n), float(t)) for n, t in given]
        start = self.first_timestamp()
        return [(86, start - 40 * 86400), (87, start - 12 * 86400)]


# -- renderers of read-only outputs ---------------------------------------------------


def _ts(t: float, fmt: str = "%b %d %H:%M:%S") -> str:
    return datetime.fromtimestamp(t, UTC).strftime(fmt)


def _journal_rows(sc: Scenario, unit: str | None) -> list[str]:
    rows = []
    for e in sc.journal:
        ev = parse_entry(e, sc.host)
        if ev is None or (unit is not None and ev.unit != unit):
            continue
        ident = e.get("SYSLOG_IDENTIFIER", "?")
        pid = f"[{e['_PID']}]" if "_PID" in e else ""
        rows.append(f"{_ts(ev.timestamp, '%Y-%m-%dT%H:%M:%S+0000')} {ev.host} {ident}{pid}: "
                    f"{ev.message}")
    return rows


def _render_journal_tail(sc: Scenario, p: dict[str, Any]) -> str:
    rows = _journal_rows(sc, p.get("unit"))
    rows = rows[-int(p.get("lines", 100)):]
    return "\n".join(rows) if rows else "-- No entries --"


def _render_unit_status(sc: Scenario, p: dict[str, Any]) -> str:
    unit = str(p["unit"])
    u = sc.unit_state(unit)
    if u is None:
        return f"Unit {unit} could not be found."
    mark = {"failed": "×", "active": "●", "activating": "●"}.get(u.active, "○")
    since = u.since or max((int(e.get("__REALTIME_TIMESTAMP", 0)) / 1e6 for e in sc.journal),
                           default=0.0)
    active = f"{u.active} ({u.sub})" if u.active != "failed" else f"failed (Result: {u.result})"
    lines = [
        f"{mark} {u.unit} - {u.description}",
        f"     Loaded: loaded (/etc/systemd/system/{u.unit}; enabled; preset: enabled)",
        f"     Active: {active} since {_ts(since, '%a %Y-%m-%d %H:%M:%S UTC')}",
    ]
    if u.main_pid:
        lines.append(f"   Main PID: {u.main_pid}")
    journal = _journal_rows(sc, unit)[-int(p.get("lines", 20)):]
    if journal:
        lines.append("")
        lines += journal
    return "\n".join(lines)


def _render_list_failed(sc: Scenario, _: dict[str, Any]) -> str:
    return "\n".join(f"{u.unit} loaded {u.active} {u.sub} {u.description}"
                     for u in sc.units if u.active == "failed")


def _render_memory(sc: Scenario, _: dict[str, Any]) -> str:
    total = int(float(sc.metrics.get("memory_total_gib", 15.6)) * 1024)
    used = int(total * float(sc.metrics.get("memory_used_percent", 30)) / 100)
    swap_total = int(sc.metrics.get("swap_total_mib", 4095))
    swap_used = int(swap_total * float(sc.metrics.get("swap_used_percent", 0)) / 100)
    free = max(total - used - 200, 0)
    return "\n".join([
        "               total        used        free      shared  buff/cache   available",
        f"Mem:     {total:>11} {used:>11} {free:>11} {64:>11} {200:>11} {max(total - used, 0):>11}",
        f"Swap:    {swap_total:>11} {swap_used:>11} {swap_total - swap_used:>11}",
    ])


def _render_disk(sc: Scenario, p: dict[str, Any]) -> str:
    path = str(p.get("path", "/"))
    disks = {str(k): float(v) for k, v in dict(sc.metrics.get("disk_used_percent",
                                                                {"/": 40})).items()}
    mount = max((m for m in disks if path == m or path.startswith(m.rstrip("/") + "/")
                 or m == "/"), key=len, default="/")
    pct = disks.get(mount, 40.0)
    size = float(dict(sc.metrics.get("disk_size_gib", {})).get(mount, 100))
    used = size * pct / 100
    dev = dict(sc.metrics.get("disk_device", {})).get(mount, "/dev/nvme0n1p2")
    return "\n".join([
        "Filesystem      Size  Used Avail Use% Mounted on",
        f"{dev:<15} {size:>4.0f}G {used:>4.0f}G {size - used:>4.0f}G {pct:>3.0f}% {mount}",
    ])


def _render_journal_disk(sc: Scenario, _: dict[str, Any]) -> str:
    size = sc.metrics.get("journal_size", "312.0M")
    return f"Archived and active journals take up {size} in the file system."


def _render_process(sc: Scenario, p: dict[str, Any]) -> str:
    header = "    PID    PPID USER     STAT     ELAPSED %CPU %MEM   RSS COMMAND"
    proc = next((x for x in sc.processes if int(x.get("pid", -1)) == int(p["pid"])), None)
    if proc is None:
        return header
    return header + "\n" + (
        f"{proc['pid']:>7} {proc.get('ppid', 1):>7} {proc.get('user', 'root'):<8} "
        f"{proc.get('stat', 'Ssl'):<4} {proc.get('etime', '01:02:03'):>11} "
        f"{proc.get('cpu', 0.0):>4} {proc.get('mem', 0.0):>4} {proc.get('rss', 10240):>5} "
        f"{proc.get('comm', '?')}")


def _render_unit_show(sc: Scenario, p: dict[str, Any]) -> str:
    unit = str(p["unit"])
    u = sc.unit_state(unit)
    if u is None:
        return "\n".join([f"Id={unit}", f"Names={unit}", "LoadState=not-found",
                          "ActiveState=inactive", "SubState=dead", "Result=success"])
    own = [int(e.get("__REALTIME_TIMESTAMP", 0)) / 1e6 for e in sc.journal
           if unit in (e.get("_SYSTEMD_UNIT"), e.get("UNIT"))]
    since = _ts(u.since or max(own, default=sc.first_timestamp()), "%a %Y-%m-%d %H:%M:%S UTC")
    failed = u.active == "failed"
    return "\n".join([
        f"Id={u.unit}", f"Names={u.unit}", f"Description={u.description}", "LoadState=loaded",
        f"ActiveState={u.active}", f"SubState={u.sub}", f"Result={u.result}",
        "UnitFileState=enabled", f"FragmentPath=/etc/systemd/system/{u.unit}",
        f"{'InactiveEnterTimestamp' if failed else 'ActiveEnterTimestamp'}={since}",
        f"MainPID={u.main_pid or 0}", f"ExecMainStatus={1 if failed else 0}",
        f"NRestarts={5 if failed and u.result == 'exit-code' else 0}",
        "Restart=on-failure", "Requires=sysinit.target", "Wants=network-online.target",
        "After=network-online.target sysinit.target",
    ])


def _store_hash(name: str) -> str:
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    digits = [ord(c) for c in name] or [0]
    return "".join(alphabet[(digits[i % len(digits)] * (i + 7)) % 32] for i in range(32))


def _render_unit_cat(sc: Scenario, p: dict[str, Any]) -> str:
    unit = str(p["unit"])
    u = sc.unit_state(unit)
    if u is None:
        return f"No files found for {unit}."
    name = unit.rsplit(".", 1)[0]
    kind = unit.rsplit(".", 1)[1].capitalize()
    lines = [f"# /etc/systemd/system/{unit}", "[Unit]", f"Description={u.description}",
             "After=network-online.target", "", f"[{kind}]"]
    if kind == "Service":
        lines += [f"ExecStart=/nix/store/{_store_hash(unit)}-unit-script-{name}-start/bin/"
                  f"{name}-start", "Restart=on-failure"]
    return "\n".join(lines)


def _render_kernel_log(sc: Scenario, p: dict[str, Any]) -> str:
    rows = [row for e, row in zip(sc.journal, _journal_rows_all(sc), strict=True)
            if e.get("_TRANSPORT") == "kernel" or e.get("SYSLOG_IDENTIFIER") == "kernel"]
    rows = rows[-int(p.get("lines", 100)):]
    return "\n".join(rows) if rows else "-- No entries --"


def _journal_rows_all(sc: Scenario) -> list[str]:
    out = []
    for e in sc.journal:
        ev = parse_entry(e, sc.host)
        ident = e.get("SYSLOG_IDENTIFIER", "?")
        pid = f"[{e['_PID']}]" if "_PID" in e and ident != "kernel" else ""
        ts = ev.timestamp if ev is not None else int(e.get("__REALTIME_TIMESTAMP", 0)) / 1e6
        msg = ev.message if ev is not None else str(e.get("MESSAGE", ""))
        out.append(f"{_ts(ts, '%Y-%m-%dT%H:%M:%S+0000')} {sc.host} {ident}{pid}: {msg}")
    return out


def _render_list_timers(sc: Scenario, _: dict[str, Any]) -> str:
    timers = [u for u in sc.units if u.unit.endswith(".timer")]
    if not timers:
        return "0 timers listed.\nPass --all to see loaded but inactive timers, too."
    rows = ["NEXT LEFT LAST PASSED UNIT ACTIVATES"]
    for u in timers:
        rows.append(f"- - - - {u.unit} {u.unit.rsplit('.', 1)[0]}.service")
    rows.append(f"\n{len(timers)} timers listed.")
    return "\n".join(rows)


def _render_generations(sc: Scenario, _: dict[str, Any]) -> str:
    """As nix-env prints them: local time, the current one marked."""
    gens = sc.generations()
    return "\n".join(
        f"{n:>5}   {datetime.fromtimestamp(t).strftime('%Y-%m-%d %H:%M:%S')}   "
        + ("(current)" if i == len(gens) - 1 else "")
        for i, (n, t) in enumerate(gens))


def _render_closure_diff(sc: Scenario, p: dict[str, Any]) -> str:
    numbers = [n for n, _ in sc.generations()]
    newer = p.get("to_generation") or numbers[-1]
    older = p.get("from_generation") or max((n for n in numbers if n < newer), default=None)
    if newer not in numbers or older not in numbers:
        return f"error: system generation {newer if newer not in numbers else older} not found"
    if (older, newer) == (numbers[-2], numbers[-1]):
        return str(sc.nixos.get("closure_diff", "nix: 2.24.11 → 2.24.12, +0.1 KiB\n"
                                                "tzdata: 2024b → 2025a"))
    return "nix: 2.24.10 → 2.24.12, +0.3 KiB"


_RENDER = {
    "journal_tail": _render_journal_tail,
    "unit_status": _render_unit_status,
    "list_failed_units": _render_list_failed,
    "memory_usage": _render_memory,
    "disk_usage": _render_disk,
    "journal_disk_usage": _render_journal_disk,
    "process_status": _render_process,
    "unit_show": _render_unit_show,
    "unit_cat": _render_unit_cat,
    "kernel_log": _render_kernel_log,
    "list_timers": _render_list_timers,
    "nixos_generations": _render_generations,
    "nixos_closure_diff": _render_closure_diff,
}
assert set(_RENDER) == {n for n, s in CATALOG.items() if s.risk is Risk.READ_ONLY}, \
    "every read-only catalog action needs a renderer"


# -- loading ----------------------------------------------------------------------------


def _load_one(path: Path) -> Scenario:
    try:
        data = tomllib.loads((path / "scenario.toml").read_text(encoding="utf-8"))
        journal = [json.loads(line) for line in
                   (path / "journal.jsonl").read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"scenario {path.name}: {exc}") from exc
    try:
        t = data["truth"]
        truth = Truth(
            escalate=bool(t["escalate"]), category=str(t["category"]),
            root_unit=t.get("root_unit") or None, root_terms=tuple(t.get("root_terms", ())),
            expected=tuple(t.get("expected", ())), allowed=tuple(t.get("allowed", ())),
            forbidden=tuple(t.get("forbidden", ())),
        )
        for spec in truth.expected + truth.allowed + truth.forbidden:
            lookup(spec.partition(":")[0])
        return Scenario(
            id=path.name, title=str(data["title"]), host=str(data["host"]), journal=journal,
            units=[UnitState(**u) for u in data.get("units", [])],
            metrics=dict(data.get("metrics", {})), truth=truth,
            processes=list(data.get("processes", [])),
            recordings=[Recording(r["action"], dict(r.get("params", {})), r["output"])
                        for r in data.get("recording", [])],
            nixos=dict(data.get("nixos", {})),
        )
    except (KeyError, TypeError, Refusal) as exc:
        raise ScenarioError(f"scenario {path.name}: {exc}") from exc


def scenario_root() -> Path:
    return Path(str(resources.files("layers.quality").joinpath("scenarios")))


def load(root: Path | None = None) -> list[Scenario]:
    """Every scenario under ``root`` (default: the packaged ones), in directory order."""
    base = root or scenario_root()
    dirs = sorted(p for p in base.iterdir() if (p / "scenario.toml").is_file())
    if not dirs:
        raise ScenarioError(f"no scenarios under {base}")
    return [_load_one(p) for p in dirs]

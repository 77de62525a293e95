"""The typed action catalog: the only things ai-sysadmin can ever run.

Each entry fixes, in code, what a proposal cannot change: the program, the shape of its
argv, the risk class and the timeout. A proposal only chooses an entry by exact name and
fills a strict parameter schema (extra keys forbidden, types strict, unit names checked
against systemd's naming rules). Nothing in a proposal is ever spliced into a string that
a shell or a program re-parses: every parameter becomes exactly one argv element, after a
``--`` where the program supports it, so a value can never turn into an option or a second
command.

Programs are resolved to absolute paths when an action is planned: from
``actions.binaries`` when configured there, else from ``actions.search_path`` (or the
process's own PATH). The dry run shows that absolute path, so what an approver reads is
exactly what runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from layers.config import Settings
from layers.errors import Refused


class Risk(StrEnum):
    """Risk classes, fixed per catalog entry; a proposal never states or changes one."""

    READ_ONLY = "read-only"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Refusal(Refused):
    """A proposal that may not run, with a stable machine-readable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- parameter types ----------------------------------------------------------------

# systemd unit names (systemd.unit(5)): at most 255 bytes of ASCII letters, digits and
# ":-_.\\", an optional "@instance" part, and a type suffix. We are stricter than systemd:
# the name must carry its suffix (so "sshd" cannot slip past a protected "sshd.service"),
# must not start with "-" (never an option, and "-.mount"/"-.slice" are the root mount and
# slice), and backslash escapes are refused.
UNIT_TYPES = (
    "service", "socket", "target", "device", "mount", "automount",
    "swap", "timer", "path", "slice", "scope",
)
_UNIT_RE = re.compile(
    r"(?P<prefix>[A-Za-z0-9_:][A-Za-z0-9_:.\-]*)"
    r"(?:@(?P<instance>[A-Za-z0-9_:.\-]+))?"
    r"\.(?P<type>" + "|".join(UNIT_TYPES) + r")",
    re.ASCII,
)
UNIT_NAME_MAX = 255


def check_unit_name(value: str) -> str:
    if not value.isascii() or not value.isprintable():
        raise ValueError("unit name must be printable ASCII")
    if len(value) > UNIT_NAME_MAX:
        raise ValueError(f"unit name longer than {UNIT_NAME_MAX} characters")
    if _UNIT_RE.fullmatch(value) is None:
        raise ValueError(
            "not a systemd unit name: expected NAME[@INSTANCE].TYPE with letters, digits, "
            "':', '_', '.', '-' and a type suffix such as .service"
        )
    return value


_TEMPLATE_RE = re.compile(
    r"[A-Za-z0-9_:][A-Za-z0-9_:.\-]*@\.(?:" + "|".join(UNIT_TYPES) + r")", re.ASCII
)


def normalise_protected_unit(value: str) -> str:
    """A unit of ``actions.protected_units`` as written -> the exact name it protects.

    A name without a unit type suffix means ``.service``, as ``systemctl restart
    postgresql`` reads it: ``postgresql`` -> ``postgresql.service``, ``worker@`` ->
    ``worker@.service`` (a template: protects every instance). Anything that is then
    neither a unit name nor a template (globs, spaces, ...) is an error, never ignored."""
    name = value
    if "." not in name or name.rsplit(".", 1)[1] not in UNIT_TYPES:
        name = f"{name}.service"
    if (not name.isascii() or not name.isprintable() or len(name) > UNIT_NAME_MAX
            or (_UNIT_RE.fullmatch(name) is None and _TEMPLATE_RE.fullmatch(name) is None)):
        raise ValueError(
            f"{value!r} is not a unit name: expected NAME[@INSTANCE][.TYPE] or a template "
            "NAME@[.TYPE], exact (no globs); without .TYPE it means .service"
        )
    return name


def unit_template(unit: str) -> str | None:
    """``getty@tty1.service`` -> ``getty@.service``; None for non-instance units."""
    m = _UNIT_RE.fullmatch(unit)
    if m is None or m.group("instance") is None:
        return None
    return f"{m.group('prefix')}@.{m.group('type')}"


def unit_type(unit: str) -> str:
    return unit.rsplit(".", 1)[-1]


UnitName = Annotated[
    str, Field(min_length=3, max_length=UNIT_NAME_MAX), AfterValidator(check_unit_name)
]

_PATH_RE = re.compile(r"/[A-Za-z0-9._+@/\-]*", re.ASCII)


def check_abs_path(value: str) -> str:
    if len(value) > 4096 or _PATH_RE.fullmatch(value) is None:
        raise ValueError("must be an absolute path of ASCII letters, digits and ._+@-/")
    if any(part in ("..", ".") for part in value.split("/")):
        raise ValueError("path must not contain '.' or '..' components")
    return value


AbsPath = Annotated[str, AfterValidator(check_abs_path)]
Pid = Annotated[int, Field(ge=2, le=4_194_304, strict=True)]


class ActionParams(BaseModel):
    """Base of every parameter schema: unknown keys refused, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def units(self) -> list[str]:
        """Units this action would touch (protection and per-unit rate limits)."""
        unit = getattr(self, "unit", None)
        return [unit] if isinstance(unit, str) else []

    def pids(self) -> list[int]:
        pid = getattr(self, "pid", None)
        return [pid] if isinstance(pid, int) else []


class NoParams(ActionParams):
    pass


class UnitParams(ActionParams):
    unit: UnitName = Field(description="Full unit name with its suffix, e.g. `nginx.service`.")


class RestartableUnitParams(ActionParams):
    unit: UnitName = Field(description="A .service, .socket, .timer or .path unit.")

    @model_validator(mode="after")
    def _restartable(self) -> RestartableUnitParams:
        if unit_type(self.unit) not in ("service", "socket", "timer", "path"):
            raise ValueError("only .service, .socket, .timer and .path units can be (re)started")
        return self


class UnitStatusParams(ActionParams):
    unit: UnitName = Field(description="Full unit name with its suffix.")
    lines: int = Field(20, ge=0, le=200, strict=True, description="Journal lines shown.")


Priority = Literal["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"]


class JournalTailParams(ActionParams):
    unit: UnitName | None = Field(None, description="Only this unit's entries; empty: all.")
    lines: int = Field(100, ge=1, le=1000, strict=True, description="Entries shown.")
    priority: Priority | None = Field(None, description="Only entries at this priority or worse.")


class DiskUsageParams(ActionParams):
    path: AbsPath = Field("/", description="File system holding this absolute path.")


class ProcessParams(ActionParams):
    pid: Pid = Field(description="Process id (2 or more).")


class TerminateProcessParams(ActionParams):
    pid: Pid = Field(description="Process id (2 or more).")
    signal: Literal["TERM", "INT", "HUP"] = Field("TERM", description="Signal sent.")


class JournalVacuumParams(ActionParams):
    max_size_mb: int | None = Field(
        None, ge=64, le=1_048_576, strict=True, description="Shrink archived journals to this size."
    )
    max_age_days: int | None = Field(
        None, ge=1, le=3650, strict=True, description="Delete archived journals older than this."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> JournalVacuumParams:
        if (self.max_size_mb is None) == (self.max_age_days is None):
            raise ValueError("give exactly one of max_size_mb, max_age_days")
        return self


class NixGcParams(ActionParams):
    delete_older_than_days: int | None = Field(
        None,
        ge=7,
        le=3650,
        strict=True,
        description="Also delete system generations older than this (limits rollback); "
        "empty: only unreachable store paths.",
    )


class KernelLogParams(ActionParams):
    lines: int = Field(100, ge=1, le=1000, strict=True, description="Kernel messages shown.")


Generation = Annotated[int, Field(ge=1, le=1_000_000, strict=True)]


class ClosureDiffParams(ActionParams):
    from_generation: Generation | None = Field(
        None, description="Older system generation; empty: the one before `to_generation`.")
    to_generation: Generation | None = Field(
        None, description="Newer system generation; empty: the current one.")

    @model_validator(mode="after")
    def _ordered(self) -> ClosureDiffParams:
        if (self.from_generation is not None and self.to_generation is not None
                and self.from_generation >= self.to_generation):
            raise ValueError("from_generation must be older (smaller) than to_generation")
        return self


# -- argv builders: each returns the arguments after the program, one element per value --


def _unit_status(p: UnitStatusParams) -> list[str]:
    return ["status", "--no-pager", "--full", f"--lines={p.lines}", "--", p.unit]


def _journal_tail(p: JournalTailParams) -> list[str]:
    argv = ["--no-pager", "--output=short-iso", f"--lines={p.lines}"]
    if p.priority is not None:
        argv.append(f"--priority={p.priority}")
    if p.unit is not None:
        argv.append(f"--unit={p.unit}")
    return argv


def _disk_usage(p: DiskUsageParams) -> list[str]:
    return ["-P", "-h", "--", p.path]


def _list_failed(_: NoParams) -> list[str]:
    return ["list-units", "--failed", "--all", "--no-pager", "--plain", "--no-legend"]


def _memory(_: NoParams) -> list[str]:
    return ["-m"]


def _journal_disk_usage(_: NoParams) -> list[str]:
    return ["--disk-usage"]


def _process_status(p: ProcessParams) -> list[str]:
    return ["-o", "pid,ppid,user,stat,etime,pcpu,pmem,rss,comm", "-p", str(p.pid)]


def _systemctl(verb: str) -> Callable[[UnitParams | RestartableUnitParams], list[str]]:
    def build(p: UnitParams | RestartableUnitParams) -> list[str]:
        # Blocking (no --no-block): the exit code then says whether the job succeeded.
        return [verb, "--", p.unit]

    return build


def _terminate(p: TerminateProcessParams) -> list[str]:
    return ["-s", p.signal, "--", str(p.pid)]


def _journal_vacuum(p: JournalVacuumParams) -> list[str]:
    if p.max_size_mb is not None:
        return [f"--vacuum-size={p.max_size_mb}M"]
    return [f"--vacuum-time={p.max_age_days}d"]


def _nix_gc(p: NixGcParams) -> list[str]:
    if p.delete_older_than_days is None:
        return []
    return ["--delete-older-than", f"{p.delete_older_than_days}d"]


# Properties of `systemctl show` worth an investigation (the full list is some 250 lines
# for a service: more than a small model's context can use).
UNIT_SHOW_PROPERTIES = (
    "Id", "Names", "Description", "LoadState", "ActiveState", "SubState", "Result",
    "UnitFileState", "FragmentPath", "DropInPaths", "ActiveEnterTimestamp",
    "InactiveEnterTimestamp", "StateChangeTimestamp", "MainPID", "ExecMainStartTimestamp",
    "ExecMainStatus", "ExecMainCode", "NRestarts", "Restart", "Requires", "Wants", "After",
    "Conflicts", "TriggeredBy", "Triggers", "User", "MemoryCurrent", "MemoryMax",
)


def _unit_show(p: UnitParams) -> list[str]:
    return ["show", "--no-pager", "--property=" + ",".join(UNIT_SHOW_PROPERTIES), "--", p.unit]


def _unit_cat(p: UnitParams) -> list[str]:
    return ["cat", "--no-pager", "--", p.unit]


def _kernel_log(p: KernelLogParams) -> list[str]:
    return ["--no-pager", "--output=short-iso", "--dmesg", f"--lines={p.lines}"]


def _list_timers(_: NoParams) -> list[str]:
    return ["list-timers", "--all", "--no-pager"]


# The NixOS system profile: ``system`` links to ``system-<N>-link``, which links to the
# generation's store path. Reads resolve these links in code; nothing else is read there.
SYSTEM_PROFILE = Path("/nix/var/nix/profiles/system")
STORE_DIR = Path("/nix/store")
_STORE_NAME = re.compile(r"[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-]+", re.ASCII)


def _generations(_: NoParams) -> list[str]:
    return ["--list-generations", "--profile", str(SYSTEM_PROFILE)]


def system_generations(profile: Path | None = None) -> tuple[dict[int, Path], int | None]:
    """The profile's generation links by number, and the current generation's number
    (None when the profile link does not name a generation link)."""
    profile = profile or SYSTEM_PROFILE
    pattern = re.compile(re.escape(profile.name) + r"-([0-9]{1,7})-link", re.ASCII)
    links: dict[int, Path] = {}
    try:
        entries = list(profile.parent.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is not None:
            links[int(m.group(1))] = entry
    try:
        m = pattern.fullmatch(Path(os.readlink(profile)).name)
    except OSError:
        m = None
    return links, int(m.group(1)) if m else None


def profile_generations(profile: Path | None = None) -> list[tuple[int, float, bool]]:
    """(number, when its link was made, current) of each generation, read from the
    profile's links themselves (no program, no lock): what ``nix-env --list-generations``
    prints, for a caller that may not lock the profile."""
    links, current = system_generations(profile)
    out = []
    for number, link in sorted(links.items()):
        try:
            made = link.lstat().st_mtime
        except OSError:
            continue
        out.append((number, made, number == current))
    return out


def generation_store_path(link: Path) -> str:
    """The store path a generation link resolves to, refused unless it is exactly a
    top-level ``/nix/store/<hash>-<name>`` path."""
    try:
        target = os.path.realpath(link, strict=True)
    except OSError as exc:
        raise Refusal("no_generation", f"{link}: cannot resolve: {exc.strerror}") from None
    path = Path(target)
    if path.parent != STORE_DIR or _STORE_NAME.fullmatch(path.name) is None:
        raise Refusal("no_generation", f"{link} does not resolve to a store path")
    return target


def _closure_diff(p: ClosureDiffParams) -> list[str]:
    links, current = system_generations()
    newer = p.to_generation if p.to_generation is not None else current
    if newer is None or newer not in links:
        raise Refusal("no_generation", f"system generation {newer}: no such generation link"
                      if newer is not None else "no current system generation")
    older = p.from_generation
    if older is None:
        below = [n for n in links if n < newer]
        if not below:
            raise Refusal("no_generation", f"no system generation before {newer}")
        older = max(below)
    if older not in links:
        raise Refusal("no_generation", f"system generation {older}: no such generation link")
    return ["--extra-experimental-features", "nix-command", "store", "diff-closures", "--",
            generation_store_path(links[older]), generation_store_path(links[newer])]


# The unit that performs nixos_rollback (defined by the NixOS module): a rollback rewrites
# /etc, /boot and the system profile, which no sandbox of ours may do, so systemd runs it
# as its own oneshot and reports its result (``--wait``). The dry run shows exactly that.
ROLLBACK_UNIT = "ai-sysadmin-rollback.service"


def _nixos_rollback(_: NoParams) -> list[str]:
    return ["start", "--wait", "--", ROLLBACK_UNIT]


# -- the catalog ----------------------------------------------------------------------


@dataclass(frozen=True)
class ActionSpec:
    """One catalog entry. Everything here is code; nothing comes from a proposal."""

    name: str
    summary: str
    risk: Risk
    params: type[ActionParams]
    program: str
    build: Callable[[Any], list[str]]
    timeout: float
    # Starts (or restarts) its unit: the never-start list applies (see policy.py).
    starts_unit: bool = False
    # The argv as docs/actions.md shows it, for builders that read the host (resolve links).
    doc_argv: tuple[str, ...] = ()

    @property
    def is_change(self) -> bool:
        return self.risk is not Risk.READ_ONLY


CATALOG: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        # read-only investigations
        ActionSpec("unit_status", "Status of one unit with its last journal lines.",
                   Risk.READ_ONLY, UnitStatusParams, "systemctl", _unit_status, 20),
        ActionSpec("list_failed_units", "Units in the failed state.",
                   Risk.READ_ONLY, NoParams, "systemctl", _list_failed, 20),
        ActionSpec("journal_tail", "The last journal entries, optionally of one unit.",
                   Risk.READ_ONLY, JournalTailParams, "journalctl", _journal_tail, 30),
        ActionSpec("journal_disk_usage", "Disk space taken by the journal.",
                   Risk.READ_ONLY, NoParams, "journalctl", _journal_disk_usage, 20),
        ActionSpec("disk_usage", "Size, use and free space of the file system holding a path.",
                   Risk.READ_ONLY, DiskUsageParams, "df", _disk_usage, 20),
        ActionSpec("memory_usage", "Memory and swap use in MiB.",
                   Risk.READ_ONLY, NoParams, "free", _memory, 10),
        ActionSpec("process_status", "One process: parent, user, state, age, CPU, memory.",
                   Risk.READ_ONLY, ProcessParams, "ps", _process_status, 10),
        ActionSpec("unit_show", "A unit's state, result, restarts, timestamps and "
                   "dependencies (systemctl show).",
                   Risk.READ_ONLY, UnitParams, "systemctl", _unit_show, 20),
        ActionSpec("unit_cat", "A unit's definition: its unit file and drop-ins.",
                   Risk.READ_ONLY, UnitParams, "systemctl", _unit_cat, 20),
        ActionSpec("kernel_log", "The last kernel messages of this boot.",
                   Risk.READ_ONLY, KernelLogParams, "journalctl", _kernel_log, 30),
        ActionSpec("list_timers", "Timers with their last and next run.",
                   Risk.READ_ONLY, NoParams, "systemctl", _list_timers, 20),
        ActionSpec("nixos_generations", "The NixOS system generations and when each was "
                   "made; the current one is marked.",
                   Risk.READ_ONLY, NoParams, "nix-env", _generations, 30),
        ActionSpec("nixos_closure_diff", "What changed (packages, versions, sizes) between "
                   "two system generations; default: the previous and the current one.",
                   Risk.READ_ONLY, ClosureDiffParams, "nix", _closure_diff, 120,
                   doc_argv=("--extra-experimental-features", "nix-command", "store",
                             "diff-closures", "--", "/nix/store/…-nixos-system-…-<previous>",
                             "/nix/store/…-nixos-system-…-<current>")),
        # changes
        ActionSpec("reset_failed_unit", "Clear a unit's failed state (does not start it).",
                   Risk.LOW, UnitParams, "systemctl", _systemctl("reset-failed"), 30),
        ActionSpec("start_unit", "Start an inactive unit (a running one is left alone).",
                   Risk.LOW, RestartableUnitParams, "systemctl", _systemctl("start"), 60,
                   starts_unit=True),
        ActionSpec("restart_unit", "Restart a unit (interrupts it while it restarts).",
                   Risk.MEDIUM, RestartableUnitParams, "systemctl", _systemctl("restart"), 60,
                   starts_unit=True),
        ActionSpec("terminate_process", "Send TERM (or INT/HUP) to one process.",
                   Risk.MEDIUM, TerminateProcessParams, "kill", _terminate, 10),
        ActionSpec("journal_vacuum", "Delete archived journal files beyond a size or age.",
                   Risk.MEDIUM, JournalVacuumParams, "journalctl", _journal_vacuum, 120),
        ActionSpec("nix_gc", "Delete unreachable Nix store paths (and old generations if asked).",
                   Risk.MEDIUM, NixGcParams, "nix-collect-garbage", _nix_gc, 1800),
        ActionSpec("nixos_rollback", "Switch the system back to the previous NixOS generation.",
                   Risk.HIGH, NoParams, "systemctl", _nixos_rollback, 1800),
    )
}


# -- planning: proposal -> validated, resolved, displayable command ---------------------


@dataclass(frozen=True)
class PlannedAction:
    """A catalog action with validated params and the exact argv that would run."""

    spec: ActionSpec
    params: ActionParams
    argv: list[str]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def risk(self) -> Risk:
        return self.spec.risk

    @property
    def dry_run(self) -> str:
        """Exactly what would run, quoted as a shell would need it (display only)."""
        return f"{shlex.join(self.argv)}  (timeout {self.spec.timeout:g}s, risk {self.risk})"

    def params_dict(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")


def program_path(program: str, settings: Settings) -> str:
    """Absolute path of a catalog program: configured, else found on the search path."""
    configured = settings.actions.binaries.get(program)
    if configured is not None:
        if not configured.is_absolute():
            raise Refusal("program_not_found", f"actions.binaries.{program} must be absolute")
        return str(configured)
    found = shutil.which(program, path=settings.actions.search_path)
    if found is None:
        raise Refusal("program_not_found", f"{program}: not found on the search path")
    return str(Path(found).absolute())


def validate_params(spec: ActionSpec, params: Any) -> ActionParams:
    if not isinstance(params, Mapping):
        raise Refusal("invalid_params", f"{spec.name}: params must be an object")
    try:
        return spec.params.model_validate(dict(params))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: "
            + ("unknown parameter" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        )
        raise Refusal("invalid_params", f"{spec.name}: {problems}") from None


def lookup(name: Any) -> ActionSpec:
    """The catalog entry named exactly ``name`` (no case folding, no trimming)."""
    if not isinstance(name, str) or name not in CATALOG:
        shown = repr(name)[:80]
        raise Refusal("unknown_action", f"unknown action {shown}: not in the catalog")
    return CATALOG[name]


def plan(name: Any, params: Any, settings: Settings) -> PlannedAction:
    """Validate a proposal against the catalog and build its argv; raise Refusal if not."""
    spec = lookup(name)
    validated = validate_params(spec, params)
    argv = [program_path(spec.program, settings), *spec.build(validated)]
    return PlannedAction(spec, validated, argv)

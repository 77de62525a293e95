"""The labelled line corpus: journald entries generated from ``templates`` with varied
hosts, pids, units and numbers (deterministic: a fixed seed).

Each line is a ``journalctl --output=json`` object — what the journald collector reads —
turned into an event by the collector's own parser (``layers.collectors.journald``), so
the harness sees exactly what the pipeline sees in production. Labels travel next to
the entry, never inside it.
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from layers.collectors.journald import parse_entry
from layers.events import Event, Severity
from layers.quality.templates import TEMPLATES, Split, Template

SEED = 16
# Sunday 2 March 2025 00:00 UTC: lines are spread over the following day.
EPOCH = 1_740_873_600.0
LINE_GAP = 40.0  # seconds between ordinary lines
BURST_GAP = 2.0  # seconds between the lines of a burst

HOSTS = ("web1", "db1", "nas", "build01", "edge2", "mail", "gw", "lab3")
_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


def _hex(n: int) -> Callable[[random.Random], str]:
    return lambda r: "".join(r.choice("0123456789abcdef") for _ in range(n))


def _int(lo: int, hi: int) -> Callable[[random.Random], str]:
    return lambda r: str(r.randint(lo, hi))


def _pick(*values: str) -> Callable[[random.Random], str]:
    return lambda r: r.choice(values)


def _date(r: random.Random) -> str:
    return f"2025/03/0{r.randint(1, 9)} {r.randint(0, 23):02d}:{r.randint(0, 59):02d}:" \
           f"{r.randint(0, 59):02d}"


_JOBDESC = {
    "restic-backups-daily": "restic backup daily", "borgbackup-job-home": "BorgBackup job home",
    "pg-dump-nightly": "PostgreSQL nightly dump", "rsync-offsite": "Offsite rsync copy",
}
_MOUNTS = (("mnt-data.mount", "/mnt/data"), ("srv-backup.mount", "/srv/backup"),
           ("mnt-media.mount", "/mnt/media"))

# Placeholder → value for one line. A template's own ``services`` override ``svc``.
FILLERS: dict[str, Callable[[random.Random], str]] = {
    "host": _pick(*HOSTS),
    "host2": _pick(*HOSTS),
    "pid": _int(300, 65000),
    "uid": _pick("0", "71", "999", "1000", "1001"),
    "comm": _pick("postgres", "java", "python3", "node", "clickhouse-serv", "jellyfin",
                  "ffmpeg", "rustc", "kworker/2:1", "nix-daemon"),
    "kb": _int(2_000_000, 16_000_000), "kb2": _int(1_000_000, 8_000_000),
    "kb3": _int(0, 90_000), "kb4": _int(2_000, 30_000),
    "cgroup": _pick("/system.slice/jellyfin.service", "/user.slice/user-1000.slice/session-4.scope",
                    "/system.slice/nix-daemon.service", "/system.slice/clickhouse.service"),
    "pct": _int(81, 99), "n": _int(10, 99999), "n1": _int(1, 9), "n2": _int(10, 99),
    "n3": _int(100, 999), "n4": _int(2501, 9999), "n5": _int(10000, 79000),
    "hex": _hex(64), "hex4": _hex(4),
    "word": _pick("cache", "thumbnails", "photos", "export", "ingest", "vm-disk", "nightly"),
    "date": _date, "date8": _int(20250101, 20250301), "date8b": _int(20250302, 20250330),
    "user": _pick("alice", "bob", "carol", "dave"),
    "okuser": _pick("alice", "bob", "root", "deploy", "backup"),
    "svc": _pick("myapp", "api-worker", "grafana", "gitea"),
    "restarts": _int(2, 40), "code": _int(1, 3), "codename": _pick("FAILURE", "INVALIDARGUMENT"),
    "addr": lambda r: "0" if r.random() < 0.4 else _hex(12)(r),
    "ip64": _hex(12), "sp64": _hex(12), "base": _hex(12), "size": _hex(5),
    "lib": _pick("libc.so.6", "libstdc++.so.6.0.32", "libcrypto.so.3", "node"),
    "cpu": _int(0, 15), "secs": _int(21, 99), "hung": _pick("122", "245", "368", "491"),
    "dev": _pick("sda", "sdb", "sdc", "nvme0n1"),
    "part": _pick("sda1", "sdb1", "sdc2", "nvme0n1p2", "dm-0"),
    "sector": _int(1_000_000, 3_900_000_000),
    "baduser": _pick("admin", "test", "oracle", "ubuntu", "pi", "git", "guest", "ftpuser",
                     "support", "user1", "postgres", "hadoop"),
    "attacker": lambda r: f"{r.choice(('203.0.113', '198.51.100', '192.0.2'))}.{r.randint(2, 254)}",
    "ip": lambda r: f"{r.choice(('203.0.113', '198.51.100', '192.0.2'))}.{r.randint(2, 254)}",
    "lanip": lambda r: f"10.0.{r.randint(0, 3)}.{r.randint(2, 254)}",
    "port": _int(1025, 65535), "dport": _pick("23", "445", "3389", "5900", "8080", "6379"),
    "ttl": _int(40, 250),
    "mac": lambda r: ":".join(f"{r.randint(0, 255):02x}" for _ in range(14)),
    "store": lambda r: "".join(r.choice(_NIX32) for _ in range(32)),
    "snippet": _pick("users", "etc", "var", "specialfs", "agenixInstall", "setupSecrets"),
    "job": _pick(*_JOBDESC),
    "domain": _pick("example.org", "cloud.example.org", "git.example.net", "mail.example.com"),
    "token": lambda r: "".join(r.choice(string.ascii_letters + string.digits + "-_")
                               for _ in range(43)),
    "days": _int(1, 6), "ms": _int(250, 2500), "errno": _pick("113", "112", "13", "2"),
    "iface": _pick("eth0", "enp3s0", "eno1"),
    "cronjob": _pick("logrotate /etc/logrotate.conf", "updatedb", "certbot-check",
                     "nextcloud-occ files:scan --all", "check-disk-usage --warn 90"),
    "svcdesc": _pick("Session 41 of User alice", "Nginx Web Server", "PostgreSQL Server",
                     "Daily rotation of log files", "Network Time Synchronization",
                     "nixos-upgrade.service - NixOS Upgrade"),
    "b64": lambda r: "".join(r.choice(string.ascii_letters + string.digits + "+/")
                             for _ in range(43)),
    "dbusname": _pick("home1", "network1", "portable1", "timesync1"),
    "uuid": lambda r: "-".join(_hex(n)(r) for n in (8, 4, 4, 4, 12)),
    "target": _pick("Multi-User System", "Timers", "Network is Online"),
}


@dataclass(frozen=True)
class Line:
    """One labelled journal line."""

    template: str
    klass: str
    anomaly: bool
    categories: tuple[str, ...]
    severity: Severity | None
    split: Split
    entry: dict[str, Any]

    def event(self) -> Event:
        ev = parse_entry(self.entry, "localhost")
        assert ev is not None  # every corpus entry has a MESSAGE
        return ev

    @property
    def message(self) -> str:
        return str(self.entry["MESSAGE"])


_FIELD = re.compile(r"\{(\w+)\}")


def _fill(text: str, values: dict[str, str], rng: random.Random,
          services: Sequence[str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            if name == "svc" and services:
                values[name] = rng.choice(services)
            elif name == "mntunit" or name == "mntpath":
                unit, path = rng.choice(_MOUNTS)
                values.update(mntunit=unit, mntpath=path)
            elif name == "jobdesc":
                values[name] = _JOBDESC[values.get("job") or _fill("{job}", values, rng, ())]
            else:
                values[name] = FILLERS[name](rng)
        return values[name]

    return _FIELD.sub(one, text)


def _entry(t: Template, values: dict[str, str], rng: random.Random, ts: float,
           cursor: str) -> dict[str, Any]:
    message = _fill(t.text, values, rng, t.services)
    entry: dict[str, Any] = {
        "__CURSOR": cursor,
        "__REALTIME_TIMESTAMP": str(int(ts * 1_000_000)),
        "_HOSTNAME": _fill("{host}", values, rng, ()),
        "PRIORITY": str(t.priority),
        "SYSLOG_IDENTIFIER": _fill(t.ident, values, rng, t.services),
        "_TRANSPORT": t.transport,
        "MESSAGE": message,
    }
    if t.transport != "kernel":
        pid = _fill("{pid}", values, rng, ())
        # systemd's messages about a unit come from pid 1 (the collector trusts their
        # UNIT field from pid 1 only); the draw is made all the same, to keep the seed's
        # sequence — and so every line — the same.
        entry["_PID"] = "1" if t.ident == "systemd" else pid
    if t.unit is not None:
        unit = _fill(t.unit, values, rng, t.services)
        entry["UNIT" if t.ident == "systemd" else "_SYSTEMD_UNIT"] = unit
        if t.ident == "systemd":
            entry["_SYSTEMD_UNIT"] = "init.scope"
    return entry


def generate(templates: Iterable[Template] = TEMPLATES, seed: int = SEED) -> list[Line]:
    """Every template's lines, interleaved in time order. A burst template's lines come
    seconds apart at one point of the day; other lines are spread ``LINE_GAP`` apart."""
    rng = random.Random(seed)
    groups: list[list[tuple[Template, dict[str, str]]]] = []
    for t in templates:
        fixed: dict[str, str] = {}
        for name in t.fixed:
            _fill("{" + name + "}", fixed, rng, t.services)
        items = [(t, dict(fixed)) for _ in range(t.count)]
        if t.burst:
            groups.append(items)
        else:
            groups += [[item] for item in items]
    rng.shuffle(groups)
    lines: list[Line] = []
    ts = EPOCH
    for group in groups:
        for t, values in group:
            ts += BURST_GAP if len(group) > 1 else LINE_GAP
            cursor = f"s=ai-sysadmin-quality;i={len(lines):x};t={t.id}"
            entry = _entry(t, values, rng, ts, cursor)
            lines.append(Line(t.id, t.klass, t.anomaly, t.categories, t.severity, t.split,
                              entry))
        ts += LINE_GAP
    return lines


@functools.cache
def _generated() -> tuple[Line, ...]:
    return tuple(generate())


def lines() -> list[Line]:
    """The whole corpus (both splits), generated once per process (it is deterministic)."""
    return list(_generated())


def scored() -> list[Line]:
    """What the harness measures."""
    return [line for line in lines() if line.split == "scored"]


def reference() -> list[Line]:
    """The only lines a prompt, a few-shot example or a memory seed may draw from."""
    return [line for line in lines() if line.split == "reference"]


def sample(items: Sequence[Line], limit: int | None) -> list[Line]:
    """At most ``limit`` lines, taken round-robin over templates (so a short run still
    covers every class), in their original time order. Whole bursts of a template are
    not guaranteed: a burst rule may see fewer lines than it needs."""
    if limit is None or limit >= len(items):
        return list(items)
    by_template: dict[str, list[int]] = {}
    for i, line in enumerate(items):
        by_template.setdefault(line.template, []).append(i)
    queues = list(by_template.values())
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        took = False
        for q in queues:
            if depth < len(q) and len(chosen) < limit:
                chosen.append(q[depth])
                took = True
        if not took:
            break
        depth += 1
    return [items[i] for i in sorted(chosen)]


def template_regex(t: Template) -> re.Pattern[str]:
    """A regex matching every message the template can produce (placeholders: any text)."""
    parts = _FIELD.split(t.text)
    # split() alternates literal, name, literal, …
    rx = "".join(re.escape(p) if i % 2 == 0 else ".+?" for i, p in enumerate(parts))
    return re.compile(f"^{rx}$", re.S)


def literal_chunks(t: Template, least: int = 16) -> list[str]:
    """The template's fixed text runs of at least ``least`` characters."""
    return [p.strip() for i, p in enumerate(_FIELD.split(t.text))
            if i % 2 == 0 and len(p.strip()) >= least]

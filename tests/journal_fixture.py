"""A recorded journal (``journalctl --output=json`` lines): an OOM kill, a crash-looping
unit and an SSH brute force, buried in thousands of benign lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BOOT = "5f0c2e7d9a8b4c1e8d7f6a5b4c3d2e1f"
T0 = 1_700_000_000_000_000  # µs

BENIGN = [
    ("cron.service", "CRON", 6, "(root) CMD (run-parts /etc/cron.hourly)"),
    ("systemd-logind.service", "systemd-logind", 6, "New session {n} of user alice."),
    ("sshd.service", "sshd", 6,
     "Accepted publickey for alice from 10.0.0.{m} port {p} ssh2: ED25519 SHA256:q1w2e3"),
    ("nginx.service", "nginx", 6, '10.0.0.{m} - - "GET /api/items/{n} HTTP/1.1" 200 {p}'),
    ("systemd-timesyncd.service", "systemd-timesyncd", 6,
     "Initial synchronization to time server 10.0.0.1:123 (ntp.example.org)."),
    (None, "kernel", 6, "IPv6: ADDRCONF(NETDEV_CHANGE): eth0: link becomes ready"),
    ("postgresql.service", "postgres", 6,
     "LOG:  checkpoint complete: wrote {n} buffers (0.{m}%); 0 WAL file(s) added"),
    ("sshd.service", "sshd", 6,
     "pam_unix(sshd:session): session opened for user alice(uid=1000) by (uid=0)"),
]


def _entry(i: int, unit: str | None, ident: str, prio: int, msg: str,
           *, systemd_about: bool = False, transport: str = "journal") -> dict[str, Any]:
    e: dict[str, Any] = {
        "__CURSOR": f"s=3e1a;i={i:x};b={BOOT};m={i:x};t={T0 + i * 10_000:x};x=0",
        "__REALTIME_TIMESTAMP": str(T0 + i * 10_000),
        "_BOOT_ID": BOOT, "_HOSTNAME": "web1", "PRIORITY": str(prio),
        "SYSLOG_IDENTIFIER": ident, "MESSAGE": msg, "_TRANSPORT": transport,
        "_PID": str(1000 + i % 500),
    }
    if systemd_about:  # systemd (pid 1) speaking about a unit
        e["_PID"] = "1"
        e["_SYSTEMD_UNIT"] = "init.scope"
        e["UNIT"] = unit
    elif unit:
        e["_SYSTEMD_UNIT"] = unit
    return e


def scenario_lines(benign: int = 3000) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    i = 0

    def add(*a: Any, **kw: Any) -> None:
        nonlocal i
        out.append(_entry(i, *a, **kw))
        i += 1

    def flood(n: int) -> None:
        for k in range(n):
            unit, ident, prio, msg = BENIGN[(i + k) % len(BENIGN)]
            add(unit, ident, prio, msg.format(n=i + k, m=(i + k) % 250 + 1, p=40000 + k))

    flood(benign // 3)
    # 1. OOM kill (kernel, no unit)
    add(None, "kernel", 4, "java invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE), "
        "order=0, oom_score_adj=0", transport="kernel")
    add(None, "kernel", 3, "Out of memory: Killed process 4242 (java) total-vm:8123456kB, "
        "anon-rss:6012345kB, file-rss:0kB, shmem-rss:0kB, UID:1001 pgtables:12345kB "
        "oom_score_adj:0", transport="kernel")
    flood(benign // 3)
    # 2. a crash-looping unit
    for n in range(1, 6):
        add("demo-worker.service", "systemd", 6, "Started Demo worker.", systemd_about=True)
        add("demo-worker.service", "demo-worker", 3, f"panic: cannot open /var/lib/demo/{n}.db")
        add("demo-worker.service", "systemd", 4,
            "demo-worker.service: Main process exited, code=exited, status=1/FAILURE",
            systemd_about=True)
        add("demo-worker.service", "systemd", 4,
            "demo-worker.service: Failed with result 'exit-code'.", systemd_about=True)
        add("demo-worker.service", "systemd", 6,
            f"demo-worker.service: Scheduled restart job, restart counter is at {n}.",
            systemd_about=True)
    add("demo-worker.service", "systemd", 4,
        "demo-worker.service: Start request repeated too quickly.", systemd_about=True)
    add("demo-worker.service", "systemd", 3, "Failed to start Demo worker.", systemd_about=True)
    flood(benign // 6)
    # 3. SSH brute force from one address
    for n in range(20):
        add("sshd.service", "sshd", 6,
            f"Failed password for invalid user admin{n} from 203.0.113.7 port {51000 + n} ssh2")
    add("sshd.service", "sshd", 6,
        "error: maximum authentication attempts exceeded for root from 203.0.113.7 "
        "port 51999 ssh2 [preauth]")
    flood(benign - 2 * (benign // 3) - benign // 6)
    return out


def write_journal(path: Path, benign: int = 3000) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in scenario_lines(benign)))
    return path

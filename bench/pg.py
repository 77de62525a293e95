"""A throwaway PostgreSQL cluster on loopback: ``initdb`` in a temp dir, ``pg_ctl`` on a
free port, run as a non-root OS user (PostgreSQL refuses to run as root). Debian's
binaries. The tests (``tests/postgres.py``) start it without fsync, for speed; the fleet
benchmark keeps PostgreSQL's own defaults (fsync and synchronous commit on), because what
it measures includes the durable commit of every accepted event."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil

from bench.procs import free_port

PG_USER = "postgres"


def pg_bin() -> Path:
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (cand / "initdb").exists():
            return cand
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries not found (scripts/bootstrap.sh test)")


def as_pg_user(argv: list[str]) -> list[str]:
    """``argv`` run as the ``postgres`` OS user when we are root (made if missing)."""
    if os.geteuid() != 0:
        return argv
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
    return ["runuser", "-u", PG_USER, "--", *argv]


class PgCluster:
    def __init__(self, *, durable: bool = True) -> None:
        self.durable = durable
        self.dir = Path(tempfile.mkdtemp(prefix="ai-sysadmin-pg-"))
        self.port = free_port()
        self.bin = pg_bin()
        if os.geteuid() == 0:
            as_pg_user(["true"])  # the OS user exists before the chown
            shutil.chown(self.dir, PG_USER)
        self.data = self.dir / "data"

    def _run(self, argv: list[str]) -> None:
        subprocess.run(as_pg_user(argv), check=True, capture_output=True, text=True,
                       timeout=120)

    def start(self) -> PgCluster:
        initdb = [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8"]
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.dir}")
        if not self.durable:
            initdb.append("--no-sync")
            options += " -c fsync=off"
        self._run(initdb)
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                   "-w", "-t", "60", "-o", options, "start"])
        return self

    def version(self) -> str:
        out = subprocess.run([str(self.bin / "postgres"), "--version"], capture_output=True,
                             text=True, check=False, timeout=30)
        return out.stdout.strip().removeprefix("postgres (PostgreSQL) ") or "?"

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        self._run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                   "-U", "postgres", name])
        return self.url(name)

    def cpu_seconds(self) -> float:
        """CPU of the postmaster and every backend so far (user + system): the live ones,
        and the ones that exited (the postmaster reaped them: its children's times), so
        the sum never goes down when a backend or an autovacuum worker ends."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            root = psutil.Process(pid)
            procs = root.children(recursive=True)
            t = root.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
        except (OSError, ValueError, IndexError, psutil.Error):
            return 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(as_pg_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                                       "fast", "-w", "stop"]),
                           capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

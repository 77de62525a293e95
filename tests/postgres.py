"""A throwaway PostgreSQL cluster for the tests: initdb in a temp dir, pg_ctl on a free
loopback port, run as a non-root OS user (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port

PG_USER = "postgres"


def pg_bin() -> Path:
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (cand / "initdb").exists():
            return cand
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries not found (scripts/bootstrap.sh test)")


def _as_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
    return ["runuser", "-u", PG_USER, "--", *argv]


class PgCluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ai-sysadmin-pg-"))
        self.port = free_port()
        self.bin = pg_bin()
        if os.geteuid() == 0:
            shutil.chown(self.dir, PG_USER)
        self.data = self.dir / "data"

    def start(self) -> PgCluster:
        run = lambda argv: subprocess.run(  # noqa: E731
            _as_user(argv), check=True, capture_output=True, text=True, timeout=120
        )
        run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
             "--auth=trust", "--no-sync", "-E", "UTF8"])
        run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
             "-w", "-t", "60", "-o",
             f"-c listen_addresses=127.0.0.1 -c port={self.port} "
             f"-c unix_socket_directories={self.dir} -c fsync=off",
             "start"])
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        subprocess.run(
            _as_user([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                      "-U", "postgres", name]),
            check=True, capture_output=True, timeout=60,
        )
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            _as_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                      "stop"]),
            capture_output=True, timeout=60, check=False,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster().start()
    yield cluster
    cluster.stop()

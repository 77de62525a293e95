"""Issue 9, PostgreSQL restarted under event load: requests while it is down get 503 with
Retry-After (never 500), the gateway reconnects by itself, and every event acknowledged
with 2xx — before, during and after the restart — is in the database. A real PostgreSQL
server of the test's own (initdb + pg_ctl on a loopback port)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.postgres import PgCluster, as_pg_user
from tests.reliability_support import AUTH, EventLoad, GatewayFactory, wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def own_pg() -> Iterator[PgCluster]:
    try:
        cluster = PgCluster().start()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no PostgreSQL server here: {exc}")
    yield cluster
    cluster.stop()


def pg_ctl(cluster: PgCluster, action: str) -> None:
    argv = [str(cluster.bin / "pg_ctl"), "-D", str(cluster.data), "-w", "-t", "60"]
    if action == "stop":
        argv += ["-m", "fast", "stop"]
    else:
        argv += ["-l", str(cluster.dir / "log"), "-o",
                 f"-c listen_addresses=127.0.0.1 -c port={cluster.port} "
                 f"-c unix_socket_directories={cluster.dir} -c fsync=off", "start"]
    subprocess.run(as_pg_user(argv), check=True, capture_output=True, timeout=90)


def stored_ids(url: str) -> set[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM events").fetchall()}


def test_postgres_restart_under_load_gives_503_and_loses_no_accepted_event(
    own_pg: PgCluster, gateways: GatewayFactory
) -> None:
    url = own_pg.create_db("reliability")
    # No layer is needed: the events are noise the prefilter drops; the store is the point.
    gw = gateways(1, store={"url": url})
    load = EventLoad(gw.url, threads=2, batch=20, anomaly_every=0, pause=0.05).start()
    assert wait_until(lambda: len(load.acked) >= 200, 60)
    pg_ctl(own_pg, "stop")
    down_since = time.monotonic()
    # While it is down: a clear 503 for intake and for reads, with Retry-After.
    assert wait_until(lambda: load.statuses["503"] >= 3, 20)
    r = httpx.get(f"{gw.url}/v1/incidents", headers=AUTH, timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    assert r.json()["error"]["code"] == "store_unavailable"
    time.sleep(max(0.0, 2.0 - (time.monotonic() - down_since)))
    pg_ctl(own_pg, "start")
    acked_at_restart = len(load.acked)
    # It reconnects by itself: intake succeeds again, no gateway restart.
    assert wait_until(lambda: len(load.acked) >= acked_at_restart + 200, 60)
    load.stop()
    assert httpx.get(f"{gw.url}/v1/incidents", headers=AUTH, timeout=10).status_code == 200
    missing = load.acked - stored_ids(url)
    assert not missing, f"{len(missing)} acknowledged events lost"
    assert not load.bodies_500, load.bodies_500[:2]
    assert not [s for s in load.statuses if s.startswith("5") and s != "503"], load.statuses
    assert "unhandled error" not in gw.log()
    print(f"\nFIGURE postgres: acked={len(load.acked)} statuses={dict(load.statuses)} lost=0")

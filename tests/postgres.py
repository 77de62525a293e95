"""A throwaway PostgreSQL cluster for the tests (bench/pg.py's, without fsync: the tests
check behaviour, not durable-commit speed), one per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.pg import PgCluster as _Cluster
from bench.pg import as_pg_user

__all__ = ["PgCluster", "as_pg_user", "pg_cluster"]


class PgCluster(_Cluster):
    def __init__(self) -> None:
        super().__init__(durable=False)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster().start()
    yield cluster
    cluster.stop()

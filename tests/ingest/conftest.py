"""Fixtures: a private PostgreSQL (devtools/postgres.py) on a free loopback port, never the
machine's own. `pg_dsn` (a fresh database per test in a cluster shared by the test process) is
cheap enough for the inner loop; a test that stops, kills or fills a cluster takes its own."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.postgres import PostgresCluster

_database_numbers = itertools.count()


@contextlib.contextmanager
def _cluster_dir(keep_log_in: Path) -> Iterator[Path]:
    """A directory of our own under /tmp for a cluster, outside pytest's tmp root: any other
    pytest session on the machine resets that root to mode 0700, and a running server under
    it loses its data directory (seen: "pg_control: Permission denied"). The log is copied
    to `keep_log_in` at the end."""
    base = Path(tempfile.mkdtemp(prefix="edge-ingest-pg-", dir="/tmp"))
    try:
        yield base
    finally:
        with contextlib.suppress(OSError):
            shutil.copy(base / "postgres.log", keep_log_in / "postgres.log")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """One cluster per test process (each pytest-xdist worker has its own), fsync off. Shared:
    do not stop, kill, fill or reconfigure it (use `own_pg_cluster`); use `pg_dsn`'s database."""
    with (
        _cluster_dir(tmp_path_factory.mktemp("pg")) as base,
        PostgresCluster.create(base, fsync=False) as pg,
    ):
        yield pg


@pytest.fixture
def pg_dsn(pg_cluster: PostgresCluster) -> Iterator[str]:
    """The DSN of a new, empty database `test_<n>` in the shared cluster, dropped afterwards
    (connections still open to it are ended)."""
    name = f"test_{next(_database_numbers)}"
    dsn = pg_cluster.create_database(name)
    try:
        yield dsn
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture
def own_pg_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PostgresCluster]:
    """A durable cluster of the test's own (fsync on), started, to stop, kill or restart at
    will; stopped and removed afterwards (its log stays in tmp_path). The test must be marked
    e2e: it starts a process of its own."""
    if request.node.get_closest_marker("e2e") is None:
        pytest.fail("a test using own_pg_cluster starts a cluster: mark it @pytest.mark.e2e")
    with _cluster_dir(tmp_path) as base, PostgresCluster.create(base) as pg:
        yield pg

"""The private PostgreSQL of devtools/postgres.py, through asyncpg (edge-ingest's driver): a fresh
database per test, a crash and its recovery, a full disk, two clusters side by side."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from devtools.postgres import PostgresCluster, PostgresNotInstalled, PsqlError, find_bindir


@contextlib.asynccontextmanager
async def connected(dsn: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        yield conn
    finally:
        await conn.close(timeout=10)


def mounted(path: Path) -> bool:
    return any(
        line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines()
    )


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_a_fresh_empty_database(pg_dsn: str, run: int) -> None:
    async with connected(pg_dsn) as conn:
        assert await conn.fetchval("SELECT current_database()") == pg_dsn.rsplit("/", 1)[1]
        # The second run would fail here if the first one's table were still there.
        await conn.execute("CREATE TABLE readings (camera text PRIMARY KEY, n int)")
        await conn.execute("INSERT INTO readings VALUES ('cam-1', $1)", run)
        assert await conn.fetchval("SELECT n FROM readings") == run


def test_the_shared_cluster_is_on_loopback_only_with_trust(pg_cluster: PostgresCluster) -> None:
    assert pg_cluster.running and pg_cluster.pid is not None
    assert pg_cluster.psql("SHOW listen_addresses") == "127.0.0.1"
    assert pg_cluster.psql("SHOW port") == str(pg_cluster.port)
    assert pg_cluster.psql("SHOW fsync") == "off"
    assert pg_cluster.psql("SHOW server_encoding") == "UTF8"
    assert pg_cluster.psql("SHOW lc_collate") == "C"
    sockets = pg_cluster.psql("SHOW unix_socket_directories")
    assert sockets == str(pg_cluster.socket_dir or "")
    assert not sockets.startswith("/var/run") and not sockets.startswith("/run")
    rules = pg_cluster.psql("SELECT type, address, auth_method FROM pg_hba_file_rules")
    assert rules.splitlines() == ["local||trust", "host|127.0.0.1|trust"]
    assert (pg_cluster.data_dir.stat().st_uid, pg_cluster.data_dir.owner()) == (
        pg_cluster.user.uid,
        "postgres",
    )


def test_psql_errors_raise_with_the_message(pg_cluster: PostgresCluster) -> None:
    with pytest.raises(PsqlError, match="syntax error"):
        pg_cluster.psql("SELEC 1")
    with pytest.raises(ValueError, match="not a plain database name"):
        pg_cluster.create_database("x; DROP DATABASE postgres")


def test_missing_binaries_say_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "15" / "bin").mkdir(parents=True)  # a client-only install: no initdb
    with pytest.raises(PostgresNotInstalled, match="apt-get install -y postgresql-15"):
        find_bindir([tmp_path])


@pytest.mark.e2e
async def test_committed_data_survives_a_restart_and_a_crash(
    own_pg_cluster: PostgresCluster,
) -> None:
    pg = own_pg_cluster
    assert pg.psql("SHOW fsync") == "on"
    dsn = pg.create_database("crash")
    async with connected(dsn) as conn:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        await conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")

    pg.restart()  # a clean shutdown: no recovery on the way up
    assert "automatic recovery in progress" not in pg.log_text()
    assert pg.psql("SELECT count(*) FROM t", database="crash") == "1000"

    in_flight = await asyncpg.connect(dsn, timeout=10)
    await in_flight.execute("BEGIN; INSERT INTO t VALUES (1001)")
    crashed_pid = pg.pid
    pg.kill()
    assert not pg.running and pg.pid is None
    in_flight.terminate()

    pg.start()
    assert pg.pid != crashed_pid
    assert "automatic recovery in progress" in pg.log_text()
    async with connected(dsn) as conn:
        assert await conn.fetchval("SELECT count(*) FROM t") == 1000
        assert await conn.fetchval("SELECT max(id) FROM t") == 1000


@pytest.mark.e2e
async def test_a_full_disk_fails_an_insert_until_it_is_freed(tmp_path: Path) -> None:
    with PostgresCluster.create(tmp_path / "pg", disk_bytes=64 << 20) as pg:
        assert mounted(pg.cluster_dir)
        dsn = pg.create_database("full")
        async with connected(dsn) as conn:
            await conn.execute("CREATE TABLE t (id int)")
            pid = pg.pid
            assert pg.fill_disk() > 0
            assert pg.disk_free() < 8192
            with pytest.raises(asyncpg.exceptions.DiskFullError, match="No space left on device"):
                await conn.execute("INSERT INTO t VALUES (1)")

            pg.free_disk()
            await conn.execute("INSERT INTO t VALUES (2)")
            assert [r["id"] for r in await conn.fetch("SELECT id FROM t")] == [2]
            assert pg.pid == pid  # an error for the statement, not a crash of the server
    assert not mounted(pg.cluster_dir) and not pg.cluster_dir.exists()
    assert "No space left on device" in pg.log_text()  # the log stays


@pytest.mark.e2e
async def test_two_clusters_at_once_have_their_own_ports_and_data(tmp_path: Path) -> None:
    with (
        PostgresCluster.create(tmp_path / "a", fsync=False) as a,
        PostgresCluster.create(tmp_path / "b", fsync=False) as b,
    ):
        assert a.port != b.port
        a.psql("CREATE TABLE only_in_a (x int)")
        async with connected(a.dsn()) as in_a, connected(b.dsn()) as in_b:
            assert await in_a.fetchval("SHOW port") == str(a.port)
            assert await in_b.fetchval("SHOW port") == str(b.port)
            tables = "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'"
            assert (await in_a.fetchval(tables), await in_b.fetchval(tables)) == (1, 0)


@pytest.mark.e2e
def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    pg = PostgresCluster.create(tmp_path / "pg", fsync=False, settings={"shared_buffers": "lots"})
    try:
        with pytest.raises(RuntimeError, match="shared_buffers"):
            pg.start()
        assert not pg.running
    finally:
        pg.close()
    assert not pg.cluster_dir.exists()

"""edge-ingest under faults, as real processes: the service (`edge-ingest serve`, a child
process) SIGKILLed mid-transaction, PostgreSQL crashed, stopped and out of disk, an answer lost
after COMMIT, one batch on two connections and on two replicas at once (C1, C2, C4, C6).

Every test ends with the stored totals exactly what the accepted batches add up to. A
transaction is held at a chosen point with a lock the test holds (a gateway's watermark row, or
an advisory lock a trigger waits for), never with a sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from devtools.gateways import Batch
from devtools.postgres import PostgresCluster
from devtools.procs import wait_for
from tests.ingest.test_contract import (
    NOTHING,
    TOKEN,
    Books,
    Conn,
    Connector,
    Ingests,
    Traffic,
    deliver,
    gateway,
    gateway_rows,
    lock_waiters,
    migrated,
    run_gateway,
    stored_rows,
    until,
)

pytestmark = pytest.mark.e2e

GATE = 4242  # the advisory lock the triggers below wait for while the test holds it


# -- holding a batch's transaction at a chosen point ----------------------------------------------


async def gate_at_commit(conn: Conn, gw: str) -> None:
    """`gw`'s batches wait for the gate inside their COMMIT (a deferred constraint trigger):
    everything is written, the COMMIT was sent, it has not returned."""
    await conn.execute(
        f"""
        CREATE FUNCTION gate_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_advisory_xact_lock_shared({GATE}); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER gate_at_commit AFTER INSERT ON edge_ingest.batches
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.gateway = '{gw}')
        EXECUTE FUNCTION gate_at_commit();
        """
    )


async def gate_at_merge(conn: Conn, gw: str) -> None:
    """`gw`'s batches wait for the gate once they have read the watermark, before they merge
    their first row (a BEFORE INSERT trigger on edge_ingest.counts): two copies of one batch
    let through race to merge it, unless the watermark's row lock keeps the second out."""
    await conn.execute(
        f"""
        CREATE FUNCTION gate_at_merge() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_advisory_xact_lock_shared({GATE}); RETURN NEW; END $$;
        CREATE TRIGGER gate_at_merge BEFORE INSERT ON edge_ingest.counts
        FOR EACH ROW WHEN (NEW.gateway = '{gw}') EXECUTE FUNCTION gate_at_merge();
        """
    )


async def both_in_flight(conn: Conn) -> None:
    """Two edge-ingest transactions waiting on a lock: the gate, or the watermark's row."""

    async def two() -> bool:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'edge-ingest'"
            " AND datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )
        return n == 2

    await until(two, timeout_s=20, what="both copies of the batch in their transactions")


class Gate:
    """The advisory lock GATE, held on a connection of the test's own."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    async def close(self) -> None:
        await self.conn.execute("SELECT pg_advisory_unlock_all()")

    async def __aenter__(self) -> Gate:
        await self.conn.execute("SELECT pg_advisory_lock($1)", GATE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def waiting(conn: Conn, n: int, wait_event: str) -> None:
    async def enough() -> bool:
        return await lock_waiters(conn, wait_event) >= n

    await until(enough, timeout_s=20, what=f"{n} edge-ingest backends waiting on {wait_event}")


async def edge_ingest_backends(conn: Conn) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'edge-ingest'"
        " AND datname = current_database()"
    )
    return n


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def ingests(tmp_path: Path) -> Iterator[Ingests]:
    started = Ingests(tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
async def connect(pg_dsn: str) -> AsyncIterator[Connector]:
    conns = Connector(pg_dsn)
    try:
        yield conns
    finally:
        await conns.close()


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Conn]:
    conn = await migrated(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close(timeout=10)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


async def post(
    client: httpx.AsyncClient, url: str, batch: Batch, wait_s: float = 30
) -> httpx.Response:
    """One attempt, as the agent's forwarder makes it; gives up after `wait_s`."""
    body, headers = batch.request(TOKEN)
    return await client.post(url, content=body, headers=headers, timeout=wait_s)


# -- the service killed --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["waiting for the row lock", "inside COMMIT"])
async def test_the_service_killed_mid_transaction_loses_nothing_and_counts_nothing_twice(
    pg_dsn: str,
    connect: Connector,
    db: Conn,
    ingests: Ingests,
    client: httpx.AsyncClient,
    where: str,
) -> None:
    ingest = ingests(pg_dsn, extra={"lock_timeout_ms": "60000"})
    books, traffic = Books(), Traffic()
    gw = gateway("gw-1", seed=21)
    await run_gateway(client, [ingest.url], gw, books, traffic, batches=1, chunks=20)

    holder = await connect()
    if where == "inside COMMIT":
        await gate_at_commit(db, "gw-1")
        await holder.execute("SELECT pg_advisory_lock($1)", GATE)
        wait_event = "advisory"
    else:  # another transaction holds the gateway's watermark row
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM edge_ingest.gateways WHERE gateway = 'gw-1' FOR UPDATE")
        wait_event = "transactionid"
    batch = gw.cut(20)
    sent = asyncio.create_task(post(client, ingest.url, batch))
    await waiting(db, 1, wait_event)
    ingest.kill()
    # C1: not answered 200 -- its transaction had not committed when the service died.
    with pytest.raises(httpx.TransportError):
        await sent

    if where == "inside COMMIT":
        await holder.execute("SELECT pg_advisory_unlock($1)", GATE)
    else:
        await holder.execute("ROLLBACK")

    async def orphans_gone() -> bool:
        return await edge_ingest_backends(db) == 0

    await until(orphans_gone, timeout_s=30, what="the killed service's backends to end")
    restarted = await asyncio.to_thread(ingests, pg_dsn)
    doc = await deliver(client, [restarted.url], batch, traffic)
    # Waiting for the lock, nothing was committed: applied now. Inside COMMIT, the server
    # finished the commit it had been sent: the retry is a replay.
    assert doc["outcome"] == ("replay" if where == "inside COMMIT" else "applied")
    books.answered(batch, doc)
    await run_gateway(client, [restarted.url], gw, books, traffic, batches=2, chunks=20)
    await books.check(db)


# -- the answer lost -----------------------------------------------------------------------------


async def test_an_answer_lost_after_commit_is_a_replay_on_retry(
    pg_dsn: str, connect: Connector, db: Conn, ingests: Ingests, client: httpx.AsyncClient
) -> None:
    ingest = ingests(pg_dsn)
    await gate_at_commit(db, "gw-1")
    books, traffic = Books(), Traffic()
    gw = gateway("gw-1", seed=22)
    batch = gw.cut(20)
    async with Gate(await connect()):
        # The agent's timeout is shorter than this commit: it gives up, the commit goes on.
        with pytest.raises(httpx.ReadTimeout):
            await post(client, ingest.url, batch, wait_s=1.0)
        await waiting(db, 1, "advisory")  # the batch is in its COMMIT, held there

    async def committed() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM edge_ingest.batches"))

    await until(committed, timeout_s=20, what="the commit")
    doc = await deliver(client, [ingest.url], batch, traffic)
    assert doc == {"outcome": "replay", "next_seq": batch.last_seq + 1}
    books.answered(batch, doc)
    await run_gateway(client, [ingest.url], gw, books, traffic, batches=2, chunks=20)
    await books.check(db)


# -- one batch, two connections, two replicas ----------------------------------------------------


async def test_the_same_batch_on_two_connections_at_once_applies_once(
    pg_dsn: str, connect: Connector, db: Conn, ingests: Ingests, client: httpx.AsyncClient
) -> None:
    ingest = ingests(pg_dsn)
    books, traffic = Books(), Traffic()
    gw = gateway("gw-1", seed=23)
    await run_gateway(client, [ingest.url], gw, books, traffic, batches=1, chunks=10)
    await gate_at_merge(db, "gw-1")
    batch = gw.cut(30)
    async with (
        Gate(await connect()) as gate,
        httpx.AsyncClient(timeout=30) as a,
        httpx.AsyncClient(timeout=30) as b,
    ):
        both = [asyncio.create_task(post(c, ingest.url, batch)) for c in (a, b)]
        await both_in_flight(db)
        await gate.close()
        answers = await asyncio.gather(*both)
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert sorted(r.json()["outcome"] for r in answers) == ["applied", "replay"]
    books.answered(batch, answers[0].json())
    books.gateways["gw-1"].replays = 1
    await books.check(db)


async def test_two_replicas_on_one_database(
    pg_dsn: str, connect: Connector, db: Conn, ingests: Ingests, client: httpx.AsyncClient
) -> None:
    a, b = ingests(pg_dsn, pool=2), ingests(pg_dsn, pool=2)
    books, traffic = Books(), Traffic()
    # Several gateways, each retry on the other replica, with another one racing them.
    gws = [gateway(f"gw-{i}", seed=30 + i) for i in range(4)]
    await asyncio.gather(
        *(
            run_gateway(client, [a.url, b.url][:: 1 - 2 * (i % 2)], g, books, traffic,
                        batches=5, chunks=20)
            for i, g in enumerate(gws)
        )
    )  # fmt: skip

    # The same batch on both replicas at once: one applies, the other finds it applied.
    await gate_at_merge(db, "gw-0")
    batch = gws[0].cut(20)
    async with Gate(await connect()) as gate:
        both = [asyncio.create_task(post(client, i.url, batch)) for i in (a, b)]
        await both_in_flight(db)
        await gate.close()
        answers = await asyncio.gather(*both)
    assert sorted((r.status_code, r.json().get("outcome", "")) for r in answers) == [
        (200, "applied"),
        (200, "replay"),
    ]
    books.answered(batch, answers[0].json())
    books.gateways["gw-0"].replays = 1

    # The answer lost on one replica, the retry on the other: a replay there.
    await gate_at_commit(db, "gw-1")
    batch = gws[1].cut(20)
    async with Gate(await connect()) as gate:
        with pytest.raises(httpx.ReadTimeout):
            await post(client, a.url, batch, wait_s=1.0)
        await waiting(db, 1, "advisory")
    doc = await deliver(client, [b.url], batch, traffic)
    assert doc["outcome"] == "replay"
    books.answered(batch, doc)
    await books.check(db)
    assert traffic.errors == [] and set(traffic.statuses) <= {200, 503}


async def test_a_wrong_token_stores_nothing_and_the_right_one_is_applied(
    pg_dsn: str, db: Conn, ingests: Ingests, client: httpx.AsyncClient
) -> None:
    ingest = ingests(pg_dsn)
    batch = gateway("gw-1", seed=24).cut(10)
    body, headers = batch.request("last-years-token")
    r = await client.post(ingest.url, content=body, headers=headers)
    assert (r.status_code, r.headers["www-authenticate"]) == (401, "Bearer")
    assert "token is not accepted" in r.json()["error"]
    assert await stored_rows(db) == NOTHING
    assert ingest.metric("edge_ingest_batches_total", 'answer="401"') == 1
    books, traffic = Books(), Traffic()
    books.answered(batch, await deliver(client, [ingest.url], batch, traffic))
    await books.check(db)


# -- the database restarted, down, out of disk ---------------------------------------------------


async def test_postgres_crashed_and_restarted_mid_ingest_loses_nothing(
    own_pg_cluster: PostgresCluster, ingests: Ingests, client: httpx.AsyncClient
) -> None:
    pg = own_pg_cluster
    dsn = pg.create_database("ingest")
    db = await migrated(dsn)
    ingest = ingests(dsn, extra={"retry_after_s": "1"})
    books, traffic = Books(), Traffic()
    progress = asyncio.Event()
    senders = asyncio.gather(
        *(
            run_gateway(client, [ingest.url], gateway(f"gw-{i}", seed=40 + i), books, traffic,
                        batches=12, chunks=20, applied=progress)
            for i in range(6)
        )
    )  # fmt: skip
    await db.close()

    async def moved() -> bool:
        return progress.is_set()

    for stop in ("crash", "fast"):
        progress.clear()
        await until(moved, timeout_s=60, what="batches applied")
        seen = traffic.count(503)
        if stop == "crash":
            await asyncio.to_thread(pg.kill)  # mid-transaction for some of the six
        else:
            await asyncio.to_thread(pg.stop, "fast")

        async def refused(seen: int = seen) -> bool:
            return traffic.count(503) > seen

        await until(refused, timeout_s=30, what="a 503 while the database is down")
        await asyncio.to_thread(pg.start)
    await asyncio.wait_for(senders, 120)

    assert traffic.errors == []  # the service stayed up: no gateway saw a connection error
    assert set(traffic.statuses) == {200, 503}, traffic.statuses
    assert traffic.no_retry_after == 0
    db = await migrated(dsn)
    try:
        await books.check(db, replays_at_least=True)
    finally:
        await db.close()
    assert ingest.running


async def test_postgres_down_answers_503_with_retry_after_and_not_ready_then_recovers(
    own_pg_cluster: PostgresCluster, ingests: Ingests, client: httpx.AsyncClient
) -> None:
    pg = own_pg_cluster
    dsn = pg.create_database("ingest")
    await (await migrated(dsn)).close()
    ingest = ingests(dsn, extra={"retry_after_s": "2"})
    books, traffic = Books(), Traffic()
    gw = gateway("gw-1", seed=25)
    await run_gateway(client, [ingest.url], gw, books, traffic, batches=1, chunks=10)

    await asyncio.to_thread(pg.stop, "fast")
    batch = gw.cut(10)
    r = await post(client, ingest.url, batch)
    assert r.status_code == 503, r.text
    assert "database unavailable (database_down)" in r.json()["error"]
    assert r.headers["retry-after"] == "6"  # three times retry_after_s: it will take a while
    await asyncio.to_thread(
        wait_for, lambda: not ingest.ready(), timeout_s=20, what="/readyz to fail"
    )
    status, text = ingest.get("/readyz")
    assert status == 503 and "database" in text, text

    await asyncio.to_thread(pg.start)
    await asyncio.to_thread(ingest.wait_ready)
    books.answered(batch, await deliver(client, [ingest.url], batch, traffic))
    db = await migrated(dsn)
    try:
        await books.check(db)
    finally:
        await db.close()
    assert ingest.metric("edge_ingest_unavailable_total", 'cause="database_down"') >= 1


async def test_a_full_disk_answers_503_and_the_retries_apply_once_it_is_freed(
    tmp_path: Path, ingests: Ingests, client: httpx.AsyncClient
) -> None:
    with PostgresCluster.create(tmp_path / "pg", disk_bytes=64 << 20) as pg:
        # The cluster's own database: CREATE DATABASE would write the whole template to the
        # WAL. A fresh WAL segment, in use before the disk is full: the server cannot make a
        # new one then (it would PANIC, a different fault), and this test needs ~2 MB of it.
        dsn = pg.dsn()
        db = await migrated(dsn)
        await db.execute("SELECT pg_switch_wal()")
        try:
            ingest = ingests(dsn, extra={"retry_after_s": "1"})
            books, traffic = Books(), Traffic()
            gws = [gateway(f"gw-{i}", seed=50 + i, cameras=64) for i in range(3)]
            await asyncio.gather(
                *(run_gateway(client, [ingest.url], g, books, traffic, batches=2, chunks=50)
                  for g in gws)
            )  # fmt: skip
            walled = await db.fetchval("SELECT pg_current_wal_lsn()::text")
            pg.fill_disk()
            senders = asyncio.gather(
                *(run_gateway(client, [ingest.url], g, books, traffic, batches=20, chunks=50)
                  for g in gws)
            )  # fmt: skip

            async def disk_full() -> bool:
                return traffic.count(503) >= 3

            await until(disk_full, timeout_s=60, what="503s for the full disk")
            assert not senders.done()
            assert ingest.metric("edge_ingest_unavailable_total", 'cause="disk_full"') >= 1
            pg.free_disk()
            await asyncio.wait_for(senders, 120)
            assert traffic.errors == [] and traffic.no_retry_after == 0
            assert set(traffic.statuses) == {200, 503}
            await books.check(db)
            assert all(row["batches"] == 22 for row in (await gateway_rows(db)).values())
            # Well within the segment in use when the disk filled (about 4 MB of 16).
            used = await db.fetchval(f"SELECT pg_current_wal_lsn() - '{walled}'::pg_lsn")
            assert used < 8 << 20
        finally:
            await db.close()


async def test_a_frozen_database_is_a_503_within_the_client_deadline_never_a_hang(
    own_pg_cluster: PostgresCluster, ingests: Ingests, client: httpx.AsyncClient
) -> None:
    """A database that stops answering (frozen, or behind a partition) cannot enforce its own
    statement_timeout: the client-side deadline must end the batch with a 503 (found by the
    adversary: batches hung until the database came back, the pool pinned)."""
    pg = own_pg_cluster
    dsn = pg.create_database("ingest")
    await (await migrated(dsn)).close()
    ingest = ingests(dsn, extra={"statement_timeout_ms": "1000"})
    books, traffic = Books(), Traffic()
    gw = gateway("gw-1", seed=26)
    await run_gateway(client, [ingest.url], gw, books, traffic, batches=1, chunks=10)
    assert pg.pid is not None
    frozen = server_pids(pg.pid)  # each backend is its own process group: one by one
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        batch = gw.cut(10)
        r = await post(client, ingest.url, batch, wait_s=30)  # httpx raises if it hangs
        assert r.status_code == 503, r.text
        assert "retry-after" in r.headers
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    books.answered(batch, await deliver(client, [ingest.url], batch, traffic))
    db = await migrated(dsn)
    try:
        await books.check(db)
    finally:
        await db.close()


def server_pids(postmaster: int) -> list[int]:
    """The postmaster and its children (the backends, each its own session)."""
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:  # the ppid, after the command's closing parenthesis
            pids.append(int(stat.parent.name))
    return pids

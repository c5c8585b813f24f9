"""Many gateways, one small pool (C3, C4): the database sees at most `pool` connections per
replica whatever the number of gateways; saturation and a slow database are 503s with
Retry-After, never a hang, a connection error or a 500; nothing is dropped.

Bounded for a shared 2-core machine: 200 simulated gateways x 3 batches of 5 chunks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from devtools.gateways import Ingest
from devtools.procs import wait_for
from tests.ingest.test_contract import (
    TOKEN,
    Books,
    Conn,
    Connector,
    Ingests,
    Traffic,
    deliver,
    gateway,
    lock_waiters,
    migrated,
    run_gateway,
    until,
)

pytestmark = pytest.mark.e2e

GATEWAYS = 200


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


async def backends(conn: Conn) -> int:
    """edge-ingest's connections to this database, whatever they are doing."""
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'edge-ingest'"
        " AND datname = current_database()"
    )
    return n


@pytest.mark.parametrize("replicas", [1, 2])
async def test_two_hundred_gateways_never_open_more_than_the_pool(
    pg_dsn: str, db: Conn, ingests: Ingests, replicas: int
) -> None:
    services = [ingests(pg_dsn, pool=4) for _ in range(replicas)]
    books, traffic = Books(), Traffic()
    samples: list[int] = []

    async def one(i: int) -> None:
        # A gateway of its own: its own HTTP client and connection, as on a real site. It
        # starts on its own replica; each retry lands on the other one.
        async with httpx.AsyncClient(timeout=60) as client:
            urls = [s.url for s in services]
            await run_gateway(client, urls[i % replicas :] + urls[: i % replicas],
                              gateway(f"gw-{i:03d}", seed=i, cameras=4), books, traffic,
                              batches=3, chunks=5)  # fmt: skip

    senders = asyncio.gather(*(one(i) for i in range(GATEWAYS)))
    while not senders.done():
        samples.append(await backends(db))
        await asyncio.sleep(0.01)  # a sampling period
    await asyncio.wait_for(senders, 120)

    assert max(samples) <= 4 * replicas, samples
    assert len(samples) >= 3 and max(samples) >= 2  # sampled under load, not after it
    assert traffic.errors == []
    assert set(traffic.statuses) <= {200, 503}
    assert traffic.no_retry_after == 0
    await books.check(db)


async def test_a_saturated_pool_answers_503_with_retry_after_and_drops_nothing(
    pg_dsn: str, connect: Connector, db: Conn, ingests: Ingests
) -> None:
    """One connection, held by a batch waiting for a lock: the next batches get 503 after the
    acquire timeout (or at once, past max_waiting), and all apply once it is free."""
    ingest = ingests(
        pg_dsn,
        pool=1,
        extra={"acquire_timeout_ms": "300", "max_waiting": "2", "lock_timeout_ms": "60000"},
    )
    books, traffic = Books(), Traffic()
    slow = gateway("gw-slow", seed=60)
    async with httpx.AsyncClient(timeout=30) as client:
        await run_gateway(client, [ingest.url], slow, books, traffic, batches=1, chunks=5)
        holder = await connect()
        await holder.execute("BEGIN")
        await holder.execute(
            "SELECT 1 FROM edge_ingest.gateways WHERE gateway = 'gw-slow' FOR UPDATE"
        )
        stuck = slow.cut(5)
        body, headers = stuck.request(TOKEN)
        first = asyncio.create_task(client.post(ingest.url, content=body, headers=headers))

        async def holding() -> bool:
            return await lock_waiters(db, "transactionid") == 1

        await until(holding, timeout_s=20, what="the only connection to wait for the lock")
        others = [gateway(f"gw-{i}", seed=61 + i) for i in range(6)]
        refused = [g.cut(5) for g in others]
        requests = [b.request(TOKEN) for b in refused]
        answers = await asyncio.gather(
            *(client.post(ingest.url, content=body, headers=hs) for body, hs in requests)
        )
        assert {r.status_code for r in answers} == {503}, [r.text for r in answers]
        assert all(int(r.headers["retry-after"]) >= 1 for r in answers)
        causes = {r.json()["error"] for r in answers}
        assert causes <= {
            "database unavailable (pool_timeout): retry later",
            "database unavailable (queue_full): retry later",
        }, causes
        assert await backends(db) == 1
        assert not first.done()
        # Not ready while the pool stays exhausted (the probe gets no connection either).
        await asyncio.to_thread(
            wait_for, lambda: not ingest.ready(), timeout_s=20, what="/readyz to fail"
        )

        await holder.execute("ROLLBACK")
        r = await first
        assert r.status_code == 200, r.text
        books.answered(stuck, r.json())
        # The refused batches, sent again as the agent does, then the next ones.
        docs = await asyncio.gather(*(deliver(client, [ingest.url], b, traffic) for b in refused))
        for b, doc in zip(refused, docs, strict=True):
            books.answered(b, doc)
        await asyncio.gather(
            *(run_gateway(client, [ingest.url], g, books, traffic, batches=2, chunks=5)
              for g in others)
        )  # fmt: skip
    await books.check(db)


async def test_a_lock_held_past_lock_timeout_is_a_503_for_that_gateway_only(
    pg_dsn: str, connect: Connector, db: Conn, ingests: Ingests
) -> None:
    ingest: Ingest = ingests(pg_dsn, extra={"lock_timeout_ms": "200"})
    books, traffic = Books(), Traffic()
    slow = gateway("gw-slow", seed=70)
    others = [gateway(f"gw-{i}", seed=71 + i) for i in range(5)]
    async with httpx.AsyncClient(timeout=20) as client:
        await run_gateway(client, [ingest.url], slow, books, traffic, batches=1, chunks=5)
        holder = await connect()
        await holder.execute("BEGIN")
        await holder.execute(
            "SELECT 1 FROM edge_ingest.gateways WHERE gateway = 'gw-slow' FOR UPDATE"
        )
        batch = slow.cut(5)
        body, headers = batch.request(TOKEN)
        # Not a hang: the client's own timeout (20 s) is far beyond the lock_timeout.
        r = await client.post(ingest.url, content=body, headers=headers)
        assert r.status_code == 503, r.text
        assert "database unavailable (lock_timeout)" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
        # The other gateways go on meanwhile, the lock still held.
        await asyncio.gather(
            *(run_gateway(client, [ingest.url], g, books, traffic, batches=3, chunks=5)
              for g in others)
        )  # fmt: skip
        assert not holder.is_closed() and holder.is_in_transaction()
        await holder.execute("ROLLBACK")
        books.answered(batch, await deliver(client, [ingest.url], batch, traffic))
    assert set(traffic.statuses) == {200}
    assert ingest.metric("edge_ingest_unavailable_total", 'cause="lock_timeout"') == 1
    await books.check(db)

"""edge-ingest's contract, over real HTTP into a real PostgreSQL (the shared cluster, a fresh
database per test): what each answer means (C1, C5, C6) and that the stored totals are exactly
what the accepted batches add up to.

The service runs in the test's own event loop (uvicorn on a free loopback port, the real ASGI
app and pool); test_faults.py and test_scale.py run it as a child process. The helpers here
(the service, an agent-like sender, the books every test ends with) are shared by those files.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import httpx
import pytest
import uvicorn
from edge_ingest.app import IngestApp
from edge_ingest.schema import migrate
from edge_ingest.store import Store

from agent.core.model import Chunk, encode_batch, encode_chunk
from devtools.gateways import Batch, Gateway, Ingest, Truth, db_totals
from devtools.procs import HOST, free_port

TOKEN = "contract-token"
I64 = 2**63 - 1
# Event time now: devtools.gateways.Gateway's default start (2026-05-28) lies beyond the
# service's 30-day retention on a later clock, and the service's first maintenance run would
# delete what the test stores.
NOW = int(time.time())
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record]"


# -- waiting without sleeping for a fixed time ---------------------------------------------------


async def until(condition: Callable[[], Awaitable[object]], *, timeout_s: float, what: str) -> Any:
    """Poll an async condition until it is truthy (devtools.procs.wait_for for the event loop:
    the service under test may be running in it); TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)  # a polling period, not a wait for the condition


def metric_value(text: str, name: str, labels: str = "") -> float:
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == want:
            return float(value)
    raise KeyError(want)


# -- the database --------------------------------------------------------------------------------


async def migrated(dsn: str) -> Conn:
    conn: Conn = await asyncpg.connect(dsn, timeout=10)
    await migrate(conn, today=dt.datetime.now(dt.UTC).date())
    return conn


async def stored_rows(conn: Conn) -> dict[str, int]:
    """How many rows each of edge-ingest's tables holds."""
    out = {}
    for table in ("gateways", "batches", "counts", "numeric", "categories", "minute_counts"):
        out[table] = await conn.fetchval(f"SELECT count(*) FROM edge_ingest.{table}")
    return out


NOTHING = {
    "gateways": 0,
    "batches": 0,
    "counts": 0,
    "numeric": 0,
    "categories": 0,
    "minute_counts": 0,
}


async def gateway_rows(conn: Conn) -> dict[str, dict[str, int]]:
    rows = await conn.fetch(
        "SELECT gateway, next_seq, batches, chunks, messages, gaps, gap_seqs, replays, refused"
        " FROM edge_ingest.gateways"
    )
    return {r["gateway"]: {k: v for k, v in dict(r).items() if k != "gateway"} for r in rows}


async def lock_waiters(conn: Conn, wait_event: str) -> int:
    """edge-ingest's backends waiting on a lock (`wait_event`: 'transactionid', 'tuple',
    'advisory', ...)."""
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'edge-ingest'"
        " AND datname = current_database() AND wait_event_type = 'Lock' AND wait_event = $1",
        wait_event,
    )
    return n


# -- batches -------------------------------------------------------------------------------------


def gateway(gateway_id: str, seed: int, **kw: Any) -> Gateway:
    """A simulated gateway whose cameras' clocks say now."""
    return Gateway(gateway_id, seed=seed, t0=NOW, **kw)


def batch_of(gateway: str, first_seq: int, chunks: Iterable[Chunk]) -> Batch:
    """A batch of hand-made chunks, encoded as the agent's outbox encodes it."""
    cs = tuple(chunks)
    rows = [(first_seq + i, first_seq + i, encode_chunk(c)) for i, c in enumerate(cs)]
    body = encode_batch(gateway, rows, sent_at=float(NOW))
    return Batch(gateway, first_seq, first_seq + len(cs) - 1, body, cs)


def chunk(
    camera: str = "cam-1",
    t: int = NOW,
    *,
    count: int = 1,
    value: float = 0.5,
    cls: str = "car",
) -> Chunk:
    c = Chunk(camera, "detections", t, 1)
    c.add_times(t + 0.1, t + 0.2)
    c.add_number("conf", value, t + 0.1)
    c.add_category("cls", cls, 16)
    c.count = count
    c.cat["cls"][cls] = count
    return c


def edited(batch: Batch, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The batch's JSON with `edit` applied to its document."""
    doc = json.loads(batch.body)
    edit(doc)
    return json.dumps(doc).encode()


# -- the books: what the database must hold ------------------------------------------------------


@dataclass
class Expect:
    next_seq: int = 0
    batches: int = 0
    chunks: int = 0
    messages: int = 0
    gaps: int = 0
    gap_seqs: int = 0
    replays: int = 0
    refused: int = 0


@dataclass
class Books:
    """The ground truth (devtools.gateways.Truth) and each gateway's counters in
    edge_ingest.gateways, from the answers the gateways got."""

    truth: Truth = field(default_factory=Truth)
    gateways: dict[str, Expect] = field(default_factory=lambda: defaultdict(Expect))

    def answered(self, batch: Batch, doc: dict[str, Any]) -> None:
        """The first 200 a gateway got for `batch` (applied now, or before: a replay)."""
        self.truth.apply(batch)
        g = self.gateways[batch.gateway]
        g.next_seq = batch.last_seq + 1
        g.batches += 1
        g.chunks += len(batch.chunks)
        g.messages += sum(c.count for c in batch.chunks)
        g.gaps += doc["outcome"] == "gap"
        g.gap_seqs += doc.get("gap", 0)
        g.replays += doc["outcome"] == "replay"

    async def check(self, conn: Conn, *, replays_at_least: bool = False) -> None:
        """The totals exact, the gateways' counters right, the rollup equal to the seconds."""
        assert self.truth.differences(await db_totals(conn)) == []
        got = await gateway_rows(conn)
        want = {gw: vars(e) for gw, e in self.gateways.items()}
        if replays_at_least:
            # A replay whose answer was lost (the database restarted under it) counted too.
            for gw, row in got.items():
                if gw in want and row["replays"] >= want[gw]["replays"]:
                    row["replays"] = want[gw]["replays"]
        assert got == want
        assert await conn.fetchval("SELECT count(*) FROM edge_ingest.batches") == sum(
            e.batches for e in self.gateways.values()
        )
        # The per-minute rollup, kept in the batch's transaction, agrees with the seconds.
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM (SELECT gateway, camera, stream, date_trunc('minute', t)"
                " AS minute, sum(count) AS count FROM edge_ingest.per_second GROUP BY 1, 2, 3, 4)"
                " s FULL JOIN edge_ingest.per_minute m USING (gateway, camera, stream, minute)"
                " WHERE s.count IS DISTINCT FROM m.count"
            )
            == 0
        )


# -- an agent-like sender ------------------------------------------------------------------------


@dataclass
class Traffic:
    """Every answer and transport error the senders saw."""

    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    no_retry_after: int = 0
    retry_after: list[float] = field(default_factory=list)

    def count(self, status: int) -> int:
        return self.statuses.count(status)


async def deliver(
    client: httpx.AsyncClient,
    urls: list[str],
    batch: Batch,
    traffic: Traffic,
    *,
    token: str = TOKEN,
    timeout_s: float = 90,
    cap_s: float = 0.3,
) -> dict[str, Any]:
    """Send `batch` as the agent does until it is answered 200 (returns the answer's document):
    the same bytes and key every time, 503 -> wait Retry-After (bounded by `cap_s` for the
    test), other 5xx and transport errors -> a short backoff. Each attempt goes to the next of
    `urls` (a retry lands on another replica). A 4xx fails the test."""
    body, headers = batch.request(token)
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        url = urls[attempt % len(urls)]
        attempt += 1
        delay = 0.05
        try:
            r = await client.post(url, content=body, headers=headers)
        except httpx.TransportError as e:
            traffic.errors.append(f"{batch.key} -> {url}: {type(e).__name__}: {e}")
        else:
            traffic.statuses.append(r.status_code)
            if r.status_code == 200:
                doc: dict[str, Any] = r.json()
                return doc
            if 400 <= r.status_code < 500:
                raise AssertionError(f"{batch.key}: answered {r.status_code} {r.text}")
            if r.status_code == 503:
                ra = r.headers.get("retry-after")
                if ra is None:
                    traffic.no_retry_after += 1
                else:
                    traffic.retry_after.append(float(ra))
                    delay = min(float(ra), cap_s)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{batch.key} not answered 200 within {timeout_s:.0f} s")
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # the agent's backoff


async def run_gateway(
    client: httpx.AsyncClient,
    urls: list[str],
    gateway: Gateway,
    books: Books,
    traffic: Traffic,
    *,
    batches: int,
    chunks: int,
    applied: asyncio.Event | None = None,
) -> None:
    """One gateway's forwarder: cut a batch, deliver it, the next only after it is answered."""
    for _ in range(batches):
        batch = gateway.cut(chunks)
        doc = await deliver(client, urls, batch, traffic)
        books.answered(batch, doc)
        if applied is not None:
            applied.set()


# -- the service in this event loop --------------------------------------------------------------


class Service:
    """edge-ingest's ASGI app on uvicorn in this event loop, on a free loopback port."""

    def __init__(self, dsn: str, *, pool: int = 4, **app: Any) -> None:
        self.store = Store(dsn, size=pool, lock_timeout_ms=app.pop("lock_timeout_ms", 5_000))
        tokens = app.pop("tokens", frozenset({TOKEN}))
        self.app = IngestApp(self.store, tokens=tokens, **app)
        self.port = free_port()
        config = uvicorn.Config(
            self.app, host=HOST, port=self.port, http="h11", lifespan="on",
            log_level="warning", access_log=False,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None
        self.http = httpx.AsyncClient(timeout=30)

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/ingest"

    async def start(self) -> Service:
        task = self._task = asyncio.create_task(self.server.serve())

        async def started() -> bool:
            if task.done():
                raise RuntimeError(f"uvicorn exited: {task.exception()!r}")
            return self.server.started

        await until(started, timeout_s=20, what="uvicorn")

        async def ready() -> bool:
            return (await self.http.get(f"{self.base}/readyz")).status_code == 200

        await until(ready, timeout_s=20, what="/readyz")
        return self

    async def stop(self) -> None:
        await self.http.aclose()
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)

    async def post(
        self, batch: Batch, token: str | None = TOKEN, *, gzipped: bool = True
    ) -> httpx.Response:
        body, headers = batch.request(token, gzipped=gzipped)
        return await self.http.post(self.url, content=body, headers=headers)

    async def post_raw(
        self, body: bytes, key: str = "gw-1:1-1", *, gzipped: bool = True, **headers: str
    ) -> httpx.Response:
        hs = {"Content-Type": "application/json", "Idempotency-Key": key}
        hs["Authorization"] = f"Bearer {TOKEN}"
        if gzipped:
            body = gzip.compress(body, mtime=0)
            hs["Content-Encoding"] = "gzip"
        hs.update({k.replace("_", "-"): v for k, v in headers.items()})
        return await self.http.post(self.url, content=body, headers=hs)

    async def metric(self, name: str, labels: str = "") -> float:
        return metric_value((await self.http.get(f"{self.base}/metrics")).text, name, labels)


class Connector:
    """Connections of the test's own to one database (a lock holder, say), all closed at the
    end whatever happened."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.opened: list[Conn] = []

    async def __call__(self) -> Conn:
        conn: Conn = await asyncpg.connect(self.dsn, timeout=10)
        self.opened.append(conn)
        return conn

    async def close(self) -> None:
        for conn in self.opened:
            if not conn.is_closed():
                await conn.close(timeout=5)


class Ingests:
    """`edge-ingest serve` child processes (devtools.gateways.Ingest) with this file's token,
    started and ready; close() stops them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Ingest] = []

    def __call__(self, dsn: str, *, pool: int = 4, extra: dict[str, str] | None = None) -> Ingest:
        i = Ingest(self.workdir / f"ingest-{len(self.started)}", dsn, pool=pool, token=TOKEN,
                   extra=extra)  # fmt: skip
        self.started.append(i)
        i.start()
        i.wait_ready()
        return i

    def close(self) -> None:
        for i in self.started:
            i.stop(timeout_s=10)


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Conn]:
    """A connection to the test's database, migrated."""
    conn = await migrated(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close(timeout=10)


@pytest.fixture
async def service(pg_dsn: str, db: Conn) -> AsyncIterator[Service]:
    s = await Service(pg_dsn, max_body_bytes=256 * 1024, max_decompressed_bytes=1024 * 1024).start()
    try:
        yield s
    finally:
        await s.stop()


def answered(r: httpx.Response, status: int, error: str = "") -> dict[str, Any]:
    """The answer's document, after checking its status and that its error names `error`."""
    assert r.status_code == status, r.text
    doc: dict[str, Any] = r.json()
    if error:
        assert error in doc["error"], doc
    return doc


# -- C1: 200 after COMMIT; a replay applies nothing ----------------------------------------------


async def test_batches_are_answered_200_once_applied(service: Service, db: Conn) -> None:
    books = Books()
    gw = gateway("gw-1", seed=1)
    for i in range(3):
        batch = gw.cut(20)
        doc = answered(await service.post(batch), 200)
        assert doc == {"outcome": "applied", "next_seq": batch.last_seq + 1, "chunks": 20}
        books.answered(batch, doc)
        # Answered, so committed: visible at once to any other connection.
        assert await db.fetchval("SELECT count(*) FROM edge_ingest.batches") == i + 1
    await books.check(db)
    assert await service.metric("edge_ingest_batches_total", 'answer="200"') == 3
    assert await service.metric("edge_ingest_batch_outcomes_total", 'outcome="applied"') == 3


async def test_a_replay_is_answered_200_and_applies_nothing(service: Service, db: Conn) -> None:
    books = Books()
    gw = gateway("gw-1", seed=2)
    first, second = gw.cut(10), gw.cut(10)
    books.answered(first, answered(await service.post(first), 200))
    books.answered(second, answered(await service.post(second), 200))
    # The agent lost the answers and sends both again; the second also uncompressed (the
    # digest is of the batch, not of its transfer encoding).
    for batch, gzipped in ((first, True), (second, True), (second, False)):
        doc = answered(await service.post(batch, gzipped=gzipped), 200)
        assert doc == {"outcome": "replay", "next_seq": second.last_seq + 1}
    books.gateways["gw-1"].replays = 3
    await books.check(db)
    assert await service.metric("edge_ingest_batch_outcomes_total", 'outcome="replay"') == 3
    assert await service.metric("edge_ingest_chunks_merged_total") == 20


async def test_a_commit_that_fails_is_never_answered_200(service: Service, db: Conn) -> None:
    """The batch's last step fails only at COMMIT (a deferred constraint trigger): the answer
    must come from COMMIT, not from the statements before it."""
    await db.execute(
        """
        CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = 'serialization_failure'; END
        $$;
        CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON edge_ingest.batches
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_at_commit();
        """
    )
    books = Books()
    batch = gateway("gw-1", seed=3).cut(10)
    r = await service.post(batch)
    answered(r, 503, "database unavailable (conflict_retry)")
    assert int(r.headers["retry-after"]) >= 1
    assert await stored_rows(db) == NOTHING

    await db.execute("DROP TRIGGER fail_at_commit ON edge_ingest.batches")
    doc = answered(await service.post(batch), 200)
    assert doc["outcome"] == "applied"
    books.answered(batch, doc)
    await books.check(db)


# -- C5: refused before the database, naming the problem -----------------------------------------


def _set_chunk(i: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["chunks"][i][key] = value

    return edit


def _huge_sums(doc: dict[str, Any]) -> None:
    # Two chunks of one window, each with a finite sum, whose merge is not finite.
    for c in doc["chunks"]:
        c.update(camera="cam-1", stream="detections", t=NOW, width_s=1)
        c["num"]["conf"].update(sum=1.5e308, max=1.0, min=0.0)


MALFORMED: dict[str, tuple[Callable[[Batch], bytes], str]] = {
    "not json": (lambda b: b.body[:-7], "malformed batch"),
    "wrong schema": (
        lambda b: edited(b, lambda d: d.update(schema="edge-agent/v0")),
        "schema must be 'edge-agent/v1'",
    ),
    "a field of the wrong type": (
        lambda b: edited(b, _set_chunk(0, "count", "many")),
        "$.chunks[0].count",
    ),
    "seqs that do not tile": (
        lambda b: edited(b, _set_chunk(1, "seq", b.first_seq + 2)),
        "seqs must tile first_seq..last_seq",
    ),
    "last_seq beyond the chunks": (
        lambda b: edited(b, lambda d: d.update(last_seq=b.last_seq + 1)),
        "seqs must tile first_seq..last_seq",
    ),
    "no chunks": (
        lambda b: edited(b, lambda d: d.update(chunks=[], last_seq=b.first_seq)),
        "chunks must not be empty",
    ),
    "a number beyond the float range": (
        lambda b: b.body.replace(b'"sum":', b'"sum":1e999,"x":', 1),
        "malformed batch",
    ),
    "sums that overflow when merged": (
        lambda b: edited(b, _huge_sums),
        "merging its chunks overflows a sum",
    ),
    "a time PostgreSQL cannot hold (32,000 BC)": (
        lambda b: edited(b, _set_chunk(0, "t", -(2**40))),
        "$.chunks[0].t",
    ),
    "NUL in a name": (
        lambda b: edited(b, _set_chunk(0, "camera", "cam\x00-1")),
        "$.chunks[0].camera",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_malformed_batch_gets_400_naming_the_problem(
    service: Service, db: Conn, case: str
) -> None:
    batch = gateway("gw-1", seed=4).cut(2)
    make, names = MALFORMED[case]
    r = await service.post_raw(make(batch), batch.key)
    answered(r, 400, names)
    assert await stored_rows(db) == NOTHING
    # The gateway's next, good batch is applied as if nothing happened.
    books = Books()
    books.answered(batch, answered(await service.post(batch), 200))
    await books.check(db)


async def test_an_idempotency_key_not_matching_the_batch_gets_400(
    service: Service, db: Conn
) -> None:
    batch = gateway("gw-1", seed=5).cut(3)
    for key in ("gw-1:1-2", "gw-2:1-3", "gw-1:2-3"):
        answered(await service.post_raw(batch.body, key), 400, f"Idempotency-Key '{key}'")
    assert await stored_rows(db) == NOTHING


async def test_broken_encodings_get_400(service: Service, db: Conn) -> None:
    batch = gateway("gw-1", seed=6).cut(5)
    body, headers = batch.request(TOKEN)
    truncated = await service.http.post(service.url, content=body[:-12], headers=headers)
    answered(truncated, 400, "gzip stream is truncated")
    garbage = await service.http.post(service.url, content=b"\x1f\x8bnot gzip", headers=headers)
    answered(garbage, 400, "not gzip")
    br = await service.post_raw(batch.body, batch.key, gzipped=False, Content_Encoding="br")
    answered(br, 400, "Content-Encoding must be gzip or identity")
    assert await stored_rows(db) == NOTHING


async def test_a_missing_or_wrong_token_gets_401(service: Service, db: Conn) -> None:
    batch = gateway("gw-1", seed=7).cut(3)
    for token in (None, "not-the-token", TOKEN + "x"):
        r = await service.post(batch, token)
        answered(r, 401, "token")
        assert r.headers["www-authenticate"] == "Bearer"
    body, headers = batch.request(None)
    basic = await service.http.post(
        service.url, content=body, headers={**headers, "Authorization": f"Basic {TOKEN}"}
    )
    answered(basic, 401, "a bearer token is required")
    assert await stored_rows(db) == NOTHING
    assert await service.metric("edge_ingest_batches_total", 'answer="401"') == 4


async def test_bodies_over_the_caps_get_413(service: Service, db: Conn) -> None:
    """The caps of the fixture: 256 KiB on the wire, 1 MiB once gunzipped."""
    big = gateway("gw-1", seed=8).cut(1000)
    assert len(big.body) > 256 * 1024
    # Declared too large, as the agent sends it (a length, the body written before the answer
    # is read): the 413 must reach it, not a connection reset, or it never splits the batch.
    answered(await service.post(big, gzipped=False), 413, "body over 262144 bytes")
    _, headers = big.request(TOKEN, gzipped=False)
    r = await service.http.post(service.url, content=big.body * 12, headers=headers)
    assert len(big.body) * 12 > 3 * 1024 * 1024
    answered(r, 413, "body over 262144 bytes")

    # Streamed without a length (chunked): refused once the cap is passed.
    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(big.body), 16384):
            yield big.body[i : i + 16384]

    r = await service.http.post(service.url, content=stream(), headers=headers)
    answered(r, 413, "body over 262144 bytes")

    # A gzip bomb: a few KiB on the wire, valid JSON, 4 MiB once decompressed.
    bomb = big.body[:-2] + b" " * (4 * 1024 * 1024) + big.body[-2:]
    compressed = gzip.compress(bomb, mtime=0)
    assert len(compressed) < 256 * 1024
    r = await service.post_raw(bomb, big.key)
    answered(r, 413, "over 1048576 bytes once decompressed")
    assert await stored_rows(db) == NOTHING


# -- C5/C6: reused and overlapping ranges, never 409 ---------------------------------------------


async def test_a_range_reused_with_other_content_gets_422_never_409(
    service: Service, db: Conn
) -> None:
    books = Books()
    applied = gateway("gw-1", seed=9).cut(10)
    books.answered(applied, answered(await service.post(applied), 200))
    # Another gateway with the same id (or an outbox restored from a backup): the same key.
    other = gateway("gw-1", seed=10).cut(10)
    assert other.key == applied.key and other.body != applied.body
    r = await service.post(other)
    answered(r, 422, "this seq range was applied before with other content")
    assert "applied up to 10" in r.json()["error"]
    books.gateways["gw-1"].refused = 1
    await books.check(db)
    assert await service.metric("edge_ingest_batch_outcomes_total", 'outcome="reused"') == 1
    assert 'answer="409"' not in (await service.http.get(f"{service.base}/metrics")).text


async def test_an_overlap_with_applied_seqs_gets_422(service: Service, db: Conn) -> None:
    books = Books()
    gw = gateway("gw-1", seed=11)
    applied = gw.cut(10)  # seqs 1..10
    books.answered(applied, answered(await service.post(applied), 200))
    # Seqs 6..15: half applied already, and not as this batch.
    overlap = gateway("gw-1", seed=12, next_seq=6).cut(10)
    answered(await service.post(overlap), 422, "these seqs overlap seqs already applied")
    # The same first seq as the applied batch, a longer range: reused, not a replay.
    longer = gateway("gw-1", seed=11).cut(12)
    answered(await service.post(longer), 422, "applied before with other content")
    books.gateways["gw-1"].refused = 2
    # The gateway's own next batch is not disturbed.
    after = gw.cut(5)
    books.answered(after, answered(await service.post(after), 200))
    await books.check(db)
    assert await service.metric("edge_ingest_batch_outcomes_total", 'outcome="overlap"') == 1


async def test_a_gateway_jumping_ahead_is_accepted_and_the_gap_counted(
    service: Service, db: Conn
) -> None:
    books = Books()
    gw = gateway("gw-1", seed=13)
    before = gw.cut(10)  # 1..10
    books.answered(before, answered(await service.post(before), 200))
    gw.reset_outbox(990)  # the outbox was deleted: the new file starts at 1001
    jumped = gw.cut(10)
    doc = answered(await service.post(jumped), 200)
    assert doc == {"outcome": "gap", "next_seq": 1011, "chunks": 10, "gap": 990}
    books.answered(jumped, doc)
    after = gw.cut(10)
    assert answered(await service.post(after), 200)["outcome"] == "applied"
    books.answered(after, {"outcome": "applied"})
    # The seqs skipped can never come later: behind the watermark.
    skipped = gateway("gw-1", seed=14, next_seq=11).cut(10)
    answered(await service.post(skipped), 422, "overlap")
    books.gateways["gw-1"].refused = 1
    await books.check(db)
    row = (await gateway_rows(db))["gw-1"]
    assert (row["gaps"], row["gap_seqs"]) == (1, 990)
    assert await service.metric("edge_ingest_gap_seqs_total") == 990
    assert await service.metric("edge_ingest_batch_outcomes_total", 'outcome="gap"') == 1


async def test_a_first_batch_starting_anywhere_is_no_gap(service: Service, db: Conn) -> None:
    books = Books()
    batch = gateway("gw-1", seed=15, next_seq=5000).cut(5)
    doc = answered(await service.post(batch), 200)
    assert doc["outcome"] == "applied"
    books.answered(batch, doc)
    await books.check(db)


# -- C5: a value the database refuses ------------------------------------------------------------


async def test_a_sum_overflowing_when_added_to_the_stored_one_gets_422_and_stores_nothing(
    service: Service, db: Conn
) -> None:
    def big_sum(camera: str = "cam-1") -> Chunk:
        c = chunk(camera)
        c.num["conf"].sum = 1.5e308  # finite, and twice it is not
        return c

    books = Books()
    huge = batch_of("gw-1", 1, [big_sum()])
    books.answered(huge, answered(await service.post(huge), 200))
    before = await stored_rows(db)
    # The same second again, in another minute's rollup too: beyond float8 once added.
    more = batch_of("gw-1", 2, [big_sum(), chunk("cam-2")])
    r = await service.post(more)
    answered(r, 422, "the database refused a value of this batch")
    assert "out of range" in r.json()["error"]
    assert await stored_rows(db) == before
    await books.check(db)


async def test_a_count_beyond_the_wire_bound_is_refused_naming_it(
    service: Service, db: Conn
) -> None:
    """A count no camera can reach (over 2^40): refused before the database, so that no
    gateway's totals can be pushed to overflow (which refused every later batch)."""
    r = await service.post(batch_of("gw-1", 1, [chunk(count=I64 - 5)]))
    answered(r, 400, "$.chunks[0].count")
    assert await stored_rows(db) == NOTHING


async def test_counts_that_would_overflow_when_merged_are_refused_before_the_database(
    service: Service, db: Conn
) -> None:
    """Chunks whose counts could add up beyond 64 bits in one batch: refused with a 4xx that
    names the field (each count is bounded by 2^40 on the wire), never a 500 (the agent
    retries a 500 for ever)."""
    for gw, counts in (("gw-1", [I64 // 2 + 1] * 2), ("gw-2", [I64, I64])):
        cams = [f"cam-{i}" for i in range(len(counts))] if gw == "gw-2" else ["cam-1"] * 2
        r = await service.post(
            batch_of(gw, 1, [chunk(c, count=n) for c, n in zip(cams, counts, strict=True)])
        )
        answered(r, 400, "count")
    assert await stored_rows(db) == NOTHING
    assert await service.metric("edge_ingest_batches_total", 'answer="500"') == 0


async def test_nul_in_a_category_value_is_stored_as_a_replacement_character(
    service: Service, db: Conn
) -> None:
    """JSON allows it and the agent keeps it; PostgreSQL's text does not: stored as U+FFFD
    (edge_ingest.rows), never refused -- a refusal would dead-letter the whole chunk."""
    sent = chunk(cls="car\x00bike")
    batch = batch_of("gw-1", 1, [sent])
    doc = answered(await service.post(batch), 200)
    books = Books()
    books.answered(batch_of("gw-1", 1, [chunk(cls="car\ufffdbike")]), doc)
    await books.check(db)


# -- the rest of the surface ---------------------------------------------------------------------


async def test_other_methods_and_paths(service: Service) -> None:
    r = await service.http.get(service.url)
    assert (r.status_code, r.headers["allow"]) == (405, "POST")
    assert (await service.http.get(f"{service.base}/nowhere")).status_code == 404
    assert (await service.http.get(f"{service.base}/healthz")).json() == {"status": "ok"}
    assert (await service.http.get(f"{service.base}/readyz")).json() == {
        "ready": True,
        "problems": [],
    }


async def test_a_token_bound_to_gateways_may_send_only_for_them(pg_dsn: str, db: Conn) -> None:
    """token_file's `TOKEN GATEWAY...`: one leaked token cannot write another site's data (a
    seq far ahead would block that gateway for good)."""
    s = await Service(pg_dsn, tokens={TOKEN: ("site-7-*",), "any-token": ()}).start()
    try:
        books = Books()
        mine = batch_of("site-7-gw-1", 1, [chunk()])
        books.answered(mine, answered(await s.post(mine), 200))
        theirs = batch_of("site-9-gw-1", 2**52, [chunk()])
        answered(await s.post(theirs), 403, "may not send for gateway 'site-9-gw-1'")
        other = batch_of("site-9-gw-1", 1, [chunk()])
        books.answered(other, answered(await s.post(other, token="any-token"), 200))
        await books.check(db)
    finally:
        await s.stop()


async def test_seqs_and_names_beyond_any_agent_are_refused_naming_them(
    service: Service, db: Conn
) -> None:
    far = batch_of("gw-1", 2**53, [chunk()])
    answered(await service.post(far), 400, "last_seq")
    wide = batch_of("gw-1", 1, [chunk("\U0001f600" * 200)])  # 200 characters, 800 bytes
    answered(await service.post(wide), 400, "over 256 bytes in UTF-8")
    assert await stored_rows(db) == NOTHING


async def test_a_batch_of_several_gzip_members_is_one_body_and_trailing_bytes_are_refused(
    service: Service, db: Conn
) -> None:
    books = Books()
    b = batch_of("gw-1", 1, [chunk(), chunk("cam-2")])
    half = len(b.body) // 2
    body = gzip.compress(b.body[:half], mtime=0) + gzip.compress(b.body[half:], mtime=0)
    r = await service.post_raw(body, b.key, gzipped=False, content_encoding="gzip")
    books.answered(b, answered(r, 200))
    b2 = batch_of("gw-1", 3, [chunk()])
    r = await service.post_raw(
        gzip.compress(b2.body, mtime=0) + b"garbage", b2.key, gzipped=False,
        content_encoding="gzip",
    )  # fmt: skip
    answered(r, 400, "not gzip")
    await books.check(db)


async def test_a_batch_making_too_many_rows_gets_413_so_the_agent_splits_it(
    pg_dsn: str, db: Conn
) -> None:
    s = await Service(pg_dsn, max_batch_rows=1_000).start()
    try:
        c = chunk()
        c.cat["cls"] = {f"v{i}": 1 for i in range(1_200)}
        r = await s.post(batch_of("gw-1", 1, [c]))
        answered(r, 413, "split it")
        assert await stored_rows(db) == NOTHING
    finally:
        await s.stop()

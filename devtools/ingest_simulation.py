"""Seeded schedules against edge-ingest's transaction logic on a real PostgreSQL (C1, C2, C4–C6).

The agent's durable core has its deterministic simulation (devtools/simulation.py); this is the
same idea for the cloud half, whose logic lives in PostgreSQL and so cannot run on a virtual
clock. Each seed gets a fresh database (CREATE DATABASE from a migrated template) and runs the
real service in-process -- edge_ingest's IngestApp and Store, served by uvicorn (h11) on
loopback ports, one or two replicas each with its own small asyncpg pool -- against simulated
gateways (devtools.gateways) that behave as the agent does: cut a batch, send it until a final
answer, never batch n+1 before n was answered 200.

One seed draws the schedule: the gateways, their batches, the service's settings, and for every
attempt of every batch (from its own generator, keyed by seed/gateway/batch/attempt, so a plan
does not depend on timing) which replica it goes to, whether it is sent twice at once, and which
fault lands at which step of the service's transaction:

    begin      the connection is taken, BEGIN not yet sent
    copy       BEGIN done, the rows not yet COPYed
    decide     the rows COPYed, apply_batch not yet called
    decided    apply_batch returned (the watermark row locked, the merge done), no COMMIT yet
    commit     COMMIT is on the wire, its answer not read: the outcome is unknown to the service
    committed  COMMIT returned, the answer not yet sent

    kill       SIGKILL of the replica serving the request: every socket it holds (HTTP and
               database) is aborted at once and its tasks never reach anything again; it is
               started afresh (a new pool, a new port) a moment later
    terminate  pg_terminate_backend of every edge-ingest backend of the database (a database
               that drops its connections; the cheap stand-in for a restart)
    restart    PostgreSQL crashes (SIGKILL of the cluster) and starts again after crash recovery
               (own cluster only; `terminate` otherwise)
    give_up    the client drops the connection there (its timeout): the service carries on and
               the client's retry races the original
    stall      the service pauses a few ms there (holding its locks from `decided` on)

plus, per attempt, the answer lost after it arrived (`drop`), and per gateway an outbox reset
(seqs jump ahead: a gap) and a misconfigured twin with the same gateway id resending an applied
range with other content (must get 422 and apply nothing).

Why `kill` is neither a task cancellation nor pg_terminate_backend: cancelling the request's
task runs the service's own cleanup -- `async with conn.transaction()` sends ROLLBACK, the pool
resets and keeps the connection, uvicorn even answers 500 -- which a SIGKILLed process never
does; pg_terminate_backend leaves the service alive to notice and answer 503 (that is the
`terminate` fault, a different one). What the database and the client see of a SIGKILL is every
socket of the process closing at once, mid-whatever, and nothing ever again: so kill() aborts
all of the process's HTTP and database sockets synchronously (no other task runs in between;
COMMIT already on the wire may still commit, as it would), closes its listener, and from then
on no statement of its requests leaves (they raise Killed) and no connection it was still
opening survives; its tasks are reaped afterwards. A new process (new pool, new port) starts a
moment later, as systemd would start one.

The oracle, after each seed: the views equal `Truth` of every batch answered 200, each once; the
per-minute rollup agrees; the watermark rows (next_seq, gaps, gap_seqs, batches, chunks,
messages, replays, refused) and the batch records are what the schedule did; no batch was
answered `applied` twice; no answer was 500 or 409 or another surprise; every 503 carried
Retry-After; every twin got 422; the connections stayed within pool x replicas.

What replays: the schedule (every plan of every attempt) is a function of the seed; the
interleaving of concurrent requests on real sockets and a real server is not. `--seed K -v`
replays the schedule and prints its trace; `--repeat N` runs it N times for a race that needs
luck.

    python -m devtools.ingest_simulation --seeds 500            (its own cluster; needs root)
    python -m devtools.ingest_simulation --seeds 500 --dsn postgresql://postgres@host:5432/postgres
    python -m devtools.ingest_simulation --seed 17 -v
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import datetime as dt
import hashlib
import importlib.util
import logging
import os
import random
import socket
import sys
import tempfile
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Coroutine, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import uvicorn
from edge_ingest.app import IngestApp
from edge_ingest.schema import migrate
from edge_ingest.store import Store

from devtools.gateways import Batch, Gateway, Truth, db_totals
from devtools.postgres import PostgresCluster

if TYPE_CHECKING:
    _Connection = asyncpg.Connection[asyncpg.Record]
else:
    _Connection = asyncpg.Connection

HOST = "127.0.0.1"
TOKEN = "sim-token"
STEPS = ("begin", "copy", "decide", "decided", "commit", "committed")
FAULTS = ("kill", "terminate", "restart", "give_up", "stall")
APP_NAME = "edge-ingest"  # the service's application_name (Store's server settings)
ATTEMPT_HEADER = "x-sim-attempt"
RETRY_SCALE = 0.005  # a Retry-After of 2 s waits 10 ms here: time is compressed, not skipped
CALM_AFTER = 8  # attempts from this one on carry no fault: every batch is answered in the end
SEED_DEADLINE_S = 90.0
BATCH_DEADLINE_S = 45.0

Scope = MutableMapping[str, Any]


class Violation(AssertionError):
    """A guarantee was broken (or the schedule hung)."""


class Killed(BaseException):
    """The replica serving this request was SIGKILLed: nothing of it may run on (a
    BaseException, so that no `except Exception` of the service catches it)."""


# -- the schedule ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """One seed's world and service settings."""

    gateways: int
    batches: int
    max_chunks: int
    cameras: int
    replicas: int
    pool: int
    lock_timeout_ms: int
    statement_timeout_ms: int
    acquire_timeout_s: float
    max_waiting: int
    rollup: bool
    gzip: bool
    fault_p: float
    faults: dict[str, float]
    steps: dict[str, float]
    dup_p: float
    drop_p: float
    reset_p: float
    twin_p: float

    @classmethod
    def draw(cls, seed: int) -> Params:
        r = random.Random(seed)
        return cls(
            gateways=r.randint(1, 4),
            batches=r.randint(2, 7),
            max_chunks=r.choice((1, 5, 20, 60)),
            cameras=r.choice((1, 3, 8)),
            replicas=r.choice((1, 2, 2)),
            pool=r.randint(2, 4),
            lock_timeout_ms=r.choice((20, 200, 5000)),
            statement_timeout_ms=r.choice((250, 15_000, 15_000)),
            acquire_timeout_s=r.choice((0.1, 0.5, 2.0)),
            max_waiting=r.choice((1, 4, 64)),
            rollup=r.random() < 0.8,
            gzip=r.random() < 0.7,
            fault_p=r.choice((0.0, 0.15, 0.35, 0.6)),
            faults={f: r.choice((0.0, 1.0, 3.0)) for f in FAULTS}
            | {"restart": r.choice((0, 0, 1))},
            steps={s: r.choice((1.0, 2.0)) for s in STEPS},
            dup_p=r.choice((0.0, 0.2, 0.5)),
            drop_p=r.choice((0.0, 0.1, 0.3)),
            reset_p=r.choice((0.0, 0.0, 0.2)),
            twin_p=r.choice((0.0, 0.15, 0.4)),
        )


@dataclass(frozen=True)
class Plan:
    """One copy of one attempt: where it goes and what happens to it."""

    replica: int
    fault: str | None = None
    step: str = "begin"
    stall_s: float = 0.0
    drop: bool = False

    def __str__(self) -> str:
        what = f"r{self.replica}"
        if self.fault:
            what += f" {self.fault}@{self.step}"
            if self.fault == "stall":
                what += f"({self.stall_s * 1000:.0f}ms)"
        return what + (" drop" if self.drop else "")


def _pick(r: random.Random, weights: dict[str, float]) -> str | None:
    total = sum(weights.values())
    if total <= 0:
        return None
    x = r.random() * total
    for k, w in weights.items():
        x -= w
        if x < 0:
            return k
    return None


def draw_plans(
    seed: int, p: Params, who: str, batch: int, attempt: int
) -> tuple[list[Plan], float]:
    """The copies of one attempt and the client's pause after it fails: a pure function of
    (seed, gateway, batch, attempt), whatever happened before."""
    r = random.Random(f"{seed}/{who}/{batch}/{attempt}")
    calm = attempt >= CALM_AFTER
    copies = 2 if not calm and r.random() < p.dup_p else 1
    plans = []
    for _ in range(copies):
        replica = r.randrange(p.replicas)
        fault = _pick(r, p.faults) if not calm and r.random() < p.fault_p else None
        step = _pick(r, p.steps) or "begin"
        stall = r.uniform(0.001, 0.03)
        drop = not calm and r.random() < p.drop_p
        plans.append(Plan(replica, fault, step, stall, drop))
    return plans, r.uniform(0.001, 0.01)


# -- the service, in-process -----------------------------------------------------------------

# The attempt a request belongs to, set by `Tagged` for the request's task: the hooks of
# SimConnection read it.
ATTEMPT: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar("attempt", default=None)


def _current() -> Attempt | None:
    att = ATTEMPT.get()
    if att is not None and att.process is not None and att.process.dead:
        raise Killed(f"{att.id}: {att.process.name} is dead")
    return att


class SimConnection(_Connection):
    """asyncpg's connection with the schedule's hooks at the batch transaction's steps. Every
    statement of a request whose replica was killed raises Killed before it leaves."""

    async def execute(self, query: str, *args: object, timeout: float | None = None) -> str:  # noqa: ASYNC109
        att = _current()
        if att is None:
            return await super().execute(query, *args, timeout=timeout)
        if query.startswith("BEGIN"):
            await att.at("begin")
        elif query == "COMMIT;":
            return await att.commit(super().execute(query, *args, timeout=timeout))
        return await super().execute(query, *args, timeout=timeout)

    async def copy_records_to_table(self, table_name: str, **kwargs: Any) -> str:
        att = _current()
        if att is not None and table_name == "in_counts":
            await att.at("copy")
        return await super().copy_records_to_table(table_name, **kwargs)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        att = _current()
        if att is None or "apply_batch" not in query:
            return await super().fetchrow(query, *args, **kwargs)
        await att.at("decide")
        rec = await super().fetchrow(query, *args, **kwargs)
        await att.at("decided")
        return rec


class SimStore(Store):
    """The real Store, its pool making SimConnections. (asyncpg's Pool keeps the class in
    `_connection_class`; the pool starts empty, min 0, so every connection is one of ours.)
    It knows every connection its pool made, so that kill() closes them all -- those being
    set up as well, which Pool.terminate() does not know of yet."""

    def __init__(self, dsn: str, **kwargs: Any) -> None:
        super().__init__(dsn, **kwargs)
        self.dead = False
        self.connections: weakref.WeakSet[SimConnection] = weakref.WeakSet()

    async def open(self) -> None:
        await super().open()
        pool = self._pool
        if pool is None or not hasattr(pool, "_connection_class"):
            raise RuntimeError("asyncpg's Pool changed: cannot install the simulation's hooks")
        store = self

        class Connection(SimConnection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                store.connections.add(self)
                if store.dead:  # connected after the kill: the socket dies with the process
                    self.terminate()

        pool._connection_class = Connection

    def kill(self) -> None:
        self.dead = True
        if self._pool is not None:
            self._pool.terminate()
        for conn in list(self.connections):
            conn.terminate()


class Tagged:
    """ASGI: the real IngestApp, with the request's Attempt (by its header) in ATTEMPT."""

    def __init__(self, app: IngestApp, process: Process) -> None:
        self.app = app
        self.process = process

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if self.process.dead:  # accepted as it died: it never answers
                await asyncio.Future()
            for k, v in scope["headers"]:
                if k == ATTEMPT_HEADER.encode():
                    att = self.process.world.attempts[v.decode()]
                    att.process = self.process
                    ATTEMPT.set(att)  # this request's task only
        await self.app(scope, receive, send)


class Process:
    """One edge-ingest process: a Store (its own pool), the IngestApp, uvicorn on a port."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.dead = False
        p = world.params
        self.store = SimStore(
            world.dsn,
            size=p.pool,
            statement_timeout_ms=p.statement_timeout_ms,
            lock_timeout_ms=p.lock_timeout_ms,
            acquire_timeout_s=p.acquire_timeout_s,
            max_waiting=p.max_waiting,
            rollup=p.rollup,
        )
        app = IngestApp(self.store, tokens=frozenset({TOKEN}))
        config = uvicorn.Config(
            Tagged(app, self),
            http="h11",
            lifespan="on",
            access_log=False,
            log_config=None,
            proxy_headers=False,
            timeout_keep_alive=75,
        )
        config.load()
        self.server = uvicorn.Server(config)
        self.server.lifespan = config.lifespan_class(config)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/ingest"

    async def start(self) -> None:
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (as on the ones
        # uvicorn binds itself); without it every answer waits 40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self.port = int(sock.getsockname()[1])
        # No serve(): no signal handlers, no 0.1 s tick; startup() is lifespan + listen.
        await self.server.startup(sockets=[sock])
        self.world.note(f"{self.name} up on :{self.port}")

    def kill(self) -> None:
        """SIGKILL, synchronously (no other task runs meanwhile): no byte of this process
        reaches a client or the database from now on."""
        self.dead = True
        for srv in self.server.servers:
            srv.close()  # the listening socket
        _close_connections(self.server, abort=True)  # every HTTP one, without an answer
        self.store.kill()  # every database connection, mid-whatever
        for task in list(self.server.server_state.tasks):
            task.cancel()  # requests waiting for a connection never get one
        self.world.note(f"{self.name} KILLED")

    async def bury(self) -> None:
        """Reap what a killed process left in this one: its request tasks (none of them can
        reach a socket since the kill), a connection accepted as it died, its lifespan (the
        probe and maintenance loops, the terminated pool)."""
        for _ in range(3):
            _close_connections(self.server, abort=True)  # first: no answer may get out
            for task in list(self.server.server_state.tasks):
                task.cancel()
            if self.server.server_state.tasks:
                await asyncio.wait(list(self.server.server_state.tasks), timeout=10)
            await asyncio.sleep(0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.lifespan.shutdown(), 5)
        for srv in self.server.servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        _close_connections(self.server, abort=True)

    async def drain(self, deadline: float) -> None:
        """Wait until no request is in flight here (zombies of given-up attempts included)."""
        tasks = self.server.server_state.tasks
        while tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.world.violation(
                    f"{self.name}: {len(tasks)} requests still in flight at the end (a hang)"
                )
            await asyncio.wait(list(tasks), timeout=left)

    async def stop(self) -> None:
        """The end of the seed: stop listening, close connections, lifespan shutdown (the
        pool closes)."""
        self.dead = True
        for srv in self.server.servers:
            srv.close()
        _close_connections(self.server)
        try:
            await asyncio.wait_for(self.server.lifespan.shutdown(), 15)
        except TimeoutError:
            pool = self.store._pool
            raise self.world.violation(
                f"{self.name} did not shut down within 15 s: pool {pool!r}"
                f" ({self.store.in_use} connections in use)"
            ) from None
        for srv in self.server.servers:
            await srv.wait_closed()
        for _ in range(3):  # a connection accepted just before the listener closed
            await asyncio.sleep(0)
            _close_connections(self.server)


class Replica:
    """One replica: the process serving now (None between a kill and the restart), and the
    killed ones, reaped later."""

    def __init__(self, world: World, index: int) -> None:
        self.world = world
        self.index = index
        self.starts = 0
        self.live: Process | None = None
        self.corpses: list[Process] = []

    @property
    def url(self) -> str | None:
        return None if self.live is None else self.live.url

    async def start(self) -> None:
        self.starts += 1
        proc = Process(self.world, f"r{self.index}.{self.starts}")
        await proc.start()
        self.live = proc

    def kill(self, proc: Process) -> None:
        proc.kill()
        self.corpses.append(proc)
        if self.live is proc:
            self.live = None

    async def respawn(self, delay_s: float) -> None:
        """What systemd does after a SIGKILL (Restart=always): a new process a moment later,
        and again if that one fails to start."""
        for attempt in range(100):
            await asyncio.sleep(delay_s * (1 + attempt))
            try:
                await self.start()
                break
            except (Exception, SystemExit) as e:  # uvicorn exits when the lifespan fails
                self.world.note(f"r{self.index} did not start: {type(e).__name__}: {e}")
        else:
            raise self.world.violation(f"replica {self.index} did not start again")
        await self.bury()

    async def bury(self) -> None:
        while self.corpses:
            await self.corpses.pop().bury()

    async def stop(self) -> None:
        if self.live is not None:
            proc, self.live = self.live, None
            await proc.stop()
            self.corpses.append(proc)  # swept like the killed ones
        await self.bury()


def _close_connections(server: uvicorn.Server, *, abort: bool = False) -> None:
    for proto in list(server.server_state.connections):
        transport = getattr(proto, "transport", None)
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()


# -- the database ----------------------------------------------------------------------------


class Postgres:
    """Where seeds run: a cluster of ours (which can crash and restart) or a server at a DSN
    (whose user may CREATE DATABASE and pg_terminate_backend)."""

    def __init__(self, admin_dsn: str, cluster: PostgresCluster | None = None) -> None:
        self.admin_dsn = admin_dsn
        self.cluster = cluster
        self.template = f"isim_tmpl_{os.getpid()}"
        self.today = dt.datetime.now(dt.UTC).date()
        self._admin: asyncpg.Connection[asyncpg.Record] | None = None
        self._strategy = ""
        self._lock = asyncio.Lock()  # one statement at a time on the admin connection
        self.restarts = 0

    def dsn(self, database: str) -> str:
        """The DSN of `database`, over plain TCP (sslmode=disable: loopback; asyncpg's
        default tries TLS first, a round trip and a handshake per connection)."""
        parts = urlsplit(self.admin_dsn)
        query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("sslmode="))
        query = "&".join(filter(None, [query, "sslmode=disable"]))
        return urlunsplit(parts._replace(path=f"/{database}", query=query))

    async def admin(self) -> asyncpg.Connection[asyncpg.Record]:
        """The admin connection; take `self._lock` around its use."""
        if self._admin is None or self._admin.is_closed():
            self._admin = await asyncpg.connect(
                self.admin_dsn, timeout=10, server_settings={"application_name": "isim-admin"}
            )
        return self._admin

    async def prepare(self) -> None:
        """The migrated template every seed's database is copied from."""
        async with self._lock:
            conn = await self.admin()
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{self.template}"')
            if int(await conn.fetchval("SHOW server_version_num")) >= 150000:
                self._strategy = " STRATEGY FILE_COPY"  # a file copy: ~3x faster than WAL_LOG
        tmpl = await asyncpg.connect(self.dsn(self.template), timeout=10)
        try:
            await migrate(tmpl, today=self.today)
        finally:
            await tmpl.close()

    async def create(self, name: str) -> str:
        async with self._lock:
            conn = await self.admin()
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(
                f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"{self._strategy}'
            )
        return self.dsn(name)

    async def drop(self, name: str) -> None:
        async with self._lock:
            conn = await self.admin()
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.drop(self.template)
        if self._admin is not None:
            await self._admin.close()
            self._admin = None

    async def terminate(self, database: str) -> int:
        """pg_terminate_backend of every edge-ingest backend of `database`; returns once each
        has exited (polled: the function's own wait polls every 100 ms)."""
        async with self._lock:
            conn = await self.admin()
            pids = await conn.fetchval(
                "SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity"
                " WHERE datname = $1 AND application_name = $2",
                database,
                APP_NAME,
            )
            await conn.execute("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p", pids)
            deadline = time.monotonic() + 10
            while await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", pids
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"backends {pids} still there 10 s after terminate")
                await asyncio.sleep(0.002)
        return len(pids)

    async def crash(self) -> None:
        assert self.cluster is not None
        self.restarts += 1
        async with self._lock:
            await asyncio.to_thread(self.cluster.kill)
            if self._admin is not None:
                self._admin.terminate()
                self._admin = None

    async def start(self) -> None:
        assert self.cluster is not None
        await asyncio.to_thread(self.cluster.start)


# -- one seed --------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One copy of one attempt of one batch, as the service's hooks see it."""

    id: str
    plan: Plan
    world: World
    give_up: asyncio.Event = field(default_factory=asyncio.Event)
    process: Process | None = None
    fired: bool = False

    async def at(self, step: str) -> None:
        if self.plan.fault is None or self.fired or self.plan.step != step:
            return
        self.fired = True
        await self.world.fire(self)

    async def commit(self, op: Coroutine[Any, Any, str]) -> str:
        if self.plan.fault is not None and not self.fired and self.plan.step == "commit":
            sent = asyncio.ensure_future(op)
            sent.add_done_callback(_retrieve)
            await asyncio.sleep(0)  # `sent` ran up to its wait for the answer: COMMIT is out
            self.fired = True
            await self.world.fire(self)
            result = await sent
        else:
            result = await op
        await self.at("committed")
        return result


def _retrieve(t: asyncio.Future[Any]) -> None:
    if not t.cancelled():
        t.exception()


@dataclass
class Answer:
    kind: str  # "http", "refused" (no replica listening), "conn_error", "gave_up"
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    doc: dict[str, Any] = field(default_factory=dict)
    detail: str = ""

    def __str__(self) -> str:
        if self.kind != "http":
            return self.kind + (f" ({self.detail})" if self.detail else "")
        extra = self.doc.get("outcome") or self.doc.get("error", "")
        return f"{self.status} {str(extra)[:80]}"


@dataclass
class Sent:
    """A gateway's batch and what was expected of it."""

    batch: Batch
    gap: int  # the jump before it (an outbox reset), 0 otherwise
    applied_answers: int = 0


@dataclass
class Outcome:
    seed: int
    seconds: float
    counts: Counter[str]
    trace: list[str]


class World:
    def __init__(self, seed: int, pg: Postgres, *, verbose: bool = False) -> None:
        self.seed = seed
        self.pg = pg
        self.verbose = verbose
        self.params = Params.draw(seed)
        self.database = f"isim_{os.getpid()}_{seed}"
        self.dsn = ""
        self.replicas = [Replica(self, i) for i in range(self.params.replicas)]
        self.attempts: dict[str, Attempt] = {}
        self.truth = Truth()
        self.sent: dict[str, list[Sent]] = defaultdict(list)
        self.t0: dict[str, int] = {}
        self.counts: Counter[str] = Counter()
        self.trace: list[str] = []
        self.started = time.monotonic()
        self._background: list[asyncio.Task[None]] = []
        self._restarting: asyncio.Task[None] | None = None
        self.gateways: list[asyncio.Task[None]] = []
        self.twins: list[asyncio.Task[None]] = []
        self.twin_batches = 0

    # bookkeeping

    def note(self, what: str) -> None:
        line = f"{(time.monotonic() - self.started) * 1000:8.1f}ms {what}"
        self.trace.append(line)
        if self.verbose:
            print(line, file=sys.stderr)

    def violation(self, msg: str) -> Violation:
        self.note(f"VIOLATION {msg}")
        return Violation(msg)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # A context of its own: spawned from a request's hook, it would carry that request's
        # ATTEMPT into the new process's tasks (its probe loop's statements raised Killed).
        self._background.append(asyncio.create_task(coro, context=contextvars.Context()))

    # faults

    async def fire(self, att: Attempt) -> None:
        fault = att.plan.fault
        if att.process is not None and att.process.dead:
            raise Killed(att.id)  # killed meanwhile (by another request's fault)
        if fault == "restart" and self.pg.cluster is None:
            fault = "terminate"  # the same schedule, the cheap stand-in
        if fault == "restart" and (self.restarting or self.counts["restart"] >= 2):
            fault = "terminate"  # one at a time, two per seed at most
        self.counts[f"fired_{fault}"] += 1
        self.note(f"{att.id}: {fault} at {att.plan.step}")
        if fault == "kill":
            proc = att.process
            assert proc is not None
            rep = self.replicas[att.plan.replica]
            rep.kill(proc)
            self.counts["kill"] += 1
            self._spawn(rep.respawn(0.005))
            raise Killed(att.id)
        if fault == "terminate":
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                # Shielded: the request may be killed meanwhile, the admin query must not be.
                n = await asyncio.shield(self.pg.terminate(self.database))
                self.note(f"{att.id}: terminated {n} backends")
        elif fault == "restart":
            self.counts["restart"] += 1
            crashed = asyncio.Event()
            self._restarting = asyncio.create_task(
                self._restart(crashed, 0.02), context=contextvars.Context()
            )
            await crashed.wait()
        elif fault == "give_up":
            att.give_up.set()
            await asyncio.sleep(0)  # the client closes its side before the service goes on
        elif fault == "stall":
            await asyncio.sleep(att.plan.stall_s)

    @property
    def restarting(self) -> bool:
        return self._restarting is not None and not self._restarting.done()

    async def _restart(self, crashed: asyncio.Event, downtime_s: float) -> None:
        """PostgreSQL crashes, stays down `downtime_s`, starts (crash recovery)."""
        try:
            await self.pg.crash()
        finally:
            crashed.set()
        await asyncio.sleep(downtime_s)
        await self.pg.start()
        self.note("database back (crash recovery done)")

    # the gateways

    async def _gateway(self, i: int) -> None:
        p = self.params
        r = random.Random(f"{self.seed}/gw{i}")
        name = f"gw-{i}"
        midnight = dt.datetime.combine(self.pg.today, dt.time(), dt.UTC).timestamp()
        gw = Gateway(
            name,
            seed=r.randrange(1 << 30),
            cameras=p.cameras,
            next_seq=r.choice((1, 1000, 10**12)),
            t0=int(midnight) - r.randrange(0, 120),  # windows on both sides of midnight
        )
        self.t0[name] = gw.t0
        async with _client() as client:
            for b in range(p.batches):
                jump = 0
                if b > 0 and r.random() < p.reset_p:
                    jump = r.randint(1, 10_000)
                    gw.reset_outbox(jump)
                batch = gw.cut(r.randint(1, p.max_chunks))
                s = Sent(batch, jump)
                self.note(f"{name} b{b} cut {batch.key} ({len(batch.chunks)} chunks, gap {jump})")
                await self._deliver(client, name, b, batch, s)
                self.sent[name].append(s)
                self.truth.apply(batch)
                if r.random() < p.twin_p:
                    self.twins.append(
                        asyncio.create_task(self._twin(name, b, r.randrange(1 << 30)))
                    )

    async def _twin(self, name: str, after: int, twin_seed: int) -> None:
        """A second gateway configured with the same id, sending a range that was applied
        (answered 200 already) with other content: 422, nothing applied."""
        r = random.Random(twin_seed)
        applied = [s.batch for s in self.sent[name]]
        target = r.choice(applied)
        how = r.choice(("same range", "same first", "inside"))
        if how == "same range":  # the very key of an applied batch, other bytes
            first, n = target.first_seq, len(target.chunks)
        elif how == "same first":
            first, n = target.first_seq, r.randint(1, 10)
        else:  # anywhere below the watermark (in a gap too)
            first, n = r.randint(applied[0].first_seq, applied[-1].last_seq), r.randint(1, 10)
        twin = Gateway(
            name, seed=twin_seed, cameras=self.params.cameras, next_seq=first, t0=self.t0[name]
        )
        batch = twin.cut(n)
        same = [a for a in applied if a.first_seq == first and a.last_seq == batch.last_seq]
        if same and same[0].body == batch.body:
            return  # the very same batch: a replay, not a conflict
        self.twin_batches += 1
        self.note(f"{name} TWIN after b{after}: {batch.key}")
        async with _client() as client:
            await self._deliver(client, name, f"twin{after}", batch, None)

    async def _deliver(
        self, client: httpx.AsyncClient, name: str, b: int | str, batch: Batch, s: Sent | None
    ) -> None:
        """Send until the final answer (200; 422 for a twin), as the agent does."""
        body, headers = batch.request(TOKEN, gzipped=self.params.gzip)
        deadline = time.monotonic() + BATCH_DEADLINE_S
        attempt = 0
        while True:
            plans, pause = draw_plans(self.seed, self.params, name, hash_b(b), attempt)
            ids = [f"{name}/b{b}/a{attempt}/c{k}" for k in range(len(plans))]
            answers = await asyncio.gather(
                *(
                    self._send(client, i, pl, body, headers)
                    for i, pl in zip(ids, plans, strict=True)
                )
            )
            final = False
            for i, pl, a in zip(ids, plans, answers, strict=True):
                if a.kind != "refused" or attempt % 10 == 0:  # a replica down: every 10th
                    self.note(f"{i} [{pl}] -> {a}")
                self.counts[f"answer_{a.status or a.kind}"] += 1
                if a.status == 503:
                    cause = str(a.doc.get("error", "")).partition("(")[2].partition(")")[0]
                    self.counts[f"503_{cause}"] += 1
                self._check_answer(i, batch, s, a)
                if pl.drop and a.kind == "http":
                    self.counts["dropped"] += 1
                    continue  # lost on its way back
                if a.kind == "http" and a.status == (200 if s is not None else 422):
                    final = True
            self.counts["attempts"] += 1
            self.counts["copies"] += len(plans)
            if final:
                return
            if time.monotonic() > deadline:
                raise self.violation(f"{batch.key}: no final answer after {attempt + 1} attempts")
            attempt += 1
            retry_after = max(
                (float(a.headers.get("retry-after", 0)) for a in answers if a.status == 503),
                default=0.0,
            )
            await asyncio.sleep(max(pause, retry_after * RETRY_SCALE))

    async def _send(
        self,
        client: httpx.AsyncClient,
        aid: str,
        plan: Plan,
        body: bytes,
        headers: dict[str, str],
    ) -> Answer:
        att = Attempt(aid, plan, self)
        self.attempts[aid] = att
        url = self.replicas[plan.replica].url
        if url is None:
            return Answer("refused", detail="replica down")
        request = asyncio.ensure_future(
            client.post(url, content=body, headers={**headers, ATTEMPT_HEADER: aid})
        )
        gave_up = asyncio.ensure_future(att.give_up.wait())
        try:
            await asyncio.wait({request, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gave_up.cancel()
        if not request.done():
            request.cancel()  # httpx closes the connection: the service sees a disconnect
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await request
            return Answer("gave_up")
        try:
            resp = request.result()
        except httpx.HTTPError as e:
            return Answer("conn_error", detail=type(e).__name__)
        try:
            doc = resp.json()
        except ValueError:
            doc = {"raw": resp.text[:200]}
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return Answer("http", resp.status_code, headers, doc if isinstance(doc, dict) else {})

    def _check_answer(self, aid: str, batch: Batch, s: Sent | None, a: Answer) -> None:
        if a.kind != "http":
            return
        if a.status == 503:
            if not a.headers.get("retry-after", "").isdigit():
                raise self.violation(f"{aid}: 503 without Retry-After: {a.doc}")
            return
        if s is None:  # a twin's conflicting batch
            if a.status != 422:
                raise self.violation(f"{aid}: a reused range with other content got {a}")
            self.counts[f"refused_{batch.gateway}"] += 1
            return
        if a.status != 200:
            raise self.violation(f"{aid}: {batch.key} answered {a.status}: {a.doc}")
        outcome, next_seq = a.doc.get("outcome"), a.doc.get("next_seq")
        if outcome == "replay":
            self.counts[f"replay_{batch.gateway}"] += 1
            if not isinstance(next_seq, int) or next_seq <= batch.last_seq:
                raise self.violation(f"{aid}: replay with next_seq {next_seq}")
            return
        want = "gap" if s.gap else "applied"
        if outcome != want or next_seq != batch.last_seq + 1 or a.doc.get("gap", 0) != s.gap:
            raise self.violation(
                f"{aid}: {batch.key} answered {a.doc}, expected {want} gap {s.gap}"
            )
        s.applied_answers += 1
        if s.applied_answers > 1:
            raise self.violation(f"{aid}: {batch.key} answered '{outcome}' twice: applied twice")

    # the run

    async def run(self) -> Outcome:
        self.dsn = await self.pg.create(self.database)
        self.note(f"seed {self.seed}: {self.params}")
        failed = True
        try:
            for rep in self.replicas:
                await rep.start()
            self.gateways = [
                asyncio.create_task(self._gateway(i)) for i in range(self.params.gateways)
            ]
            try:
                async with asyncio.timeout(SEED_DEADLINE_S):
                    await asyncio.gather(*self.gateways)
                    await asyncio.gather(*self.twins)
                    await self._settle()
            except TimeoutError:
                raise self.violation(
                    f"the schedule did not end within {SEED_DEADLINE_S:.0f} s"
                ) from None
            await self._oracle()
            failed = False
        finally:
            await self._teardown(keep_database=failed and self.pg.cluster is None)
        return Outcome(self.seed, time.monotonic() - self.started, self.counts, self.trace)

    async def _settle(self) -> None:
        """Everything the schedule set going has ended: the database is up, killed replicas
        are back, no request is in flight anywhere."""
        if self._restarting is not None:
            await self._restarting
        while self._background:
            await self._background.pop()
        deadline = time.monotonic() + 30
        for rep in self.replicas:
            await rep.bury()
            assert rep.live is not None
            await rep.live.drain(deadline)

    async def _teardown(self, *, keep_database: bool) -> None:
        # After a violation the other gateways are still sending (gather does not cancel).
        for t in [*self.gateways, *self.twins, *self._background]:
            t.cancel()
        for t in [*self.gateways, *self.twins]:
            with contextlib.suppress(BaseException):
                await t
        if self._restarting is not None:
            with contextlib.suppress(Exception):
                await self._restarting
            if self.pg.cluster is not None and not self.pg.cluster.running:
                await self.pg.start()  # the next seed needs it
        for t in [*self.twins, *self._background]:
            with contextlib.suppress(BaseException):
                await t
        for rep in self.replicas:
            with contextlib.suppress(Exception):
                await rep.stop()
        if keep_database:
            print(f"seed {self.seed}: database {self.database} kept", file=sys.stderr)
        else:
            await self.pg.drop(self.database)

    # the oracle

    async def _oracle(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await self._check_connections(conn)
            diffs = self.truth.differences(await db_totals(conn))
            if diffs:
                raise self.violation(
                    f"the views differ from the truth at {len(diffs)} keys: " + "; ".join(diffs[:5])
                )
            if self.params.rollup:
                await self._check_rollup(conn)
            await self._check_watermarks(conn)
        finally:
            await conn.close()
        # Stopped (the probe and maintenance loops cancelled), a replica holds no connection
        # and has no request waiting for one: nothing leaked on a failure path.
        for rep in self.replicas:
            proc = rep.live
            assert proc is not None
            await rep.stop()
            counters = {
                k: getattr(proc.store, k) for k in ("waiting", "in_use", "queued")
                if hasattr(proc.store, k)
            }  # fmt: skip
            if any(counters.values()):
                raise self.violation(f"{proc.name}: the store's counters leaked: {counters}")
        self.counts["seeds"] += 1
        self.counts["batches"] += self.truth.batches
        self.counts["twins"] += self.twin_batches

    async def _check_connections(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        """C3: never more backends than pool x replicas (killed replicas' backends exit as
        soon as they read the EOF)."""
        bound = self.params.pool * self.params.replicas
        deadline = time.monotonic() + 5
        while True:
            n = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = $1 AND application_name = $2",
                self.database,
                APP_NAME,
            )
            if n <= bound:
                return
            if time.monotonic() > deadline:
                rows = await conn.fetch(
                    "SELECT pid, state, backend_start, left(query, 60) AS q FROM pg_stat_activity"
                    " WHERE datname = $1 AND application_name = $2",
                    self.database,
                    APP_NAME,
                )
                raise self.violation(
                    f"{n} edge-ingest connections, over pool x replicas = {bound}: "
                    + "; ".join(f"{r['pid']} {r['state']} {r['q']!r}" for r in rows)
                )
            await asyncio.sleep(0.02)

    async def _check_rollup(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        want: dict[tuple[str, str, str, int], list[float]] = defaultdict(lambda: [0, 0, 0.0])
        for (gw, cam, stream, t), e in self.truth.table.items():
            m = want[(gw, cam, stream, t - t % 60)]
            m[0] += e.count
            m[1] += e.n
            m[2] += e.sum
        got: dict[tuple[str, str, str, int], list[float]] = defaultdict(lambda: [0, 0, 0.0])
        for r in await conn.fetch(
            "SELECT gateway, camera, stream, extract(epoch FROM minute)::bigint AS m, count"
            " FROM edge_ingest.per_minute"
        ):
            got[(r["gateway"], r["camera"], r["stream"], r["m"])][0] += r["count"]
        for r in await conn.fetch(
            "SELECT gateway, camera, stream, extract(epoch FROM minute)::bigint AS m, n, sum"
            " FROM edge_ingest.per_minute_numeric WHERE field = 'conf'"
        ):
            m = got[(r["gateway"], r["camera"], r["stream"], r["m"])]
            m[1] += r["n"]
            m[2] += r["sum"]
        for key in set(want) | set(got):
            w, g = want.get(key, [0, 0, 0.0]), got.get(key, [0, 0, 0.0])
            if w[0] != g[0] or w[1] != g[1] or abs(w[2] - g[2]) > 1e-6 * max(1.0, abs(w[2])):
                raise self.violation(f"per-minute rollup at {key}: want {w}, got {g}")

    async def _check_watermarks(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        rows = {r["gateway"]: r for r in await conn.fetch("SELECT * FROM edge_ingest.gateways")}
        if set(rows) != set(self.sent):
            raise self.violation(f"gateways {sorted(rows)}, expected {sorted(self.sent)}")
        for name, sent in self.sent.items():
            row = rows[name]
            want = {
                "start_seq": sent[0].batch.first_seq,
                "next_seq": sent[-1].batch.last_seq + 1,
                "batches": len(sent),
                "chunks": sum(len(s.batch.chunks) for s in sent),
                "messages": sum(c.count for s in sent for c in s.batch.chunks),
                "gaps": sum(1 for s in sent if s.gap),
                "gap_seqs": sum(s.gap for s in sent),
            }
            got = {k: row[k] for k in want}
            if got != want:
                raise self.violation(f"watermark of {name}: {got}, expected {want}")
            replays = self.counts[f"replay_{name}"]
            if row["replays"] < replays:
                raise self.violation(f"{name}: replays {row['replays']} < {replays} answered")
            refused = self.counts[f"refused_{name}"]
            if row["refused"] < refused or (refused == 0 and row["refused"]):
                raise self.violation(f"{name}: refused {row['refused']}, answered 422 {refused}")
        want_batches = {
            (name, s.batch.first_seq, s.batch.last_seq, hashlib.sha256(s.batch.body).digest())
            for name, sent in self.sent.items()
            for s in sent
        }
        got_batches = {
            (r["gateway"], r["first_seq"], r["last_seq"], bytes(r["digest"]))
            for r in await conn.fetch("SELECT * FROM edge_ingest.batches")
        }
        if got_batches != want_batches:
            extra = {b[:3] for b in got_batches - want_batches}
            missing = {b[:3] for b in want_batches - got_batches}
            raise self.violation(f"batch records: extra {extra}, missing {missing}")


def _client() -> httpx.AsyncClient:
    """A gateway's HTTP client. verify=False: plain HTTP only, and loading the CA bundle for
    each client cost 60-80 ms of CPU."""
    return httpx.AsyncClient(timeout=30, trust_env=False, verify=False)


def hash_b(b: int | str) -> int:
    """A batch label as the number its attempts' generators are keyed by."""
    if isinstance(b, int):
        return b
    return 1_000_000 + int(hashlib.sha256(b.encode()).hexdigest()[:8], 16)


# -- running seeds ---------------------------------------------------------------------------

_QUIET = ("edge_ingest", "uvicorn", "uvicorn.error", "asyncio", "httpx", "httpcore")


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """The service logs every 422, 503 and killed request: silent unless -v."""
    levels = {name: logging.getLogger(name).level for name in _QUIET}
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.CRITICAL + 1)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _no_sniffio() -> None:
    """httpcore imports `sniffio` on every request and falls back to asyncio when it is
    missing; a failed import is not cached, so each one searched sys.path again (~10% of the
    simulation's CPU). Recording the absence makes that import fail at once -- the same
    ImportError, the same fallback."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


async def run_seed(seed: int, pg: Postgres, *, verbose: bool = False) -> Outcome:
    """One schedule on a fresh database; raises Violation naming the seed and the replay.
    (The service's logging is the caller's: see quiet().)"""
    _no_sniffio()
    world = World(seed, pg, verbose=verbose)
    try:
        return await world.run()
    except Violation as e:
        tail = "\n".join(world.trace[-40:])
        raise Violation(
            f"seed {seed}: {e}\n  replay: python -m devtools.ingest_simulation --seed {seed} -v"
            f"\n  last steps:\n{tail}"
        ) from e


class _Gate:
    """`jobs` seeds at a time; a seed that may crash the server has it to itself."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._permits = asyncio.Semaphore(jobs)
        self._exclusive = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def enter(self, alone: bool) -> AsyncIterator[None]:
        n = self.jobs if alone else 1
        async with self._exclusive:  # whoever takes all permits takes them in one go
            for _ in range(n):
                await self._permits.acquire()
        try:
            yield
        finally:
            for _ in range(n):
                self._permits.release()


async def run_seeds(
    seeds: list[int], pg: Postgres, *, jobs: int = 1
) -> tuple[int, Counter[str], list[str]]:
    """Run `seeds`, `jobs` at once (each on its own database; a seed that may restart the
    server runs alone, so that it cannot fail another), taking no new seed after a failure.
    Returns (seeds run, totals, failures in seed order)."""
    gate = _Gate(jobs)
    totals: Counter[str] = Counter()
    failures: dict[int, str] = {}
    ran = 0
    todo = iter(seeds)

    async def worker() -> None:
        nonlocal ran
        for seed in todo:
            if failures:
                return
            p = Params.draw(seed)
            alone = pg.cluster is not None and p.fault_p > 0 and p.faults["restart"] > 0
            async with gate.enter(alone):
                try:
                    out = await run_seed(seed, pg)
                except Violation as e:
                    failures[seed] = str(e)
                    return
                finally:
                    ran += 1
            totals.update(out.counts)

    await asyncio.gather(*(worker() for _ in range(max(1, jobs))))
    return ran, totals, [failures[k] for k in sorted(failures)]


def _shm() -> str | None:
    """tmpfs, when there is one: CREATE DATABASE ... STRATEGY FILE_COPY checkpoints twice,
    which on a busy disk took 300 ms instead of 20."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


@contextlib.asynccontextmanager
async def postgres(dsn: str | None, base: Path | None = None) -> AsyncIterator[Postgres]:
    """A Postgres for the seeds: the server at `dsn`, else a cluster of our own (fsync off:
    a crash of the server still keeps what was committed) under `base` or a temp dir."""
    if dsn is not None:
        pg = Postgres(dsn)
        await pg.prepare()
        try:
            yield pg
        finally:
            await pg.close()
        return
    with contextlib.ExitStack() as stack:
        if base is None:
            base = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="isim-", dir=_shm()))
            )
            base.chmod(0o711)  # the server's user must reach its directory inside
        cluster = await asyncio.to_thread(PostgresCluster.create, base / "pg", fsync=False)
        stack.callback(cluster.close)
        await asyncio.to_thread(cluster.start)
        pg = Postgres(cluster.dsn(), cluster)
        await pg.prepare()
        try:
            yield pg
        finally:
            await pg.close()


def summary(totals: Counter[str]) -> str:
    keys = ["seeds", "batches", "attempts", "copies", "twins", "answer_200", "answer_422",
            "answer_503", "answer_conn_error", "answer_refused", "answer_gave_up", "dropped",
            "kill", "restart", *(f"fired_{f}" for f in FAULTS)]  # fmt: skip
    return ", ".join(f"{totals[k]} {k}" for k in keys if totals[k])


async def _main(args: argparse.Namespace) -> int:
    async with postgres(args.dsn) as pg:
        started = time.monotonic()
        if args.seed is not None:
            failures = 0
            for _ in range(args.repeat):
                try:
                    with quiet(args.verbose):
                        out = await run_seed(args.seed, pg, verbose=args.verbose)
                except Violation as e:
                    print(f"FAIL {e}", file=sys.stderr)
                    failures += 1
                    continue
                print(f"seed {args.seed} ok in {out.seconds:.2f} s: {summary(out.counts)}")
            return 1 if failures else 0
        seeds = list(range(args.first, args.first + args.seeds))
        with quiet():
            n, totals, failures_ = await run_seeds(seeds, pg, jobs=args.jobs)
        took = time.monotonic() - started
    for f in failures_:
        print(f"FAIL {f}", file=sys.stderr)
    print(
        f"{n} seeds in {took:.1f} s ({n / took * 60:.0f}/min, {args.jobs} at a time)"
        + (" ok" if not failures_ else f", {len(failures_)} failing")
        + f": {summary(totals)}"
    )
    return 1 if failures_ else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seed", type=int, help="replay one seed (with -v: its trace)")
    ap.add_argument("--repeat", type=int, default=1, help="run --seed this many times")
    ap.add_argument("--seeds", type=int, default=200, help="how many seeds to run")
    ap.add_argument("--first", type=int, default=0, help="first seed")
    ap.add_argument("--jobs", type=int, default=2, help="seeds at once (one event loop)")
    ap.add_argument("--dsn", help="a PostgreSQL superuser DSN (default: a cluster of our own)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    raise SystemExit(main())

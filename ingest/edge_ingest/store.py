"""The database side of one batch: a fixed pool, one transaction per batch, and every failure
of the database turned into what the gateway should do (C1–C4).

Per batch: the rows (merged and sorted in Python, edge_ingest.rows) are COPYed into this
connection's temp tables, then one call of `edge_ingest.apply_batch` locks the gateway's
watermark row, decides new / gap / replay / refused, and merges with one `INSERT … SELECT …
ORDER BY key ON CONFLICT DO UPDATE` per table. The answer is known only after COMMIT returned:
a connection lost during COMMIT is "unavailable" (503), and the agent's retry finds the batch
applied (a replay) or not (applied now) -- never twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from edge_ingest.rows import Rows
from edge_ingest.schema import SCHEMA_VERSION, TEMP_TABLES, schema_version

log = logging.getLogger("edge_ingest.store")


class Outcome(enum.StrEnum):
    APPLIED = "applied"  # new, right after the watermark
    GAP = "gap"  # new, after a jump ahead (a reset outbox): applied, the gap counted
    REPLAY = "replay"  # applied before, same range and bytes: nothing applied again
    REUSED = "reused"  # this range was applied with other bytes: refused (422)
    OVERLAP = "overlap"  # overlaps seqs applied by other batches: refused (422)


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    next_seq: int
    gap: int


class Unavailable(Exception):
    """The database cannot take the batch now: answered 503 with Retry-After. `cause` is one
    of CAUSES."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail


CAUSES = (
    "queue_full",
    "pool_timeout",
    "database_down",
    "statement_timeout",
    "lock_timeout",
    "disk_full",
    "resources",
    "read_only",
    "conflict_retry",
    "not_migrated",
    "access_denied",
)


CONNECT_TIMEOUT_S = 5.0
# Causes that make the database unusable for this replica (not busy): /readyz says so.
_DOWN = ("database_down", "not_migrated", "access_denied")


class RefusedValue(Exception):
    """The database refused a value of the batch (an overflowing sum, say): answered 422."""


def classify(exc: BaseException) -> Exception:
    """An exception from asyncpg (or the socket under it) as Unavailable or RefusedValue;
    anything else is returned as it is (a bug: answered 500 and logged)."""
    if isinstance(exc, asyncpg.QueryCanceledError):
        return Unavailable("statement_timeout", str(exc))
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return Unavailable("lock_timeout", str(exc))
    if isinstance(exc, asyncpg.DiskFullError):
        return Unavailable("disk_full", str(exc))
    if isinstance(exc, asyncpg.InsufficientResourcesError):  # 53xxx: memory, connections
        return Unavailable("resources", str(exc))
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return Unavailable("read_only", str(exc))
    if isinstance(exc, asyncpg.TransactionRollbackError):  # serialization, deadlock
        return Unavailable("conflict_retry", str(exc))
    if isinstance(
        exc,
        asyncpg.UndefinedTableError
        | asyncpg.UndefinedFunctionError
        | asyncpg.InvalidSchemaNameError,
    ):
        return Unavailable("not_migrated", str(exc))
    if isinstance(
        exc,
        asyncpg.InvalidCatalogNameError  # 3D000: no such database
        | asyncpg.InvalidAuthorizationSpecificationError  # 28000: no such role
        | asyncpg.InvalidPasswordError
        | asyncpg.InsufficientPrivilegeError,  # 42501: privileges revoked
    ):
        return Unavailable("access_denied", str(exc))
    if isinstance(exc, asyncpg.ProgramLimitExceededError):  # 54000: an index row too large
        return RefusedValue(str(exc))
    if isinstance(exc, asyncpg.DataError):  # class 22: out of range, bad encoding
        return RefusedValue(str(exc))
    if isinstance(exc, asyncpg.InternalClientError) and "another operation" in str(exc):
        # A pooled connection whose backend was just terminated (pg_terminate_backend, a fast
        # shutdown): asyncpg still consumes the server's FATAL when the next BEGIN comes ("cannot
        # switch to state 15; another operation (2) is in progress"). The connection is gone.
        # Found by devtools/ingest_simulation.py (seed 9), a 500 before.
        return Unavailable("database_down", f"{type(exc).__name__}: {exc}")
    if isinstance(
        exc,
        OSError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.OperatorInterventionError  # 57xxx: shutdown, crash, starting up
        | asyncpg.CannotConnectNowError
        | asyncpg.InternalServerError
        | ConnectionError
        | asyncio.TimeoutError,
    ):
        return Unavailable("database_down", f"{type(exc).__name__}: {exc}")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.execute(TEMP_TABLES)


class Store:
    """One replica's pool (min 0, max `size` connections) and the batch transaction."""

    def __init__(
        self,
        dsn: str,
        *,
        size: int = 4,
        statement_timeout_ms: int = 15_000,
        lock_timeout_ms: int = 5_000,
        acquire_timeout_s: float = 2.0,
        max_waiting: int = 64,
        rollup: bool = True,
    ) -> None:
        self._dsn = dsn
        self.size = size
        self._settings = {
            "statement_timeout": str(statement_timeout_ms),
            "lock_timeout": str(lock_timeout_ms),
            # A transaction left open by a client that vanished is ended by the server.
            "idle_in_transaction_session_timeout": str(max(60_000, 4 * statement_timeout_ms)),
            "application_name": "edge-ingest",
        }
        self._acquire_timeout_s = acquire_timeout_s
        self._command_timeout_s = statement_timeout_ms / 1000 + 5.0
        self.max_waiting = max_waiting
        self.rollup = rollup
        self._pool: asyncpg.Pool | None = None
        self.waiting = 0
        self.in_use = 0
        # Admission (admitted()): batches decoded or in a transaction at once, and waiting.
        self._slots = asyncio.Semaphore(2 * size)
        self.queued = 0
        # Set by ping() while the database's schema is not this code's (missing, older or
        # newer): every batch is then a 503 not_migrated, never applied to a schema it was not
        # written for.
        self.schema_problem: str | None = None
        self.last_ok: float | None = None
        self.last_error: str | None = None

    async def open(self) -> None:
        """Make the pool; connects lazily, so a database down at start is a 503, not a crash."""
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self.size,
            init=_init_connection,
            server_settings=self._settings,
            timeout=CONNECT_TIMEOUT_S,
            # The client's own deadline per statement: a frozen or partitioned server cannot
            # enforce statement_timeout, so without this a batch (and its connection) would
            # hang until TCP gives up. Then 503, and the pool replaces the connection.
            command_timeout=self._command_timeout_s,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await asyncio.wait_for(self._pool.close(), 10)
            self._pool = None

    @property
    def opened(self) -> int:
        return self._pool.get_size() if self._pool is not None else 0

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """A slot for one batch, taken before it is decoded: at most 2 x `size` batches are
        decoded or applied at once (the pool busy, the next ones decoded meanwhile); up to
        `max_waiting` more wait here holding only their bytes; beyond that Unavailable
        ("queue_full") at once, and ("pool_timeout") after the acquire timeout. Refusing
        before decoding keeps hundreds of gateways replaying at once from spending the CPU
        on batches that are then refused (bench/INGEST.md)."""
        if self._slots.locked() and self.queued >= self.max_waiting:
            raise Unavailable("queue_full", f"{self.queued} requests wait for a connection")
        self.queued += 1
        try:
            async with asyncio.timeout(self._acquire_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise Unavailable(
                "pool_timeout", f"no connection free within {self._acquire_timeout_s:g} s"
            ) from None
        finally:
            self.queued -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def run(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """`fn` on a pooled connection; raises Unavailable (503) or RefusedValue (422)."""
        assert self._pool is not None, "Store.open() first"
        if self.waiting >= self.max_waiting and self.in_use >= self.size:
            raise Unavailable("queue_full", f"{self.waiting} requests wait for a connection")
        self.waiting += 1
        try:
            conn = await self._pool.acquire(timeout=self._acquire_timeout_s)
        except TimeoutError:
            self.waiting -= 1
            raise Unavailable(
                "pool_timeout", f"no connection free within {self._acquire_timeout_s:g} s"
            ) from None
        except BaseException as e:
            self.waiting -= 1
            c = classify(e)
            self._failed(c)
            if isinstance(c, Unavailable):
                raise c from None
            raise
        self.waiting -= 1
        self.in_use += 1
        try:
            result = await fn(conn)
        except BaseException as e:
            c = classify(e)
            self._failed(c)
            if isinstance(c, Unavailable | RefusedValue):
                raise c from None
            raise
        finally:
            self.in_use -= 1
            try:
                await self._pool.release(conn)
            except Exception as e:  # the pool closed the connection; the batch's answer stands
                log.info("a connection failed its reset and was closed: %r", e)
        self.last_ok = time.monotonic()
        self.last_error = None
        return result

    def _failed(self, c: Exception) -> None:
        if isinstance(c, Unavailable) and c.cause in _DOWN:
            self.last_error = c.detail

    async def apply(
        self, gateway: str, first_seq: int, last_seq: int, digest: bytes, chunks: int, rows: Rows
    ) -> Result:
        """Apply one batch in one transaction (C1, C2, C6)."""

        async def tx(conn: Any) -> Result:
            async with conn.transaction():
                if rows.counts:
                    await conn.copy_records_to_table("in_counts", records=rows.counts)
                if rows.numeric:
                    await conn.copy_records_to_table("in_numeric", records=rows.numeric)
                if rows.categories:
                    await conn.copy_records_to_table("in_categories", records=rows.categories)
                rec = await conn.fetchrow(
                    "SELECT * FROM edge_ingest.apply_batch($1, $2, $3, $4, $5, $6, $7)",
                    gateway,
                    first_seq,
                    last_seq,
                    digest,
                    chunks,
                    rows.messages,
                    self.rollup,
                )
            assert rec is not None
            return Result(Outcome(rec["outcome"]), int(rec["next_seq"]), int(rec["gap"]))

        result: Result = await self.run(tx)
        return result

    async def warm(self) -> None:
        """Open the pool's connections that are not open, each with the full connect timeout:
        a request's acquire (acquire_timeout) would cancel a slow connect every time, and a
        database slow to accept connections would never get one (found by the adversary)."""
        pool = self._pool
        assert pool is not None
        missing = self.size - pool.get_size()
        # Only while no batch holds a connection: under load the requests open their own.
        if missing <= 0 or self.in_use or pool.get_idle_size():
            return

        async def one() -> None:
            conn = await pool.acquire(timeout=CONNECT_TIMEOUT_S + 1)
            await pool.release(conn)

        await asyncio.gather(*(one() for _ in range(missing)), return_exceptions=True)

    async def ping(self) -> None:
        """A round trip through the pool: raises Unavailable when the database cannot answer or
        is not migrated to this code's schema."""

        async def check(conn: Any) -> None:
            v = await schema_version(conn)
            if v != SCHEMA_VERSION:
                raise Unavailable(
                    "not_migrated",
                    f"schema version {v}, this edge-ingest needs {SCHEMA_VERSION}:"
                    " run `edge-ingest migrate`",
                )

        try:
            await self.run(check)
        except Unavailable as e:
            if e.cause == "not_migrated":
                self.last_error = self.schema_problem = e.detail
            raise
        self.schema_problem = None

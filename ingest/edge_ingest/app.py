"""The HTTP side: an ASGI application (served by uvicorn) speaking the agent's wire format.

    POST /ingest   a batch: 200 applied or replayed (after COMMIT), 400 malformed, 401 token,
                   413 too large, 422 refused (a reused or overlapping range, a value the
                   database refuses), 503 + Retry-After when the database cannot take it now
    GET /healthz   the process answers
    GET /readyz    the database answers through the pool and is migrated; the pool is not full
    GET /metrics   Prometheus text

Never 409 (the agent reads it as "already stored" and deletes), never a 500 for a reason a
gateway could act on. Everything that can be refused without the database is refused before a
connection is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fnmatch
import hashlib
import hmac
import json
import logging
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.core.errors import BadBatch
from agent.core.model import WireBatch, decode_batch
from edge_ingest.metrics import Metrics
from edge_ingest.rows import Rows, batch_rows
from edge_ingest.schema import drop_before, ensure_partitions
from edge_ingest.store import Outcome, RefusedValue, Store, Unavailable

log = logging.getLogger("edge_ingest.app")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAINTENANCE_EVERY_S = 3600.0
PROBE_EVERY_S = 2.0
_MAINT_LOCK = 0x6564_6766
_I64 = 2**63 - 1
MAX_SEQ = 2**53
# Bodies up to this size are decoded on the event loop (a typical batch: 40 KiB gzipped).
INLINE_BYTES = 1024 * 1024


class Answer(Exception):
    """A non-200 answer decided before or after the database."""

    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers or {}


class IngestApp:
    def __init__(
        self,
        store: Store,
        *,
        tokens: Iterable[str] | Mapping[str, Sequence[str]],
        no_auth: bool = False,
        max_body_bytes: int = 8 * 1024**2,
        max_decompressed_bytes: int = 64 * 1024**2,
        retry_after_s: int = 2,
        retention_days: int = 30,
        max_batch_rows: int = 200_000,
        body_timeout_s: float = 30.0,
        partitions_ahead_days: int = 7,
    ) -> None:
        self.store = store
        self.metrics = Metrics(store)
        # token -> the gateway ids (fnmatch patterns) it may send for; () = any gateway.
        bound = tokens if isinstance(tokens, Mapping) else dict.fromkeys(tokens, ())
        self._tokens = [(t.encode(), tuple(g)) for t, g in bound.items()]
        self._no_auth = no_auth
        self.max_body_bytes = max_body_bytes
        self.max_decompressed_bytes = max_decompressed_bytes
        self.retry_after_s = retry_after_s
        self.retention_days = retention_days
        self.max_batch_rows = max_batch_rows
        self.rollup_checks = store.rollup
        self.body_timeout_s = body_timeout_s
        self.partitions_ahead_days = partitions_ahead_days
        self._tasks: list[asyncio.Task[None]] = []
        self.ready_problem: str | None = "starting"

    # ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/ingest":
            if method != "POST":
                await _reply(send, 405, {"error": "POST a batch here"}, {"Allow": "POST"})
                return
            await self._ingest(scope, receive, send)
        elif path in ("/healthz", "/readyz", "/metrics") and method in ("GET", "HEAD"):
            if path == "/healthz":
                await _reply(send, 200, {"status": "ok"})
            elif path == "/readyz":
                problem = self.ready_problem
                waiting = self.store.waiting + self.store.queued
                if problem is None and waiting >= max(self.store.size, self.store.max_waiting // 2):
                    # Batches wait for a slot (admitted()) as well as for a connection.
                    problem = f"pool exhausted: {waiting} requests waiting"
                doc = {"ready": problem is None, "problems": [problem] if problem else []}
                await _reply(send, 200 if problem is None else 503, doc)
            else:
                body = generate_latest(self.metrics.registry)
                await _send(send, 200, body, {"content-type": CONTENT_TYPE_LATEST})
        else:
            await _reply(send, 404, {"error": "not found"})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.store.open()
                except Exception as e:
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                self._tasks = [
                    asyncio.create_task(self._probe_loop()),
                    asyncio.create_task(self._maintenance_loop()),
                ]
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                for t in self._tasks:
                    t.cancel()
                for t in self._tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
                await self.store.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # POST /ingest

    async def _ingest(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        try:
            result = await self._handle(headers, receive)
        except Answer as a:
            self.metrics.batches.labels(str(a.status)).inc()
            level = logging.INFO if a.status == 503 else logging.WARNING
            log.log(level, "answered %d: %s", a.status, a.error)
            await _reply(send, a.status, {"error": a.error}, a.headers)
            return
        except Exception:
            log.exception("batch failed for a reason of ours")
            self.metrics.batches.labels("500").inc()
            await _reply(send, 500, {"error": "internal error (logged)"})
            return
        self.metrics.batches.labels("200").inc()
        await _reply(send, 200, result)

    async def _handle(self, headers: dict[str, bytes], receive: Receive) -> dict[str, Any]:
        allowed = self._authenticate(headers.get("authorization"))
        if self.store.schema_problem is not None:
            raise self._unavailable(Unavailable("not_migrated", self.store.schema_problem))
        raw = await self._read_body(headers, receive)
        try:
            async with self.store.admitted():
                return await self._apply(headers, raw, allowed)
        except Unavailable as e:  # no slot: refused before any decoding
            raise self._unavailable(e) from None

    def _prepare(
        self, headers: dict[str, bytes], raw: bytes, allowed: tuple[str, ...]
    ) -> tuple[WireBatch, Rows, bytes]:
        """Everything about a batch that needs no database: decompress, decode, check, merge.
        Raises Answer (400, 403, 413)."""
        encoding = headers.get("content-encoding", b"identity").strip().lower()
        if encoding == b"gzip":
            raw = self._gunzip(raw)
        elif encoding != b"identity":
            raise Answer(400, "Content-Encoding must be gzip or identity")
        try:
            batch = decode_batch(raw)
        except BadBatch as e:
            raise Answer(400, f"malformed batch: {e}") from None
        key = headers.get("idempotency-key")
        if key is not None and key.decode("latin-1") != batch.key:
            raise Answer(
                400,
                f"Idempotency-Key {key.decode('latin-1')[:200]!r} does not match the batch"
                f" ({batch.key!r})",
            )
        if allowed and not any(fnmatch.fnmatchcase(batch.gateway, g) for g in allowed):
            raise Answer(403, f"this token may not send for gateway {batch.gateway!r}")
        if batch.last_seq >= MAX_SEQ:
            # Far beyond any agent's seqs (its wall-clock floor, 1e6 per second, reaches 2^53
            # in the year 2255): a watermark there would refuse the gateway's batches forever.
            raise Answer(400, f"malformed batch: last_seq {batch.last_seq} is not below 2^53")
        rows = batch_rows(batch.chunks)
        if rows.total > self.max_batch_rows:
            raise Answer(
                413,
                f"the batch makes {rows.total:,} rows, over {self.max_batch_rows:,}: split it",
            )
        if not _finite_rows(rows.numeric):
            raise Answer(400, "malformed batch: merging its chunks overflows a sum")
        if self.rollup_checks and not _finite_minutes(rows.numeric):
            raise Answer(400, "malformed batch: its sums overflow within one minute (rollup)")
        if not _bigint_rows(rows):
            raise Answer(400, "malformed batch: merging its chunks overflows a count")
        return batch, rows, hashlib.sha256(raw).digest()

    async def _apply(
        self, headers: dict[str, bytes], raw: bytes, allowed: tuple[str, ...]
    ) -> dict[str, Any]:
        if len(raw) > INLINE_BYTES:
            # A large body decodes on a worker thread: the event loop keeps answering the
            # other gateways (and /healthz) between the thread's GIL slices.
            batch, rows, digest = await asyncio.to_thread(self._prepare, headers, raw, allowed)
        else:
            batch, rows, digest = self._prepare(headers, raw, allowed)
        started = time.monotonic()
        try:
            result = await self.store.apply(
                batch.gateway, batch.first_seq, batch.last_seq, digest, len(batch.chunks), rows
            )
        except Unavailable as e:
            raise self._unavailable(e) from None
        except RefusedValue as e:
            raise Answer(422, f"the database refused a value of this batch: {e}") from None
        self.metrics.outcomes.labels(result.outcome.value).inc()
        doc: dict[str, Any] = {"outcome": result.outcome.value, "next_seq": result.next_seq}
        if result.outcome in (Outcome.REUSED, Outcome.OVERLAP):
            what = (
                "this seq range was applied before with other content"
                if result.outcome is Outcome.REUSED
                else "these seqs overlap seqs already applied"
            )
            raise Answer(
                422,
                f"{what} (gateway {batch.gateway!r}, seqs {batch.first_seq}..{batch.last_seq},"
                f" applied up to {result.next_seq - 1}): two gateways with one gateway_id, or"
                " an outbox restored from a backup",
            )
        if result.outcome in (Outcome.APPLIED, Outcome.GAP):
            self.metrics.commit_seconds.observe(time.monotonic() - started)
            self.metrics.chunks.inc(len(batch.chunks))
            self.metrics.messages.inc(rows.messages)
            self.metrics.rows.labels("counts").inc(len(rows.counts))
            self.metrics.rows.labels("numeric").inc(len(rows.numeric))
            self.metrics.rows.labels("categories").inc(len(rows.categories))
            doc["chunks"] = len(batch.chunks)
            if result.gap:
                self.metrics.gap_seqs.inc(result.gap)
                doc["gap"] = result.gap
                log.warning(
                    "gateway %r jumped ahead by %d seqs (to %d): accepted, gap counted",
                    batch.gateway, result.gap, batch.first_seq,
                )  # fmt: skip
        return doc

    def _unavailable(self, e: Unavailable) -> Answer:
        self.metrics.unavailable.labels(e.cause).inc()
        after = self.retry_after_s * (3 if e.cause == "database_down" else 1)
        return Answer(
            503, f"database unavailable ({e.cause}): retry later", {"Retry-After": str(after)}
        )

    def _authenticate(self, value: bytes | None) -> tuple[str, ...]:
        """The gateway patterns the caller's token may send for (() = any); raises 401."""
        if self._no_auth:
            return ()
        if value is None or not value.startswith(b"Bearer "):
            raise Answer(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        given = value[7:].strip()
        # Compared with every token, in constant time each.
        found = [g for t, g in self._tokens if hmac.compare_digest(given, t)]
        if not found:
            raise Answer(401, "the token is not accepted", {"WWW-Authenticate": "Bearer"})
        return found[0]

    async def _read_body(self, headers: dict[str, bytes], receive: Receive) -> bytes:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(receive, 0)
        parts: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                raise Answer(
                    408,
                    f"the body did not arrive within {self.body_timeout_s} s",
                    {"Connection": "close"},
                ) from None
            if msg["type"] == "http.disconnect":
                raise Answer(400, "the client went away")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(receive, size)
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    async def _too_large(self, receive: Receive, size: int) -> None:
        """Answer 413 -- after reading the rest of the body and throwing it away, up to a
        bound: a client still sending (the agent writes the whole body before it reads) would
        otherwise get a reset connection instead of the 413 that tells it to split."""
        limit = max(16 * self.max_body_bytes, self.max_decompressed_bytes)
        while size <= limit:
            msg = await receive()
            if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
                break
            size += len(msg.get("body", b""))
        raise Answer(413, f"body over {self.max_body_bytes} bytes", {"Connection": "close"})

    def _gunzip(self, raw: bytes) -> bytes:
        """Every gzip member of `raw` (RFC 1952 allows several), at most max_decompressed_bytes
        in all; anything else after the last member is a 400."""
        out: list[bytes] = []
        room = self.max_decompressed_bytes
        while True:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                part = d.decompress(raw, room)
            except zlib.error as e:
                raise Answer(400, f"malformed batch: not gzip ({e})") from None
            if d.unconsumed_tail:
                raise Answer(
                    413, f"body over {self.max_decompressed_bytes} bytes once decompressed"
                )
            if not d.eof:
                raise Answer(400, "malformed batch: the gzip stream is truncated")
            out.append(part)
            room -= len(part)
            raw = d.unused_data
            if not raw:
                return b"".join(out)
            if room <= 0:  # (a max_length of 0 would mean no limit)
                raise Answer(
                    413, f"body over {self.max_decompressed_bytes} bytes once decompressed"
                )

    # Background: readiness, partitions ahead, retention

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.store.warm()
                await self.store.ping()
                self.ready_problem = None
            except Unavailable as e:
                self.ready_problem = f"database: {e.detail}"
            except Exception as e:  # a bug of ours: not ready, and logged
                log.exception("readiness probe failed")
                self.ready_problem = f"probe failed: {e}"
            await asyncio.sleep(PROBE_EVERY_S)  # a period, not a wait for a condition

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                await self.maintain(dt.datetime.now(dt.UTC).date())
            except Unavailable as e:
                log.info("maintenance postponed: %s", e)
            except Exception:
                log.exception("maintenance failed")
            await asyncio.sleep(MAINTENANCE_EVERY_S)  # a period, not a wait for a condition

    async def maintain(self, today: dt.date) -> None:
        """Partitions ahead and retention, by one replica at a time (an advisory lock)."""

        async def job(conn: Any) -> None:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MAINT_LOCK):
                return
            try:
                made = await ensure_partitions(conn, today, self.partitions_ahead_days)
                dropped = await drop_before(conn, today - dt.timedelta(days=self.retention_days))
                if made or dropped:
                    log.info("maintenance: %d partitions made, dropped %s", made, dropped)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MAINT_LOCK)

        await self.store.run(job)


def _finite_rows(rows: list[Any]) -> bool:
    return all(math.isfinite(r[6]) and math.isfinite(r[7]) for r in rows)


def _finite_minutes(rows: list[Any]) -> bool:
    """Whether the per-minute rollup of these numeric rows stays finite (each second's sums
    may be finite and their minute's not)."""
    minutes: dict[tuple[Any, ...], list[float]] = {}
    for r in rows:
        key = (r[0], r[1], r[2] - r[2] % 60, r[4])
        acc = minutes.get(key)
        if acc is None:
            minutes[key] = [r[6], r[7]]
        else:
            acc[0] += r[6]
            acc[1] += r[7]
    return all(math.isfinite(a) and math.isfinite(b) for a, b in minutes.values())


def _bigint_rows(rows: Rows) -> bool:
    """Whether the counts the batch's chunks add up to fit PostgreSQL's bigint (each chunk's do;
    their sum in one batch may not, and the driver would raise OverflowError: a 500)."""
    return (
        rows.messages <= _I64
        and all(r[4] <= _I64 for r in rows.counts)
        and all(r[5] <= _I64 for r in rows.numeric)
        and all(r[6] <= _I64 for r in rows.categories)
    )


async def _reply(send: Send, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(doc).encode()
    await _send(send, status, body, {"content-type": "application/json", **(headers or {})})


async def _send(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    hs = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    hs.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": body})

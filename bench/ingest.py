"""edge-ingest under load: its figures against baselines measured in the same run (issue #22).

    python -m bench.ingest [--quick] [--compare-with REV] [--out bench/INGEST.md] [--json-out F]
    python -m bench.ingest --report-from F.json     (the report again, from a run's figures)

One private, durable PostgreSQL cluster (devtools/postgres.py: fsync on, the server's defaults
but max_connections, see below), a fresh database per run, and simulated gateways
(devtools/gateways.py: the agent's wire format, its batch size, its key reuse) replaying their
backlogs: each sends its batches back to back over one keep-alive connection, the next only
after a 200, and honours Retry-After on a 503 as the agent does. Runs:

  ceiling      the same rows merged directly by `Store.apply` (the service's SQL, the same pool
               size) from this process: no HTTP, no gzip, no decoding
  service      `edge-ingest serve` (one replica, pool 4) at full speed; pg_stat_activity sampled
  replicas     two replicas (pool 4 each), the gateways split between them; and (full mode)
               the ceiling and the service with pool 8
  naive        a row per message (each chunk expanded into its `count` messages) and a
               connection per gateway, one transaction per batch or a commit per message,
               no HTTP
  rollup       the per-minute rollup off (EDGE_INGEST__ROLLUP=false), and off with a scheduled
               job that rebuilds it from the raw rows every few seconds instead
  latency      the gateways paced at 80 % of the measured rate; answer latency, the service's
               commit histogram, and dashboard queries on edge_ingest.per_minute meanwhile
  backpressure the database made slow (a trigger sleeping) then stalled (a table lock): 503s
               with Retry-After, the totals checked against devtools.gateways.Truth
  profile      py-spy on the service and pg_stat_statements on the server (after a restart
               that loads it), to say where the time goes
  compared     with --compare-with REV: the service of that commit (git archive) under the
               same load as `service`

The HTTP client is a minimal HTTP/1.1 client on asyncio streams sending the exact bytes of
`Batch.request` (the agent's request), so that the client takes as little of the 2 cores as
possible. Only loopback addresses; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from edge_ingest.rows import Rows, batch_rows
from edge_ingest.schema import migrate
from edge_ingest.store import CAUSES, Outcome, Store

from agent.core.model import decode_batch
from bench.common import OUT, ROOT, MachineLoad, ProcStat, machine_description, say, write_json
from devtools.gateways import Batch, Gateway, Ingest, Truth, db_totals
from devtools.postgres import PostgresCluster
from devtools.procs import HOST

TOKEN = "bench-token"
CHUNKS_PER_BATCH = 500  # the agent's forward.max_batch_chunks default
POOL = 4  # edge-ingest's default pool
ANSWER_TIMEOUT_S = 10.0  # the agent's forward.timeout_s
BACKOFF_S = 0.5  # the agent's forward.backoff_min_s: after no answer
MAX_ATTEMPTS = 400  # per batch: a bound, never reached in a sane run
MAX_CONNECTIONS = 250  # the server's (default 100): the naive design needs one per gateway
SAMPLE_S = 0.05  # pg_stat_activity
PG_SETTINGS = (
    "server_version", "max_connections", "shared_buffers", "work_mem", "maintenance_work_mem",
    "effective_cache_size", "fsync", "synchronous_commit", "full_page_writes", "wal_level",
    "wal_buffers", "max_wal_size", "checkpoint_timeout", "autovacuum", "jit",
)  # fmt: skip
SPY = ROOT / ".venv" / "bin" / "py-spy"


# -- the workload ------------------------------------------------------------------------------


@dataclass
class Prepared:
    """One batch ready to send (request bytes) and to apply directly (rows)."""

    gateway: str
    first_seq: int
    last_seq: int
    chunks: int
    messages: int
    headers: bytes  # the request's header lines but Host, each ending in CRLF
    body: bytes  # gzip, as the agent sends it
    digest: bytes
    rows: Rows
    rollup_rows: int  # per-minute rows the batch upserts when the rollup is on


@dataclass
class Workload:
    gateways: list[list[Prepared]]  # per gateway, its batches in order
    naive: list[list[list[tuple[str, str, str, float, float | None, str | None]]]]
    truth: Truth  # of the first `truth_batches` batches of every gateway
    truth_batches: int
    seconds: float

    @property
    def chunks_per_gateway(self) -> int:
        return sum(p.chunks for p in self.gateways[0])

    def sizes(self) -> dict[str, float]:
        flat = [p for g in self.gateways for p in g]
        n = len(flat)
        return {
            "batches": n,
            "chunks": sum(p.chunks for p in flat),
            "messages": sum(p.messages for p in flat),
            "gzip_bytes_per_batch": sum(len(p.body) for p in flat) / n,
            "rows_per_batch": sum(p.rows.total for p in flat) / n,
            "count_rows_per_batch": sum(len(p.rows.counts) for p in flat) / n,
            "numeric_rows_per_batch": sum(len(p.rows.numeric) for p in flat) / n,
            "category_rows_per_batch": sum(len(p.rows.categories) for p in flat) / n,
            "rollup_rows_per_batch": sum(p.rollup_rows for p in flat) / n,
            "messages_per_chunk": sum(p.messages for p in flat) / sum(p.chunks for p in flat),
        }


def message_rows(b: Batch) -> list[tuple[str, str, str, float, float | None, str | None]]:
    """The batch's chunks expanded into the camera messages they stand for: one row each
    (event time spread over the chunk's span, conf at the chunk's mean, cls by its counts)."""
    out: list[tuple[str, str, str, float, float | None, str | None]] = []
    for c in b.chunks:
        s = c.num.get("conf")
        conf = s.sum / s.n if s is not None and s.n else None
        classes = [v for v, k in sorted(c.cat.get("cls", {}).items()) for _ in range(k)]
        span = c.event_last - c.event_first
        for i in range(c.count):
            ts = c.event_first + (span * i / (c.count - 1) if c.count > 1 else 0.0)
            out.append((b.gateway, c.camera, c.stream, ts, conf, classes[i] if i < len(classes)
                        else None))  # fmt: skip
    return out


def prepare(gateways: int, batches: int, truth_batches: int, naive_batches: int) -> Workload:
    """Every gateway's batches, cut as the agent's outbox cuts them, event times over the last
    half hour (today's and yesterday's partitions exist)."""
    started = time.monotonic()
    t0 = int(time.time()) - 1800
    out: list[list[Prepared]] = []
    naive: list[list[list[tuple[str, str, str, float, float | None, str | None]]]] = []
    truth = Truth()
    for g in range(gateways):
        gw = Gateway(f"gw-{g:03d}", seed=1000 + g, t0=t0 + g % 60)
        mine: list[Prepared] = []
        naive.append([])
        for i in range(batches):
            b = gw.cut(CHUNKS_PER_BATCH)
            body, headers = b.request(TOKEN)
            headers["Content-Length"] = str(len(body))
            wire = decode_batch(b.body)
            rows = batch_rows(wire.chunks)
            lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
            minutes = {(r[0], r[1], r[2] // 60) for r in rows.counts}
            minutes_num = {(r[0], r[1], r[2] // 60, r[4]) for r in rows.numeric}
            mine.append(Prepared(b.gateway, b.first_seq, b.last_seq, len(b.chunks), rows.messages,
                                 lines, body, hashlib.sha256(b.body).digest(), rows,
                                 len(minutes) + len(minutes_num)))  # fmt: skip
            if i < truth_batches:
                truth.apply(b)
            if i < naive_batches:
                naive[-1].append(message_rows(b))
        out.append(mine)
    return Workload(out, naive, truth, truth_batches, time.monotonic() - started)


# -- figures of one run --------------------------------------------------------------------------


@dataclass
class Run:
    """What the client saw during one run: every 200 with its time and size, every answer."""

    name: str
    t0: float = field(default_factory=time.monotonic)
    done: list[tuple[float, int, int]] = field(default_factory=list)  # (t, chunks, messages)
    latencies: list[float] = field(default_factory=list)  # send -> 200, seconds
    answers: Counter[str] = field(default_factory=Counter)
    refusals: list[float] = field(default_factory=list)  # times of 503s
    retry_after_s: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    finished: float | None = None
    batches_wanted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def ok(self, chunks: int, messages: int, latency: float | None = None) -> None:
        self.done.append((time.monotonic() - self.t0, chunks, messages))
        if latency is not None:
            self.latencies.append(latency)

    @property
    def chunks(self) -> int:
        return sum(c for _, c, _ in self.done)

    @property
    def messages(self) -> int:
        return sum(m for _, _, m in self.done)

    @property
    def wall(self) -> float:
        return max((t for t, _, _ in self.done), default=0.0)

    def steady(self, lo: float = 0.1, hi: float = 0.9) -> float | None:
        """Chunks/s between the moments lo and hi of the chunks were merged: the rate without
        the start (connections, caches) and the ragged end (the last gateways alone)."""
        pts = sorted(self.done)
        total = self.chunks
        if len(pts) < 10 or total == 0:
            return None
        acc, t_lo, t_hi, c_lo, c_hi = 0, None, None, 0, 0
        for t, c, _ in pts:
            acc += c
            if t_lo is None and acc >= lo * total:
                t_lo, c_lo = t, acc
            if t_hi is None and acc >= hi * total:
                t_hi, c_hi = t, acc
        if t_lo is None or t_hi is None or t_hi <= t_lo:
            return None
        return (c_hi - c_lo) / (t_hi - t_lo)

    def overall(self) -> float | None:
        return self.chunks / self.wall if self.wall > 0 else None

    def series(self, step: float = 1.0) -> list[tuple[float, float, int]]:
        """(t, chunks/s, 503s) per `step` seconds."""
        end = max(self.wall, max(self.refusals, default=0.0))
        n = int(end / step) + 1
        chunks, refused = [0] * n, [0] * n
        for t, c, _ in self.done:
            chunks[int(t / step)] += c
        for t in self.refusals:
            refused[int(t / step)] += 1
        return [(i * step, chunks[i] / step, refused[i]) for i in range(n)]

    def figures(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "batches": len(self.done), "batches_wanted": self.batches_wanted,
            "chunks": self.chunks, "messages": self.messages, "wall_s": rnd(self.wall),
            "chunks_per_s_overall": rnd(self.overall(), 0),
            "chunks_per_s_steady": rnd(self.steady(), 0),
            "messages_per_s_steady": rnd(ratio_or_none(self.steady(), self.chunks,
                                                       self.messages), 0),
            "answers": dict(self.answers), "retry_after": dict(self.retry_after_s),
            "latency_p50_s": rnd(pct(lat, 50), 4), "latency_p99_s": rnd(pct(lat, 99), 4),
            "latency_max_s": rnd(lat[-1] if lat else None, 4), "errors": self.errors[:10],
            **self.extra,
        }  # fmt: skip


def ratio_or_none(rate: float | None, chunks: int, messages: int) -> float | None:
    return None if rate is None or chunks == 0 else rate * messages / chunks


def pct(sorted_values: Sequence[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def rnd(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


# -- CPU of the processes involved -----------------------------------------------------------------


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process, its live children and the children it reaped: the
    postmaster, its backends (which call setsid: not its process group) and the ended ones."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        elif int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / tck


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """CPU seconds used by the postgres cluster, the services and this process over a run."""

    def __init__(self, pg: PostgresCluster, services: Sequence[Ingest] = ()) -> None:
        assert pg.pid is not None
        self.pg_pid = pg.pid
        self.services = [ProcStat(s.popen.pid) for s in services if s.popen is not None]
        self.machine = MachineLoad()
        self.t0 = time.monotonic()
        self.start = self._read()

    def _read(self) -> list[float]:
        return [tree_cpu_s(self.pg_pid), sum(s.cpu_s() for s in self.services), self_cpu_s()]

    def stop(self, chunks: int) -> dict[str, Any]:
        end, wall = self._read(), time.monotonic() - self.t0
        busy, steal = self.machine.read()
        d = [b - a for a, b in zip(self.start, end, strict=True)]
        per = 1e6 / chunks if chunks else math.nan
        return {
            "cpu_cores_postgres": rnd(d[0] / wall), "cpu_cores_service": rnd(d[1] / wall),
            "cpu_cores_bench": rnd(d[2] / wall), "cpu_us_per_chunk_postgres": rnd(d[0] * per, 1),
            "cpu_us_per_chunk_service": rnd(d[1] * per, 1),
            "cpu_us_per_chunk_bench": rnd(d[2] * per, 1),
            "machine_busy_pct": rnd(busy, 1), "machine_steal_pct": rnd(steal, 1),
        }  # fmt: skip


# -- the database -------------------------------------------------------------------------------


async def fresh_database(pg: PostgresCluster, name: str) -> str:
    """A new database `name` (dropped first if it exists), migrated; its DSN."""
    await asyncio.to_thread(pg.drop_database, name)
    dsn = await asyncio.to_thread(pg.create_database, name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, today=dt.datetime.now(dt.UTC).date())
    finally:
        await conn.close()
    return dsn


class ConnSampler:
    """pg_stat_activity every SAMPLE_S: backends whose application_name is `app`."""

    def __init__(self, dsn: str, app: str) -> None:
        self.dsn, self.app = dsn, app
        self.samples: list[tuple[float, int, int]] = []  # (t, backends, not idle)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ConnSampler:
        conn = await asyncpg.connect(self.dsn, server_settings={"application_name": "bench"})
        self._task = asyncio.create_task(self._loop(conn))
        return self

    async def _loop(self, conn: asyncpg.Connection) -> None:
        try:
            for _ in range(int(3600 / SAMPLE_S)):
                r = await conn.fetchrow(
                    "SELECT count(*) AS n, count(*) FILTER (WHERE state <> 'idle') AS busy"
                    " FROM pg_stat_activity WHERE application_name = $1",
                    self.app,
                )
                assert r is not None
                self.samples.append((time.monotonic(), int(r["n"]), int(r["busy"])))
                await asyncio.sleep(SAMPLE_S)
        finally:
            await conn.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def figures(self) -> dict[str, Any]:
        return {
            "connections_max": max((n for _, n, _ in self.samples), default=0),
            "connections_busy_max": max((b for _, _, b in self.samples), default=0),
            "connection_samples": len(self.samples),
        }


async def wal_lsn(dsn: str) -> int:
    """The server's WAL position in bytes (its growth: WAL written by everyone)."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    finally:
        await conn.close()


def fsync_ms(directory: Path, n: int = 40) -> float | None:
    """Median ms of an 8 KiB write + fdatasync on the disk under `directory` (the WAL's)."""
    path = directory / "fsync-probe"
    times: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(n):
            t = time.monotonic()
            os.pwrite(fd, os.urandom(8192), i * 8192)
            os.fdatasync(fd)
            times.append(time.monotonic() - t)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return ms(pct(sorted(times), 50))


async def db_counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        r = await conn.fetchrow(
            "SELECT (SELECT coalesce(sum(count), 0) FROM edge_ingest.counts) AS messages,"
            " (SELECT coalesce(sum(chunks), 0) FROM edge_ingest.gateways) AS chunks,"
            " (SELECT coalesce(sum(batches), 0) FROM edge_ingest.gateways) AS batches,"
            " (SELECT coalesce(sum(replays), 0) FROM edge_ingest.gateways) AS replays,"
            " (SELECT coalesce(sum(count), 0) FROM edge_ingest.minute_counts) AS rollup_messages"
        )
        assert r is not None
        return {k: int(v) for k, v in r.items()}
    finally:
        await conn.close()


# -- the direct ceiling --------------------------------------------------------------------------


async def run_ceiling(
    name: str, dsn: str, work: Workload, *, rollup: bool, limit_s: float, pool: int = POOL
) -> Run:
    """Every gateway applies its batches in order through one Store (`pool` connections), as
    fast as the database takes them: the service's SQL without HTTP, gzip or decoding."""
    store = Store(dsn, size=pool, rollup=rollup, max_waiting=1_000_000, acquire_timeout_s=60)
    await store.open()
    run = Run(name, batches_wanted=sum(len(g) for g in work.gateways))
    deadline = time.monotonic() + limit_s

    async def gateway(batches: list[Prepared]) -> None:
        for p in batches:
            if time.monotonic() > deadline:
                return
            started = time.monotonic()
            r = await store.apply(p.gateway, p.first_seq, p.last_seq, p.digest, p.chunks, p.rows)
            if r.outcome is not Outcome.APPLIED:
                run.errors.append(f"{p.gateway} {p.first_seq}: {r.outcome}")
                return
            run.answers["applied"] += 1
            run.ok(p.chunks, p.messages, time.monotonic() - started)

    try:
        async with ConnSampler(dsn, "edge-ingest") as sampler:
            run.t0 = time.monotonic()
            await asyncio.gather(*(gateway(g) for g in work.gateways))
        run.extra.update(sampler.figures())
    finally:
        await store.close()
    return run


# -- the HTTP side -------------------------------------------------------------------------------


class Http:
    """One keep-alive HTTP/1.1 connection, as the agent's forwarder keeps one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.host_line = f"Host: {HOST}:{port}\r\n".encode()
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def post(self, headers: bytes, body: bytes) -> tuple[int, dict[bytes, bytes]]:
        if self._w is None:
            self._r, self._w = await asyncio.open_connection(HOST, self.port)
        r, w = self._r, self._w
        assert r is not None
        w.write(b"POST /ingest HTTP/1.1\r\n" + self.host_line + headers + b"\r\n")
        w.write(body)
        await w.drain()
        line = await r.readline()
        if not line:
            raise ConnectionError("the service closed the connection")
        status = int(line.split()[1])
        hs: dict[bytes, bytes] = {}
        for _ in range(100):
            h = await r.readline()
            if h in (b"\r\n", b""):
                break
            k, _, v = h.partition(b":")
            hs[k.strip().lower()] = v.strip()
        await r.readexactly(int(hs.get(b"content-length", b"0")))
        if hs.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, hs

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
        self._r = self._w = None


async def send_all(
    run: Run,
    http: Http,
    batches: Sequence[Prepared],
    deadline: float,
    *,
    start_at: float | None = None,
    interval_s: float | None = None,
) -> None:
    """One gateway: its batches in order, each retried until a 200 (Retry-After honoured on
    a 503, BACKOFF_S after no answer); paced at one batch per interval_s if given."""
    for i, p in enumerate(batches):
        if start_at is not None and interval_s is not None:
            wait = start_at + i * interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        for _attempt in range(MAX_ATTEMPTS):
            if time.monotonic() > deadline:
                return
            started = time.monotonic()
            try:
                status, hs = await asyncio.wait_for(http.post(p.headers, p.body), ANSWER_TIMEOUT_S)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError) as e:
                http.close()
                run.answers["no answer" if isinstance(e, TimeoutError) else "connection error"] += 1
                await asyncio.sleep(BACKOFF_S)
                continue
            run.answers[str(status)] += 1
            if status == 200:
                run.ok(p.chunks, p.messages, time.monotonic() - started)
                break
            if status == 503:
                after = hs.get(b"retry-after", b"")
                run.retry_after_s[after.decode()] += 1
                run.refusals.append(time.monotonic() - run.t0)
                await asyncio.sleep(float(after) if after.isdigit() else BACKOFF_S)
                continue
            run.errors.append(f"{p.gateway} {p.first_seq}: HTTP {status}")
            return
        else:
            run.errors.append(f"{p.gateway} {p.first_seq}: {MAX_ATTEMPTS} attempts")
            return


async def run_http(
    name: str,
    dsn: str,
    work: Workload,
    services: Sequence[Ingest],
    *,
    limit_s: float,
    batches: int | None = None,
    rate: float | None = None,
    during: Callable[[Run, Callable[[], bool]], Awaitable[None]] | None = None,
) -> Run:
    """Every gateway sends its batches (the first `batches` of each) to the services (gateway
    i to service i mod n), back to back, or paced to `rate` chunks/s in all."""
    todo = [g[:batches] if batches else g for g in work.gateways]
    run = Run(name, batches_wanted=sum(len(g) for g in todo))
    deadline = time.monotonic() + limit_s
    conns = [Http(services[i % len(services)].port) for i in range(len(todo))]
    interval = len(todo) * CHUNKS_PER_BATCH / rate if rate else None
    try:
        async with ConnSampler(dsn, "edge-ingest") as sampler:
            run.t0 = now = time.monotonic()
            n = len(todo)
            starts = [now + i / n * interval if interval else None for i in range(n)]
            gateways = asyncio.gather(
                *(send_all(run, conns[i], g, deadline, start_at=starts[i], interval_s=interval)
                  for i, g in enumerate(todo))
            )  # fmt: skip
            side = asyncio.ensure_future(during(run, gateways.done)) if during else None
            try:
                await gateways
            finally:
                run.finished = time.monotonic() - run.t0
                if side is not None:
                    await side
        run.extra.update(sampler.figures())
    finally:
        for c in conns:
            c.close()
    return run


def stop_services(services: Iterable[Ingest]) -> None:
    for s in services:
        with contextlib.suppress(Exception):
            s.stop()


def histogram(text: str, name: str) -> dict[float, float]:
    """A Prometheus histogram's cumulative buckets {le: count} from /metrics text."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[math.inf if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def unavailable(text: str, cause: str) -> float:
    """edge_ingest_unavailable_total{cause=...} from /metrics text (0 if absent)."""
    want = f'edge_ingest_unavailable_total{{cause="{cause}"}} '
    line = next((x for x in text.splitlines() if x.startswith(want)), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def histogram_pct(before: dict[float, float], after: dict[float, float], p: float) -> float | None:
    """The bucket bound holding the p-th percentile of what was observed between two reads."""
    diff = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = diff[-1][1] if diff else 0.0
    for le, n in diff:
        if total and n >= p / 100 * total:
            return le
    return None


# -- the naive design ------------------------------------------------------------------------------

NAIVE_SQL = """
CREATE TABLE messages (
    gateway text NOT NULL, camera text NOT NULL, stream text NOT NULL, ts timestamptz NOT NULL,
    conf float8, cls text
);
CREATE INDEX messages_key ON messages (gateway, camera, stream, ts);
"""
NAIVE_INSERT = (
    "INSERT INTO messages (gateway, camera, stream, ts, conf, cls)"
    " VALUES ($1, $2, $3, to_timestamp($4), $5, $6)"
)


async def run_naive(dsn: str, work: Workload, limit_s: float, *, autocommit: bool) -> Run:
    """A row per message and a connection per gateway: each gateway inserts its batches'
    messages on its own connection, one transaction per batch (the agent's batching and
    durability, without pre-aggregation or a pool), or with `autocommit` one transaction per
    message. No HTTP: an upper bound of the design."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS messages" + ";" + NAIVE_SQL)
    finally:
        await conn.close()
    settings = {"application_name": "naive"}
    conns = [await asyncpg.connect(dsn, server_settings=settings) for _ in work.naive]
    run = Run("naive", batches_wanted=sum(len(g) for g in work.naive))
    deadline = time.monotonic() + limit_s

    async def gateway(c: asyncpg.Connection, batches: list[list[Any]]) -> None:
        for rows in batches:
            if time.monotonic() > deadline:
                return
            started = time.monotonic()
            if autocommit:
                for row in rows:
                    t = time.monotonic()
                    await c.execute(NAIVE_INSERT, *row)
                    run.ok(0, 1, time.monotonic() - t)
                    if t > deadline:
                        return
                continue
            else:
                async with c.transaction():
                    await c.executemany(NAIVE_INSERT, rows)
            run.ok(0, len(rows), time.monotonic() - started)
            run.answers["committed"] += 1

    try:
        async with ConnSampler(dsn, "naive") as sampler:
            run.t0 = time.monotonic()
            await asyncio.gather(*(gateway(c, b) for c, b in zip(conns, work.naive, strict=True)))
        run.extra.update(sampler.figures())
    finally:
        for c in conns:
            await c.close()
    return run


Q_NAIVE_ONE = (
    "SELECT date_bin('60 s', ts, timestamptz '2000-01-01 00:00Z') AS minute, count(*)"
    " FROM messages WHERE gateway = $1 AND ts >= now() - interval '1 hour'"
    " GROUP BY 1 ORDER BY 1"
)
Q_NAIVE_ALL = (
    "SELECT date_bin('60 s', ts, timestamptz '2000-01-01 00:00Z') AS minute, count(*)"
    " FROM messages WHERE ts >= now() - interval '1 hour' GROUP BY 1 ORDER BY 1"
)


async def naive_reads(dsn: str, gateways: int, n: int = 10) -> dict[str, Any]:
    """The dashboard's two queries on the naive design's rows (idle database)."""
    conn = await asyncpg.connect(dsn)
    one: list[float] = []
    all_: list[float] = []
    try:
        size = await conn.fetchval("SELECT count(*) FROM messages")
        for i in range(n):
            t = time.monotonic()
            await conn.fetch(Q_NAIVE_ONE, f"gw-{i % gateways:03d}")
            one.append(time.monotonic() - t)
            t = time.monotonic()
            await conn.fetch(Q_NAIVE_ALL)
            all_.append(time.monotonic() - t)
    finally:
        await conn.close()
    one.sort()
    all_.sort()
    return {
        "rows": size, "one_gateway_p50_ms": ms(pct(one, 50)), "one_gateway_max_ms": ms(one[-1]),
        "all_gateways_p50_ms": ms(pct(all_, 50)), "all_gateways_max_ms": ms(all_[-1]),
    }  # fmt: skip


def naive_rate(run: Run) -> float | None:
    """Messages/s between 10 % and 90 % of the messages (as Run.steady for chunks)."""
    shadow = Run("naive", done=[(t, m, m) for t, _, m in run.done])
    return shadow.steady()


# -- dashboards, the scheduled rollup, the slow database -------------------------------------------

Q_ONE = (
    "SELECT minute, sum(count) FROM edge_ingest.per_minute WHERE gateway = $1"
    " AND minute >= now() - interval '1 hour' GROUP BY minute ORDER BY minute"
)
Q_ALL = (
    "SELECT minute, sum(count) FROM edge_ingest.per_minute"
    " WHERE minute >= now() - interval '1 hour' GROUP BY minute ORDER BY minute"
)


class Dashboard:
    """The per-minute rollup read as a dashboard does: one gateway's last hour, and every
    gateway's, one query every period_s alternately, on a connection of its own."""

    def __init__(self, dsn: str, gateways: int) -> None:
        self.dsn, self.gateways = dsn, gateways
        self.one: list[float] = []
        self.all: list[float] = []
        self.rows_one = self.rows_all = 0

    async def loop(self, stop: Callable[[], bool], period_s: float, limit: int) -> None:
        conn = await asyncpg.connect(self.dsn, server_settings={"application_name": "dashboard"})
        rng = random.Random(7)
        try:
            for i in range(limit):
                if stop():
                    return
                started = time.monotonic()
                if i % 2 == 0:
                    rows = await conn.fetch(Q_ONE, f"gw-{rng.randrange(self.gateways):03d}")
                    self.one.append(time.monotonic() - started)
                    self.rows_one = max(self.rows_one, len(rows))
                else:
                    rows = await conn.fetch(Q_ALL)
                    self.all.append(time.monotonic() - started)
                    self.rows_all = max(self.rows_all, len(rows))
                await asyncio.sleep(max(0.0, period_s - (time.monotonic() - started)))
        finally:
            await conn.close()

    def figures(self) -> dict[str, Any]:
        one, all_ = sorted(self.one), sorted(self.all)
        return {
            "one_gateway_n": len(one), "one_gateway_p50_ms": ms(pct(one, 50)),
            "one_gateway_p99_ms": ms(pct(one, 99)), "one_gateway_minutes": self.rows_one,
            "all_gateways_n": len(all_), "all_gateways_p50_ms": ms(pct(all_, 50)),
            "all_gateways_p99_ms": ms(pct(all_, 99)), "all_gateways_minutes": self.rows_all,
        }  # fmt: skip


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


SCHEDULED_ROLLUP = (
    """
INSERT INTO edge_ingest.minute_counts AS r (gateway, camera, stream, minute, count)
SELECT gateway, camera, stream, date_bin('60 s', t, timestamptz '2000-01-01 00:00Z'), sum(count)
FROM edge_ingest.counts WHERE t >= now() - interval '2 hours' GROUP BY 1, 2, 3, 4
ON CONFLICT (gateway, camera, stream, minute) DO UPDATE SET count = excluded.count
WHERE r.count IS DISTINCT FROM excluded.count""",
    """
INSERT INTO edge_ingest.minute_numeric AS r
    (gateway, camera, stream, minute, field, n, sum, sumsq, min, max)
SELECT gateway, camera, stream, date_bin('60 s', t, timestamptz '2000-01-01 00:00Z'), field,
    sum(n), sum(sum), sum(sumsq), min(min), max(max)
FROM edge_ingest.numeric WHERE t >= now() - interval '2 hours' GROUP BY 1, 2, 3, 4, 5
ON CONFLICT (gateway, camera, stream, minute, field) DO UPDATE
SET n = excluded.n, sum = excluded.sum, sumsq = excluded.sumsq, min = excluded.min,
    max = excluded.max
WHERE r.n IS DISTINCT FROM excluded.n""",
)


async def scheduled_rollup(
    dsn: str, every_s: float, stop: Callable[[], bool], durations: list[float]
) -> None:
    """The alternative to the in-transaction rollup: a job rebuilding the per-minute rows of
    the last two hours (event time) from the raw rows, every `every_s`, one transaction each."""
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "rollup-job"})
    try:
        for _ in range(int(3600 / every_s)):
            last = stop()  # once the load ended: one more pass, to catch up
            started = time.monotonic()
            async with conn.transaction():
                for sql in SCHEDULED_ROLLUP:
                    await conn.execute(sql)
            durations.append(time.monotonic() - started)
            if last:
                return
            for _ in range(int(every_s / 0.1)):
                if stop():
                    break
                await asyncio.sleep(0.1)
    finally:
        await conn.close()


SLOW_SQL = """
CREATE TABLE public.bench_knob (sleep_s float8 NOT NULL);
INSERT INTO public.bench_knob VALUES (0);
CREATE FUNCTION public.bench_slow() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE s float8;
BEGIN
    SELECT sleep_s INTO s FROM public.bench_knob;
    IF s > 0 THEN PERFORM pg_sleep(s); END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER bench_slow BEFORE UPDATE ON edge_ingest.gateways
    FOR EACH ROW EXECUTE FUNCTION public.bench_slow();
"""


@dataclass
class Trouble:
    """The database's bad minutes: `slow_s` with every watermark update sleeping `sleep_s`
    (a slow disk or a busy server: each batch takes longer), then, after `between_s`, `stall_s`
    with edge_ingest.gateways locked (EXCLUSIVE: every batch waits, lock_timeout ends it)."""

    after_s: float
    slow_s: float
    sleep_s: float
    between_s: float
    stall_s: float

    async def act(self, dsn: str, run: Run) -> None:
        conn = await asyncpg.connect(dsn, server_settings={"application_name": "trouble"})
        phases: list[tuple[str, float, float]] = []
        try:
            await asyncio.sleep(self.after_s)
            t = time.monotonic() - run.t0
            await conn.execute("UPDATE public.bench_knob SET sleep_s = $1", self.sleep_s)
            await asyncio.sleep(self.slow_s)
            await conn.execute("UPDATE public.bench_knob SET sleep_s = 0")
            phases.append(("slow", t, time.monotonic() - run.t0))
            await asyncio.sleep(self.between_s)
            async with conn.transaction():
                await conn.execute("LOCK TABLE edge_ingest.gateways IN EXCLUSIVE MODE")
                t = time.monotonic() - run.t0
                await asyncio.sleep(self.stall_s)
            phases.append(("stalled", t, time.monotonic() - run.t0))
        finally:
            await conn.execute("UPDATE public.bench_knob SET sleep_s = 0")
            await conn.close()
            run.extra["phases"] = phases


# -- the profile -----------------------------------------------------------------------------------

# Where a sample of the service goes: the first of these met from the innermost frame out.
SPY_PARTS = (
    ("gunzip", ("_gunzip",)),
    ("decode (msgspec + checks)", ("decode_batch",)),
    ("merge + sort rows (rows.py)", ("batch_rows",)),
    ("checks of merged rows", ("_finite_rows", "_bigint_rows")),
    ("COPY to temp tables (asyncpg)", ("copy_records_to_table",)),
    ("apply_batch + COMMIT (asyncpg)", ("fetchrow", "Transaction.", "Store.apply")),
    ("pool, admission", ("Pool.", "acquire", "release", "Store.run", "admitted")),
    ("metrics", ("prometheus_client",)),
    ("logging", ("logging/",)),
    ("HTTP: body, reply, h11, uvicorn", ("_read_body", "_reply", "_send", "h11/", "uvicorn/pro")),
)
LOOP_FRAMES = ("asyncio/runners.py", "uvloop/", "asyncio/base_events.py")


def read_spy(path: Path) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks: the share of the busy samples per part, and the
    functions with the most samples of their own."""
    parts: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return {"samples": 0}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        own[frames[-1].rsplit(":", 1)[0].replace(" (", " ") if frames else "?"] += count
        if any(k in frames[-1] for k in LOOP_FRAMES):
            parts["event loop (uvloop, in C: sockets, callbacks)"] += count
            continue
        for f in reversed(frames):
            part = next((p for p, keys in SPY_PARTS if any(k in f for k in keys)), None)
            if part is not None:
                parts[part] += count
                break
        else:
            parts["event loop, other"] += count
    return {
        "samples": total,
        "parts": {k: round(100 * v / total, 1) for k, v in parts.most_common()},
        "own": [(k, round(100 * v / total, 1)) for k, v in own.most_common(12)],
    }


async def statements(dsn: str, limit: int = 12) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        # Grouped by text: a statement on a temp table has a queryid per connection.
        rows = await conn.fetch(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g') AS query, sum(calls)::int8 AS calls,"
            " sum(total_exec_time)::float8 AS total_exec_time, sum(rows)::int8 AS rows,"
            " bool_or(toplevel) AS toplevel FROM pg_stat_statements WHERE dbid = (SELECT oid"
            " FROM pg_database WHERE datname = current_database()) AND query NOT LIKE '%pg_stat%'"
            " AND query NOT LIKE '%rollup_messages%'"
            " GROUP BY 1 ORDER BY 3 DESC"
        )
    finally:
        await conn.close()
    # apply_batch's own time includes its nested statements': the share is of the rest.
    total = sum(r["total_exec_time"] for r in rows if "apply_batch" not in r["query"]) or 1.0
    out = []
    for r in rows[:limit]:
        spent = r["total_exec_time"]
        out.append({
            "query": r["query"][:110], "calls": r["calls"], "rows": r["rows"],
            "total_ms": round(spent), "mean_ms": round(spent / max(1, r["calls"]), 2),
            "share_pct": round(100 * spent / total, 1),
        })  # fmt: skip
    return out


async def serial_steps(dsn: str, batches: list[Prepared], rollup: bool) -> dict[str, float]:
    """One connection, one batch at a time: ms per step of Store.apply's transaction."""
    conn = await asyncpg.connect(dsn)
    steps: dict[str, list[float]] = {"COPY (3 temp tables)": [], "apply_batch": [], "COMMIT": []}
    try:
        from edge_ingest.schema import TEMP_TABLES

        await conn.execute(TEMP_TABLES)
        for p in batches:
            t0 = time.monotonic()
            tx = conn.transaction()
            await tx.start()
            await conn.copy_records_to_table("in_counts", records=p.rows.counts)
            await conn.copy_records_to_table("in_numeric", records=p.rows.numeric)
            await conn.copy_records_to_table("in_categories", records=p.rows.categories)
            t1 = time.monotonic()
            await conn.fetchrow(
                "SELECT * FROM edge_ingest.apply_batch($1, $2, $3, $4, $5, $6, $7)",
                p.gateway, p.first_seq, p.last_seq, p.digest, p.chunks, p.messages, rollup,
            )  # fmt: skip
            t2 = time.monotonic()
            await tx.commit()
            t3 = time.monotonic()
            steps["COPY (3 temp tables)"].append(t1 - t0)
            steps["apply_batch"].append(t2 - t1)
            steps["COMMIT"].append(t3 - t2)
    finally:
        await conn.close()
    return {k: round(1000 * sorted(v)[len(v) // 2], 2) for k, v in steps.items() if v}


# -- the runs --------------------------------------------------------------------------------------


@dataclass
class Mode:
    gateways: int
    batches: int  # per gateway, in the throughput runs
    rounds: int  # ceiling/service pairs, alternating
    naive_batches: int
    naive_s: float
    naive_commit_s: float
    paced_batches: int
    truth_batches: int  # the back-pressure run's batches per gateway
    trouble: Trouble
    profile_batches: int
    limit_s: float  # any one run
    job_every_s: float
    pool_variant: bool  # also the ceiling and the service with twice the pool


FULL = Mode(
    gateways=200, batches=5, rounds=2, naive_batches=2, naive_s=20.0, naive_commit_s=8.0,
    paced_batches=4, truth_batches=5, trouble=Trouble(3.0, 5.0, 0.15, 3.0, 8.0),
    profile_batches=2, limit_s=90.0, job_every_s=5.0, pool_variant=True,
)  # fmt: skip
QUICK = Mode(
    gateways=40, batches=2, rounds=1, naive_batches=1, naive_s=3.0, naive_commit_s=1.0,
    paced_batches=2, truth_batches=2, trouble=Trouble(1.0, 2.0, 0.15, 1.0, 3.0),
    profile_batches=1, limit_s=30.0, job_every_s=2.0, pool_variant=False,
)  # fmt: skip


class Bench:
    def __init__(
        self, pg: PostgresCluster, work: Workload, mode: Mode, base: Path, compare: str | None
    ) -> None:
        self.pg, self.work, self.mode, self.base, self.compare = pg, work, mode, base, compare
        self.runs: dict[str, dict[str, Any]] = {}
        self.naive_runs: dict[str, dict[str, Any]] = {}
        self.series: dict[str, list[tuple[float, float, int]]] = {}
        self.facts: dict[str, Any] = {}

    def keep(self, key: str, run: Run, cpu: dict[str, Any], **more: Any) -> dict[str, Any]:
        doc = {**run.figures(), **cpu, **more}
        self.runs[key] = doc
        say(f"[ingest] {key}: {doc['chunks_per_s_steady']} chunks/s steady "
            f"({doc['chunks']:,} chunks, {doc['wall_s']} s), answers {doc['answers']}, "
            f"connections max {doc.get('connections_max')}, PG {doc['cpu_cores_postgres']} "
            f"cores, service {doc['cpu_cores_service']} cores")  # fmt: skip
        return doc

    async def ceiling(self, key: str, rollup: bool = True, pool: int = POOL) -> dict[str, Any]:
        dsn = await fresh_database(self.pg, "ceiling")
        wal = await wal_lsn(dsn)
        cpu = CpuMeter(self.pg)
        run = await run_ceiling(
            key, dsn, self.work, rollup=rollup, limit_s=self.mode.limit_s, pool=pool
        )
        used = cpu.stop(run.chunks)
        used["wal_bytes_per_chunk"] = round((await wal_lsn(dsn) - wal) / max(1, run.chunks))
        return self.keep(key, run, used, db=await db_counts(dsn))

    async def service(
        self,
        key: str,
        *,
        replicas: int = 1,
        extra: dict[str, str] | None = None,
        source: Path | None = None,
        batches: int | None = None,
        rate: float | None = None,
        during: Callable[[str, Run, Callable[[], bool]], Awaitable[None]] | None = None,
        setup: str | None = None,
        spy: Path | None = None,
        pool: int = POOL,
        limit_s: float | None = None,
    ) -> tuple[dict[str, Any], Run, str]:
        dsn = await fresh_database(self.pg, key.replace("-", "_"))
        if setup:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(setup)
            finally:
                await conn.close()
        services = await asyncio.to_thread(
            start_services, self.base / key, dsn, replicas, extra, source, pool
        )
        wal = await wal_lsn(dsn)
        spy_proc: subprocess.Popen[bytes] | None = None
        try:
            before = [await asyncio.to_thread(s.get, "/metrics") for s in services]
            if spy is not None and SPY.exists() and services[0].popen is not None:
                spy_proc = start_spy(services[0].popen.pid, spy)
                await asyncio.sleep(1.0)  # attached
            cpu = CpuMeter(self.pg, services)
            act = (lambda r, stop: during(dsn, r, stop)) if during is not None else None
            limit = self.mode.limit_s if limit_s is None else limit_s
            run = await run_http(key, dsn, self.work, services, limit_s=limit,
                                 batches=batches, rate=rate, during=act)  # fmt: skip
            used = cpu.stop(run.chunks)
            used["wal_bytes_per_chunk"] = round((await wal_lsn(dsn) - wal) / max(1, run.chunks))
            if spy_proc is not None:
                spy_proc.send_signal(2)  # SIGINT: py-spy writes what it recorded
                await asyncio.to_thread(spy_proc.wait, 30)
            after = [await asyncio.to_thread(s.get, "/metrics") for s in services]
        finally:
            if spy_proc is not None and spy_proc.poll() is None:
                spy_proc.kill()
            await asyncio.to_thread(stop_services, services)
        name = "edge_ingest_commit_seconds"
        hb = [histogram(t, name) for _, t in before]
        ha = [histogram(t, name) for _, t in after]
        merged_b = {le: sum(h.get(le, 0.0) for h in hb) for le in ha[0]} if ha else {}
        merged_a = {le: sum(h.get(le, 0.0) for h in ha) for le in ha[0]} if ha else {}
        causes = {
            c: int(
                sum(unavailable(t, c) for _, t in after) - sum(unavailable(t, c) for _, t in before)
            )
            for c in CAUSES
        }
        used["unavailable"] = {c: n for c, n in causes.items() if n}
        doc = self.keep(key, run, used, db=await db_counts(dsn),
                        commit_p50_le_s=histogram_pct(merged_b, merged_a, 50),
                        commit_p99_le_s=histogram_pct(merged_b, merged_a, 99))  # fmt: skip
        self.series[key] = run.series()
        return doc, run, dsn

    async def naive(self) -> None:
        dsn = await fresh_database(self.pg, "naive")
        for key, autocommit, limit in (
            ("naive-autocommit", True, self.mode.naive_commit_s),
            ("naive", False, self.mode.naive_s),
        ):
            cpu = CpuMeter(self.pg)
            run = await run_naive(dsn, self.work, limit, autocommit=autocommit)
            doc = {**run.figures(), **cpu.stop(max(1, run.messages))}
            doc["messages_per_s_steady"] = rnd(naive_rate(run), 0)
            doc["messages_per_s_overall"] = rnd(run.messages / run.wall if run.wall else None, 0)
            for k in list(doc):
                if k.startswith("cpu_us_per_chunk"):
                    doc[k.replace("per_chunk", "per_message")] = doc.pop(k)
            self.naive_runs[key] = doc
            say(
                f"[ingest] {key}: {doc['messages_per_s_steady']} messages/s steady, "
                f"{doc['messages_per_s_overall']} overall ({doc['messages']:,} messages), "
                f"connections max {doc['connections_max']}"
            )
        self.facts["naive_reads"] = await naive_reads(dsn, self.mode.gateways)
        await asyncio.to_thread(self.pg.drop_database, "naive")


def start_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` until SIGINT, raw (collapsed) stacks into `out`."""
    args = [str(SPY), "record", "--pid", str(pid), "--rate", "100", "--format", "raw",
            "--output", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_services(
    base: Path,
    dsn: str,
    n: int,
    extra: dict[str, str] | None = None,
    source: Path | None = None,
    pool: int = POOL,
) -> list[Ingest]:
    """n replicas of `edge-ingest serve` (`pool` connections each); from `source` (a directory
    holding the edge_ingest package) instead of the installed one if given."""
    out: list[Ingest] = []
    try:
        for i in range(n):
            s = Ingest(base / f"replica-{i}", dsn, pool=pool, token=TOKEN, extra=extra)
            if source is not None:
                assert s._env is not None
                s._env["PYTHONPATH"] = str(source)
            out.append(s.start())
            s.wait_ready(timeout_s=30)
    except BaseException:
        stop_services(out)
        raise
    return out


def mean(xs: Iterable[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def source_at(base: Path, rev: str) -> tuple[Path, str]:
    """edge_ingest as committed at `rev` (`git archive`, read-only), to run the service of
    another commit in the same run; and that commit's one-line description."""
    out = base / "compare"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "ingest/edge_ingest"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True, timeout=60)
    line = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s", rev],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    return out / "ingest", line


async def measure(b: Bench) -> None:
    m, pg = b.mode, b.pg
    # 1. Throughput: the direct ceiling and the service, alternating (machine noise hits both).
    # The rollup off between the two rounds: its on/off pairs are neighbours in time too.
    for r in range(1, m.rounds + 1):
        await b.ceiling(f"ceiling-{r}")
        await b.service(f"service-{r}")
        await asyncio.to_thread(pg.drop_database, f"service_{r}")
        if r == 1:
            await b.ceiling("ceiling-rollup-off", rollup=False)
            await b.service("service-rollup-off", extra={"rollup": "false"})
            await asyncio.to_thread(pg.drop_database, "service_rollup_off")
    # 2. Connections with two replicas.
    await b.service("replicas", replicas=2)
    await asyncio.to_thread(pg.drop_database, "replicas")
    # 2b. What a bigger pool does (full mode): the commit's fsync wait is idle time.
    if m.pool_variant:
        await b.ceiling(f"ceiling-pool-{2 * POOL}", pool=2 * POOL)
        await b.service(f"service-pool-{2 * POOL}", pool=2 * POOL)
        await asyncio.to_thread(pg.drop_database, f"service_pool_{2 * POOL}")
    # 3. The naive design.
    await b.naive()
    # 4. The rollup off with a scheduled job instead.
    durations: list[float] = []
    await b.service(
        "service-scheduled-rollup", extra={"rollup": "false"},
        during=lambda dsn, run, stop: scheduled_rollup(dsn, m.job_every_s, stop, durations),
    )  # fmt: skip
    b.facts["job_s"] = [round(d, 3) for d in durations]
    await asyncio.to_thread(pg.drop_database, "service_scheduled_rollup")
    await asyncio.to_thread(pg.drop_database, "ceiling")
    # 5. The service of another commit (--compare-with), same load.
    if b.compare is not None:
        source, line = source_at(b.base, b.compare)
        b.facts["compare"] = line
        await b.service("service-compared", source=source, limit_s=min(60.0, m.limit_s))
        await asyncio.to_thread(pg.drop_database, "service_compared")
    # 6. Latency and dashboards at 80 %.
    ceiling = mean(b.runs[f"ceiling-{r}"]["chunks_per_s_steady"] for r in range(1, m.rounds + 1))
    service = mean(b.runs[f"service-{r}"]["chunks_per_s_steady"] for r in range(1, m.rounds + 1))
    assert ceiling is not None and service is not None
    rate = 0.8 * min(ceiling, service)
    b.facts.update(pace_rate=round(rate), pace_basis="ceiling" if ceiling <= service else "service")
    dash = Dashboard("", m.gateways)

    async def dashboards(dsn: str, run: Run, stop: Callable[[], bool]) -> None:
        dash.dsn = dsn
        await dash.loop(stop, 0.1, 100_000)

    _, _, dsn = await b.service("paced", batches=m.paced_batches, rate=rate, during=dashboards)
    b.facts["dashboard_loaded"] = dash.figures()
    idle = Dashboard(dsn, m.gateways)
    await idle.loop(lambda: False, 0.05, 80)
    b.facts["dashboard_idle"] = idle.figures()
    await asyncio.to_thread(pg.drop_database, "paced")
    # 7. Back-pressure: slow, then stalled; every chunk once.
    trouble = m.trouble
    _, _, dsn = await b.service(
        "backpressure", batches=m.truth_batches, setup=SLOW_SQL,
        during=lambda dsn, run, stop: trouble.act(dsn, run),
    )  # fmt: skip
    conn = await asyncpg.connect(dsn)
    try:
        diffs = b.work.truth.differences(await db_totals(conn))
    finally:
        await conn.close()
    b.facts["truth"] = {
        "keys": len(b.work.truth.table), "batches": b.work.truth.batches,
        "messages": b.work.truth.messages, "differences": len(diffs), "first": diffs[:5],
    }  # fmt: skip
    say(f"[ingest] back-pressure: {len(diffs)} differences with the truth "
        f"({len(b.work.truth.table):,} keys, {b.work.truth.messages:,} messages)")  # fmt: skip
    await asyncio.to_thread(pg.drop_database, "backpressure")
    # 8. Where the time goes: py-spy on the service, pg_stat_statements on the server.
    sql = "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"
    await asyncio.to_thread(pg.psql, sql)
    await asyncio.to_thread(pg.restart)
    await asyncio.to_thread(pg.psql, "ALTER SYSTEM SET pg_stat_statements.track = 'all'")
    await asyncio.to_thread(pg.psql, "SELECT pg_reload_conf()")
    spy = b.base / "py-spy.txt"
    _, _, dsn = await b.service(
        "profile", batches=m.profile_batches, spy=spy,
        setup="CREATE EXTENSION pg_stat_statements; SELECT pg_stat_statements_reset();",
    )  # fmt: skip
    b.facts["py_spy"] = read_spy(spy)
    b.facts["statements"] = await statements(dsn)
    nxt = [g[m.profile_batches] for g in b.work.gateways[:40] if len(g) > m.profile_batches]
    b.facts["serial_ms"] = await serial_steps(dsn, nxt[:20], rollup=True)
    b.facts["serial_ms_rollup_off"] = await serial_steps(dsn, nxt[20:], rollup=False)
    await asyncio.to_thread(pg.drop_database, "profile")


async def pg_settings(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT name, current_setting(name) AS value, source FROM pg_settings"
            " WHERE name = any($1::text[])",
            list(PG_SETTINGS),
        )
    finally:
        await conn.close()
    out = {r["name"]: f"{r['value']} ({r['source']})" for r in rows}
    return {k: out[k] for k in PG_SETTINGS if k in out}


# -- the report ------------------------------------------------------------------------------------


def n0(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def x2(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def ratio_of(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def verdict(ok: bool | None) -> str:
    return {True: "meets", False: "**misses**", None: "-"}[ok]


def recovery(doc: dict[str, Any]) -> dict[str, Any]:
    """From the back-pressure run's series (one bin per second, [t, t + 1)): the mean rate
    before the trouble, in each phase and after it, and how long after the stall ended the
    rate was back to half of the rate before (the end of the first such bin)."""
    series = doc["series"]
    phases = {name: (a, b) for name, a, b in doc["phases"]}
    out: dict[str, Any] = {}
    if "slow" not in phases or "stalled" not in phases:
        return out
    (s0, s1), (l0, l1) = phases["slow"], phases["stalled"]

    def rate(lo: float, hi: float) -> float | None:
        return mean(c for t, c, _ in series if t >= lo and t + 1 <= hi)

    out["before"] = rate(1.0, s0)
    out["slow"] = rate(s0 + 1.0, s1)
    out["between"] = rate(s1 + 1.0, l0)
    out["stalled"] = rate(l0 + 1.0, l1)
    out["after"] = rate(l1 + 3.0, doc["wall_s"] - 1.0)
    base = out["before"]
    back = next((t + 1 - l1 for t, c, _ in series
                 if t >= math.floor(l1) and base and c >= 0.5 * base), None)  # fmt: skip
    out["back_after_s"] = None if back is None else round(back, 1)
    return out


def report(doc: dict[str, Any]) -> str:
    runs, facts, mode, m = doc["runs"], doc["facts"], doc["mode"], doc["machine"]
    rounds = mode["rounds"]
    ceil = [runs[f"ceiling-{r}"]["chunks_per_s_steady"] for r in range(1, rounds + 1)]
    serv = [runs[f"service-{r}"]["chunks_per_s_steady"] for r in range(1, rounds + 1)]
    ratios = [s / c if s and c else None for s, c in zip(serv, ceil, strict=True)]
    ratio = mean(ratios)
    # CPU per chunk of the processes on the path (PostgreSQL, service, client): contention on
    # the shared machine changes how much CPU a run gets far more than what a chunk costs.
    rs = range(1, rounds + 1)
    cpu_c = mean(runs[f"ceiling-{r}"]["cpu_us_per_chunk_postgres"]
                 + runs[f"ceiling-{r}"]["cpu_us_per_chunk_bench"] for r in rs)  # fmt: skip
    cpu_s = mean(runs[f"service-{r}"]["cpu_us_per_chunk_postgres"]
                 + runs[f"service-{r}"]["cpu_us_per_chunk_service"]
                 + runs[f"service-{r}"]["cpu_us_per_chunk_bench"] for r in rs)  # fmt: skip
    ratio_cpu = ratio_of(cpu_c, cpu_s)
    cores = m["nproc"]
    got = mean(sum(runs[f"{k}-{r}"][f"cpu_cores_{p}"] for p in ("postgres", "service", "bench"))
               for k in ("service",) for r in rs)  # fmt: skip
    got_c = mean(sum(runs[f"ceiling-{r}"][f"cpu_cores_{p}"] for p in ("postgres", "bench"))
                 for r in rs)  # fmt: skip
    service = mean(serv)
    conns1 = max(runs[f"service-{r}"]["connections_max"] for r in range(1, rounds + 1))
    conns2 = runs["replicas"]["connections_max"]
    paced = runs["paced"]
    dl, di = facts["dashboard_loaded"], facts["dashboard_idle"]
    bp = runs["backpressure"]
    rec = recovery({**bp, "series": doc["series"]["backpressure"]})
    truth = facts["truth"]
    no_retry_after = bp["retry_after"].get("", 0)
    refused = bp["answers"].get("503", 0)
    naives = doc["naive_runs"]
    naive = naives["naive"]
    on, off = runs["service-1"], runs["service-rollup-off"]
    sched = runs["service-scheduled-rollup"]
    job = facts.get("job_s", [])
    load0, load1 = doc["loadavg_start"], doc["loadavg_end"]
    w = doc["workload"]
    L: list[str] = []
    add = L.append
    add("# edge-ingest under load (issue #22)")
    add("")
    add(f"`{doc['command']}` on {doc['date']}, **{doc['mode_name']} mode**, "
        f"{doc['wall_s']:.0f} s; machine: {m['nproc']} × {m['cpu_model']}, {m['ram_gib']} GiB, "
        f"kernel {m['kernel']}, Python {m['python']}, PostgreSQL "
        f"{doc['pg']['server_version'].split()[0]} (Debian); an 8 KiB write + fdatasync on "
        f"its disk: p50 {doc['fsync_ms']} ms; edge-ingest code: {doc['code']}.")  # fmt: skip
    add("")
    add(f"The machine is shared: load average {load0[0]:.2f}, {load0[1]:.2f}, {load0[2]:.2f} "
        f"when the run started and {load1[0]:.2f}, {load1[1]:.2f}, {load1[2]:.2f} when it "
        f"ended; the whole machine was {doc['busy_pct']:.0f} % busy during the run (steal "
        f"{doc['steal_pct']:.1f} %), this benchmark's own processes (PostgreSQL, the service, "
        "the client) included. Every figure therefore comes with its baseline measured in the "
        "same run, and the ceiling and the service alternate.")  # fmt: skip
    add("")
    add(f"Workload: {mode['gateways']} simulated gateways (devtools/gateways.py, seeded), each "
        f"replaying a backlog of {mode['batches']} batches of {CHUNKS_PER_BATCH} chunks (the "
        "agent's `forward.max_batch_chunks`) back to back over one keep-alive connection: the "
        "next batch only after a 200, a 503 waits its Retry-After, no answer within 10 s is "
        f"retried after 0.5 s. {w['chunks']:,.0f} chunks per run, {w['messages_per_chunk']:.2f}"
        f" messages per chunk; a batch is {w['gzip_bytes_per_batch'] / 1024:.0f} KiB gzipped "
        f"and becomes {w['rows_per_batch']:.0f} rows ({w['count_rows_per_batch']:.0f} counts, "
        f"{w['numeric_rows_per_batch']:.0f} numeric, {w['category_rows_per_batch']:.0f} "
        f"categories) plus {w['rollup_rows_per_batch']:.0f} per-minute rows. Event times lie "
        "in the last half hour (today's partitions). One replica, pool "
        f"{POOL} (the default), unless said otherwise; a fresh database for every run. "
        "Rates are *steady*: chunks merged between the moments 10 % and 90 % of the run's "
        "chunks were merged (the start and the ragged end left out); the overall rate "
        "(all chunks / wall time) is in the tables too.")  # fmt: skip
    add("")
    add("## Targets")
    add("")
    add("| figure | target | measured | baseline (same run) | verdict |")
    add("|---|---|---|---|---|")
    add(f"| Throughput, {mode['gateways']} gateways replaying at once, end to end (HTTP, gzip, "
        f"decode, PostgreSQL) | ≥ 40,000 chunks/s | {n0(service)} chunks/s (rounds: "
        f"{', '.join(n0(x) for x in serv)}) | ceiling (Store.apply, same SQL and pool, no "
        f"HTTP): {n0(mean(ceil))} chunks/s (rounds: {', '.join(n0(x) for x in ceil)}) | "
        f"{verdict(service is not None and service >= 40_000)} |")  # fmt: skip
    add(f"| Service / ceiling | ≥ 0.7 | {x2(ratio)} (rounds: "
        f"{', '.join(x2(x) for x in ratios)}) | | "
        f"{verdict(ratio is not None and ratio >= 0.7)} |")  # fmt: skip
    add(f"| Service / ceiling in CPU: chunks per CPU-second of PostgreSQL + service + client "
        f"(what a dedicated, CPU-bound machine would show) | ≥ 0.7 | {x2(ratio_cpu)}: "
        f"{cpu_s:.1f} µs of CPU per chunk end to end against {cpu_c:.1f} | {cores} cores "
        f"wholly for it: ≤ {n0(cores * 1e6 / cpu_s if cpu_s else None)} chunks/s end to end, "
        f"≤ {n0(cores * 1e6 / cpu_c if cpu_c else None)} ceiling; this run's service runs got "
        f"{got:.2f} cores, its ceiling runs {got_c:.2f} | "
        f"{verdict(ratio_cpu is not None and ratio_cpu >= 0.7)} |")  # fmt: skip
    add(f"| Database connections during the {mode['gateways']}-gateway runs, one replica "
        f"(pg_stat_activity every {SAMPLE_S * 1000:.0f} ms) | ≤ pool = {POOL} | max {conns1} | "
        f"naive design: {naive['connections_max']} | {verdict(conns1 <= POOL)} |")  # fmt: skip
    add(f"| The same, two replicas | ≤ 2 × pool = {2 * POOL} | max {conns2} "
        f"({n0(runs['replicas']['chunks_per_s_steady'])} chunks/s) | | "
        f"{verdict(conns2 <= 2 * POOL)} |")  # fmt: skip
    add(f"| p99 answer latency (client: send → 200) at {n0(facts['pace_rate'])} chunks/s = "
        f"80 % of the {facts['pace_basis']}'s rate | (report) | p99 "
        f"{ms(paced['latency_p99_s'])} ms, p50 {ms(paced['latency_p50_s'])} ms; service's "
        f"`edge_ingest_commit_seconds` p99 ≤ {paced['commit_p99_le_s']} s | "
        f"achieved {n0(paced['chunks_per_s_overall'])} chunks/s | - |")  # fmt: skip
    add(f"| p99 of a dashboard query on `edge_ingest.per_minute` while ingesting at 80 % | "
        f"(report) | one gateway's last hour {dl['one_gateway_p99_ms']} ms, all gateways' "
        f"{dl['all_gateways_p99_ms']} ms | idle database, same data: {di['one_gateway_p99_ms']}"
        f" ms, {di['all_gateways_p99_ms']} ms | - |")  # fmt: skip
    add(f"| Rollup in the ingest transaction: cost on writes | (report) | on "
        f"{n0(on['chunks_per_s_steady'])}, off {n0(off['chunks_per_s_steady'])}, off + "
        f"scheduled job {n0(sched['chunks_per_s_steady'])} chunks/s | ceiling on "
        f"{n0(runs['ceiling-1']['chunks_per_s_steady'])}, off "
        f"{n0(runs['ceiling-rollup-off']['chunks_per_s_steady'])} | - |")  # fmt: skip
    exact = truth["differences"] == 0 and bp["batches"] == bp["batches_wanted"]
    add(f"| Back-pressure: database slow, then stalled | 503 + Retry-After, nothing lost or "
        f"doubled, throughput back | {refused:,} × 503 ({no_retry_after} without Retry-After); "
        f"{truth['differences']} differences with the truth over {truth['keys']:,} keys; back "
        f"to half the earlier rate {rec.get('back_after_s')} s after the stall | before "
        f"{n0(rec.get('before'))}, slow {n0(rec.get('slow'))}, between "
        f"{n0(rec.get('between'))}, stalled {n0(rec.get('stalled'))}, after "
        f"{n0(rec.get('after'))} chunks/s | "
        f"{verdict(exact and no_retry_after == 0 and refused > 0 and rec.get('back_after_s') is not None)} |")  # noqa: E501  # fmt: skip
    add("")
    add("## Throughput, run by run")
    add("")
    add("CPU in cores (1.0 = one core) over the run, and in µs per chunk merged; PostgreSQL "
        "is the postmaster and all its processes, the service is `edge-ingest serve` (both "
        "replicas for `replicas`), the client is this benchmark's process (HTTP client, or "
        "Store.apply for the ceiling).")  # fmt: skip
    add("")
    add("| run | chunks/s steady | overall | wall | answers | conns max | PG cores | service "
        "cores | client cores | PG µs/chunk | service µs/chunk | client µs/chunk | WAL B/chunk "
        "| machine busy |")  # fmt: skip
    add("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in runs.items():
        answers = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["answers"].items()))
        if r.get("unavailable"):
            answers += " (" + ", ".join(f"{k} {v:,}" for k, v in r["unavailable"].items()) + ")"
        add(f"| {key} | {n0(r['chunks_per_s_steady'])} | {n0(r['chunks_per_s_overall'])} | "
            f"{r['wall_s']} s | {answers} | {r.get('connections_max')} | "
            f"{r['cpu_cores_postgres']} | {r['cpu_cores_service']} | {r['cpu_cores_bench']} | "
            f"{r['cpu_us_per_chunk_postgres']} | {r['cpu_us_per_chunk_service']} | "
            f"{r['cpu_us_per_chunk_bench']} | {r.get('wal_bytes_per_chunk')} | "
            f"{r['machine_busy_pct']} % |")  # fmt: skip
    add("")
    add("`ceiling-*` and `service-*` alternate; `service-compared` (with --compare-with) is "
        "edge_ingest as committed at another commit, under the same load (at most 60 s); "
        "`paced`, `backpressure` and `profile` send fewer batches per gateway (the first "
        "few), `profile` under py-spy and with pg_stat_statements loaded.")  # fmt: skip
    add("")
    if "service-compared" in runs:
        h = runs["service-compared"]
        add(f"## This service against edge_ingest at {facts['compare']}, same run")
        add("")
        add("| run | chunks/s steady | 503s | service µs/chunk | PG µs/chunk | p50 / p99 answer |")
        add("|---|---:|---:|---:|---:|---:|")
        for key in [f"service-{r}" for r in range(1, rounds + 1)] + ["service-compared"]:
            r = runs[key]
            add(f"| {key} | {n0(r['chunks_per_s_steady'])} | {r['answers'].get('503', 0):,} | "
                f"{r['cpu_us_per_chunk_service']} | {r['cpu_us_per_chunk_postgres']} | "
                f"{ms(r['latency_p50_s'])} / {ms(r['latency_p99_s'])} ms |")  # fmt: skip
        add("")
        add(f"service-compared / ceiling: {x2(ratio_of(h['chunks_per_s_steady'], mean(ceil)))}; "
            f"it merged {h['chunks']:,} of {h['batches_wanted'] * CHUNKS_PER_BATCH:,} chunks in "
            f"{h['wall_s']} s.")  # fmt: skip
        add("")
    add("## What pre-aggregation and the pool buy: the naive design")
    add("")
    add("The naive design writes a row per camera message (each chunk expanded into its "
        "`count` messages: event times spread over the chunk, `conf` at its mean, `cls` by "
        "its counts) into one table with one index (gateway, camera, stream, ts), over a "
        f"connection per gateway ({mode['gateways']}), by executemany in one transaction per "
        f"batch (at most {mode['naive_s']:.0f} s, {mode['naive_batches']} batches per gateway), "
        "or with a commit per message (at most "
        f"{mode['naive_commit_s']:.0f} s) -- and without HTTP at all: an upper bound of that "
        "design (its gateways would send every message, not chunks, through the same HTTP and "
        "decoding as edge-ingest's). Nor does it make anything exactly once: a retried batch is "
        "stored twice. Per million camera messages:")  # fmt: skip
    add("")
    add("| design | chunks | HTTP requests | transactions | rows written | DB connections "
        "(max seen) | messages/s | PostgreSQL µs CPU per message |")  # fmt: skip
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    mpc = w["messages_per_chunk"]
    rows_per_chunk = (w["rows_per_batch"] + w["rollup_rows_per_batch"]) / CHUNKS_PER_BATCH
    for key, label in (("service-1", "edge-ingest service"),
                       ("ceiling-1", "edge-ingest SQL direct (ceiling, no HTTP)")):  # fmt: skip
        r = runs[key]
        per = 1e6 / r["messages"] if r["messages"] else 0.0
        reqs = n0(sum(r["answers"].values()) * per) if key.startswith("service") else "-"
        refused = r["answers"].get("503", 0) * per
        add(f"| {label} | {n0(r['chunks'] * per)} | {reqs}"
            f"{f' (503s: {n0(refused)})' if refused else ''} | {n0(r['batches'] * per)} | "
            f"{n0(rows_per_chunk * r['chunks'] * per)} upserts | {r['connections_max']} | "
            f"{n0(r['messages_per_s_steady'])} | "
            f"{r['cpu_us_per_chunk_postgres'] / mpc:.1f} |")  # fmt: skip
    for key, label in (("naive", "naive, a transaction per batch"),
                       ("naive-autocommit", "naive, a commit per message")):  # fmt: skip
        r = naives[key]
        per = 1e6 / r["messages"] if r["messages"] else 0.0
        tx = r["batches"] * per if key == "naive" else 1e6
        add(f"| {label} | - | - | {n0(tx)} | 1,000,000 inserts | {r['connections_max']} | "
            f"{n0(r['messages_per_s_steady'])} (overall {n0(r['messages_per_s_overall'])}) | "
            f"{r.get('cpu_us_per_message_postgres')} |")  # fmt: skip
    add("")
    nr = facts["naive_reads"]
    add(f"The naive runs: {naive['messages']:,} messages in {naive['wall_s']} s (PostgreSQL "
        f"{naive['cpu_cores_postgres']} cores, client {naive['cpu_cores_bench']} cores; one "
        f"batch's transaction p50 {ms(naive['latency_p50_s'])} ms, p99 "
        f"{ms(naive['latency_p99_s'])} ms), and with a commit per message "
        f"{naives['naive-autocommit']['messages']:,} messages in "
        f"{naives['naive-autocommit']['wall_s']} s. Reading them back costs too: the "
        f"dashboard's per-minute queries on the {nr['rows']:,} naive rows (idle) took p50 "
        f"{nr['one_gateway_p50_ms']} ms for one gateway's last hour and "
        f"{nr['all_gateways_p50_ms']} ms for all gateways', against "
        f"{di['one_gateway_p50_ms']} ms and {di['all_gateways_p50_ms']} ms on edge-ingest's "
        f"rollup (idle, {paced['chunks'] * mpc:,.0f} messages: the `paced` run's).")  # fmt: skip
    add("")
    add("## Latency and dashboards at 80 %")
    add("")
    add(f"The gateways paced to {n0(facts['pace_rate'])} chunks/s in all (80 % of the lower of "
        f"the ceiling, {n0(mean(ceil))}, and the service's own rate, {n0(service)}; here: the "
        f"{facts['pace_basis']}'s), each sending one batch every "
        f"{mode['gateways'] * CHUNKS_PER_BATCH / facts['pace_rate']:.2f} s, staggered, "
        f"{mode['paced_batches']} batches each. Achieved {n0(paced['chunks_per_s_overall'])} "
        f"chunks/s; answers {paced['answers']}.")  # fmt: skip
    add("")
    add("| | p50 | p99 | max |")
    add("|---|---:|---:|---:|")
    add(f"| answer latency, client (send → 200) | {ms(paced['latency_p50_s'])} ms | "
        f"{ms(paced['latency_p99_s'])} ms | {ms(paced['latency_max_s'])} ms |")  # fmt: skip
    add(f"| `edge_ingest_commit_seconds` (connection taken → COMMIT returned; bucket bound) | "
        f"≤ {paced['commit_p50_le_s']} s | ≤ {paced['commit_p99_le_s']} s | |")  # fmt: skip
    add(f"| dashboard: one gateway, last hour per minute ({dl['one_gateway_n']} queries, "
        f"{dl['one_gateway_minutes']} minutes) | {dl['one_gateway_p50_ms']} ms | "
        f"{dl['one_gateway_p99_ms']} ms | |")  # fmt: skip
    add(f"| dashboard: all gateways, last hour per minute ({dl['all_gateways_n']} queries, "
        f"{dl['all_gateways_minutes']} minutes) | {dl['all_gateways_p50_ms']} ms | "
        f"{dl['all_gateways_p99_ms']} ms | |")  # fmt: skip
    add(f"| the same two on the idle database afterwards ({di['one_gateway_n']} + "
        f"{di['all_gateways_n']} queries) | {di['one_gateway_p50_ms']} ms, "
        f"{di['all_gateways_p50_ms']} ms | {di['one_gateway_p99_ms']} ms, "
        f"{di['all_gateways_p99_ms']} ms | |")  # fmt: skip
    add("")
    add("```sql")
    add(Q_ONE + ";")
    add(Q_ALL + ";")
    add("```")
    add("")
    add("## The per-minute rollup: in the transaction, off, or a scheduled job")
    add("")
    add("| run | chunks/s steady | PG µs/chunk | service µs/chunk |")
    add("|---|---:|---:|---:|")
    for key in ("ceiling-1", "ceiling-rollup-off", "service-1", "service-rollup-off",
                "service-scheduled-rollup"):  # fmt: skip
        r = runs[key]
        add(f"| {key} | {n0(r['chunks_per_s_steady'])} | {r['cpu_us_per_chunk_postgres']} | "
            f"{r['cpu_us_per_chunk_service']} |")  # fmt: skip
    add("")
    add(f"The scheduled job (`service-scheduled-rollup`: the service with the rollup off, and "
        f"every {mode['job_every_s']:.0f} s one transaction rebuilding the per-minute rows of "
        "the last two hours of event time from the raw rows, `INSERT … SELECT … GROUP BY … ON "
        f"CONFLICT DO UPDATE`) ran {len(job)} times, "
        f"{', '.join(f'{x:.2f}' for x in job[:12])}{' …' if len(job) > 12 else ''} s "
        f"(the last one after the load, catching up); afterwards the rollup held "
        f"{sched['db']['rollup_messages']:,} of {sched['db']['messages']:,} messages. Its "
        "rollup lags by up to the period plus a run, and each run rescans the whole window: "
        "its cost grows with the data kept in the window, not with what changed.")  # fmt: skip
    add("")
    add("## Back-pressure: the database slow, then stalled")
    add("")
    tr = mode["trouble"]
    add(f"{mode['gateways']} gateways, {mode['truth_batches']} batches each. From "
        f"{tr['after_s']:.0f} s for {tr['slow_s']:.0f} s a trigger on edge_ingest.gateways "
        f"sleeps {tr['sleep_s']} s per watermark update (two per batch: every transaction is "
        f"slow); {tr['between_s']:.0f} s later a transaction holds `LOCK TABLE "
        f"edge_ingest.gateways IN EXCLUSIVE MODE` for {tr['stall_s']:.0f} s (every batch "
        "waits for it until lock_timeout, 5 s). Answers: "
        f"{', '.join(f'{k}: {v:,}' for k, v in sorted(bp['answers'].items()))} (the 503s by "
        f"cause, from the service's counters: {bp.get('unavailable')}); Retry-After "
        f"values {bp['retry_after']}; batches applied {bp['batches']:,} of "
        f"{bp['batches_wanted']:,}; the database counted {bp['db']['batches']:,} batches, "
        f"{bp['db']['replays']} replays, {bp['db']['messages']:,} messages against the "
        f"truth's {truth['messages']:,}. `devtools.gateways.Truth` against `db_totals`: "
        f"**{truth['differences']} differences** over {truth['keys']:,} (gateway, camera, "
        "stream, second) keys (count, n, sum of conf, every class count).")  # fmt: skip
    if truth["first"]:
        add("")
        add("First differences: " + "; ".join(truth["first"]))
    add("")
    add("| t (s) | phase | chunks/s | 503s |")
    add("|---:|---|---:|---:|")
    phases = bp.get("phases", [])
    for t, c, r in doc["series"]["backpressure"]:
        ph = next((n for n, a, b in phases if a <= t + 0.5 < b), "")
        add(f"| {t:.0f} | {ph} | {n0(c)} | {r} |")
    add("")
    add("## Where the time goes")
    add("")
    spy = facts["py_spy"]
    add(f"The service under py-spy (100 Hz, {spy.get('samples', 0):,} samples of the busy "
        "thread; idle samples are not counted), by the innermost part of the code a sample "
        "was in:")  # fmt: skip
    add("")
    add("| part | share of busy samples |")
    add("|---|---:|")
    for k, v in spy.get("parts", {}).items():
        add(f"| {k} | {v} % |")
    add("")
    add("Functions with the most samples of their own: " + "; ".join(
        f"`{k}` {v} %" for k, v in spy.get("own", [])[:10]) + ".")  # fmt: skip
    add("")
    add("PostgreSQL (pg_stat_statements, track = all, during the `profile` run; nested "
        "statements of apply_batch listed on their own):")  # fmt: skip
    add("")
    add("| statement | calls | rows | total ms | mean ms | share (of all but apply_batch, "
        "which includes its statements) |")  # fmt: skip
    add("|---|---:|---:|---:|---:|---:|")
    for st in facts["statements"]:
        add(f"| `{st['query']}` | {st['calls']:,} | {st['rows']:,} | {st['total_ms']:,} | "
            f"{st['mean_ms']} | {st['share_pct']} % |")  # fmt: skip
    add("")
    steps = facts["serial_ms"]
    add("One batch alone on one connection (median of 20, ms): " + ", ".join(
        f"{k} {v}" for k, v in steps.items()) + "; with the rollup off (20 other batches): "
        + ", ".join(f"{k} {v}" for k, v in facts.get("serial_ms_rollup_off", {}).items())
        + ".")  # fmt: skip
    add("")
    add("## PostgreSQL settings")
    add("")
    add(
        "A private cluster (devtools/postgres.py) on the working directory's disk, durable: "
        "the server's defaults except `max_connections` (raised from 100 so that the naive "
        "design's connection per gateway fits; every other run uses at most "
        f"{2 * POOL + 3}), and for the `profile` run only, after a restart, "
        "`shared_preload_libraries = pg_stat_statements`, `pg_stat_statements.track = all`."
    )
    add("")
    add("| setting | value (source) |")
    add("|---|---|")
    for k, v in doc["pg"].items():
        add(f"| {k} | {v} |")
    add("")
    return "\n".join(L) + "\n"


def code_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "ingest/edge_ingest"], capture_output=True, text=True,
                               timeout=10).stdout.strip()  # fmt: skip
        return f"commit {head}" + (" + uncommitted changes in ingest/edge_ingest" if dirty else "")
    return "?"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m bench.ingest", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    p.add_argument(
        "--out", type=Path, help="the report (default: bench/INGEST.md in full mode, none in quick)"
    )
    p.add_argument("--json-out", type=Path, help="also write every figure here")
    p.add_argument(
        "--compare-with",
        metavar="REV",
        help="also run the service of this commit (git archive) under the same load",
    )
    p.add_argument("--report-from", type=Path, metavar="JSON",
                   help="only write the report again from a --json-out file")  # fmt: skip
    a = p.parse_args(argv)
    if a.report_from is not None:
        out = a.out or ROOT / "bench" / "INGEST.md"
        out.write_text(report(json.loads(a.report_from.read_text())))
        say(f"[ingest] wrote {out} from {a.report_from}")
        return 0
    mode = QUICK if a.quick else FULL
    base = OUT / "ingest"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    started, load0, machine = time.time(), os.getloadavg(), machine_description()
    meter = MachineLoad()
    fsync = fsync_ms(base)
    work = prepare(mode.gateways, mode.batches, mode.truth_batches, mode.naive_batches)
    say(f"[ingest] {mode.gateways} gateways x {mode.batches} batches prepared in "
        f"{work.seconds:.1f} s; load average {load0[0]:.2f}")  # fmt: skip
    with PostgresCluster.create(base / "pg", max_connections=MAX_CONNECTIONS) as pg:
        settings = uvloop.run(pg_settings(pg.dsn()))
        bench = Bench(pg, work, mode, base, a.compare_with)
        uvloop.run(measure(bench))
    busy, steal = meter.read()
    doc: dict[str, Any] = {
        "command": " ".join(["python -m bench.ingest", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "mode_name": "quick" if a.quick else "full", "mode": dataclasses.asdict(mode),
        "wall_s": time.time() - started, "machine": machine, "code": code_version(),
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "busy_pct": busy,
        "steal_pct": steal, "pg": settings, "workload": work.sizes(),
        "prepare_s": round(work.seconds, 1), "runs": bench.runs, "facts": bench.facts,
        "naive_runs": bench.naive_runs, "fsync_ms": fsync,
        "series": {k: v for k, v in bench.series.items() if k == "backpressure"},
    }  # fmt: skip
    doc["runs"]["backpressure"]["phases"] = bench.runs["backpressure"].get("phases", [])
    write_json(a.json_out, doc)
    out = a.out if a.out is not None else (None if a.quick else ROOT / "bench" / "INGEST.md")
    if out is not None:
        out.write_text(report(doc))
        say(f"[ingest] wrote {out}")
    say(f"[ingest] done in {doc['wall_s']:.0f} s; load average {doc['loadavg_end'][0]:.2f}")
    return 0 if bench.facts["truth"]["differences"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

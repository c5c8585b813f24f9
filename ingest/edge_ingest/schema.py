"""The database schema, versioned: every table, view and function edge-ingest uses.

`migrate` is idempotent and refuses a database whose schema is newer than this code. Each
migration runs in one transaction under an advisory lock, so two replicas (or an operator and a
deploy) migrating at once apply it once.

Tables are partitioned by day natively (a DEFAULT partition catches rows far outside the
partitions made ahead, e.g. a camera whose clock is years off); when the TimescaleDB extension
is available at `migrate`, they become hypertables instead. Retention drops whole partitions.
"""

from __future__ import annotations

import datetime as dt
import logging

import asyncpg

log = logging.getLogger("edge_ingest.schema")

SCHEMA_VERSION = 1
_LOCK = 0x6564_6765  # pg_advisory_xact_lock key: "edge"

# The raw tables: one row per window (counts), per (window, numeric field), and per (window,
# categorical field, value) -- categories as rows, never one jsonb per window, whose per-row
# aggregate dominated the server's cost. `width_s` is in the key: a chunk the agent compacted to
# 10 or 60 s stays a row of that width, never spread over seconds it does not know.
_TABLES = """
CREATE TABLE edge_ingest.counts (
    gateway text NOT NULL, camera text NOT NULL, stream text NOT NULL, t timestamptz NOT NULL,
    width_s integer NOT NULL, count bigint NOT NULL, revs integer NOT NULL,
    PRIMARY KEY (gateway, camera, stream, t, width_s)
) {part_t};
CREATE TABLE edge_ingest.numeric (
    gateway text NOT NULL, camera text NOT NULL, stream text NOT NULL, t timestamptz NOT NULL,
    width_s integer NOT NULL, field text NOT NULL, n bigint NOT NULL, sum float8 NOT NULL,
    sumsq float8 NOT NULL, min float8 NOT NULL, max float8 NOT NULL, last float8 NOT NULL,
    last_t float8 NOT NULL,
    PRIMARY KEY (gateway, camera, stream, t, width_s, field)
) {part_t};
CREATE TABLE edge_ingest.categories (
    gateway text NOT NULL, camera text NOT NULL, stream text NOT NULL, t timestamptz NOT NULL,
    width_s integer NOT NULL, field text NOT NULL, value text NOT NULL, count bigint NOT NULL,
    PRIMARY KEY (gateway, camera, stream, t, width_s, field, value)
) {part_t};
CREATE TABLE edge_ingest.minute_counts (
    gateway text NOT NULL, camera text NOT NULL, stream text NOT NULL,
    minute timestamptz NOT NULL, count bigint NOT NULL,
    PRIMARY KEY (gateway, camera, stream, minute)
) {part_minute};
CREATE TABLE edge_ingest.minute_numeric (
    gateway text NOT NULL, camera text NOT NULL, stream text NOT NULL,
    minute timestamptz NOT NULL, field text NOT NULL, n bigint NOT NULL, sum float8 NOT NULL,
    sumsq float8 NOT NULL, min float8 NOT NULL, max float8 NOT NULL,
    PRIMARY KEY (gateway, camera, stream, minute, field)
) {part_minute};
"""
PARTITIONED = ("counts", "numeric", "categories", "minute_counts", "minute_numeric")
_TIME_COLUMN = {"minute_counts": "minute", "minute_numeric": "minute"}

_V1 = """
CREATE SCHEMA IF NOT EXISTS edge_ingest;
CREATE TABLE edge_ingest.meta (key text PRIMARY KEY, value text NOT NULL);

-- The watermark (C6): one row per gateway, locked by every batch of that gateway, so one
-- gateway's batches apply one at a time and in order, on any connection of any replica.
CREATE TABLE edge_ingest.gateways (
    gateway text PRIMARY KEY,
    start_seq bigint NOT NULL,
    next_seq bigint NOT NULL,
    batches bigint NOT NULL DEFAULT 0,
    chunks bigint NOT NULL DEFAULT 0,
    messages bigint NOT NULL DEFAULT 0,
    gaps bigint NOT NULL DEFAULT 0,
    gap_seqs bigint NOT NULL DEFAULT 0,
    replays bigint NOT NULL DEFAULT 0,
    refused bigint NOT NULL DEFAULT 0,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now()
);

-- The batches applied (C1): a replay of one (same range, same bytes) answers 200 and applies
-- nothing; the same range with other bytes is refused. Kept for the retention period.
CREATE TABLE edge_ingest.batches (
    gateway text NOT NULL, first_seq bigint NOT NULL, last_seq bigint NOT NULL,
    digest bytea NOT NULL, chunks integer NOT NULL, messages bigint NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, first_seq)
);
CREATE INDEX batches_applied_at ON edge_ingest.batches (applied_at);

{tables}

CREATE VIEW edge_ingest.per_second AS
    SELECT gateway, camera, stream, t, count, width_s FROM edge_ingest.counts;
CREATE VIEW edge_ingest.per_second_numeric AS
    SELECT gateway, camera, stream, t, field, n, sum, sumsq, min, max, last, width_s
    FROM edge_ingest.numeric;
CREATE VIEW edge_ingest.per_second_categories AS
    SELECT gateway, camera, stream, t, field, value, count, width_s FROM edge_ingest.categories;
CREATE VIEW edge_ingest.per_minute AS
    SELECT gateway, camera, stream, minute, count FROM edge_ingest.minute_counts;
CREATE VIEW edge_ingest.per_minute_numeric AS
    SELECT gateway, camera, stream, minute, field, n, sum, sumsq, min, max, sum / n AS mean
    FROM edge_ingest.minute_numeric;

-- One batch, after its rows were copied into this connection's temp tables: decide by the
-- watermark (locked), then merge. Returns the outcome; writes nothing but counters unless the
-- outcome is 'applied' or 'gap'.
CREATE FUNCTION edge_ingest.apply_batch(
    p_gateway text, p_first bigint, p_last bigint, p_digest bytea, p_chunks integer,
    p_messages bigint, p_rollup boolean
) RETURNS TABLE (outcome text, next_seq bigint, gap bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    w edge_ingest.gateways%ROWTYPE;
    b edge_ingest.batches%ROWTYPE;
    v_gap bigint;
BEGIN
    INSERT INTO edge_ingest.gateways AS g (gateway, start_seq, next_seq)
    VALUES (p_gateway, p_first, p_first)
    ON CONFLICT (gateway) DO UPDATE SET last_seen = now()
    RETURNING * INTO w;
    IF p_first < w.next_seq THEN
        SELECT * INTO b FROM edge_ingest.batches x
        WHERE x.gateway = p_gateway AND x.first_seq = p_first;
        IF FOUND AND b.last_seq = p_last AND b.digest = p_digest THEN
            UPDATE edge_ingest.gateways x SET replays = x.replays + 1
            WHERE x.gateway = p_gateway;
            RETURN QUERY SELECT 'replay'::text, w.next_seq, 0::bigint;
            RETURN;
        END IF;
        UPDATE edge_ingest.gateways x SET refused = x.refused + 1 WHERE x.gateway = p_gateway;
        -- Not FOUND: the UPDATE above has set it. b is all NULL when no batch starts here.
        RETURN QUERY SELECT (CASE WHEN b.gateway IS NOT NULL THEN 'reused' ELSE 'overlap' END)
            ::text, w.next_seq, 0::bigint;
        RETURN;
    END IF;
    v_gap := p_first - w.next_seq;

    INSERT INTO edge_ingest.counts AS r (gateway, camera, stream, t, width_s, count, revs)
    SELECT p_gateway, i.camera, i.stream, to_timestamp(i.t), i.width_s, i.count, i.revs
    FROM pg_temp.in_counts i ORDER BY i.camera, i.stream, i.t, i.width_s
    ON CONFLICT (gateway, camera, stream, t, width_s) DO UPDATE
    SET count = r.count + excluded.count, revs = r.revs + excluded.revs;

    INSERT INTO edge_ingest.numeric AS r
        (gateway, camera, stream, t, width_s, field, n, sum, sumsq, min, max, last, last_t)
    SELECT p_gateway, i.camera, i.stream, to_timestamp(i.t), i.width_s, i.field, i.n, i.sum,
        i.sumsq, i.min, i.max, i.last, i.last_t
    FROM pg_temp.in_numeric i ORDER BY i.camera, i.stream, i.t, i.width_s, i.field
    ON CONFLICT (gateway, camera, stream, t, width_s, field) DO UPDATE
    SET n = r.n + excluded.n, sum = r.sum + excluded.sum, sumsq = r.sumsq + excluded.sumsq,
        min = least(r.min, excluded.min), max = greatest(r.max, excluded.max),
        last = CASE WHEN excluded.last_t > r.last_t
                      OR (excluded.last_t = r.last_t AND excluded.last > r.last)
                    THEN excluded.last ELSE r.last END,
        last_t = greatest(r.last_t, excluded.last_t);

    INSERT INTO edge_ingest.categories AS r
        (gateway, camera, stream, t, width_s, field, value, count)
    SELECT p_gateway, i.camera, i.stream, to_timestamp(i.t), i.width_s, i.field, i.value,
        i.count
    FROM pg_temp.in_categories i
    ORDER BY i.camera, i.stream, i.t, i.width_s, i.field, i.value
    ON CONFLICT (gateway, camera, stream, t, width_s, field, value) DO UPDATE
    SET count = r.count + excluded.count;

    IF p_rollup THEN
        -- The per-minute rollup, kept in the same transaction from the batch's own rows: never
        -- a rescan of raw rows, and never behind what was answered 200.
        INSERT INTO edge_ingest.minute_counts AS r (gateway, camera, stream, minute, count)
        SELECT p_gateway, i.camera, i.stream, to_timestamp(i.t - (((i.t % 60) + 60) % 60)),
            sum(i.count)
        FROM pg_temp.in_counts i GROUP BY 2, 3, 4 ORDER BY 2, 3, 4
        ON CONFLICT (gateway, camera, stream, minute) DO UPDATE
        SET count = r.count + excluded.count;

        INSERT INTO edge_ingest.minute_numeric AS r
            (gateway, camera, stream, minute, field, n, sum, sumsq, min, max)
        SELECT p_gateway, i.camera, i.stream, to_timestamp(i.t - (((i.t % 60) + 60) % 60)),
            i.field, sum(i.n), sum(i.sum), sum(i.sumsq), min(i.min), max(i.max)
        FROM pg_temp.in_numeric i GROUP BY 2, 3, 4, 5 ORDER BY 2, 3, 4, 5
        ON CONFLICT (gateway, camera, stream, minute, field) DO UPDATE
        SET n = r.n + excluded.n, sum = r.sum + excluded.sum, sumsq = r.sumsq + excluded.sumsq,
            min = least(r.min, excluded.min), max = greatest(r.max, excluded.max);
    END IF;

    INSERT INTO edge_ingest.batches (gateway, first_seq, last_seq, digest, chunks, messages)
    VALUES (p_gateway, p_first, p_last, p_digest, p_chunks, p_messages);
    UPDATE edge_ingest.gateways x
    SET next_seq = p_last + 1, batches = x.batches + 1, chunks = x.chunks + p_chunks,
        -- Totals saturate rather than overflow: a counter must never refuse a batch.
        messages = least(x.messages::numeric + p_messages, 9223372036854775807)::bigint,
        gaps = x.gaps + (v_gap > 0)::integer,
        gap_seqs = least(x.gap_seqs::numeric + v_gap, 9223372036854775807)::bigint,
        last_seen = now()
    WHERE x.gateway = p_gateway;
    RETURN QUERY SELECT (CASE WHEN v_gap > 0 THEN 'gap' ELSE 'applied' END)::text,
        p_last + 1, v_gap;
END
$fn$;
"""

# Each connection's staging tables: COPY lands here, apply_batch reads them; emptied at commit.
TEMP_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS in_counts (
    camera text, stream text, t bigint, width_s integer, count bigint, revs integer
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS in_numeric (
    camera text, stream text, t bigint, width_s integer, field text, n bigint, sum float8,
    sumsq float8, min float8, max float8, last float8, last_t float8
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS in_categories (
    camera text, stream text, t bigint, width_s integer, field text, value text, count bigint
) ON COMMIT DELETE ROWS;
"""


class SchemaError(Exception):
    """The database's schema cannot be used by this code (newer, or not migrated)."""


async def schema_version(conn: asyncpg.Connection) -> int:
    """The version migrated into this database; 0 when none."""
    exists = await conn.fetchval("SELECT to_regclass('edge_ingest.meta') IS NOT NULL")
    if not exists:
        return 0
    v = await conn.fetchval("SELECT value FROM edge_ingest.meta WHERE key = 'schema_version'")
    return int(v or 0)


async def has_timescaledb(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
    )


async def migrate(conn: asyncpg.Connection, *, today: dt.date, days_ahead: int = 7) -> str:
    """Bring the schema to SCHEMA_VERSION; returns what was done, in one line. Idempotent;
    raises SchemaError on a schema newer than this code."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
        have = await schema_version(conn)
        if have > SCHEMA_VERSION:
            raise SchemaError(
                f"the database has edge_ingest schema version {have}; this edge-ingest knows"
                f" up to {SCHEMA_VERSION}: upgrade edge-ingest"
            )
        if have == SCHEMA_VERSION:
            made = await ensure_partitions(conn, today, days_ahead)
            return f"schema version {have} is current; {made} partitions made"
        timescale = await has_timescaledb(conn)
        if timescale:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            tables = _TABLES.format(part_t="", part_minute="")
        else:
            tables = _TABLES.format(
                part_t="PARTITION BY RANGE (t)", part_minute="PARTITION BY RANGE (minute)"
            )
        await conn.execute(_V1.format(tables=tables))
        if timescale:
            for name in PARTITIONED:
                col = _TIME_COLUMN.get(name, "t")
                await conn.execute(
                    f"SELECT create_hypertable('edge_ingest.{name}', '{col}',"
                    " chunk_time_interval => interval '1 day')"
                )
        else:
            for name in PARTITIONED:
                await conn.execute(
                    f"CREATE TABLE edge_ingest.{name}_default PARTITION OF edge_ingest.{name}"
                    " DEFAULT"
                )
        await conn.execute(
            "INSERT INTO edge_ingest.meta VALUES ('schema_version', $1), ('timescaledb', $2)",
            str(SCHEMA_VERSION),
            "yes" if timescale else "no",
        )
        made = await ensure_partitions(conn, today, days_ahead)
    kind = "TimescaleDB hypertables" if timescale else "native daily partitions"
    return f"schema version {SCHEMA_VERSION} created ({kind}); {made} partitions made"


async def _timescale(conn: asyncpg.Connection) -> bool:
    v = await conn.fetchval("SELECT value FROM edge_ingest.meta WHERE key = 'timescaledb'")
    return bool(v == "yes")


def _part_name(table: str, day: dt.date) -> str:
    return f"{table}_p{day:%Y%m%d}"


async def ensure_partitions(conn: asyncpg.Connection, today: dt.date, days_ahead: int) -> int:
    """Make the daily partitions from yesterday to `days_ahead` days ahead; returns how many
    were new. A day whose rows already sit in the DEFAULT partition is left there (logged):
    partitioning it would have to move them under an exclusive lock."""
    if await _timescale(conn):
        return 0
    made = 0
    for i in range(-1, days_ahead + 1):
        day = today + dt.timedelta(days=i)
        for table in PARTITIONED:
            name = _part_name(table, day)
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"edge_ingest.{name}"):
                continue
            lo = dt.datetime.combine(day, dt.time(), dt.UTC)
            hi = lo + dt.timedelta(days=1)
            try:
                async with conn.transaction():
                    await conn.execute(
                        f"CREATE TABLE edge_ingest.{name} PARTITION OF edge_ingest.{table}"
                        f" FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
                    )
                made += 1
            except asyncpg.CheckViolationError:
                log.warning("partition %s not made: its rows are in the default partition", name)
            except asyncpg.DuplicateTableError:
                pass  # made meanwhile by another replica's maintenance, or a migrate
    return made


async def drop_before(conn: asyncpg.Connection, cutoff: dt.date) -> list[str]:
    """Retention: drop every daily partition wholly before `cutoff` (chunks, with
    TimescaleDB), old rows of the DEFAULT partitions and old batch records."""
    dropped: list[str] = []
    since = dt.datetime.combine(cutoff, dt.time(), dt.UTC)
    if await _timescale(conn):
        for table in PARTITIONED:
            await conn.execute(
                f"SELECT drop_chunks('edge_ingest.{table}', older_than => $1::timestamptz)", since
            )
            dropped.append(table)
    else:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'edge_ingest'"
            " AND c.relname ~ '_p[0-9]{8}$'"
        )
        for (name,) in rows:
            day = dt.datetime.strptime(name[-8:], "%Y%m%d").date()
            if day < cutoff:
                await conn.execute(f"DROP TABLE edge_ingest.{name}")
                dropped.append(name)
        for table in PARTITIONED:
            col = _TIME_COLUMN.get(table, "t")
            await conn.execute(f"DELETE FROM edge_ingest.{table}_default WHERE {col} < $1", since)
    # Each gateway's last batch is kept whatever its age: an agent off for longer than the
    # retention may still retry it, and must get "replay", not "overlap".
    await conn.execute(
        "DELETE FROM edge_ingest.batches b WHERE b.applied_at < $1 AND b.last_seq + 1 <>"
        " (SELECT g.next_seq FROM edge_ingest.gateways g WHERE g.gateway = b.gateway)",
        since,
    )
    return dropped

"""The SQLite outbox: closed chunks waiting for the cloud, checkpoint state, recovery.

One connection (aiosqlite: one worker thread), WAL, `synchronous` from config. `seq` is an
AUTOINCREMENT key, so SQLite never hands out a number twice, across deletes and restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from agent.faults import NO_FAULTS, Faults
from agent.quota import LEVELS, counted_messages, plan_compaction

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS open_windows (
    camera TEXT NOT NULL,
    stream TEXT NOT NULL,
    t INTEGER NOT NULL,
    rev INTEGER NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (camera, stream, t, rev)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ack_journal (
    mid INTEGER PRIMARY KEY,
    digest INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    body BLOB NOT NULL,
    status INTEGER,
    response TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
"""

WindowKey = tuple[str, str, int, int]


class OutboxError(Exception):
    """The outbox cannot be opened or written."""


@dataclass
class Recovery:
    """What a start found in the outbox."""

    journal: list[tuple[int, int]] = field(default_factory=list)
    open_windows: list[bytes] = field(default_factory=list)
    marks: dict[str, Any] = field(default_factory=dict)
    chunks: int = 0
    next_seq: int = 1
    moved_aside: Path | None = None


@dataclass
class CheckpointWrite:
    """Everything one checkpoint transaction writes."""

    chunks: Sequence[bytes] = ()
    snapshots: Sequence[tuple[WindowKey, bytes]] = ()
    drop_snapshots: Sequence[WindowKey] = ()
    journal_upserts: Sequence[tuple[int, int]] = ()
    journal_deletes: Sequence[int] = ()

    def __bool__(self) -> bool:
        return bool(
            self.chunks
            or self.snapshots
            or self.drop_snapshots
            or self.journal_upserts
            or self.journal_deletes
        )


class Outbox:
    """Durable queue of encoded chunks, plus the checkpoint's bookkeeping tables."""

    def __init__(self, db: aiosqlite.Connection, path: Path, faults: Faults = NO_FAULTS) -> None:
        self._db = db
        self.path = path
        self._faults = faults
        # One connection is shared by the checkpoint and the forwarder: without this lock their
        # statements would interleave inside each other's transactions (and a read could see a
        # checkpoint's chunks before they are committed).
        self._lock = asyncio.Lock()
        self.chunk_count = 0
        self.chunk_bytes = 0
        self.last_seq = 0
        self.oldest_created_at: float | None = None
        self.page_size = 4096
        self.max_pages = 2**31

    @classmethod
    async def open(
        cls, path: Path, *, synchronous: str = "full", faults: Faults = NO_FAULTS
    ) -> tuple[Outbox, Recovery]:
        """Open (or create) the database; a corrupt file is moved aside and a new one started."""
        path.parent.mkdir(parents=True, exist_ok=True)
        moved: Path | None = None
        try:
            db = await _connect(path, synchronous)
        except sqlite3.DatabaseError as e:
            moved = _move_aside(path, str(e))
            db = await _connect(path, synchronous)
        outbox = cls(db, path, faults)
        recovery = await outbox._recover()
        recovery.moved_aside = moved
        return outbox, recovery

    async def _recover(self) -> Recovery:
        r = Recovery()
        db = self._db
        async with db.execute("SELECT mid, digest FROM ack_journal") as cur:
            r.journal = [(int(a), int(b)) async for a, b in cur]
        async with db.execute("SELECT state FROM open_windows") as cur:
            r.open_windows = [bytes(s) async for (s,) in cur]
        async with db.execute("SELECT value FROM meta WHERE key = 'marks'") as cur:
            row = await cur.fetchone()
            if row is not None:
                r.marks = msgspec.json.decode(row[0])
        await self._count()
        async with db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'") as cur:
            row = await cur.fetchone()
            self.last_seq = int(row[0]) if row else 0
        r.chunks = self.chunk_count
        r.next_seq = self.last_seq + 1
        return r

    async def checkpoint(self, w: CheckpointWrite, *, now: float) -> None:
        """One transaction: new chunks, open-window snapshots, the ack journal."""
        if not w:
            return
        async with self._lock:
            await self._checkpoint(w, now)

    async def _checkpoint(self, w: CheckpointWrite, now: float) -> None:
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            if w.chunks:
                await db.executemany(
                    "INSERT INTO chunks (created_at, body) VALUES (?, ?)",
                    [(now, b) for b in w.chunks],
                )
                self._faults.hit("mid_checkpoint")
            if w.drop_snapshots:
                await db.executemany(
                    "DELETE FROM open_windows WHERE camera=? AND stream=? AND t=? AND rev=?",
                    w.drop_snapshots,
                )
            if w.snapshots:
                await db.executemany(
                    "INSERT OR REPLACE INTO open_windows (camera, stream, t, rev, state)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(*k, s) for k, s in w.snapshots],
                )
            if w.journal_deletes:
                await db.executemany(
                    "DELETE FROM ack_journal WHERE mid = ?", [(m,) for m in w.journal_deletes]
                )
            if w.journal_upserts:
                await db.executemany(
                    "INSERT OR REPLACE INTO ack_journal (mid, digest) VALUES (?, ?)",
                    w.journal_upserts,
                )
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise
        if w.chunks:
            if self.chunk_count == 0:
                self.oldest_created_at = now
            self.chunk_count += len(w.chunks)
            self.chunk_bytes += sum(len(b) for b in w.chunks)
            self.last_seq += len(w.chunks)

    async def read_batch(
        self, *, after_seq: int, max_chunks: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """The next chunks in seq order: at least one, then up to the count and byte limits."""
        out: list[tuple[int, bytes]] = []
        size = 0
        async with (
            self._lock,
            self._db.execute(
                "SELECT seq, body FROM chunks WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, max_chunks),
            ) as cur,
        ):
            async for seq, body in cur:
                if out and size + len(body) > max_bytes:
                    break
                out.append((int(seq), bytes(body)))
                size += len(body)
        return out

    async def delete_through(self, last_seq: int) -> None:
        """Forget every chunk up to and including last_seq (the cloud has them)."""
        async with self._lock:
            await self._delete_through(last_seq)

    async def _delete_through(self, last_seq: int) -> None:
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with db.execute(
                "DELETE FROM chunks WHERE seq <= ? RETURNING length(body)", (last_seq,)
            ) as cur:
                sizes = [int(s) for (s,) in await cur.fetchall()]
            n, nbytes = len(sizes), sum(sizes)
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise
        self.chunk_count -= int(n)
        self.chunk_bytes -= int(nbytes)
        if self.chunk_count == 0:
            self.oldest_created_at = None
        else:
            # Chunks are written in seq order, so the oldest is the first: no table scan.
            async with db.execute("SELECT created_at FROM chunks ORDER BY seq LIMIT 1") as cur:
                row = await cur.fetchone()
                self.oldest_created_at = row[0] if row else None

    # -- bounded disk ------------------------------------------------------------------------

    async def set_quota(self, max_bytes: int) -> None:
        """Cap the database (max_page_count) and the WAL (journal_size_limit) to max_bytes."""
        async with self._lock:
            wal_allowance = min(64 * 1024**2, max_bytes // 8)
            async with self._db.execute("PRAGMA page_size") as cur:
                row = await cur.fetchone()
                self.page_size = int(row[0]) if row else 4096
            self.max_pages = max(64, (max_bytes - wal_allowance) // self.page_size)
            await self._db.execute(f"PRAGMA max_page_count = {self.max_pages}")
            await self._db.execute(f"PRAGMA journal_size_limit = {wal_allowance}")

    async def usage(self) -> float:
        """Live pages as a fraction of the quota (free pages are reused, so they do not count)."""
        async with self._lock:
            return await self._usage()

    async def _usage(self) -> float:
        async with self._db.execute("PRAGMA page_count") as cur:
            row = await cur.fetchone()
            pages = int(row[0]) if row else 0
        async with self._db.execute("PRAGMA freelist_count") as cur:
            row = await cur.fetchone()
            free = int(row[0]) if row else 0
        return (pages - free) / self.max_pages

    async def make_room(self, *, target: float, drop_oldest: bool) -> tuple[int, int, int]:
        """Bring usage under `target`: compact 1 s -> 10 s -> 60 s chunks, then (if allowed)
        drop the oldest. Returns (chunks compacted away, chunks dropped, messages dropped)."""
        compacted = dropped = dropped_msgs = 0
        async with self._lock:
            for width, coarser in LEVELS:
                after = 0
                while await self._usage() > target:
                    async with self._db.execute(
                        "SELECT seq, body FROM chunks WHERE seq > ? ORDER BY seq LIMIT 5000",
                        (after,),
                    ) as cur:
                        rows = [(int(s), bytes(b)) async for s, b in cur]
                    if not rows:
                        break
                    after = rows[-1][0]
                    plan = plan_compaction(rows, width=width, coarser=coarser)
                    if plan.deletes:
                        await self._apply(plan.updates, plan.deletes)
                        compacted += len(plan.deletes)
            while drop_oldest and await self._usage() > target and self.chunk_count:
                async with self._db.execute(
                    "SELECT seq, body FROM chunks ORDER BY seq LIMIT 1000"
                ) as cur:
                    rows = [(int(s), bytes(b)) async for s, b in cur]
                dropped_msgs += counted_messages(b for _, b in rows)
                dropped += len(rows)
                await self._apply([], [s for s, _ in rows])
            await self._count()
        return compacted, dropped, dropped_msgs

    async def _apply(self, updates: list[tuple[int, bytes]], deletes: list[int]) -> None:
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            # Deletes first: the pages they free make room for the rewritten bodies.
            await db.executemany("DELETE FROM chunks WHERE seq = ?", [(s,) for s in deletes])
            await db.executemany(
                "UPDATE chunks SET body = ? WHERE seq = ?", [(b, s) for s, b in updates]
            )
            await db.execute("COMMIT")
        except BaseException:
            await _rollback(db)
            raise
        await self._count()

    async def refresh_counts(self) -> None:
        """Re-read the chunk count and size (another process may have added chunks)."""
        async with self._lock:
            await self._count()

    async def _count(self) -> None:
        async with self._db.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0), min(created_at) FROM chunks"
        ) as cur:
            row = await cur.fetchone()
            assert row is not None
            self.chunk_count, self.chunk_bytes, self.oldest_created_at = row

    async def dead_letter(self, seq: int, *, status: int | None, response: str) -> None:
        """Move one chunk the cloud refuses for good to the dead letters, with its answer."""
        async with self._lock:
            db = self._db
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.execute(
                    "INSERT OR REPLACE INTO dead_letters (seq, created_at, body, status, response)"
                    " SELECT seq, created_at, body, ?, ? FROM chunks WHERE seq = ?",
                    (status, response, seq),
                )
                await db.execute("DELETE FROM chunks WHERE seq = ?", (seq,))
                await db.execute("COMMIT")
            except BaseException:
                await _rollback(db)
                raise
            await self._count()

    async def save_marks(self, marks: dict[str, Any]) -> None:
        async with self._lock:
            await self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('marks', ?)",
                (msgspec.json.encode(marks),),
            )

    async def clear_marks(self) -> None:
        async with self._lock:
            await self._db.execute("DELETE FROM meta WHERE key = 'marks'")

    def file_bytes(self) -> int:
        """Database plus WAL on disk."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    async def close(self) -> None:
        await self._db.close()


async def _connect(path: Path, synchronous: str) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute("PRAGMA busy_timeout=10000")
        # DELETE ... RETURNING spills its rows to a temp file otherwise: flash writes for nothing.
        await db.execute("PRAGMA temp_store=MEMORY")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        async with db.execute("PRAGMA quick_check") as cur:
            row = await cur.fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
            version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"{path} has schema version {version}, newer than this agent's {SCHEMA_VERSION};"
                " upgrade the agent or move the file away"
            )
        if version < SCHEMA_VERSION:
            await db.executescript(_SCHEMA)
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        await db.close()
        raise
    return db


def _move_aside(path: Path, reason: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.replace(side, Path(f"{target}{suffix}"))
    log.error(
        "outbox %s is unreadable (%s); moved it to %s and started a new one", path, reason, target
    )
    return target


async def _rollback(db: aiosqlite.Connection) -> None:
    try:
        await db.execute("ROLLBACK")
    except sqlite3.Error:
        log.exception("rollback failed")

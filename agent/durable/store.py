"""The outbox file: schema, SQL and every transaction, synchronous (sqlite3).

One module owns the SQL. Each public method is one transaction, so a crash (or a cancelled
caller) leaves either all of it or none of it. The agent runs these methods on one worker
thread (agent/durable/outbox.py); the deterministic simulation calls them inline; the CLI's
dead-letter commands open the file beside a running agent (WAL, busy timeout).

Invariants kept here (docs/design.md, "Delivery guarantees": G3, G7, G8):
- `seq` only grows, per gateway, also across a reset of the file: a new file starts above a
  high-water mark reserved in a side file (`<outbox>.seq`) and above the wall-clock floor.
- At most one batch is cut at a time; once cut (table `batch`) its seqs, bytes and key do not
  change until the cloud acknowledges it. Compaction, quota drops and dead-lettering touch only
  rows after the cut.
- Every row stands for the seq range [seq, seq_end]; the rows after the cut tile a contiguous
  range, and compaction keeps it so (a compacted row declares the seqs it replaces).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from agent.core.errors import OutboxError
from agent.core.model import encode_batch
from agent.durable.compaction import LEVELS, compact_range, counted_messages
from agent.intake.acks import HistoryRow

log = logging.getLogger(__name__)

CACHE_KIB = 512
SCHEMA_VERSION = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    body BLOB NOT NULL,
    seq_end INTEGER
);
CREATE TABLE IF NOT EXISTS batch (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    last_row INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    cut_at REAL NOT NULL,
    gateway_id BLOB NOT NULL  -- the gateway the batch was cut for (its body is rebuilt)
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
    mid INTEGER NOT NULL,
    digest INTEGER NOT NULL,
    PRIMARY KEY (mid, digest)
) WITHOUT ROWID;
-- Per checkpoint: the keys it made durable and the keys it revoked (agent/intake/acks.py
-- ReplayMemory, packed 64-bit little-endian), the traffic time (seconds), the last packet id
-- received by then and whether a (re)connect awaits its first new message.
CREATE TABLE IF NOT EXISTS ack_history (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    frontier INTEGER,
    frontier_digest INTEGER,
    epoch_open INTEGER NOT NULL,
    jump_t REAL,
    acked BLOB NOT NULL,
    revoked BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    body BLOB NOT NULL,
    status INTEGER,
    response TEXT,
    seq_end INTEGER
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
"""

_MIGRATE_1_TO_2 = """
ALTER TABLE chunks ADD COLUMN seq_end INTEGER;
ALTER TABLE dead_letters ADD COLUMN seq_end INTEGER;
"""
# v3: the ack journal is keyed by (mid, digest), not mid alone (see agent/intake/acks.py).
_MIGRATE_2_TO_3 = """
ALTER TABLE ack_journal RENAME TO ack_journal_v2;
CREATE TABLE ack_journal (
    mid INTEGER NOT NULL,
    digest INTEGER NOT NULL,
    PRIMARY KEY (mid, digest)
) WITHOUT ROWID;
INSERT INTO ack_journal (mid, digest) SELECT mid, digest FROM ack_journal_v2;
DROP TABLE ack_journal_v2;
"""

# v4: ack_history (the replay memory), created by the schema script itself.
# v5: the cut batch's `body` column, which held the gateway id, is `gateway_id` (see _connect).

# SQLite primary result codes that mean "this file is not a database we can trust".
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB

# Kept free beside the database and its WAL allowance, so a delete can always be written.
RESERVE_BYTES = 256 * 1024

# Seqs reserved ahead in the side file; one fsync per this many chunks.
SEQ_RESERVE = 1_000_000
# A new file starts at least here: wall-clock seconds x 1e6 (below 2**53 until the year 2255).
SEQ_PER_SECOND_FLOOR = 1_000_000

WindowKey = tuple[str, str, int, int]


@dataclass
class Recovery:
    """What a start found in the outbox."""

    journal: list[tuple[int, int]] = field(default_factory=list)
    open_windows: list[bytes] = field(default_factory=list)
    marks: dict[str, Any] = field(default_factory=dict)
    chunks: int = 0
    next_seq: int = 1
    moved_aside: Path | None = None
    new_file: bool = False
    # The broker session this outbox's agent established ("client_id@host:port"), if any: a
    # CONNACK without a session for it is a session the broker lost.
    mqtt_session: str | None = None
    # ack_history rows, oldest first: (seq, at, frontier, acked keys, revoked keys).
    history: list[HistoryRow] = field(default_factory=list)


def pack_keys(keys: Sequence[int]) -> bytes:
    a = array("q", keys)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def unpack_keys(blob: bytes) -> array[int]:
    """8 bytes a key in memory too: a start restores millions of them (an adversary: a list of
    Python ints took 7 times that, 697 MB for Debian's 1,800 s autosave interval)."""
    a = array("q")
    a.frombytes(blob)
    if sys.byteorder == "big":
        a.byteswap()
    return a


@dataclass
class CheckpointWrite:
    """Everything one checkpoint transaction writes."""

    chunks: Sequence[bytes] = ()
    snapshots: Sequence[tuple[WindowKey, bytes]] = ()
    drop_snapshots: Sequence[WindowKey] = ()
    journal_upserts: Sequence[tuple[int, int]] = ()
    journal_deletes: Sequence[tuple[int, int]] = ()
    history: HistoryRow | None = None
    # ack_history rows up to this seq are past the replay horizon.
    history_expired: int | None = None

    def __bool__(self) -> bool:
        return bool(
            self.chunks
            or self.snapshots
            or self.drop_snapshots
            or self.journal_upserts
            or self.journal_deletes
            or self.history is not None
            or self.history_expired is not None
        )


@dataclass(frozen=True, slots=True)
class Batch:
    """A cut batch: immutable until the cloud acknowledges it (G7)."""

    first_seq: int
    last_seq: int
    last_row: int
    chunks: int
    messages: int
    body: bytes

    def key(self, gateway_id: str) -> str:
        return f"{gateway_id}:{self.first_seq}-{self.last_seq}"


@dataclass(frozen=True, slots=True)
class RoomMade:
    compacted: int = 0
    dropped: int = 0
    dropped_messages: int = 0


class Store:
    """The outbox database and its cached counters."""

    def __init__(self, con: sqlite3.Connection, path: Path) -> None:
        self._db = con
        self.path = path
        self.chunk_count = 0
        self.chunk_bytes = 0
        self.oldest_created_at: float | None = None
        # Chunks in the dead letters now (not a cumulative count: `deadletter retry` lowers it).
        self.dead_letter_count = 0
        self.last_seq = 0
        self.page_size = 4096
        self.max_pages = 2**31
        self._reserved = 0
        self.batch: Batch | None = None
        self.wal_allowance = 0
        self.max_bytes = 2**62
        # Free bytes on the outbox's filesystem (a parameter, so tests need no tiny disk).
        self.disk_free: Callable[[Path], int] = _disk_free
        self.problem: str | None = None
        st = os.stat(path)
        self._ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
        # Crash-test hook (agent/app/faults.py): called inside the checkpoint transaction.
        self.fault: Callable[[str], None] = lambda point: None
        # Ranges the cloud refused whole since the last acknowledged batch, and the batch size
        # the bisection got down to: a re-cut never repeats a refused range (one key, one
        # content, G7), and a restart does not start the bisection over.
        self._refused: set[tuple[int, int]] = set()
        self._cut_limit: int | None = None

    # -- open and recover ---------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: Path, *, synchronous: str = "full", now: float | None = None
    ) -> tuple[Store, Recovery]:
        """Open (or create) the outbox. Only a really corrupt file is moved aside (G11)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        moved: Path | None = None
        try:
            con = _connect(path, synchronous, cls._sqlite_connect)
        except _Corrupt as e:
            moved = _move_aside(path, str(e))
            con = _connect(path, synchronous, cls._sqlite_connect)
        store = cls(con, path)
        recovery = store._recover(time.time() if now is None else now)
        recovery.moved_aside = moved
        return store, recovery

    @staticmethod
    def _sqlite_connect(path: Path) -> sqlite3.Connection:
        """The connection to the outbox file (the simulation keeps its file in memory)."""
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def _recover(self, now: float) -> Recovery:
        r = Recovery()
        db = self._db
        r.journal = [(int(a), int(b)) for a, b in db.execute("SELECT mid, digest FROM ack_journal")]
        r.open_windows = [bytes(s) for (s,) in db.execute("SELECT state FROM open_windows")]
        r.history = [
            HistoryRow(int(seq), float(at), None if f is None else (int(f), int(fd)),
                       bool(e), unpack_keys(a), unpack_keys(v), None if j is None else float(j))
            for seq, at, f, fd, e, a, v, j in db.execute(
                "SELECT seq, at, frontier, frontier_digest, epoch_open, acked, revoked, jump_t"
                " FROM ack_history ORDER BY seq"
            )
        ]  # fmt: skip
        row = db.execute("SELECT value FROM meta WHERE key = 'marks'").fetchone()
        if row is not None:
            with contextlib.suppress(msgspec.DecodeError):
                r.marks = msgspec.json.decode(row[0])
        self._count()
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'").fetchone()
        self._reserved = _read_reserved(self._seq_file)
        if row is None:
            # A new file (first start, or the old one was moved aside or deleted): start above
            # every seq this gateway may have used, so the cloud's (gateway, seq) dedup never
            # mistakes new chunks for old ones.
            start = max(self._reserved, int(now) * SEQ_PER_SECOND_FLOOR)
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('chunks', ?)", (start,))
            self.last_seq = start
            r.new_file = True
        else:
            self.last_seq = int(row[0])
        self.batch = self._load_batch()
        row = db.execute("SELECT value FROM meta WHERE key = 'mqtt_session'").fetchone()
        r.mqtt_session = str(row[0]) if row is not None else None
        row = db.execute("SELECT value FROM meta WHERE key = 'refused'").fetchone()
        if row is not None:
            with contextlib.suppress(msgspec.DecodeError, TypeError, ValueError):
                doc = msgspec.json.decode(row[0])
                self._refused = {(int(a), int(b)) for a, b in doc["ranges"]}
                self._cut_limit = int(doc["limit"])
        r.chunks = self.chunk_count
        r.next_seq = self.last_seq + 1
        return r

    @property
    def _seq_file(self) -> Path:
        return self.path.with_name(self.path.name + ".seq")

    def _load_batch(self, gateway_id: str | None = None) -> Batch | None:
        """The cut batch, its body rebuilt from its rows (unchanged while cut) and its cut time:
        the same bytes as when it was cut."""
        row = self._db.execute(
            "SELECT first_seq, last_seq, last_row, chunks, messages, cut_at, gateway_id FROM batch"
        ).fetchone()
        if row is None:
            return None
        first, last, last_row, chunks, messages, cut_at, gw = row
        rows = self._batch_rows(int(first), int(last_row))
        body = encode_batch(bytes(gw).decode(), rows, sent_at=float(cut_at))
        return Batch(int(first), int(last), int(last_row), int(chunks), int(messages), body)

    def _batch_rows(self, first: int, last_row: int) -> list[tuple[int, int, bytes]]:
        return [
            (int(seq), int(seq_end) if seq_end is not None else int(seq), body)
            for seq, seq_end, body in self._db.execute(
                "SELECT seq, seq_end, body FROM chunks WHERE seq >= ? AND seq <= ? ORDER BY seq",
                (first, last_row),
            )
        ]

    def _txn(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # After a rollback the cached counters are read again from what is on disk.
        return transaction(self._db, after_rollback=self._count)

    # -- the checkpoint -----------------------------------------------------------------------

    def checkpoint(self, w: CheckpointWrite, *, now: float) -> None:
        """One transaction: new chunks, open-window snapshots, the ack journal."""
        if not w:
            return
        if w.chunks and self.last_seq + len(w.chunks) > self._reserved:
            self._reserve(self.last_seq + len(w.chunks) + SEQ_RESERVE)
        with self._txn() as db:
            # Snapshots superseded by these chunks go first: an outbox full of window states
            # (buffer.durability = "message") makes room for the chunks that replace them.
            if w.drop_snapshots:
                db.executemany(
                    "DELETE FROM open_windows WHERE camera=? AND stream=? AND t=? AND rev=?",
                    w.drop_snapshots,
                )
            if w.chunks:
                db.executemany(
                    "INSERT INTO chunks (created_at, body) VALUES (?, ?)",
                    [(now, b) for b in w.chunks],
                )
                self.fault("mid_checkpoint")
            if w.snapshots:
                db.executemany(
                    "INSERT OR REPLACE INTO open_windows (camera, stream, t, rev, state)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(*k, s) for k, s in w.snapshots],
                )
            if w.journal_deletes:
                db.executemany(
                    "DELETE FROM ack_journal WHERE mid = ? AND digest = ?", w.journal_deletes
                )
            if w.journal_upserts:
                db.executemany(
                    "INSERT OR REPLACE INTO ack_journal (mid, digest) VALUES (?, ?)",
                    w.journal_upserts,
                )
            if w.history_expired is not None:
                db.execute("DELETE FROM ack_history WHERE seq <= ?", (w.history_expired,))
            if (h := w.history) is not None:
                db.execute(
                    "INSERT OR REPLACE INTO ack_history"
                    " (seq, at, frontier, frontier_digest, epoch_open, acked, revoked, jump_t)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        h.seq,
                        h.at,
                        *(h.frontier or (None, None)),
                        int(h.epoch_open),
                        pack_keys(h.acked),
                        pack_keys(h.revoked),
                        h.jump_t,
                    ),
                )
        if w.chunks:
            if self.chunk_count == 0:
                self.oldest_created_at = now
            self.chunk_count += len(w.chunks)
            self.chunk_bytes += sum(len(b) for b in w.chunks)
            self.last_seq += len(w.chunks)

    def _reserve(self, upto: int) -> None:
        """Durably reserve seqs up to `upto` in the side file before any of them is used."""
        tmp = self._seq_file.with_name(self._seq_file.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{upto}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._seq_file)
        _fsync_dir(self.path.parent)
        self._reserved = upto

    # -- batches ------------------------------------------------------------------------------

    def cut(self, *, gateway_id: str, max_chunks: int, max_bytes: int, now: float) -> Batch | None:
        """The cut batch, or cut the next one: the oldest rows, in seq order, within limits."""
        if self.batch is not None:
            return self.batch
        rows: list[tuple[int, int, bytes]] = []
        size = 0
        if self._cut_limit is not None:
            max_chunks = min(max_chunks, self._cut_limit)
        for seq, seq_end, body in self._db.execute(
            "SELECT seq, seq_end, body FROM chunks ORDER BY seq LIMIT ?", (max_chunks,)
        ):
            if rows and size + len(body) > max_bytes:
                break
            rows.append((int(seq), int(seq_end) if seq_end is not None else int(seq), body))
            size += len(body)
        while len(rows) > 1 and (rows[0][0], rows[-1][1]) in self._refused:
            rows.pop()
        if not rows:
            return None
        body = encode_batch(gateway_id, rows, sent_at=now)
        b = Batch(
            first_seq=rows[0][0],
            last_seq=rows[-1][1],
            last_row=rows[-1][0],
            chunks=len(rows),
            messages=counted_messages(r[2] for r in rows),
            body=body,
        )
        # Only the cut is stored (a few bytes, no second copy of the chunks): the body is
        # rebuilt from the rows, which do not change while cut, and the stored cut time.
        with self._txn() as db:
            db.execute(
                "INSERT INTO batch (id, first_seq, last_seq, last_row, chunks, messages, cut_at,"
                " gateway_id) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                (b.first_seq, b.last_seq, b.last_row, b.chunks, b.messages, now,
                 gateway_id.encode()),
            )  # fmt: skip
        self.batch = b
        return b

    def acknowledged(self, b: Batch) -> None:
        """The cloud has the batch: forget its rows and the cut (one transaction)."""
        self._check_cut(b)
        with self._txn() as db:
            sizes = [
                int(n)
                for (n,) in db.execute(
                    "DELETE FROM chunks WHERE seq <= ? RETURNING length(body)", (b.last_row,)
                )
            ]
            db.execute("DELETE FROM batch")
            db.execute("DELETE FROM meta WHERE key = 'refused'")
        self.batch = None
        self._refused, self._cut_limit = set(), None
        self.chunk_count -= len(sizes)
        self.chunk_bytes -= sum(sizes)
        if self.chunk_count <= 0:
            self.chunk_count, self.chunk_bytes, self.oldest_created_at = 0, 0, None
        else:
            row = self._db.execute("SELECT created_at FROM chunks ORDER BY seq LIMIT 1").fetchone()
            self.oldest_created_at = row[0] if row else None

    def release(self, b: Batch) -> None:
        """The cloud refused the batch as a whole (413, 400, 422): it may be cut smaller."""
        self._check_cut(b)
        refused = self._refused | {(b.first_seq, b.last_seq)}
        limit = max(1, b.chunks // 2)
        doc = {"ranges": sorted(refused), "limit": limit}
        with self._txn() as db:
            db.execute("DELETE FROM batch")
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('refused', ?)",
                (msgspec.json.encode(doc),),
            )
        self.batch = None
        self._refused, self._cut_limit = refused, limit

    def dead_letter(self, b: Batch, *, status: int | None, response: str) -> None:
        """Move the one chunk of a refused batch to the dead letters, with the cloud's answer."""
        self._check_cut(b)
        if b.chunks != 1:
            raise ValueError("only a batch of one chunk is dead-lettered")
        with self._txn() as db:
            db.execute(
                "INSERT OR REPLACE INTO dead_letters (seq, created_at, body, status, response,"
                " seq_end) SELECT seq, created_at, body, ?, ?, seq_end FROM chunks WHERE seq = ?",
                (status, response, b.first_seq),
            )
            db.execute("DELETE FROM chunks WHERE seq = ?", (b.first_seq,))
            db.execute("DELETE FROM batch")
            db.execute("DELETE FROM meta WHERE key = 'refused'")
        self.batch = None
        self._refused, self._cut_limit = set(), None
        self._count()

    def _check_cut(self, b: Batch) -> None:
        if self.batch != b:
            raise ValueError(f"batch {b.first_seq}-{b.last_seq} is not the cut batch")

    # -- bounded disk -------------------------------------------------------------------------

    def set_quota(self, max_bytes: int) -> None:
        """Cap the database and its WAL to max_bytes (see `usage` for a smaller disk)."""
        row = self._db.execute("PRAGMA page_size").fetchone()
        self.page_size = int(row[0]) if row else 4096
        self.max_bytes = max_bytes
        self._apply_limit(max_bytes)

    def _apply_limit(self, total: int) -> None:
        """Database pages (max_page_count) and WAL (journal_size_limit and a WAL checkpoint
        every that many bytes: an eighth of the total, at most 64 MiB) within `total` bytes."""
        wal_allowance = min(64 * 1024**2, total // 8)
        pages = max(16, (total - wal_allowance - RESERVE_BYTES) // self.page_size)
        if (pages, wal_allowance) == (self.max_pages, self.wal_allowance):
            return
        self.max_pages, self.wal_allowance = pages, wal_allowance
        self._db.execute(f"PRAGMA max_page_count = {pages}")
        self._db.execute(f"PRAGMA journal_size_limit = {wal_allowance}")
        # Without this the WAL grows to SQLite's default ~4 MB before it is folded back in.
        self._db.execute(f"PRAGMA wal_autocheckpoint = {max(16, wal_allowance // self.page_size)}")

    def usage(self) -> float:
        """Live pages as a fraction of the effective quota (free pages are reused, so they do
        not count). The effective quota is buffer.max_bytes, or less when the disk has less
        room: what the database and its WAL hold now plus the free space. It is enforced
        (max_page_count), with the WAL allowance and a reserve kept out of it, so deleting sent
        chunks stays possible on a full disk. Also notices a file deleted under the agent."""
        (pages,) = self._db.execute("PRAGMA page_count").fetchone()
        (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
        self._check_file()
        try:
            room: int | None = self.disk_free(self.path.parent)
        except OSError:
            room = None
        total = self.max_bytes
        if room is not None:
            total = min(total, self.file_bytes() + room)
        self._apply_limit(total)
        return (int(pages) - int(free)) / self.max_pages

    def _check_file(self) -> None:
        try:
            st = os.stat(self.path)
            ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            ident = None
        if ident != self._ident:
            self.problem = (
                f"outbox file {self.path} was deleted or replaced while the agent runs: what it"
                " writes now goes to a file nobody will read; restart the agent"
            )

    def make_room(self, *, target: float, drop_oldest: bool) -> RoomMade:
        """Bring usage under `target`: compact 1 s -> 10 s -> 60 s, then (if allowed) drop the
        oldest. Never touches the cut batch (G7); keeps the seq coverage contiguous (G8)."""
        compacted = dropped = dropped_msgs = 0
        for _width, coarser in LEVELS:
            start = self._first_uncut()
            while start is not None and self.usage() > target:
                rows = self._rows_from(start, 5000)
                if not rows:
                    break
                new_rows = compact_range(rows, coarser=coarser)
                nxt = rows[-1][1] + 1
                if new_rows is not None:
                    self._rewrite(rows, new_rows)
                    compacted += len(rows) - len(new_rows)
                start = self._first_row_at_or_after(nxt)
        while drop_oldest and self.usage() > target:
            start = self._first_uncut()
            rows = self._rows_from(start, 1000) if start is not None else []
            if not rows:
                break
            dropped_msgs += counted_messages(r[3] for r in rows)
            dropped += len(rows)
            with self._txn() as db:
                db.execute(
                    "DELETE FROM chunks WHERE seq >= ? AND seq <= ?", (rows[0][0], rows[-1][0])
                )
        self._count()
        return RoomMade(compacted, dropped, dropped_msgs)

    def _first_uncut(self) -> int | None:
        after = self.batch.last_row if self.batch is not None else -1
        return self._first_row_at_or_after(after + 1)

    def _first_row_at_or_after(self, seq: int) -> int | None:
        row = self._db.execute(
            "SELECT seq FROM chunks WHERE seq >= ? ORDER BY seq LIMIT 1", (seq,)
        ).fetchone()
        return int(row[0]) if row else None

    def _rows_from(self, start: int, limit: int) -> list[tuple[int, int, float, bytes]]:
        """Up to `limit` rows from `start` whose seq ranges follow each other without a hole,
        and within the transaction budget (a rewrite must fit in the WAL allowance)."""
        out: list[tuple[int, int, float, bytes]] = []
        budget = self.txn_budget
        for seq, seq_end, created, body in self._db.execute(
            "SELECT seq, seq_end, created_at, body FROM chunks WHERE seq >= ? ORDER BY seq LIMIT ?",
            (start, limit),
        ):
            s = int(seq)
            if out and (s != out[-1][1] + 1 or len(body) > budget):
                break
            out.append((s, int(seq_end) if seq_end is not None else s, float(created), body))
            budget -= len(body)
        return out

    @property
    def txn_budget(self) -> int:
        """Bytes of rows one transaction may write: half the WAL allowance (no limit before
        the quota is set)."""
        return self.wal_allowance // 2 if self.wal_allowance else 2**62

    def _rewrite(
        self, rows: list[tuple[int, int, float, bytes]], new_rows: list[tuple[float, bytes]]
    ) -> None:
        """Replace `rows` by `new_rows` over the same seq range: the new rows take the first
        seqs of the range and the last of them declares the end of the range (seq_end)."""
        first, end = rows[0][0], rows[-1][1]
        params = []
        for i, (created, body) in enumerate(new_rows):
            seq = first + i
            seq_end = end if i == len(new_rows) - 1 else seq
            params.append((seq, created, body, seq_end if seq_end != seq else None))
        with self._txn() as db:
            db.execute("DELETE FROM chunks WHERE seq >= ? AND seq <= ?", (first, rows[-1][0]))
            db.executemany(
                "INSERT INTO chunks (seq, created_at, body, seq_end) VALUES (?, ?, ?, ?)", params
            )

    def _count(self) -> None:
        row = self._db.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0), min(created_at) FROM chunks"
        ).fetchone()
        self.chunk_count, self.chunk_bytes, self.oldest_created_at = (
            int(row[0]),
            int(row[1]),
            row[2],
        )
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'").fetchone()
        if row is not None:
            self.last_seq = max(self.last_seq, int(row[0]))
        (n,) = self._db.execute("SELECT count(*) FROM dead_letters").fetchone()
        self.dead_letter_count = int(n)

    def refresh_counts(self) -> None:
        """Re-read the chunk count and size (`deadletter retry` may have added chunks)."""
        self._count()

    # -- state kept across restarts -----------------------------------------------------------

    def save_marks(self, marks: dict[str, Any]) -> None:
        with self._txn() as db:
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('marks', ?)",
                (msgspec.json.encode(marks),),
            )

    def mark_session(self, session: str) -> None:
        """Record that the broker holds a session for `session` ("client_id@host:port")."""
        with self._txn() as db:
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('mqtt_session', ?)", (session,)
            )

    def clear_marks(self) -> None:
        with self._txn() as db:
            db.execute("DELETE FROM meta WHERE key = 'marks'")

    def clear_history(self) -> None:
        """Forget the replay memory (a run without one: its rows would be stale for the next)."""
        with self._txn() as db:
            db.execute("DELETE FROM ack_history")

    def file_bytes(self) -> int:
        """Database plus WAL on disk."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def dump(self) -> dict[str, Any]:
        """Every table's rows (for the simulation's oracle and for tests)."""
        db = self._db
        return {
            "chunks": db.execute("SELECT seq, seq_end, body FROM chunks ORDER BY seq").fetchall(),
            "open_windows": db.execute("SELECT state FROM open_windows").fetchall(),
            "journal": db.execute("SELECT mid, digest FROM ack_journal").fetchall(),
            "dead_letters": db.execute("SELECT seq, seq_end, body FROM dead_letters").fetchall(),
        }

    def close(self) -> None:
        self._db.close()


# -- dead letters (CLI) ------------------------------------------------------------------------


def list_dead_letters(path: Path) -> list[dict[str, Any]]:
    """Every dead letter, oldest seq first: when, the cloud's answer, and what the chunk holds
    (camera, stream, second, message count), for an operator deciding what to retry."""
    con = _read_only(path)
    try:
        rows = con.execute(
            "SELECT seq, seq_end, created_at, status, response, length(body), body"
            " FROM dead_letters ORDER BY seq"
        ).fetchall()
    finally:
        con.close()
    return [_dead_letter_row(r) for r in rows]


def show_dead_letter(path: Path, seq: int) -> dict[str, Any] | None:
    """One dead letter with its whole chunk and the cloud's whole stored answer; None if absent."""
    con = _read_only(path)
    try:
        row = con.execute(
            "SELECT seq, seq_end, created_at, status, response, length(body), body"
            " FROM dead_letters WHERE seq = ?",
            (seq,),
        ).fetchone()
    finally:
        con.close()
    if row is None:
        return None
    doc = _dead_letter_row(row)
    try:
        doc["chunk"] = msgspec.json.decode(row[6])
    except msgspec.DecodeError:
        doc["chunk"] = None
    return doc


def _read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection beside a running agent (WAL lets it read while the agent writes)."""
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    con.execute("PRAGMA busy_timeout=10000")
    return con


def _dead_letter_row(r: tuple[Any, ...]) -> dict[str, Any]:
    seq, seq_end, created_at, status, response, nbytes, body = r
    try:
        chunk = msgspec.json.decode(body)
    except msgspec.DecodeError:
        chunk = None
    ok = isinstance(chunk, dict)
    return {
        "seq": seq,
        "seq_end": seq_end,
        "created_at": created_at,
        "status": status,
        "response": response,
        "bytes": nbytes,
        "camera": chunk.get("camera") if ok else None,
        "stream": chunk.get("stream") if ok else None,
        "t": chunk.get("t") if ok else None,
        "width_s": chunk.get("width_s") if ok else None,
        "rev": chunk.get("rev") if ok else None,
        "messages": chunk.get("count") if ok else None,
    }


def retry_dead_letters(path: Path, seqs: Sequence[int] | None) -> int:
    """Put dead letters back in the outbox (all, or the given seqs) under new seqs; how many.

    A dead letter stood for a range of seqs the cloud never stored; under its new seq it stands
    for itself only (the old range stays a declared gap).
    """
    con = sqlite3.connect(path, timeout=10, isolation_level=None)
    with contextlib.closing(con), transaction(con):
        if seqs is None:
            chosen = [r[0] for r in con.execute("SELECT seq FROM dead_letters ORDER BY seq")]
        else:
            chosen = [
                s for s in seqs
                if con.execute("SELECT 1 FROM dead_letters WHERE seq = ?", (s,)).fetchone()
            ]  # fmt: skip
        for s in chosen:
            con.execute(
                "INSERT INTO chunks (created_at, body) SELECT created_at, body FROM dead_letters"
                " WHERE seq = ?",
                (s,),
            )
            con.execute("DELETE FROM dead_letters WHERE seq = ?", (s,))
    return len(chosen)


# -- opening -----------------------------------------------------------------------------------


class _Corrupt(Exception):
    pass


def _connect(
    path: Path, synchronous: str, connect: Callable[[Path], sqlite3.Connection]
) -> sqlite3.Connection:
    try:
        con = connect(path)
    except sqlite3.Error as e:
        raise OutboxError(f"cannot open {path}: {e}") from None
    try:
        con.execute("PRAGMA busy_timeout=10000")
        # DELETE ... RETURNING spills its rows to a temp file otherwise: flash writes for nothing.
        con.execute("PRAGMA temp_store=MEMORY")
        # The work is append at the end, read from the front: a small page cache does (the
        # default, 2 MB, filled up and stayed in the RSS under load).
        con.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={synchronous.upper()}")
        row = con.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise _Corrupt(f"quick_check: {row[0] if row else 'no answer'}")
        (version,) = con.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"{path} has schema version {version}, newer than this agent's {SCHEMA_VERSION};"
                " upgrade the agent or move the file away"
            )
        if version < SCHEMA_VERSION:
            # Up to v4 the cut batch's gateway id was in a column named `body`.
            batch_cols = {r[1] for r in con.execute("PRAGMA table_info(batch)")}
            # A v4 ack_history (from before jump_t) gains the column.
            history_cols = {r[1] for r in con.execute("PRAGMA table_info(ack_history)")}
            # One script, one transaction: a crash mid-migration leaves the old version.
            con.executescript(
                "BEGIN IMMEDIATE;"
                + (_MIGRATE_1_TO_2 if version == 1 else "")
                + (_MIGRATE_2_TO_3 if 1 <= version <= 2 else "")
                + (
                    "ALTER TABLE batch RENAME COLUMN body TO gateway_id;"
                    if "body" in batch_cols
                    else ""
                )
                + (
                    "ALTER TABLE ack_history ADD COLUMN jump_t REAL;"
                    if history_cols and "jump_t" not in history_cols
                    else ""
                )
                + _SCHEMA
                + f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )
    except sqlite3.DatabaseError as e:
        con.close()
        if _errorcode(e) in _CORRUPT_CODES:
            raise _Corrupt(str(e)) from None
        raise OutboxError(f"cannot open {path}: {e}") from None
    except BaseException:
        con.close()
        raise
    return con


@contextlib.contextmanager
def transaction(
    db: sqlite3.Connection, *, after_rollback: Callable[[], None] | None = None
) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (cancellation included): the one
    transaction block of the outbox, for the Store and the CLI's own connections."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (SQLITE_FULL does).
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed")
        if after_rollback is not None:
            after_rollback()
        raise


def _errorcode(e: sqlite3.Error) -> int:
    code = getattr(e, "sqlite_errorcode", None)
    return int(code) & 0xFF if code is not None else -1


def is_full(e: sqlite3.Error) -> bool:
    """SQLITE_FULL: the disk or the page quota is full."""
    return _errorcode(e) == 13


def _disk_free(d: Path) -> int:
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


def _read_reserved(p: Path) -> int:
    try:
        text = p.read_text().strip()
    except FileNotFoundError:
        return 0
    except OSError as e:
        log.warning("cannot read the seq high-water file %s (%s)", p, e)
        return 0
    try:
        value = int(text)
    except ValueError:
        log.warning("seq high-water file %s holds %r; ignored", p, text[:40])
        return 0
    return value if 0 <= value < 2**62 else 0


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
        "outbox %s is corrupt (%s); moved it to %s and started a new one", path, reason, target
    )
    return target

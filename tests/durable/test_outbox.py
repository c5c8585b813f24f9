from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.core.errors import OutboxError
from agent.core.model import Chunk, encode_chunk
from agent.durable.outbox import Batch, CheckpointWrite, Outbox
from agent.durable.store import SEQ_PER_SECOND_FLOOR

GW = "gw-test"
T0 = 1764126000.0


def chunk_body(i: int) -> bytes:
    """A real one-message chunk for second T0 + i."""
    c = Chunk("cam-1", "det", int(T0) + i, 1)
    c.add_times(T0 + i, T0 + i + 0.1)
    return encode_chunk(c)


def batch_doc(b: Batch) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.json.decode(b.body)
    return doc


async def cut(ob: Outbox, max_chunks: int = 10**6, max_bytes: int = 10**9) -> Batch | None:
    return await ob.cut(gateway_id=GW, max_chunks=max_chunks, max_bytes=max_bytes, now=T0)


def moved_aside(d: Path) -> list[Path]:
    return list(d.glob("b.sqlite3.corrupt-*"))


def side_files(path: Path) -> list[Path]:
    return [Path(f"{path}{s}") for s in ("", "-wal", "-shm")]


async def test_seq_is_never_reused_across_deletes_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    ob, rec = await Outbox.open(path, now=T0)
    s0 = rec.next_seq
    assert rec.new_file and rec.chunks == 0
    assert s0 > int(T0) * SEQ_PER_SECOND_FLOOR  # a new file starts at the wall-clock floor
    await ob.checkpoint(CheckpointWrite(chunks=[b'{"a":1}', b'{"a":2}', b'{"a":3}']), now=1.0)
    b = await cut(ob)
    assert b is not None
    assert (b.first_seq, b.last_seq, b.chunks) == (s0, s0 + 2, 3)
    assert [c["seq"] for c in batch_doc(b)["chunks"]] == [s0, s0 + 1, s0 + 2]
    await ob.acknowledged(b)
    assert ob.chunk_count == 0 and ob.batch is None
    assert await cut(ob) is None
    await ob.close()
    ob, rec = await Outbox.open(path, now=T0 + 10)
    assert rec.next_seq == s0 + 3 and rec.chunks == 0 and not rec.new_file
    await ob.checkpoint(CheckpointWrite(chunks=[b'{"a":4}']), now=2.0)
    b = await cut(ob)
    assert b is not None and (b.first_seq, b.last_seq) == (s0 + 3, s0 + 3)
    assert batch_doc(b)["chunks"] == [{"seq": s0 + 3, "a": 4}]
    await ob.close()


async def test_batch_respects_byte_limit_but_always_makes_progress(tmp_path: Path) -> None:
    ob, rec = await Outbox.open(tmp_path / "b.sqlite3")
    s0 = rec.next_seq
    await ob.checkpoint(CheckpointWrite(chunks=[b'{"x":"' + b"x" * 92 + b'"}'] * 6), now=1.0)
    b = await cut(ob, max_chunks=10, max_bytes=250)
    assert b is not None and (b.first_seq, b.last_seq, b.chunks) == (s0, s0 + 1, 2)
    await ob.acknowledged(b)
    assert ob.batch is None and ob.chunk_count == 4
    b = await cut(ob, max_chunks=10, max_bytes=10)  # one chunk is bigger: it still goes
    assert b is not None and (b.first_seq, b.last_seq, b.chunks) == (s0 + 2, s0 + 2, 1)
    await ob.acknowledged(b)
    b = await cut(ob, max_chunks=2, max_bytes=10**6)
    assert b is not None and (b.first_seq, b.last_seq, b.chunks) == (s0 + 3, s0 + 4, 2)
    await ob.acknowledged(b)
    assert ob.chunk_count == 1
    await ob.close()


async def test_a_released_batch_is_cut_again_smaller_also_after_a_restart(tmp_path: Path) -> None:
    """413/400/422: the cloud refused the batch whole. Released, it is re-cut in halves (never
    the refused range again); the bisection survives a restart and ends with an ack."""
    path = tmp_path / "b.sqlite3"
    ob, rec = await Outbox.open(path)
    s0 = rec.next_seq
    await ob.checkpoint(CheckpointWrite(chunks=[chunk_body(i) for i in range(8)]), now=1.0)
    whole = await cut(ob)
    assert whole is not None and whole.chunks == 8
    await ob.release(whole)
    assert ob.batch is None and ob.chunk_count == 8  # nothing lost
    half = await cut(ob)
    assert half is not None and (half.first_seq, half.last_seq) == (s0, s0 + 3)
    assert half.key(GW) != whole.key(GW)
    await ob.release(half)
    await ob.close()

    ob, rec = await Outbox.open(path)
    assert rec.chunks == 8 and ob.batch is None
    quarter = await cut(ob)
    assert quarter is not None and (quarter.first_seq, quarter.last_seq) == (s0, s0 + 1)
    await ob.acknowledged(quarter)
    # Acknowledged: the bisection is over, the rest goes in one batch again.
    rest = await cut(ob)
    assert rest is not None and (rest.first_seq, rest.last_seq) == (s0 + 2, s0 + 7)
    await ob.close()


async def test_cut_batch_is_immutable_until_acknowledged(tmp_path: Path) -> None:
    """G7: once cut, a batch keeps its seqs, bytes and key through more checkpoints, other
    limits, a later clock and a restart; the next batch starts right after it."""
    path = tmp_path / "b.sqlite3"
    ob, rec = await Outbox.open(path)
    s0 = rec.next_seq
    await ob.checkpoint(CheckpointWrite(chunks=[chunk_body(i) for i in range(3)]), now=1.0)
    first = await ob.cut(gateway_id=GW, max_chunks=10, max_bytes=10**6, now=T0)
    assert first is not None and (first.first_seq, first.last_seq) == (s0, s0 + 2)
    assert first.messages == 3
    key = first.key(GW)
    assert key == f"{GW}:{s0}-{s0 + 2}"

    await ob.checkpoint(CheckpointWrite(chunks=[chunk_body(i) for i in range(3, 10)]), now=2.0)
    again = await ob.cut(gateway_id=GW, max_chunks=1000, max_bytes=10**9, now=T0 + 60)
    assert again == first and ob.batch == first
    assert again is not None and again.body == first.body and again.key(GW) == key
    # Smaller limits do not shrink it either (only release() after a 413/400/422 does).
    assert await ob.cut(gateway_id=GW, max_chunks=1, max_bytes=1, now=T0 + 61) == first
    # Only the cut batch can be acknowledged.
    other = Batch(s0, s0 + 3, s0 + 3, 4, 4, first.body)
    with pytest.raises(ValueError, match="not the cut batch"):
        await ob.acknowledged(other)
    assert ob.chunk_count == 10
    await ob.close()

    ob, rec = await Outbox.open(path)
    assert rec.chunks == 10
    assert ob.batch == first
    restarted = await ob.cut(gateway_id=GW, max_chunks=1000, max_bytes=10**9, now=T0 + 3600)
    assert restarted is not None
    assert restarted.body == first.body and restarted.key(GW) == key
    assert (restarted.first_seq, restarted.last_seq, restarted.chunks) == (s0, s0 + 2, 3)
    await ob.acknowledged(restarted)
    assert ob.chunk_count == 7 and ob.batch is None
    nxt = await cut(ob)
    assert nxt is not None and (nxt.first_seq, nxt.last_seq) == (s0 + 3, s0 + 9)
    assert [c["t"] for c in batch_doc(nxt)["chunks"]] == [int(T0) + i for i in range(3, 10)]
    assert nxt.messages == 7
    await ob.close()


async def test_seqs_never_repeat_after_the_file_is_deleted(tmp_path: Path) -> None:
    """The `.seq` side file keeps the high-water mark when the database goes away (deleted by
    hand, moved aside): the new file starts above it, even if the wall clock went back."""
    path = tmp_path / "b.sqlite3"
    ob, rec = await Outbox.open(path, now=T0)
    await ob.checkpoint(CheckpointWrite(chunks=[chunk_body(i) for i in range(3)]), now=T0)
    b = await cut(ob)
    assert b is not None
    used = list(range(b.first_seq, b.last_seq + 1))
    assert len(used) == 3
    await ob.close()
    seq_file = tmp_path / "b.sqlite3.seq"
    assert seq_file.exists()
    for f in side_files(path):
        f.unlink(missing_ok=True)

    # The wall clock stepped back an hour: the floor alone would reuse seqs.
    ob, rec = await Outbox.open(path, now=T0 - 3600)
    assert rec.new_file and rec.chunks == 0
    assert rec.next_seq > max(used)
    await ob.checkpoint(CheckpointWrite(chunks=[chunk_body(9)]), now=T0)
    b = await cut(ob)
    assert b is not None and b.first_seq == rec.next_seq > max(used)
    used.append(b.first_seq)
    await ob.close()

    # Without the side file, the wall-clock floor still starts a new file high.
    for f in [*side_files(path), seq_file]:
        f.unlink(missing_ok=True)
    later = T0 + 86400
    ob, rec = await Outbox.open(path, now=later)
    assert rec.new_file
    assert rec.next_seq >= int(later) * SEQ_PER_SECOND_FLOOR
    assert rec.next_seq > max(used)
    await ob.close()


async def test_seqs_never_repeat_after_a_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    ob, _ = await Outbox.open(path, now=T0)
    await ob.checkpoint(CheckpointWrite(chunks=[chunk_body(i) for i in range(3)]), now=T0)
    last = ob.last_seq
    await ob.close()
    for f in side_files(path)[1:]:
        f.unlink(missing_ok=True)
    path.write_bytes(b"garbage!" * 1024)
    ob, rec = await Outbox.open(path, now=T0 - 3600)
    assert rec.moved_aside is not None and rec.new_file
    assert rec.next_seq > last
    await ob.close()


async def test_checkpoint_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    ob, first = await Outbox.open(path)
    bad = CheckpointWrite(
        chunks=[b'{"a":1}'],
        journal_upserts=[(1, 10)],
        snapshots=[(("c", "s", 1, 0), b"{}"), (("c", "s", 1, 0, "extra"), b"{}")],  # type: ignore[list-item]
    )
    with pytest.raises(OutboxError):
        await ob.checkpoint(bad, now=1.0)
    assert ob.chunk_count == 0 and ob.last_seq == first.next_seq - 1
    await ob.close()
    ob, rec = await Outbox.open(path)
    assert rec.chunks == 0 and rec.journal == [] and rec.open_windows == []
    assert rec.next_seq == first.next_seq  # the rolled-back chunk's seq was not consumed
    await ob.close()


async def test_state_tables_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    ob, _ = await Outbox.open(path, synchronous="normal")
    await ob.checkpoint(
        CheckpointWrite(snapshots=[(("c", "s", 5, 0), b'{"w":1}')], journal_upserts=[(9, -3)]),
        now=1.0,
    )
    await ob.save_marks({"c": {"closed_before": 6.0}})
    await ob.close()
    ob, rec = await Outbox.open(path)
    assert rec.open_windows == [b'{"w":1}']
    assert rec.journal == [(9, -3)]
    assert rec.marks == {"c": {"closed_before": 6.0}}
    await ob.checkpoint(
        CheckpointWrite(drop_snapshots=[("c", "s", 5, 0)], journal_deletes=[(9, -3)]), now=2.0
    )
    await ob.clear_marks()
    await ob.close()
    ob, rec = await Outbox.open(path)
    assert rec.open_windows == [] and rec.journal == [] and rec.marks == {}
    await ob.close()


async def test_corrupt_file_is_moved_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    path.write_bytes(b"this is not a database" * 1000)
    ob, rec = await Outbox.open(path)
    assert rec.moved_aside is not None and rec.moved_aside.exists()
    assert rec.moved_aside.name.startswith("b.sqlite3.corrupt-")
    assert rec.moved_aside.read_bytes().startswith(b"this is not a database")
    await ob.checkpoint(CheckpointWrite(chunks=[b"{}"]), now=1.0)
    assert ob.chunk_count == 1
    await ob.close()


async def test_a_locked_outbox_is_an_error_and_is_not_moved_aside(tmp_path: Path) -> None:
    """Only corruption moves the file aside (G11). A database another process holds (here: an
    exclusive-mode connection that has written) is refused with OutboxError and left alone.
    Takes the store's busy timeout (10 s) to fail."""
    path = tmp_path / "b.sqlite3"
    ob, _ = await Outbox.open(path)
    await ob.checkpoint(CheckpointWrite(chunks=[chunk_body(i) for i in range(3)]), now=1.0)
    await ob.close()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO meta (key, value) VALUES ('holder', x'01')")
        holder.execute("COMMIT")  # exclusive mode: the lock stays after the commit
        with pytest.raises(OutboxError, match="locked"):
            await Outbox.open(path)
    finally:
        holder.close()
    assert moved_aside(tmp_path) == []
    # The file is intact: every chunk is still there once the other process let go.
    ob, rec = await Outbox.open(path)
    assert rec.moved_aside is None and not rec.new_file and rec.chunks == 3
    await ob.close()


async def test_an_unopenable_path_is_an_error_and_is_not_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    path.mkdir()
    (path / "keep").write_text("x")
    with pytest.raises(OutboxError, match="cannot open"):
        await Outbox.open(path)
    assert path.is_dir() and (path / "keep").read_text() == "x"
    assert moved_aside(tmp_path) == []


async def test_newer_schema_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE keep (x)")
    con.execute("INSERT INTO keep VALUES (42)")
    con.commit()
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(OutboxError, match="schema version 99"):
        await Outbox.open(path)
    # Not corruption: the file stays where it is, untouched.
    assert moved_aside(tmp_path) == []
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 99
    assert con.execute("SELECT x FROM keep").fetchall() == [(42,)]
    con.close()


async def test_version_1_file_is_migrated_and_keeps_its_rows_and_seqs(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE chunks (seq INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL,
                             body BLOB NOT NULL);
        CREATE TABLE open_windows (camera TEXT NOT NULL, stream TEXT NOT NULL, t INTEGER NOT NULL,
            rev INTEGER NOT NULL, state BLOB NOT NULL, PRIMARY KEY (camera, stream, t, rev))
            WITHOUT ROWID;
        CREATE TABLE ack_journal (mid INTEGER PRIMARY KEY, digest INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE dead_letters (seq INTEGER PRIMARY KEY, created_at REAL NOT NULL,
            body BLOB NOT NULL, status INTEGER, response TEXT);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
        INSERT INTO chunks (created_at, body)
            VALUES (1.0, CAST('{"a":1}' AS BLOB)), (1.0, CAST('{"a":2}' AS BLOB));
        INSERT INTO ack_journal VALUES (7, 70);
        PRAGMA user_version = 1;
        """
    )
    con.close()
    ob, rec = await Outbox.open(path, now=T0)
    assert not rec.new_file and rec.moved_aside is None
    assert rec.chunks == 2 and rec.next_seq == 3 and rec.journal == [(7, 70)]
    b = await cut(ob)
    assert b is not None and (b.first_seq, b.last_seq) == (1, 2)
    assert batch_doc(b)["chunks"] == [{"seq": 1, "a": 1}, {"seq": 2, "a": 2}]
    await ob.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 5
    assert "seq_end" in {r[1] for r in con.execute("PRAGMA table_info(chunks)")}
    assert "seq_end" in {r[1] for r in con.execute("PRAGMA table_info(dead_letters)")}
    # v3: the journal is keyed by (mid, digest): two rows under one id can be kept.
    con.execute("INSERT INTO ack_journal VALUES (7, 71)")
    assert sorted(con.execute("SELECT mid, digest FROM ack_journal")) == [(7, 70), (7, 71)]
    con.close()


async def test_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    ob, _ = await Outbox.open(path, synchronous="full")
    await ob.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == 5
    con.close()


async def test_checkpoint_and_forwarder_can_interleave_on_one_connection(tmp_path: Path) -> None:
    """The checkpoint loop and the forwarder share the outbox; their transactions must not
    nest, and a cut must never see a checkpoint's chunks before its COMMIT."""
    ob, rec = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    s0 = rec.next_seq
    sent: list[int] = []

    async def writer() -> None:
        for i in range(200):
            await ob.checkpoint(
                CheckpointWrite(chunks=[b'{"a":1}'] * 5, journal_upserts=[(i, i)]), now=float(i)
            )

    async def forwarder() -> None:
        while len(sent) < 1000:
            b = await ob.cut(gateway_id=GW, max_chunks=7, max_bytes=10**6, now=T0)
            if b is not None:
                seqs = [c["seq"] for c in batch_doc(b)["chunks"]]
                assert seqs == list(range(b.first_seq, b.last_seq + 1))
                sent.extend(seqs)
                await ob.acknowledged(b)
            else:
                await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(writer(), forwarder()), timeout=60)
    assert sent == list(range(s0, s0 + 1000))
    assert ob.chunk_count == 0 and ob.batch is None
    await ob.close()


def test_seq_side_file_is_written_before_the_seqs_are_used(tmp_path: Path) -> None:
    """The reserved high-water mark in `<outbox>.seq` is always above the last seq used."""
    from agent.durable.store import Store

    path = tmp_path / "b.sqlite3"
    store, _ = Store.open(path, now=T0)
    try:
        for n in (1, 5, 100):
            store.checkpoint(CheckpointWrite(chunks=[b"{}"] * n), now=T0)
            reserved = int((tmp_path / "b.sqlite3.seq").read_text())
            assert reserved >= store.last_seq
    finally:
        store.close()
    assert os.path.getsize(tmp_path / "b.sqlite3.seq") > 0


def _chunk_bodies(n: int, start: int = 0) -> list[bytes]:
    from agent.core.model import Chunk, encode_chunk

    out = []
    for i in range(start, start + n):
        c = Chunk(f"cam-{i % 50}", "det", 1764126000 + i, 1)
        c.add_times(1764126000.0 + i, 1764126000.5 + i)
        c.add_category("cls", "x" * 200, 32)
        out.append(encode_chunk(c))
    return out


def test_the_effective_quota_follows_the_free_disk_space(tmp_path: Path) -> None:
    """A disk smaller than buffer.max_bytes is normal on a gateway: usage is measured against
    what fits (file + free space - a reserve for deletes), so compaction and backpressure start
    before SQLite hits a full disk."""
    from agent.durable.store import Store

    store, _ = Store.open(tmp_path / "b.sqlite3", synchronous="off")
    store.set_quota(1024**3)
    store.checkpoint(CheckpointWrite(chunks=_chunk_bodies(200)), now=1.0)
    store.disk_free = lambda d: 10 * 1024**3
    roomy = store.usage()
    assert roomy < 0.01
    store.disk_free = lambda d: 0  # the disk is full: only what the file holds counts
    assert store.usage() >= 0.9
    assert store.max_pages * store.page_size < 1024**3
    store.close()


def test_the_wal_stays_within_the_quota(tmp_path: Path) -> None:
    from agent.durable.store import Store

    path = tmp_path / "b.sqlite3"
    store, _ = Store.open(path, synchronous="off")
    store.set_quota(1024**2)  # WAL allowance: 128 KiB
    largest = 0
    for i in range(40):
        store.checkpoint(CheckpointWrite(chunks=_chunk_bodies(10, i * 10)), now=1.0)
        largest = max(largest, (tmp_path / "b.sqlite3-wal").stat().st_size)
    assert largest <= 4 * store.wal_allowance, largest  # SQLite's default would reach ~4 MB
    store.close()


def test_an_outbox_deleted_under_the_agent_is_reported(tmp_path: Path) -> None:
    from agent.durable.store import Store

    path = tmp_path / "b.sqlite3"
    store, _ = Store.open(path, synchronous="off")
    store.set_quota(1024**3)
    store.usage()
    assert store.problem is None
    path.unlink()
    store.usage()
    assert store.problem is not None and "deleted or replaced" in store.problem
    store.close()


async def test_a_cut_batch_survives_the_upgrade_that_renames_its_gateway_column(
    tmp_path: Path,
) -> None:
    """Up to schema v4 the cut batch kept its gateway id in a column named `body`; the v5
    migration renames it, and the batch comes back with the same seqs, bytes and key (G7)."""
    path = tmp_path / "b.sqlite3"
    ob, _ = await Outbox.open(path)
    await ob.checkpoint(CheckpointWrite(chunks=[chunk_body(i) for i in range(3)]), now=1.0)
    first = await ob.cut(gateway_id=GW, max_chunks=10, max_bytes=10**6, now=T0)
    assert first is not None
    await ob.close()
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE batch RENAME COLUMN gateway_id TO body")
    con.execute("PRAGMA user_version=4")
    con.commit()
    con.close()
    ob, rec = await Outbox.open(path)
    assert ob.batch == first and ob.batch is not None and ob.batch.body == first.body
    assert rec.chunks == 3
    await ob.close()
    con = sqlite3.connect(path)
    assert "gateway_id" in {r[1] for r in con.execute("PRAGMA table_info(batch)")}
    assert con.execute("PRAGMA user_version").fetchone()[0] == 5
    con.close()


@pytest.mark.parametrize(("code", "full"), [(errno.EIO, False), (errno.ENOSPC, True)])
async def test_a_failing_seq_reservation_is_the_outbox_failing_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, full: bool
) -> None:
    """The seq reservation beside the database is plain file I/O: a disk that fails or is full
    there raised OSError out of the checkpoint, and the agent died (an adversary). It is an
    OutboxError like SQLite's, `full` on ENOSPC, and nothing is written."""
    ob, _ = await Outbox.open(tmp_path / "b.sqlite3")

    def failing(upto: int) -> None:
        raise OSError(code, os.strerror(code), str(tmp_path / "b.sqlite3.seq"))

    monkeypatch.setattr(ob.store, "_reserve", failing)
    ob.store._reserved = 0  # the next chunk needs a reservation
    with pytest.raises(OutboxError) as refused:
        await ob.checkpoint(CheckpointWrite(chunks=[chunk_body(1)]), now=1.0)
    assert refused.value.full is full and ob.chunk_count == 0
    await ob.close()

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.outbox import CheckpointWrite, Outbox, OutboxError


async def test_seq_is_never_reused_across_deletes_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    ob, rec = await Outbox.open(path)
    assert rec.next_seq == 1
    await ob.checkpoint(CheckpointWrite(chunks=[b'{"a":1}', b'{"a":2}', b'{"a":3}']), now=1.0)
    rows = await ob.read_batch(after_seq=0, max_chunks=10, max_bytes=10**6)
    assert [s for s, _ in rows] == [1, 2, 3]
    await ob.delete_through(3)
    assert ob.chunk_count == 0
    await ob.close()
    ob, rec = await Outbox.open(path)
    assert rec.next_seq == 4 and rec.chunks == 0
    await ob.checkpoint(CheckpointWrite(chunks=[b'{"a":4}']), now=2.0)
    rows = await ob.read_batch(after_seq=0, max_chunks=10, max_bytes=10**6)
    assert rows == [(4, b'{"a":4}')]
    await ob.close()


async def test_batch_respects_byte_limit_but_always_makes_progress(tmp_path: Path) -> None:
    ob, _ = await Outbox.open(tmp_path / "b.sqlite3")
    await ob.checkpoint(CheckpointWrite(chunks=[b"x" * 100] * 5), now=1.0)
    rows = await ob.read_batch(after_seq=0, max_chunks=10, max_bytes=250)
    assert [s for s, _ in rows] == [1, 2]
    rows = await ob.read_batch(after_seq=0, max_chunks=10, max_bytes=10)
    assert [s for s, _ in rows] == [1]
    await ob.close()


async def test_checkpoint_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    ob, _ = await Outbox.open(path)
    bad = CheckpointWrite(
        chunks=[b'{"a":1}'],
        journal_upserts=[(1, 10)],
        snapshots=[(("c", "s", 1, 0), b"{}"), (("c", "s", 1, 0, "extra"), b"{}")],  # type: ignore[list-item]
    )
    with pytest.raises(sqlite3.Error):
        await ob.checkpoint(bad, now=1.0)
    assert ob.chunk_count == 0
    await ob.close()
    ob, rec = await Outbox.open(path)
    assert rec.chunks == 0 and rec.journal == [] and rec.open_windows == [] and rec.next_seq == 1
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
    await ob.checkpoint(CheckpointWrite(drop_snapshots=[("c", "s", 5, 0)]), now=2.0)
    await ob.close()
    ob, rec = await Outbox.open(path)
    assert rec.open_windows == []
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


async def test_newer_schema_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(OutboxError, match="schema version 99"):
        await Outbox.open(path)


async def test_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    ob, _ = await Outbox.open(path, synchronous="full")
    await ob.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    con.close()


async def test_checkpoint_and_forwarder_can_interleave_on_one_connection(tmp_path: Path) -> None:
    """The checkpoint loop and the forwarder share the connection; their transactions must not
    nest, and a reader must never see a checkpoint's chunks before its COMMIT."""
    import asyncio

    ob, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    sent: list[int] = []

    async def writer() -> None:
        for i in range(200):
            await ob.checkpoint(
                CheckpointWrite(chunks=[b"{}"] * 5, journal_upserts=[(i, i)]), now=float(i)
            )

    async def forwarder() -> None:
        while len(sent) < 1000:
            rows = await ob.read_batch(after_seq=0, max_chunks=7, max_bytes=10**6)
            if rows:
                sent.extend(s for s, _ in rows)
                await ob.delete_through(rows[-1][0])
            else:
                await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(writer(), forwarder()), timeout=60)
    assert sent == list(range(1, 1001))
    assert ob.chunk_count == 0
    await ob.close()

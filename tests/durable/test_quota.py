"""Bounded disk: compaction keeps every count, drop_oldest counts what it drops, a full outbox
refuses writes without losing anything, and a corrupt file never stops the agent."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from agent.core.errors import OutboxError
from agent.core.model import Chunk, encode_chunk
from agent.durable.compaction import compact_range, counted_messages
from agent.durable.outbox import Batch, CheckpointWrite, Outbox
from agent.sim.cloud import load_merged
from devtools.procs import wait_for
from devtools.truth import compare_per_stream
from tests.helpers import AgentFactory, assert_exact, publish, wait_delivered

T0 = 1764126000


def chunk(cam: int, stream: str, t: int, n: int = 5) -> bytes:
    c = Chunk(f"cam-{cam:03d}", stream, t, 1)
    for i in range(n):
        c.add_times(t + i / n, t + i / n + 0.05)
        c.add_number("conf", 0.5 + i / 100, t + i / n)
        c.add_category("cls", ("person", "car", "dog")[i % 3], 32)
    return encode_chunk(c)


def totals(bodies: list[bytes]) -> tuple[int, Counter[str], float]:
    count, cats, conf = 0, Counter[str](), 0.0
    for b in bodies:
        d = msgspec.json.decode(b)
        count += d["count"]
        cats.update(d["cat"].get("cls", {}))
        conf += d["num"]["conf"]["sum"] if "conf" in d["num"] else 0.0
    return count, cats, conf


def all_rows(ob: Outbox) -> list[tuple[int, int | None, bytes]]:
    """Every row of the outbox, (seq, seq_end, body), in seq order."""
    return [(int(s), e, bytes(b)) for s, e, b in ob.store.dump()["chunks"]]


def all_bodies(ob: Outbox) -> list[bytes]:
    return [b for _, _, b in all_rows(ob)]


def assert_tiled(rows: list[tuple[int, int | None, bytes]], first: int, last: int) -> None:
    """The rows' [seq, seq_end] ranges cover first..last exactly, in order, without a hole."""
    expect = first
    for seq, seq_end, _ in rows:
        end = seq if seq_end is None else seq_end
        assert seq == expect and end >= seq, (seq, seq_end, expect)
        expect = end + 1
    assert expect == last + 1, (expect, last)


async def fill(ob: Outbox, until_usage: float) -> list[bytes]:
    written: list[bytes] = []
    t = T0
    while await ob.usage() < until_usage:
        batch = [chunk(c, s, t) for c in range(10) for s in ("det", "motion")]
        await ob.checkpoint(CheckpointWrite(chunks=batch), now=float(t))
        written += batch
        t += 1
    return written


async def cut(ob: Outbox, max_chunks: int) -> Batch:
    b = await ob.cut(gateway_id="gw", max_chunks=max_chunks, max_bytes=10**9, now=float(T0))
    assert b is not None
    return b


def test_compact_range_keeps_totals() -> None:
    rows = [(100 + i, 100 + i, float(i), chunk(i % 3, "det", T0 + i // 3)) for i in range(60)]
    new = compact_range(rows, coarser=10)
    assert new is not None
    bodies = [b for _, b in new]
    got, want = totals(bodies), totals([b for *_, b in rows])
    assert got[0] == want[0] == 300 and got[1] == want[1]
    assert got[2] == pytest.approx(want[2])
    assert len(new) == 6  # 3 cameras x 2 ten-second windows
    docs = [msgspec.json.decode(b) for b in bodies]
    assert all(d["width_s"] == 10 and d["t"] % 10 == 0 for d in docs)
    assert all("compacted" in d.get("flags", []) for d in docs)
    # In the order of their first member, stamped with the oldest member's created_at.
    assert [(d["camera"], d["t"]) for d in docs] == [
        (f"cam-{c:03d}", T0 // 10 * 10 + w) for w in (0, 10) for c in range(3)
    ]
    assert new[0][0] == 0.0
    # Coarser again: the 10-second chunks merge into 60-second ones, still every count.
    again = compact_range([(200 + i, 200 + i, c, b) for i, (c, b) in enumerate(new)], coarser=60)
    assert again is not None and totals([b for _, b in again])[:2] == got[:2]
    assert all(msgspec.json.decode(b)["width_s"] == 60 for _, b in again)


def test_compact_range_returns_none_when_nothing_shrinks_and_keeps_unreadable_rows() -> None:
    distinct = [(i, i, 0.0, chunk(i, "det", T0)) for i in range(5)]  # one chunk per camera
    assert compact_range(distinct, coarser=10) is None
    junk = (10, 10, 5.0, b"not json")
    rows = [(1, 1, 1.0, chunk(1, "det", T0)), junk, (2, 2, 2.0, chunk(1, "det", T0 + 1))]
    new = compact_range(rows, coarser=10)
    assert new is not None and len(new) == 2
    assert (5.0, b"not json") in new
    assert totals([b for _, b in new if b != b"not json"])[0] == 10
    assert counted_messages([b for *_, b in rows]) == 10


async def test_compaction_under_a_tiny_quota_keeps_every_count(tmp_path: Path) -> None:
    ob, rec = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    await ob.set_quota(2 * 1024**2)
    written = await fill(ob, until_usage=0.9)
    before = ob.chunk_count
    last = ob.last_seq
    made = await ob.make_room(target=0.3, drop_oldest=False)
    assert made.dropped == 0 and made.dropped_messages == 0 and made.compacted > 0
    assert await ob.usage() <= 0.3
    assert ob.chunk_count == before - made.compacted
    got = totals(all_bodies(ob))
    want = totals(written)
    assert got[0] == want[0] and got[1] == want[1]
    assert got[2] == pytest.approx(want[2])
    widths = Counter(msgspec.json.decode(b)["width_s"] for b in all_bodies(ob))
    assert set(widths) <= {1, 10, 60} and (widths[10] or widths[60])
    # G8: the rows still stand for every seq written, contiguous, in order.
    assert_tiled(all_rows(ob), rec.next_seq, last)
    # ... and the batches cut from them tile it too.
    b = await cut(ob, 10**6)
    assert (b.first_seq, b.last_seq, b.chunks) == (rec.next_seq, last, ob.chunk_count)
    assert b.messages == want[0]
    await ob.close()


async def test_compaction_never_touches_the_cut_batch(tmp_path: Path) -> None:
    """G7 + G8: rows of the cut batch keep their seqs and bytes (the cloud may already hold
    them under that key); the rows after the cut are rewritten so that their ranges tile the
    seqs right after the batch, and every count survives."""
    path = tmp_path / "b.sqlite3"
    ob, rec = await Outbox.open(path, synchronous="off")
    await ob.set_quota(2 * 1024**2)
    written = await fill(ob, until_usage=0.9)
    last = ob.last_seq
    batch = await cut(ob, 300)
    assert (batch.first_seq, batch.last_seq) == (rec.next_seq, rec.next_seq + 299)
    cut_rows = [r for r in all_rows(ob) if r[0] <= batch.last_row]
    assert len(cut_rows) == 300

    made = await ob.make_room(target=0.1, drop_oldest=False)
    assert made.compacted > 0 and made.dropped == 0
    assert ob.batch == batch
    rows = all_rows(ob)
    assert [r for r in rows if r[0] <= batch.last_row] == cut_rows  # untouched, byte for byte
    after = [r for r in rows if r[0] > batch.last_row]
    assert len(after) < len(written) - 300
    assert any(e is not None and e > s for s, e, _ in after)  # compacted rows declare ranges
    assert_tiled(after, batch.last_seq + 1, last)
    got, want = totals([b for *_, b in rows]), totals(written)
    assert got[0] == want[0] and got[1] == want[1] and got[2] == pytest.approx(want[2])

    # The cut batch is sent unchanged; the next batch starts right after it.
    assert await cut(ob, 10**6) == batch
    await ob.acknowledged(batch)
    nxt = await cut(ob, 10**6)
    assert (nxt.first_seq, nxt.last_seq) == (batch.last_seq + 1, last)
    doc = msgspec.json.decode(nxt.body)
    assert_tiled([(c["seq"], c.get("seq_end"), b"") for c in doc["chunks"]], nxt.first_seq, last)
    assert sum(c["count"] for c in doc["chunks"]) + batch.messages == want[0]
    await ob.close()


async def test_drop_oldest_counts_what_it_drops(tmp_path: Path) -> None:
    ob, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    await ob.set_quota(2 * 1024**2)
    written = await fill(ob, until_usage=0.9)
    made = await ob.make_room(target=0.02, drop_oldest=True)
    assert made.dropped > 0
    remaining = totals(all_bodies(ob))[0]
    assert remaining + made.dropped_messages == totals(written)[0]
    await ob.close()


async def test_drop_oldest_never_drops_the_cut_batch(tmp_path: Path) -> None:
    ob, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    await ob.set_quota(2 * 1024**2)
    written = await fill(ob, until_usage=0.9)
    batch = await cut(ob, 200)
    cut_rows = [r for r in all_rows(ob) if r[0] <= batch.last_row]
    made = await ob.make_room(target=0.0, drop_oldest=True)  # drop everything it may
    assert made.dropped > 0 and ob.batch == batch
    rows = all_rows(ob)
    assert rows == cut_rows
    assert totals([b for *_, b in rows])[0] + made.dropped_messages == totals(written)[0]
    assert await cut(ob, 10**6) == batch
    await ob.close()


async def test_full_outbox_refuses_writes_and_keeps_what_it_has(tmp_path: Path) -> None:
    ob, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    await ob.set_quota(1024**2)
    t = T0
    with pytest.raises(OutboxError, match="full") as refused:
        while True:
            await ob.checkpoint(CheckpointWrite(chunks=[chunk(1, "det", t)] * 50), now=1.0)
            t += 1
    assert refused.value.full  # SQLite's words, and the flag the checkpoint acts on
    count = ob.chunk_count
    assert count > 0 and len(all_bodies(ob)) == count
    assert ob.last_seq == all_rows(ob)[-1][0]  # the refused write used no seq
    # The checkpoint makes room first (compaction), then the cloud drains it: room again.
    await ob.make_room(target=0.75, drop_oldest=False)
    while (b := await cut(ob, 10**6) if ob.chunk_count else None) is not None:
        await ob.acknowledged(b)
    assert ob.chunk_count == 0
    await ob.checkpoint(CheckpointWrite(chunks=[chunk(1, "det", t)]), now=2.0)
    assert ob.chunk_count == 1
    await ob.close()


async def test_a_full_outbox_that_cannot_be_compacted_can_still_be_drained(tmp_path: Path) -> None:
    """overflow = backpressure (the default): the outbox fills up with chunks no compaction
    can merge (one 60-second chunk per camera). The cloud must still be able to drain it."""
    ob, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    await ob.set_quota(1024**2)
    cam = 0
    with pytest.raises(OutboxError, match="full"):
        while True:
            cs = [Chunk(f"cam-{cam + k:05d}", "det", T0 // 60 * 60, 60) for k in range(20)]
            for c in cs:
                c.add_times(T0, T0 + 0.05)
            await ob.checkpoint(CheckpointWrite(chunks=[encode_chunk(c) for c in cs]), now=1.0)
            cam += 20
    made = await ob.make_room(target=0.75, drop_oldest=False)
    assert made.compacted == 0 and made.dropped == 0
    b = await ob.cut(gateway_id="gw", max_chunks=500, max_bytes=1024**2, now=1.0)
    assert b is not None
    await ob.acknowledged(b)
    await ob.close()


def test_agent_starts_over_a_corrupt_outbox(agents: AgentFactory, tmp_path: Path) -> None:
    agents.buffer.write_bytes(b"\x00garbage" * 4096)
    agent = agents.start()
    status = agent.status()
    assert status is not None
    assert status["outbox"]["events"]["outbox_corrupt_moved_aside"] == 1
    aside = list(agents.buffer.parent.glob("buffer.sqlite3.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"\x00garbage")
    assert "moved it to" in agent.log_text()
    expected = publish(agents.broker, tmp_path, cameras=10, rate=10, duration_s=2, seed=21)
    assert_exact(wait_delivered(agents.receiver, expected))
    assert agent.stop() == 0


def test_agent_compacts_under_a_tiny_quota_and_loses_nothing(
    agents: AgentFactory, tmp_path: Path
) -> None:
    """With the cloud down and a 1 MiB quota the agent compacts its backlog into coarser
    windows; when the cloud returns, every message arrives exactly once."""
    agents.receiver.kill()
    # "window" mode: 1 MiB cannot hold the saved state of 400 open streams' windows besides
    # the chunks ("message" mode stalls at 94 %: README, sizing the quota).
    cfg = agents.config({"buffer": {"max_bytes": "1MiB", "durability": "window"}}, name="tiny.toml")
    agent = agents.start(cfg)
    # 200 cameras x 2 streams x 6 s of 1-second chunks is well over a 1 MiB quota (the backlog
    # alone must pass 90 %, however slowly a loaded machine publishes).
    pub_expected = publish(agents.broker, tmp_path, cameras=200, rate=10, duration_s=6, seed=22)
    wait_for(
        lambda: (agent.status() or {}).get("outbox", {}).get("compacted_chunks", 0) > 0,
        timeout_s=30, what="compaction under the quota",
    )  # fmt: skip
    agents.receiver.start()
    want = sum(e.count for e in pub_expected.values())
    wait_for(lambda: agents.receiver.messages() >= want, timeout_s=90, what="the backlog")
    # Compacted chunks cover 10 or 60 s, so compare per camera and stream over the run.
    assert_exact(compare_per_stream(pub_expected, load_merged(agents.receiver.db)))
    assert agent.stop() == 0


def test_a_disk_smaller_than_the_quota_fills_drains_and_loses_nothing(
    agents: AgentFactory, tmp_path: Path
) -> None:
    """The outbox on a 2 MB filesystem with buffer.max_bytes left at 1 GiB, the cloud down
    while 100 cameras publish: the effective quota follows the disk, compaction and
    backpressure hold everything, and when the cloud returns every message arrives once."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"needs a tmpfs mount (root): {mounted.stderr.decode().strip()}")
    try:
        agents.receiver.kill()
        cfg = agents.config({"buffer": {"path": disk / "buffer.sqlite3"}}, name="small-disk.toml")
        agent = agents.start(cfg)
        expected = publish(agents.broker, tmp_path, cameras=100, rate=10, duration_s=12, seed=23)
        status = agent.status() or {}
        assert agent.running
        assert status["outbox"]["effective_max_bytes"] < 2 * 1024**2
        agents.receiver.start()
        want = sum(e.count for e in expected.values())
        wait_for(lambda: agents.receiver.messages() >= want, timeout_s=90, what="the backlog")
        assert_exact(compare_per_stream(expected, load_merged(agents.receiver.db)))
        assert agent.stop() == 0
        assert "Traceback" not in agent.log_text()
    finally:
        agents.stop_all()
        subprocess.run(["umount", "-l", str(disk)], check=False)

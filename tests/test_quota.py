"""Bounded disk: compaction keeps every count, drop_oldest counts what it drops, a full outbox
refuses writes without losing anything, and a corrupt file never stops the agent."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from agent.model import Chunk, encode_chunk
from agent.outbox import CheckpointWrite, Outbox
from agent.quota import plan_compaction
from agent.sim.cloud import load_merged
from agent.sim.procs import wait_for
from agent.sim.truth import compare_per_stream
from tests.conftest import AgentFactory
from tests.helpers import assert_exact, publish, wait_delivered

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


async def all_bodies(ob: Outbox) -> list[bytes]:
    return [b for _, b in await ob.read_batch(after_seq=0, max_chunks=10**7, max_bytes=10**12)]


async def fill(ob: Outbox, until_usage: float) -> list[bytes]:
    written: list[bytes] = []
    t = T0
    while await ob.usage() < until_usage:
        batch = [chunk(c, s, t) for c in range(10) for s in ("det", "motion")]
        await ob.checkpoint(CheckpointWrite(chunks=batch), now=float(t))
        written += batch
        t += 1
    return written


def test_plan_compaction_keeps_totals() -> None:
    rows = [(i + 1, chunk(i % 3, "det", T0 + i // 3)) for i in range(60)]
    plan = plan_compaction(rows, width=1, coarser=10)
    kept = {s: b for s, b in rows if s not in plan.deletes}
    kept.update(plan.updates)
    assert totals(list(kept.values()))[0] == totals([b for _, b in rows])[0] == 300
    assert len(kept) == 6  # 3 cameras x 2 ten-second windows
    assert all(msgspec.json.decode(b)["width_s"] == 10 for _, b in plan.updates)


async def test_compaction_under_a_tiny_quota_keeps_every_count(tmp_path: Path) -> None:
    ob, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    await ob.set_quota(2 * 1024**2)
    written = await fill(ob, until_usage=0.9)
    before = ob.chunk_count
    compacted, dropped, _ = await ob.make_room(target=0.3, drop_oldest=False)
    assert dropped == 0 and compacted > 0
    assert await ob.usage() <= 0.3
    assert ob.chunk_count == before - compacted
    got = totals(await all_bodies(ob))
    want = totals(written)
    assert got[0] == want[0] and got[1] == want[1]
    assert got[2] == pytest.approx(want[2])
    widths = Counter(msgspec.json.decode(b)["width_s"] for b in await all_bodies(ob))
    assert set(widths) <= {1, 10, 60} and (widths[10] or widths[60])
    seqs = [s for s, _ in await ob.read_batch(after_seq=0, max_chunks=10**7, max_bytes=10**12)]
    assert seqs == sorted(seqs)
    await ob.close()


async def test_drop_oldest_counts_what_it_drops(tmp_path: Path) -> None:
    ob, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    await ob.set_quota(2 * 1024**2)
    written = await fill(ob, until_usage=0.9)
    _, dropped, dropped_msgs = await ob.make_room(target=0.02, drop_oldest=True)
    assert dropped > 0
    remaining = totals(await all_bodies(ob))[0]
    assert remaining + dropped_msgs == totals(written)[0]
    await ob.close()


async def test_full_outbox_refuses_writes_and_keeps_what_it_has(tmp_path: Path) -> None:
    ob, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    await ob.set_quota(1024**2)
    t = T0
    with pytest.raises(sqlite3.OperationalError, match="full"):
        while True:
            await ob.checkpoint(CheckpointWrite(chunks=[chunk(1, "det", t)] * 50), now=1.0)
            t += 1
    count = ob.chunk_count
    assert count > 0 and len(await all_bodies(ob)) == count
    # The cloud drains it: room again.
    await ob.delete_through(ob.last_seq)
    await ob.checkpoint(CheckpointWrite(chunks=[chunk(1, "det", t)]), now=2.0)
    assert ob.chunk_count == 1
    await ob.close()


def test_agent_starts_over_a_corrupt_outbox(agents: AgentFactory, tmp_path: Path) -> None:
    agents.buffer.write_bytes(b"\x00garbage" * 4096)
    agent = agents.start()
    status = agent.status()
    assert status is not None
    assert status["ingest"]["rejects"]["outbox_corrupt_moved_aside"] == 1
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
    cfg = agents.config(name="tiny.toml")
    cfg.write_text(cfg.read_text().replace("[buffer]\n", '[buffer]\nmax_bytes = "1MiB"\n'))
    agent = agents.start(cfg)
    pub_expected = publish(agents.broker, tmp_path, cameras=100, rate=10, duration_s=6, seed=22)
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

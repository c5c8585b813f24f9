"""The checkpoint against a real SQLite outbox: bounded transactions, acks after commit."""

from __future__ import annotations

from pathlib import Path

from agent.config.settings import Settings
from agent.core.stats import Stats
from agent.durable.checkpoint import Checkpointer, piece_bytes
from agent.durable.outbox import Outbox
from agent.intake.acks import AckLedger
from agent.windows.aggregate import Aggregator, StreamSpec

T0 = 1_764_126_000.0
SPEC = StreamSpec(categorical=("cls",), max_categories=1000)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def wall(self) -> float:
        return T0 + self.t

    def mono(self) -> float:
        return self.t


async def test_a_backlog_larger_than_the_quota_commits_in_pieces_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """Closed windows worth three times a 1 MiB quota: each transaction holds one bounded
    piece, so the outbox fills, the cloud drains it, and the rest commits — no transaction
    ever grows past the quota (the old agent retried one ever-growing transaction forever)."""
    settings = Settings(gateway_id="gw-test")
    settings = settings.model_copy(
        update={"buffer": settings.buffer.model_copy(update={"max_bytes": 1024**2})}
    )
    outbox, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    await outbox.set_quota(1024**2)
    agg = Aggregator(window_s=1, allowed_lateness_s=0, idle_close_s=5)
    ledger = AckLedger()
    acked: list[int] = []
    clock = Clock()

    async def confirmed() -> bool:  # the broker has the PUBACKs: journal rows may go
        return True

    ckpt = Checkpointer(
        settings=settings, outbox=outbox, aggregator=agg, ledger=ledger, stats=Stats(),
        send_acks=acked.extend, can_ack=lambda: True, clock=clock,
        confirm_acks=confirmed,
    )  # fmt: skip
    messages = 0
    for cam in range(1000):
        for i in range(60):  # 60 long categories: ~3 KiB per chunk, ~3 MiB in all
            cls = f"category-{i:03d}-with-a-long-name-of-forty"
            w = agg.add(f"cam-{cam}", "det", SPEC, {"cls": cls}, T0 + cam % 3, T0, mono=0.0)
            assert not isinstance(w, str)
            messages += 1
            ledger.track(messages % 65535 + 1, 1, messages, w, 0.0)
    await ckpt.checkpoint(final=True)  # commits pieces until the quota is full
    assert 0 < ckpt.carried < 1000, "some pieces committed, the rest waits in memory"
    delivered = 0
    for _ in range(100):
        while (batch := await outbox.cut(
            gateway_id="gw-test", max_chunks=500, max_bytes=10**7, now=T0
        )) is not None:  # fmt: skip
            delivered += batch.messages
            await outbox.acknowledged(batch)
        if not ckpt.carried:
            break
        await ckpt.checkpoint(final=True)
    assert ckpt.carried == 0
    assert delivered == messages
    assert len(acked) == messages  # every message acked, once its chunk was committed
    assert piece_bytes(1024**2) == 128 * 1024
    await outbox.close()


async def test_a_commit_refused_as_full_below_the_high_water_mark_makes_room(
    tmp_path: Path,
) -> None:
    """Usage just under the 90 % mark, so no compaction — yet the next piece does not fit and
    the commit fails as full. The next cycle must make room (compact), not retry the same
    failing commit forever (seen once in CI under load)."""
    from agent.core.model import Chunk, encode_chunk
    from agent.durable.outbox import CheckpointWrite

    settings = Settings(gateway_id="gw-test")
    settings = settings.model_copy(
        update={"buffer": settings.buffer.model_copy(update={"max_bytes": 1024**2})}
    )
    outbox, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")
    await outbox.set_quota(1024**2)
    t = int(T0)
    while await outbox.usage() < 0.895:  # compactable 1-second chunks of a few cameras
        chunks = []
        for cam in range(5 if await outbox.usage() < 0.87 else 1):
            c = Chunk(f"cam-{cam}", "det", t, 1)
            c.add_times(t, t + 0.1)
            c.add_category("cls", "x" * 300, 32)
            chunks.append(encode_chunk(c))
        await outbox.checkpoint(CheckpointWrite(chunks=chunks), now=T0)
        t += 1
    assert await outbox.usage() <= 0.9
    agg = Aggregator(window_s=1, allowed_lateness_s=0, idle_close_s=5)
    ledger = AckLedger()
    stats = Stats()

    async def confirmed() -> bool:
        return True

    ckpt = Checkpointer(
        settings=settings, outbox=outbox, aggregator=agg, ledger=ledger, stats=stats,
        send_acks=lambda mids: None, can_ack=lambda: True, clock=Clock(),
        confirm_acks=confirmed,
    )  # fmt: skip
    for cam in range(400):  # ~120 KiB of closed windows: pieces larger than the room left
        for i in range(3):
            cls = f"category-{i:03d}-" + "y" * 80
            w = agg.add(f"new-{cam}", "det", SPEC, {"cls": cls}, T0, T0, mono=0.0)
            assert not isinstance(w, str)
    await ckpt.checkpoint(final=True)
    for _ in range(5):
        if not ckpt.carried:
            break
        await ckpt.checkpoint(final=True)
    assert stats.outbox_events["checkpoint_failed"] >= 1  # the situation really arose
    assert ckpt.carried == 0
    assert stats.compacted_chunks > 0
    await outbox.close()


async def test_failed_checkpoints_leave_nothing_of_theirs_in_memory(tmp_path: Path) -> None:
    """A failing disk fails every cycle (four a second): each failure's traceback held its
    cycle's frames (chunk bodies, journal lists) in a reference cycle only a full collection
    frees, and memory grew ~20 MiB/s (issue #24). No frame of a failed cycle may outlive it."""
    import gc
    import sqlite3

    from agent.durable.checkpoint import Checkpointer as Ckpt

    settings = Settings(gateway_id="gw-test")
    outbox, _ = await Outbox.open(tmp_path / "b.sqlite3", synchronous="off")

    def failing(*_args: object, **_kw: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    outbox.store.checkpoint = failing  # type: ignore[method-assign]
    agg = Aggregator(window_s=1, allowed_lateness_s=0, idle_close_s=5)
    stats = Stats()
    ckpt = Ckpt(
        settings=settings, outbox=outbox, aggregator=agg, ledger=AckLedger(), stats=stats,
        send_acks=lambda mids: None, can_ack=lambda: True, clock=Clock(),
    )  # fmt: skip
    for cam in range(50):
        w = agg.add(f"cam-{cam}", "det", SPEC, {"cls": "person"}, T0, T0, mono=0.0)
        assert not isinstance(w, str)
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            await ckpt.checkpoint(final=True)
        held = [
            o for o in gc.get_objects()
            if type(o).__name__ == "frame" and o.f_code is Ckpt._cycle.__code__
        ]  # fmt: skip
    finally:
        gc.enable()
    assert stats.outbox_events["checkpoint_failed"] == 5
    assert ckpt.failing_since is not None and ckpt.last_failure == "disk I/O error"
    assert held == [], f"{len(held)} frames of failed cycles still alive"
    await outbox.close()

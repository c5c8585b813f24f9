"""The checkpoint: commit closed chunks (and, under ack pressure, open-window state) together
with the ack journal in one transaction, then send the PUBACKs of what is now durable, in
receive order. Also keeps the outbox under buffer.max_bytes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable

from agent.acks import AckLedger
from agent.aggregate import DURABLE, Aggregator, Window
from agent.config import Settings
from agent.faults import NO_FAULTS, Faults
from agent.forward import Forwarder
from agent.ingest import MqttSession
from agent.model import Chunk, encode_chunk
from agent.notify import Notifier
from agent.outbox import CheckpointWrite, Outbox, WindowKey
from agent.stats import RateLimitedLog, Stats

log = logging.getLogger(__name__)

# Outbox usage (live pages / quota) above which room is made, and the level it is brought to.
HIGH_WATER = 0.9
LOW_WATER = 0.75


def _key(w: Chunk) -> WindowKey:
    return (w.camera, w.stream, w.t, w.rev)


class Checkpointer:
    """Commit closed chunks (and, under ack pressure, open-window state), then send the acks."""

    def __init__(
        self,
        *,
        settings: Settings,
        outbox: Outbox,
        aggregator: Aggregator,
        ledger: AckLedger,
        session: MqttSession,
        forwarder: Forwarder,
        stats: Stats,
        clock: Callable[[], float] = time.time,
        faults: Faults = NO_FAULTS,
    ) -> None:
        self._faults = faults
        self._s = settings
        self._outbox = outbox
        self._agg = aggregator
        self._ledger = ledger
        self._session = session
        self._forwarder = forwarder
        self._stats = stats
        self._clock = clock
        self._pressure = int(settings.mqtt.receive_maximum * settings.buffer.ack_pressure_ratio)
        self._max_ack_delay_s = settings.buffer.max_ack_delay_ms / 1000
        # Windows closed but not yet committed (a failed commit is retried, nothing is lost).
        self._carry: list[Window] = []
        self._warn = RateLimitedLog(log)
        self._lock = asyncio.Lock()

    async def run(self, notifier: Notifier) -> None:
        interval_s = self._s.buffer.checkpoint_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            if self._faults.reached("stall_checkpoint"):
                log.warning("fault point stall_checkpoint reached: the checkpoint loop hangs")
                await asyncio.Future()
            await self.checkpoint()
            notifier.progress()

    async def checkpoint(self, *, final: bool = False) -> None:
        async with self._lock:
            await self._checkpoint(final)

    async def _make_room(self) -> None:
        """Keep the outbox under buffer.max_bytes: compact, then drop_oldest or backpressure."""
        usage = await self._outbox.usage()
        self._stats.buffer_usage = usage
        if usage <= HIGH_WATER:
            self._stats.buffer_full = False
            return
        drop = self._s.buffer.overflow == "drop_oldest"
        compacted, dropped, dropped_msgs = await self._outbox.make_room(
            target=LOW_WATER, drop_oldest=drop
        )
        st = self._stats
        st.compacted_chunks += compacted
        if dropped:
            st.drops["buffer_full_oldest_chunks"] += dropped
            st.drops["buffer_full_oldest_messages"] += dropped_msgs
        usage = await self._outbox.usage()
        st.buffer_usage = usage
        st.buffer_full = usage > HIGH_WATER
        self._warn.warning(
            "quota",
            "outbox at %.0f%% of buffer.max_bytes: compacted %d chunks into coarser windows, "
            "dropped %d oldest chunks (%d messages)%s",
            usage * 100, compacted, dropped, dropped_msgs,
            "; holding MQTT acks (backpressure)" if st.buffer_full and not drop else "",
        )  # fmt: skip

    async def _checkpoint(self, final: bool) -> None:
        await self._make_room()
        now = self._clock()
        agg, ledger = self._agg, self._ledger
        closed = self._carry + (agg.close_all() if final else agg.close_due(now))
        self._carry = []
        snapshots: list[tuple[Window, int]] = []
        if not final and len(ledger):
            oldest = ledger.oldest_recv_t()
            if len(ledger) >= self._pressure or (
                oldest is not None and now - oldest >= self._max_ack_delay_s
            ):
                snapshots = [(w, w.version) for w in ledger.holders() if isinstance(w, Window)]
        undo = [(w, w.durable_version, w.saved) for w in closed] + [
            (w, w.durable_version, w.saved) for w, _ in snapshots
        ]
        write = CheckpointWrite(
            chunks=[encode_chunk(w) for w in closed],
            drop_snapshots=[_key(w) for w in closed if w.saved],
            snapshots=[(_key(w), encode_chunk(w)) for w, _ in snapshots],
        )
        for w in closed:
            w.durable_version = DURABLE
        for w, version in snapshots:
            w.durable_version = version
        ackable = ledger.ackable()
        journal, write.journal_deletes = ledger.journal_changes()
        write.journal_upserts = [(p.mid, p.digest) for p in journal]
        conn = ledger.connection
        try:
            await self._outbox.checkpoint(write, now=now)
        except sqlite3.Error as e:
            if "full" in str(e):
                self._stats.buffer_full = True
            for w, version, saved in undo:
                w.durable_version = version
                w.saved = saved
            self._carry = closed
            ledger.journal_failed(write.journal_deletes)
            self._stats.rejects["checkpoint_failed"] += 1
            self._warn.warning(
                "ckpt",
                "checkpoint failed (%s); %d closed windows kept in memory, acks held",
                e,
                len(closed),
            )
            return
        ledger.journal_written(journal)
        if ackable:
            self._faults.hit("after_commit")
        for w in closed:
            w.saved = False
        for w, _ in snapshots:
            w.saved = True
        st = self._stats
        st.checkpoints += 1
        st.sample(time.monotonic())
        st.chunks_committed += len(closed)
        if snapshots:
            st.snapshots_written += len(snapshots)
            log.info("ack pressure: saved %d open windows to ack early", len(snapshots))
        if ackable and ledger.connection == conn and self._session.connected:
            for p in ledger.pop_acked(len(ackable)):
                self._session.ack(p.mid, p.qos)
            st.acked += len(ackable)
        if closed:
            self._forwarder.wake.set()

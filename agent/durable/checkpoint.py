"""The checkpoint: commit closed chunks (and, under ack pressure, open-window state) together
with the ack journal in one transaction, then send the PUBACKs of what is now durable, in
receive order. Also keeps the outbox under buffer.max_bytes.

Correct by construction rather than by undo:
- a cycle decides what to write without changing any in-memory state; only after the commit
  returns does it mark windows durable, update the ledger and ack;
- a window closed in this cycle is never also snapshotted: each count has one durable home
  (G9) — its chunk, or its snapshot, which the same transaction drops when the chunk lands;
- a commit, once started, is finished even if the task is cancelled; stopping never cancels a
  cycle (`stop()` lets the running cycle end, G10).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from agent.config.settings import Settings
from agent.core.clock import SYSTEM_CLOCK, Clock
from agent.core.errors import OutboxError
from agent.core.model import encode_chunk
from agent.core.ratelimit import RateLimitedLog
from agent.core.reasons import OutboxEvent
from agent.core.stats import Stats
from agent.durable.outbox import CheckpointWrite, Outbox, WindowKey
from agent.intake.acks import AckLedger, JournalPlan, Pending
from agent.windows.aggregate import DURABLE, Aggregator, Window

log = logging.getLogger(__name__)
# Past this, the acked-but-unconfirmed list keeps only current entries (a slow barrier).
UNCONFIRMED_COMPACT_AT = 2 * 65_536

T = TypeVar("T")

# Outbox usage (live pages / quota) above which room is made, and the level it is brought to.
HIGH_WATER = 0.9
LOW_WATER = 0.75


def piece_bytes(max_bytes: int) -> int:
    """The most one checkpoint transaction writes (chunk and snapshot bodies): an eighth of the
    quota, at most 4 MiB; a single window larger than that still goes alone."""
    return min(4 * 1024**2, max_bytes // 8)


def _key(w: Window) -> WindowKey:
    return (w.camera, w.stream, w.t, w.rev)


async def finish(aw: Awaitable[T]) -> T:
    """Await `aw` to its end even if the caller is cancelled meanwhile; then re-raise the
    cancellation. A commit that may have happened must be seen to have happened."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            if task.done():
                result = task.result()
                break
            cancelled = True
    if cancelled:
        # The caller applies the result first (see Checkpointer._cycle), then stops.
        current = asyncio.current_task()
        if current is not None:
            current.cancel()
    return result


def _take(windows: list[Window], budget: int) -> list[bytes]:
    """Encoded bodies of the first windows within `budget` bytes (at least one)."""
    out: list[bytes] = []
    for w in windows:
        body = encode_chunk(w)
        if out and len(body) > budget:
            break
        out.append(body)
        budget -= len(body)
    return out


class Checkpointer:
    """Commit closed chunks (and, under ack pressure, open-window state), then send the acks."""

    def __init__(
        self,
        *,
        settings: Settings,
        outbox: Outbox,
        aggregator: Aggregator,
        ledger: AckLedger,
        stats: Stats,
        send_acks: Callable[[list[int]], None],
        can_ack: Callable[[], bool],
        on_commit: Callable[[], None] = lambda: None,
        confirm_acks: Callable[[], Awaitable[bool]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        fault: Callable[[str], None] = lambda point: None,
        stalled: Callable[[], bool] = lambda: False,
    ) -> None:
        self._s = settings
        self._outbox = outbox
        self._agg = aggregator
        self._ledger = ledger
        self._stats = stats
        self._send_acks = send_acks
        self._can_ack = can_ack
        self._on_commit = on_commit
        self._confirm_acks = confirm_acks
        # Readiness this component owns: over the high-water mark or a commit refused as
        # full (backpressure); and when the last checkpoint committed (liveness).
        self.buffer_full = False
        self.last_commit_mono: float | None = None
        # Since when checkpoint commits fail (monotonic), and the last error: a failing disk
        # is a readiness problem within seconds (G13). None while they succeed.
        self.failing_since: float | None = None
        self.last_failure: str | None = None
        # Open windows under ack pressure left out of the last cycle's snapshots because they
        # did not fit in its piece: their messages' acks wait for the next cycles, rightly (a
        # transaction never grows past a piece, whatever the backlog).
        self.snapshots_held = 0
        # Acks sent on the current connection whose arrival at the broker is not yet known.
        self._unconfirmed: list[Pending] = []
        self._unconfirmed_conn = -1
        self._confirmed_conn = -1
        self._clock = clock
        self._fault = fault
        self._stalled = stalled
        self._pressure = int(settings.mqtt.receive_maximum * settings.buffer.ack_pressure_ratio)
        # buffer.durability = "message": every cycle saves the open windows holding unacked
        # messages (the ack-pressure path, always), so a message's only copy never stays in
        # the broker longer than a checkpoint (a power cut takes the broker's unsaved queue).
        self._every_cycle = settings.buffer.durability == "message"
        self._max_ack_delay_s = settings.buffer.max_ack_delay_ms / 1000
        self.piece_bytes = piece_bytes(settings.buffer.max_bytes)
        # Windows closed but not yet committed (a failed commit is retried, nothing is lost).
        self._carry: list[Window] = []
        self._warn = RateLimitedLog(log)
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._confirm_task: asyncio.Task[None] | None = None
        self._capped_said = False

    async def run(self, progress: Callable[[], None] = lambda: None) -> None:
        """A cycle every checkpoint_interval_ms until `stop()`; the running cycle always ends."""
        interval_s = self._s.buffer.checkpoint_interval_ms / 1000
        while not self._stop.is_set():
            try:
                async with asyncio.timeout(interval_s):
                    await self._stop.wait()
            except TimeoutError:
                pass
            if self._stop.is_set():
                return
            if self._stalled():
                log.warning("fault point stall_checkpoint reached: the checkpoint loop hangs")
                await self._stop.wait()
                return
            await self.checkpoint()
            progress()

    @property
    def carried(self) -> int:
        """Closed windows waiting for a commit (after a failed one, or beyond one piece)."""
        return len(self._carry)

    def stop(self) -> None:
        """Ask `run` to return after the cycle in progress (if any) has finished."""
        self._stop.set()
        if self._confirm_task is not None:
            self._confirm_task.cancel()  # the final cycles confirm for themselves

    async def checkpoint(self, *, final: bool = False) -> None:
        """One cycle; the final one (shutdown) goes on, piece by piece, until nothing closed is
        left in memory or a commit fails."""
        async with self._lock:
            ok = await self._cycle(final)
            while final and ok and self._carry:
                ok = await self._cycle(final)

    async def _make_room(self) -> None:
        """Keep the outbox under buffer.max_bytes: compact, then drop_oldest or backpressure."""
        st = self._stats
        usage = await self._outbox.usage()
        st.buffer_usage = usage
        # Below the high water mark nothing needs doing — unless the last commit found the
        # outbox full (a piece can be bigger than the room left under the mark).
        if usage <= HIGH_WATER and not self.buffer_full:
            self.buffer_full = False
            return
        drop = self._s.buffer.overflow == "drop_oldest"
        made = await self._outbox.make_room(target=LOW_WATER, drop_oldest=drop)
        st.compacted_chunks += made.compacted
        if made.dropped:
            st.drops["buffer_full_oldest_chunks"] += made.dropped
            st.drops["buffer_full_oldest_messages"] += made.dropped_messages
        usage = await self._outbox.usage()
        st.buffer_usage = usage
        self.buffer_full = usage > HIGH_WATER
        self._warn.warning(
            "quota",
            "outbox at %.0f%% of buffer.max_bytes: compacted %d chunks into coarser windows, "
            "dropped %d oldest chunks (%d messages)%s",
            usage * 100, made.compacted, made.dropped, made.dropped_messages,
            "; holding MQTT acks (backpressure)" if self.buffer_full and not drop else "",
        )  # fmt: skip

    def _under_pressure(self, now_mono: float) -> bool:
        ledger = self._ledger
        if not len(ledger):
            return False
        if len(ledger) >= self._pressure:
            return True
        oldest = ledger.oldest_recv_t()
        return oldest is not None and now_mono - oldest >= self._max_ack_delay_s

    async def _cycle(self, final: bool) -> bool:
        try:
            await self._make_room()
        except OutboxError as e:
            self.buffer_full = True
            self._warn.warning("room", "could not make room in the outbox (%s)", e)
        if final:
            # The shutdown's cycles confirm first, as they go: what is confirmed leaves the
            # journal, and the last pieces may need that room in the quota.
            await self._confirm()
        else:
            self._start_confirm()
        now, mono = self._clock.wall(), self._clock.mono()
        agg, ledger = self._agg, self._ledger
        closed = self._carry + (agg.close_all() if final else agg.close_due(mono))
        # Until committed, the closed windows live here and only here.
        self._carry = closed
        all_closed = {id(w) for w in closed}
        snapshots: list[tuple[Window, int]] = []
        # While the outbox is full acks are held anyway: saving every window would only take
        # the room the closed windows' chunks need ("message" mode acks by window meanwhile).
        every_cycle = self._every_cycle and not self.buffer_full
        if not final and (every_cycle or self._under_pressure(mono)):
            snapshots = [
                (w, w.version)
                for w in ledger.holders()
                if isinstance(w, Window) and id(w) not in all_closed
            ]
        # One transaction holds at most a piece of bounded size: a backlog of closed windows
        # (after failed commits) never grows into a transaction larger than the quota.
        chunks, snap_bodies = self._piece(closed, snapshots)
        closed, rest = closed[: len(chunks)], closed[len(chunks) :]
        self.snapshots_held = len(snapshots) - len(snap_bodies)
        snapshots = snapshots[: len(snap_bodies)]
        plan = ledger.plan_journal(
            closing={id(w) for w in closed}, snapshots={id(w): v for w, v in snapshots}
        )
        stale_snapshots = [k for w in closed for k in w.saved_keys]
        stale_snapshots += [k for w, _ in snapshots for k in w.saved_keys if k != _key(w)]
        write = CheckpointWrite(
            chunks=chunks,
            drop_snapshots=stale_snapshots,
            snapshots=[
                (_key(w), body) for (w, _), body in zip(snapshots, snap_bodies, strict=True)
            ],
            journal_upserts=[(p.mid, p.digest) for p in plan.upserts],
            journal_deletes=plan.deletes,
        )
        replays = ledger.replays
        if replays is not None:
            write.history = replays.plan_row(plan)
            write.history_expired = replays.expired_upto
        try:
            await finish(self._outbox.checkpoint(write, now=now))
        except OutboxError as e:
            if e.full:
                self.buffer_full = True
            if self.failing_since is None:
                self.failing_since = mono
            self.last_failure = str(e)
            self._stats.outbox_events[OutboxEvent.checkpoint_failed] += 1
            self._warn.warning(
                "ckpt",
                "checkpoint failed (%s); %d closed windows kept in memory, acks held",
                e,
                len(self._carry),
            )
            # Its traceback's frames hold this cycle's chunk bodies and journal lists, and the
            # exception sits in a reference cycle (with finish()'s task) that only a full
            # collection frees: a failing disk, four cycles a second, grew memory ~20 MiB/s.
            e.__traceback__ = None
            return False
        if self.failing_since is not None:
            log.info(
                "checkpoint committed again after %.1f s of failures",
                self._clock.mono() - self.failing_since,
            )
            self.failing_since = self.last_failure = None
        self._committed(closed, rest, snapshots, plan, write)
        if write.journal_upserts or closed:
            self._fault("after_commit")
        self._ack()
        return True

    def _piece(
        self, closed: list[Window], snapshots: list[tuple[Window, int]]
    ) -> tuple[list[bytes], list[bytes]]:
        """Encoded chunks and snapshots up to the piece budget: chunks take at most half of it
        while snapshots wait (they are what frees acks under pressure), and each kind gets at
        least one body, so both always make progress."""
        budget = min(self.piece_bytes, self._outbox.txn_budget)
        half = budget // 2 if snapshots else budget
        chunks = _take(closed, half)
        used = sum(len(b) for b in chunks)
        snaps = _take([w for w, _ in snapshots], budget - used)
        return chunks, snaps

    def _committed(
        self,
        closed: list[Window],
        rest: list[Window],
        snapshots: list[tuple[Window, int]],
        plan: JournalPlan,
        write: CheckpointWrite,
    ) -> None:
        """Apply a committed cycle to memory (synchronously: nothing can interleave)."""
        self._carry = rest
        replays = self._ledger.replays
        if replays is not None:
            replays.written(write.history, write.history_expired)
            if replays.capped and not self._capped_said:
                self._capped_said = True
                log.warning(
                    "replay memory capped at %d keys (buffer.max_bytes / 128): a broker snapshot "
                    "older than the last of them would be counted again; raise buffer.max_bytes",
                    replays.max_keys,
                )
        for w in closed:
            w.durable_version = DURABLE
            w.saved_keys = []
        for w, version in snapshots:
            w.durable_version = max(w.durable_version, version)
            w.saved_keys = [_key(w)]
        self._ledger.journal_written(plan)
        st = self._stats
        st.checkpoints += 1
        st.chunks_committed += len(closed)
        self.last_commit_mono = self._clock.mono()
        st.sample(self.last_commit_mono)
        if snapshots:
            st.snapshots_written += len(snapshots)
            if not self._every_cycle:
                log.info("ack pressure: saved %d open windows to ack early", len(snapshots))
        if closed:
            self._on_commit()

    def _ack(self) -> None:
        """PUBACK every message now durable, in receive order, on the connection it came on."""
        ledger = self._ledger
        ackable = ledger.ackable()
        if not ackable or not self._can_ack():
            return
        # The queue holds only messages of the current connection (new_connection() empties it).
        popped = ledger.pop_acked(len(ackable))
        self._send_acks([p.mid for p in popped])
        self._stats.acked += len(popped)
        if ledger.connection != self._unconfirmed_conn:
            self._unconfirmed, self._unconfirmed_conn = [], ledger.connection
        self._unconfirmed.extend(popped)
        if len(self._unconfirmed) > UNCONFIRMED_COMPACT_AT:
            # A broker slow to answer the barrier (every round trip over its timeout) must not
            # grow this without bound: an entry superseded under its id is a no-op for
            # confirmed(), so keeping the current ones only (one per remembered key) is exact.
            self._unconfirmed = ledger.current(self._unconfirmed)

    def _start_confirm(self) -> None:
        """The confirming round trip runs beside the cycles, not before each: with Mosquitto
        2.0.11 sending past Receive Maximum, its answer can sit behind PUBLISHes the reader
        has no room for, and every cycle waited out its timeout (acks at 100 per 8 s with
        mqtt.receive_maximum = 100; an adversary's backlog never drained)."""
        t = self._confirm_task
        if t is None or t.done():
            self._confirm_task = asyncio.get_running_loop().create_task(
                self._confirm(), name="confirm-acks"
            )

    async def _confirm(self) -> None:
        """One round trip to the broker after the acks already sent (or after a reconnect):
        once it returns, those acks have been processed; their journal rows can go."""
        ledger = self._ledger
        conn = ledger.connection
        if self._confirm_acks is None or not self._can_ack():
            return
        stale_due = ledger.stale_pending and ledger.fresh_seen
        if not self._unconfirmed and self._confirmed_conn == conn and not stale_due:
            return
        sent = self._unconfirmed if self._unconfirmed_conn == conn else []
        self._unconfirmed = []
        # Taken before the round trip: only a new message that came before it proves the
        # broker's redeliveries are over.
        redeliveries_done = ledger.fresh_seen
        if await self._confirm_acks() and ledger.connection == conn:
            ledger.confirmed(sent, redeliveries_done=redeliveries_done)
            self._confirmed_conn = conn
        elif self._unconfirmed_conn == conn:
            self._unconfirmed = sent + self._unconfirmed

"""Which received MQTT messages may be acknowledged, in what order, and which are redeliveries.

A message may be acked once its effect is durable: its window's chunk is committed, or its
window's state is saved by an early-ack checkpoint, or it was rejected (nothing to keep). Acks
leave in receive order (MQTT 5 §4.6), so one slow window holds back the acks behind it until the
early-ack rule saves it.

Exactly once across reconnects and crashes: the broker redelivers an unacknowledged message with
the DUP flag and the same packet identifier. The ledger remembers each counted message by its key,
(packet identifier, digest of topic and payload); the checkpoint journals the keys it is about to
ack. A DUP delivery matching a remembered key was already counted: it is acked (once durable) but
not counted again.

Keys, not identifiers alone: a broker should reuse an identifier only after our PUBACK for it,
but Mosquitto 2.0.11 does not. Once more than Receive Maximum messages are queued for us, the
first PUBACKs make it send the whole queue, and past 65,535 unacknowledged messages it gives one
identifier to two of them; both are redelivered after a reconnect. Remembering one message per
identifier counted the other twice (an adversary's backlog replay: +87,870 of 149,945). A key is
forgotten when its ack is confirmed (a round trip after the PUBACK), or, for a key of an earlier
connection that was not redelivered, after the first round trip of a new connection.

Replays of an old broker snapshot (`ReplayMemory`): Mosquitto's persistence is a snapshot every
`autosave_interval`, not a log. A broker that dies and restores its last snapshot sends again,
with DUP and their original packet ids, the messages that were unacknowledged when the snapshot
was taken, though we acked them since and the broker had confirmed it. The ledger forgot those
keys at the confirmation; the replay memory keeps the key of every message acked within a horizon
of the broker's snapshot interval (appended per checkpoint, in the same transaction, and rebuilt
at start) and a DUP delivery that matches one is a replay: acked, not counted.

A message that was never counted can share its key with a remembered one (the same bytes on the
same topic, under an id the broker handed out again after a wrap of its 65,535 ids). Such a
message comes with DUP only if it was delivered before and not counted: either this process saw
it (then its key was revoked from the memory, in memory at once and on disk in the checkpoint that
saw it while it was not yet durable), or it was delivered after the last committed checkpoint
(then this process died or never read it). Those last ones are told apart by their place in the
broker's sequence: Mosquitto gives packet ids out one after another (`last_mid + 1`), and each
checkpoint records the last id the agent had received, the frontier; the broker resends its
in-flight messages in order, so the messages past the frontier come back as frontier + 1,
frontier + 2, ... . A DUP delivery with the next id past the frontier is new, whatever its key.
This rests on Mosquitto's sequential ids: with a broker that hands ids out otherwise, set
`mqtt.broker_autosave_interval_s = 0` (no replay memory; a restored snapshot is counted again).

A broker that restarted begins its ids anew (a restored snapshot's counter, or 1 without the
session), so the frontier says nothing about what a run took after a reconnect until the first
new message shows where the sequence is. At each CONNACK the outbox records that the epoch is
open (no message is taken until that checkpoint commits); the first new message closes it. A run
that starts from an outbox saying "open" cannot tell a replay from a new message its dead
predecessor took: until its first new message, it counts every DUP delivery that only the
journal or the memory knows, and counts it as a possible double (`possible_replays`, a figure).
The same while the broker reuses ids still in flight (Mosquitto 2.0.11 past Receive Maximum
queued): an id then names no single message, and no frontier is recorded. A double at worst,
never a loss, and counted.
"""

from __future__ import annotations

import bisect
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol


class Durability(Protocol):
    version: int
    durable_version: int


# (packet identifier, digest of topic and payload): what the journal remembers a message by.
Key = tuple[int, int]


# The last new message received from the broker's id sequence: (packet id, digest).
Frontier = tuple[int, int]


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One checkpoint's part of the replay memory, as the outbox keeps it (ack_history)."""

    seq: int
    # Traffic time (seconds, ReplayMemory.now).
    at: float
    frontier: Frontier | None
    # A (re)connect happened and no new message came since (AckLedger.open_epoch).
    epoch_open: bool
    acked: Sequence[int]
    revoked: Sequence[int]
    # Traffic time of the last jump in the broker's sequence of new messages (_check_fresh).
    jump_t: float | None = None


# MQTT packet ids run 1..65535; Mosquitto hands them out in sequence, skipping 0.
ID_SPACE = 65535
_MASK = (1 << 64) - 1


def replay_key(mid: int, digest: int) -> int:
    """(packet id, digest) as one signed 64-bit number: what the replay memory keeps."""
    x = (digest + mid * 0x9E3779B97F4A7C15) & _MASK
    return x - (1 << 64) if x >> 63 else x


# How far past the frontier a DUP delivery may be and still be taken as new (holes in the
# broker's sequence); a restored snapshot's run that starts there is counted, as a possible
# double (about 256 in 65,535 power cuts).
FRONTIER_SLACK = 256


def next_id(mid: int, space: int = ID_SPACE) -> int:
    return mid % space + 1


class ReplayMemory:
    """The keys of messages acked within `horizon_s`, as sorted arrays of 64-bit numbers (8
    bytes a message), sealed every `block_s`; the newest block is a set until sealed.

    A key is revoked when a new message with the same key was seen and not yet counted durably
    (see the module's docstring): blocks sealed before the revocation no longer answer for it;
    an add after it does."""

    def __init__(self, horizon_s: float, block_s: float = 5.0, max_keys: int = 1 << 62) -> None:
        self.horizon_s = horizon_s
        # A bound whatever the traffic time does: the keys live in the outbox, under its quota,
        # and while intake is paused traffic time stands still (an adversary filled a 2 MiB
        # outbox with them and the agent stopped for good).
        self.max_keys = max_keys
        # The cap dropped keys still within the horizon (a replay of them would be counted).
        self.capped = False
        self._block_s = block_s
        # (first seq, last seq, newest traffic time, sorted keys)
        self._sealed: deque[tuple[int, int, float, array[int]]] = deque()
        self._current: set[int] = set()
        self._current_first: int | None = None
        self._current_last = 0
        self._current_t = 0.0
        self._revoked: dict[int, int] = {}
        self._sealed_keys = 0
        # The outbox's ack_history: the next row's seq, the frontier its last row recorded,
        # and rows past the horizon not yet deleted.
        self.next_seq = 1
        self.frontier_written: Frontier | None = None
        self.epoch_open_written = False
        self.jump_t_written: float | None = None
        self.expired_upto: int | None = None
        # The horizon runs on traffic time: seconds of the broker's traffic, which stands still
        # from the last new message to the next. A broker that is down for an hour and comes
        # back with an old snapshot replays what was acked just before it died: an hour ago on
        # the wall clock, not in its traffic. `live`: the monotonic time of the last new
        # message (AckLedger.track sets it); traffic time continues the outbox's across runs.
        self.live = 0.0
        self._start = 0.0
        self._base = 0.0

    def now(self) -> float:
        """Traffic time (seconds)."""
        return self._base + (self.live - self._start)

    def plan_row(self, plan: JournalPlan) -> HistoryRow | None:
        """The ack_history row for a checkpoint carrying `plan` (None: nothing new)."""
        if not (
            plan.remembered
            or plan.revoked
            or plan.frontier != self.frontier_written
            or plan.epoch_open != self.epoch_open_written
            or plan.jump_t != self.jump_t_written
        ):
            return None
        return HistoryRow(
            self.next_seq, self.now(), plan.frontier, plan.epoch_open, plan.remembered,
            plan.revoked, plan.jump_t,
        )  # fmt: skip

    def written(self, row: HistoryRow | None, expired: int | None) -> None:
        """The checkpoint carrying `row` and the deletion of rows up to `expired` committed."""
        if expired is not None and expired == self.expired_upto:
            self.expired_upto = None
        if row is not None:
            self.revoke(row.revoked, row.seq)
            self.add(row.acked, row.seq, row.at)
            self.next_seq = row.seq + 1
            self.frontier_written = row.frontier
            self.epoch_open_written = row.epoch_open
            self.jump_t_written = row.jump_t
        gone = self.expire(self.now())
        if gone is not None:
            self.expired_upto = gone

    def restore(self, rows: Iterable[HistoryRow], mono: float) -> None:
        """Rebuild from the outbox's rows (oldest first); traffic time goes on from the last.
        `mono`: the monotonic time now."""
        self._start = self.live = mono
        rows = list(rows)
        if not rows:
            return
        self._base = rows[-1].at
        for row in rows:
            self.revoke(row.revoked, row.seq)
            self.add(row.acked, row.seq, row.at)
            self.frontier_written = row.frontier
            self.epoch_open_written = row.epoch_open
            self.jump_t_written = row.jump_t
        self.next_seq = rows[-1].seq + 1
        gone = self.expire(self.now())
        if gone is not None:
            self.expired_upto = gone

    def add(self, keys: Iterable[int], seq: int, t: float) -> None:
        """Keys acked (made durable) by checkpoint `seq` at traffic time `t`."""
        if self._current_first is None:
            self._current_first = seq
            self._current_t = t
        self._current.update(keys)
        self._current_last = seq
        if t - self._current_t >= self._block_s:
            self._seal(t)

    def revoke(self, keys: Iterable[int], seq: int) -> None:
        for k in keys:
            self._current.discard(k)
            self._revoked[k] = seq

    def _seal(self, t: float) -> None:
        if self._current_first is not None and self._current:
            block = array("q", sorted(self._current))
            self._sealed.append((self._current_first, self._current_last, t, block))
            self._sealed_keys += len(block)
        self._current = set()
        self._current_first = None

    def __contains__(self, key: int) -> bool:
        if key in self._current:
            return True
        revoked = self._revoked.get(key, -1)
        for _first, last, _t, block in reversed(self._sealed):
            i = bisect.bisect_left(block, key)
            if i < len(block) and block[i] == key:
                return last > revoked
        return False

    def expire(self, t: float) -> int | None:
        """Forget blocks older than the horizon at traffic time `t`; the last checkpoint seq
        they covered (the outbox rows up to it can go), or None."""
        if self._current_first is not None and t - self._current_t >= self._block_s:
            self._seal(t)
        gone = None
        if self._current_first is not None and len(self) > self.max_keys:
            self._seal(t)
        while self._sealed and (
            t - self._sealed[0][2] > self.horizon_s
            # The cap trims the oldest blocks, never the newest: a burst larger than the cap
            # (a backlog drained within one block) stays remembered whole.
            or (self._sealed_keys > self.max_keys and len(self._sealed) > 1)
        ):
            if t - self._sealed[0][2] <= self.horizon_s:
                self.capped = True
            _first, gone, _t, block = self._sealed.popleft()
            self._sealed_keys -= len(block)
        if gone is not None and self._revoked:
            oldest = self._sealed[0][0] if self._sealed else self._current_first
            if oldest is None:
                self._revoked.clear()
            else:
                self._revoked = {k: s for k, s in self._revoked.items() if s >= oldest}
        return gone

    def __len__(self) -> int:
        return self._sealed_keys + len(self._current)


class Pending:
    __slots__ = (
        "acked",
        "conn",
        "digest",
        "journaled",
        "mid",
        "qos",
        "recv_t",
        "version",
        "window",
    )

    def __init__(
        self, mid: int, qos: int, digest: int, window: Durability | None, recv_t: float, conn: int
    ) -> None:
        self.mid = mid
        self.qos = qos
        self.digest = digest
        self.window = window
        self.version = window.version if window is not None else 0
        self.recv_t = recv_t
        self.acked = False
        # True once (mid, digest) is in the on-disk ack journal.
        self.journaled = False
        self.conn = conn

    @property
    def key(self) -> Key:
        return (self.mid, self.digest)

    @property
    def durable(self) -> bool:
        w = self.window
        return self.acked or w is None or w.durable_version >= self.version


@dataclass
class JournalPlan:
    upserts: list[Pending]
    deletes: list[Key]
    keep_orphans: list[Pending]
    had_orphans: bool
    # The replay memory's part (empty without one): keys made durable, keys revoked, and the
    # last packet id received from the broker's sequence when the plan was made.
    remembered: list[int] = field(default_factory=list)
    revoked: list[int] = field(default_factory=list)
    frontier: Frontier | None = None
    epoch_open: bool = False
    jump_t: float | None = None


def _durable_after(
    closing: AbstractSet[int], snapshots: Mapping[int, int]
) -> Callable[[Pending], bool]:
    """The checkpoint's rule as a predicate: durable now, or made durable by this commit."""

    def will_be_durable(p: Pending) -> bool:
        if p.durable:
            return True
        w = p.window
        if w is None:
            return False
        if id(w) in closing:
            return True
        v = snapshots.get(id(w))
        return v is not None and p.version <= v

    return will_be_durable


def _durable_unjournaled(
    queue: Iterable[Pending], closing: AbstractSet[int], snapshots: Mapping[int, int]
) -> list[Pending]:
    """`[p for p in queue if not p.journaled and _durable_after(...)(p)]`, inlined (hot)."""
    out: list[Pending] = []
    append = out.append
    for p in queue:
        if p.journaled:
            continue
        w = p.window
        if p.acked or w is None or w.durable_version >= p.version:
            append(p)
            continue
        wid = id(w)
        if wid in closing:
            append(p)
        elif snapshots:
            v = snapshots.get(wid)
            if v is not None and p.version <= v:
                append(p)
    return out


class AckLedger:
    """Pending acks of the current connection, in receive order, plus the redelivery memory."""

    def __init__(
        self,
        journal: Iterable[tuple[int, int]] = (),
        *,
        replays: ReplayMemory | None = None,
        frontier: Frontier | None = None,
        id_space: int = ID_SPACE,
        distrust: bool = False,
    ) -> None:
        self.replays = replays
        # The broker's packet ids run 1..id_space (a model broker's may be smaller).
        self._space = id_space
        # The next packet id in the broker's sequence that no committed checkpoint has seen
        # (None: none seen yet): a DUP delivery under it is past the frontier, never counted.
        self._frontier = frontier
        self._unseen = next_id(frontier[0], id_space) if frontier is not None else None
        # Whether this connection's redeliveries are of our generation of the broker's ids: a
        # DUP delivery under the frontier's id with the frontier's digest says yes, with another
        # digest no (a restored snapshot's run; see `replayed`). None: not known.
        self._run_ours: bool | None = None
        # DUP deliveries past the frontier that the replay memory also knows (see `replayed`).
        self.possible_replays = 0
        # From a (re)connect until the first new message: the broker may have restarted and
        # begun its ids anew; the outbox must say so before a message is taken (`open_epoch`).
        self._epoch_open = False
        # This run started from an outbox that said so: until the first new message, a DUP
        # delivery known to the memory or the journal may be a message of such a new sequence,
        # delivered to the run that died and never counted: counted (a possible double).
        self._distrust = distrust
        # The broker reuses packet ids still in flight (Mosquitto 2.0.11, past Receive Maximum
        # queued): an id no longer names one message of the sequence, and the frontier means
        # nothing; none is recorded, and the memory's matches are counted (possible doubles).
        self._ids_reused = False
        # Traffic time of the last jump in the broker's sequence of new messages (_check_fresh);
        # kept in the outbox, so a run after a crash still checks what the broker sends again.
        self._jump_t: float | None = replays.jump_t_written if replays is not None else None
        self._by_key: dict[Key, Pending] = {}
        for mid, digest in journal:
            p = Pending(mid, 1, digest, None, 0.0, conn=-1)
            p.acked = p.journaled = True
            self._by_key[mid, digest] = p
        self._queue: deque[Pending] = deque()
        # Entries of earlier connections not yet journaled: their effect may still become
        # durable (their window closes) before the broker redelivers them, and a crash then
        # must not count them twice.
        self._orphans: list[Pending] = []
        self._conn = 0
        # Keys of new messages not yet durable: a journal row under the same key (an earlier
        # message with the same bytes under a reused id) is stale.
        self._new_keys: set[Key] = set()
        # Journal rows to delete: their acks are confirmed, their ids may be reused.
        self._prune: set[Key] = set()
        self._stale_after_reconnect = False
        # A new (not DUP) message arrived on this connection: the broker has redelivered what
        # it held in flight (it resends those first, in order, but only as Receive Maximum
        # allows: after a broker restart, Mosquitto sends the first Receive Maximum of them
        # and the rest as PUBACKs free room).
        self._fresh_seen = False

    def new_connection(self) -> None:
        """A new MQTT connection: acks owed on the old one are void; the broker redelivers."""
        self._conn += 1
        self._fresh_seen = False
        self._run_ours = None
        # Once each: a redelivery puts an orphan back in the queue (redelivered()), and a
        # connection that keeps dropping (a reader paused on a failing disk) would add it again
        # at every reconnect, tens of thousands of times.
        known = {id(p) for p in self._orphans}
        self._orphans.extend(p for p in self._queue if not p.journaled and id(p) not in known)
        self._queue.clear()
        self._stale_after_reconnect = True

    def redelivered(self, mid: int, digest: int, recv_t: float) -> bool:
        """If a DUP delivery was already counted, queue its ack and return True (do not count)."""
        p = self._by_key.get((mid, digest))
        if p is None:
            return False
        if self._distrust and p.conn == -1:
            self.possible_replays += 1  # a row of the run that died (see __init__)
            return False
        if p.conn != self._conn:
            p.conn = self._conn
            p.recv_t = recv_t
            self._queue.append(p)
        return True

    def _just_past(self, mid: int) -> bool:
        """`mid` is the next id past the frontier, or a few further: the broker spends ids on
        messages it never delivers to us (one over our Maximum Packet Size, one whose Message
        Expiry ran out in our queue), so the sequence we see has holes (an adversary: ids 464,
        465, 467; the message at 467 was lost when only 466 counted as past the frontier)."""
        unseen = self._unseen
        if unseen is None:
            return False
        return (mid - unseen) % self._space < max(1, min(FRONTIER_SLACK, self._space // 8))

    def past_frontier(self, mid: int, digest: int) -> bool:
        """A DUP delivery just past the frontier: delivered after the last checkpoint and never
        counted, whatever a journal row or the replay memory says (a new message with the bytes
        of one acked a wrap of ids ago). Unless the delivery under the frontier's id just before
        was another message: then this run is a restored snapshot's, and its ids met the
        frontier by chance."""
        replays = self.replays
        if replays is None or not self._just_past(mid) or self._run_ours is False:
            return False
        if self._ids_reused:
            return False
        mine = self._by_key.get((mid, digest))
        if mine is not None and mine.conn != -1:
            return False  # counted by this run: a redelivery, whatever the ids say
        # When the memory holds its key and nothing told whose run this is, it may also be a
        # restored run that starts, by a chance of FRONTIER_SLACK in 65,535, just past the
        # frontier: counted, and counted here as a possible double.
        if self._run_ours is None and (
            (mid, digest) in self._by_key or self._remembered(mid, digest, replays)
        ):
            self.possible_replays += 1
        self._seen(mid, digest)
        return True

    def replayed(self, mid: int, digest: int, recv_t: float) -> bool:
        """A DUP delivery not in the ledger: if it is a replay of a message acked within the
        horizon (a broker restored an older snapshot), queue its ack and return True."""
        replays = self.replays
        if replays is None or not self._remembered(mid, digest, replays):
            return False
        if self._distrust or self._ids_reused or self._frontier is None:
            # The run that died may have taken new messages we cannot tell (see __init__).
            self.possible_replays += 1
            return False
        # Acked again, and remembered again once this ack is confirmed (journaled like any
        # durable message, and pruned): the broker may save another snapshot before it.
        p = Pending(mid, 1, digest, None, recv_t, self._conn)
        self._by_key[mid, digest] = p
        self._queue.append(p)
        return True

    def dup_arrived(self, mid: int, digest: int) -> None:
        """Every DUP delivery, first: is this connection's run of redeliveries ours?"""
        f = self._frontier
        if f is not None and mid == f[0]:
            self._run_ours = digest == f[1]
            if self._run_ours:
                # The broker holds our frontier's message: its ids go on from ours.
                self._epoch_open = self._distrust = False

    @property
    def remembered(self) -> int:
        """Keys in the replay memory (0 without one)."""
        return len(self.replays) if self.replays is not None else 0

    def open_epoch(self) -> None:
        """At a CONNACK: the broker may have restarted and may hand its ids out anew (a
        restored snapshot's counter, or 1 without the session); the messages it sends before
        our next checkpoint are then past a frontier the outbox does not know. The next
        checkpoint records that the epoch is open; no message is taken until it has committed
        (`epoch_pending`; the simulation waits on `epoch_durable` before it connects), and the
        first new message closes it again."""
        if self.replays is not None:
            self._epoch_open = True

    @property
    def epoch_pending(self) -> bool:
        """An epoch opened that the outbox has not recorded yet: take no message."""
        r = self.replays
        return r is not None and self._epoch_open and not r.epoch_open_written

    @property
    def epoch_durable(self) -> bool:
        r = self.replays
        return r is None or (self._epoch_open and r.epoch_open_written)

    def _remembered(self, mid: int, digest: int, replays: ReplayMemory) -> bool:
        """Acked and confirmed within the horizon: in the memory, or on its way there (confirmed,
        its journal row to go and its key to be remembered by the next checkpoint: a replay in
        between was counted again)."""
        return (mid, digest) in self._prune or replay_key(mid, digest) in replays

    def _check_fresh(self, mid: int, digest: int, replays: ReplayMemory) -> None:
        """A new (not DUP) message that may have been counted before: a broker that restored a
        snapshot sends again, as new, what was still queued for us then (never sent, so without
        DUP), though we counted it since (an adversary: 2,000 of 2,000 counted twice,
        unreported). Its key cannot tell it from a new message with the same bytes under a
        reused id, so it is counted, as a possible double, when the ledger still holds its key
        (a journal row: acked, unconfirmed, or confirmed and not yet remembered), or, for a
        horizon after a jump in the broker's sequence of new messages, when the memory does."""
        key = (mid, digest)
        if key in self._by_key or key in self._prune:
            self.possible_replays += 1
            return
        if self._unseen is not None and mid != self._unseen:
            self._jump_t = replays.now()
        if self._jump_t is None:
            return
        if replays.now() - self._jump_t > replays.horizon_s:
            self._jump_t = None
        elif replay_key(mid, digest) in replays:
            self.possible_replays += 1

    def _seen(self, mid: int, digest: int) -> None:
        self._frontier = (mid, digest)
        self._unseen = next_id(mid, self._space)

    def track(
        self,
        mid: int,
        qos: int,
        digest: int,
        window: Durability | None,
        recv_t: float,
        dup: bool = False,
    ) -> None:
        """Remember a newly counted message whose ack is owed once it is durable."""
        if not dup:
            self._fresh_seen = True
            replays = self.replays
            if replays is not None:
                self._check_fresh(mid, digest, replays)
            self._seen(mid, digest)
            self._epoch_open = self._distrust = False
            unacked = len(self._queue) + len(self._orphans)
            if unacked >= self._space - 1:
                self._ids_reused = True
            elif self._ids_reused and unacked < self._space // 2:
                self._ids_reused = False
            if self.replays is not None:
                self.replays.live = recv_t
        p = Pending(mid, qos, digest, window, recv_t, self._conn)
        self._by_key[mid, digest] = p
        self._new_keys.add((mid, digest))
        self._queue.append(p)

    def ackable(self) -> list[Pending]:
        """The longest prefix of the queue that is durable (not removed)."""
        out: list[Pending] = []
        for p in self._queue:
            if not p.durable:
                break
            out.append(p)
        return out

    def plan_journal(
        self,
        will_be_durable: Callable[[Pending], bool] | None = None,
        *,
        closing: AbstractSet[int] = frozenset(),
        snapshots: Mapping[int, int] | None = None,
    ) -> JournalPlan:
        """What the checkpoint must write to the ack journal, in the same transaction; changes
        nothing until `journal_written` is called after the commit.

        Every message whose effect is durable once the checkpoint commits — not only the ones
        that can be acked now: a durable message queued behind a slow window is redelivered
        after a crash and must be recognised then. Plus the ids of new messages not yet
        durable, whose journal rows (from an earlier message under the same id) are stale.

        What will be durable: `will_be_durable`, or (the checkpoint's form, the same rule
        inlined: the queue holds every message of the open windows, seconds of traffic, and
        is walked each cycle) what is durable now, or whose window is in `closing` (ids), or
        whose window is snapshotted at a version (`snapshots`: id -> version) covering it.
        """
        if will_be_durable is None:
            will_be_durable = _durable_after(closing, snapshots or {})
            upserts = _durable_unjournaled(self._queue, closing, snapshots or {})
        else:
            upserts = [p for p in self._queue if not p.journaled and will_be_durable(p)]
        keep_orphans: list[Pending] = []
        if self._orphans:
            seen = {id(p) for p in upserts}
            upserts += [
                p
                for p in self._orphans
                if not p.journaled and will_be_durable(p) and id(p) not in seen
            ]
            # Orphans superseded by a newer message under the same id need no journal row.
            keep_orphans = [
                p for p in self._orphans
                if not p.journaled and not will_be_durable(p) and self._by_key.get(p.key) is p
            ]  # fmt: skip
            upserts = [p for p in upserts if self._by_key.get(p.key) is p]
        durable_keys = {p.key for p in upserts}
        deletes = sorted(k for k in self._new_keys | self._prune if k not in durable_keys)
        plan = JournalPlan(upserts, deletes, keep_orphans, bool(self._orphans))
        replays = self.replays
        if replays is not None:
            # Remembered from the moment their journal rows go, their acks confirmed: the
            # horizon counts from when the broker had the ack, not from when it was sent (a
            # snapshot saved in between still holds the message).
            plan.remembered = [
                replay_key(*k)
                for k in self._prune
                if k not in durable_keys and k not in self._new_keys
            ]
            # New messages not yet durable whose key the memory holds (the same bytes under an
            # id handed out again): after a crash their redelivery must not look like a replay.
            plan.revoked = [
                rk
                for k in self._new_keys
                if k not in durable_keys and (rk := replay_key(*k)) in replays
            ]
            plan.frontier = None if self._ids_reused else self._frontier
            plan.epoch_open = self._epoch_open
            plan.jump_t = self._jump_t
        return plan

    def journal_written(self, plan: JournalPlan) -> None:
        """The checkpoint carrying `plan` committed (the replay memory's row: its `written`)."""
        for p in plan.upserts:
            p.journaled = True
            # Durable now: let go of the window, or the last 65,535 messages' closed windows
            # would stay in memory through this ledger.
            p.window = None
        if plan.had_orphans:
            # Orphans added while the commit ran stay.
            planned = {id(p) for p in plan.upserts}
            planned.update(id(p) for p in plan.keep_orphans)  # (a set: a list test was O(n^2))
            self._orphans = plan.keep_orphans + [p for p in self._orphans if id(p) not in planned]
        self._new_keys.difference_update(plan.deletes)
        self._new_keys.difference_update(p.key for p in plan.upserts)
        self._prune.difference_update(plan.deletes)
        # An upsert replaced the row under its key: a prune pending for that key (the row of an
        # earlier message with the same bytes) is done, and must not delete the new row later.
        self._prune.difference_update(p.key for p in plan.upserts)

    @property
    def fresh_seen(self) -> bool:
        """A new message came on this connection: every redelivery came before it."""
        return self._fresh_seen

    @property
    def stale_pending(self) -> bool:
        """Rows of earlier connections wait for a round trip after the redeliveries."""
        return self._stale_after_reconnect

    def confirmed(self, acked: list[Pending], *, redeliveries_done: bool = True) -> None:
        """The broker has processed the PUBACKs of `acked` (a round trip after them came back
        on the same connection): it will never redeliver them, and it may now reuse their
        packet ids, so their journal rows must go (in the next checkpoint) before a new
        message with the same bytes under the same id could be taken for a redelivery.

        `redeliveries_done`: a new message had arrived before this round trip began, so the
        broker had redelivered everything it held for us."""
        for p in acked:
            if self._by_key.get(p.key) is p and p.acked:
                del self._by_key[p.key]
                self._prune.add(p.key)
        if self._stale_after_reconnect and redeliveries_done:
            # Everything the broker still had in flight for us was redelivered before a new
            # message, and that before this round trip: journal rows of earlier connections
            # that were not redelivered belong to messages the broker no longer holds. (Not
            # on the round trip right after the CONNACK: an adversary's broker restart showed
            # Mosquitto redelivering 65,535 of them first and the rest later; the rest were
            # counted twice.)
            for key, p in list(self._by_key.items()):
                if p.journaled and p.acked and p.conn != self._conn:
                    del self._by_key[key]
                    self._prune.add(key)
            self._stale_after_reconnect = False

    def current(self, ps: list[Pending]) -> list[Pending]:
        """The entries of `ps` still remembered under their id (the others are superseded)."""
        return [p for p in ps if self._by_key.get(p.key) is p]

    def ignored(self, mid: int, digest: int, dup: bool) -> None:
        """A QoS 1 message left unacked (shutdown): the broker redelivers it to the next run.

        Unless it is a redelivery of the message journaled under its key, it is a new message
        with the same bytes under a reused id, so the journal row under that key is stale: a
        later redelivery of this new message must not be taken for the old one.
        """
        key = (mid, digest)
        p = self._by_key.get(key)
        if dup and self._counted_before(mid, digest, p):
            return
        if p is not None and p.journaled:
            del self._by_key[key]
        self._new_keys.add(key)

    def _counted_before(self, mid: int, digest: int, p: Pending | None) -> bool:
        """For a DUP delivery left uncounted (shutdown): the judgment of `past_frontier`,
        `redelivered` and `replayed`, changing nothing."""
        replays = self.replays
        past = self._just_past(mid) and self._run_ours is not False and not self._ids_reused
        if replays is not None and past and (p is None or p.conn == -1):
            return False  # past the frontier: new
        if p is not None:
            # A journal row under distrust may be a new message's: left as it is, the next run
            # judges it the same way (its outbox still says the epoch is open).
            return True
        # A replay, or under distrust maybe not: remembered as it is, judged again next run.
        return replays is not None and self._remembered(mid, digest, replays)

    def pop_acked(self, n: int) -> list[Pending]:
        """Remove the first n entries (their acks are being sent) and mark them acked."""
        out = []
        for _ in range(n):
            p = self._queue.popleft()
            p.acked = True
            p.window = None
            out.append(p)
        return out

    def holders(self) -> list[Durability]:
        """Distinct windows holding not-yet-durable messages, oldest first."""
        seen: dict[int, Durability] = {}
        for p in self._queue:
            w = p.window
            if w is not None and not p.durable and id(w) not in seen:
                seen[id(w)] = w
        return list(seen.values())

    @property
    def connection(self) -> int:
        """Generation of the current connection; acks are sent only on the one they belong to."""
        return self._conn

    def __len__(self) -> int:
        return len(self._queue)

    def oldest_recv_t(self) -> float | None:
        for p in self._queue:
            if not p.durable:
                return p.recv_t
        return None

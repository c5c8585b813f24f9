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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol


class Durability(Protocol):
    version: int
    durable_version: int


# (packet identifier, digest of topic and payload): what the journal remembers a message by.
Key = tuple[int, int]


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

    def __init__(self, journal: Iterable[tuple[int, int]] = ()) -> None:
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
        if p.conn != self._conn:
            p.conn = self._conn
            p.recv_t = recv_t
            self._queue.append(p)
        return True

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
        return JournalPlan(upserts, deletes, keep_orphans, bool(self._orphans))

    def journal_written(self, plan: JournalPlan) -> None:
        """The checkpoint carrying `plan` committed."""
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
        if dup and p is not None:
            return
        if p is not None and p.journaled:
            del self._by_key[key]
        self._new_keys.add(key)

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

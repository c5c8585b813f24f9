"""Which received MQTT messages may be acknowledged, in what order, and which are redeliveries.

A message may be acked once its effect is durable: its window's chunk is committed, or its
window's state is saved by an early-ack checkpoint, or it was rejected (nothing to keep). Acks
leave in receive order (MQTT 5 §4.6), so one slow window holds back the acks behind it until the
early-ack rule saves it.

Exactly once across reconnects and crashes: the broker redelivers an unacknowledged message with
the DUP flag and the same packet identifier. The ledger remembers, per packet identifier, a digest
of the topic and payload of the last message counted under it; the checkpoint journals the
identifiers it is about to ack. A DUP delivery matching a remembered identifier and digest was
already counted: it is acked (once durable) but not counted again. The broker reuses an identifier
only after our PUBACK for it arrived, so a non-matching delivery under an old identifier is a new
message and replaces the entry.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol


class Durability(Protocol):
    version: int
    durable_version: int


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
    def durable(self) -> bool:
        w = self.window
        return self.acked or w is None or w.durable_version >= self.version


class AckLedger:
    """Pending acks of the current connection, in receive order, plus the redelivery memory."""

    def __init__(self, journal: Iterable[tuple[int, int]] = ()) -> None:
        self._by_mid: dict[int, Pending] = {}
        for mid, digest in journal:
            p = Pending(mid, 1, digest, None, 0.0, conn=-1)
            p.acked = p.journaled = True
            self._by_mid[mid] = p
        self._queue: deque[Pending] = deque()
        # Entries of earlier connections not yet journaled: their effect may still become
        # durable (their window closes) before the broker redelivers them, and a crash then
        # must not count them twice.
        self._orphans: list[Pending] = []
        self._conn = 0
        self._new_mids: set[int] = set()

    def new_connection(self) -> None:
        """A new MQTT connection: acks owed on the old one are void; the broker redelivers."""
        self._conn += 1
        self._orphans.extend(p for p in self._queue if not p.journaled)
        self._queue.clear()

    def redelivered(self, mid: int, digest: int, recv_t: float) -> bool:
        """If a DUP delivery was already counted, queue its ack and return True (do not count)."""
        p = self._by_mid.get(mid)
        if p is None or p.digest != digest:
            return False
        if p.conn != self._conn:
            p.conn = self._conn
            p.recv_t = recv_t
            self._queue.append(p)
        return True

    def track(
        self, mid: int, qos: int, digest: int, window: Durability | None, recv_t: float
    ) -> None:
        """Remember a newly counted message whose ack is owed once it is durable."""
        p = Pending(mid, qos, digest, window, recv_t, self._conn)
        self._by_mid[mid] = p
        self._new_mids.add(mid)
        self._queue.append(p)

    def ackable(self) -> list[Pending]:
        """The longest prefix of the queue that is durable (not removed)."""
        out: list[Pending] = []
        for p in self._queue:
            if not p.durable:
                break
            out.append(p)
        return out

    def journal_changes(self) -> tuple[list[Pending], list[int]]:
        """What the checkpoint must write to the ack journal, in the same transaction.

        Every message whose effect is durable once the checkpoint commits — not only the ones
        that can be acked now: a durable message queued behind a slow window is redelivered
        after a crash and must be recognised then. Plus the ids of new messages not yet
        durable, whose journal rows (from an earlier message under the same id) are stale.
        Call `journal_written` or `journal_failed` after the commit.
        """
        upserts = [p for p in self._queue if not p.journaled and p.durable]
        if self._orphans:
            seen = {id(p) for p in upserts}
            upserts += [
                p for p in self._orphans if p.durable and not p.journaled and id(p) not in seen
            ]
            # Orphans superseded by a newer message under the same id need no journal row.
            self._orphans = [
                p for p in self._orphans
                if not p.journaled and not p.durable and self._by_mid.get(p.mid) is p
            ]  # fmt: skip
            upserts = [p for p in upserts if self._by_mid.get(p.mid) is p]
        durable_mids = {p.mid for p in upserts}
        deletes = [m for m in self._new_mids if m not in durable_mids]
        self._new_mids = set()
        return upserts, deletes

    def journal_written(self, upserts: list[Pending]) -> None:
        for p in upserts:
            p.journaled = True
            # Durable now: let go of the window, or the last 65,535 messages' closed windows
            # would stay in memory through this ledger.
            p.window = None

    def journal_failed(self, deletes: list[int]) -> None:
        self._new_mids.update(deletes)

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

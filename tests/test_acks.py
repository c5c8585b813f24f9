from __future__ import annotations

from agent.acks import AckLedger
from agent.aggregate import DURABLE


class W:
    def __init__(self) -> None:
        self.version = 0
        self.durable_version = 0

    def add(self) -> W:
        self.version += 1
        return self


def test_acks_go_in_receive_order_behind_the_first_non_durable() -> None:
    ledger = AckLedger()
    a, b = W(), W()
    ledger.track(1, 1, 11, a.add(), 0.0)
    ledger.track(2, 1, 12, b.add(), 0.0)
    ledger.track(3, 1, 13, None, 0.0)  # rejected: durable at once, but queued behind
    assert ledger.ackable() == []
    b.durable_version = DURABLE
    assert ledger.ackable() == []  # 1 still holds the line
    a.durable_version = DURABLE
    assert [p.mid for p in ledger.ackable()] == [1, 2, 3]


def test_snapshot_makes_only_messages_up_to_its_version_durable() -> None:
    ledger = AckLedger()
    w = W()
    ledger.track(1, 1, 1, w.add(), 0.0)
    ledger.track(2, 1, 2, w.add(), 0.0)
    w.durable_version = w.version  # snapshot taken here
    ledger.track(3, 1, 3, w.add(), 0.0)
    assert [p.mid for p in ledger.ackable()] == [1, 2]
    assert ledger.holders() == [w]


def test_dup_of_counted_message_is_recognised_after_reconnect() -> None:
    ledger = AckLedger()
    w = W()
    ledger.track(7, 1, 70, w.add(), 0.0)
    ledger.new_connection()
    assert len(ledger) == 0
    assert not ledger.redelivered(7, 71, 1.0)  # same id, other content: a new message
    assert ledger.redelivered(7, 70, 1.0)
    assert len(ledger) == 1
    assert ledger.ackable() == []  # still waits for its window
    w.durable_version = DURABLE
    assert [p.mid for p in ledger.ackable()] == [7]


def test_journal_survives_restart_and_matches_redelivery() -> None:
    ledger = AckLedger()
    w = W()
    ledger.track(5, 1, 50, w.add(), 0.0)
    ledger.track(6, 1, 60, W().add(), 0.0)
    w.durable_version = DURABLE
    ackable = ledger.ackable()
    upserts, deletes = ledger.journal_changes(ackable)
    assert upserts == [(5, 50)]
    assert deletes == [6]  # received but not acked: a stale row for id 6 must go
    restarted = AckLedger(upserts)
    assert restarted.redelivered(5, 50, 0.0)
    assert [p.mid for p in restarted.ackable()] == [5]
    assert not restarted.redelivered(6, 60, 0.0)

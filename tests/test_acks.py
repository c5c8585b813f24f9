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
    upserts, deletes = ledger.journal_changes()
    assert [(p.mid, p.digest) for p in upserts] == [(5, 50)]
    assert deletes == [6]  # received but not durable: a stale row for id 6 must go
    ledger.journal_written(upserts)
    restarted = AckLedger([(p.mid, p.digest) for p in upserts])
    assert restarted.redelivered(5, 50, 0.0)
    assert [p.mid for p in restarted.ackable()] == [5]
    assert not restarted.redelivered(6, 60, 0.0)


def test_durable_messages_behind_a_slow_window_are_journaled_before_they_can_be_acked() -> None:
    """A crash before their ack would otherwise count them twice on redelivery."""
    ledger = AckLedger()
    slow, fast = W(), W()
    ledger.track(1, 1, 10, slow.add(), 0.0)
    ledger.track(2, 1, 20, fast.add(), 0.0)
    fast.durable_version = DURABLE
    assert ledger.ackable() == []
    upserts, _ = ledger.journal_changes()
    assert [p.mid for p in upserts] == [2]
    ledger.journal_written(upserts)
    assert ledger.journal_changes()[0] == []  # written once
    restarted = AckLedger([(2, 20)])
    assert restarted.redelivered(2, 20, 0.0)


def test_messages_of_a_lost_connection_are_journaled_once_durable() -> None:
    """The chaos run found it: a broker restart cleared the ack queue, the held windows closed
    and were committed before the broker redelivered, and a crash right then counted those
    messages a second time. They must be journaled by the commit that makes them durable."""
    ledger = AckLedger()
    w = W()
    ledger.track(4, 1, 40, w.add(), 0.0)
    ledger.new_connection()  # the broker went away before the window closed
    w.durable_version = DURABLE  # the window closes and is committed
    upserts, _ = ledger.journal_changes()
    assert [(p.mid, p.digest) for p in upserts] == [(4, 40)]
    ledger.journal_written(upserts)
    assert ledger.journal_changes()[0] == []
    assert AckLedger([(4, 40)]).redelivered(4, 40, 0.0)  # a crash now: recognised


def test_orphan_superseded_by_a_new_message_under_its_id_is_not_journaled() -> None:
    ledger = AckLedger()
    old = W()
    ledger.track(4, 1, 40, old.add(), 0.0)
    ledger.new_connection()
    ledger.track(4, 1, 41, W().add(), 0.0)  # the broker reused id 4: the old one was acked
    old.durable_version = DURABLE
    upserts, deletes = ledger.journal_changes()
    assert upserts == [] and deletes == [4]


def test_ledger_lets_go_of_windows_once_durable() -> None:
    """Memory: the ledger remembers 65,535 ids, but must not keep their closed windows alive."""
    import gc
    import weakref

    ledger = AckLedger()
    w = W()
    ledger.track(1, 1, 10, w.add(), 0.0)
    ref = weakref.ref(w)
    w.durable_version = DURABLE
    upserts, _ = ledger.journal_changes()
    ledger.journal_written(upserts)
    ledger.pop_acked(len(ledger.ackable()))
    del w, upserts
    gc.collect()
    assert ref() is None
    assert AckLedger().redelivered(1, 10, 0.0) is False and ledger.redelivered(1, 10, 0.0)

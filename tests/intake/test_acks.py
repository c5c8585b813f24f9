from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.intake.acks import AckLedger, Pending
from agent.windows.aggregate import DURABLE


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


def durable_now(p: Pending) -> bool:
    return p.durable


def test_journal_survives_restart_and_matches_redelivery() -> None:
    ledger = AckLedger()
    w = W()
    ledger.track(5, 1, 50, w.add(), 0.0)
    ledger.track(6, 1, 60, W().add(), 0.0)
    w.durable_version = DURABLE
    plan = ledger.plan_journal(durable_now)
    assert [(p.mid, p.digest) for p in plan.upserts] == [(5, 50)]
    assert plan.deletes == [(6, 60)]  # received, not durable: a stale row under its key goes
    ledger.journal_written(plan)
    assert all(p.journaled for p in plan.upserts)
    assert ledger.plan_journal(durable_now).deletes == []  # deleted once
    restarted = AckLedger([(p.mid, p.digest) for p in plan.upserts])
    assert restarted.redelivered(5, 50, 0.0)
    assert [p.mid for p in restarted.ackable()] == [5]
    assert not restarted.redelivered(6, 60, 0.0)


def test_plan_changes_nothing_until_written() -> None:
    """A failed commit must leave the ledger as it was: the next plan writes the same rows."""
    ledger = AckLedger()
    w = W()
    ledger.track(5, 1, 50, w.add(), 0.0)
    ledger.track(6, 1, 60, W().add(), 0.0)
    w.durable_version = DURABLE
    first = ledger.plan_journal(durable_now)
    # The commit failed: journal_written is not called.
    second = ledger.plan_journal(durable_now)
    assert [p.mid for p in second.upserts] == [p.mid for p in first.upserts] == [5]
    assert second.deletes == first.deletes == [(6, 60)]
    assert not any(p.journaled for p in second.upserts)
    assert second.upserts[0].window is w  # still held until durable on disk
    ledger.journal_written(second)
    after = ledger.plan_journal(durable_now)
    assert after.upserts == [] and after.deletes == []


def test_plan_counts_what_the_commit_itself_makes_durable() -> None:
    """The checkpoint journals messages whose window it is committing in the same transaction
    (closed, or snapshotted up to a version), before they are durable in memory."""
    ledger = AckLedger()
    closing, snapped, open_ = W(), W(), W()
    ledger.track(1, 1, 10, closing.add(), 0.0)
    ledger.track(2, 1, 20, snapped.add(), 0.0)
    v = snapped.version
    ledger.track(3, 1, 30, snapped.add(), 0.0)  # after the snapshot's version
    ledger.track(4, 1, 40, open_.add(), 0.0)

    def will_be_durable(p: Pending) -> bool:
        return p.window is closing or (p.window is snapped and p.version <= v)

    plan = ledger.plan_journal(will_be_durable)
    assert [p.mid for p in plan.upserts] == [1, 2]
    assert plan.deletes == [(3, 30), (4, 40)]
    assert ledger.ackable() == []  # nothing is durable in memory yet
    closing.durable_version = DURABLE
    snapped.durable_version = v
    ledger.journal_written(plan)
    assert [p.mid for p in ledger.ackable()] == [1, 2]


def test_durable_messages_behind_a_slow_window_are_journaled_before_they_can_be_acked() -> None:
    """A crash before their ack would otherwise count them twice on redelivery."""
    ledger = AckLedger()
    slow, fast = W(), W()
    ledger.track(1, 1, 10, slow.add(), 0.0)
    ledger.track(2, 1, 20, fast.add(), 0.0)
    fast.durable_version = DURABLE
    assert ledger.ackable() == []
    plan = ledger.plan_journal(durable_now)
    assert [p.mid for p in plan.upserts] == [2]
    assert plan.deletes == [(1, 10)]
    ledger.journal_written(plan)
    assert ledger.plan_journal(durable_now).upserts == []  # written once
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
    not_yet = ledger.plan_journal(durable_now)
    assert not_yet.upserts == [] and not_yet.keep_orphans != []
    ledger.journal_written(not_yet)  # a checkpoint without it: the orphan is still remembered
    w.durable_version = DURABLE  # the window closes and is committed
    plan = ledger.plan_journal(durable_now)
    assert [(p.mid, p.digest) for p in plan.upserts] == [(4, 40)]
    ledger.journal_written(plan)
    assert ledger.plan_journal(durable_now).upserts == []
    assert AckLedger([(4, 40)]).redelivered(4, 40, 0.0)  # a crash now: recognised


def test_an_orphan_under_a_reused_id_keeps_its_own_journal_row() -> None:
    """Mosquitto 2.0.11 gives an id still in flight to a new message: the old message may be
    redelivered after a crash, so once durable it is journaled under its own key."""
    ledger = AckLedger()
    old = W()
    ledger.track(4, 1, 40, old.add(), 0.0)
    ledger.new_connection()
    ledger.track(4, 1, 41, W().add(), 0.0)  # id 4 again, for another message
    old.durable_version = DURABLE
    plan = ledger.plan_journal(durable_now)
    assert [p.key for p in plan.upserts] == [(4, 40)] and plan.deletes == [(4, 41)]
    ledger.journal_written(plan)
    # A crash now: the journal has the old message's row, and only it.
    restarted = AckLedger([p.key for p in plan.upserts])
    assert restarted.redelivered(4, 40, 0.0) and not restarted.redelivered(4, 41, 0.0)


def test_ignored_new_message_makes_the_journal_row_under_its_key_stale() -> None:
    """Shutdown leaves a QoS 1 message unacked. If it is a new message with the same bytes as
    one journaled under the same id, that row is stale and must go, or the broker's redelivery
    of the new message would be taken for the old one. Rows under the same id with other bytes
    stay: a broker that reuses ids in flight may still redeliver their messages."""
    ledger = AckLedger([(5, 50), (6, 60), (7, 70)])
    ledger.ignored(5, 50, dup=False)  # identical bytes, but a new message (no DUP)
    ledger.ignored(6, 61, dup=True)  # DUP, but not what was journaled under 6
    ledger.ignored(7, 70, dup=True)  # the journaled message itself, redelivered: keep its row
    ledger.ignored(8, 80, dup=False)  # no row: deleting is harmless
    plan = ledger.plan_journal(durable_now)
    assert plan.deletes == [(5, 50), (6, 61), (8, 80)] and plan.upserts == []
    assert not ledger.redelivered(5, 50, 0.0)  # forgotten in memory too
    assert ledger.redelivered(6, 60, 0.0)  # another message under id 6: kept
    ledger.journal_written(plan)
    assert ledger.plan_journal(durable_now).deletes == []
    assert ledger.redelivered(7, 70, 0.0)  # still recognised after the identical redelivery


def test_ledger_lets_go_of_windows_once_durable() -> None:
    """Memory: the ledger remembers 65,535 ids, but must not keep their closed windows alive."""
    import gc
    import weakref

    ledger = AckLedger()
    w = W()
    ledger.track(1, 1, 10, w.add(), 0.0)
    ref = weakref.ref(w)
    w.durable_version = DURABLE
    plan = ledger.plan_journal(durable_now)
    ledger.journal_written(plan)
    ledger.pop_acked(len(ledger.ackable()))
    del w, plan
    gc.collect()
    assert ref() is None
    assert AckLedger().redelivered(1, 10, 0.0) is False and ledger.redelivered(1, 10, 0.0)


def test_a_pruned_id_reused_before_the_prune_is_written_keeps_the_new_row() -> None:
    """Found by the simulation (seed 3525 of 10,000): m4's journal row under id 5 is due for
    pruning (its PUBACK confirmed), the broker reuses id 5 for m28, m28 becomes durable and
    its row is written under id 5 — the pending prune must not delete that new row later."""
    from agent.windows.aggregate import DURABLE

    class W:
        version = 1
        durable_version = 0

    ledger = AckLedger()
    w4 = W()
    ledger.track(5, 1, 444, w4, 0.0)
    w4.durable_version = DURABLE
    ledger.journal_written(ledger.plan_journal(lambda p: p.durable))
    [p4] = ledger.pop_acked(1)
    ledger.confirmed([p4])  # the broker has the PUBACK: the row (5, 444) is to go
    w28 = W()
    ledger.track(5, 1, 2828, w28, 1.0)  # id 5 reused for a new message
    w28.durable_version = DURABLE
    plan = ledger.plan_journal(lambda p: p.durable)
    assert [p.key for p in plan.upserts] == [(5, 2828)] and (5, 2828) not in plan.deletes
    assert (5, 444) in plan.deletes  # the confirmed row goes
    ledger.journal_written(plan)
    assert ledger.plan_journal(lambda p: p.durable).deletes == []


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_checkpoints_inlined_rule_plans_what_the_predicate_plans(data: st.DataObject) -> None:
    """plan_journal(closing=..., snapshots=...) is the hot form of plan_journal(predicate)."""
    windows = [W() for _ in range(data.draw(st.integers(1, 6)))]
    ledger = AckLedger()
    for mid in range(1, data.draw(st.integers(0, 40)) + 1):
        w = data.draw(st.sampled_from([None, *windows]))
        ledger.track(mid, 1, mid, w.add() if w is not None else None, 0.0)
        if data.draw(st.booleans()):
            ledger.journal_written(ledger.plan_journal(lambda p: p.durable))
        if data.draw(st.integers(0, 9)) == 0:
            ledger.pop_acked(min(len(ledger), len(ledger.ackable())))
    for w in windows:
        w.durable_version = data.draw(st.sampled_from([0, w.version // 2, w.version, DURABLE]))
    closing = {id(w) for w in windows if data.draw(st.booleans())}
    snaps = {
        id(w): data.draw(st.integers(0, w.version + 1))
        for w in windows
        if id(w) not in closing and data.draw(st.booleans())
    }

    def predicate(p: Pending) -> bool:
        if p.durable:
            return True
        if p.window is None:
            return False
        v = snaps.get(id(p.window))
        return id(p.window) in closing or (v is not None and p.version <= v)

    fast, slow = (
        ledger.plan_journal(closing=closing, snapshots=snaps),
        ledger.plan_journal(predicate),
    )
    assert fast.upserts == slow.upserts
    assert fast.deletes == slow.deletes


def test_rows_of_earlier_runs_stay_until_a_new_message_shows_the_redeliveries_are_over() -> None:
    """After a broker restart Mosquitto redelivers only Receive Maximum of its in-flight
    messages at first: a round trip right after the CONNACK proves nothing about the rest."""
    ledger = AckLedger([(1, 10), (2, 20)])
    ledger.new_connection()
    assert ledger.redelivered(1, 10, 0.0)
    ledger.confirmed([], redeliveries_done=ledger.fresh_seen)  # no new message yet
    assert ledger.stale_pending
    assert ledger.redelivered(2, 20, 0.0)  # the late redelivery is still recognised
    ledger.track(3, 1, 30, None, 0.0, dup=False)  # a new message: redeliveries are over
    assert ledger.fresh_seen
    ledger.confirmed([], redeliveries_done=ledger.fresh_seen)
    assert not ledger.stale_pending


def test_rows_not_redelivered_go_after_the_redeliveries() -> None:
    ledger = AckLedger([(1, 10), (2, 20)])
    ledger.new_connection()
    ledger.track(3, 1, 30, None, 0.0, dup=False)
    ledger.confirmed([], redeliveries_done=True)
    plan = ledger.plan_journal(durable_now)
    assert (1, 10) in plan.deletes and (2, 20) in plan.deletes
    assert not ledger.redelivered(1, 10, 0.0)


def test_a_connection_that_keeps_dropping_adds_each_orphan_once() -> None:
    """A reader paused on a failing disk loses its connection again and again; each time the
    broker redelivers the same unjournaled messages. The ledger must hold each once, and a
    commit must not take time quadratic in them (an adversary's 78-127 s event-loop hang
    after the disk healed: a list membership test per orphan over 65,535 duplicates each)."""
    from agent.intake.acks import AckLedger as Ledger

    class W:
        version = 1
        durable_version = 0

    ledger = Ledger()
    windows = [W() for _ in range(20_000)]
    for mid, w in enumerate(windows, start=1):
        ledger.track(mid, 1, mid, w, 0.0, False)
    for _ in range(5):
        ledger.new_connection()
        for mid in range(1, 20_001):
            assert ledger.redelivered(mid, mid, 0.0)
    assert len(ledger._orphans) == 20_000
    for w in windows:
        w.durable_version = 1
    plan = ledger.plan_journal(closing=set(), snapshots={})
    assert len(plan.upserts) == 20_000
    ledger.journal_written(plan)
    assert ledger._orphans == []

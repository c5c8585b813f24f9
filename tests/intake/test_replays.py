"""The replay memory (agent/intake/acks.py ReplayMemory) and the ledger's rules for a broker that
restored an older snapshot: a replay is recognised; a new message that shares a remembered key
(the same bytes under an id handed out again) is never taken for one."""

from __future__ import annotations

import random
from pathlib import Path

import httpx

from agent.app.service import build_pipeline
from agent.config.settings import BufferSettings, MqttSettings, Settings
from agent.durable.outbox import CheckpointWrite, Outbox
from agent.intake.acks import AckLedger, HistoryRow, ReplayMemory, replay_key


def _remembered(ledger: AckLedger, *keys: tuple[int, int]) -> None:
    """Messages counted, durable, acked and confirmed: their keys go to the memory."""
    replays = ledger.replays
    assert replays is not None
    for mid, digest in keys:
        ledger.track(mid, 1, digest, None, 0.0)
    plan = ledger.plan_journal()
    ledger.journal_written(plan)
    sent = ledger.pop_acked(len(ledger.ackable()))
    ledger.confirmed(sent)
    plan = ledger.plan_journal()
    replays.written(replays.plan_row(plan), None)
    ledger.journal_written(plan)


class _Open:
    """A window not yet durable."""

    version = 1
    durable_version = 0


def _ledger(horizon_s: float = 120.0, space: int = 65535) -> AckLedger:
    replays = ReplayMemory(horizon_s)
    replays.restore([], 0.0)
    return AckLedger(replays=replays, id_space=space)


def test_memory_answers_for_added_keys_until_revoked_and_again_after_a_new_add() -> None:
    m = ReplayMemory(horizon_s=10, block_s=1)
    m.add([1, 2, 3], seq=1, t=0.0)
    m.add([4], seq=2, t=2.0)  # seals the first block
    assert all(k in m for k in (1, 2, 3, 4)) and 5 not in m
    m.revoke([2, 4], seq=3)
    assert 2 not in m and 4 not in m and 1 in m
    m.add([2], seq=4, t=2.5)
    assert 2 in m and 4 not in m


def test_memory_forgets_past_the_horizon_in_traffic_time_only() -> None:
    m = ReplayMemory(horizon_s=10, block_s=1)
    m.restore([], mono=100.0)
    m.add([1], seq=1, t=m.now())
    m.live = 102.0  # new messages came for 2 s
    assert m.expire(m.now()) is None  # seals the block holding 1 (traffic time 2)
    m.live = 105.0
    m.add([2], seq=2, t=m.now())
    # However long the broker is down, traffic time stands still: nothing is forgotten.
    assert m.expire(m.now()) is None and 1 in m
    m.live = 113.0
    assert m.expire(m.now()) == 1 and 1 not in m and 2 in m


def test_memory_is_rebuilt_from_its_rows_with_revocations_in_order() -> None:
    rows = [
        HistoryRow(1, 0.0, (5, 50), False, [10, 11], []),
        HistoryRow(2, 6.0, (6, 60), False, [12], [11]),
        HistoryRow(3, 7.0, (7, 70), True, [11], []),
    ]
    m = ReplayMemory(horizon_s=60, block_s=5)
    m.restore(rows, mono=1000.0)
    assert all(k in m for k in (10, 11, 12))
    assert m.frontier_written == (7, 70) and m.epoch_open_written and m.next_seq == 4
    m2 = ReplayMemory(horizon_s=60, block_s=5)
    m2.restore(rows[:2], mono=1000.0)
    assert 11 not in m2 and 10 in m2


def test_a_replay_of_an_acked_message_is_acked_not_counted() -> None:
    ledger = _ledger()
    _remembered(ledger, (7, 700), (8, 800))
    ledger.track(9, 1, 900, None, 0.0)  # the frontier: 9
    ledger.new_connection()
    assert ledger.past_frontier(7, 700) is False
    assert ledger.redelivered(7, 700, 0.0) is False
    assert ledger.replayed(7, 700, 0.0) is True
    assert [p.mid for p in ledger.ackable()] == [7]


def test_a_new_message_past_the_frontier_is_new_whatever_its_key() -> None:
    """The same bytes under an id handed out again after a wrap: delivered after the last
    checkpoint, never counted. It comes with DUP as frontier + 1: new."""
    ledger = _ledger(space=8)
    _remembered(ledger, (3, 300))
    for mid in (4, 5, 6, 7, 8, 1, 2):
        ledger.track(mid, 1, mid * 1000, None, 0.0)
    ledger.new_connection()
    assert replay_key(3, 300) in ledger.replays  # type: ignore[operator]
    assert ledger.past_frontier(3, 300) is True
    assert ledger.possible_replays == 1  # a restored run starting at the frontier looks alike


def test_a_restored_run_that_meets_the_frontier_by_chance_is_recognised() -> None:
    """The run's message under the frontier's id is another one: the run is a snapshot's."""
    ledger = _ledger(space=8)
    _remembered(ledger, (4, 401), (5, 501))
    for mid in (6, 7, 8, 1, 2, 3, 4):
        ledger.track(mid, 1, mid * 1000, None, 0.0)  # frontier (4, 4000)
    ledger.new_connection()
    ledger.dup_arrived(4, 401)
    assert ledger.past_frontier(4, 401) is False and ledger.redelivered(4, 401, 0.0) is False
    assert ledger.replayed(4, 401, 0.0) is True
    ledger.dup_arrived(5, 501)
    assert ledger.past_frontier(5, 501) is False
    assert ledger.replayed(5, 501, 0.0) is True


def test_a_new_message_seen_and_not_durable_revokes_its_key() -> None:
    ledger = _ledger(space=8)
    _remembered(ledger, (3, 300))
    ledger.track(4, 1, 4000, None, 0.0)
    ledger.track(3, 1, 300, _Open(), 0.0)
    plan = ledger.plan_journal()
    assert plan.revoked == [replay_key(3, 300)]
    replays = ledger.replays
    assert replays is not None
    replays.written(replays.plan_row(plan), None)
    assert replay_key(3, 300) not in replays


def test_an_open_epoch_makes_the_next_run_count_what_it_cannot_tell() -> None:
    """The run died between a connect and its first new message: the broker may have begun
    its ids anew. Its journal rows and the memory do not decide for the next run: counted, and
    counted as possible doubles."""
    ledger = AckLedger([(3, 300)], replays=ReplayMemory(120), frontier=(9, 900), distrust=True)
    assert ledger.replays is not None
    ledger.replays.add([replay_key(4, 400)], seq=1, t=0.0)
    ledger.new_connection()
    assert ledger.redelivered(3, 300, 0.0) is False
    assert ledger.replayed(4, 400, 0.0) is False
    assert ledger.possible_replays == 2
    ledger.track(10, 1, 1000, None, 0.0)  # the first new message: trusted again
    ledger.new_connection()
    assert ledger.replayed(4, 400, 0.0) is True


def test_the_epoch_is_durable_only_once_a_checkpoint_recorded_it() -> None:
    ledger = _ledger()
    replays = ledger.replays
    assert replays is not None and not ledger.epoch_durable
    ledger.open_epoch()
    assert not ledger.epoch_durable
    plan = ledger.plan_journal()
    replays.written(replays.plan_row(plan), None)
    assert ledger.epoch_durable
    assert AckLedger().epoch_durable  # without a memory there is nothing to wait for


def test_ids_reused_in_flight_record_no_frontier() -> None:
    ledger = _ledger(space=8)
    for i in range(9):
        ledger.track(i % 8 + 1, 1, random.Random(i).getrandbits(63), None, 0.0)
    plan = ledger.plan_journal()
    assert plan.frontier is None


def test_a_hole_in_the_broker_sequence_does_not_hide_what_lies_past_the_frontier() -> None:
    """Mosquitto spends ids on messages it never delivers (too large for us, expired): the
    frontier is 465, the next delivery is 467. A DUP under 467 after a crash is still new,
    whatever the memory says (an adversary lost 50 byte-identical heartbeats this way)."""
    ledger = _ledger()
    _remembered(ledger, (467, 4670))
    ledger.track(465, 1, 4650, None, 0.0)
    ledger.new_connection()
    assert ledger.past_frontier(467, 4670) is True
    assert ledger.possible_replays == 1  # the memory knew the key: counted, as possible double
    far = _ledger()
    _remembered(far, (5000, 50))
    far.track(465, 1, 4650, None, 0.0)
    far.new_connection()
    assert far.past_frontier(5000, 50) is False  # far from the frontier: a replay
    assert far.replayed(5000, 50, 0.0) is True


def test_a_new_message_the_ledger_or_memory_knows_is_counted_as_a_possible_double() -> None:
    """A restored snapshot sends what was still queued then as new (no DUP): a journal row or,
    after a jump in the sequence, the memory says it may have been counted."""
    ledger = _ledger()
    ledger.track(7, 1, 70, None, 0.0)
    plan = ledger.plan_journal()
    ledger.journal_written(plan)  # journaled (acked, not yet confirmed)
    ledger.new_connection()
    ledger.track(7, 1, 70, None, 0.0)  # the same key again, as new
    assert ledger.possible_replays == 1
    jumped = _ledger()
    _remembered(jumped, (3, 30))
    jumped.track(9, 1, 90, None, 0.0)  # frontier 9
    jumped.track(3, 1, 30, None, 0.0)  # new, under 3: the sequence jumped back, a key it knows
    assert jumped.possible_replays == 1
    jumped.track(4, 1, 40, None, 0.0)  # not known: nothing to say
    assert jumped.possible_replays == 1


def test_the_memory_is_bounded_whatever_traffic_time_does() -> None:
    m = ReplayMemory(horizon_s=60, block_s=1, max_keys=100)
    for seq in range(1, 11):
        m.add(range(seq * 1000, seq * 1000 + 50), seq=seq, t=0.0)  # no traffic time passes
        m.expire(0.0)
    assert len(m) <= 150  # the cap, and at most one block beyond it
    assert 10_000 in m and 1000 not in m


async def test_a_run_without_the_memory_leaves_no_stale_rows_for_the_next(tmp_path: Path) -> None:
    """mqtt.broker_autosave_interval_s = 0 writes no ack_history rows; what an earlier run left
    would greet the next run that has a memory as a frontier and keys from before this run's
    traffic (an adversary lost 50 messages after the key went 60 -> 0 -> 60). It goes."""
    path = tmp_path / "b.sqlite3"
    outbox, _ = await Outbox.open(path)
    await outbox.checkpoint(
        CheckpointWrite(history=HistoryRow(1, 5.0, (9, 90), False, [replay_key(3, 30)], [])),
        now=1.0,
    )
    await outbox.close()
    outbox, recovery = await Outbox.open(path)
    assert len(recovery.history) == 1
    settings = Settings(
        gateway_id="gw-replays",
        mqtt=MqttSettings(broker_autosave_interval_s=0),
        buffer=BufferSettings(path=path),
    )
    transport = httpx.MockTransport(lambda request: httpx.Response(500))  # never called
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            p = await build_pipeline(settings, outbox, recovery, http)
            assert p.ledger.replays is None
    finally:
        await outbox.close()
    outbox, recovery = await Outbox.open(path)
    await outbox.close()
    assert recovery.history == []


def test_the_cap_never_drops_the_newest_block() -> None:
    """A backlog drained within one block is larger than the cap: it stays remembered (an
    adversary: a 20,000-message drain emptied a 1 MiB outbox's memory, and its replay was
    counted twice unreported)."""
    m = ReplayMemory(horizon_s=60, block_s=1, max_keys=100)
    m.add(range(1000), seq=1, t=0.0)
    m.expire(2.0)  # seals it: over the cap, but the newest block
    assert 0 in m and 999 in m and not m.capped
    m.add(range(5000, 5010), seq=2, t=2.5)
    m.expire(4.0)  # a newer block: the old one goes, within the horizon
    assert 0 not in m and 5000 in m and m.capped

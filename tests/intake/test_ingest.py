"""Intake: one raw message in, counted or rejected with a reason, its ack owed. Pure: no broker."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.settings import StreamSettings
from agent.core.reasons import Reject
from agent.core.stats import Stats
from agent.intake.acks import AckLedger
from agent.intake.ingest import Intake, TopicRouter
from agent.intake.timekeeping import CameraClocks, ClockPolicy
from agent.windows.aggregate import Aggregator

T0 = 1764126000.0


def make_intake(max_payload: int = 1024) -> tuple[Intake, Aggregator, AckLedger, Stats]:
    router = TopicRouter(
        [
            StreamSettings(
                topic="site/cam/{camera}/{stream}", numeric=("conf",), categorical=("cls",)
            ),
            StreamSettings(topic="legacy/{camera}/events", name="events", time_unit="ms"),
        ]
    )
    agg = Aggregator(window_s=1, allowed_lateness_s=2, idle_close_s=5)
    ledger = AckLedger()
    stats = Stats()
    intake = Intake(
        router=router,
        aggregator=agg,
        clocks=CameraClocks(ClockPolicy()),
        ledger=ledger,
        stats=stats,
        max_payload_bytes=max_payload,
    )
    return intake, agg, ledger, stats


def payload(**doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_routes_and_counts() -> None:
    intake, agg, ledger, stats = make_intake()
    intake.handle(
        b"site/cam/cam-1/detections",
        payload(ts=T0 + 0.5, conf=0.9, cls="car"),
        1,
        1,
        False,
        T0 + 0.6,
    )
    intake.handle(b"legacy/cam-2/events", payload(ts=int((T0 + 0.2) * 1000)), 2, 1, False, T0 + 0.6)
    assert stats.counted == 2 and not stats.rejects
    chunks = {(c.camera, c.stream): c for c in agg.close_all()}
    assert chunks[("cam-1", "detections")].cat["cls"] == {"car": 1}
    assert chunks[("cam-2", "events")].t == int(T0)
    assert len(ledger) == 2


def test_rejects_are_counted_by_reason_and_still_acked() -> None:
    intake, _, ledger, stats = make_intake(max_payload=200)
    cases = [
        (b"site/cam/cam-1/detections", b'{"ts": 1', "malformed_json"),
        (b"site/cam/cam-1/detections", b"[1, 2]", "not_an_object"),
        (b"site/cam/cam-1/detections", b'{"x": "' + b"a" * 300 + b'"}', "oversized"),
        (b"other/topic", b"{}", "unknown_topic"),
        (b"site/cam/cam 1;drop/detections", b"{}", "bad_camera_id"),
        (b"site/cam/cam-1/" + b"s" * 80, b"{}", "bad_stream_id"),
        (b"site/cam/\xff/detections", b"{}", "bad_topic_encoding"),
    ]
    for i, (topic, body, _) in enumerate(cases, start=1):
        intake.handle(topic, body, i, 1, False, T0)
    assert dict(stats.rejects) == {reason: 1 for _, _, reason in cases}
    assert stats.counted == 0
    # Rejected messages will never parse: they are acked (in order) with the next checkpoint.
    assert [p.mid for p in ledger.ackable()] == list(range(1, len(cases) + 1))


def test_missing_or_bad_timestamp_uses_gateway_time_and_flags() -> None:
    intake, agg, _, _ = make_intake()
    intake.handle(b"site/cam/c/det", payload(conf=1.0), 1, 1, False, T0 + 0.5)
    intake.handle(b"site/cam/c/det", payload(ts="not a time"), 2, 1, False, T0 + 0.5)
    (c,) = agg.close_all()
    assert c.count == 2 and c.t == int(T0) and "time_from_gateway" in c.flags
    assert intake.clocks.counters["bad_timestamp_used_gateway_time"] == 1


def test_redelivery_of_a_counted_message_is_not_counted_again() -> None:
    intake, agg, ledger, stats = make_intake()
    body = payload(ts=T0, conf=0.5)
    intake.handle(b"site/cam/c/det", body, 7, 1, False, T0)
    ledger.new_connection()
    intake.handle(b"site/cam/c/det", body, 7, 1, True, T0 + 1)
    assert stats.counted == 1 and stats.redelivered_skipped == 1
    (c,) = agg.close_all()
    assert c.count == 1


def test_closed_intake_leaves_messages_unacked() -> None:
    intake, _, ledger, stats = make_intake()
    intake.open = False
    intake.handle(b"site/cam/c/det", payload(ts=T0), 1, 1, False, T0)
    assert len(ledger) == 0 and stats.counted == 0


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=60),
    st.binary(max_size=300),
    st.integers(0, 65535),
    st.integers(0, 1),
    st.booleans(),
)
def test_no_input_raises(topic: bytes, body: bytes, mid: int, qos: int, dup: bool) -> None:
    intake, _, _, stats = make_intake()
    intake.handle(b"site/cam/c/" + topic, body, mid, qos, dup, T0)
    intake.handle(topic, body, mid, qos, dup, T0)
    assert stats.counted + sum(stats.rejects.values()) >= 1


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.integers()
        | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=20,
    )
)
def test_any_json_document_is_counted_or_rejected(doc: object) -> None:
    intake, _, _, stats = make_intake(max_payload=10**6)
    body = json.dumps({"ts": doc, "conf": doc, "cls": doc}, allow_nan=False).encode()
    intake.handle(b"site/cam/c/det", body, 1, 1, False, T0)
    assert stats.counted == 1


def test_field_and_depth_caps() -> None:
    intake, _, _, stats = make_intake(max_payload=10**6)
    intake.handle(
        b"site/cam/c/det", json.dumps({f"f{i}": i for i in range(300)}).encode(), 1, 1, False, T0
    )
    deep: object = 1
    for _ in range(20):
        deep = {"x": deep}
    intake.handle(b"site/cam/c/det", json.dumps({"ts": T0, "x": deep}).encode(), 2, 1, False, T0)
    # Valid JSON 100,000 deep: past msgspec's limit, too deep (issue #24; was malformed_json).
    intake.handle(b"site/cam/c/det", b"[" * 100000 + b"]" * 100000, 3, 1, False, T0)
    intake.handle(b"site/cam/c/det", b'{"ts": NaN, "conf": Infinity}', 4, 1, False, T0)
    assert stats.rejects["too_many_fields"] == 1
    assert stats.rejects["too_deep"] == 2
    assert stats.rejects["malformed_json"] == 1
    assert stats.counted == 0


def test_late_and_bad_time_drops_are_counted_once_as_rejects() -> None:
    agg = Aggregator(window_s=1, allowed_lateness_s=0, idle_close_s=5, late_policy="drop")
    clocks = CameraClocks(ClockPolicy(bad_time_policy="drop", max_future_s=60))
    stats = Stats()
    intake = Intake(
        router=TopicRouter([StreamSettings(topic="site/cam/{camera}/{stream}")]),
        aggregator=agg,
        clocks=clocks,
        ledger=AckLedger(),
        stats=stats,
        max_payload_bytes=1024,
    )
    intake.handle(b"site/cam/c/det", payload(ts=T0 + 5.0), 1, 1, False, T0 + 5.0)
    intake.handle(b"site/cam/c/det", payload(ts=T0 + 1.0), 2, 1, False, T0 + 5.1)  # late
    intake.handle(b"site/cam/c/det", payload(ts=T0 + 3600), 3, 1, False, T0 + 5.2)  # future
    assert stats.rejects == {Reject.late_dropped: 1, Reject.bad_time_dropped: 1}
    assert stats.counted == 1
    # One count each: the aggregator and the clocks leave it to the intake.
    assert not (set(agg.counters) | set(clocks.counters)) & set(stats.rejects)

"""One message never stops the site: hostile payloads are counted or rejected, always acked, and
never put a non-finite number into a chunk; a stored chunk that fails validation never crashes."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent.app.service import build_aggregator, build_clocks
from agent.config.settings import AggregateSettings, MqttSettings, StreamSettings
from agent.core.errors import BadChunk, BadTimestamp
from agent.core.model import MAX_CATEGORY_LEN, Chunk, decode_chunk, encode_chunk
from agent.core.stats import Stats
from agent.durable.compaction import compact_range, counted_messages
from agent.intake.acks import AckLedger
from agent.intake.ingest import Intake, TopicRouter, digest
from agent.intake.timekeeping import parse_event_time
from agent.sim.cloud import load_merged
from agent.windows.aggregate import Aggregator
from bench.pills import BIG_INT, BY_NAME, CATEGORICAL, NUMERIC, PILLS, SIDE_COUNTERS, STREAMS, Pill
from devtools.procs import Mosquitto, Publisher, wait_for
from devtools.truth import compare
from tests.helpers import AgentFactory, assert_exact, assert_seqs_clean

T0 = 1764126000.0
TOPIC = b"site/cam/cam-1/detections"
# Not the fate of a received message: it is left for the broker to redeliver.
NOT_PER_MESSAGE = {"ignored_at_shutdown"}


def build_intake(
    streams: list[StreamSettings] | None = None,
) -> tuple[Intake, Aggregator, AckLedger, Stats]:
    """The ingest path as agent/app/service.py wires it, with the default settings."""
    streams = streams or [
        StreamSettings(
            topic="site/cam/{camera}/{stream}", numeric=NUMERIC, categorical=CATEGORICAL
        ),
        StreamSettings(
            topic="legacy/{camera}/events", name="events", time_unit="ms", numeric=NUMERIC
        ),
        StreamSettings(
            topic="rfc/{camera}/log", name="log", time_unit="rfc3339", categorical=CATEGORICAL
        ),
    ]
    a = AggregateSettings()
    m = MqttSettings()
    aggregator = build_aggregator(a)
    clocks = build_clocks(a)
    ledger = AckLedger()
    stats = Stats()
    intake = Intake(
        router=TopicRouter(streams),
        aggregator=aggregator,
        clocks=clocks,
        ledger=ledger,
        stats=stats,
        max_payload_bytes=m.max_payload_bytes,
        max_fields=m.max_fields,
        max_depth=m.max_depth,
    )
    return intake, aggregator, ledger, stats


def per_message(stats: Stats) -> int:
    """Messages counted plus messages rejected: each received message is exactly one of them."""
    return stats.counted + sum(n for r, n in stats.rejects.items() if r not in NOT_PER_MESSAGE)


def assert_finite_wire(body: bytes) -> Chunk:
    """The chunk body is JSON with only finite numbers (no null, no NaN/Infinity literals)."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"non-JSON constant {name} in {body[:300]!r}")

    def walk(v: Any) -> None:
        assert v is not None, body[:300]
        if isinstance(v, float):
            assert math.isfinite(v), body[:300]
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(json.loads(body, parse_constant=refuse))
    Chunk.from_wire(msgspec.json.decode(body))
    return decode_chunk(body)


def send(intake: Intake, payload: bytes, mid: int, topic: bytes = TOPIC) -> None:
    intake.handle(topic, payload, mid, 1, False, T0 + 0.5)


# -- the defects, one message each ----------------------------------------------------------


def test_invalid_utf8_in_a_string_is_malformed_json_and_acked() -> None:
    intake, _, ledger, stats = build_intake()
    bad = b'{"cls":"\xff"}'
    send(intake, bad, 1)
    send(intake, b'{"ts": 1764126000.5, "cls": "car"}', 2)
    assert stats.rejects["malformed_json"] == 1 and stats.counted == 1
    assert len(ledger) == 2 and ledger.redelivered(1, digest(TOPIC, bad), T0)


def test_valid_json_nested_thousands_deep_is_too_deep_not_malformed() -> None:
    """Deeper than msgspec goes (about 1,000 levels; mqtt.max_depth is at most 1,000): the
    reason is the nesting, which the operator can act on, not a parse error."""
    intake, _, ledger, stats = build_intake()
    for mid, depth in enumerate((20, 5000), start=1):
        send(intake, b'{"ts": 1764126000.5, "a": ' + b"[" * depth + b"]" * depth + b"}", mid)
    assert stats.rejects["too_deep"] == 2 and stats.rejects["malformed_json"] == 0
    assert len(ledger) == 2


def test_huge_int_in_a_numeric_field_is_a_bad_numeric_field() -> None:
    intake, agg, ledger, stats = build_intake()
    send(intake, b'{"ts": 1764126000.5, "conf": ' + BIG_INT + b', "level": 0.5}', 1)
    send(intake, b'{"ts": 1764126000.5, "conf": -' + BIG_INT + b"}", 2)
    send(intake, b'{"ts": 1764126000.5, "conf": ' + b"7" * 5000 + b"}", 3)
    assert stats.counted == 2 and stats.rejects["malformed_json"] == 1  # msgspec: > 4300 digits
    assert agg.counters["bad_numeric_field"] == 2
    assert len(ledger) == 3
    (chunk,) = agg.close_all()
    assert "conf" not in chunk.num and chunk.num["level"].n == 1
    assert_finite_wire(encode_chunk(chunk))


def test_huge_int_timestamp_is_a_bad_timestamp_on_gateway_time() -> None:
    intake, agg, ledger, stats = build_intake()
    send(intake, b'{"ts": ' + BIG_INT + b', "conf": 0.5}', 1)
    send(intake, b'{"ts": -' + BIG_INT + b"}", 2, topic=b"legacy/cam-1/events")
    assert stats.counted == 2
    assert intake.clocks.counters["bad_timestamp_used_gateway_time"] == 2
    assert len(ledger) == 2
    assert all("time_from_gateway" in c.flags for c in agg.close_all())
    with pytest.raises(BadTimestamp):
        parse_event_time(10**400, "auto")
    with pytest.raises(BadTimestamp):
        parse_event_time(-(10**400), "ms")


def test_huge_or_long_int_category_is_refused_without_str() -> None:
    intake, agg, _, stats = build_intake()
    send(intake, b'{"ts": 1764126000.5, "cls": ' + BIG_INT + b', "zone": 12, "status": true}', 1)
    send(intake, b'{"ts": 1764126000.5, "cls": ' + b"9" * 64 + b"}", 2)
    send(intake, b'{"ts": 1764126000.5, "cls": -' + b"9" * 63 + b"}", 3)
    assert stats.counted == 3
    assert agg.counters["bad_categorical_field"] == 2
    (chunk,) = agg.close_all()
    assert chunk.cat["cls"] == {"-" + "9" * 63: 1}
    assert chunk.cat["zone"] == {"12": 1} and chunk.cat["status"] == {"true": 1}


def test_unexpected_exception_is_internal_error_logged_and_acked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    intake, agg, ledger, stats = build_intake()

    def boom(*_a: object, **_kw: object) -> None:
        raise RuntimeError("a bug in the aggregator")

    monkeypatch.setattr(agg, "add", boom)
    with caplog.at_level(logging.WARNING):
        send(intake, b'{"ts": 1764126000.5}', 1)
        send(intake, b'{"ts": 1764126000.6}', 2)
    assert stats.rejects["internal_error"] == 2 and stats.received == 2
    assert len(ledger) == 2
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1  # rate-limited
    assert "a bug in the aggregator" in caplog.text
    monkeypatch.undo()
    send(intake, b'{"ts": 1764126000.7}', 3)
    assert stats.counted == 1


# -- no non-finite number, ever ------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [b"1e200", b"-1e200", b"1.1e154", b"-1.0000001e154", b"1" + b"0" * 155]
)
def test_a_value_whose_square_overflows_is_refused(value: bytes) -> None:
    intake, agg, _, stats = build_intake()
    send(intake, b'{"ts": 1764126000.5, "conf": ' + value + b', "level": 1e154}', 1)
    assert stats.counted == 1 and agg.counters["bad_numeric_field"] == 1
    (chunk,) = agg.close_all()
    assert "conf" not in chunk.num
    assert chunk.num["level"].sumsq == 1e154 * 1e154
    assert_finite_wire(encode_chunk(chunk))


def test_sums_that_would_overflow_refuse_the_value() -> None:
    intake, agg, _, stats = build_intake()
    for mid in range(1, 5):
        send(intake, b'{"ts": 1764126000.5, "conf": 1e154, "level": 1.7e308}', mid)
    send(intake, b'{"ts": 1764126000.5, "conf": -1e154}', 5)
    assert stats.counted == 5
    # conf: 1e154 once (sumsq 1e308); the next three would make sumsq infinite; -1e154 would
    # too. level: 1.7e308 is refused outright (its square overflows).
    assert agg.counters["bad_numeric_field"] == 4 + 4
    (chunk,) = agg.close_all()
    assert chunk.num["conf"].n == 1 and "level" not in chunk.num
    assert_finite_wire(encode_chunk(chunk))


def test_chunk_refuses_a_value_that_would_make_a_sum_non_finite() -> None:
    c = Chunk("cam-1", "det", int(T0), 1)
    c.add_times(T0, T0)
    assert c.add_number("x", 1e154, T0)
    assert not c.add_number("x", -1e154, T0)  # sumsq would be 2e308
    assert c.num["x"].n == 1 and c.num["x"].sum == 1e154 and c.num["x"].sumsq == 1e308
    assert not c.add_number("y", 1e300, T0)
    assert "y" not in c.num  # no empty stats (min = inf) left behind
    assert_finite_wire(encode_chunk(c))


# -- reading stored chunks never crashes -----------------------------------------------------


def good_chunk(cam: str = "cam-1", t: int = int(T0), conf: float = 0.5) -> Chunk:
    c = Chunk(cam, "det", t, 1)
    c.add_times(t + 0.1, t + 0.2)
    c.add_number("conf", conf, t + 0.1)
    c.add_category("cls", "car", 32)
    return c


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"a string"',
        b"null",
        b'{"camera": "cam-1"}',
        b'{"cls":"\xff"}',
        b"[" * 100000 + b"]" * 100000,
    ],
)
def test_decode_chunk_refuses_what_is_not_a_chunk(body: bytes) -> None:
    with pytest.raises(BadChunk):
        decode_chunk(body)


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        (("num", "conf", "sumsq"), b"null"),
        (("num", "conf", "sum"), b"1e400"),
        (("num", "conf", "min"), b"-1e400"),
        (("num", "conf", "n"), b"0"),
        (("num", "conf", "n"), BIG_INT),
        (("count",), b"9223372036854775808"),
        (("t",), b"-" + BIG_INT),
        (("num", "conf", "last_t"), b"null"),
        (("num", "conf"), b'{"n": 1}'),
        (("event_first",), b"null"),
        (("count",), b"-1"),
        (("count",), b"2.5"),
        (("width_s",), b"0"),
        (("t",), b"1e400"),
        (("camera",), b"7"),
        (("camera",), b'"\xff"'),
        (("flags",), b"[1]"),
        (("cat", "cls", "car"), b"null"),
        (("cat", "cls"), b'["car"]'),
        (("skew_s",), b"1e308"),  # times count 3: the skew sum is not finite
    ],
)
def test_decode_chunk_refuses_bad_or_non_finite_fields(path: tuple[str, ...], raw: bytes) -> None:
    c = good_chunk()
    c.count = 3
    doc = c.to_wire()
    target = doc
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = "@raw@"
    # Literals json.dumps cannot write (1e400, huge ints, invalid UTF-8) are spliced in.
    body = json.dumps(doc).encode().replace(b'"@raw@"', raw)
    with pytest.raises(BadChunk):
        decode_chunk(body)


def test_decode_chunk_reads_back_a_good_chunk() -> None:
    c = good_chunk()
    back = decode_chunk(encode_chunk(c))
    assert back.to_wire() == c.to_wire()


def test_compaction_keeps_bad_rows_as_they_are_and_keeps_going() -> None:
    t = int(T0)
    bad_sumsq = encode_chunk(good_chunk(t=t)).replace(b'"sumsq":0.25', b'"sumsq":null')
    bodies = [
        encode_chunk(good_chunk(t=t)),
        bad_sumsq,
        encode_chunk(good_chunk(t=t + 1)),
        b'{"cls":"\xff"}',
        encode_chunk(good_chunk(t=t + 2)),
    ]
    rows = [(seq, seq, float(seq), body) for seq, body in enumerate(bodies, start=1)]
    out = compact_range(rows, coarser=10)
    assert out is not None
    kept = [body for _, body in out]
    # The two bad rows stay untouched (never merged, never lost); the three good ones merge.
    assert bad_sumsq in kept and b'{"cls":"\xff"}' in kept and len(kept) == 3
    merged = [assert_finite_wire(b) for b in kept if b not in (bad_sumsq, b'{"cls":"\xff"}')]
    assert [m.count for m in merged] == [3]
    # Counting reads only `count`: the row with a broken number still holds its message; the
    # row that says no count holds none.
    assert counted_messages(bodies) == 4


def test_compaction_leaves_a_group_whose_sums_would_overflow() -> None:
    t = int(T0)
    bodies = [encode_chunk(good_chunk(t=t + i, conf=1e154)) for i in range(1, 4)]
    bodies += [
        encode_chunk(good_chunk(cam="cam-2", t=t)),
        encode_chunk(good_chunk(cam="cam-2", t=t + 1)),
    ]
    rows = [(seq, seq, float(seq), body) for seq, body in enumerate(bodies, start=1)]
    out = compact_range(rows, coarser=10)
    assert out is not None
    kept = [body for _, body in out]
    assert kept[:3] == bodies[:3]  # the overflowing group, as it was
    assert len(kept) == 4
    for body in kept:
        assert_finite_wire(body)


# -- structure-aware fuzzing of the whole ingest path ------------------------------------------

BAD_UTF8 = (
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc3",
    b"\xc3\x28",
    b"\xe2\x82",
    b"\xed\xa0\x80",
    b"\xf8\x88",
)
EXTREME = (
    b"1e308", b"1e309", b"1e400", b"-1e400", b"1.7976931348623157e308", b"-1.7976931348623157e308",
    b"1e154", b"-1e154", b"9.9e153", b"-1.3e154", b"1.0000001e154", b"-1e200", b"1e-400",
    b"5e-324", b"1E+999", b"0e99999", b"-0", b"1764126000123", b"1764126000123456789",
    b"-1764126000", b"1e10",
)  # fmt: skip
TIMES = (
    b'"2025-11-26T03:00:00Z"', b'"0001-01-01T00:00:00+14:00"', b'"9999-12-31T23:59:59-23:59"',
    b'"2025-11-26T03:00:00"', b'"not a time"', b'"' + b"9" * 41 + b'"',
)  # fmt: skip


def _raw(v: object) -> bytes:
    return json.dumps(v).encode()


def _huge_int(sign: bool, n: int, digits: str) -> bytes:
    body = (digits * (n // len(digits) + 1))[: n - 1]
    return (b"-" if sign else b"") + b"7" + body.encode()


def _nest(depth: int, as_dict: bool) -> bytes:
    if as_dict:
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"[" * depth + b"1" + b"]" * depth


leaf = st.one_of(
    st.sampled_from([b"true", b"false", b"null", b"0", b"0.5", b"1764126000.25"]),
    st.floats(allow_nan=False, allow_infinity=False).map(_raw),
    st.integers().map(_raw),
    st.text(max_size=80).map(_raw),
    st.builds(
        lambda pre, bad, post: b'"' + pre + bad + post + b'"',
        st.sampled_from([b"", b"per", b"x" * 70]),
        st.sampled_from(BAD_UTF8),
        st.sampled_from([b"", b"son"]),
    ),
    st.builds(_huge_int, st.booleans(), st.integers(300, 5000), st.text("0123456789", min_size=1)),
    st.sampled_from(EXTREME),
    st.builds(
        lambda m, e: f"{m}e{e}".encode(),
        st.sampled_from(["1", "-9.5", "0.1"]),
        st.integers(-1000, 1000),
    ),
    st.builds(lambda n: b'"' + b"a" * n + b'"', st.integers(65, 70_000)),
    st.builds(_nest, st.integers(1, 3000), st.booleans()),
    st.sampled_from(TIMES),
)
key = st.one_of(
    st.sampled_from((*NUMERIC, *CATEGORICAL, "ts", "ts", "frame")).map(_raw),
    st.text(max_size=8).map(_raw),
    st.sampled_from(BAD_UTF8).map(lambda b: b'"k' + b + b'"'),
)
value = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: b"[" + b",".join(xs) + b"]"),
        st.lists(st.tuples(key, inner), max_size=4).map(
            lambda kv: b"{" + b",".join(k + b":" + v for k, v in kv) + b"}"
        ),
    ),
    max_leaves=8,
)
# An honest reading whose configured fields are then overridden with hostile values, so each
# kind of leaf reaches the field it targets instead of the whole document failing to parse.
HONEST = {b'"ts"': b"1764126000.5", b'"conf"': b"0.5", b'"level"': b"0.25", b'"cls"': b'"car"'}
FIELDS = tuple(_raw(f) for f in (*NUMERIC, *CATEGORICAL, "ts"))


def _document(overrides: dict[bytes, bytes], extra: list[tuple[bytes, bytes]]) -> bytes:
    fields = {**HONEST, **overrides}
    pairs = [k + b":" + v for k, v in [*fields.items(), *extra]]
    return b"{" + b",".join(pairs) + b"}"


document = st.builds(
    _document,
    # Mostly one hostile leaf per field; sometimes a container of them.
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(leaf, leaf, leaf, value), max_size=3),
    st.lists(st.tuples(key, value), max_size=1),
)
ROUTED = (
    b"site/cam/cam-0/detections",
    b"site/cam/cam-1/detections",
    b"site/cam/cam-1/motion",
    b"legacy/cam-2/events",
    b"rfc/cam-3/log",
)
topic = st.sampled_from([*ROUTED, *ROUTED, *ROUTED, b"site/cam/\xff/detections", b"nowhere/cam-1"])
payload = st.one_of(document, document, document, document, document, value)
message = st.tuples(topic, payload, st.sampled_from([0, 1]))


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(st.tuples(message, st.integers(1, 3)), min_size=1, max_size=20))
def test_hostile_documents_through_the_whole_ingest_path(
    drawn: list[tuple[tuple[bytes, bytes, int], int]],
) -> None:
    # A message sent up to three times (cameras repeat themselves): values near the limit then
    # add up in one window.
    messages = [m for m, times in drawn for _ in range(times)]
    intake, agg, ledger, stats = build_intake()
    for mid, (topic_b, payload, qos) in enumerate(messages, start=1):
        intake.handle(topic_b, payload, mid, qos, False, T0 + mid / 100)  # never raises
    assert stats.received == len(messages)
    assert per_message(stats) == stats.received, dict(stats.rejects)
    assert stats.rejects["internal_error"] == 0  # every hostile input has a named reason
    qos1 = [(mid, t, p) for mid, (t, p, q) in enumerate(messages, start=1) if q]
    assert len(ledger) == len(qos1)
    for mid, topic_b, payload in qos1:
        assert ledger.redelivered(mid, digest(topic_b, payload), T0)
    chunks = agg.close_all()
    assert sum(c.count for c in chunks) == stats.counted
    for c in chunks:
        assert assert_finite_wire(encode_chunk(c)).count == c.count
        assert all(len(k) <= MAX_CATEGORY_LEN for counts in c.cat.values() for k in counts)


# -- the soak's catalogue, pill by pill, in process -------------------------------------------


@pytest.mark.parametrize("pill", PILLS, ids=lambda p: p.name)
def test_every_pill_of_the_catalogue_meets_its_outcome(pill: Pill) -> None:
    """What bench/hostile_soak.py holds the agent to, message by message: each of a pill's
    topics is rejected under its reason, or counted under its camera with its side counters.
    A payload far over mqtt.max_payload_bytes, which the broker drops, is oversized here."""
    intake, agg, ledger, stats = build_intake([StreamSettings(**s) for s in STREAMS])
    for n in range(7):  # every topic of the id pills
        send(intake, pill.payload(T0), n + 1, pill.topic(n).encode())
    assert len(ledger) == 7 and per_message(stats) == 7
    outcome = "reject:oversized" if pill.outcome == "broker_drops" else pill.outcome
    if outcome.startswith("reject:"):
        assert stats.rejects[outcome.removeprefix("reject:")] == 7, dict(stats.rejects)
    else:
        assert stats.counted == 7, dict(stats.rejects)
        cameras = {c.camera for c in agg.close_all()}
        assert len(cameras) == 7 if outcome == "flood" else cameras == {pill.camera}
    side = {**agg.counters, **intake.clocks.counters}
    assert {k: side.get(k, 0) for k in SIDE_COUNTERS} == {
        k: 7 * pill.side.get(k, 0) for k in SIDE_COUNTERS
    }


# -- the proof with real processes -----------------------------------------------------------

# Pills of bench/pills.py (the hostile soak's catalogue): invalid UTF-8 twice, 1e400, and four
# counted under cam-hostile: 400-digit ints as a number, a time and a category, 1e200.
HOSTILE = ("utf8_in_string", "utf8_in_string_2", "int_400_digits_numeric", "int_400_digits_ts",
           "int_400_digits_category", "float_1e200", "float_1e400")  # fmt: skip


def publish_raw(broker: Mosquitto, topic: str, payloads: list[bytes]) -> None:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"hostile-{time.time_ns()}", protocol=mqtt.MQTTv5
    )
    client.connect("127.0.0.1", broker.port, keepalive=30)
    client.loop_start()
    try:
        infos = [client.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_hostile_messages_among_honest_ones_stop_nothing(
    agents: AgentFactory, tmp_path: Path
) -> None:
    """Invalid UTF-8, 400-digit ints and overflowing squares on the broker among honest traffic:
    every honest message reaches the cloud exactly once, without a reconnect."""
    agent = agents.start()
    pub = Publisher(agents.broker, tmp_path, cameras=20, rate=10, duration_s=4, seed=11).start()
    wait_for(lambda: (agent.status() or {}).get("ingest", {}).get("counted", 0) > 0,
             timeout_s=20, what="honest traffic")  # fmt: skip
    payloads = [BY_NAME[name].payload(time.time()) for name in HOSTILE]
    publish_raw(agents.broker, "site/cam/cam-hostile/detections", payloads * 3)
    expected = pub.join()

    def honest() -> dict[tuple[str, str, int], Chunk]:
        return {k: c for k, c in load_merged(agents.receiver.db).items() if k[0] != "cam-hostile"}

    want = sum(e.count for e in expected.values())
    wait_for(
        lambda: sum(c.count for c in honest().values()) >= want,
        timeout_s=60,
        what=f"{want} honest messages at the receiver",
    )
    status = agent.status()
    assert_exact(compare(expected, honest()))
    assert_seqs_clean(agents.receiver)
    assert status is not None
    assert status["mqtt"]["reconnects"] == 0
    rejects = status["ingest"]["rejects"]
    assert rejects.get("malformed_json", 0) == 3 * 3  # invalid UTF-8 twice, 1e400
    assert status["aggregate"].get("bad_timestamp_used_gateway_time", 0) == 3
    assert rejects.get("internal_error", 0) == 0
    assert status["aggregate"]["bad_numeric_field"] == 3 * 3
    assert status["aggregate"]["bad_categorical_field"] == 3
    hostile = [c for k, c in load_merged(agents.receiver.db).items() if k[0] == "cam-hostile"]
    assert sum(c.count for c in hostile) == 3 * 4
    assert agent.stop() == 0


def test_an_id_flood_past_the_camera_cap_keeps_no_clock_estimates() -> None:
    """Found by bench/hostile_soak.py: every id refused at the camera cap used to leave a
    camera clock estimate behind (~1 KB each, 8 MiB a minute under a flood)."""

    a = AggregateSettings(max_cameras=5)
    clocks = build_clocks(a)
    intake = Intake(
        router=TopicRouter([StreamSettings(topic="site/cam/{camera}/{stream}", numeric=NUMERIC)]),
        aggregator=build_aggregator(a), clocks=clocks, ledger=AckLedger(), stats=Stats(),
        max_payload_bytes=65536,
    )  # fmt: skip
    for i in range(500):
        payload = json.dumps({"ts": T0 + i / 1000, "conf": 0.5}).encode()
        intake.handle(f"site/cam/flood-{i}/det".encode(), payload, i + 1, 1, False, T0, 0.0)
    assert len(clocks.items()) <= 5

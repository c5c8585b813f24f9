"""Manual acks and the PUBLISH hot path through aiomqtt's paho client: fails loudly if an
aiomqtt or paho upgrade breaks them (the versions checked are pinned in pyproject.toml)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import aiomqtt
import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config.settings import MqttSettings
from agent.intake.ingest import BARRIER_TOPIC, connect_properties
from agent.intake.mqtt_compat import (
    FastReader,
    expect_late_unsubacks,
    frame,
    install,
    publish_fields,
    send_acks,
)
from devtools.procs import HOST, Mosquitto


def publish(port: int, topic: str, payloads: list[bytes]) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect(HOST, port)
    c.loop_start()
    try:
        for p in payloads:
            c.publish(topic, p, qos=1).wait_for_publish(timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()


async def receive(
    port: int, until: bytes | None, *, ack: bool, fast: bool = True
) -> list[tuple[int, bool, bytes]]:
    """Connect (persistent session), collect messages until `until` arrives, optionally ack all."""
    got: list[tuple[int, bool, bytes]] = []
    done = asyncio.Event()
    settings = MqttSettings(host=HOST, port=port, client_id="compat-test")
    client = aiomqtt.Client(
        HOST, port, identifier="compat-test", protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False, properties=connect_properties(settings),
    )  # fmt: skip

    def handler(topic: bytes, payload: bytes, mid: int, qos: int, dup: bool) -> None:
        got.append((mid, dup, payload))
        if ack:
            send_acks(client, [mid])
        if payload == until:
            done.set()

    reader = install(client, handler, fast=fast)
    assert (reader is not None) == fast, "the fast read path could not be installed"
    async with client:
        await client.subscribe("compat/#", options=SubscribeOptions(qos=1))
        if until is not None:
            async with asyncio.timeout(10):
                await done.wait()
        if ack:
            # The agent's ack barrier (MqttSession.confirm_acks): the UNSUBACK comes back only
            # after the broker has processed every PUBACK sent before it. Without it, leaving
            # right away can lose the last PUBACKs and the next connection gets them again.
            await client.unsubscribe(BARRIER_TOPIC, timeout=5)
    return got


@pytest.mark.parametrize("fast", [True, False], ids=["fast-reader", "paho-reader"])
async def test_unacked_messages_are_redelivered_with_dup_and_same_ids(
    broker: Mosquitto, fast: bool
) -> None:
    # Create the persistent session and its subscription, then publish while we are away.
    await receive(broker.port, None, ack=True, fast=fast)
    await asyncio.to_thread(
        publish, broker.port, "compat/a", [b"m%d" % i for i in range(20)] + [b"end1"]
    )
    first = await receive(broker.port, b"end1", ack=False, fast=fast)
    assert [p for _, _, p in first][-1] == b"end1"
    assert len(first) == 21
    assert not any(dup for _, dup, _ in first)

    # Nothing was acked: the broker must hand every message over again, DUP set, same ids.
    again = await receive(broker.port, b"end1", ack=True, fast=fast)
    assert [(mid, p) for mid, _, p in again] == [(mid, p) for mid, _, p in first]
    assert all(dup for _, dup, _ in again)

    # Now acked: a third connection gets only what is new.
    await asyncio.to_thread(publish, broker.port, "compat/a", [b"end2"])
    third = await receive(broker.port, b"end2", ack=True, fast=fast)
    assert [p for _, _, p in third] == [b"end2"]


# -- the hot path's own parser ----------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(
    topic: bytes, payload: bytes, mid: int, qos: int, dup: bool, props: bytes
) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    body += varint(len(props)) + props + payload
    return bytes([0x30 | (0x08 if dup else 0) | (qos << 1)]) + varint(len(body)) + body


PUBLISHES = st.tuples(
    st.binary(max_size=70),
    st.binary(max_size=3000),
    st.integers(1, 65535),
    st.sampled_from([0, 1]),
    st.booleans(),
    # a user property (0x26), a message expiry (0x02), or none
    st.sampled_from([b"", b"\x02\x00\x00\x00\x3c", b"\x26\x00\x01k\x00\x02vv"]),
)
OTHERS = st.sampled_from([b"\xd0\x00", b"\x90\x04\x00\x07\x00\x01", b"\xb0\x03\x00\x09\x00"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(PUBLISHES, OTHERS), max_size=30),
    st.lists(st.integers(1, 4000), max_size=40),
)
def test_packets_split_anywhere_parse_to_what_was_sent(
    packets: list[tuple[bytes, bytes, int, int, bool, bytes] | bytes], cuts: list[int]
) -> None:
    stream = b"".join(p if isinstance(p, bytes) else publish_packet(*p) for p in packets)
    want = [
        ("other", p)
        if isinstance(p, bytes)
        else ("publish", (p[0], p[1], p[2] if p[3] else 0, p[3]))
        for p in packets
    ]
    got: list[tuple[str, object]] = []
    buf = bytearray()
    at = 0
    for piece in [*cuts, len(stream)]:
        buf += stream[at : at + piece]
        at += piece
        pos = 0
        while (framed := frame(buf, pos, len(buf))) is not None:
            i, end = framed
            first = buf[pos]
            if first & 0xF0 == 0x30:
                got.append(("publish", publish_fields(buf, first, i, end)))
            else:
                got.append(("other", bytes(buf[pos:end])))
            pos = end
        del buf[:pos]
    assert not buf
    assert got == want


def test_a_length_of_five_bytes_is_refused() -> None:
    with pytest.raises(ConnectionError):
        frame(bytearray(b"\x30\xff\xff\xff\xff\x01"), 0, 6)
    assert frame(bytearray(b"\x30\xff\xff\xff"), 0, 4) is None  # still incomplete


def test_a_publish_whose_fields_overrun_it_is_left_to_paho() -> None:
    # topic length 200 in a 6-byte packet: paho reads it and reports the protocol error
    assert publish_fields(bytearray(b"\x32\x04\x00\xc8ab"), 0x32, 2, 6) is None


# -- the hot path against a real broker -------------------------------------------------------


async def test_fast_reader_takes_big_mixed_traffic_in_order_with_few_wakeups(
    broker: Mosquitto,
) -> None:
    """Big payloads spanning many reads, QoS 0 and 1, a QoS 2 delivery handed to paho; the
    keepalive's PINGRESPs go through paho too, so an idle connection stays up."""
    got: list[tuple[bytes, int]] = []
    done = asyncio.Event()
    client = aiomqtt.Client(
        HOST, broker.port, identifier="fast-test", protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=True, keepalive=1,
    )  # fmt: skip

    def handler(topic: bytes, payload: bytes, mid: int, qos: int, dup: bool) -> None:
        got.append((payload, qos))
        if qos == 1:
            send_acks(client, [mid])
        elif qos == 2:  # the agent subscribes at QoS 1 and never sees one; paho answers PUBREC
            client._client.ack(mid, qos)
        if payload == b"end":
            done.set()

    reader = install(client, handler)
    assert isinstance(reader, FastReader)
    payloads = [b"x%d-" % i + b"." * (i * 37 % 5000) for i in range(1500)]
    payloads[700] = b"big" + b"B" * 600_000  # over two reads of 256 KiB
    async with client:
        await client.subscribe("fast/q1/#", options=SubscribeOptions(qos=1))
        await client.subscribe("fast/q0/#", options=SubscribeOptions(qos=0))
        await client.subscribe("fast/q2/#", options=SubscribeOptions(qos=2))

        def send() -> None:
            c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
            c.connect(HOST, broker.port)
            c.loop_start()
            try:
                for i, p in enumerate(payloads):
                    c.publish(f"fast/q{i % 2}/cam", p, qos=1).wait_for_publish(timeout=10)
                c.publish("fast/q2/cam", b"two", qos=2).wait_for_publish(timeout=10)
                c.publish("fast/q1/cam", b"end", qos=1).wait_for_publish(timeout=10)
            finally:
                c.disconnect()
                c.loop_stop()

        await asyncio.to_thread(send)
        async with asyncio.timeout(20):
            await done.wait()
        # Idle for three keepalive periods: paho sends PINGREQs; their PINGRESPs come back
        # through the fast reader's hand-over, or paho would drop the connection.
        handed = reader.handed
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            assert client._client.is_connected(), "the keepalive failed under the fast reader"
        assert reader.handed > handed, "no PINGRESP was handed to paho"
    # paho delivers the QoS 2 message when its PUBREL arrives: after "end", perhaps.
    assert (b"two", 2) in got
    got.remove((b"two", 2))
    want = [(p, i % 2) for i, p in enumerate(payloads)] + [(b"end", 1)]
    assert got == want
    assert reader.published == len(payloads) + 1  # the QoS 2 one went through paho
    assert reader.wakeups < len(want)


@pytest.mark.parametrize("expected", [True, False])
async def test_a_late_barrier_answer_is_not_an_error(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture, expected: bool
) -> None:
    """The ack barrier gives up on its UNSUBACK after its wait; the answer comes later. aiomqtt
    logs that as an ERROR with a traceback (the control case shows it still does); with
    `expect_late_unsubacks` it is not an error."""
    logger = logging.getLogger(f"mqtt.late-unsuback-{expected}")  # a filter stays on a logger
    client = aiomqtt.Client(HOST, broker.port, protocol=aiomqtt.ProtocolVersion.V5, logger=logger)
    if expected:
        expect_late_unsubacks(client)
    async with client:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0):  # sent, then given up on before its answer
                await client.unsubscribe(BARRIER_TOPIC, timeout=math.inf)
        # The broker answers in order: once this one is answered, the late one was handled.
        await client.unsubscribe(BARRIER_TOPIC, timeout=10)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (errors == []) is expected, errors

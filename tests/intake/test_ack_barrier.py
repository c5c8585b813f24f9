"""The ack barrier against a real Mosquitto: the broker's confirmation of our PUBACKs, and the
ledger's bound while a backlog floods in (issue #24: a disk that healed after five minutes,
548 MB of RSS on the way back).

Mosquitto 2.0.11 moves up to Receive Maximum queued messages into flight for each PUBACK of its
oldest one, so once a backlog is queued for the agent, its first acks put the whole queue in
front of anything else the broker sends on that connection, the in-band barrier's UNSUBACK
included. Every message acked meanwhile keeps its key in the ledger until the confirmation.
These tests count what the ledger holds; they time nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import aiomqtt
import httpx
import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.app.service import build_aggregator, build_clocks, build_pipeline, shutdown_pipeline
from agent.config.settings import (
    BufferSettings,
    ForwardSettings,
    MqttSettings,
    Settings,
    StreamSettings,
)
from agent.core.stats import Stats
from agent.durable.outbox import Outbox
from agent.intake.acks import AckLedger, Pending
from agent.intake.ingest import (
    Intake,
    MqttSession,
    SideBarrier,
    TopicRouter,
    connect_properties,
)
from agent.ops.pipeline import Pipeline
from devtools.procs import HOST, Mosquitto

RECEIVE_MAXIMUM = 100  # the smallest the config allows
BACKLOG = 3_000  # queued while the agent is away: 30 x Receive Maximum


# -- the rule: MqttSession.room ----------------------------------------------------------------


class _Side:
    """The side barrier as the session sees it: answering (bounds) or not."""

    up = True

    def __init__(self, bounds: bool) -> None:
        self.bounds = bounds


def _session(bounds: bool) -> tuple[MqttSession, AckLedger, list[Pending]]:
    """A session (never connected) over a real ledger; the acks it sent and not yet confirmed
    are the returned list (the checkpoint's, Checkpointer.unconfirmed)."""
    s = Settings(gateway_id="gw-room", mqtt=MqttSettings(receive_maximum=RECEIVE_MAXIMUM))
    ledger = AckLedger()
    stats = Stats()
    intake = Intake(
        router=TopicRouter(s.streams), aggregator=build_aggregator(s.aggregate),
        clocks=build_clocks(s.aggregate), ledger=ledger, stats=stats,
        max_payload_bytes=s.mqtt.max_payload_bytes,
    )  # fmt: skip
    session = MqttSession(
        settings=s.mqtt, router=TopicRouter(s.streams), intake=intake, ledger=ledger, stats=stats
    )
    unconfirmed: list[Pending] = []
    session.side = _Side(bounds)  # type: ignore[assignment]
    session.unconfirmed = lambda: len(unconfirmed)
    return session, ledger, unconfirmed


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("deliver"), st.integers(1, 3 * RECEIVE_MAXIMUM)),
        st.tuples(st.just("ack"), st.just(0)),
        st.tuples(st.just("confirm"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_the_ledger_holds_at_most_twice_receive_maximum_whatever_the_order(
    events: list[tuple[str, int]],
) -> None:
    """The broker sends as much as it likes (Mosquitto 2.0.11 past Receive Maximum); the reader
    takes what `room()` allows; checkpoints ack, round trips confirm, in any order. While the
    side barrier answers, the ledger never holds more than 2 x Receive Maximum keys."""
    session, ledger, unconfirmed = _session(bounds=True)
    n = 0
    for what, k in events:
        if what == "deliver":  # the fast reader hands over at most room() QoS 1 messages
            for _ in range(min(k, session.room())):
                n += 1
                ledger.track(n % 65535 + 1, 1, n, None, 0.0)
        elif what == "ack":  # a checkpoint committed them: acked, unconfirmed
            unconfirmed += ledger.pop_acked(len(ledger.ackable()))
        else:  # a round trip came back after those acks
            ledger.confirmed(unconfirmed)
            unconfirmed.clear()
        assert ledger.keys_held <= 2 * RECEIVE_MAXIMUM
        assert len(ledger) <= RECEIVE_MAXIMUM


def test_without_the_side_barrier_unconfirmed_acks_never_stop_the_reads() -> None:
    """The in-band barrier's answer comes behind whatever the broker queued before it: holding
    reads for it would wait forever. Only Receive Maximum unacked stops them then."""
    session, ledger, unconfirmed = _session(bounds=False)
    for n in range(1, 10 * RECEIVE_MAXIMUM):
        if not session.room():
            unconfirmed += ledger.pop_acked(len(ledger.ackable()))
        assert session.room() > 0
        ledger.track(n, 1, n, None, 0.0)
    assert ledger.keys_held > 2 * RECEIVE_MAXIMUM  # the old limit, documented


# -- against Mosquitto ----------------------------------------------------------------------


def _settings(port: int, path: Path, client_id: str) -> Settings:
    return Settings(
        gateway_id="gw-barrier",
        mqtt=MqttSettings(
            host=HOST, port=port, client_id=client_id, receive_maximum=RECEIVE_MAXIMUM
        ),
        streams=(StreamSettings(topic="flood/{camera}/{stream}", categorical=("cls",)),),
        buffer=BufferSettings(path=path, checkpoint_interval_ms=20),
        forward=ForwardSettings(url="http://127.0.0.1:9/ingest", shutdown_drain_s=0),
    )


async def _make_session(settings: Settings) -> None:
    """The agent's persistent session and its subscription, then away: what is published next
    is queued for it."""
    m = settings.mqtt
    client = aiomqtt.Client(
        HOST, m.port, identifier=m.client_id, protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False, properties=connect_properties(m),
    )  # fmt: skip
    async with client:
        await client.subscribe("flood/+/+", options=SubscribeOptions(qos=1))


def _publish_backlog(port: int, n: int) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect(HOST, port)
    c.loop_start()
    try:
        for start in range(0, n, 500):
            infos = [
                c.publish(f"flood/cam-{i % 7}/det", json.dumps({"i": i, "cls": "person"}), qos=1)
                for i in range(start, min(n, start + 500))
            ]
            for info in infos:
                info.wait_for_publish(timeout=30)
    finally:
        c.disconnect()
        c.loop_stop()


async def _drain_backlog(settings: Settings) -> tuple[Pipeline, int]:
    """Run the agent's pipeline in process until every queued message is counted and acked;
    the most keys its ledger held at once (sampled after every message it took)."""
    outbox, recovery = await Outbox.open(settings.buffer.path, synchronous="off")
    done = asyncio.Event()
    holder: dict[str, Pipeline] = {}
    peak = 0

    def send_acks(mids: list[int]) -> None:
        p = holder["p"]
        p.session.ack(mids)
        if p.stats.counted >= BACKLOG and not len(p.ledger):  # all taken, and all acked
            done.set()

    # The cloud takes every batch (a stream: the forwarder reads answers as one).
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, stream=httpx.ByteStream(b""))
    )
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            p = await build_pipeline(settings, outbox, recovery, http, send_acks=send_acks)
            holder["p"] = p
            ledger = p.ledger
            track = ledger.track

            def tracked(*args: object, **kw: object) -> None:
                nonlocal peak
                track(*args, **kw)  # type: ignore[arg-type]
                peak = max(peak, ledger.keys_held)

            ledger.track = tracked  # type: ignore[method-assign]
            mqtt_task = asyncio.create_task(p.session.run())
            ckpt_task = asyncio.create_task(p.checkpointer.run())
            fwd_task = asyncio.create_task(p.forwarder.run())
            try:
                async with asyncio.timeout(120):  # a guard against a hang, not a measure
                    await done.wait()
            finally:
                await shutdown_pipeline(p, ckpt_task, [fwd_task, mqtt_task])
    finally:
        await outbox.close()
    return p, peak


async def test_a_flood_after_the_first_acks_keeps_the_ack_ledger_within_twice_receive_maximum(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """30 x Receive Maximum queued while the agent was away arrive at once after its first acks.
    The side connection's answer does not wait behind them, so the ledger holds at most
    Receive Maximum unacked plus Receive Maximum acked and unconfirmed; through the in-band
    barrier alone it held every message of the backlog until the UNSUBACK behind them came."""
    settings = _settings(broker.port, tmp_path / "b.sqlite3", "barrier-flood")
    await _make_session(settings)
    await asyncio.to_thread(_publish_backlog, broker.port, BACKLOG)

    p, peak = await _drain_backlog(settings)

    assert p.stats.counted == BACKLOG  # each queued message counted once
    assert peak <= 2 * RECEIVE_MAXIMUM, f"the ledger held {peak} keys at once"
    assert p.session.side.answered > 0, "the side connection confirmed nothing"


@pytest.mark.e2e
async def test_a_broker_refusing_the_side_connection_still_gets_every_message_once(
    tmp_path: Path,
) -> None:
    """An ACL that lets the agent read its cameras' topics but not the barrier's: the side
    connection's subscription is refused, acks are confirmed in band, reads are bounded by
    Receive Maximum unacked only (holding them for the in-band answer would wait forever), and
    the backlog is delivered exactly; the ledger then holds what the flood put in front of the
    answer, the documented limit."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite flood/#\n")  # anonymous: the cameras' topics only
    mq = Mosquitto(tmp_path / "mq", conf_extra=f"acl_file {acl}\n").start()
    try:
        settings = _settings(mq.port, tmp_path / "b.sqlite3", "barrier-acl")
        await _make_session(settings)
        await asyncio.to_thread(_publish_backlog, mq.port, BACKLOG)
        p, peak = await _drain_backlog(settings)
    finally:
        mq.stop()
    assert p.stats.counted == BACKLOG
    # The barrier connection found out for itself: the session's connection never published
    # there, so the broker never dropped it for that.
    assert p.stats.mqtt_reconnects == 0
    assert p.session.side.answered == 0 and not p.session.side.up
    assert peak > 2 * RECEIVE_MAXIMUM  # no bound without the side connection


class _Refusing:
    """The session's connection as a broker that refuses its PUBLISH sees it: the nonce never
    arrives, and (Mosquitto 2.0.11) the connection ends."""

    def __init__(self) -> None:
        self.published = asyncio.Event()

    async def publish(self, *args: object, **kw: object) -> None:
        self.published.set()


async def test_the_side_channel_is_given_up_after_the_session_ends_twice_with_a_nonce_out(
    broker: Mosquitto,
) -> None:
    """The barrier connection's own nonce came back, but the broker drops the session's
    connection when it publishes one (an ACL telling the two client ids apart): after the
    second such end in a row the session stops publishing there."""
    side = SideBarrier(MqttSettings(host=HOST, port=broker.port, client_id="barrier-given-up"))
    task = asyncio.create_task(side.run(None))
    try:
        await side.ready(10)
        assert side.up, "the barrier connection did not come up"
        for lost in (1, 2):
            session = _Refusing()
            trip = asyncio.create_task(side.round_trip(session, 30))  # type: ignore[arg-type]
            await session.published.wait()
            side.session_lost()  # while its nonce is out
            assert side.up is (lost == 1)
            trip.cancel()
        side.session_lost()  # a later end with no nonce out changes nothing
        assert not side.up and not side.bounds
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

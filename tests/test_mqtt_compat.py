"""Manual acks through aiomqtt's paho client: fails loudly if an aiomqtt upgrade breaks it."""

from __future__ import annotations

import asyncio

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttSettings
from agent.ingest import BARRIER_TOPIC, connect_properties
from agent.mqtt_compat import install_raw_handler, send_ack
from agent.sim.procs import HOST, Mosquitto


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


async def receive(port: int, until: bytes | None, *, ack: bool) -> list[tuple[int, bool, bytes]]:
    """Connect (persistent session), collect messages until `until` arrives, optionally ack all."""
    got: list[tuple[int, bool, bytes]] = []
    done = asyncio.Event()
    settings = MqttSettings(host=HOST, port=port, client_id="compat-test")
    client = aiomqtt.Client(
        HOST, port, identifier="compat-test", protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False, properties=connect_properties(settings),
    )  # fmt: skip

    def handler(m: paho.MQTTMessage) -> None:
        got.append((m.mid, bool(m.dup), bytes(m.payload)))
        if ack:
            send_ack(client, m.mid, m.qos)
        if m.payload == until:
            done.set()

    install_raw_handler(client, handler)
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


async def test_unacked_messages_are_redelivered_with_dup_and_same_ids(broker: Mosquitto) -> None:
    # Create the persistent session and its subscription, then publish while we are away.
    await receive(broker.port, None, ack=True)
    await asyncio.to_thread(
        publish, broker.port, "compat/a", [b"m%d" % i for i in range(20)] + [b"end1"]
    )
    first = await receive(broker.port, b"end1", ack=False)
    assert [p for _, _, p in first][-1] == b"end1"
    assert len(first) == 21
    assert not any(dup for _, dup, _ in first)

    # Nothing was acked: the broker must hand every message over again, DUP set, same ids.
    again = await receive(broker.port, b"end1", ack=True)
    assert [(mid, p) for mid, _, p in again] == [(mid, p) for mid, _, p in first]
    assert all(dup for _, dup, _ in again)

    # Now acked: a third connection gets only what is new.
    await asyncio.to_thread(publish, broker.port, "compat/a", [b"end2"])
    third = await receive(broker.port, b"end2", ack=True)
    assert [p for _, _, p in third] == [b"end2"]

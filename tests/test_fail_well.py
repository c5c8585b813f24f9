"""Failing well against a real broker and a real agent: oversized messages, downgraded
subscriptions, refused credentials."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.sim.procs import Agent, Mosquitto, wait_for
from tests.conftest import AgentFactory

MB = 1024 * 1024


def publish_one(broker: Mosquitto, topic: str, payload: bytes, qos: int = 1) -> None:
    """One message, published and (at QoS 1) acknowledged by the broker."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=30)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def honest(camera: str = "cam-1") -> tuple[str, bytes]:
    doc = {"ts": time.time(), "conf": 0.5, "cls": "person"}
    return f"site/cam/{camera}/detections", json.dumps(doc).encode()


def peak_rss_bytes(agent: Agent) -> int:
    """The process's peak resident set (VmHWM): what a big message would have cost."""
    assert agent.popen is not None
    for line in Path(f"/proc/{agent.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def ingest(agent: Agent) -> dict[str, Any]:
    doc = agent.status() or {}
    section: dict[str, Any] = doc.get("ingest", {})
    return section


def test_a_message_past_max_payload_is_dropped_by_the_broker_not_read(
    agents: AgentFactory,
) -> None:
    """We advertise Maximum Packet Size from mqtt.max_payload_bytes: Mosquitto drops a 40 MB
    message instead of sending it, so the agent's memory does not follow it."""
    agent = agents.start()
    before = peak_rss_bytes(agent)
    publish_one(agents.broker, "site/cam/cam-big/detections", b"x" * (40 * MB))
    publish_one(agents.broker, *honest())
    wait_for(lambda: ingest(agent).get("counted", 0) >= 1, timeout_s=20, what="honest message")
    got = ingest(agent)
    assert got["received"] == 1, got  # the big one never reached the agent
    assert "oversized" not in got["rejects"]
    assert peak_rss_bytes(agent) - before < 20 * MB
    wait_for(lambda: agents.receiver.messages() == 1, timeout_s=20, what="honest message sent")
    assert agent.stop() == 0

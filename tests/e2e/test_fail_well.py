"""Failing well against a real broker and a real agent: oversized messages, downgraded
subscriptions, refused credentials."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from agent.cli.exitcodes import Exit
from agent.config.credentials import TokenSource
from agent.intake.ingest import suback_problems
from agent.ops.health import Cached, Response, json_response
from devtools.procs import Agent, Mosquitto, Receiver, wait_for
from tests.helpers import AgentFactory

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


@contextlib.contextmanager
def custom_agents(tmp_path: Path, receiver: Receiver, **broker: Any) -> Iterator[AgentFactory]:
    """A private Mosquitto configured by `broker` (see procs.Mosquitto) and agents against it."""
    mq = Mosquitto(tmp_path / "mosquitto-custom", **broker).start()
    factory = AgentFactory(tmp_path, mq, receiver)
    try:
        yield factory
    finally:
        factory.stop_all()
        mq.stop()


def start_unready(factory: AgentFactory, env: dict[str, str] | None = None) -> Agent:
    """An agent that is not expected to become ready (AgentFactory.start waits for that)."""
    agent = Agent(factory.config(), factory.tmp_path / "agent.log", factory.health_port)
    if env:
        agent._env = {**os.environ, **env}
    factory.started.append(agent.start())
    return agent


def readyz(agent: Agent) -> tuple[int, list[str]] | None:
    got = agent._get("/readyz")
    return None if got is None else (got[0], list(got[1]["problems"]))


def test_a_subscription_granted_at_qos_0_is_a_readyz_problem(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Mosquitto with `max_qos 0` grants our QoS 1 subscription at QoS 0: /readyz and the log
    name the topic instead of ingesting at QoS 0 in silence."""
    with custom_agents(tmp_path, receiver, conf_extra="max_qos 0\n") as factory:
        agent = start_unready(factory)
        problem = "MQTT subscription 'site/cam/+/+' granted at QoS 0, not 1"
        got = wait_for(
            lambda: (r := readyz(agent)) and any(problem in p for p in r[1]) and r,
            timeout_s=20,
            what="the QoS 0 grant in /readyz",
        )
        assert got[0] == 503
        assert (agent.status() or {})["mqtt"]["connected"] is True
        assert problem in agent.log_text()
        assert agent.stop() == 0


def test_wrong_mqtt_credentials_say_what_the_broker_answered(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A password file on the broker, a wrong password in the agent: /readyz gives the CONNACK
    reason; the right password makes the agent ready."""
    passwords = tmp_path / "mosquitto.passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "agent", "right"],
        check=True, capture_output=True,
    )  # fmt: skip
    extra = f"password_file {passwords}\n"
    with custom_agents(tmp_path, receiver, anonymous=False, conf_extra=extra) as factory:
        env = {"EDGE_AGENT__MQTT__USERNAME": "agent", "EDGE_AGENT__MQTT__PASSWORD": "wrong"}
        agent = start_unready(factory, env)
        problem = "MQTT broker refused: not authorized (135)"
        got = wait_for(
            lambda: (r := readyz(agent)) and problem in r[1] and r,
            timeout_s=20,
            what="the CONNACK reason in /readyz",
        )
        assert got[0] == 503
        assert agent.stop() == 0
        factory.start(env={**env, "EDGE_AGENT__MQTT__PASSWORD": "right"}).stop()


def test_suback_problems_name_each_refused_or_downgraded_topic() -> None:
    codes = [ReasonCode(PacketTypes.SUBACK, identifier=i) for i in (1, 0, 0x87)]
    problems = suback_problems(["a/+", "b/+", "c/+"], codes)
    assert problems == [
        "MQTT subscription 'b/+' granted at QoS 0, not 1: its messages are not acknowledged "
        "and can be lost (broker max_qos or ACL)",
        "MQTT subscription 'c/+' refused by the broker: Not authorized (135)",
    ]
    assert suback_problems(["a/+"], [1]) == []
    assert suback_problems(["a/+", "b/+"], [1]) == ["MQTT SUBACK answered 1 of 2 subscriptions"]


def test_token_file_is_checked_on_read_and_the_last_good_token_kept(tmp_path: Path) -> None:
    path = tmp_path / "cloud-token"
    path.write_bytes("\ufeff token-one \r\nsecond line\n".encode())
    source = TokenSource(None, path)
    assert source() == "token-one" and source.problem is None
    path.write_text("tökén-two\n")
    assert source() == "token-one"
    assert source.problem is not None
    assert "U+00F6 at position 2" in source.problem and "tökén" not in source.problem
    assert "keeping the previous token" in source.problem
    path.write_bytes(b"token-\x01three\n")
    assert source() == "token-one" and "U+0001" in (source.problem or "")
    path.write_bytes(b"\xfftoken\n")
    assert source() == "token-one" and "not UTF-8" in (source.problem or "")
    path.write_text("token-four\n")
    assert source() == "token-four" and source.problem is None
    path.unlink()
    assert source() == "token-four" and "cannot read" in (source.problem or "")
    bad = TokenSource(SecretStr("n\u00e9e"), None)
    assert bad() is None and "sending without a token" in (bad.problem or "")
    fresh = tmp_path / "fresh"
    fresh.write_text("caf\u00e9\n")
    assert TokenSource(None, fresh)() is None


def test_a_bad_token_never_kills_the_agent(agents: AgentFactory, tmp_path: Path) -> None:
    """A BOM in the token file is stripped; a rotation to a non-ASCII token is refused (the
    old token stays in use, /readyz says why) instead of the agent exiting 1."""
    token_file = tmp_path / "cloud-token"
    token_file.write_bytes("\ufefftoken-one\n".encode())
    agents.receiver.fault(required_token="token-one")
    agent = agents.start(env={"EDGE_AGENT__FORWARD__TOKEN_FILE": str(token_file)})
    publish_one(agents.broker, *honest("cam-1"))
    wait_for(lambda: agents.receiver.messages() == 1, timeout_s=20, what="first message")

    token_file.write_text("tökén-two\n")
    problem = f"the cloud token in {token_file} has a character not allowed in an HTTP header"
    publish_one(agents.broker, *honest("cam-2"))
    got = wait_for(
        lambda: (r := readyz(agent)) and any(p.startswith(problem) for p in r[1]) and r,
        timeout_s=20,
        what="the token problem in /readyz",
    )
    assert got[0] == 503
    wait_for(lambda: agents.receiver.messages() == 2, timeout_s=20, what="sent on the old token")
    assert agent.running
    assert (agent.status() or {})["forward"]["token_problem"].startswith(problem)

    agents.receiver.fault(required_token="token-two")
    token_file.write_text("token-two\n")
    publish_one(agents.broker, *honest("cam-3"))
    wait_for(lambda: agents.receiver.messages() == 3, timeout_s=20, what="sent on the new token")
    wait_for(lambda: readyz(agent) == (200, []), timeout_s=20, what="ready again")
    assert "tökén" not in agent.log_text()
    assert agent.stop() == 0


def test_cached_answers_are_built_at_most_once_per_ttl() -> None:
    now = [100.0]
    built: list[float] = []

    def build() -> Response:
        built.append(now[0])
        return json_response(200, {"n": len(built)})

    cached = Cached(build, ttl_s=1.0, clock=lambda: now[0])
    assert cached() == cached() == json_response(200, {"n": 1})
    now[0] += 0.99
    assert cached()[2] == json_response(200, {"n": 1})[2]
    now[0] += 0.01
    assert cached()[2] == json_response(200, {"n": 2})[2]
    assert built == [100.0, 101.0]


def test_a_health_port_in_use_exits_3_at_once_with_one_line(agents: AgentFactory) -> None:
    """A startup failure is one line and exit 3, never a traceback and a process that hangs."""
    import re
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = agents.config(name="port.toml")
        text = re.sub(r'listen = "[^"]*"', f'listen = "127.0.0.1:{port}"', cfg.read_text())
        cfg.write_text(text)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    assert time.monotonic() - started < 15
    out = done.stdout + done.stderr
    assert "cannot start: health.listen" in out and "Traceback" not in out


def test_a_second_signal_cuts_the_shutdown_short_with_its_own_exit_code(
    agents: AgentFactory, tmp_path: Path
) -> None:
    """The cloud is away, so the shutdown drains for forward.shutdown_drain_s (60 s here); a
    second SIGTERM ends it at once, with exit code 7 (agent/cli/exitcodes.py), and the data
    stays in the outbox for the next run."""
    agents.receiver.stop()
    agent = agents.start(agents.config({"forward": {"shutdown_drain_s": 60}}), ready=False)
    wait_for(lambda: (agent.status() or {}).get("mqtt", {}).get("connected"),
             timeout_s=60, what="the agent connected")  # fmt: skip
    publish_one(agents.broker, "site/cam/cam-1/det", b'{"conf": 0.5}')
    wait_for(lambda: (agent.status() or {}).get("outbox", {}).get("chunks", 0) >= 1,
             timeout_s=30, what="a chunk waiting for the cloud")  # fmt: skip
    agent.signal(signal.SIGTERM)
    wait_for(lambda: "shutting down" in agent.log_text(), timeout_s=30, what="the shutdown")
    agent.signal(signal.SIGTERM)
    assert agent.wait(timeout_s=20) == Exit.SECOND_SIGNAL
    assert "second signal: exiting now" in agent.log_text()

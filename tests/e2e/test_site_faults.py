"""The faults of a real site (issue #24, G12/G13), with real processes: a broker that forgot the
agent's session is detected and reported, not taken for a quiet site."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.procs import Agent, Mosquitto, Publisher, Receiver, wait_for
from tests.faultclock import SteppableClock
from tests.faultdisk import FailingDisk
from tests.helpers import AgentFactory, assert_exact, wait_delivered


def _readyz_problems(agent: Agent) -> list[str]:
    got = agent._get("/readyz")
    return list(got[1]["problems"]) if got and got[0] == 503 else []


def test_a_broker_restarted_without_its_session_is_reported(
    agents: AgentFactory, tmp_path: Path
) -> None:
    agent = agents.start()
    agent.wait_ready(timeout_s=60)
    status = agent.status()
    assert status is not None
    # A fresh outbox's first connect has no session, rightly: nothing to report.
    assert status["mqtt"]["sessions_lost"] == 0
    assert status["mqtt"]["session_lost_at"] is None

    # The broker keeps the session across a graceful restart (persistence on): still nothing.
    agents.broker.stop()
    agents.broker.start()
    wait_for(lambda: (agent.status() or {}).get("mqtt", {}).get("reconnects", 0) >= 1,
             timeout_s=30, what="the agent to reconnect")  # fmt: skip
    status = agent.status()
    assert status is not None
    assert status["mqtt"]["sessions_lost"] == 0, status["mqtt"]

    # Now it dies and comes back without its database: the session is gone.
    agents.broker.signal(signal.SIGKILL)
    agents.broker.wait(timeout_s=10)
    for db in Path(agents.broker.log_path).parent.glob("mosquitto.db*"):
        db.unlink()
    agents.broker.start()
    wait_for(lambda: (agent.status() or {}).get("mqtt", {}).get("sessions_lost", 0) == 1,
             timeout_s=30, what="the lost session to be counted")  # fmt: skip
    status = agent.status()
    assert status is not None and status["mqtt"]["session_lost_at"] is not None
    problems = _readyz_problems(agent)
    assert any("had no session for us" in p for p in problems), problems
    assert "had no session for client id 'edge-agent-test'" in agent.log_text()
    assert agent.stop() == 0


def test_a_restarted_agent_expects_its_session(agents: AgentFactory, tmp_path: Path) -> None:
    """Across an agent restart the outbox says a session existed: a broker without it (here,
    restarted without its database while the agent was down) is reported at the first connect."""
    first = agents.start()
    first.wait_ready(timeout_s=60)
    assert first.stop() == 0
    agents.broker.signal(signal.SIGKILL)
    agents.broker.wait(timeout_s=10)
    for db in Path(agents.broker.log_path).parent.glob("mosquitto.db*"):
        db.unlink()
    agents.broker.start()
    second = agents.start(ready=False)
    wait_for(lambda: (second.status() or {}).get("mqtt", {}).get("sessions_lost", 0) == 1,
             timeout_s=30, what="the lost session to be counted")  # fmt: skip
    assert any("had no session for us" in p for p in _readyz_problems(second))
    assert second.stop() == 0


def test_a_broker_freeze_leaves_no_unretrieved_future_in_the_log(
    agents: AgentFactory, tmp_path: Path
) -> None:
    """The broker stops answering (SIGSTOP) past the keepalive: the agent drops the connection
    and reconnects once the broker is back, logging it as a reconnect, not as an asyncio
    'Future exception was never retrieved' ERROR."""
    agent = agents.start(agents.config({"mqtt": {"keepalive_s": 5, "connect_timeout_s": 1}}))
    agent.wait_ready(timeout_s=60)
    # Traffic, so that acks and the checkpoint's barrier are in flight when the broker freezes.
    pub = Publisher(agents.broker, tmp_path, cameras=20, rate=20, duration_s=6, seed=24).start()
    wait_for(lambda: (agent.status() or {}).get("ingest", {}).get("acked", 0) > 200,
             timeout_s=30, what="traffic acked")  # fmt: skip
    agents.broker.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not (agent.status() or {}).get("mqtt", {}).get("connected", True),
                 timeout_s=30, what="the agent to give up on the frozen broker")  # fmt: skip
        # ...and try again against it (TCP connects, no CONNACK comes) a few times.
        wait_for(lambda: (agent.status() or {}).get("mqtt", {}).get("connect_failures", 0) >= 3,
                 timeout_s=30, what="connects to the frozen broker to fail")  # fmt: skip
    finally:
        agents.broker.signal(signal.SIGCONT)
    agent.wait_ready(timeout_s=60)
    assert_exact(wait_delivered(agents.receiver, pub.join()))
    assert agent.stop() == 0
    log = agent.log_text()
    assert "MQTT 127.0.0.1" in log and "unavailable" in log, log[-2000:]
    assert "never retrieved" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_failing_disk_pauses_intake_is_reported_and_loses_nothing(
    agents: AgentFactory, tmp_path: Path
) -> None:
    """The outbox's disk fails (every write and fsync EIO) under 1,500 msgs/s: the agent holds
    its acks, stops taking messages once mqtt.receive_maximum are unacked (memory bounded by
    configuration, G5/G13), says so in /readyz within seconds, and when the disk heals
    delivers every message exactly once."""
    disk = FailingDisk(agents.buffer.parent, tmp_path)
    limit = 2000
    agent = agents.start(agents.config({"mqtt": {"receive_maximum": limit}}), env=disk.env())
    pub = Publisher(agents.broker, tmp_path, cameras=50, rate=30, duration_s=14, seed=25).start()
    wait_for(lambda: (agent.status() or {}).get("ingest", {}).get("acked", 0) > 3000,
             timeout_s=30, what="traffic acked")  # fmt: skip
    most_unacked = 0

    def sample() -> dict[str, Any]:
        nonlocal most_unacked
        status = agent.status() or {}
        most_unacked = max(most_unacked, status.get("ingest", {}).get("unacked", 0))
        return status

    with disk.failing():
        failed_at = time.monotonic()
        wait_for(lambda: any("outbox writes failing" in p for p in sample().get("problems", [])),
                 timeout_s=15, what="the failing disk in /readyz")  # fmt: skip
        reported_after = time.monotonic() - failed_at
        # Six seconds of failure under load: far more than the limit is published meanwhile.
        until = failed_at + 6
        wait_for(lambda: sample() and time.monotonic() > until, timeout_s=30, what="6 s")
        paused = sample().get("ingest", {}).get("paused")
    assert most_unacked <= limit, most_unacked
    assert paused is True
    agent.wait_ready(timeout_s=60)
    assert_exact(wait_delivered(agents.receiver, pub.join()))
    assert most_unacked <= limit, most_unacked
    assert reported_after < 10, reported_after
    status = agent.status()
    assert status is not None and status["ingest"]["pauses"] >= 1
    assert agent.stop() == 0


def test_a_gateway_clock_a_year_off_moves_no_camera_data(
    agents: AgentFactory, tmp_path: Path
) -> None:
    """The gateway's wall clock steps a year ahead (its monotonic clock does not) while the
    cameras stay right, then back: every message counted once in the second its camera
    stamped, and the gateway clock, not the cameras, reported."""
    clock = SteppableClock(tmp_path)
    agent = agents.start(env=clock.env())
    pub = Publisher(agents.broker, tmp_path, cameras=20, rate=20, duration_s=16, seed=26).start()
    wait_for(lambda: (agent.status() or {}).get("ingest", {}).get("counted", 0) > 800,
             timeout_s=30, what="traffic counted")  # fmt: skip
    clock.set(365 * 86400.0)
    wait_for(lambda: any("gateway clock off by +365.0 d" in p
                         for p in (agent.status() or {}).get("problems", [])),
             timeout_s=15, what="the gateway clock in /readyz")  # fmt: skip
    wait_for(lambda: (agent.status() or {}).get("ingest", {}).get("counted", 0) > 4000,
             timeout_s=30, what="traffic under the wrong clock")  # fmt: skip
    clock.set(0.0)
    agent.wait_ready(timeout_s=30)
    assert_exact(wait_delivered(agents.receiver, pub.join()))
    status = agent.status()
    assert status is not None
    assert status["aggregate"].get("bad_time_restamped", 0) == 0
    assert status["aggregate"]["gateway_clock_distrusted"] == 1
    assert status["aggregate"]["gateway_clock_offset_s"] == 0
    assert status["cameras"]["clock_suspect"] == 0
    log = agent.log_text()
    assert "gateway clock stepped +31536000.0 s" in log
    assert "gateway clock agrees with the cameras again" in log
    assert agent.stop() == 0


@pytest.mark.parametrize(
    ("durability", "persistence"),
    [("message", False), ("window", False), ("message", True)],
    ids=["message", "window", "message_snapshots"],
)
def test_a_power_cut_loses_nothing_the_agent_received(
    tmp_path: Path, receiver: Receiver, durability: str, persistence: bool
) -> None:
    """Broker and agent die together (a power cut) 0.6 s after the agent received the last
    message: within its window, after a checkpoint or two. Without persistence the broker
    keeps nothing across a restart, so what the agent received lives only where the agent put
    it. In "message" mode (the default) every one is in the outbox and counted once; in
    "window" mode the open windows' messages were only in the broker, and are gone (the
    measured cost of its lower flash wear). With persistence (a snapshot every 300 changes)
    the broker comes back with its last snapshot and sends again what it held unacked then:
    the agent's replay memory, restored from the outbox, recognises them."""
    broker = Mosquitto(
        tmp_path / "mosquitto",
        persistence=persistence,
        autosave_interval=300,
        autosave_on_changes=True,
    ).start()
    agents = AgentFactory(tmp_path, broker, receiver)
    try:
        cfg = agents.config({"buffer": {"durability": durability}})
        agent = agents.start(cfg)
        pub = Publisher(broker, tmp_path, cameras=20, rate=20, duration_s=3, seed=27)
        expected = pub.start().join()
        published = sum(e.count for e in expected.values())
        wait_for(lambda: (agent.status() or {}).get("ingest", {}).get("received") == published,
                 timeout_s=30, what="the agent to receive every message")  # fmt: skip
        time.sleep(0.6)  # where the cut lands: not a wait for anything
        agent.signal(signal.SIGKILL)
        broker.signal(signal.SIGKILL)
        agent.wait(timeout_s=10)
        broker.wait(timeout_s=10)
        broker.start()
        second = agents.start(cfg, ready=False)
        comparison = wait_delivered(
            receiver, expected, timeout_s=30 if durability == "message" else 12
        )
        if durability == "message":
            assert_exact(comparison)
            if persistence:
                status = second.status()
                assert status is not None and status["ingest"]["replays_skipped"] > 0, status
        else:
            assert comparison.missing > 0 and comparison.duplicated == 0, comparison
    finally:
        agents.stop_all()
        broker.stop()


@pytest.mark.parametrize("remember", [True, False], ids=["replay_memory", "no_memory"])
def test_a_broker_restoring_an_older_snapshot_is_not_counted_twice(
    tmp_path: Path, receiver: Receiver, remember: bool
) -> None:
    """Mosquitto's persistence is a snapshot (here every 300 changes), not a log. The broker dies
    after the agent counted and acked everything; it restores its last snapshot and sends again,
    with DUP and their original packet ids, the messages unacked when it was taken. The agent,
    alive, recognises them from its replay memory: acked, not counted. Without the memory
    (mqtt.broker_autosave_interval_s = 0) they are counted twice: the test has teeth."""
    broker = Mosquitto(
        tmp_path / "mosquitto", autosave_interval=300, autosave_on_changes=True
    ).start()
    agents = AgentFactory(tmp_path, broker, receiver)
    try:
        interval = 60.0 if remember else 0.0
        agent = agents.start(agents.config({"mqtt": {"broker_autosave_interval_s": interval}}))
        pub = Publisher(broker, tmp_path, cameras=20, rate=20, duration_s=4, seed=28)
        expected = pub.start().join()
        published = sum(e.count for e in expected.values())

        def settled() -> bool:
            ingest = (agent.status() or {}).get("ingest", {})
            return bool(ingest.get("received") == published and ingest.get("unacked") == 0)

        wait_for(settled, timeout_s=30, what="every message received and acked")
        broker.signal(signal.SIGKILL)
        broker.wait(timeout_s=10)
        broker.start()
        wait_for(lambda: (agent.status() or {}).get("mqtt", {}).get("reconnects", 0) >= 1,
                 timeout_s=30, what="the agent to reconnect")  # fmt: skip
        comparison = wait_delivered(receiver, expected, timeout_s=30)
        status = agent.status()
        assert status is not None
        replays = status["ingest"]["replays_skipped"]
        if remember:
            assert_exact(comparison)
            assert replays > 0, status["ingest"]
            assert status["ingest"]["received"] == published + replays
        else:
            wait_for(lambda: (agent.status() or {}).get("ingest", {}).get("received", 0)
                     > published, timeout_s=30, what="the replays to arrive")  # fmt: skip
            comparison = wait_delivered(receiver, expected, timeout_s=10)
            assert comparison.duplicated > 0 and comparison.missing == 0, comparison
            assert replays == 0
        assert agent.stop() == 0
    finally:
        agents.stop_all()
        broker.stop()

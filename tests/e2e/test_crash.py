"""Exactly once across crashes (G1, G2, G4): deterministic fault points and a chaos run.

Fault points SIGKILL the agent at the exact moment named (EDGE_AGENT_TEST_FAULT, see
agent/app/faults.py); the chaos run kills it at random moments, restarts the broker and takes the
cloud down, while cameras publish at a steady rate.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from devtools.procs import Publisher, wait_for
from devtools.truth import Expected
from tests.helpers import AgentFactory, assert_exact, assert_seqs_clean, wait_delivered


@pytest.mark.parametrize("point", ["mid_checkpoint", "after_commit", "after_send"])
def test_die_at_fault_point_then_restart_counts_everything_once(
    agents: AgentFactory, tmp_path: Path, point: str
) -> None:
    first = agents.start(env={"EDGE_AGENT_TEST_FAULT": f"{point}:3"})
    pub = Publisher(agents.broker, tmp_path, cameras=30, rate=20, duration_s=4, seed=11).start()
    assert first.wait(timeout_s=30) == -signal.SIGKILL, first.log_text()[-2000:]
    assert f"fault point {point} reached" in first.log_text()
    second = agents.start()
    expected = pub.join()
    assert_exact(wait_delivered(agents.receiver, expected))
    assert_seqs_clean(agents.receiver)
    status = second.status()
    assert status is not None
    gw = agents.receiver.stats()["gateways"]["gw-test"]
    if point == "after_commit":
        # The committed messages were never acked: the broker redelivered them (DUP), and the
        # ack journal recognised every one of them instead of counting it again.
        assert status["ingest"]["redelivered_skipped"] > 0
    if point == "after_send":
        # The cloud got that batch twice and deduplicated it by (gateway, seq).
        assert gw["duplicates"] > 0
    assert second.stop() == 0


def test_graceful_shutdown_under_load_leaves_nothing_open(
    agents: AgentFactory, tmp_path: Path
) -> None:
    first = agents.start()
    pub = Publisher(agents.broker, tmp_path, cameras=50, rate=40, duration_s=5, seed=12).start()
    wait_for(lambda: agents.receiver.messages() > 2000, timeout_s=20, what="traffic")
    first.signal(signal.SIGTERM)
    assert first.wait(timeout_s=20) == 0
    con = sqlite3.connect(agents.buffer)
    try:
        assert con.execute("SELECT count(*) FROM open_windows").fetchone() == (0,)
        (marks,) = con.execute("SELECT count(*) FROM meta WHERE key = 'marks'").fetchone()
        assert marks == 1
    finally:
        con.close()
    log = first.log_text()
    assert "shutdown done" in log
    second = agents.start()
    expected = pub.join()
    assert_exact(wait_delivered(agents.receiver, expected))
    assert_seqs_clean(agents.receiver)
    assert "window marks for" in second.log_text()
    assert second.stop() == 0


def test_chaos_kill9_broker_restart_cloud_outage(agents: AgentFactory, tmp_path: Path) -> None:
    """100 cameras at 2,000 msgs/s; SIGKILL the agent at random moments (>= 5 times), restart
    Mosquitto once, take the cloud down for 10 s. The cloud's table must equal what was
    published: nothing lost, nothing counted twice, seqs in order without gaps."""
    seed = int(os.environ.get("CHAOS_SEED", str(time.time_ns() % 10_000)))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (rerun with CHAOS_SEED={seed})")
    rc, broker = agents.receiver, agents.broker
    agent = agents.start()
    kills = 0
    expected: dict[tuple[str, str, int], Expected] = {}

    def run_phase(seconds: float, phase_seed: int, cloud_outage: bool) -> None:
        nonlocal agent, kills
        pub = Publisher(
            broker, tmp_path, cameras=100, rate=20, duration_s=seconds, seed=phase_seed
        ).start()
        started = time.monotonic()
        outage_at = rng.uniform(2, 5) if cloud_outage else None
        outage_end = None
        while pub.running:
            pub.wait(rng.uniform(0.8, 2.5))  # a random moment (or the end of publishing)
            now = time.monotonic() - started
            if outage_at is not None and outage_end is None and now >= outage_at:
                rc.kill()
                outage_end = now + 10
            elif outage_end is not None and not rc.running and now >= outage_end:
                rc.start()
            if pub.running:
                agent.kill()
                kills += 1
                agent = agents.start()
        if outage_end is not None and not rc.running:
            rc.start()
        expected.update(pub.join())

    run_phase(16, seed * 10 + 1, cloud_outage=True)
    broker.stop()  # graceful: Mosquitto saves the sessions, with our unacked messages
    broker.start()
    run_phase(16, seed * 10 + 2, cloud_outage=False)
    assert kills >= 5
    assert rc.running, "the cloud came back before the comparison"
    assert_exact(wait_delivered(rc, expected, timeout_s=90))
    assert_seqs_clean(rc)
    assert agent.stop() == 0


def test_kill9_after_windows_closed_while_the_broker_was_away(
    agents: AgentFactory, tmp_path: Path
) -> None:
    """Messages held in open windows when the broker goes away: the windows close and commit
    while it is down (no acks possible), then the agent dies before the broker redelivers.
    The next run must recognise every redelivery as already counted. (buffer.durability =
    "window": in "message" mode the agent acks within a checkpoint and holds nothing back.)"""
    agent = agents.start(agents.config({"buffer": {"durability": "window"}}))
    expected = Publisher(agents.broker, tmp_path, cameras=20, rate=20, duration_s=2, seed=13)
    expected_table = expected.start().join()
    committed = (agent.status() or {})["outbox"]["chunks_committed"]
    agents.broker.stop()  # the agent still holds the last windows' messages, unacked
    wait_for(
        lambda: (agent.status() or {}).get("outbox", {}).get("chunks_committed", 0) > committed,
        timeout_s=20, what="the held windows to close and commit with the broker down",
    )  # fmt: skip
    agent.kill()
    agents.broker.start()
    second = agents.start()
    assert_exact(wait_delivered(agents.receiver, expected_table))
    status = second.status()
    assert status is not None and status["ingest"]["redelivered_skipped"] > 0
    assert second.stop() == 0

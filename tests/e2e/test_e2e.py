"""The whole pipeline with real processes: Mosquitto, the agent, the reference receiver."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

from devtools.procs import Publisher, wait_for
from tests.helpers import AgentFactory, assert_exact, assert_seqs_clean, publish, wait_delivered


def test_cloud_table_equals_what_cameras_published(agents: AgentFactory, tmp_path: Path) -> None:
    agent = agents.start()
    expected = publish(agents.broker, tmp_path, cameras=50, rate=10, duration_s=4, seed=1)
    assert_exact(wait_delivered(agents.receiver, expected))
    assert_seqs_clean(agents.receiver)
    gw = agents.receiver.stats()["gateways"]["gw-test"]
    assert gw["duplicates"] == 0
    assert agent.stop() == 0


def test_malformed_late_and_skewed_messages(agents: AgentFactory, tmp_path: Path) -> None:
    """Malformed payloads are counted and skipped; late messages arrive as rev > 0 deltas that
    the cloud merges; cameras with a clock 40 s behind still close their windows."""
    agent = agents.start()
    expected = publish(
        agents.broker, tmp_path, cameras=20, rate=10, duration_s=4, seed=2,
        malformed_fraction=0.05, late_fraction=0.05, skew_s=-40.0,
    )  # fmt: skip
    assert_exact(wait_delivered(agents.receiver, expected))
    status = agent.status()
    assert status is not None
    assert status["ingest"]["rejects"].get("malformed_json", 0) > 0
    assert status["aggregate"].get("late_deltas", 0) > 0
    con = sqlite3.connect(agents.receiver.db)
    try:
        (late_chunks,) = con.execute("SELECT count(*) FROM chunks WHERE rev > 0").fetchone()
    finally:
        con.close()
    assert late_chunks > 0
    assert agents.receiver.stats()["gateways"]["gw-test"]["rev0_repeats"] == 0
    assert agent.stop() == 0


def test_cloud_down_then_back_everything_arrives_in_order_once(
    agents: AgentFactory, tmp_path: Path
) -> None:
    agent = agents.start()
    rc = agents.receiver
    pub = Publisher(agents.broker, tmp_path, cameras=50, rate=10, duration_s=6, seed=3).start()
    wait_for(lambda: rc.messages() > 0, timeout_s=20, what="first batch at the receiver")
    rc.kill()  # the cloud disappears while cameras keep publishing
    wait_for(
        lambda: (agent.status() or {}).get("forward", {}).get("batches_failed", 0) >= 2,
        timeout_s=20,
        what="the agent to notice the outage",
    )
    backlog_seen = (agent.status() or {})["outbox"]["chunks"]
    expected = pub.join()
    assert backlog_seen > 0
    rc.start()  # the same port, the same database
    assert_exact(wait_delivered(rc, expected))
    assert_seqs_clean(rc)
    assert agent.stop() == 0


def test_receiver_failures_and_throttling_lose_nothing(
    agents: AgentFactory, tmp_path: Path
) -> None:
    agents.receiver.fault(fail_rate=0.3, throttle_every=4, retry_after_s=0.2)
    agent = agents.start()
    expected = publish(agents.broker, tmp_path, cameras=30, rate=10, duration_s=3, seed=4)
    assert_exact(wait_delivered(agents.receiver, expected))
    assert_seqs_clean(agents.receiver)
    assert agents.receiver.stats()["injected_failures"] > 0
    assert agent.stop() == 0


def test_graceful_restart_mid_stream_loses_and_doubles_nothing(
    agents: AgentFactory, tmp_path: Path
) -> None:
    first = agents.start()
    pub = Publisher(agents.broker, tmp_path, cameras=50, rate=10, duration_s=6, seed=5).start()
    wait_for(lambda: agents.receiver.messages() > 500, timeout_s=20, what="traffic")
    first.signal(signal.SIGTERM)
    assert first.wait(timeout_s=20) == 0
    log = first.log_text()
    assert "shutdown: closed all windows" in log
    second = agents.start()  # cameras kept publishing meanwhile; the broker queued for us
    expected = pub.join()
    assert_exact(wait_delivered(agents.receiver, expected))
    assert_seqs_clean(agents.receiver)
    assert second.stop() == 0


def test_kill9_with_open_windows_loses_nothing_g1(agents: AgentFactory, tmp_path: Path) -> None:
    """G1: nothing is acked before it is committed, so SIGKILL with every window open loses
    nothing: the broker redelivers exactly the unacknowledged messages to the next run."""
    # buffer.durability = "window": nothing is committed while every window is open, so
    # nothing may be acked (in "message" mode the windows' saved state is committed and acked:
    # the power-cut test in test_site_faults.py covers that mode).
    slow = agents.config(
        {
            "aggregate": {"allowed_lateness_s": 600.0, "idle_close_s": 600.0},
            "buffer": {"durability": "window"},
        },
        name="slow.toml",
    )
    agent = agents.start(slow)
    expected = publish(agents.broker, tmp_path, cameras=20, rate=10, duration_s=2, seed=6)
    want = sum(e.count for e in expected.values())
    wait_for(
        lambda: (agent.status() or {}).get("ingest", {}).get("counted", 0) >= want,
        timeout_s=20,
        what="the agent to hold every message in open windows",
    )
    status = agent.status()
    assert status is not None and status["outbox"]["chunks_committed"] == 0
    assert status["ingest"]["acked"] == 0
    agent.kill()
    agents.start()  # normal lateness: windows close, chunks go out
    assert_exact(wait_delivered(agents.receiver, expected))
    assert_seqs_clean(agents.receiver)

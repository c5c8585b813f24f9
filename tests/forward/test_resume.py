"""Delivery resumes within seconds of the cloud's return, whatever the backoff reached
(issue #23 item 6): a TCP probe during the backoff after a failure without an answer, and
SIGUSR1 (`edge-agent forward --now`) to end any backoff at once.

Both tests set the backoff to 600 s, so without the mechanism the deadline of the wait (30 s)
passes with nothing delivered: they fail on the count, not on a timing.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from devtools.procs import Agent, wait_for
from tests.helpers import AgentFactory, assert_exact, publish, wait_delivered

pytestmark = pytest.mark.e2e

LONG_BACKOFF = {"backoff_min_s": 600.0, "backoff_max_s": 600.0}


def _failed(agent: Agent) -> bool:
    status = agent.status() or {}
    return int(status.get("forward", {}).get("batches_failed", 0)) >= 1


def test_a_probe_ends_the_backoff_when_the_cloud_is_back(
    agents: AgentFactory, tmp_path: Path
) -> None:
    rc = agents.receiver
    rc.kill()  # down before the first batch: every attempt is refused, backoff 600 s
    agent = agents.start(agents.config({"forward": {**LONG_BACKOFF, "probe_interval_s": 0.2}}))
    expected = publish(agents.broker, tmp_path, cameras=10, rate=10, duration_s=2, seed=11)
    wait_for(lambda: _failed(agent), timeout_s=30, what="a refused attempt")
    rc.start()
    assert_exact(wait_delivered(rc, expected, timeout_s=30))
    assert "the cloud accepts connections again" in agent.log_text()
    assert agent.stop() == 0


def test_sigusr1_ends_the_backoff_at_once(agents: AgentFactory, tmp_path: Path) -> None:
    rc = agents.receiver
    rc.kill()
    # No probe: only the signal can end the 600 s backoff.
    agent = agents.start(agents.config({"forward": {**LONG_BACKOFF, "probe_interval_s": 0}}))
    expected = publish(agents.broker, tmp_path, cameras=10, rate=10, duration_s=2, seed=12)
    wait_for(lambda: _failed(agent), timeout_s=30, what="a refused attempt")
    rc.start()
    agent.signal(signal.SIGUSR1)
    assert_exact(wait_delivered(rc, expected, timeout_s=30))
    assert "retrying now (SIGUSR1)" in agent.log_text()
    assert agent.stop() == 0

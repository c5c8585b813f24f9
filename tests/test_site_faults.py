"""The faults of a real site (issue #24, G12/G13), with real processes: a broker that forgot the
agent's session is detected and reported, not taken for a quiet site."""

from __future__ import annotations

import signal
from pathlib import Path

from agent.sim.procs import Agent, wait_for
from tests.helpers import AgentFactory


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

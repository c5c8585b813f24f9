"""Fixtures: a private Mosquitto and the reference receiver on free loopback ports, real files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sim.procs import Agent, Mosquitto, Receiver, agent_config, free_port

# Fixtures that start a process (Mosquitto, the agent, the receiver, tmux, tap, dpkg): a test
# using one, directly or through another fixture, is marked e2e, so `pytest -m "not e2e"` is the
# inner loop. A test that starts a process without them carries @pytest.mark.e2e itself.
PROCESS_FIXTURES = frozenset(
    {"broker", "receiver", "agents", "tls_broker", "tls_receiver", "taps", "term", "deb", "machine"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    mq = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield mq
    finally:
        mq.stop()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    rc = Receiver(tmp_path / "cloud").start()
    try:
        yield rc
    finally:
        rc.stop()


class AgentFactory:
    """Agent subprocesses sharing one config and one outbox file."""

    def __init__(self, tmp_path: Path, broker: Mosquitto, receiver: Receiver) -> None:
        self.tmp_path = tmp_path
        self.broker = broker
        self.receiver = receiver
        self.buffer = tmp_path / "agent" / "buffer.sqlite3"
        self.buffer.parent.mkdir(parents=True, exist_ok=True)
        self.health_port = free_port()
        self.started: list[Agent] = []

    def config(self, extra: str = "", name: str = "agent.toml") -> Path:
        return agent_config(
            path=self.tmp_path / name,
            gateway_id="gw-test",
            mqtt_port=self.broker.port,
            receiver_url=self.receiver.url,
            buffer_path=self.buffer,
            health_port=self.health_port,
            extra=extra,
        )

    def start(self, config: Path | None = None, env: dict[str, str] | None = None) -> Agent:
        agent = Agent(config or self.config(), self.tmp_path / "agent.log", self.health_port)
        if env:
            agent._env = {**os.environ, **env}
        agent.start()
        self.started.append(agent)
        agent.wait_ready()
        return agent

    def stop_all(self) -> None:
        for a in self.started:
            a.kill()


@pytest.fixture
def agents(tmp_path: Path, broker: Mosquitto, receiver: Receiver) -> Iterator[AgentFactory]:
    f = AgentFactory(tmp_path, broker, receiver)
    try:
        yield f
    finally:
        f.stop_all()

"""Shared steps of the end-to-end tests: agents on a private broker and receiver, publishing,
waiting for delivery, comparing what arrived with what was sent."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.sim.cloud import load_merged
from devtools.procs import (
    Agent,
    Mosquitto,
    Publisher,
    Receiver,
    agent_config,
    free_port,
    wait_for,
)
from devtools.truth import Comparison, Expected, compare


def publish(broker: Mosquitto, workdir: Path, **kw: Any) -> dict[tuple[str, str, int], Expected]:
    return Publisher(broker, workdir, **kw).start().join()


# A message counted twice lands in a window of its own, which reaches the receiver only once
# it closes: idle_close_s (2 s in agent_config) plus a checkpoint and a linger. Quiet this long
# after the expected count means nothing more is on its way.
SETTLE_S = 3.0


def wait_delivered(
    receiver: Receiver,
    expected: dict[tuple[str, str, int], Expected],
    timeout_s: float = 60,
    settle_s: float = SETTLE_S,
) -> Comparison:
    """Wait until the receiver holds as many messages as were published and then nothing new
    arrives for `settle_s` (so a late duplicate is seen), then compare tables."""
    want = sum(e.count for e in expected.values())
    deadline = time.monotonic() + timeout_s
    # On a timeout the comparison below says what is missing.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: receiver.messages() >= want, timeout_s=timeout_s, what=f"{want} messages")
        wait_quiet(receiver, settle_s, timeout_s=max(0.0, deadline - time.monotonic()) + settle_s)
    return compare(expected, load_merged(receiver.db))


def wait_quiet(receiver: Receiver, settle_s: float, *, timeout_s: float) -> None:
    """Until the receiver's chunks and messages have not changed for `settle_s`."""

    def delivered() -> tuple[int, int] | None:
        with contextlib.suppress(OSError):
            d = receiver.stats()
            return int(d["messages"]), int(d["chunks"])
        return None

    seen, since = delivered(), time.monotonic()

    def quiet() -> bool:
        nonlocal seen, since
        now = delivered()
        if now != seen:
            seen, since = now, time.monotonic()
        return time.monotonic() - since >= settle_s

    wait_for(quiet, timeout_s=timeout_s, what=f"no new deliveries for {settle_s:g} s")


def assert_exact(c: Comparison) -> None:
    assert c.expected_messages > 0
    assert c.missing == 0 and c.duplicated == 0, (c.missing, c.duplicated, c.mismatched_rows)
    assert c.mismatched_rows == []


def assert_seqs_clean(receiver: Receiver) -> None:
    gw = receiver.stats()["gateways"]["gw-test"]
    assert gw["gaps"] == 0, gw
    assert gw["out_of_order"] == 0, gw


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

    def config(self, overrides: Mapping[str, Any] | None = None, name: str = "agent.toml") -> Path:
        """The agent's config file; `overrides` is deep-merged over the test defaults
        (agent.sim.procs.agent_config), e.g. {"buffer": {"max_bytes": "1MiB"}}."""
        return agent_config(
            path=self.tmp_path / name,
            gateway_id="gw-test",
            mqtt_port=self.broker.port,
            receiver_url=self.receiver.url,
            buffer_path=self.buffer,
            health_port=self.health_port,
            overrides=overrides,
        )

    def start(
        self, config: Path | None = None, env: dict[str, str] | None = None, *, ready: bool = True
    ) -> Agent:
        """Start an agent; wait until /readyz says ready (`ready=False`: only its /status)."""
        agent = Agent(config or self.config(), self.tmp_path / "agent.log", self.health_port)
        if env:
            agent._env = {**os.environ, **env}
        agent.start()
        self.started.append(agent)
        if ready:
            agent.wait_ready()
        else:
            wait_for(lambda: agent.status() is not None, timeout_s=30, what="agent /status")
        return agent

    def stop_all(self) -> None:
        for a in self.started:
            a.kill()


def deny_stat(monkeypatch: Any, path: Path) -> None:
    """Make `Path.stat` of `path` fail as a directory this user cannot search does (tests run
    as root, which the mode bits never stop)."""
    real = Path.stat

    def stat(self: Path, **kwargs: bool) -> object:
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real(self, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)

"""Outages you can alert on: the decisions with `now` passed in, the forwarder's recovery line
on a shifted wall clock against the real receiver, and a real agent whose cloud fails then
recovers with a small forward.alert_after_s."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agent.config.settings import ForwardSettings
from agent.core.model import Chunk, encode_chunk
from agent.core.stats import Stats
from agent.core.text import rfc3339
from agent.durable.outbox import CheckpointWrite, Outbox
from agent.forward.forwarder import Forwarder
from agent.forward.outage import outage_problems, recovery_line
from devtools.procs import Receiver, wait_for
from tests.helpers import AgentFactory, publish

T0 = 1_764_170_000.0  # 2025-11-26T15:13:20Z


def test_an_outage_becomes_a_problem_after_alert_after_s_with_its_age() -> None:
    def problems(now: float, oldest: float | None = None) -> list[str]:
        return outage_problems(
            now=now, alert_after_s=300, failing_since=T0,
            last_error="ConnectError: [Errno 111] Connection refused", oldest_unsent_at=oldest,
        )  # fmt: skip

    assert problems(T0 + 299) == []
    assert problems(T0 + 27 * 60) == [
        f"cloud unreachable for 27 min (since {rfc3339(T0)}, forward.alert_after_s = 300): "
        "ConnectError: [Errno 111] Connection refused"
    ]
    got = problems(T0 + 120, oldest=T0 - 600)
    assert got == [
        f"oldest unsent chunk is 12 min old (since {rfc3339(T0 - 600)}, "
        "forward.alert_after_s = 300)"
    ]
    assert (
        recovery_line(now=T0 + 27 * 60, failing_since=T0, failed_attempts=41, backlog=51_200)
        == "cloud back after 27 min (41 failed attempts), draining 51,200 chunks"
    )


class ShiftedClock:
    """The system clocks, the wall clock moved on by `offset` (27 minutes pass in no time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return time.time() + self.offset

    def mono(self) -> float:
        return time.monotonic()


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    ob, _ = await Outbox.open(tmp_path / "outbox.sqlite3", synchronous="normal")
    try:
        yield ob
    finally:
        await ob.close()


async def until(cond: object, timeout_s: float = 20) -> None:
    assert callable(cond)
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110 - polls another process's effect, bounded
            await asyncio.sleep(0.02)


async def test_recovery_is_logged_at_info_and_the_error_cleared(
    outbox: Outbox, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ForwardSettings(
        url=receiver.url, linger_ms=0, backoff_min_s=0.05, backoff_max_s=0.2, timeout_s=1.0,
        max_batch_chunks=1000,
    )  # fmt: skip
    stats, clock = Stats(), ShiftedClock()
    receiver.kill()
    async with httpx.AsyncClient(timeout=1.0) as client:
        fwd = Forwarder(
            settings=settings, gateway_id="gw-test", outbox=outbox, client=client, stats=stats,
            clock=clock,
        )  # fmt: skip
        task = asyncio.create_task(fwd.run())
        try:
            chunks = []
            for i in range(2500):
                c = Chunk(f"cam-{i % 10}", "det", 1764126000 + i, 1)
                c.add_times(1764126000.0 + i, 1764126000.5 + i)
                chunks.append(encode_chunk(c))
            await outbox.checkpoint(CheckpointWrite(chunks=chunks), now=time.time())
            fwd.wake.set()
            await until(lambda: stats.forward_failures_in_row >= 2)
            assert stats.forward_failing_since is not None
            assert "ConnectError" in (stats.last_forward_error or "")
            assert stats.last_forward_error_at is not None
            clock.offset = 27 * 60
            with caplog.at_level(logging.INFO, logger="agent.forward.forwarder"):
                receiver.start()
                await until(lambda: stats.batches_sent >= 1)
            lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
            back = [m for m in lines if m.startswith("cloud back after")]
            assert len(back) == 1, lines
            assert back[0].startswith("cloud back after 27 min (")
            assert back[0].endswith("failed attempts), draining 1,500 chunks")
            assert stats.last_forward_error is None and stats.last_forward_error_at is None
            assert stats.forward_failing_since is None and stats.forward_failures_in_row == 0
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


def test_a_real_agent_alerts_on_a_cloud_outage_and_says_when_it_is_back(
    agents: AgentFactory, tmp_path: Path
) -> None:
    config = agents.config()
    agent = agents.start(config, env={"EDGE_AGENT__FORWARD__ALERT_AFTER_S": "1"})
    agents.receiver.fault(status=500)
    publish(agents.broker, tmp_path, cameras=2, rate=5, duration_s=1, seed=5)
    url = f"http://127.0.0.1:{agent.health_port}"

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "--url", url],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    got = wait_for(
        lambda: (r := status()).returncode == 1 and "cloud unreachable for" in r.stdout and r,
        timeout_s=30,
        what="the outage as a problem in status",
    )
    lines = got.stdout.splitlines()
    problem = next(s for s in lines if "cloud unreachable" in s)
    assert problem.startswith("PROBLEM  cloud unreachable for ")
    assert "forward.alert_after_s = 1): HTTP 500" in problem
    assert any(s.startswith("PROBLEM  oldest unsent chunk is ") for s in lines)
    error = next(s for s in lines if s.startswith("last error"))
    assert "Z (" in error and "ago): HTTP 500" in error  # the error carries its time
    assert lines[-1] == "NOT READY"
    readyz = agent._get("/readyz")
    assert readyz is not None and readyz[0] == 503

    agents.receiver.fault(status=None)
    wait_for(lambda: status().returncode == 0, timeout_s=30, what="ready again")
    assert "cloud back after" in agent.log_text()
    doc = agent.status() or {}
    assert doc["forward"]["last_error"] is None and doc["forward"]["failing_since"] is None
    text = status().stdout
    assert "last error" not in text and "PROBLEM" not in text

"""The output side, watched like the input (issue #23 items 6 and 10): `tap --sent` prints each
batch as it leaves, with its seqs, size, answer and latency; `forward --now` makes the running
agent send at once, whatever its backoff."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.procs import wait_for
from tests.helpers import AgentFactory, assert_exact, publish, wait_delivered

pytestmark = pytest.mark.e2e


def _cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_tap_sent_shows_each_batch_leaving_with_its_answer(
    agents: AgentFactory, tmp_path: Path
) -> None:
    config = agents.config()
    agent = agents.start(config)
    rc = agents.receiver
    rc.fault(status=503, retry_after_s=0.2)  # the first attempts are kept and retried
    tap = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "tap", "--sent", "--json", "--count", "3",
         "--seconds", "60", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        expected = publish(agents.broker, tmp_path, cameras=5, rate=10, duration_s=1, seed=31)
        wait_for(lambda: rc.stats()["injected_failures"] >= 2, timeout_s=30, what="two 503s")
        rc.fault(status=None)
        out, err = tap.communicate(timeout=60)
    finally:
        tap.kill()
    assert tap.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert first["status"] == 503 and first["outcome"] == "retry" and first["chunks"] > 0
    assert first["bytes"] > 0 and first["latency_ms"] >= 0
    assert first["last_seq"] >= first["first_seq"]
    assert_exact(wait_delivered(rc, expected))
    assert agent.stop() == 0


def test_tap_sent_prints_lines_for_a_person(agents: AgentFactory, tmp_path: Path) -> None:
    config = agents.config()
    agents.start(config)
    tap = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "tap", "--sent", "--count", "1", "--seconds", "60",
         "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        publish(agents.broker, tmp_path, cameras=3, rate=10, duration_s=1, seed=32)
        out, err = tap.communicate(timeout=60)
    finally:
        tap.kill()
    assert tap.returncode == 0, err
    assert " SENT " in out and "chunks" in out and "-> HTTP 200 in " in out and "delivered" in out


def test_forward_now_ends_the_backoff_and_says_when_no_agent_runs(
    agents: AgentFactory, tmp_path: Path
) -> None:
    config = agents.config(
        {"forward": {"backoff_min_s": 600.0, "backoff_max_s": 600.0, "probe_interval_s": 0}}
    )
    r = _cli("forward", "--now", "--config", str(config))
    assert r.returncode == 5 and "no agent runs on" in r.stderr
    rc = agents.receiver
    rc.kill()
    agent = agents.start(config)
    expected = publish(agents.broker, tmp_path, cameras=5, rate=10, duration_s=1, seed=33)
    wait_for(
        lambda: (agent.status() or {}).get("forward", {}).get("batches_failed", 0) >= 1,
        timeout_s=30,
        what="a refused attempt",
    )
    rc.start()
    r = _cli("forward", "--now", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert_exact(wait_delivered(rc, expected, timeout_s=30))
    assert agent.stop() == 0

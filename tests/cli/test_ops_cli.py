"""The operator's CLI against a real agent, broker and receiver: dead letters (list with what
they hold, show, retry in the README's argument order, a current count in status), `status`
in a closed pipe, while MQTT reconnects, with active vs remembered and clock-suspect cameras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.cli.main import EXIT_BROKEN_PIPE, EXIT_NOT_FOUND, build_parser, main
from devtools.procs import Agent, wait_for
from tests.helpers import AgentFactory, publish


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60
    )


def status_of(agent: Agent) -> dict[str, Any]:
    doc = agent.status()
    assert doc is not None
    return doc


def test_deadletter_retry_parses_in_the_readmes_order_and_the_other() -> None:
    p = build_parser()
    for argv in (
        ["deadletter", "retry", "--config", "F", "7002", "7104"],
        ["deadletter", "retry", "7002", "7104", "--config", "F"],
    ):
        args = p.parse_args(argv)
        assert (args.action, args.seqs, args.config) == ("retry", [7002, 7104], "F")
    args = p.parse_args(["deadletter", "show", "--config", "F", "7002", "--json"])
    assert (args.action, args.seq, args.json) == ("show", 7002, True)


def test_dead_letters_listed_shown_retried_and_counted_as_they_are_now(
    agents: AgentFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agents.receiver.fault(poison_camera="cam-000")
    config = agents.config()
    agent = agents.start(config)
    publish(agents.broker, tmp_path, cameras=2, rate=5, duration_s=1, seed=7)
    wait_for(
        lambda: (
            (d := status_of(agent))["outbox"]["dead_letters"] >= 1 and d["outbox"]["chunks"] == 0
        ),
        timeout_s=30,
        what="cam-000's chunks in the dead letters, the rest delivered",
    )

    assert main(["deadletter", "list", "--config", str(config), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["camera"] for r in rows} == {"cam-000"}
    for r in rows:
        assert r["status"] == 422 and "cam-000" in r["response"]
        assert r["stream"] and isinstance(r["t"], int) and r["messages"] >= 1
    assert main(["deadletter", "list", "--config", str(config)]) == 0
    out = capsys.readouterr()
    first = out.out.splitlines()[0]
    assert f"seq {rows[0]['seq']:>16}" in first and f"cam-000/{rows[0]['stream']}" in first
    assert "HTTP 422" in first and f"{len(rows)} dead letters" in out.err

    seq = rows[0]["seq"]
    assert main(["deadletter", "show", str(seq), "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "cloud said   HTTP 422" in shown and "chunk of camera cam-000 refused" in shown
    assert '"camera": "cam-000"' in shown
    assert main(["deadletter", "show", "1", "--config", str(config)]) == EXIT_NOT_FOUND
    assert "no dead letter with seq 1" in capsys.readouterr().err

    text = cli("status", "--config", str(config))
    noun = "chunk" if len(rows) == 1 else "chunks"
    assert f"PROBLEM  {len(rows)} {noun} in the dead letters" in text.stdout

    agents.receiver.fault(poison_camera=None)
    # The README's order: --config first, then the seqs.
    seqs = [str(r["seq"]) for r in rows]
    assert main(["deadletter", "retry", "--config", str(config), *seqs]) == 0
    capsys.readouterr()
    wait_for(
        lambda: (
            (d := status_of(agent))["outbox"]["dead_letters"] == 0 and d["outbox"]["chunks"] == 0
        ),
        timeout_s=30,
        what="the retried dead letters delivered and the count back to 0",
    )
    doc = status_of(agent)
    assert doc["outbox"]["dead_lettered_total"] == len(rows)  # the cumulative count stays
    text = cli("status", "--config", str(config))
    assert "dead letters" not in text.stdout, text.stdout
    assert main(["deadletter", "list", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_status_into_a_closed_pipe_exits_quietly(agents: AgentFactory) -> None:
    agent = agents.start()
    url = f"http://127.0.0.1:{agent.health_port}"
    # A reader that is gone before anything is written: the write must fail, every time.
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "--url", url],
            stdout=w_fd, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(w_fd)
    assert proc.returncode == EXIT_BROKEN_PIPE, proc.stderr
    assert proc.stderr == "", proc.stderr  # no BrokenPipeError traceback
    # And as the README has it, through `head`.
    shell = subprocess.run(
        f"{sys.executable} -m agent.cli status --url {url} --json | head -2",
        shell=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert len(shell.stdout.splitlines()) == 2
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr


def test_status_counts_reconnect_attempts_while_mqtt_is_down(agents: AgentFactory) -> None:
    config = agents.config()
    agent = agents.start(config)
    agents.broker.stop()
    doc = wait_for(
        lambda: (d := status_of(agent))["mqtt"]["connect_failures"] >= 2 and d,
        timeout_s=30,
        what="failed reconnects counted",
    )
    assert doc["mqtt"]["connected"] is False and doc["mqtt"]["down_since"].endswith("Z")
    text = cli("status", "--config", str(config))
    assert text.returncode == 1
    line = next(s for s in text.stdout.splitlines() if s.startswith("mqtt"))
    assert "DISCONNECTED since" in line and "reconnecting" in line
    failures = int(line.split(" failed connects")[0].rsplit(" ", 1)[1])
    assert failures >= 2, line
    agents.broker.start()
    agent.wait_ready(timeout_s=30)
    wait_for(  # /status is built at most once a second
        lambda: (
            (d := status_of(agent))["mqtt"]["reconnects"] >= 1 and d["mqtt"]["down_since"] is None
        ),
        timeout_s=10,
        what="the reconnect counted",
    )


def test_status_tells_active_from_remembered_cameras_and_names_bad_clocks(
    agents: AgentFactory, tmp_path: Path
) -> None:
    config = agents.config()
    agent = agents.start(config)
    # Camera 9 of 10 runs 100 s ahead: beyond max_skew_s (30 s).
    publish(agents.broker, tmp_path, cameras=10, rate=5, duration_s=2, seed=3, skew_s=100)
    wait_for(
        lambda: status_of(agent)["cameras"]["clock_suspect"] == 1,
        timeout_s=30,
        what="one camera clock suspect",
    )
    text = cli("status", "--config", str(config)).stdout
    clocks = next(s for s in text.splitlines() if s.startswith("clocks"))
    assert "1 camera off by more than 30 s: cam-009" in clocks
    assert agent.stop() == 0  # a clean stop saves the cameras' window marks

    agent = agents.start(config)
    cams = agent.cameras()
    assert cams is not None and cams["count"] == 10
    # Remembered from before the restart, not heard from since: no age counted from the restart.
    assert all(c["last_seen_age_s"] is None for c in cams["by_id"].values())
    (tmp_path / "again").mkdir()
    publish(agents.broker, tmp_path / "again", cameras=3, rate=5, duration_s=1, seed=4)
    doc = wait_for(
        lambda: (d := status_of(agent))["cameras"]["active"] == 3 and d,
        timeout_s=30,
        what="three cameras active",
    )
    assert doc["cameras"]["count"] == 10 and doc["cameras"]["silent"] == 0
    line = next(s for s in cli("status", "--config", str(config)).stdout.splitlines()
                if s.startswith("cameras"))  # fmt: skip
    assert line.startswith("cameras    3 active, 0 silent (nothing for 60 s), 10 remembered")
    by_id = (agent.cameras() or {})["by_id"]
    assert by_id["cam-000"]["last_seen_age_s"] is not None
    assert by_id["cam-005"]["last_seen_age_s"] is None

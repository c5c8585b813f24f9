"""Transitions in the log (issue #23 item 4): each state change once, WARNING going wrong and
INFO coming back, so `journalctl -p warning` tells the story."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.ops.transitions import MAX_CAMERAS_NAMED, Transitions, kind
from devtools.procs import wait_for
from tests.helpers import AgentFactory, publish


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    out = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "agent.transitions"]
    caplog.clear()
    return out


def test_not_ready_is_logged_once_and_ready_again_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    t = Transitions()
    t.observe(problems=[], silent=set(), now=0)
    assert _lines(caplog) == []
    disk = "outbox writes failing for 3 s (EIO): MQTT acks held"
    t.observe(problems=[disk], silent=set(), now=5)
    assert _lines(caplog) == [("WARNING", f"NOT READY: {disk}")]
    # The same problem with a longer duration is not a new transition.
    t.observe(problems=[disk.replace("3 s", "8 s")], silent=set(), now=10)
    assert _lines(caplog) == []
    full = "outbox full: holding MQTT acks until the cloud drains it"
    t.observe(problems=[disk.replace("3 s", "13 s"), full], silent=set(), now=15)
    assert _lines(caplog) == [("WARNING", f"NOT READY, also: {full}")]
    t.observe(problems=[full], silent=set(), now=20)
    assert _lines(caplog) == [("INFO", f"no longer: {disk.replace('3 s', '13 s')}")]
    t.observe(problems=[], silent=set(), now=30)
    assert _lines(caplog) == [("INFO", "READY again after 25 s not ready")]


def test_cameras_going_silent_and_coming_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    t = Transitions()
    t.observe(problems=[], silent={"cam-1"}, now=0)
    assert _lines(caplog) == [("WARNING", "camera cam-1 SILENT (no message for 60 s)")]
    t.observe(problems=[], silent={"cam-1"}, now=5)
    assert _lines(caplog) == []
    many = {"cam-1"} | {f"cam-{i:03d}" for i in range(MAX_CAMERAS_NAMED + 5)}
    t.observe(problems=[], silent=many, now=10)
    ((level, line),) = _lines(caplog)
    assert level == "WARNING" and line.startswith(f"{len(many) - 1} cameras SILENT")
    assert line.endswith("(+5 more)")
    t.observe(problems=[], silent=set(), now=15)
    ((level, line),) = _lines(caplog)
    assert level == "INFO" and f"{len(many)} cameras heard from again" in line


def test_a_forgotten_camera_is_not_heard_from_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    t = Transitions()
    t.observe(problems=[], silent={"cam-1", "cam-2"}, now=0, known={"cam-1", "cam-2"})
    caplog.clear()
    t.observe(problems=[], silent=set(), now=5, known={"cam-2", "cam-9"})  # cam-1 forgotten
    assert _lines(caplog) == [("INFO", "camera cam-2 heard from again")]


def test_a_problem_is_one_kind_whatever_its_numbers() -> None:
    assert kind("no checkpoint for 12 s (limit 2 s)") == kind("no checkpoint for 130 s (limit 2 s)")
    assert kind("outbox full: holding MQTT acks") != kind("MQTT not connected and subscribed")


@pytest.mark.e2e
def test_the_agent_logs_not_ready_and_ready_again_when_the_cloud_goes_and_comes(
    agents: AgentFactory, tmp_path: Path
) -> None:
    agent = agents.start(agents.config({"forward": {"alert_after_s": 1}}))
    rc = agents.receiver
    rc.kill()
    publish(agents.broker, tmp_path, cameras=3, rate=10, duration_s=1, seed=41)
    wait_for(
        lambda: "WARNING agent.transitions: NOT READY: " in agent.log_text(),
        timeout_s=30,
        what="NOT READY in the log",
    )
    rc.start()
    wait_for(
        lambda: "INFO agent.transitions: READY again after" in agent.log_text(),
        timeout_s=60,
        what="READY again in the log",
    )
    assert agent.log_text().count("NOT READY: ") == 1
    assert agent.stop() == 0

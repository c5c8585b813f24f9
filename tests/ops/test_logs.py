"""Logs under journald (a `<N>` priority on every line, no own timestamp) and as JSON (RFC 3339
time, the message's fields); MQTT topics printed as text, never as b'...'."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path

from agent.ops.logs import JournalFormatter, JsonFormatter, TextArgs, priority, under_journald
from devtools.procs import wait_for
from tests.e2e.test_fail_well import publish_one
from tests.helpers import AgentFactory

TOPIC = "site/cam/cam-1/detections"


def record(level: int, msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError as e:
            exc_info = (type(e), e, e.__traceback__)
    r = logging.LogRecord("agent.intake.ingest", level, __file__, 1, msg, args, exc_info)
    TextArgs().filter(r)
    return r


def test_priorities_and_journal_lines() -> None:
    assert [priority(lv) for lv in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]
    line = JournalFormatter().format(
        record(30, "rejected a message on %r: %s", TOPIC.encode(), "x")
    )
    assert line == f"<4>agent.intake.ingest: rejected a message on '{TOPIC}': x"
    lines = JournalFormatter().format(record(40, "failed", exc=True)).splitlines()
    assert len(lines) > 2 and all(s.startswith("<3>") for s in lines)  # a traceback keeps it
    assert lines[-1] == "<3>ValueError: boom"


def test_journal_stream_must_name_our_own_stdout(tmp_path: Path) -> None:
    path = tmp_path / "out"
    with open(path, "w") as f:
        st = os.fstat(f.fileno())
        assert under_journald(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not under_journald(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not under_journald(f, {})
    assert not under_journald(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_json_lines_carry_rfc3339_time_and_fields() -> None:
    r = record(30, "rejected a message on %r: %s", TOPIC.encode(), "malformed_json")
    r.camera = "cam-1"
    doc = json.loads(JsonFormatter().format(r))
    assert doc["time"].endswith("Z") and datetime.fromisoformat(doc["time"]).year >= 2024
    assert doc["level"] == "warning" and doc["priority"] == 4
    assert doc["msg"] == f"rejected a message on '{TOPIC}': malformed_json"
    assert doc["args"] == [TOPIC, "malformed_json"] and doc["camera"] == "cam-1"


def test_a_real_agent_under_journald_then_in_json(agents: AgentFactory) -> None:
    log = agents.tmp_path / "agent.log"
    log.touch()
    st = log.stat()
    agent = agents.start(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    publish_one(agents.broker, TOPIC, b"{not json")
    wait_for(lambda: "malformed_json" in agent.log_text(), timeout_s=20, what="the reject logged")
    assert agent.stop() == 0
    lines = [s for s in log.read_text().splitlines() if s.strip()]
    assert lines and all(re.match(r"^<[0-7]>", s) for s in lines), lines[:5]
    assert not any(re.match(r"^<\d>\d{4}-\d\d-\d\d", s) for s in lines)  # journald stamps
    assert any(s.startswith("<6>agent.app.service: ready") for s in lines)
    assert f"<4>agent.intake.ingest: rejected a message on '{TOPIC}': malformed_json" in lines
    assert not any("b'" in s for s in lines)

    start = len(log.read_text())
    agent = agents.start(env={"EDGE_AGENT__LOG__FORMAT": "json"})
    publish_one(agents.broker, TOPIC, b"[1, 2")
    wait_for(lambda: agent.log_text().count("malformed_json") >= 2, timeout_s=20, what="the reject")
    assert agent.stop() == 0
    docs = [json.loads(s) for s in log.read_text()[start:].splitlines() if s.strip()]
    assert all(datetime.fromisoformat(d["time"]) and d["time"].endswith("Z") for d in docs)
    reject = next(d for d in docs if "malformed_json" in d["msg"])
    assert reject["args"] == [TOPIC, "malformed_json"] and reject["level"] == "warning"

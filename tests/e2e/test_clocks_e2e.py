"""Cameras with bad clocks, end to end: the right flags, the right windows, the estimate within
tolerance, and every published message counted at the receiver."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.sim.cloud import load_merged
from devtools.procs import Publisher, wait_for
from devtools.truth import compare_per_stream
from tests.helpers import AgentFactory, assert_exact

FAULTS = (
    (0, "offset:37"),
    (1, "offset:-300"),
    (2, "drift:1"),
    (3, "reset1970:3"),
    (4, "ms_for_s:3"),
)


def chunks_of(db: Path, camera: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT body FROM chunks WHERE camera = ?", (camera,)).fetchall()
    finally:
        con.close()
    return [json.loads(b) for (b,) in rows]


@pytest.mark.parametrize("policy", ["restamp", "flag"])
def test_bad_camera_clocks(agents: AgentFactory, tmp_path: Path, policy: str) -> None:
    stream = {
        "topic": "site/cam/{camera}/{stream}",
        "time_unit": "s",
        "numeric": ["conf", "level", "temp_c", "fps"],
        "categorical": ["cls", "zone", "status"],
    }
    cfg = agents.config(
        {"aggregate": {"skew_policy": policy, "max_skew_s": 10.0}, "streams": [stream]},
        name=f"{policy}.toml",
    )
    agent = agents.start(cfg)
    pub = Publisher(
        agents.broker, tmp_path, cameras=10, rate=10, duration_s=8, seed=41,
        clocks=FAULTS, ms_cameras=False,
    ).start()  # fmt: skip
    expected = pub.join()
    want = sum(e.count for e in expected.values())
    wait_for(lambda: agents.receiver.messages() >= want, timeout_s=60, what="every message")
    # Every message counted once, whatever its clock said.
    assert_exact(compare_per_stream(expected, load_merged(agents.receiver.db)))

    status = agent.status()
    detail = agent.cameras()
    assert status is not None and detail is not None
    cams = detail["by_id"]
    assert cams["cam-000"]["skew_s"] == pytest.approx(37.0, abs=0.5)
    assert cams["cam-001"]["skew_s"] == pytest.approx(-300.0, abs=0.5)
    assert cams["cam-002"]["skew_s"] == pytest.approx(8 / 60, abs=0.5)
    assert cams["cam-000"]["flags"] == ["clock_suspect"]
    assert cams["cam-002"]["flags"] == [] and cams["cam-005"]["flags"] == []
    assert cams["cam-003"]["clock_jumps"] >= 1
    assert status["aggregate"]["bad_time_restamped"] > 0
    # Milliseconds where seconds are configured are no time at all (year 57,000): counted on
    # the gateway clock, flagged.
    assert status["aggregate"]["bad_timestamp_used_gateway_time"] > 0

    db = agents.receiver.db
    for punctual in ("cam-005", "cam-006"):
        assert all(c["flags"] == [] for c in chunks_of(db, punctual))
    # A camera reset to 1970 or sending ms as s never lands in 1970 or in the year 57,000.
    for cam in ("cam-003", "cam-004"):
        chunks = chunks_of(db, cam)
        assert all(abs(c["t"] - c["recv_first"]) < 60 for c in chunks)
    assert any("bad_time" in c["flags"] for c in chunks_of(db, "cam-003"))
    assert any("time_from_gateway" in c["flags"] for c in chunks_of(db, "cam-004"))
    behind = chunks_of(db, "cam-001")
    if policy == "restamp":
        # Shifted by the estimate: windows on true time, flagged.
        assert all("restamped" in c["flags"] for c in behind[3:])
        assert all(abs(c["t"] - c["recv_first"]) < 5 for c in behind if "restamped" in c["flags"])
    else:
        # Camera time kept, flagged; its windows still close on its own event time.
        assert all("clock_suspect" in c["flags"] for c in behind[3:])
        assert all(250 < c["recv_first"] - c["t"] < 350 for c in behind)
    assert agent.stop() == 0

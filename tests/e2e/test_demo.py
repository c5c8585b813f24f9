"""`make demo`, the newcomer's first command, runs the whole path and says it was exact:
cameras -> Mosquitto -> agent -> edge-ingest -> PostgreSQL, with the service killed and the
database crashed on the way (a short run of the same script)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_the_demo_runs_the_whole_path_exactly(tmp_path: Path) -> None:
    args = [
        sys.executable, "-m", "devtools.demo", "--dir", str(tmp_path / "demo"),
        "--cameras", "40", "--duration", "10", "--outage-at", "2", "--outage-for", "2",
        "--db-crash-at", "6",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "cloud DOWN (edge-ingest SIGKILLed)" in out
    assert "PostgreSQL recovered" in out
    assert "missing messages:    0" in out
    assert "duplicated messages: 0" in out
    assert "RESULT: every published message was counted exactly once." in out

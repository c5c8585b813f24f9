"""Only what an operator runs ships: the built wheel holds the agent's package and nothing of the
development tooling (devtools/: the simulation, test processes, ground truth, the demo), the
tests or the benchmarks."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_the_wheel_holds_the_agent_and_no_test_tooling(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    [wheel] = tmp_path.glob("edge_agent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if n.endswith(".py")]
    assert code and all(n.startswith("agent/") for n in code), sorted(
        n for n in code if not n.startswith("agent/")
    )
    # What an operator runs is there: the commands, and the stand-ins `simulate cameras|cloud`.
    for must in ("agent/cli/main.py", "agent/sim/cameras.py", "agent/sim/cloud.py"):
        assert must in names, must
    # The deterministic simulation, test processes, ground truth and the demo are not.
    tooling = ("simulation", "procs", "truth", "demo", "durable")
    assert not [n for n in code if Path(n).stem in tooling], code

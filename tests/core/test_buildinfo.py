"""Build identity: `edge-agent --version` names the version and the commit (issue 16)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.core.buildinfo import UNKNOWN, git_commit, main

ROOT = Path(__file__).resolve().parents[2]


def test_a_checkout_names_its_git_commit() -> None:
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    commit = git_commit(ROOT)
    assert commit.removesuffix("-dirty") == head[:12]


def test_without_git_the_commit_is_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == UNKNOWN


@pytest.mark.e2e
def test_a_stamped_copy_names_the_stamped_commit(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("_build.py"))
    assert main(["--stamp", str(tmp_path), "--commit", "0123456789ab"]) == 0
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"edge-agent {__version__} (commit 0123456789ab)"


def test_stamp_refuses_a_directory_without_the_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--stamp", str(tmp_path)]) == 2
    assert "no agent/__init__.py" in capsys.readouterr().err

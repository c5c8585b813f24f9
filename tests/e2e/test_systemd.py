"""The unit file and the installer."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import __version__
from agent.core.buildinfo import git_commit

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "edge-agent.service"


def unit_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        keys.setdefault(f"{section}.{k}", []).append(v)
    return keys


def test_unit_has_the_promised_settings() -> None:
    k = unit_keys()
    assert k["Service.Type"] == ["notify"]
    assert k["Service.WatchdogSec"] and k["Service.Restart"] == ["always"]
    assert k["Unit.StartLimitBurst"] and k["Unit.StartLimitIntervalSec"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert f"Service.{hardening}" in k
    assert k["Service.ProtectSystem"] == ["strict"]
    assert k["Service.User"] == ["edge-agent"] and k["Service.StateDirectory"] == ["edge-agent"]
    assert k["Service.ConfigurationDirectory"] == ["edge-agent"]
    assert {v.split(":")[0] for v in k["Service.LoadCredential"]} == {
        "cloud-token",
        "mqtt-password",
    }
    assert k["Service.MemoryMax"]
    assert "/etc/edge-agent/config.toml" in k["Service.ExecStart"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # Verify every key; only the ExecStart binary (installed by install.sh) is swapped for one
    # that exists here.
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/edge-agent/bin/edge-agent", "/bin/true"))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line for line in (r.stdout + r.stderr).splitlines()
        if "edge-agent.service" in line and "Failed to" not in line.split(":", 1)[0]
    ]  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert problems == [], problems


@pytest.mark.e2e
def test_installer_into_a_root_dir_and_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    args = [
        str(ROOT / "systemd" / "install.sh"),
        "--root",
        str(root),
        "--no-user",
        "--no-systemctl",
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Next steps" in r.stdout
    assert (root / "opt/edge-agent/bin/edge-agent").exists()
    config = root / "etc/edge-agent/config.toml"
    assert config.read_text() == (ROOT / "config.example.toml").read_text()
    assert (root / "etc/edge-agent/cloud-token").stat().st_mode & 0o777 == 0o640
    assert (root / "etc/systemd/system/edge-agent.service").read_text() == UNIT.read_text()
    check_config = [
        str(root / "opt/edge-agent/bin/edge-agent"),
        "check-config",
        "--config",
        str(config),
        # --no-user: the installer gave the directories to whoever runs the test.
        "--service-user",
        getpass.getuser(),
    ]
    check = subprocess.run(check_config, capture_output=True, text=True, timeout=60)
    # The example's gateway id must be replaced: two gateways with one id collide in the cloud.
    assert check.returncode == 2, check.stderr
    assert "config error: gateway_id = 'site-42-gw-1': the example's value" in check.stderr
    state = root / "var/lib/edge-agent"
    assert state.is_dir()  # the installer makes the outbox's directory
    edited = {
        **os.environ,
        "EDGE_AGENT__GATEWAY_ID": "site-7-gw-2",
        "EDGE_AGENT__BUFFER__PATH": str(state / "buffer.sqlite3"),
    }
    check = subprocess.run(check_config, capture_output=True, text=True, timeout=60, env=edited)
    assert check.returncode == 0, check.stderr
    version = subprocess.run(
        [str(root / "opt/edge-agent/bin/edge-agent"), "--version"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert version.stdout.strip() == f"edge-agent {__version__} (commit {git_commit(ROOT)})"
    config.write_text(config.read_text() + "\n# edited\n")
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert "kept the existing" in r.stdout and config.read_text().endswith("# edited\n")
    r = subprocess.run([*args, "--uninstall"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (root / "opt/edge-agent").exists()
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert config.exists()  # the data and config stay

"""Where a credential is read from: the configured file, else systemd's $CREDENTIALS_DIRECTORY,
else — for a command run with the unit's own config outside systemd — the file the unit's
LoadCredential= loads it from, so a command typed by hand sees what the service sees."""

from __future__ import annotations

from pathlib import Path

import pytest

import agent.config.settings as settings
from agent.config.settings import read_secret, secret_path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "edge-agent.service"


def unit_lines(key: str) -> list[str]:
    return [
        line.removeprefix(f"{key}=")
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def test_the_unit_loads_each_credential_from_where_commands_look_outside_systemd() -> None:
    loaded = dict(line.split(":", 1) for line in unit_lines("LoadCredential"))
    assert sorted(loaded) == ["cloud-token", "mqtt-password"]
    for name, source in loaded.items():
        assert Path(source) == settings.UNIT_CREDENTIALS_DIR / name
    [start] = unit_lines("ExecStart")
    assert start.endswith(f" run --config {settings.UNIT_CONFIG}")


@pytest.fixture
def unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /etc/edge-agent: the unit's config and its credential files."""
    etc = tmp_path / "etc-edge-agent"
    etc.mkdir()
    (etc / "config.toml").write_text('gateway_id = "gw"\n')
    monkeypatch.setattr(settings, "UNIT_CONFIG", etc / "config.toml", raising=False)
    monkeypatch.setattr(settings, "UNIT_CREDENTIALS_DIR", etc, raising=False)
    monkeypatch.setattr(settings, "_credentials_outside_systemd", None, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return etc


def test_the_unit_config_reads_the_units_credential_files(unit: Path, tmp_path: Path) -> None:
    (unit / "cloud-token").write_text("t0ken\n")
    (unit / "mqtt-password").write_text("pw\n")
    settings.credentials_outside_systemd(unit / "config.toml")
    assert secret_path(None, "cloud-token") == unit / "cloud-token"
    assert read_secret(None, None, "cloud-token") == "t0ken"
    assert read_secret(None, None, "mqtt-password") == "pw"
    # The same file by another name is the same config.
    link = tmp_path / "link.toml"
    link.symlink_to(unit / "config.toml")
    settings.credentials_outside_systemd(link)
    assert read_secret(None, None, "cloud-token") == "t0ken"
    # What the config names, and systemd's own directory, come first.
    mine = tmp_path / "mine"
    mine.write_text("m1ne\n")
    assert read_secret(None, mine, "cloud-token") == "m1ne"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cloud-token").write_text("fr0m-systemd\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CREDENTIALS_DIRECTORY", str(creds))
        assert read_secret(None, None, "cloud-token") == "fr0m-systemd"
        assert read_secret(None, None, "mqtt-password") is None  # systemd gave none: none
    (unit / "cloud-token").unlink()
    assert secret_path(None, "cloud-token") is None


def test_any_other_config_reads_only_what_it_names(unit: Path, tmp_path: Path) -> None:
    """A test's or a developer's config never picks up the gateway's installed secrets."""
    (unit / "cloud-token").write_text("t0ken\n")
    other = tmp_path / "other.toml"
    other.write_text('gateway_id = "gw"\n')
    settings.credentials_outside_systemd(other)
    assert secret_path(None, "cloud-token") is None
    settings.credentials_outside_systemd(None)
    assert secret_path(None, "cloud-token") is None

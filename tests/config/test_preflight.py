"""check-config against the machine: the example's gateway id, the outbox's directory."""

from __future__ import annotations

import getpass
import os
import shutil
from pathlib import Path

import pytest

from agent.cli.main import main
from tests.helpers import deny_stat

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, gateway_id: str, buffer: Path) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'gateway_id = "{gateway_id}"\n[buffer]\npath = "{buffer}"\n')
    return cfg


def test_the_example_config_unedited_is_refused_naming_the_key_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGE_AGENT__BUFFER__PATH", str(tmp_path / "buffer.sqlite3"))
    example = ROOT / "config.example.toml"
    assert main(["check-config", "--config", str(example)]) == 2
    err = capsys.readouterr().err
    assert (
        "config error: gateway_id = 'site-42-gw-1': the example's value; set this gateway's own "
        "id (the cloud deduplicates by (gateway, seq)" in err
    )
    assert "Traceback" not in err
    # `run` refuses it too, before touching anything.
    assert main(["run", "--config", str(example)]) == 2
    assert "gateway_id = 'site-42-gw-1'" in capsys.readouterr().err
    assert not (tmp_path / "buffer.sqlite3").exists()
    monkeypatch.setenv("EDGE_AGENT__GATEWAY_ID", "site-42-gw-7")
    assert (
        main(["check-config", "--config", str(example), "--service-user", getpass.getuser()]) == 0
    )


def test_a_missing_buffer_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    buffer = tmp_path / "nowhere" / "buffer.sqlite3"
    assert main(["check-config", "--config", str(config(tmp_path, "gw", buffer))]) == 2
    err = capsys.readouterr().err
    assert (
        f"config error: buffer.path = '{buffer}': the directory '{buffer.parent}' does not exist"
        in err
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another user")
def test_the_buffer_directory_must_be_writable_by_the_service_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    cfg = config(tmp_path, "gw", d / "buffer.sqlite3")
    assert main(["check-config", "--config", str(cfg), "--service-user", "nobody"]) == 2
    err = capsys.readouterr().err
    assert (
        f"the directory '{d}' is not writable by user 'nobody' (owner root, group root, mode 0755)"
        in err
    )
    shutil.chown(d, user="nobody")
    assert main(["check-config", "--config", str(cfg), "--service-user", "nobody"]) == 0
    assert main(["check-config", "--config", str(cfg), "--service-user", "no-such-user-x"]) == 2
    assert "no user 'no-such-user-x' on this machine" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_outbox_path_that_is_a_directory_is_refused_by_check_config_and_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # check-config took it; `run` could not open a directory as its outbox (exit 3).
    d = tmp_path / "state"
    d.mkdir()
    cfg = config(tmp_path, "gw", d)
    line = (
        f"config error: buffer.path = '{d}': is a directory; name the outbox file in it, e.g. "
        f"'{d}/buffer.sqlite3'"
    )
    user = getpass.getuser()
    assert main(["check-config", "--quiet", "--config", str(cfg), "--service-user", user]) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    monkeypatch.setenv("EDGE_AGENT__HEALTH__LISTEN", f"127.0.0.1:{_free_port()}")
    assert main(["run", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    # '' is '.': the working directory.
    monkeypatch.chdir(d)
    cfg.write_text('gateway_id = "gw"\n[buffer]\npath = ""\n')
    assert main(["check-config", "--quiet", "--config", str(cfg), "--service-user", user]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "config error: buffer.path = '.': is a directory; name the outbox file in it, e.g. "
        "'buffer.sqlite3'"
    ]
    assert main(["run", "--config", str(cfg)]) == 2
    assert list(d.iterdir()) == []


def test_run_refuses_an_outbox_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # check-config took ':memory:'; `run` died with a traceback.
    cfg = tmp_path / "c.toml"
    cfg.write_text('gateway_id = "gw"\n[buffer]\npath = ":memory:"\n')
    monkeypatch.setenv("EDGE_AGENT__HEALTH__LISTEN", f"127.0.0.1:{_free_port()}")
    line = (
        "config error: buffer.path = ':memory:': expected a file path: ':memory:' is SQLite's "
        "in-memory database, and the outbox must survive a restart"
    )
    for command in ("check-config", "run"):
        assert main([command, "--config", str(cfg)]) == 2
        assert capsys.readouterr().err.splitlines() == [line]


def test_the_service_user_may_enter_a_directory_this_user_may_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator checking /var/lib/edge-agent (0750 edge-agent) as another user: the mode
    # bits let the service user in, so it is no problem (it was a traceback).
    import agent.config.preflight as preflight
    from agent.config.settings import load_settings

    buffer = tmp_path / "b.sqlite3"
    os.chmod(tmp_path, 0o777)
    s = load_settings(None, overrides={"gateway_id": "gw", "buffer": {"path": str(buffer)}})
    deny_stat(monkeypatch, buffer)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    assert preflight.buffer_problem(s, "nobody") is None

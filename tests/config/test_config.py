from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest

from agent.cli.main import main
from agent.config.settings import load_settings
from agent.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_loads_and_documents_every_key() -> None:
    s = load_settings(ROOT / "config.example.toml")
    assert s.gateway_id == "site-42-gw-1"
    assert s.buffer.synchronous == "full"
    assert s.mqtt.max_payload_bytes == 64 * 1024
    text = (ROOT / "config.example.toml").read_text()
    dumped = s.model_dump()
    for section, values in dumped.items():
        if isinstance(values, dict):
            for key in values:
                assert key in text, f"{section}.{key} is not documented in config.example.toml"
    for key in s.streams[0].model_dump():
        assert key in text, f"streams.{key} is not documented"


def test_check_config_prints_effective_config_with_secrets_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'gateway_id = "gw"\n[mqtt]\nusername = "u"\npassword = "hunter2"\n'
        '[forward]\ntoken = "s3cr3t"\n'
        f'[buffer]\npath = "{tmp_path}/buffer.sqlite3"\n'
    )
    user = getpass.getuser()
    assert main(["check-config", "--config", str(cfg), "--service-user", user]) == 0
    assert capsys.readouterr().out == ""  # the effective config only with --show
    assert main(["check-config", "--config", str(cfg), "--service-user", user, "--show"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "s3cr3t" not in out
    doc = json.loads(out)
    assert doc["mqtt"]["password"] == "**********"
    assert doc["gateway_id"] == "gw"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('gateway_id = "gw"\n[buffer]\nsynchronous = "fast"\n',
         "buffer.synchronous = 'fast': Input should be 'off', 'normal', 'full' or 'extra'"),
        ('gateway_id = "gw"\n[mqtt]\nport = 70000\n', "mqtt.port = 70000"),
        ('gateway_id = "gw"\n[mqtt]\nhots = "x"\n', "mqtt.hots: unknown key (allowed here:"),
        ('gateway_id = "gw"\n[buffer]\nmax_bytes = "lots"\n', "buffer.max_bytes = 'lots': expected a size"),
        ('gateway_id = "gw"\n[[streams]]\ntopic = "a/+/b"\n', "streams[0].topic = 'a/+/b'"),
        ('gateway_id = "gw"\n[[streams]]\ntopic = "a/{camera}"\n', "streams[0]: give a stream"),
        ('gateway_id = "bad id"\n', "gateway_id = 'bad id': use letters"),
        ("[mqtt]\n", "gateway_id: required key is missing"),
        ('gateway_id = "gw"\n[forward]\nurl = "ftp://x"\n', "forward.url = 'ftp://x': expected an http"),
        ('gateway_id = "gw"\n[forward]\ntoken_file = "/nonexistent/t"\n',
         "forward.token_file = '/nonexistent/t': file not found"),
        ('gateway_id = "gw"\n[log]\nlevel = "loud"\n', "log.level = 'loud'"),
        ("gateway_id = \n", "is not valid TOML"),
        ('gateway_id = "gw"\n[forward]\nurl = "https://cloud.example:70000/ingest"\n',
         "forward.url = 'https://cloud.example:70000/ingest': expected an http(s) URL with a port "
         "from 1 to 65535"),
        ('gateway_id = "gw"\n[forward]\nurl = "https://u:hunter2@cloud.example:0/x"\n',
         "forward.url = 'https://u:***@cloud.example:0/x': expected an http(s) URL with a port"),
        ('gateway_id = "gw"\n[health]\nlisten = "127.0.0.1:0"\n',
         "health.listen = '127.0.0.1:0': the port must be a number from 1 to 65535"),
        ('gateway_id = "gw"\n[health]\nlisten = "no-such-host.invalid:9108"\n',
         "health.listen = 'no-such-host.invalid:9108': host 'no-such-host.invalid' does not "
         "resolve"),
        ('gateway_id = "gw"\n[mqtt]\nport = true\n',
         "mqtt.port = True: expected a number, not true/false"),
        ('gateway_id = "gw"\n[forward]\ntimeout_s = false\n',
         "forward.timeout_s = False: expected a number, not true/false"),
        ('gateway_id = "gw"\n[buffer]\nmax_bytes = true\n',
         "buffer.max_bytes = True: expected a number, not true/false"),
    ],
)  # fmt: skip
def test_bad_config_names_key_value_and_allowed_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, expected: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    assert main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err
    assert all(line.startswith("config error: ") for line in err.splitlines())
    assert "hunter2" not in err


def test_run_with_bad_config_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('gateway_id = "gw"\n[aggregate]\nlate_policy = "maybe"\n')
    assert main(["run", "--config", str(cfg)]) == 2
    assert "aggregate.late_policy = 'maybe'" in capsys.readouterr().err


def test_missing_file_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", "/nonexistent/edge.toml"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "config error: config file '/nonexistent/edge.toml' not found"
    )


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('gateway_id = "gw"\n[mqtt]\nhost = "10.0.0.1"\nport = 1884\n')
    monkeypatch.setenv("EDGE_AGENT__MQTT__HOST", "127.0.0.1")
    monkeypatch.setenv("EDGE_AGENT__BUFFER__MAX_BYTES", "2GiB")
    s = load_settings(cfg)
    assert s.mqtt.host == "127.0.0.1"
    assert s.mqtt.port == 1884
    assert s.buffer.max_bytes == 2 * 1024**3


def test_bad_env_override_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('gateway_id = "gw"\n')
    monkeypatch.setenv("EDGE_AGENT__BUFFER__SYNCHRONOUS", "sometimes")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert any(p.startswith("buffer.synchronous = 'sometimes'") for p in e.value.problems)


def test_env_names_are_case_insensitive_tables_json_and_typos_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('gateway_id = "gw"\n[forward]\nlinger_ms = 50\n')
    monkeypatch.setenv("edge_agent__Forward__Timeout_S", "3.5")
    monkeypatch.setenv(
        "EDGE_AGENT__STREAMS", '[{"topic": "a/{camera}/{stream}", "numeric": ["v"]}]'
    )
    s = load_settings(cfg)
    assert s.forward.timeout_s == 3.5
    assert s.forward.linger_ms == 50  # the table is merged, not replaced
    assert [st.topic for st in s.streams] == ["a/{camera}/{stream}"]
    monkeypatch.setenv("EDGE_AGENT__MQTT__HOTS", "10.0.0.5")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert any("mqtt.hots" in p for p in e.value.problems), e.value.problems


def test_sizes_accept_units() -> None:
    s = load_settings(None, overrides={"gateway_id": "gw", "buffer": {"max_bytes": "64MiB"}})
    assert s.buffer.max_bytes == 64 * 1024**2
    s = load_settings(None, overrides={"gateway_id": "gw", "mqtt": {"max_payload_bytes": "64KiB"}})
    assert s.mqtt.max_payload_bytes == 65536
    s = load_settings(None, overrides={"gateway_id": "gw", "buffer": {"max_bytes": "10MB"}})
    assert s.buffer.max_bytes == 10_000_000


def test_check_config_masks_the_password_in_a_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'gateway_id = "gw"\n[forward]\nurl = "https://site42:hunter2@cloud.example/in"\n'
        f'[buffer]\npath = "{tmp_path}/buffer.sqlite3"\n'
    )
    argv = ["check-config", "--config", str(cfg), "--service-user", getpass.getuser(), "--show"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert json.loads(out)["forward"]["url"] == "https://site42:***@cloud.example/in"
    assert load_settings(cfg).forward.url == "https://site42:hunter2@cloud.example/in"


def test_streams_whose_topics_can_match_one_topic_are_refused() -> None:
    """The broker delivers a message once per matching subscription: it would be counted twice."""
    streams = [
        {"topic": "site/cam/{camera}/detections", "name": "detections", "numeric": ["conf"]},
        {"topic": "site/cam/{camera}/{stream}", "numeric": ["level"]},
    ]
    with pytest.raises(ConfigError) as e:
        load_settings(None, overrides={"gateway_id": "gw", "streams": streams})
    assert any("counted twice" in p and "site/cam/+/detections" in p for p in e.value.problems)
    disjoint = [
        {"topic": "site/cam/{camera}/detections", "name": "detections", "numeric": ["conf"]},
        {"topic": "site/door/{camera}/{stream}", "numeric": ["level"]},
    ]
    assert (
        len(load_settings(None, overrides={"gateway_id": "gw", "streams": disjoint}).streams) == 2
    )


def test_two_env_variables_for_one_key_are_refused_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('gateway_id = "gw"\n')
    monkeypatch.setenv("EDGE_AGENT__MQTT__PORT", "1884")
    monkeypatch.setenv("edge_agent__mqtt__port", "1885")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert any(
        "EDGE_AGENT__MQTT__PORT" in p and "edge_agent__mqtt__port" in p for p in e.value.problems
    ), e.value.problems
    monkeypatch.delenv("edge_agent__mqtt__port")
    monkeypatch.setenv("EDGE_AGENT__STREAMS", '[{"topic": "a/{camera}/{stream}"}]')
    monkeypatch.setenv("EDGE_AGENT__STREAMS__0__TOPIC", "b/{camera}/{stream}")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert any("EDGE_AGENT__STREAMS__0__TOPIC" in p for p in e.value.problems), e.value.problems

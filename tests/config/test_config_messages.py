"""Golden test of the operator-facing config errors: a bad config names the key and the allowed
values and exits 2. Each case in config_messages.json is a TOML file (plus `EDGE_AGENT__...`
variables) run through `edge-agent check-config`, with the exact stderr it must print.

The cases were recorded from the pydantic-based loader so that a rewrite keeps every message.
Regenerate (and review the diff!) with `python -m tests.config.test_config_messages`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli.main import main

GOLDEN = Path(__file__).with_name("config_messages.json")
BASE = 'gateway_id = "gw"\n'
# A second, certain error: a case whose value is accepted still fails, and shows it was.
SENTINEL = "zzz = 1\n"

_INT_FIELDS = [
    ("mqtt", "port", 1, 65535),
    ("mqtt", "session_expiry_s", 60, 4294967295),
    ("mqtt", "keepalive_s", 5, 3600),
    ("mqtt", "receive_maximum", 100, 65535),
    ("mqtt", "max_fields", 1, 100000),
    ("mqtt", "max_depth", 1, 1000),
    ("aggregate", "window_s", 1, 3600),
    ("aggregate", "max_cameras", 1, None),
    ("aggregate", "max_streams_per_camera", 1, None),
    ("aggregate", "max_open_windows", 1, None),
    ("buffer", "checkpoint_interval_ms", 10, 60000),
    ("buffer", "max_ack_delay_ms", 100, 3600000),
    ("forward", "max_batch_chunks", 1, 100000),
    ("forward", "linger_ms", 0, 60000),
]
_FLOAT_FIELDS = [
    ("mqtt", "connect_timeout_s", "0", "300.5"),
    ("mqtt", "reconnect_min_s", "0", None),
    ("mqtt", "reconnect_max_s", "-1.5", None),
    ("aggregate", "allowed_lateness_s", "-0.1", "3601"),
    ("aggregate", "idle_close_s", "0.0", "86401"),
    ("aggregate", "max_skew_s", "0", None),
    ("aggregate", "clock_jump_s", "-1", None),
    ("aggregate", "max_future_s", "0", None),
    ("aggregate", "max_age_s", "0", None),
    ("buffer", "ack_pressure_ratio", "0", "1"),
    ("forward", "timeout_s", "0", "601"),
    ("forward", "backoff_min_s", "0", None),
    ("forward", "backoff_max_s", "0", None),
    ("forward", "shutdown_drain_s", "-1", "600.1"),
    ("forward", "max_chunks_per_s", "0", None),
    ("forward", "min_chunks_per_s", "0", None),
    ("forward", "fast_response_s", "0", None),
    ("forward", "alert_after_s", "0.5", "2592001"),
]
_SIZE_FIELDS = [
    ("mqtt", "max_payload_bytes"),
    ("buffer", "max_bytes"),
    ("forward", "max_batch_bytes"),
    ("forward", "max_bytes_per_s"),
]
_STR_FIELDS = [("mqtt", "host"), ("mqtt", "client_id"), ("mqtt", "username")]
_PATH_FIELDS = [
    ("mqtt", "password_file"),
    ("mqtt", "ca_file"),
    ("mqtt", "cert_file"),
    ("mqtt", "key_file"),
    ("buffer", "path"),
    ("forward", "token_file"),
    ("forward", "ca_file"),
    ("forward", "cert_file"),
    ("forward", "key_file"),
]
_ENUM_FIELDS = [
    ("aggregate", "late_policy", "keep"),
    ("aggregate", "skew_policy", "ignore"),
    ("aggregate", "bad_time_policy", "keep"),
    ("buffer", "synchronous", "fast"),
    ("buffer", "overflow", "block"),
    ("log", "level", "loud"),
    ("log", "format", "xml"),
]
_SECTIONS = ["mqtt", "aggregate", "buffer", "forward", "health", "log"]
STREAM = '[[streams]]\ntopic = "site/cam/{camera}/{stream}"\n'


def _in(section: str, body: str) -> str:
    return f"{BASE}[{section}]\n{body}"


def _field_cases() -> Iterator[dict[str, Any]]:
    for section, key, lo, hi in _INT_FIELDS:
        values = ['"abc"', "1.5", "true", "[1]", "{ a = 1 }", str(lo - 1)]
        values += [str(hi + 1)] if hi is not None else ["9223372036854775807"]
        for v in values:
            yield {"toml": SENTINEL + _in(section, f"{key} = {v}\n")}
    for section, key, zero, high in _FLOAT_FIELDS:
        for v in ['"abc"', "false", "[1.0]", zero, *([high] if high else [])]:
            yield {"toml": _in(section, f"{key} = {v}\n")}
    for section, key in _SIZE_FIELDS:
        for v in ['"lots"', "-1", "1.5", "false", '"12 furlongs"', '"0.5KiB"', "[1]"]:
            yield {"toml": SENTINEL + _in(section, f"{key} = {v}\n")}
    for section, key in _STR_FIELDS:
        for v in ["5", "true", "[]", "1.5"]:
            yield {"toml": _in(section, f"{key} = {v}\n")}
    for section, key in _PATH_FIELDS:
        for v in ["5", "true", '"/nonexistent/f"']:
            yield {"toml": _in(section, f"{key} = {v}\n")}
    for section, key, bad in _ENUM_FIELDS:
        for v in [f'"{bad}"', f'"{bad.upper()}"', "1", "true"]:
            yield {"toml": _in(section, f"{key} = {v}\n")}
    for section in _SECTIONS:
        yield {"toml": _in(section, "nosuchkey = 1\n")}
        yield {"toml": f"{BASE}{section} = 5\n"}
        yield {"toml": f"{BASE}{section} = [1, 2]\n"}
    for key in ("tls",):
        for v in ['"yes"', '"maybe"', "2", "1.5", "[]"]:
            yield {"toml": SENTINEL + _in("mqtt", f"{key} = {v}\n")}
    for v in ['"no"', "0", "{}"]:
        yield {"toml": SENTINEL + _in("forward", f"gzip = {v}\n")}


def _lax_cases() -> Iterator[dict[str, Any]]:
    """Values pydantic accepts (or refuses) after converting them: each with a sentinel error."""
    for v in ["2.0", '"1884"', '" 1884 "', '"1_884"', '"0x10"', '"+1884"', '"1884.0"', "1e3",
              "inf", "nan", '"1.5"', "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z"]:  # fmt: skip
        yield {"toml": SENTINEL + _in("mqtt", f"port = {v}\n")}
    for v in ['"2.5"', '" 2.5 "', '"1e1"', '"inf"', '"nan"', '"-inf"', "inf", "nan", "-inf",
              "10", '"1_0"', '"ten"', "1979-05-27"]:  # fmt: skip
        yield {"toml": SENTINEL + _in("forward", f"timeout_s = {v}\n")}
    for v in ['"64KiB"', '"1 GiB"', '"10MB"', '" 2gb "', '"1.5MiB"', '"7"', '"1e3"', '""',
              '"-5"', '"5 TiB"', '"5 tb"', "1e3", "1.0", "1048576.0", '"1048575"']:  # fmt: skip
        yield {"toml": SENTINEL + _in("buffer", f"max_bytes = {v}\n")}
    for v in ['"true"', '"on"', '"off"', '"t"', '"Y"', '"1"', '"0"', "1", "0", "1.0", '" yes "',
              '"True"', '"2"']:  # fmt: skip
        yield {"toml": SENTINEL + _in("mqtt", f"tls = {v}\n")}
    for v in ['""', '"."', '"relative/path"']:
        yield {"toml": SENTINEL + _in("buffer", f"path = {v}\n")}


def _string_cases() -> Iterator[dict[str, Any]]:
    for v in ['""', '"a b"', '"gw/1"', '"caf\u00e9"', "5", "true", f'"{"x" * 129}"', "[]"]:
        yield {"toml": f"gateway_id = {v}\n"}
    yield {"toml": "[mqtt]\nport = 1\n"}
    yield {"toml": ""}
    for v in ['""', f'"{"c" * 129}"']:
        yield {"toml": _in("mqtt", f"client_id = {v}\n")}
    for v in ["ftp://x", "https://", "http://a b", "https://cloud.example:70000/in", "http://h:0/",
              "http://h:abc/", "https://u:hunter2@cloud.example:0/x", "http://[::1/x", "cloud/in",
              "https://:hunter2@h:99999/", "https://hunter2@h:99999/", "http:///x", "http://@/x"]:  # fmt: skip
        yield {"toml": _in("forward", f'url = "{v}"\n')}
    for v in ["127.0.0.1", ":9108", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x", "h:-1",
              "no-such-host.invalid:9108", "[::1]:9108", "::1:9108", "", "localhost:09108"]:  # fmt: skip
        yield {"toml": SENTINEL + _in("health", f'listen = "{v}"\n')}
    yield {"toml": _in("health", "listen = 9108\n")}


def _secret_cases() -> Iterator[dict[str, Any]]:
    yield {"toml": _in("mqtt", "password = 12345\n")}
    yield {"toml": _in("mqtt", 'password = ["hunter2"]\n')}
    yield {"toml": _in("mqtt", 'password = { v = "hunter2" }\n')}
    yield {"toml": _in("mqtt", 'password = "hunter2"\npassword_file = "/x"\n')}
    yield {"toml": _in("mqtt", 'password = "hunter2"\nport = 0\n')}
    yield {"toml": _in("mqtt", 'password = "hunter2"\nhots = "x"\n')}
    yield {"toml": _in("mqtt", 'password_file = 7\npassword = "hunter2"\n')}
    yield {"toml": _in("forward", "token = 12345\n")}
    yield {"toml": _in("forward", 'token = "s3cr3t"\ntoken_file = "/x"\n')}
    yield {"toml": _in("forward", 'token = "s3cr3t"\ntimeout_s = 0\n')}
    yield {"toml": _in("forward", "token = true\n")}
    yield {"toml": _in("forward", 'token_file = "/nonexistent/token"\n')}
    yield {"toml": _in("mqtt", 'password_file = "/nonexistent/pw"\nca_file = "/nonexistent/ca"\n')}


def _cross_cases() -> Iterator[dict[str, Any]]:
    yield {"toml": _in("mqtt", 'cert_file = "/x"\n')}
    yield {"toml": _in("mqtt", 'key_file = "/x"\n')}
    yield {"toml": _in("mqtt", "reconnect_min_s = 5\nreconnect_max_s = 1\n")}
    yield {"toml": _in("mqtt", "reconnect_min_s = 5\nreconnect_max_s = 1\nport = 0\n")}
    yield {"toml": _in("forward", "backoff_min_s = 5\nbackoff_max_s = 1\n")}
    yield {"toml": _in("forward", "min_chunks_per_s = 10\nmax_chunks_per_s = 5\n")}
    yield {"toml": _in("forward", "min_chunks_per_s = 10\nmax_chunks_per_s = 5\nurl = 'x'\n")}
    yield {"toml": _in("forward", "backoff_min_s = 5\nbackoff_max_s = 1\nnope = 1\n")}
    yield {"toml": _in("forward", 'cert_file = "/nonexistent/c"\nkey_file = "/nonexistent/k"\n')}


def _stream_cases() -> Iterator[dict[str, Any]]:
    topics = ["a/+/b", "a/{camera}", "a/#", "a//{camera}/{stream}", "{camera}/{camera}/{stream}",
              "a/x{camera}/{stream}", "", "a/{camera}/{stream}/{stream}", "/{camera}/{stream}",
              "a/{camera}/{stream}/"]  # fmt: skip
    for t in topics:
        yield {"toml": f'{BASE}[[streams]]\ntopic = "{t}"\n'}
    bodies = [
        'name = "det"\n',
        "topic = 5\n",
        'topic = "a/{camera}"\nname = "det"\nnumeric = ["x"]\ncategorical = ["x", "y"]\n',
        'topic = "a/{camera}/{stream}"\nname = "det"\n',
        'topic = "a/{camera}/{stream}"\nnumeric = "conf"\n',
        'topic = "a/{camera}/{stream}"\nnumeric = [1, "a", 2]\n',
        'topic = "a/{camera}/{stream}"\ncategorical = { a = 1 }\n',
        'topic = "a/{camera}/{stream}"\ntime_unit = "minutes"\n',
        'topic = "a/{camera}/{stream}"\ntime_field = 5\n',
        'topic = "a/{camera}/{stream}"\nname = 5\n',
        'topic = "a/{camera}/{stream}"\nmax_categories = 0\n',
        'topic = "a/{camera}/{stream}"\nmax_categories = 10001\n',
        'topic = "a/{camera}/{stream}"\nunknown = 1\n',
        'topic = "a/+/{stream}"\nunknown = 1\nmax_categories = "x"\n',
    ]
    for body in bodies:
        yield {"toml": f"{BASE}[[streams]]\n{body}"}
    yield {"toml": f"{BASE}streams = []\n"}
    yield {"toml": f"{BASE}streams = 5\n"}
    yield {"toml": f'{BASE}streams = "a"\n'}
    yield {"toml": f"{BASE}streams = [1, 2]\n"}
    yield {"toml": f"{BASE}[streams]\ntopic = 'a/{{camera}}/{{stream}}'\n"}
    yield {"toml": f"{BASE}{STREAM}{STREAM}"}
    yield {"toml": f'{BASE}{STREAM}[[streams]]\ntopic = "site/cam/{{camera}}/det"\nname = "d"\n'}
    yield {"toml": f'{BASE}[[streams]]\ntopic = "a/{{camera}}/{{stream}}"\n[[streams]]\n'
                   'topic = "a/+"\n[[streams]]\ntopic = "b/{camera}"\n'}  # fmt: skip
    yield {"toml": f'{BASE}{STREAM}[[streams]]\ntopic = "x/{{camera}}/{{stream}}"\nmax_depth = 1\n'}


def _combined_cases() -> Iterator[dict[str, Any]]:
    yield {"toml": 'zzz = 1\ngateway_id = "bad id"\n[mqtt]\nport = 0\nhost = 5\n'}
    yield {"toml": '[log]\nlevel = "x"\n[mqtt]\nport = "p"\n[buffer]\nmax_bytes = 1\n'}
    yield {"toml": f"{BASE}yyy = 1\nxxx = 2\n[forward]\nbbb = 1\naaa = 2\ntimeout_s = 0\n"}
    yield {"toml": f'{BASE}[aggregate]\nwindow_s = 0\nlate_policy = "x"\nmax_cameras = 0\n'}
    yield {"toml": "gateway_id = \n"}
    yield {"toml": 'gateway_id = "gw"\ngateway_id = "gw2"\n'}


def _env_cases() -> Iterator[dict[str, Any]]:
    envs: list[dict[str, str]] = [
        {"EDGE_AGENT__MQTT__PORT": "abc"},
        {"EDGE_AGENT__MQTT__PORT": "1.5"},
        {"EDGE_AGENT__MQTT__PORT": "0"},
        {"EDGE_AGENT__MQTT__PORT": " 1884 "},
        {"EDGE_AGENT__MQTT__PORT": "[1]"},
        {"EDGE_AGENT__MQTT__PORT": "[1"},
        {"EDGE_AGENT__MQTT__TLS": "maybe"},
        {"EDGE_AGENT__MQTT__TLS": "yes"},
        {"EDGE_AGENT__FORWARD__GZIP": "2"},
        {"EDGE_AGENT__FORWARD__TIMEOUT_S": "soon"},
        {"EDGE_AGENT__FORWARD__TIMEOUT_S": "0"},
        {"EDGE_AGENT__BUFFER__SYNCHRONOUS": "sometimes"},
        {"EDGE_AGENT__BUFFER__MAX_BYTES": "1KiB"},
        {"EDGE_AGENT__MQTT__HOTS": "10.0.0.5"},
        {"EDGE_AGENT__NOPE": "1"},
        {"EDGE_AGENT__MQTT": "5"},
        {"EDGE_AGENT__MQTT": '{"port": 0}'},
        {"EDGE_AGENT__MQTT__PASSWORD": "hunter2", "EDGE_AGENT__MQTT__PASSWORD_FILE": "/x"},
        {"EDGE_AGENT__FORWARD__TOKEN": "s3cr3t", "EDGE_AGENT__FORWARD__TIMEOUT_S": "x"},
        {"EDGE_AGENT__GATEWAY_ID": ""},
        {"EDGE_AGENT__STREAMS": "[]"},
        {"EDGE_AGENT__STREAMS": "a/{camera}"},
        {"EDGE_AGENT__STREAMS": '[{"topic": "a/{camera}/{stream}", "numeric": ["v", 5]}]'},
        {"EDGE_AGENT__STREAMS": '{"topic": "a/{camera}/{stream}"}'},
        {"EDGE_AGENT__MQTT__PORT": "1884", "edge_agent__mqtt__port": "1885"},
        {
            "EDGE_AGENT__STREAMS": '[{"topic": "a/{camera}/{stream}"}]',
            "EDGE_AGENT__STREAMS__0__TOPIC": "b/{camera}/{stream}",
        },
        {"EDGE_AGENT__MQTT__SESSION_EXPIRY_S": "99999999999999999999"},
        {"EDGE_AGENT__AGGREGATE__MAX_CAMERAS": "99999999999999999999", "EDGE_AGENT__ZZZ": "1"},
    ]
    for env in envs:
        yield {"toml": SENTINEL + BASE, "env": env}


def cases() -> list[dict[str, Any]]:
    """Every case, in a stable order."""
    groups = (_field_cases, _lax_cases, _string_cases, _secret_cases, _cross_cases,
              _stream_cases, _combined_cases, _env_cases)  # fmt: skip
    return [case for group in groups for case in group()]


def run_case(case: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """stderr of `check-config` on the case, one entry per line, the file's path as <config>."""
    for name in list(os.environ):
        if name.upper().startswith("EDGE_AGENT__"):
            monkeypatch.delenv(name)
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, value)
    cfg = tmp_path / "bad.toml"
    cfg.write_bytes(case["toml"].encode("utf-8", "surrogateescape"))
    return _check_config(cfg).replace(str(cfg), "<config>").splitlines()


def _check_config(cfg: Path) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["check-config", "--config", str(cfg)])
    assert code == 2, err.getvalue()
    return err.getvalue()


def _golden() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize("case", _golden(), ids=lambda c: str(c["id"]))
def test_config_error_messages_match_the_golden_file(
    case: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = run_case(case, tmp_path, monkeypatch)
    assert lines == case["stderr"]
    assert all(line.startswith("config error: ") for line in lines)
    assert not any(s in line for line in lines for s in ("hunter2", "s3cr3t", "Traceback"))


def test_the_golden_file_holds_every_case() -> None:
    recorded = [{k: v for k, v in c.items() if k in ("toml", "env")} for c in _golden()]
    assert recorded == cases(), (
        "cases changed: regenerate with python -m tests.config.test_config_messages"
    )


def _write_golden(tmp_path: Path) -> None:
    out = []
    with pytest.MonkeyPatch.context() as mp:
        for i, case in enumerate(cases()):
            out.append({"id": i, **case, "stderr": run_case(case, tmp_path, mp)})
    GOLDEN.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        _write_golden(Path(d))

"""Configs an adversarial tester found that crashed the loader (a traceback, exit 1) or that
`check-config` accepted and `run` then crashed on or never delivered with. The rule: a bad
config names the key, what was given and what is allowed, and exits 2; never a traceback. Under
systemd `check-config --quiet` is ExecStartPre, so what it accepts and `run` cannot use is a
crash loop."""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path

import pytest
import trustme

from agent.cli.main import main
from agent.config.settings import MQTT_MAX_PACKET_BYTES, Section, Settings, load_settings
from agent.core.errors import ConfigError
from agent.intake.ingest import connect_properties, max_packet_bytes
from tests.helpers import deny_stat

ROOT = Path(__file__).resolve().parents[2]
I64_MAX = 2**63 - 1


def problems(tmp_path: Path, toml: str) -> list[str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    return e.value.problems


def base(tmp_path: Path, body: str = "") -> str:
    return f'gateway_id = "gw"\n{body}\n[buffer]\npath = "{tmp_path}/buffer.sqlite3"\n'


def check_config(tmp_path: Path, toml: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    rc = main(
        ["check-config", "--quiet", "--config", str(cfg), "--service-user", getpass.getuser()]
    )
    return rc, capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A: the loader itself crashed.


@pytest.mark.parametrize("unit", ["KiB", "", "TiB"])
def test_a_size_with_hundreds_of_digits_is_refused_naming_the_largest(
    tmp_path: Path, unit: str
) -> None:
    size = "1" * 400 + unit
    [p] = problems(tmp_path, base(tmp_path, f'[forward]\nmax_batch_bytes = "{size}"\n'))
    assert (
        p == f"forward.max_batch_bytes = '{size}': Input should be less than or equal to {I64_MAX}"
    )


def test_a_size_with_hundreds_of_digits_from_the_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT__BUFFER__MAX_BYTES", "1" * 400 + "TiB")
    [p] = problems(tmp_path, 'gateway_id = "gw"\n')
    assert p.startswith("buffer.max_bytes = '1111")
    assert p.endswith(f"TiB': Input should be less than or equal to {I64_MAX}")
    # Thousands of digits (past int()'s own limit) too.
    monkeypatch.setenv("EDGE_AGENT__BUFFER__MAX_BYTES", "9" * 5000 + ".5")
    [p] = problems(tmp_path, 'gateway_id = "gw"\n')
    assert p.endswith(f": Input should be less than or equal to {I64_MAX}")


def test_sizes_keep_their_exact_values() -> None:
    from agent.config.settings import parse_size

    assert parse_size("1.5MiB") == 1572864
    assert parse_size("0.5KiB") == 512
    assert parse_size(" 2gb ") == 2 * 1000**3
    assert parse_size("4.35MB") == 4350000  # float arithmetic made this 4349999


def test_a_float_key_given_a_huge_integer_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = "9" * 400
    [p] = problems(tmp_path, base(tmp_path, f"[mqtt]\nreconnect_max_s = {big}\n"))
    assert p == f"mqtt.reconnect_max_s = {big}: Input should be a finite number"
    monkeypatch.setenv("EDGE_AGENT__MQTT", f'{{"connect_timeout_s": {big}}}')
    [p] = problems(tmp_path, base(tmp_path))
    assert p == f"mqtt.connect_timeout_s = {big}: Input should be less than or equal to 300"


def test_env_json_nested_too_deep_is_one_line_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT__STREAMS", "[" * 50000)
    [p] = problems(tmp_path, base(tmp_path))
    assert p.startswith("EDGE_AGENT__STREAMS: ")
    assert "nested too deeply" in p


def test_toml_nested_too_deep_is_one_line(tmp_path: Path) -> None:
    [p] = problems(tmp_path, base(tmp_path, "x = " + "[" * 3000 + "]" * 3000))
    assert p == f"config file '{tmp_path}/c.toml' is not valid TOML: nested too deeply"


def test_moderately_deep_values_are_named_not_crashed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for depth in (200, 400, 600, 800, 950):
        monkeypatch.setenv("EDGE_AGENT__MQTT__PORT", "[" * depth + "]" * depth)
        try:
            load_settings(None, overrides={"gateway_id": "gw"})
        except ConfigError as e:
            assert len(e.problems) == 1
            assert e.problems[0].startswith(("mqtt.port", "EDGE_AGENT__MQTT__PORT"))
        cfg = tmp_path / f"d{depth}.toml"
        cfg.write_text(base(tmp_path, "[mqtt]\nport = " + "[" * depth + "]" * depth))
        monkeypatch.delenv("EDGE_AGENT__MQTT__PORT")
        with pytest.raises(ConfigError):
            load_settings(cfg)


# B: check-config accepted, `run` crashed.


def test_max_payload_bytes_is_bounded_by_mqtts_largest_packet(tmp_path: Path) -> None:
    assert MQTT_MAX_PACKET_BYTES == 268_435_455  # paho's and MQTT's bound on the property
    largest = MQTT_MAX_PACKET_BYTES - 64 * 1024
    [p] = problems(tmp_path, base(tmp_path, '[mqtt]\nmax_payload_bytes = "256MiB"\n'))
    assert p == (
        f"mqtt.max_payload_bytes = '256MiB': Input should be less than or equal to {largest} "
        "(MQTT's largest packet, 268435455 bytes, less 64 KiB for the topic and properties)"
    )
    s = load_settings(None, overrides={"gateway_id": "gw", "mqtt": {"max_payload_bytes": largest}})
    assert max_packet_bytes(s.mqtt) == 268_435_455
    connect_properties(s.mqtt)  # paho takes it (it refused 268435460)
    assert max_packet_bytes(s.mqtt.model_copy(update={"max_payload_bytes": 2**40})) == 268_435_455


@pytest.mark.parametrize("host", ["", "a..b", "x" * 64 + ".example", " "])
def test_an_unusable_mqtt_host_is_refused(tmp_path: Path, host: str) -> None:
    [p] = problems(tmp_path, base(tmp_path, f'[mqtt]\nhost = "{host}"\n'))
    assert p == f"mqtt.host = {host!r}: expected a host name or IP address, e.g. '127.0.0.1'"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "broker.local", "mqtt-1.site.example"])
def test_usual_mqtt_hosts_are_accepted(host: str) -> None:
    s = load_settings(None, overrides={"gateway_id": "gw", "mqtt": {"host": host}})
    assert s.mqtt.host == host


def test_a_ca_file_that_is_no_certificate_is_refused_by_check_config_and_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("garbage\n")
    toml = base(tmp_path, f'[mqtt]\ntls = true\nca_file = "{garbage}"\n')
    rc, err = check_config(tmp_path, toml, capsys)
    line = f"config error: mqtt.ca_file = '{garbage}': not a PEM certificate (no certificate or crl found)"
    assert (rc, err.splitlines()) == (2, [line])
    monkeypatch.setenv("EDGE_AGENT__HEALTH__LISTEN", f"127.0.0.1:{free_port()}")
    assert main(["run", "--config", str(tmp_path / "c.toml")]) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert not (tmp_path / "buffer.sqlite3").exists()


def test_forward_tls_files_are_loaded_when_the_url_is_https(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("garbage\n")
    fwd = f'[forward]\nca_file = "{garbage}"\n'
    # Not used over http: not loaded.
    assert check_config(tmp_path, base(tmp_path, fwd), capsys)[0] == 0
    rc, err = check_config(tmp_path, base(tmp_path, fwd + 'url = "https://c.example/in"\n'), capsys)
    assert rc == 2
    assert f"config error: forward.ca_file = '{garbage}': not a PEM certificate" in err
    # A good CA and a client certificate whose key does not match it.
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "good-ca.pem"))
    ca.issue_cert("a.example").cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    ca.issue_cert("b.example").private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    mqtt = (
        f'[mqtt]\nca_file = "{tmp_path}/good-ca.pem"\ncert_file = "{tmp_path}/c.pem"\n'
        f'key_file = "{tmp_path}/k.pem"\n'
    )
    rc, err = check_config(tmp_path, base(tmp_path, mqtt), capsys)
    assert rc == 2
    assert (
        f"config error: mqtt.cert_file = '{tmp_path}/c.pem', mqtt.key_file = '{tmp_path}/k.pem': "
        "not a PEM certificate and its private key (key values mismatch)" in err
    )


def test_a_password_file_that_is_not_utf8_is_refused_by_check_config_and_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe")
    toml = base(tmp_path, f'[mqtt]\nusername = "u"\npassword_file = "{pw}"\n')
    rc, err = check_config(tmp_path, toml, capsys)
    line = f"config error: mqtt.password_file = '{pw}': not UTF-8 text"
    assert (rc, err.splitlines()) == (2, [line])
    monkeypatch.setenv("EDGE_AGENT__HEALTH__LISTEN", f"127.0.0.1:{free_port()}")
    assert main(["run", "--config", str(tmp_path / "c.toml")]) == 2
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/ingest\n", "http://h/in\x01", "http://h/\x7f", "http://h\t/"]
)
def test_a_url_with_a_control_character_is_refused(tmp_path: Path, url: str) -> None:
    toml = base(tmp_path, f"[forward]\nurl = {json.dumps(url)}\n")
    [p] = problems(tmp_path, toml)
    assert p == (
        f"forward.url = {url!r}: expected an http:// or https:// URL without control characters"
    )


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "a..example"])
def test_a_url_whose_host_no_resolver_takes_is_refused(tmp_path: Path, host: str) -> None:
    # Accepted, it ran and never delivered: every send failed before leaving the gateway.
    url = f"http://{host}/in"
    [p] = problems(tmp_path, base(tmp_path, f'[forward]\nurl = "{url}"\n'))
    assert p == (
        f"forward.url = {url!r}: expected an http:// or https:// URL whose host is an IP "
        "address or a name of dot-separated labels of 1-63 characters"
    )
    load_settings(None, overrides={"gateway_id": "gw", "forward": {"url": "https://[::1]:8443/x"}})


def test_a_topic_longer_than_mqtt_allows_is_refused(tmp_path: Path) -> None:
    topic = "a" * 70000 + "/{camera}"
    [p] = problems(tmp_path, base(tmp_path, f'[[streams]]\ntopic = "{topic}"\nname = "x"\n'))
    assert p.startswith("streams[0].topic = 'aaaa")
    assert p.endswith(
        "/{camera}': a topic is at most 65535 bytes of UTF-8 (MQTT's limit), not 70009"
    )
    # At the limit: accepted.
    topic = "a" * (65535 - len("/{camera}")) + "/{camera}"
    load_settings(None, overrides={"gateway_id": "gw", "streams": [{"topic": topic, "name": "x"}]})


def test_a_path_with_nul_is_refused(tmp_path: Path) -> None:
    [p] = problems(tmp_path, f'gateway_id = "gw"\n[buffer]\npath = "{tmp_path}/b\\u0000.db"\n')
    assert p == f"buffer.path = '{tmp_path}/b\\x00.db': Input should not contain NUL (U+0000)"


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("EDGE_AGENT__MQTT__CLIENT_ID", "mqtt.client_id"),
        ("EDGE_AGENT__MQTT__USERNAME", "mqtt.username"),
        ("EDGE_AGENT__MQTT__HOST", "mqtt.host"),
        ("EDGE_AGENT__GATEWAY_ID", "gateway_id"),
        ("EDGE_AGENT__MQTT__PASSWORD", "mqtt.password"),
    ],
)
def test_text_that_is_not_utf8_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, key: str
) -> None:
    # os.environ holds undecodable bytes as lone surrogates (surrogateescape).
    monkeypatch.setenv(variable, "edge-\udcff")
    [p] = problems(tmp_path, base(tmp_path))
    shown = "***" if "password" in key else "'edge-\\udcff'"
    assert p == f"{key} = {shown}: Input should be UTF-8 text (it holds bytes that are not UTF-8)"


def test_a_topic_that_is_not_utf8_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT__STREAMS", '[{"topic": "a\\udcff/{camera}", "name": "x"}]')
    [p] = problems(tmp_path, base(tmp_path))
    assert p.startswith("streams[0].topic = ")
    assert p.endswith("Input should be UTF-8 text (it holds bytes that are not UTF-8)")


def _float_keys() -> list[tuple[str, str]]:
    keys = []
    for name, section in Settings.model_fields.items():
        cls = section.annotation
        if isinstance(cls, type) and issubclass(cls, Section):
            for key, f in cls.model_fields.items():
                if f.annotation is float:
                    keys.append((name, key))
    return keys


def test_every_float_key_is_found() -> None:
    assert len(_float_keys()) == 20
    assert ("forward", "backoff_min_s") in _float_keys()


@pytest.mark.parametrize(("section", "key"), _float_keys())
@pytest.mark.parametrize("value", ["inf", "nan", '"inf"', '"1e999"'])
def test_every_float_key_refuses_infinity_and_nan(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    [p] = problems(tmp_path, f'gateway_id = "gw"\n[{section}]\n{key} = {value}\n')
    assert p.startswith(f"{section}.{key} = ")
    allowed = ("Input should be a finite number", "should be less than ", "greater than 0")
    assert any(words in p for words in allowed), p


@pytest.mark.parametrize(
    ("section", "key"), [("forward", "backoff_min_s"), ("mqtt", "reconnect_min_s")]
)
def test_infinite_backoff_is_refused_with_the_finite_message(
    tmp_path: Path, section: str, key: str
) -> None:
    [p] = problems(tmp_path, base(tmp_path, f"[{section}]\n{key} = inf\n"))
    assert p == f"{section}.{key} = inf: Input should be a finite number"


# C: accepted, ran, never delivered.


def test_a_gateway_id_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    [p] = problems(tmp_path, f'gateway_id = "gw-test\\n"\n[buffer]\npath = "{tmp_path}/b.db"\n')
    assert p == "gateway_id = 'gw-test\\n': use letters, digits, '.', '_' and '-' only"


@pytest.mark.parametrize("name", ["det\n", "a b", "", "x" * 65])
def test_a_stream_name_the_agent_would_refuse_as_an_id_is_refused(
    tmp_path: Path, name: str
) -> None:
    body = f'[[streams]]\ntopic = "site/{{camera}}/det"\nname = {json.dumps(name)}\n'
    [p] = problems(tmp_path, base(tmp_path, body))
    assert p == f"streams[0].name = {name!r}: an id is 1-64 of A-Z a-z 0-9 . _ -"


def test_a_camera_or_stream_id_with_a_trailing_newline_is_refused_at_run_time() -> None:
    # The same `$` in agent/intake/ingest.py's ID_RE let a topic level "cam-1\n" through as a camera.
    from agent.config.settings import StreamSettings
    from agent.core.reasons import Reject
    from agent.intake.ingest import TopicRouter

    router = TopicRouter([StreamSettings(topic="site/cam/{camera}/{stream}")])
    assert router.route("site/cam/cam-1\n/det") == Reject.bad_camera_id
    assert router.route("site/cam/cam-1/det\n") == Reject.bad_stream_id
    assert router.route("site/cam/cam-1/det") != Reject.bad_camera_id


def test_a_topic_with_nul_is_refused(tmp_path: Path) -> None:
    [p] = problems(
        tmp_path, base(tmp_path, '[[streams]]\ntopic = "a\\u0000b/{camera}"\nname = "x"')
    )
    assert p == "streams[0].topic = 'a\\x00b/{camera}': Input should not contain NUL (U+0000)"


def test_a_username_with_nul_is_refused(tmp_path: Path) -> None:
    [p] = problems(tmp_path, base(tmp_path, '[mqtt]\nusername = "u\\u0000x"\n'))
    assert p == "mqtt.username = 'u\\x00x': Input should not contain NUL (U+0000)"


def test_a_file_only_the_service_user_may_read_is_for_run_to_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.config.preflight as preflight

    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    s = load_settings(None, overrides={"gateway_id": "gw", "mqtt": {"password_file": str(pw)}})

    def denied(*_: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(preflight, "read_secret", denied)
    # check-config, run by an operator: the service user may read it.
    assert preflight.secret_problems(s, as_service=False) == []
    # run: it is the service user, and the session would die of it.
    assert preflight.secret_problems(s) == [f"mqtt.password_file = '{pw}': Permission denied"]


# D: the docs.


def test_the_example_states_the_packet_overhead_the_code_uses() -> None:
    from agent.config.settings import PACKET_OVERHEAD_BYTES

    text = (ROOT / "config.example.toml").read_text()
    assert PACKET_OVERHEAD_BYTES == 64 * 1024
    assert "Maximum Packet Size = this + 64 KiB" in text
    assert "16 KiB" not in text


# E: found by a second adversarial pass (each test failed before its fix).


@pytest.mark.parametrize(
    "url",
    [
        "http://256.1.1.1:8080/x",
        "http://xn--:8080/x",
        "http://\u2603.net/",
        "http://a\u200db.de/",
        "http://127.0.0.1/" + "a" * 70000,
    ],
)
def test_a_url_the_http_client_cannot_parse_is_refused(tmp_path: Path, url: str) -> None:
    # Accepted, `run` died of httpx.InvalidURL at its first batch: a crash loop.
    [p] = problems(tmp_path, base(tmp_path, f"[forward]\nurl = {json.dumps(url)}\n"))
    assert p.startswith(
        f"forward.url = {url!r}: expected an http:// or https:// URL the HTTP client takes ("
    )
    # What it takes stays taken.
    for good in ("http://127.0.0.1:8080/ingest", "https://[::1]:8443/x", "https://h_x.example/"):
        load_settings(None, overrides={"gateway_id": "gw", "forward": {"url": good}})


def test_check_config_connect_with_a_token_the_header_cannot_carry_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # httpx raised UnicodeEncodeError building the header: a traceback.
    token = tmp_path / "token"
    token.write_text("t\u00f6k\u00e9n\n")
    url = f"http://127.0.0.1:{free_port()}/in"
    body = f'[mqtt]\nport = {free_port()}\n[forward]\nurl = "{url}"\ntoken_file = "{token}"\n'
    (tmp_path / "c.toml").write_text(base(tmp_path, body))
    args = ["check-config", "--quiet", "--connect", "--timeout-s", "2"]
    rc = main([*args, "--config", str(tmp_path / "c.toml"), "--service-user", getpass.getuser()])
    err = capsys.readouterr().err
    assert rc == 4, err
    assert (
        f"FAILED  cloud {url}: the cloud token has a character not allowed in an HTTP header "
        "(U+00F6 at position 2; only printable ASCII is)"
    ) in err.splitlines()


@pytest.mark.parametrize(
    ("section", "key", "other"),
    [
        ("mqtt", "password_file", 'username = "u"\n'),
        ("mqtt", "ca_file", ""),
        ("mqtt", "cert_file", "key_file = '{ok}'\n"),
        ("mqtt", "key_file", "cert_file = '{ok}'\n"),
        ("forward", "token_file", ""),
        ("forward", "ca_file", ""),
        ("forward", "cert_file", "key_file = '{ok}'\n"),
        ("forward", "key_file", "cert_file = '{ok}'\n"),
    ],
)
def test_a_file_key_whose_path_cannot_be_examined_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str, key: str, other: str
) -> None:
    # Path.is_file raises for ENAMETOOLONG and EACCES (a directory on the way this user may
    # not search): a traceback in load_settings.
    ok = tmp_path / "ok.pem"
    ok.write_text("x\n")
    long = tmp_path / ("x" * 300)
    body = f"[{section}]\n{key} = '{long}'\n" + other.format(ok=ok)
    [p] = problems(tmp_path, base(tmp_path, body))
    assert p == f"{section}.{key} = '{long}': cannot be examined: File name too long"
    denied = tmp_path / "private" / "f.pem"
    real = Path.is_file

    def is_file(self: Path) -> bool:
        if self == denied:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    body = f"[{section}]\n{key} = '{denied}'\n" + other.format(ok=ok)
    [p] = problems(tmp_path, base(tmp_path, body))
    assert p == f"{section}.{key} = '{denied}': cannot be examined: Permission denied"


def test_an_outbox_file_name_over_255_bytes_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    buffer = tmp_path / ("b" * 300)
    rc, err = check_config(tmp_path, f'gateway_id = "gw"\n[buffer]\npath = "{buffer}"\n', capsys)
    assert (rc, err.splitlines()) == (
        2,
        [f"config error: buffer.path = '{buffer}': File name too long"],
    )


def test_an_outbox_in_a_directory_that_cannot_be_searched_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.config.preflight as preflight

    buffer = tmp_path / "b.sqlite3"
    s = load_settings(None, overrides={"gateway_id": "gw", "buffer": {"path": str(buffer)}})
    deny_stat(monkeypatch, buffer)
    # The service user is this user (ExecStartPre): it cannot enter the directory.
    assert preflight.buffer_problem(s, getpass.getuser()) == (
        f"buffer.path = '{buffer}': the directory '{tmp_path}' cannot be searched: "
        "Permission denied"
    )


def test_buffer_path_memory_is_refused(tmp_path: Path) -> None:
    # SQLite's in-memory database: check-config took it and `run` died of it.
    [p] = problems(tmp_path, 'gateway_id = "gw"\n[buffer]\npath = ":memory:"\n')
    assert p == (
        "buffer.path = ':memory:': expected a file path: ':memory:' is SQLite's in-memory "
        "database, and the outbox must survive a restart"
    )


def test_env_json_deeper_than_the_limit_is_refused_before_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.config.settings import MAX_ENV_JSON_DEPTH, environment_problems

    assert MAX_ENV_JSON_DEPTH == 100  # the README says so
    at, over = ("[" * n + "1" + "]" * n for n in (100, 101))
    assert environment_problems({"EDGE_AGENT__MQTT__PORT": at}) == []
    assert environment_problems({"EDGE_AGENT__MQTT__PORT": over}) == [
        "EDGE_AGENT__MQTT__PORT: the JSON is nested too deeply (more than 100 levels)"
    ]
    # Brackets inside JSON strings are not nesting.
    text = json.dumps([{"topic": "[" * 500 + "{camera}", "name": "x"}])
    assert environment_problems({"EDGE_AGENT__STREAMS": text}) == []


def test_env_json_nested_just_under_the_recursion_limit_is_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # json.loads took it in environment_problems; pydantic-settings' second parse, deeper in
    # the stack, raised RecursionError (exit 1). Where that window lies depends on the stack
    # depth of the caller: every depth up to 1000 is tried.
    line = "EDGE_AGENT__MQTT__PORT: the JSON is nested too deeply (more than 100 levels)"
    for depth in range(101, 1001):
        monkeypatch.setenv("EDGE_AGENT__MQTT__PORT", "[" * depth + "1" + "]" * depth)
        with pytest.raises(ConfigError) as e:
            load_settings(None, overrides={"gateway_id": "gw"})
        assert e.value.problems == [line], depth


@pytest.mark.parametrize("value", ["oops", "after_send:x", "after_send:0", "after_send:"])
def test_a_bad_test_fault_is_a_config_error_for_run_and_check_config(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    value: str,
) -> None:
    monkeypatch.setenv("EDGE_AGENT_TEST_FAULT", value)
    monkeypatch.setenv("EDGE_AGENT__HEALTH__LISTEN", f"127.0.0.1:{free_port()}")
    line = (
        f"config error: EDGE_AGENT_TEST_FAULT = {value!r}: a crash-test hook; expected "
        "<point>[:<n>], a point of mid_checkpoint, after_commit, after_send, stall_checkpoint "
        "and n >= 1, or unset"
    )
    rc, err = check_config(tmp_path, base(tmp_path), capsys)
    assert (rc, err.splitlines()) == (2, [line])
    assert main(["run", "--config", str(tmp_path / "c.toml")]) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert not (tmp_path / "buffer.sqlite3").exists()


def test_a_good_test_fault_still_arms() -> None:
    from agent.app.faults import Faults

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_AGENT_TEST_FAULT", "after_send:2")
        faults = Faults.from_env()
    assert not faults.reached("after_send")
    assert faults.reached("after_send")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (" https://user:SECRET1@127.0.0.1/x", "' https://user:***@127.0.0.1/x'"),
        ("https://user:SE CRET2@127.0.0.1/x", "'https://user:***@127.0.0.1/x'"),
        ("https://user:SE/CRET3@127.0.0.1/x", "'https://user:***@127.0.0.1/x'"),
        ("https://user:SE#CRET5@127.0.0.1/x", "'https://user:***@127.0.0.1/x'"),
        ("https://user:SE?CRET6@127.0.0.1/x", "'https://user:***@127.0.0.1/x'"),
        ("user:SECRET7@127.0.0.1/x", "'user:***@127.0.0.1/x'"),
        (["https://user:SECRET4@127.0.0.1/x"], "***"),
    ],
)
def test_every_shape_of_a_password_in_forward_url_is_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: object, shown: str
) -> None:
    rc, err = check_config(
        tmp_path, base(tmp_path, f"[forward]\nurl = {json.dumps(url)}\n"), capsys
    )
    assert rc == 2
    assert "SECRET" not in err and "CRET" not in err
    [line] = err.splitlines()
    assert line.startswith(f"config error: forward.url = {shown}: ")


def test_a_password_holding_an_at_sign_is_masked_to_the_last_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.config.settings import mask_url

    url = "https://user:p@ss@127.0.0.1/x"
    cfg = tmp_path / "c.toml"
    cfg.write_text(base(tmp_path, f'[forward]\nurl = "{url}"\n'))
    argv = ["check-config", "--config", str(cfg), "--service-user", getpass.getuser(), "--show"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["forward"]["url"] == "https://user:***@127.0.0.1/x"
    assert "ss@" not in out
    assert mask_url("https://tok/en+==@127.0.0.1/x") == "https://***@127.0.0.1/x"
    assert mask_url("http://127.0.0.1:8080/ingest") == "http://127.0.0.1:8080/ingest"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EDGE_AGENT__MQTT", '{"password": "S3CRET-A", "port": 1884'),
        ("EDGE_AGENT__MQTT", '["S3CRET-A", {"password": 1}]'),
        ("EDGE_AGENT__FORWARD", '{"url": "https://u:S3CRET-B@127.0.0.1/x"'),
        ("EDGE_AGENT__FORWARD", "token S3CRET-C"),
    ],
)
def test_a_whole_table_that_may_hold_a_secret_is_not_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    [p] = problems(tmp_path, base(tmp_path))
    section = variable.removeprefix("EDGE_AGENT__").lower()
    assert p.startswith(f"{section} = ***: Input should be a valid dictionary")
    assert "S3CRET" not in p


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mqtt.client_id", "edge\u0007agent"),
        ("mqtt.client_id", "edge\u0085agent"),
        ("mqtt.username", "u\u001b[2J"),
        ("mqtt.username", "u\u007f"),
        ("streams", "site/\u0001/{camera}/{stream}"),
        ("streams", "site/\ufffe/{camera}/{stream}"),
    ],
)
def test_control_characters_the_broker_drops_the_connection_for_are_refused(
    tmp_path: Path, key: str, value: str
) -> None:
    # Mosquitto dropped the connection at CONNECT or SUBSCRIBE; the agent reconnected forever.
    if key == "streams":
        body, key = f"[[streams]]\ntopic = {json.dumps(value)}\n", "streams[0].topic"
    else:
        section, name = key.split(".")
        body = f"[{section}]\n{name} = {json.dumps(value)}\n"
    [p] = problems(tmp_path, base(tmp_path, body))
    bad = next(c for c in value if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or ord(c) == 0xFFFE)
    assert p == (
        f"{key} = {value!r}: expected no control character (U+0001-U+001F, U+007F-U+009F) or "
        f"Unicode noncharacter, which make the broker drop the connection (U+{ord(bad):04X} at "
        f"position {value.index(bad) + 1})"
    )


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("[::1]", "expected an IPv6 address without brackets, e.g. '::1'"),
        (
            "mqtt://127.0.0.1",
            "expected a host name or IP address, not a URL, e.g. '127.0.0.1' (the port goes in "
            "mqtt.port, TLS in mqtt.tls)",
        ),
        (
            "127.0.0.1:1883",
            "expected a host name or IP address without a port, e.g. '127.0.0.1': the port goes "
            "in mqtt.port",
        ),
        (
            "[::1]:1883",
            "expected a host name or IP address without a port, e.g. '::1': the port goes in "
            "mqtt.port",
        ),
        ('"10.0.0.5"', None),
        ("my broker", None),
        ("broker/x", None),
    ],
)
def test_an_mqtt_host_that_is_no_address_or_name_is_refused_saying_what_form(
    tmp_path: Path, host: str, why: str | None
) -> None:
    # Accepted, `run` never connected.
    [p] = problems(tmp_path, base(tmp_path, f"[mqtt]\nhost = {json.dumps(host)}\n"))
    why = why or (
        "expected an IP address (IPv4, or IPv6 without brackets) or a host name of "
        "dot-separated labels of letters, digits, '-' and '_', e.g. '127.0.0.1' or "
        "'broker.local'"
    )
    assert p == f"mqtt.host = {host!r}: {why}"


@pytest.mark.parametrize(
    "host", ["fe80::1%eth0", "broker.local.", "mqtt_1.site", "br\u00f6ker.example", "localhost"]
)
def test_more_mqtt_hosts_are_accepted(host: str) -> None:
    s = load_settings(None, overrides={"gateway_id": "gw", "mqtt": {"host": host}})
    assert s.mqtt.host == host


@pytest.mark.parametrize("key", ["numeric", "categorical"])
def test_a_field_listed_twice_is_refused_naming_it(tmp_path: Path, key: str) -> None:
    # Each listing aggregated it once more: conf.n was 2 for one message in the cloud.
    body = f'[[streams]]\ntopic = "a/{{camera}}/{{stream}}"\n{key} = ["conf", "x", "conf"]\n'
    [p] = problems(tmp_path, base(tmp_path, body))
    assert p == (
        f"streams[0].{key} = ['conf', 'x', 'conf']: list each field once; listed more than "
        "once: ['conf']"
    )


def test_a_password_without_a_user_name_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiomqtt sends a password only with a user name: it was silently never sent.
    [p] = problems(tmp_path, base(tmp_path, '[mqtt]\npassword = "pw"\n'))
    assert p == (
        "mqtt: mqtt.password needs mqtt.username: MQTT sends a password only with a user name"
    )
    pw = tmp_path / "pw"
    pw.write_text("pw\n")
    line = (
        "config error: mqtt: mqtt.password_file needs mqtt.username: MQTT sends a password only "
        "with a user name"
    )
    rc, err = check_config(tmp_path, base(tmp_path, f'[mqtt]\npassword_file = "{pw}"\n'), capsys)
    assert (rc, err.splitlines()) == (2, [line])
    monkeypatch.setenv("EDGE_AGENT__HEALTH__LISTEN", f"127.0.0.1:{free_port()}")
    assert main(["run", "--config", str(tmp_path / "c.toml")]) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    toml = base(tmp_path, f'[mqtt]\nusername = "u"\npassword_file = "{pw}"\n')
    assert check_config(tmp_path, toml, capsys)[0] == 0


def test_a_password_in_the_systemd_credential_without_a_user_name_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    (creds / "mqtt-password").write_text("")  # what the .deb installs: no warning
    assert check_config(tmp_path, base(tmp_path), capsys) == (0, f"config ok: {tmp_path}/c.toml\n")
    (creds / "mqtt-password").write_text("pw\n")
    rc, err = check_config(tmp_path, base(tmp_path), capsys)
    assert rc == 0
    assert err.splitlines()[0] == (
        f"warning: the systemd credential mqtt-password ('{creds}/mqtt-password') holds a "
        "password but mqtt.username is not set: MQTT sends a password only with a user name, so "
        "it is not sent; set mqtt.username, or empty the credential"
    )
    assert check_config(tmp_path, base(tmp_path, '[mqtt]\nusername = "u"\n'), capsys)[1] == (
        f"config ok: {tmp_path}/c.toml\n"
    )


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("", "the token is empty"),
        ("   ", "the token is only whitespace"),
        (
            "t\u00f6k\u00e9n",
            "the token has a character not allowed in an HTTP header (U+00F6 at position 2; "
            "only printable ASCII is)",
        ),
        (
            "a\tb",
            "the token has a character not allowed in an HTTP header (U+0009 at position 2; "
            "only printable ASCII is)",
        ),
    ],
)
def test_an_inline_token_the_agent_would_not_send_is_refused(
    tmp_path: Path, token: str, why: str
) -> None:
    # TokenSource refused it at run time and sent every batch without a token.
    [p] = problems(tmp_path, base(tmp_path, f"[forward]\ntoken = {json.dumps(token)}\n"))
    assert p == f"forward.token = ***: {why}"
    s = load_settings(None, overrides={"gateway_id": "gw", "forward": {"token": " t0ken "}})
    from agent.config.credentials import TokenSource

    assert TokenSource(s.forward.token, None)() == "t0ken"


@pytest.mark.parametrize(("name", "why"), [("", "not found"), (".", "is a directory"),
                                            ("./", "is a directory")])  # fmt: skip
def test_a_config_path_that_names_no_file_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str, why: str
) -> None:
    # Path('') is pydantic-settings' "no file": the defaults ran, silently.
    monkeypatch.setenv("EDGE_AGENT__GATEWAY_ID", "gw")
    assert main(["check-config", "--quiet", "--config", name]) == 2
    assert capsys.readouterr().err.splitlines() == [f"config error: config file {name!r} {why}"]


def test_key_names_cannot_forge_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = base(tmp_path, '"x\\nconfig error: forged" = 1\n"a\\u001b[31mred\\r" = 2\n')
    rc, err = check_config(tmp_path, toml, capsys)
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 2, lines
    assert "\x1b" not in err and "\r" not in err
    assert lines[0].startswith("config error: x\\nconfig error: forged: unknown key (allowed")
    assert lines[1].startswith("config error: a\\x1b[31mred\\r: unknown key (allowed")


def test_variable_names_cannot_forge_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.config.settings import environment_problems

    assert environment_problems({"EDGE_AGENT__\x1b[2J__": "1"}) == [
        "EDGE_AGENT__\\x1b[2J__: an empty name between '__' separators"
    ]
    monkeypatch.setenv("EDGE_AGENT__MQTT__PO\nRT", "1")
    with pytest.raises(ConfigError) as e:
        load_settings(None, overrides={"gateway_id": "gw"})
    [p] = e.value.problems
    assert p.startswith("mqtt.po\\nrt: unknown key")


@pytest.mark.parametrize(
    ("variable", "line"),
    [
        ("EDGE_AGENT__", "EDGE_AGENT__: an empty name between '__' separators"),
        ("EDGE_AGENT__MQTT____PORT", "EDGE_AGENT__MQTT____PORT: an empty name between '__' separators"),
        ("EDGE_AGENT__MQTT__", "EDGE_AGENT__MQTT__: an empty name between '__' separators"),
        ("EDGE_AGENT__STREAMS__0__TOPIC",
         "EDGE_AGENT__STREAMS__0__TOPIC: set streams whole, as JSON: EDGE_AGENT__STREAMS='[...]'"),
        ("EDGE_AGENT__STREAMS__TOPIC",
         "EDGE_AGENT__STREAMS__TOPIC: set streams whole, as JSON: EDGE_AGENT__STREAMS='[...]'"),
    ],
)  # fmt: skip
def test_a_variable_name_that_names_no_key_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, line: str
) -> None:
    monkeypatch.setenv(variable, "1")
    assert problems(tmp_path, base(tmp_path)) == [line]

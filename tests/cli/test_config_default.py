"""Every command finds its config the same way, decided in one place: --config, else
$EDGE_AGENT_CONFIG, else the unit's /etc/edge-agent/config.toml, as the quick start assumes.
And `check-config` prints the effective config only when asked (--show)."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.cli.main import build_parser, config_path
from agent.config.settings import UNIT_CONFIG
from devtools.procs import HOST, Mosquitto, agent_config, free_port, wait_for
from tests.helpers import AgentFactory

# Each command that reads a config, with the arguments it needs besides --config.
COMMANDS = [
    ["run"],
    ["check-config"],
    ["status"],
    ["top"],
    ["tap"],
    ["deadletter", "list"],
    ["deadletter", "show", "7"],
    ["deadletter", "retry", "--all"],
]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def env_with_config(config: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_CONFIG"}
    if config is not None:
        env["EDGE_AGENT_CONFIG"] = str(config)
    return env


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_no_command_needs_config_on_its_command_line(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)  # argparse exits 2 when --config is required
    assert args.config is None


def test_one_place_decides_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_AGENT_CONFIG", raising=False)
    assert str(UNIT_CONFIG) == "/etc/edge-agent/config.toml"
    assert config_path(None) == str(UNIT_CONFIG)
    monkeypatch.setenv("EDGE_AGENT_CONFIG", "/srv/edge.toml")
    assert config_path(None) == "/srv/edge.toml"
    assert config_path("given.toml") == "given.toml"  # --config wins
    monkeypatch.setenv("EDGE_AGENT_CONFIG", "")  # set but empty: not a file name
    assert config_path(None) == str(UNIT_CONFIG)


@pytest.mark.skipif(UNIT_CONFIG.exists(), reason="this machine has the unit's config installed")
@pytest.mark.e2e
def test_a_missing_default_config_is_named_with_what_to_set() -> None:
    for argv in (["tap"], ["deadletter", "list"], ["check-config"], ["run"]):
        r = cli(*argv, env=env_with_config(None))
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.splitlines() == [
            f"config error: config file '{UNIT_CONFIG}' not found (the default; give "
            "--config FILE or set EDGE_AGENT_CONFIG)"
        ], argv
    named = cli("tap", env={**env_with_config(None), "EDGE_AGENT_CONFIG": "/nonexistent.toml"})
    assert named.stderr.splitlines() == [
        "config error: config file '/nonexistent.toml' not found (from EDGE_AGENT_CONFIG)"
    ]


@pytest.mark.e2e
def test_deadletter_reads_the_config_named_by_the_environment(tmp_path: Path) -> None:
    config = agent_config(
        path=tmp_path / "env.toml", gateway_id="gw-env", mqtt_port=free_port(),
        receiver_url=f"http://{HOST}:{free_port()}/ingest",
        buffer_path=tmp_path / "state" / "outbox.sqlite3",
    )  # fmt: skip
    r = cli("deadletter", "list", env=env_with_config(config))
    assert r.returncode == 3, r.stderr  # the config was read: it names an outbox not made yet
    assert r.stderr.strip() == f"no outbox at {tmp_path / 'state' / 'outbox.sqlite3'}"


def test_tap_reads_the_config_named_by_the_environment(broker: Mosquitto, tmp_path: Path) -> None:
    config = agent_config(
        path=tmp_path / "env.toml", gateway_id="gw-env", mqtt_port=broker.port,
        receiver_url=f"http://{HOST}:{free_port()}/ingest", buffer_path=tmp_path / "b.sqlite3",
    )  # fmt: skip
    err = tmp_path / "tap.err"
    with open(err, "w") as err_file:
        tap = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "tap", "--count", "1", "--seconds", "60"],
            stdout=subprocess.PIPE, stderr=err_file, text=True, env=env_with_config(config),
        )  # fmt: skip
    try:
        wait_for(
            lambda: "tap: subscribed" in err.read_text() or tap.poll() is not None,
            timeout_s=15,
            what="tap subscribed",
        )
        assert tap.poll() is None, err.read_text()
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect(HOST, broker.port)
        pub.loop_start()
        payload = json.dumps({"ts": time.time(), "level": 0.5})
        pub.publish("site/cam/cam-001/motion", payload, qos=1).wait_for_publish(timeout=10)
        pub.disconnect()
        pub.loop_stop()
        out, _ = tap.communicate(timeout=30)
    finally:
        if tap.poll() is None:
            tap.kill()
            tap.wait()
    assert tap.returncode == 0, err.read_text()
    assert "cam-001/motion  counted" in out


def test_status_finds_the_agent_through_the_config_named_by_the_environment(
    agents: AgentFactory,
) -> None:
    config = agents.config()
    agents.start(config)
    r = cli("status", env=env_with_config(config))
    assert r.returncode == 0, r.stdout + r.stderr  # its health.listen, not the default port
    assert "gw-test" in r.stdout and r.stdout.rstrip().endswith("READY")
    top = cli("top", "--once", env=env_with_config(config))
    assert top.returncode == 0, top.stdout + top.stderr


def test_check_config_connect_prints_the_verdicts_only(agents: AgentFactory) -> None:
    config = agents.config()
    base = ["check-config", "--config", str(config), "--service-user", getpass.getuser()]
    r = cli(*base, "--connect", "--timeout-s", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # no effective config before the verdicts
    assert [line.split(":")[0] for line in r.stderr.splitlines()] == [
        f"ok  broker {HOST}",
        "ok  cloud http",
        "config ok",
    ]
    shown = cli(*base, "--connect", "--timeout-s", "5", "--show")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["gateway_id"] == "gw-test"
    plain = cli(*base)
    assert plain.returncode == 0 and plain.stdout == ""
    assert plain.stderr == f"config ok: {config}\n"

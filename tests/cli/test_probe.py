"""`check-config --connect` against a private broker and the reference receiver: it says which
one failed and why (closed port, refused credentials, a refused or downgraded subscription),
and never disturbs the running agent's session."""

from __future__ import annotations

import getpass
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devtools.procs import Mosquitto, Receiver, agent_config, free_port, wait_for
from tests.helpers import AgentFactory


def check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", "--config", str(config),
         "--connect", "--timeout-s", "3", "--service-user", getpass.getuser(), *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def lines(r: subprocess.CompletedProcess[str], what: str) -> str:
    return next(s for s in r.stderr.splitlines() if f"  {what} " in s)


def config_for(
    tmp_path: Path, mqtt_port: int, url: str, overrides: dict[str, Any] | None = None
) -> Path:
    (tmp_path / "state").mkdir(exist_ok=True)
    return agent_config(
        path=tmp_path / "probe.toml", gateway_id="gw-probe", mqtt_port=mqtt_port,
        receiver_url=url, buffer_path=tmp_path / "state" / "buffer.sqlite3", overrides=overrides,
    )  # fmt: skip


def test_both_reachable_and_the_running_agent_undisturbed(agents: AgentFactory) -> None:
    config = agents.config()
    agent = agents.start(config)
    r = check(config)
    assert r.returncode == 0, r.stderr
    broker = lines(r, "broker")
    assert broker == (
        f"ok  broker 127.0.0.1:{agents.broker.port}: CONNACK ok, SUBACK granted QoS 1 for "
        "site/cam/+/+"
    )
    cloud = lines(r, "cloud")
    assert cloud.startswith(f"ok  cloud {agents.receiver.url}: plain HTTP, credentials accepted")
    assert r.stderr.rstrip().endswith(f"config ok: {config}")
    # Its own client id and a session that expires at once: the agent was not kicked off.
    doc = wait_for(agent.status, timeout_s=10, what="status")
    assert doc["mqtt"]["connected"] is True
    assert doc["mqtt"]["reconnects"] == 0 and doc["mqtt"]["connect_failures"] == 0
    assert agents.receiver.stats()["chunks"] == 0  # the probe batch stored nothing


@pytest.mark.e2e
def test_closed_ports_say_which_failed(tmp_path: Path) -> None:
    config = config_for(tmp_path, free_port(), f"http://127.0.0.1:{free_port()}/ingest")
    r = check(config)
    assert r.returncode == 4, r.stderr
    assert lines(r, "broker").startswith("FAILED  broker 127.0.0.1:")
    assert "cannot connect" in lines(r, "broker") and "refused" in lines(r, "broker").lower()
    assert lines(r, "cloud").startswith("FAILED  cloud http://127.0.0.1:")
    assert "ConnectError" in lines(r, "cloud")
    assert "config ok" not in r.stderr and "Traceback" not in r.stderr


def test_refused_credentials_and_a_downgraded_subscription(
    tmp_path: Path, receiver: Receiver
) -> None:
    passwords = tmp_path / "mosquitto.passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "agent", "right"],
        check=True, capture_output=True,
    )  # fmt: skip
    locked = Mosquitto(
        tmp_path / "locked", anonymous=False, conf_extra=f"password_file {passwords}\n"
    )
    qos0 = Mosquitto(tmp_path / "qos0", conf_extra="max_qos 0\n")
    locked.start()
    qos0.start()
    try:
        receiver.fault(required_token="t0ken")
        wrong_pw = {"mqtt": {"username": "agent", "password": "wrong-pw"}}
        config = config_for(tmp_path, locked.port, receiver.url, wrong_pw)
        r = check(config)
        assert r.returncode == 4, r.stderr
        assert lines(r, "broker").endswith("CONNACK: broker refused: not authorized (135)")
        cloud = lines(r, "cloud")
        assert "HTTP 401: credentials refused (no token configured: set forward.token_file" in cloud
        assert "wrong-pw" not in r.stdout + r.stderr  # the password stays masked

        config = config_for(tmp_path, qos0.port, receiver.url, wrong_pw)
        r = check(config)
        assert "SUBACK: MQTT subscription 'site/cam/+/+' granted at QoS 0" in lines(r, "broker")
    finally:
        locked.stop()
        qos0.stop()

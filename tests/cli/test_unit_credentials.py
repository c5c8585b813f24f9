"""The quick start's token step outside systemd: `check-config --connect`, `run` and `tap`, run by
hand with the unit's config, read the credentials from the files the unit's LoadCredential=
loads (/etc/edge-agent/cloud-token, /etc/edge-agent/mqtt-password), and say exactly what to
set when there is none. Real processes against a real Mosquitto and the reference receiver
requiring a token; the gateway's /etc/edge-agent is a directory of the test's."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from pathlib import Path

from devtools.procs import HOST, Agent, Mosquitto, Receiver, agent_config, free_port
from tests.helpers import assert_exact, publish, wait_delivered

TOKEN = "s3cret-t0ken"


def as_the_unit(etc: Path, *argv: str) -> list[str]:
    """`edge-agent ARGV` on a gateway whose /etc/edge-agent is `etc` (the unit's config and
    credential files there), outside systemd."""
    code = (
        "import sys; from pathlib import Path; import agent.config.settings as s\n"
        f"s.UNIT_CONFIG = Path({str(etc / 'config.toml')!r})\n"
        f"s.UNIT_CREDENTIALS_DIR = Path({str(etc)!r})\n"
        "from agent.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *argv]


def outside_systemd() -> dict[str, str]:
    drop = ("CREDENTIALS_DIRECTORY", "EDGE_AGENT_CONFIG")
    return {k: v for k, v in os.environ.items() if k not in drop}


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=outside_systemd())


def gateway(
    tmp_path: Path, mqtt_port: int, url: str, health_port: int | None = None, **mqtt: str
) -> Path:
    """/etc/edge-agent as the package leaves it: the config, empty credential files."""
    etc = tmp_path / "etc-edge-agent"
    etc.mkdir(exist_ok=True)
    (tmp_path / "state").mkdir(exist_ok=True)
    agent_config(
        path=etc / "config.toml", gateway_id="gw-unit", mqtt_port=mqtt_port, receiver_url=url,
        buffer_path=tmp_path / "state" / "buffer.sqlite3", health_port=health_port,
        overrides={"mqtt": mqtt},
    )  # fmt: skip
    for name in ("cloud-token", "mqtt-password"):
        (etc / name).write_text("")
    return etc


def cloud_line(r: subprocess.CompletedProcess[str]) -> str:
    return next(line for line in r.stderr.splitlines() if "  cloud " in line)


def test_check_config_connect_reads_the_token_the_unit_loads(
    broker: Mosquitto, tmp_path: Path
) -> None:
    cloud = Receiver(tmp_path / "cloud", extra=["--token", TOKEN]).start()
    try:
        etc = gateway(tmp_path, broker.port, cloud.url)
        check = ["check-config", "--connect", "--timeout-s", "3", "--service-user",
                 getpass.getuser()]  # fmt: skip
        r = run(as_the_unit(etc, *check))  # no --config: the unit's, as in the quick start
        assert r.returncode == 4, r.stderr
        assert cloud_line(r) == (
            f"FAILED  cloud {cloud.url}: HTTP 401: credentials refused (no token: "
            f"'{etc}/cloud-token' is empty; put the cloud's token there): "
            '{"error": "bad or missing token"}'
        )

        (etc / "cloud-token").write_text(TOKEN + "\n")
        r = run(as_the_unit(etc, *check))
        assert r.returncode == 0, r.stderr
        assert cloud_line(r).startswith(f"ok  cloud {cloud.url}: plain HTTP, credentials accepted")
        assert cloud_line(r).endswith(f"; token from '{etc}/cloud-token')")

        (etc / "cloud-token").unlink()
        r = run(as_the_unit(etc, *check))
        assert r.returncode == 4, r.stderr
        assert cloud_line(r).endswith(
            f"HTTP 401: credentials refused (no token configured: put it in "
            f"'{etc}/cloud-token', which the unit loads, or set forward.token_file): "
            '{"error": "bad or missing token"}'
        )

        # Another config is not the unit's: its token is what it names, and the line says so.
        (etc / "cloud-token").write_text(TOKEN + "\n")
        other = tmp_path / "other.toml"
        shutil.copy(etc / "config.toml", other)
        r = run(as_the_unit(etc, *check, "--config", str(other)))
        assert r.returncode == 4, r.stderr
        assert cloud_line(r).endswith(
            "HTTP 401: credentials refused (no token configured: set forward.token_file; "
            f"'{etc}/cloud-token' is the unit's, read with its config '{etc}/config.toml'): "
            '{"error": "bad or missing token"}'
        )
        assert TOKEN not in r.stdout + r.stderr
    finally:
        cloud.stop()


def test_run_by_hand_sends_the_token_the_unit_loads(broker: Mosquitto, tmp_path: Path) -> None:
    cloud = Receiver(tmp_path / "cloud", extra=["--token", TOKEN]).start()
    health = free_port()
    etc = gateway(tmp_path, broker.port, cloud.url, health)
    config = etc / "config.toml"
    (etc / "cloud-token").write_text(TOKEN + "\n")
    agent = Agent(config, tmp_path / "agent.log", health)
    agent.args = as_the_unit(etc, "run")  # no --config: the unit's
    agent._env = outside_systemd()
    agent.start()
    try:
        agent.wait_ready()
        expected = publish(broker, tmp_path, cameras=2, rate=5, duration_s=1, seed=23)
        assert_exact(wait_delivered(cloud, expected))
        status = agent.status()
        assert status is not None and status["forward"]["token_problem"] is None
        assert cloud.stats()["injected_failures"] == 0  # never a 401
        assert agent.stop() == 0
    finally:
        agent.kill()
        cloud.stop()


def test_tap_by_hand_sends_the_broker_password_the_unit_loads(tmp_path: Path) -> None:
    passwords = tmp_path / "mosquitto.passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "agent", "right"],
        check=True, capture_output=True,
    )  # fmt: skip
    locked = Mosquitto(
        tmp_path / "locked", anonymous=False, conf_extra=f"password_file {passwords}\n"
    ).start()
    try:
        url = f"http://{HOST}:{free_port()}/ingest"
        etc = gateway(tmp_path, locked.port, url, username="agent")
        r = run(as_the_unit(etc, "tap", "--seconds", "0.5"))
        assert r.returncode == 3, r.stderr  # the installed, empty credential: no password
        assert "broker refused: Not authorized (135)" in r.stderr
        (etc / "mqtt-password").write_text("right\n")
        r = run(as_the_unit(etc, "tap", "--seconds", "0.5"))
        assert r.returncode == 0, r.stderr
        assert "tap: subscribed to site/cam/+/+" in r.stderr
    finally:
        locked.stop()

"""`edge-agent tap` against a private Mosquitto: real publishes, the agent's verdicts, no theft."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devtools.procs import HOST, Mosquitto, agent_config, free_port, wait_for
from tests.helpers import AgentFactory, assert_exact, publish, wait_delivered


class TapProc:
    """`edge-agent tap` as a child process; its stdout and stderr in files to poll."""

    def __init__(
        self, workdir: Path, config: Path, *args: str, sigint_ignored: bool = False
    ) -> None:
        stem = workdir / f"tap-{time.monotonic_ns()}"
        self.out_path, self.err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        argv = [sys.executable, "-m", "agent.cli", "tap", "--config", str(config), *args]
        if sigint_ignored:  # as a background job of a non-interactive shell starts
            argv = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=err, text=True)

    def wait_subscribed(self) -> None:
        def subscribed() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"tap exited: {self.err_path.read_text()}")
            return "tap: subscribed" in self.err_path.read_text()

        wait_for(subscribed, timeout_s=15, what="tap subscribed")

    def lines(self) -> list[str]:
        return self.out_path.read_text().splitlines()

    def result(self, timeout_s: float = 60) -> tuple[int, str, str]:
        """Wait for tap to stop by itself; its exit code, stdout and stderr."""
        rc = self.popen.wait(timeout=timeout_s)
        return rc, self.out_path.read_text(), self.err_path.read_text()


@pytest.fixture
def taps(tmp_path: Path) -> Iterator[Callable[..., TapProc]]:
    started: list[TapProc] = []

    def start(config: Path, *args: str, sigint_ignored: bool = False) -> TapProc:
        started.append(TapProc(tmp_path, config, *args, sigint_ignored=sigint_ignored))
        return started[-1]

    yield start
    for t in started:
        if t.popen.poll() is None:
            t.popen.kill()
        t.popen.wait()


def publisher(broker: Mosquitto) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-pub", protocol=mqtt.MQTTv5)
    c.connect(HOST, broker.port)
    c.loop_start()
    return c


def send(c: mqtt.Client, topic: str, payload: str | bytes) -> None:
    c.publish(topic, payload, qos=1).wait_for_publish(timeout=10)


def config_for(tmp_path: Path, broker: Mosquitto) -> Path:
    return agent_config(
        path=tmp_path / "tap.toml",
        gateway_id="gw-tap",
        mqtt_port=broker.port,
        receiver_url=f"http://{HOST}:{free_port()}/ingest",
        buffer_path=tmp_path / "unused.sqlite3",
    )


def test_tap_shows_the_agents_verdict_skew_unit_and_reject_reason(
    broker: Mosquitto, tmp_path: Path, taps: Callable[..., TapProc]
) -> None:
    cfg = config_for(tmp_path, broker)
    tap = taps(cfg, "--json", "--count", "8", "--seconds", "60")
    tap.wait_subscribed()
    c = publisher(broker)
    now = time.time()
    send(c, "site/cam/cam-001/detections", json.dumps({"ts": int(now * 1000), "cls": "person", "conf": 0.91}))  # fmt: skip
    send(c, "site/cam/cam-001/detections", b"{not json")
    # A camera whose clock is two minutes behind: skew shown, clock suspect (max_skew_s 30).
    send(c, "site/cam/cam-002/motion", json.dumps({"ts": round(now - 120, 3), "level": 0.4, "zone": "door"}))  # fmt: skip
    send(c, "site/cam/bad id/motion", json.dumps({"ts": now}))
    send(c, "site/cam/cam-003/health", json.dumps({"ts": "yesterday", "temp_c": "hot", "status": "ok"}))  # fmt: skip
    send(c, "site/cam/cam-003/health", b"[1, 2]")
    send(c, "site/cam/cam-004/detections", b'{"x": "' + b"a" * (70 * 1024) + b'"}')
    send(c, "other/topic", b"{}")  # not ours: never subscribed, never shown
    send(c, "site/cam/cam-005/detections", json.dumps({"ts": f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}Z", "cls": "car"}))  # fmt: skip
    rc, out, err = tap.result()
    c.disconnect()
    c.loop_stop()
    assert rc == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 8, out

    good = docs[0]
    assert good["counted"] and good["camera"] == "cam-001" and good["stream"] == "detections"
    assert good["time_unit"] == "ms" and good["time_source"] == "payload"
    assert abs(good["skew_s"]) < 5 and good["flags"] == []
    assert good["numeric"] == {"conf": 0.91} and good["categorical"] == {"cls": "person"}
    assert docs[1] == {**docs[1], "counted": False, "reason": "malformed_json", "camera": "cam-001"}
    # The parser's reason and position, and the payload around it.
    assert docs[1]["error"] == "object keys must be strings" and docs[1]["error_at"] == 1
    assert docs[1]["excerpt"] == "{not json" and docs[1]["excerpt_at"] == 1
    skewed = docs[2]
    assert skewed["counted"] and skewed["time_unit"] == "s"
    assert -125 < skewed["skew_s"] < -119 and skewed["clock_suspect"] is True
    assert skewed["flags"] == ["clock_suspect"]
    assert any("exceeds max_skew_s" in n for n in skewed["notes"])
    assert docs[3]["reason"] == "bad_camera_id" and docs[3]["camera"] is None
    bad_ts = docs[4]
    assert bad_ts["counted"] and bad_ts["time_source"] == "gateway"
    assert bad_ts["flags"] == ["time_from_gateway"] and bad_ts["refused"] == ["temp_c"]
    assert docs[5]["reason"] == "not_an_object"
    assert docs[6]["reason"] == "oversized" and docs[6]["bytes"] > 70 * 1024
    assert docs[7]["time_unit"] == "rfc3339" and abs(docs[7]["skew_s"]) < 5
    assert "tap: 8 messages shown" in err


def test_tap_text_lines_and_camera_filter(
    broker: Mosquitto, tmp_path: Path, taps: Callable[..., TapProc]
) -> None:
    cfg = config_for(tmp_path, broker)
    tap = taps(cfg, "--camera", "cam-002", "--count", "2", "--seconds", "60")
    tap.wait_subscribed()
    c = publisher(broker)
    now = time.time()
    send(c, "site/cam/cam-001/detections", json.dumps({"ts": now, "cls": "dog"}))
    send(c, "site/cam/cam-002/motion", json.dumps({"ts": now - 300, "level": 0.25}))
    send(c, "site/cam/cam-002/motion", b"nope")
    rc, out, err = tap.result()
    c.disconnect()
    c.loop_stop()
    assert rc == 0, err
    lines = out.splitlines()
    assert "site/cam/cam-002/+" in err  # the subscription itself is narrowed
    assert re.search(r"cam-002/motion  counted  t \S+ \(ts=\S+ read as s\)  skew -300\.\d+ s", lines[0]), out  # fmt: skip
    assert "CLOCK SUSPECT" in lines[0] and "level=0.25" in lines[0]
    assert "note: camera cam-002: clock skew -300.0 s exceeds max_skew_s" in out
    rejected = next(line for line in lines if "REJECTED" in line)
    assert re.search(r"cam-002/motion  REJECTED malformed_json  \(4 B\)  invalid character at byte 4$", rejected), out  # fmt: skip
    assert lines[-2:] == ["    payload: nope", "                 ^"]  # the end: the parser's byte 4
    assert "cam-001" not in out


def test_tap_shows_where_and_why_a_payload_is_not_json(
    broker: Mosquitto, tmp_path: Path, taps: Callable[..., TapProc]
) -> None:
    """The one thing a field engineer needs: the parser's reason, its position, and the bytes
    around it, bounded and escaped so that no payload can write to the terminal."""
    tap = taps(config_for(tmp_path, broker), "--count", "4", "--seconds", "60")
    tap.wait_subscribed()
    c = publisher(broker)
    comma = b'{"ts": 1795708369313000, "conf": "0.93", "cls": "person",}'
    send(c, "site/cam/cam-031/detections", comma)
    # A raw ESC in a string (JSON allows none): escaped, the caret under its escape.
    esc = b'{"zone": "door\x1b[2J\x1b[31m", "level": 1}'
    send(c, "site/cam/cam-031/motion", esc)
    # The error 2 KB into 4 KB: an excerpt around it, not the whole payload.
    far = b'{"ts": 1, "pad": "' + b"x" * 2000 + b'", "level": 0.5 "zone": "door\xe2\x82\xac", '
    far += b'"pad2": "' + b"y" * 2000 + b'"}'
    send(c, "site/cam/cam-031/motion", far)
    latin = b'{"zone": "caf\xc3\xa9 \xff"}'  # not UTF-8
    send(c, "site/cam/cam-031/motion", latin)
    rc, out, err = tap.result()
    c.disconnect()
    c.loop_stop()
    assert rc == 0, err
    assert "\x1b" not in out  # not one raw control character reached the terminal
    lines = out.splitlines()
    assert len(lines) == 12, out
    prefix = "    payload: "

    def caret(line: str) -> int:
        assert line.strip() == "^", line
        return len(line) - len(prefix) - 1

    head, excerpt, mark = lines[0:3]
    assert head.endswith(f"cam-031/detections  REJECTED malformed_json  ({len(comma)} B)  trailing comma in object at byte 57")  # fmt: skip
    assert excerpt == prefix + comma.decode() and caret(mark) == 57 and comma[57:58] == b"}"

    head, excerpt, mark = lines[3:6]
    assert head.endswith(f"REJECTED malformed_json  ({len(esc)} B)  invalid character at byte 14")
    assert excerpt == prefix + '{"zone": "door\\x1b[2J\\x1b[31m", "level": 1}'
    assert excerpt[len(prefix) + caret(mark) :].startswith("\\x1b[2J")

    head, excerpt, mark = lines[6:9]
    assert head.endswith(f"({len(far)} B)  expected ',' or '}}' at byte 2034")
    shown = excerpt.removeprefix(prefix)
    assert shown.startswith("…xxx") and shown.endswith("…")  # cut on both sides
    assert len(shown) <= 122  # at most 120 characters of payload
    assert shown[caret(mark) :].startswith('"zone": "door€')

    head, excerpt, mark = lines[9:12]
    assert head.endswith(f"({len(latin)} B)  not UTF-8 (invalid start byte) at byte 16")
    assert excerpt == prefix + '{"zone": "café \\xff"}'
    assert excerpt[len(prefix) + caret(mark) :].startswith("\\xff")


def test_tap_beside_the_agent_takes_nothing_from_it(
    agents: AgentFactory, tmp_path: Path, taps: Callable[..., TapProc]
) -> None:
    """A clean QoS 0 session of its own: the agent still counts every message exactly once."""
    agent = agents.start()
    # Started with SIGINT ignored, as a script's background job is: Ctrl-C must still stop it.
    tap = taps(agents.config(), "--json", sigint_ignored=True)
    tap.wait_subscribed()
    expected = publish(agents.broker, tmp_path, cameras=5, rate=10, duration_s=2, seed=41)
    total = sum(e.count for e in expected.values())
    assert_exact(wait_delivered(agents.receiver, expected))
    wait_for(lambda: len(tap.lines()) >= total, timeout_s=20, what=f"{total} tap lines")
    tap.popen.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, exit 0
    rc, out, err = tap.result()
    assert rc == 0, err
    assert f"tap: {total} messages shown" in err and "Traceback" not in err
    docs: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == total and all(d["counted"] for d in docs)
    assert {d["camera"] for d in docs} == {f"cam-{i:03d}" for i in range(5)}
    log = agents.broker.log_text()
    tap_ids = re.findall(r"New client connected from \S+ as (edge-agent-tap-\d+) \(p5, c1", log)
    assert len(tap_ids) == 1, log  # MQTT v5, clean start
    assert "as edge-agent-test (p5, c0" in log  # the agent's own persistent session
    status = agent.status()
    assert status is not None and status["ingest"]["counted"] == total
    assert agent.stop() == 0


@pytest.mark.e2e
def test_tap_bad_input_and_unreachable_broker(tmp_path: Path) -> None:
    cfg = agent_config(
        path=tmp_path / "a.toml",
        gateway_id="gw-tap",
        mqtt_port=free_port(),  # nothing listens there
        receiver_url=f"http://{HOST}:{free_port()}/ingest",
        buffer_path=tmp_path / "b.sqlite3",
    )

    def tap(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "tap", "--config", str(cfg), *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    bad_camera = tap("--camera", "cam/1")
    assert bad_camera.returncode == 2 and "--camera 'cam/1'" in bad_camera.stderr
    no_stream = tap("--stream", "audio")  # the default pattern has a {stream} level: fine
    assert no_stream.returncode == 3, no_stream.stderr  # ...so it gets as far as the broker
    named = cfg.with_name("named.toml")
    named.write_text(cfg.read_text() + '[[streams]]\ntopic = "site/{camera}/det"\nname = "det"\n')
    no_stream = subprocess.run(
        [sys.executable, "-m", "agent.cli", "tap", "--config", str(named), "--stream", "audio"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert no_stream.returncode == 2
    assert "--stream 'audio': no [[streams]] entry carries that stream" in no_stream.stderr
    bad_count = tap("--count", "0")
    assert bad_count.returncode == 2 and "--count" in bad_count.stderr
    bad_seconds = tap("--seconds", "soon")
    assert bad_seconds.returncode == 2 and "--seconds" in bad_seconds.stderr
    down = tap("--seconds", "1")
    assert down.returncode == 3
    assert "cannot connect to the broker at 127.0.0.1:" in down.stderr
    assert "Traceback" not in down.stderr


def test_unit_of_names_the_unit_parse_event_time_reads() -> None:
    from agent.intake.timekeeping import parse_event_time, unit_of

    for value, unit in [
        (1_764_126_000, "s"), (1_764_126_000.5, "s"), (1_764_126_000_123, "ms"),
        (1_764_126_000_123_456, "us"), (1_764_126_000_123_456_789, "ns"),
        ("2026-11-26T03:00:00Z", "rfc3339"),
    ]:  # fmt: skip
        assert unit_of(value, "auto") == unit, value
        assert abs(parse_event_time(value, unit) - parse_event_time(value, "auto")) < 1e-3
    assert unit_of(1_764_126_000_123, "s") == "s"  # a configured unit is what is read
    assert unit_of(True, "auto") == "auto" and unit_of(10**400, "auto") == "auto"


def test_tap_rides_out_a_broker_restart(
    broker: Mosquitto, tmp_path: Path, taps: Callable[..., TapProc]
) -> None:
    tap = taps(config_for(tmp_path, broker), "--count", "2", "--seconds", "60")
    tap.wait_subscribed()
    c = publisher(broker)
    send(c, "site/cam/cam-001/motion", json.dumps({"ts": time.time(), "level": 0.5}))
    wait_for(lambda: len(tap.lines()) == 1, timeout_s=10, what="the first line")
    c.disconnect()
    c.loop_stop()
    broker.stop()
    wait_for(lambda: "connection to the broker lost" in tap.err_path.read_text(), timeout_s=10, what="tap to notice")  # fmt: skip
    broker.start()
    # tap reconnects and subscribes again by itself: publish until a message gets through.
    c = publisher(broker)

    def second_line() -> bool:
        send(c, "site/cam/cam-002/motion", json.dumps({"ts": time.time(), "level": 0.7}))
        return tap.popen.poll() is not None

    wait_for(second_line, timeout_s=30, what="a message after the restart", poll_s=0.5)
    rc, out, err = tap.result()
    c.disconnect()
    c.loop_stop()
    assert rc == 0, err
    assert "cam-002/motion  counted" in out.splitlines()[1]


def test_tap_stops_cleanly_on_sigterm(
    broker: Mosquitto, tmp_path: Path, taps: Callable[..., TapProc]
) -> None:
    """`timeout 60 edge-agent tap` ends it with SIGTERM: a clean stop with its summary."""
    tap = taps(config_for(tmp_path, broker))
    tap.wait_subscribed()
    tap.popen.send_signal(signal.SIGTERM)
    rc, _out, err = tap.result(timeout_s=20)
    assert rc == 0, err
    assert "tap: 0 messages shown" in err and "Traceback" not in err

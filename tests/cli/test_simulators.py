"""The local stand-ins as an operator runs them: `simulate cloud --token` refuses a request
without the bearer token; `simulate cameras` stopped by SIGTERM (`timeout 60 edge-agent
simulate cameras …`, systemd, a test harness) ends like Ctrl-C: its publishes flushed to
--record and its summary printed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.core.model import Chunk
from agent.sim.cameras import read_record
from devtools.procs import HOST, Mosquitto, Receiver, wait_for


def batch(gateway: str = "gw-sim") -> dict[str, object]:
    c = Chunk("cam-1", "motion", 1_795_708_369, 1)
    c.add_times(1_795_708_369.5, 1_795_708_369.6)
    chunk = {"seq": 1, **c.to_wire()}
    return {"schema": "edge-agent/v1", "gateway": gateway, "first_seq": 1, "last_seq": 1,
            "sent_at": "2026-11-26T15:52:49.000Z", "chunks": [chunk]}  # fmt: skip


@pytest.mark.e2e
def test_simulate_cloud_token_requires_the_bearer_token(tmp_path: Path) -> None:
    cloud = Receiver(tmp_path / "cloud", extra=["--token", "t0ken"]).start()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "t0ken"}):
            r = httpx.post(cloud.url, json=batch(), headers=headers, timeout=10)
            assert r.status_code == 401, headers
            assert r.json() == {"error": "bad or missing token"}
        r = httpx.post(cloud.url, json=batch(), headers={"Authorization": "Bearer t0ken"})
        assert r.status_code == 200 and r.json() == {"stored": 1, "duplicates": 0}
        assert cloud.stats()["chunks"] == 1
    finally:
        cloud.stop()
    assert "listening on" in cloud.log_text() and "t0ken" not in cloud.log_text()


class Counter:
    """Counts what the broker delivers on the cameras' topics."""

    def __init__(self, broker: Mosquitto) -> None:
        self.n = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("site/cam/#", qos=0)
        self.client.connect(HOST, broker.port)
        self.client.loop_start()

    def _on_message(self, *_: object) -> None:
        with self._lock:
            self.n += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def counter(broker: Mosquitto) -> Iterator[Counter]:
    c = Counter(broker)
    wait_for(lambda: c.client.is_connected(), timeout_s=10, what="the counting subscriber")
    yield c
    c.close()


class Cameras:
    """`edge-agent simulate cameras` as a child process."""

    def __init__(self, broker: Mosquitto, workdir: Path, *args: str) -> None:
        self.record = workdir / "published.jsonl"
        self.err = workdir / "cameras.err"
        with open(self.err, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "simulate", "cameras",
                 "--broker", f"{HOST}:{broker.port}", "--record", str(self.record), *args],
                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
            )  # fmt: skip

    def stop(
        self, sig: int = signal.SIGTERM, *, group: bool = False
    ) -> tuple[int, dict[str, object], str]:
        """`sig` to the simulator, or (`group`) to its whole process group, as `timeout` and
        a terminal's Ctrl-C send it: its publishing processes get it straight too."""
        if group:
            os.killpg(self.popen.pid, sig)
        else:
            self.popen.send_signal(sig)
        try:
            out, _ = self.popen.communicate(timeout=60)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()
        summary = json.loads(out) if out.strip() else {}
        return self.popen.returncode, summary, self.err.read_text()


def test_simulate_cameras_stopped_by_sigterm_flushes_its_record_and_summarises(
    broker: Mosquitto, counter: Counter, tmp_path: Path
) -> None:
    cams = Cameras(broker, tmp_path, "--cameras", "6", "--rate", "20", "--duration", "600",
                   "--processes", "2")  # fmt: skip
    wait_for(lambda: counter.n >= 100 or cams.popen.poll() is not None, timeout_s=30,
             what="the cameras publishing")  # fmt: skip
    rc, summary, err = cams.stop(signal.SIGTERM)
    assert rc == 0, err
    assert summary["stopped_by"] == "SIGTERM" and summary["failed"] == 0, summary
    acked = summary["acked"]
    assert isinstance(acked, int) and acked >= 100
    assert summary["published"] == acked
    rows = read_record(cams.record)
    assert len(rows) == acked  # every acknowledged publish, flushed
    assert not list(tmp_path.glob("published.*.jsonl"))  # the per-process parts merged
    assert "Traceback" not in err


def test_simulate_cameras_stopped_as_it_starts_still_ends_cleanly(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """The stop may reach the publishing processes before they are ready for it."""
    cams = Cameras(broker, tmp_path, "--cameras", "6", "--rate", "20", "--duration", "600",
                   "--processes", "3")  # fmt: skip
    wait_for(lambda: "simulate cameras:" in cams.err.read_text() or cams.popen.poll() is not None,
             timeout_s=30, what="the simulator's first line")  # fmt: skip
    rc, summary, err = cams.stop(signal.SIGTERM)
    assert rc == 0, err
    assert summary["stopped_by"] == "SIGTERM" and summary["failed"] == 0, summary
    assert len(read_record(cams.record)) == summary["acked"]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
    ids=["SIGINT", "Ctrl-C to the group", "SIGTERM to the group (timeout)"],
)
def test_simulate_cameras_stopped_by_ctrl_c_or_timeout_likewise(
    broker: Mosquitto, counter: Counter, tmp_path: Path, sig: signal.Signals, group: bool
) -> None:
    cams = Cameras(broker, tmp_path, "--cameras", "4", "--rate", "20", "--duration", "600",
                   "--processes", "3")  # fmt: skip
    wait_for(lambda: counter.n >= 50 or cams.popen.poll() is not None, timeout_s=30,
             what="the cameras publishing")  # fmt: skip
    rc, summary, err = cams.stop(sig, group=group)
    assert rc == 0, err
    assert summary["stopped_by"] == sig.name and summary["failed"] == 0, summary
    assert len(read_record(cams.record)) == summary["acked"]
    assert "Traceback" not in err

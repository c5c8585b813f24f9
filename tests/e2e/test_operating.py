"""The operating surface of a running agent: endpoints, metrics, sd_notify, `edge-agent status`."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agent.cli.exitcodes import Exit
from devtools.procs import HOST, wait_for
from tests.helpers import AgentFactory, assert_exact, publish, wait_delivered


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes, str]:
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while True:
            part = s.recv(65536)
            if not part:
                break
            chunks.append(part)
    return b"".join(chunks)


def test_endpoints_of_a_running_agent(agents: AgentFactory, tmp_path: Path) -> None:
    agent = agents.start()
    port = agent.health_port
    expected = publish(agents.broker, tmp_path, cameras=10, rate=10, duration_s=2, seed=31)
    assert_exact(wait_delivered(agents.receiver, expected))

    assert get(port, "/healthz")[0] == 200
    status, body, ctype = get(port, "/readyz")
    assert status == 200 and json.loads(body) == {"ok": True, "problems": []}
    status, body, ctype = get(port, "/status")
    assert status == 200 and ctype == "application/json"
    doc = json.loads(body)
    assert doc["gateway_id"] == "gw-test" and doc["ready"] is True
    assert doc["mqtt"]["connected"] is True and doc["mqtt"]["since"] is not None
    assert doc["ingest"]["counted"] == sum(e.count for e in expected.values())
    assert doc["cameras"]["count"] == 10
    assert "by_id" not in doc["cameras"]  # the summary: its size does not grow with the site
    status, body, ctype = get(port, "/status/cameras")
    assert status == 200 and ctype == "application/json"
    cameras = json.loads(body)
    assert cameras["count"] == 10 and len(cameras["by_id"]) == 10
    cam = cameras["by_id"]["cam-000"]
    assert cam["messages"] > 0 and abs(cam["skew_s"]) < 5 and cam["flags"] == []
    assert doc["outbox"]["chunks"] == 0 and doc["outbox"]["next_seq"] > 1
    assert doc["forward"]["batches_sent"] > 0 and doc["forward"]["last_success_age_s"] is not None

    status, body, ctype = get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    counted = families["edge_agent_messages_counted"].samples[0].value
    assert counted == doc["ingest"]["counted"]
    assert families["edge_agent_batch_latency_seconds"].type == "histogram"
    assert families["edge_agent_outbox_chunks"].samples[0].value == 0
    labels = {s.labels.get("reason") for f in families.values() for s in f.samples}
    assert not any(str(lb).startswith("cam-") for lb in labels)  # no per-camera labels

    assert get(port, "/nope")[0] == 404
    assert get(port, "/status", method="POST")[0] == 405
    assert raw(port, b"BLAH\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(port, b"GET /status HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n").startswith(
        b"HTTP/1.1 400"
    )
    for path in ("/status", "/status/cameras", "/readyz", "/metrics", "/nope"):
        head = get(port, path, method="HEAD")
        assert head[0] == get(port, path)[0] and head[1] == b"", path
    assert get(port, "/healthz")[0] == 200  # still serving after the bad requests
    assert "Traceback" not in agent.log_text()
    assert agent.stop() == 0


def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_status_command_exit_codes(agents: AgentFactory) -> None:
    agent = agents.start()
    url = f"http://{HOST}:{agent.health_port}"
    ok = status_cli("--url", url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "READY" in ok.stdout and "gw-test" in ok.stdout
    agents.receiver.fault(status=401)
    publish(agents.broker, agents.tmp_path, cameras=5, rate=10, duration_s=1, seed=32)
    wait_for(lambda: status_cli("--url", url).returncode == 1, timeout_s=20, what="not ready")
    bad = status_cli("--url", url)
    assert bad.stdout.startswith("PROBLEM  cloud refused credentials (401)")
    assert agent.stop() == 0
    gone = status_cli("--url", url)
    assert gone.returncode == Exit.UNREACHABLE and "unreachable" in gone.stderr


def test_sd_notify_ready_after_subscribe_and_watchdog_from_progress(
    agents: AgentFactory, tmp_path: Path
) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.1)
    received: list[tuple[float, str]] = []
    done = threading.Event()

    def listen() -> None:  # records each datagram with the time it arrived
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                received.append((time.monotonic(), sock.recv(4096).decode()))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        agent = agents.start(
            env={
                "NOTIFY_SOCKET": str(sock_path),
                "WATCHDOG_USEC": "1000000",
                # The checkpoint loop (every 100 ms) hangs at its 40th round, about 4 s in.
                "EDGE_AGENT_TEST_FAULT": "stall_checkpoint:40",
            }
        )
        ready_at = wait_for(
            lambda: next((t for t, m in list(received) if "READY=1" in m), None),
            timeout_s=10, what="READY=1",
        )  # fmt: skip
        status, body, _ = get(agent.health_port, "/readyz")
        assert status == 200, body  # READY=1 came only once MQTT was subscribed
        assert any("STATUS=" in m and "msgs/s" in m for _, m in received)
        wait_for(lambda: "stall_checkpoint reached" in agent.log_text(), timeout_s=20, what="stall")
        stalled_at = time.monotonic()
        pings_before = [t for t, m in list(received) if m == "WATCHDOG=1"]
        assert len(pings_before) >= 3, received
        wait_for(lambda: get(agent.health_port, "/healthz")[0] == 503, timeout_s=10, what="503")
        late = [t for t, m in list(received) if m == "WATCHDOG=1" and t > stalled_at + 0.2]
        assert late == [], "the watchdog kept being fed while the pipeline was stalled"
        assert ready_at <= pings_before[-1]
        doc: dict[str, Any] = json.loads(get(agent.health_port, "/healthz")[1])
        assert "no checkpoint for" in doc["problems"][0]
    finally:
        done.set()
        listener.join()
        sock.close()

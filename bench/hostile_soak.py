"""Hostile-camera soak: honest cameras at a few thousand msgs/s mixed with every known hostile
payload ("pill"), for minutes, with real processes.

    .venv/bin/python -m bench.hostile_soak --duration-s 300
    .venv/bin/python -m bench.hostile_soak --duration-s 30 --no-md     # a quick check

One run: its own Mosquitto and reference receiver on free loopback ports, a fresh outbox, the
agent as a child process (`edge-agent run`), the camera simulator (agent.sim.cameras, its ground
truth) as the honest cameras, and, in parallel, a hostile publisher (paho, QoS 1, its own client
ids, camera ids `evil-*` / `flood-*`, never `cam-*`) looping over every pill at a few hundred
msgs/s. Every few seconds: the agent's RSS (/proc/<pid>/status VmRSS), CPU (utime + stime),
threads, /healthz and /status (rejects by reason, MQTT reconnects, counters).

At the end the hostile publisher stops, the honest one finishes, the script waits for delivery,
takes the final /status, stops the agent (SIGTERM, exit 0 expected) and judges:

- honest exact: the receiver's merged table restricted to the honest camera ids equals the ground
  truth per (camera, stream, second) — missing 0, duplicated 0, no mismatched row; seqs clean;
- no MQTT reconnect (`mqtt.reconnects` stayed 0), no honest or hostile publisher reconnect;
- the agent never restarted: same pid, alive and /healthz 200 at every sample;
- RSS flat: median of the first minute vs median of the last minute (first / last third of the
  run when it is shorter than 3 minutes), and the max; growth allowed: 10 % + 8 MiB;
- every pill accounted for under its reason: for each reject reason, the agent's count equals
  the number of pills the broker acknowledged for it; each counted pill reaches the cloud once
  under its own camera id, and its side counter (bad_numeric_field, bad_categorical_field,
  bad_timestamp_used_gateway_time, bad_time_restamped) matches exactly; the id flood is
  counted at the cloud or rejected as too_many_cameras, nothing else; a payload far over
  mqtt.max_payload_bytes is dropped by the broker (see the README) and appears nowhere.

A payload with invalid UTF-8 in its topic cannot be published with paho (it encodes topics); it
is sent with a minimal raw MQTT v5 client on its own connection, once a second. Mosquitto
validates topic UTF-8 and disconnects such a client, so the agent never sees it: the outcome is
reported (and, should one be acknowledged, it is expected as bad_topic_encoding).

Prints a summary; writes bench/HOSTILE_SOAK.md (unless --no-md) with the date, commit,
parameters and figures. The working directory is kept under bench/out/hostile_soak/ on failure
(or with --keep).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.sim.cameras import camera_name
from agent.sim.cloud import load_merged
from bench.common import BENCH, ROOT, ProcStat, machine_description
from bench.common import OUT as BENCH_OUT
from devtools.procs import (
    HOST,
    Agent,
    Mosquitto,
    Publisher,
    Receiver,
    agent_config,
    free_port,
    wait_for,
)
from devtools.truth import compare

OUT = BENCH_OUT / "hostile_soak"
MD = BENCH / "HOSTILE_SOAK.md"
GATEWAY = "gw-hostile"
MAX_PAYLOAD = 64 * 1024  # mqtt.max_payload_bytes (the default, written into the config)
BIG_INT = b"1" + b"0" * 400  # 401 digits
MiB = 1024 * 1024


def say(msg: str) -> None:
    print(msg, flush=True)


# -- the pills ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pill:
    """One hostile message kind: its topic and payload (given the time), what must happen."""

    name: str
    weight: float  # relative share of the hostile rate
    topic: Callable[[int], str]  # n (the pill's running number) -> topic
    payload: Callable[[float], bytes]  # wall time -> payload
    # "reject:<reason>" | "counted" | "flood" | "broker_drops"
    outcome: str
    # For counted pills: {counter: increments per message} (the aggregate section of /status).
    side: dict[str, int] = field(default_factory=dict)
    camera: str | None = None  # counted pills: the camera id they are counted under


def _ts(t: float) -> bytes:
    return f"{t:.3f}".encode()


def _pad_to(prefix: bytes, size: int) -> bytes:
    # A valid JSON object of exactly `size` bytes: {"ts": ..., "pad": "xxxx..."}
    head = prefix + b', "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def cam_topic(camera: str, stream: str = "detections") -> Callable[[int], str]:
    return lambda _n: f"site/cam/{camera}/{stream}"


def build_pills() -> list[Pill]:
    honest_body: Callable[[float], bytes] = lambda t: (  # noqa: E731
        b'{"ts": ' + _ts(t) + b', "cls": "car", "conf": 0.5}'
    )
    rej = cam_topic("evil-rej")
    bad_streams = ["det ections", "y" * 65, "str\u00e8am"]
    bad_ids = ["kamera-\u00fc", "a b", "x" * 65, "", "cam$1", "caf\u00e9", "evil\u200bzw"]
    pills = [
        # malformed JSON, one way or another
        Pill("utf8_in_string", 10, rej, lambda _t: b'{"cls":"\xff"}', "reject:malformed_json"),
        Pill(
            "utf8_in_string_2", 5, rej,
            lambda t: b'{"ts": ' + _ts(t) + b', "cls": "per\xc3\x28son", "conf": 0.5}',
            "reject:malformed_json",
        ),
        Pill("float_1e400", 10, rej, lambda _t: b'{"conf": 1e400}', "reject:malformed_json"),
        Pill("int_5000_digits", 3, rej, lambda _t: b'{"conf": ' + b"7" * 5000 + b"}",
             "reject:malformed_json"),
        Pill("truncated_json", 5, rej, lambda t: b'{"ts": ' + _ts(t) + b', "cls": "per',
             "reject:malformed_json"),
        Pill("not_json", 3, rej, lambda _t: b"hello camera", "reject:malformed_json"),
        Pill("empty_payload", 3, rej, lambda _t: b"", "reject:malformed_json"),
        Pill("trailing_garbage", 3, rej, lambda _t: b'{"a": 1}}', "reject:malformed_json"),
        Pill("nan_literal", 3, rej, lambda _t: b'{"conf": NaN}', "reject:malformed_json"),
        Pill("deep_array_30000", 1, rej, lambda _t: b"[" * 30000 + b"]" * 30000,
             "reject:malformed_json"),
        Pill("deep_object_10000", 1, rej, lambda _t: b'{"a":' * 10000 + b"1" + b"}" * 10000,
             "reject:malformed_json"),
        # structure
        Pill("deep_object_20", 5, rej, lambda _t: b'{"a":' * 20 + b"1" + b"}" * 20,
             "reject:too_deep"),
        Pill("deep_list_in_field_12", 5, rej,
             lambda t: b'{"ts": ' + _ts(t) + b', "x": ' + b"[" * 12 + b"]" * 12 + b"}",
             "reject:too_deep"),
        Pill("too_many_fields_300", 3, rej,
             lambda _t: ("{" + ",".join(f'"f{i}":{i}' for i in range(300)) + "}").encode(),
             "reject:too_many_fields"),
        Pill("non_object_list", 3, rej, lambda _t: b"[1, 2, 3]", "reject:not_an_object"),
        Pill("non_object_string", 3, rej, lambda _t: b'"a string"', "reject:not_an_object"),
        Pill("non_object_number", 3, rej, lambda _t: b"42", "reject:not_an_object"),
        Pill("non_object_null", 3, rej, lambda _t: b"null", "reject:not_an_object"),
        Pill("non_object_bool", 3, rej, lambda _t: b"true", "reject:not_an_object"),
        # size
        Pill("oversized_just_over", 3, rej, lambda t: _pad_to(b'{"ts": ' + _ts(t),
             MAX_PAYLOAD + 512), "reject:oversized"),
        Pill("oversized_far_over_1MiB", 0.5, rej, lambda t: _pad_to(b'{"ts": ' + _ts(t),
             MiB + 4096), "broker_drops"),
        # ids
        Pill("bad_camera_id", 7, lambda n: f"site/cam/{bad_ids[n % len(bad_ids)]}/detections",
             honest_body, "reject:bad_camera_id"),
        Pill("bad_stream_id", 3,
             lambda n: f"site/cam/evil-ok/{bad_streams[n % 3]}",
             honest_body, "reject:bad_stream_id"),
        # counted, with a refused value or a bad time
        Pill("int_400_digits_numeric", 8, cam_topic("evil-bignum"),
             lambda t: b'{"ts": ' + _ts(t) + b', "conf": ' + BIG_INT + b', "level": 0.5}',
             "counted", {"bad_numeric_field": 1}, "evil-bignum"),
        Pill("int_400_digits_ts", 8, cam_topic("evil-bigts"),
             lambda _t: b'{"ts": ' + BIG_INT + b', "conf": 0.5}',
             "counted", {"bad_timestamp_used_gateway_time": 1}, "evil-bigts"),
        Pill("int_400_digits_category", 8, cam_topic("evil-bigcat"),
             lambda t: b'{"ts": ' + _ts(t) + b', "cls": ' + BIG_INT + b"}",
             "counted", {"bad_categorical_field": 1}, "evil-bigcat"),
        Pill("float_1e200", 8, cam_topic("evil-1e200"),
             lambda t: b'{"ts": ' + _ts(t) + b', "conf": 1e200, "level": -1e200}',
             "counted", {"bad_numeric_field": 2}, "evil-1e200"),
        Pill("ts_1970", 8, cam_topic("evil-1970"),
             lambda t: b'{"ts": ' + _ts(5.0 + t % 1000) + b', "conf": 0.5}',
             "counted", {"bad_time_restamped": 1}, "evil-1970"),
        Pill("ts_far_future_2100", 8, cam_topic("evil-future"),
             lambda t: b'{"ts": ' + _ts(4102444800.0 + t % 1000) + b', "conf": 0.5}',
             "counted", {"bad_time_restamped": 1}, "evil-future"),
        Pill("ms_where_s_configured", 8, lambda _n: "site/secs/evil-msts/detections",
             lambda t: b'{"ts": ' + str(int(t * 1000)).encode() + b', "conf": 0.5}',
             "counted", {"bad_timestamp_used_gateway_time": 1}, "evil-msts"),
        Pill("heartbeat_identical_no_ts", 15, cam_topic("evil-heartbeat", "health"),
             lambda _t: b'{"status": "ok", "fps": 25.0}', "counted", {}, "evil-heartbeat"),
        # the camera cap
        Pill("new_camera_id_flood", 60, lambda n: f"site/cam/flood-{n:07d}/detections",
             honest_body, "flood"),
    ]  # fmt: skip
    return pills


# -- a raw MQTT v5 publish, for a topic paho cannot encode ----------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _read_packet(s: socket.socket) -> tuple[int, bytes] | None:
    def read(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    try:
        first = read(1)[0]
        mult, length = 1, 0
        while True:
            b = read(1)[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return first, read(length)
    except (ConnectionError, OSError):
        return None


def raw_publish(port: int, topic: bytes, payload: bytes, client_id: str) -> str:
    """CONNECT (v5, clean start), PUBLISH QoS 1 on a raw topic; what the broker answered."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        cid = client_id.encode()
        connect = b"\x00\x04MQTT\x05\x02\x00\x1e\x00" + len(cid).to_bytes(2, "big") + cid
        s.sendall(_packet(0x10, connect))
        got = _read_packet(s)
        if got is None or got[0] >> 4 != 2:
            return "no_connack"
        pub = len(topic).to_bytes(2, "big") + topic + b"\x00\x01" + b"\x00" + payload
        s.sendall(_packet(0x32, pub))
        got = _read_packet(s)
        if got is None:
            return "disconnected"
        kind = got[0] >> 4
        if kind == 4:
            rc = got[1][2] if len(got[1]) > 2 else 0
            with contextlib.suppress(OSError):
                s.sendall(b"\xe0\x00")
            return "puback" if rc < 0x80 else f"puback_rc_{rc:#x}"
        if kind == 14:
            rc = got[1][0] if got[1] else 0
            return f"disconnect_rc_{rc:#x}"
        return f"packet_{kind}"


# -- the hostile publisher ----------------------------------------------------------------------


class Hostile:
    """Loops over every pill at `rate` msgs/s (weighted, seeded) on one paho client (QoS 1);
    the raw bad-topic pill once a second on its own connections."""

    def __init__(
        self, port: int, rate: float, seed: int, skip: frozenset[str] = frozenset()
    ) -> None:
        self.port = port
        self.rate = rate
        self.rng = random.Random(seed)
        self.pills = [p for p in build_pills() if p.name not in skip]
        self.by_name = {p.name: p for p in self.pills}
        self.sent: Counter[str] = Counter()
        self.acked: Counter[str] = Counter()
        self.ack_rc: Counter[str] = Counter()  # "pill:rc" for non-success PUBACKs
        self.raw_outcomes: Counter[str] = Counter()
        self.flood_acked: set[str] = set()
        self.connects = 0
        self.disconnects = 0
        self.error: str = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[str, str]] = {}
        self._early: dict[int, int] = {}
        self._threads = [
            threading.Thread(target=self._run, daemon=True),
            threading.Thread(target=self._run_raw, daemon=True),
        ]

    def start(self) -> Hostile:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _settle(self, mid: int, rc: int) -> None:
        item = self._inflight.pop(mid)
        name, topic = item
        if rc >= 0x80:
            self.ack_rc[f"{name}:{rc:#x}"] += 1
            return
        self.acked[name] += 1
        if self.by_name[name].outcome == "flood":
            self.flood_acked.add(topic.split("/")[2])

    def _run(self) -> None:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"hostile-{time.time_ns()}",
            protocol=mqtt.MQTTv5,
        )
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)

        def on_publish(_c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
            value = int(getattr(rc, "value", rc) or 0)
            with self._lock:
                if mid in self._inflight:
                    self._settle(mid, value)
                else:
                    self._early[mid] = value

        def on_connect(*_a: Any) -> None:
            self.connects += 1

        def on_disconnect(*_a: Any) -> None:
            self.disconnects += 1

        client.on_publish = on_publish
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        try:
            client.connect(HOST, self.port, keepalive=30)
            client.loop_start()
            names = [p.name for p in self.pills if p.outcome != "raw"]
            weights = [self.by_name[n].weight for n in names]
            start = time.monotonic()
            n_sent = 0
            while not self._stop.is_set():
                due = int(self.rate * (time.monotonic() - start)) - n_sent
                for _ in range(min(due, 500)):
                    pill = self.by_name[self.rng.choices(names, weights)[0]]
                    topic = pill.topic(self.sent[pill.name])
                    payload = pill.payload(time.time())
                    info = client.publish(topic, payload, qos=1)
                    with self._lock:
                        self._inflight[info.mid] = (pill.name, topic)
                        if info.mid in self._early:
                            self._settle(info.mid, self._early.pop(info.mid))
                    self.sent[pill.name] += 1
                    n_sent += 1
                time.sleep(0.01)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with self._lock:
                    if not self._inflight:
                        break
                time.sleep(0.05)
            with self._lock:
                if self._inflight:
                    self.error = f"{len(self._inflight)} hostile publishes never acknowledged"
        except Exception as e:  # reported, and the run fails
            self.error = f"{type(e).__name__}: {e}"
        finally:
            client.disconnect()
            client.loop_stop()

    def _run_raw(self) -> None:
        n = 0
        while not self._stop.wait(1.0):
            topic = [b"site/cam/\xff\xfe/detections", b"site/cam/evil-\xc3\x28/detections",
                     b"site/cam/evil-\xed\xa0\x80/detections"][n % 3]  # fmt: skip
            try:
                out = raw_publish(
                    self.port, topic, b'{"conf": 0.5}', f"hostile-raw-{time.time_ns()}"
                )
            except OSError as e:
                out = f"error_{type(e).__name__}"
            self.raw_outcomes[out] += 1
            n += 1


# -- sampling -----------------------------------------------------------------------------------


def http_code(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


class Sampler(threading.Thread):
    """Every interval_s: the agent's RSS, CPU seconds, threads, /healthz, /status."""

    def __init__(self, agent: Agent, interval_s: float, t0: float) -> None:
        super().__init__(daemon=True)
        assert agent.popen is not None
        self.agent = agent
        self.popen = agent.popen
        self.pid = agent.popen.pid
        self.proc = ProcStat(self.pid)
        self.interval_s = interval_s
        self.t0 = t0
        self.samples: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self._stop_ev = threading.Event()

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        s: dict[str, Any] = {"t": round(t, 1)}
        if not self.agent.running:
            self.problems.append(f"t={t:.1f}s agent not running (exit {self.popen.poll()})")
            self.samples.append(s)
            return
        try:
            s["rss_kb"] = self.proc.rss_kb()
            s["cpu_s"] = self.proc.cpu_s()
            kids: list[str] = []
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    kids += (task / "children").read_text().split()
            s["children"] = len(kids)
            if kids:
                self.problems.append(f"t={t:.1f}s agent has child processes {kids}")
            with open(f"/proc/{self.pid}/status") as f:
                s["threads"] = next(int(ln.split()[1]) for ln in f if ln.startswith("Threads:"))
        except (OSError, StopIteration) as e:
            self.problems.append(f"t={t:.1f}s /proc/{self.pid}: {e}")
        s["healthz"] = http_code(self.agent.health_port, "/healthz")
        if s["healthz"] != 200:
            self.problems.append(f"t={t:.1f}s /healthz answered {s['healthz']}")
        st = self.agent.status() or {}
        ing = st.get("ingest", {})
        s["received"] = ing.get("received")
        s["counted"] = ing.get("counted")
        s["msgs_per_s_10s"] = ing.get("msgs_per_s_10s")
        s["rejects"] = ing.get("rejects", {})
        s["reconnects"] = st.get("mqtt", {}).get("reconnects")
        s["connected"] = st.get("mqtt", {}).get("connected")
        s["cameras"] = st.get("cameras", {}).get("count")
        s["windows_open"] = st.get("aggregate", {}).get("windows_open")
        s["unacked"] = ing.get("unacked")
        s["outbox_chunks"] = st.get("outbox", {}).get("chunks")
        if s["reconnects"]:
            self.problems.append(f"t={t:.1f}s mqtt.reconnects = {s['reconnects']}")
        self.samples.append(s)

    def run(self) -> None:
        while not self._stop_ev.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(timeout=30)


# -- the run ------------------------------------------------------------------------------------


STREAMS = """
[[streams]]
topic = "site/cam/{camera}/{stream}"
numeric = ["conf", "level", "temp_c", "fps"]
categorical = ["cls", "zone", "status"]

[[streams]]
topic = "site/secs/{camera}/{stream}"
time_unit = "s"
numeric = ["conf", "level", "temp_c", "fps"]
categorical = ["cls", "zone", "status"]
"""


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "agent"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return out + (" (agent/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def window_median(samples: list[dict[str, Any]], lo: float, hi: float) -> float | None:
    vals = [s["rss_kb"] for s in samples if "rss_kb" in s and lo <= s["t"] < hi]
    return statistics.median(vals) if vals else None


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"checks": {}, "failures": []}
    checks: dict[str, bool] = res["checks"]
    procs: list[Any] = []
    try:
        broker = Mosquitto(workdir / "mosquitto").start()
        procs.append(broker)
        receiver = Receiver(workdir / "cloud").start()
        procs.append(receiver)
        health_port = free_port()
        (workdir / "agent").mkdir(exist_ok=True)
        cfg = agent_config(
            path=workdir / "agent.toml",
            gateway_id=GATEWAY,
            mqtt_port=broker.port,
            receiver_url=receiver.url,
            buffer_path=workdir / "agent" / "buffer.sqlite3",
            health_port=health_port,
            client_id="edge-agent-hostile-soak",
            extra=STREAMS,
        )
        text = cfg.read_text()
        text = text.replace("[mqtt]\n", f"[mqtt]\nmax_payload_bytes = {MAX_PAYLOAD}\n", 1).replace(
            "[aggregate]\n", f"[aggregate]\nmax_cameras = {args.max_cameras}\n", 1
        )
        cfg.write_text(text)
        res["config"] = text
        agent = Agent(cfg, workdir / "agent.log", health_port).start()
        procs.append(agent)
        agent.wait_ready(timeout_s=30)
        assert agent.popen is not None
        pid = agent.popen.pid
        res["agent_pid"] = pid
        say(f"agent pid {pid}, broker :{broker.port}, receiver :{receiver.port}, "
            f"health :{health_port}, workdir {workdir}")  # fmt: skip

        t0 = time.monotonic()
        sampler = Sampler(agent, args.sample_s, t0)
        sampler.sample()
        sampler.start()
        pub = Publisher(
            broker, workdir, cameras=args.cameras, rate=args.rate_per_camera,
            duration_s=args.duration_s, seed=args.seed,
        ).start()  # fmt: skip
        wait_for(
            lambda: (agent.status() or {}).get("ingest", {}).get("counted", 0) > 0,
            timeout_s=30, what="honest traffic counted",
        )  # fmt: skip
        hostile = Hostile(
            broker.port, args.hostile_rate, args.seed, frozenset(args.skip_pills)
        ).start()
        say(f"honest cameras publishing ({args.cameras} x {args.rate_per_camera:g}/s), "
            f"hostile publisher started ({args.hostile_rate:g}/s)")  # fmt: skip
        end = t0 + 0.5 + args.duration_s
        next_line = time.monotonic() + 30
        while time.monotonic() < end - 0.5:
            time.sleep(0.2)
            if time.monotonic() >= next_line:
                next_line += 30
                s = sampler.samples[-1]
                say(f"  t={s['t']:6.1f}s rss={s.get('rss_kb', 0) / 1024:6.1f} MiB "
                    f"rate10s={s.get('msgs_per_s_10s')} cameras={s.get('cameras')} "
                    f"rejects={sum((s.get('rejects') or {}).values())} "
                    f"reconnects={s.get('reconnects')} "
                    f"hostile_sent={sum(hostile.sent.values())}")  # fmt: skip
            if not agent.running:
                break
        hostile.stop()
        res["hostile_stopped_at_s"] = round(time.monotonic() - t0, 1)
        expected = pub.join()
        res["honest_summary"] = pub.summary
        honest_ids = {camera_name(i) for i in range(args.cameras)}
        want_honest = sum(e.count for e in expected.values())

        # Delivery: everything the agent counted is at the receiver, nothing left open.
        def delivered() -> bool:
            st = agent.status() or {}
            counted = st.get("ingest", {}).get("counted", -1)
            return bool(
                st.get("aggregate", {}).get("windows_open", 1) == 0
                and st.get("ingest", {}).get("unacked", 1) == 0
                and receiver.messages() == counted
            )

        try:
            wait_for(delivered, timeout_s=90, poll_s=0.5, what="delivery of every counted message")
        except TimeoutError as e:
            res["failures"].append(str(e))
        sampler.sample()
        sampler.stop()
        final = agent.status() or {}
        res["final_status"] = final
        checks["same agent pid, never exited"] = (
            agent.running and agent.popen.pid == pid and not any(
                "not running" in p for p in sampler.problems)
        )  # fmt: skip
        checks["the agent is one process (no child processes at any sample)"] = all(
            not s.get("children") for s in sampler.samples
        )
        checks["/healthz 200 at every sample"] = all(
            s.get("healthz") == 200 for s in sampler.samples
        )
        checks["mqtt.reconnects 0 throughout"] = (
            all(not s.get("reconnects") for s in sampler.samples)
            and final.get("mqtt", {}).get("reconnects") == 0
        )
        exit_code = agent.stop(timeout_s=30)
        res["agent_exit"] = exit_code
        checks["agent exit 0 on SIGTERM"] = exit_code == 0

        # -- honest: exact per (camera, stream, second)
        merged = load_merged(receiver.db)
        honest = {k: c for k, c in merged.items() if k[0] in honest_ids}
        cmp = compare(expected, honest)
        res["honest"] = {
            "published": pub.summary.get("published"),
            "acked_by_broker": pub.summary.get("acked"),
            "expected": cmp.expected_messages,
            "received": cmp.received_messages,
            "missing": cmp.missing,
            "duplicated": cmp.duplicated,
            "mismatched_rows": cmp.mismatched_rows[:10],
            "rate_msgs_per_s": pub.summary.get("rate_msgs_per_s"),
        }
        checks["honest exact (missing 0, duplicated 0, rows equal)"] = cmp.exact and want_honest > 0
        gw = receiver.stats().get("gateways", {}).get(GATEWAY, {})
        res["receiver"] = {k: gw.get(k) for k in ("gaps", "out_of_order", "duplicates")}
        checks["receiver: no seq gap, none out of order"] = not gw.get("gaps") and not gw.get(
            "out_of_order"
        )

        # -- hostile: every pill under its reason
        per_camera: Counter[str] = Counter()
        for (camera, _s, _t), c in merged.items():
            if camera not in honest_ids:
                per_camera[camera] += c.count
        res["hostile"] = {
            "sent": dict(hostile.sent),
            "acked": dict(hostile.acked),
            "non_success_pubacks": dict(hostile.ack_rc),
            "raw_bad_topic": dict(hostile.raw_outcomes),
            "connects": hostile.connects,
            "disconnects": hostile.disconnects,
            "error": hostile.error,
        }
        checks["hostile publisher: every publish acked, one connection"] = (
            not hostile.error and hostile.connects == 1 and not hostile.ack_rc
        )
        rejects: dict[str, int] = final.get("ingest", {}).get("rejects", {})
        agg: dict[str, int] = final.get("aggregate", {})
        want_rejects: Counter[str] = Counter()
        want_side: Counter[str] = Counter()
        rows: list[dict[str, Any]] = []
        flood = next((p for p in hostile.pills if p.outcome == "flood"), None)
        for p in hostile.pills:
            n = hostile.acked[p.name]
            row: dict[str, Any] = {"pill": p.name, "acked": n, "expect": p.outcome}
            if p.outcome.startswith("reject:"):
                want_rejects[p.outcome.split(":", 1)[1]] += n
            elif p.outcome == "counted":
                got = per_camera.get(p.camera or "", 0)
                row["at_cloud"] = got
                row["ok"] = got == n
                for k, v in p.side.items():
                    want_side[k] += v * n
                row["expect"] = "counted" + (
                    " + " + ", ".join(f"{k}×{v}" for k, v in p.side.items()) if p.side else ""
                )
            elif p.outcome == "flood":
                got = sum(c for cam, c in per_camera.items() if cam.startswith("flood-"))
                row["at_cloud"] = got
                row["too_many_cameras"] = rejects.get("too_many_cameras", 0)
                row["ok"] = got + row["too_many_cameras"] == n
                row["expect"] = "counted or too_many_cameras"
            rows.append(row)
        raw_puback = hostile.raw_outcomes.get("puback", 0)
        want_rejects["bad_topic_encoding"] += raw_puback
        res["pill_rows"] = rows
        res["flood_ids_acked"] = len(hostile.flood_acked)
        res["flood_ids_at_cloud"] = sum(1 for c in per_camera if c.startswith("flood-"))
        # The reject table: every reason the agent reports, against what the pills predict.
        table: list[dict[str, Any]] = []
        for reason in sorted(set(rejects) | set(want_rejects) | {"too_many_cameras"}):
            if reason == "too_many_cameras":
                want: int | str = "flood rest"
                ok = (
                    next(r for r in rows if r["pill"] == flood.name)["ok"]
                    if flood
                    else not rejects.get(reason)
                )
            else:
                want = want_rejects.get(reason, 0)
                ok = rejects.get(reason, 0) == want
            table.append({"reason": reason, "agent": rejects.get(reason, 0), "pills": want,
                          "ok": ok})  # fmt: skip
        for key in ("bad_numeric_field", "bad_categorical_field", "bad_time_restamped",
                    "bad_timestamp_used_gateway_time"):  # fmt: skip
            got = agg.get(key, 0)
            want_n = want_side[key]
            table.append(
                {"reason": f"aggregate.{key}", "agent": got, "pills": want_n, "ok": got == want_n}
            )
        res["reject_table"] = table
        checks["every reject reason equals its pills"] = all(r["ok"] for r in table)
        checks["every counted pill at the cloud once, under its camera"] = all(
            r.get("ok", True) for r in rows
        )
        far = hostile.acked["oversized_far_over_1MiB"]
        # The agent's received = honest + hostile acked (but what the broker drops) + raw acked.
        hostile_delivered = sum(hostile.acked.values()) - far + raw_puback
        want_received = int(pub.summary.get("acked", 0)) + hostile_delivered
        got_received = final.get("ingest", {}).get("received")
        res["received"] = {"agent": got_received, "expected": want_received}
        checks["agent received = honest + hostile delivered"] = got_received == want_received
        far = hostile.acked["oversized_far_over_1MiB"]
        checks["far-over payloads: acked by the broker, received by nobody"] = (
            far > 0 or "oversized_far_over_1MiB" in args.skip_pills
        ) and got_received == want_received
        checks["no internal_error"] = not rejects.get("internal_error")
        checks["no honest or hostile publisher reconnect"] = (
            not pub.summary.get("reconnects") and hostile.connects == 1
        )

        # -- resources
        samples = sampler.samples
        res["samples"] = samples
        dur = args.duration_s
        win = 60.0 if dur >= 180 else dur / 3
        first = window_median(samples, 0, win)
        last_end = res["hostile_stopped_at_s"]
        last = window_median(samples, last_end - win, last_end + 0.01)
        rss_all = [s["rss_kb"] for s in samples if "rss_kb" in s]
        cpu = [(s["t"], s["cpu_s"]) for s in samples if "cpu_s" in s]
        cpu_pct = [
            100 * (b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(cpu) if b[0] > a[0]
        ]
        busy = [(s["t"], s["cpu_s"]) for s in samples if "cpu_s" in s and s["t"] <= last_end]
        res["resources"] = {
            "window_s": win,
            "rss_first_median_mib": round(first / 1024, 1) if first else None,
            "rss_last_median_mib": round(last / 1024, 1) if last else None,
            "rss_max_mib": round(max(rss_all) / 1024, 1) if rss_all else None,
            "rss_min_mib": round(min(rss_all) / 1024, 1) if rss_all else None,
            "cpu_mean_pct": round(100 * (busy[-1][1] - busy[0][1]) / (busy[-1][0] - busy[0][0]), 1)
            if len(busy) > 1 and busy[-1][0] > busy[0][0]
            else None,
            "cpu_max_pct": round(max(cpu_pct), 1) if cpu_pct else None,
            "threads_max": max((s.get("threads", 0) for s in samples), default=0),
            "samples": len(samples),
            "cameras_max": max((s.get("cameras") or 0 for s in samples), default=0),
            "msgs_per_s_10s_median": statistics.median(
                [
                    s["msgs_per_s_10s"]
                    for s in samples
                    if s.get("msgs_per_s_10s") and 15 <= s["t"] <= last_end
                ]
                or [0]
            ),
        }
        checks["RSS flat (last-window median <= first-window median + 10 % + 8 MiB)"] = bool(
            first and last and last <= first * 1.10 + 8 * 1024
        )
        res["sampler_problems"] = sampler.problems[:20]
        mlog = broker.log_text()
        res["broker_malformed_disconnects"] = mlog.count("disconnected due to malformed packet")
        alog = agent.log_text()
        res["agent_log"] = {"lines": alog.count("\n"), "bytes": len(alog.encode())}
        res["cameras_forgotten_at_cap"] = agg.get("cameras_forgotten_at_cap", 0)
    except Exception as e:
        res["failures"].append(f"{type(e).__name__}: {e}")
        (workdir / "traceback.txt").write_text(traceback.format_exc())
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop(timeout_s=10)
    res["ok"] = bool(checks) and all(checks.values()) and not res["failures"]
    return res


# -- output -------------------------------------------------------------------------------------


def print_summary(res: dict[str, Any]) -> None:
    say("")
    say("== reject table (agent /status vs what the pills predict) ==")
    for r in res.get("reject_table", []):
        say(f"  {r['reason']:36s} agent={r['agent']:<8} pills={r['pills']!s:<10} "
            f"{'ok' if r['ok'] else 'MISMATCH'}")  # fmt: skip
    say("== pills ==")
    for r in res.get("pill_rows", []):
        extra = f" at_cloud={r['at_cloud']}" if "at_cloud" in r else ""
        if "too_many_cameras" in r:
            extra += f" too_many_cameras={r['too_many_cameras']}"
        flag = "" if r.get("ok", True) else "  MISMATCH"
        say(f"  {r['pill']:28s} acked={r['acked']:<7} {r['expect']}{extra}{flag}")
    h = res.get("hostile", {})
    say(
        f"  raw bad-topic publishes: {h.get('raw_bad_topic')}; broker log 'disconnected due"
        f" to malformed packet': {res.get('broker_malformed_disconnects')}"
    )
    say("== honest ==")
    say(f"  {res.get('honest')}")
    say("== resources ==")
    say(f"  {res.get('resources')}")
    say("== checks ==")
    for k, v in res["checks"].items():
        say(f"  [{'x' if v else ' '}] {k}")
    for f in res["failures"]:
        say(f"  FAILURE: {f}")
    for p in res.get("sampler_problems", []):
        say(f"  sampler: {p}")
    say(f"RESULT: {'OK' if res['ok'] else 'FAIL'}")


def write_md(res: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    m = machine_description()
    r = res.get("resources", {})
    h = res.get("honest", {})
    lines = [
        "# Hostile-camera soak (`bench/hostile_soak.py`)",
        "",
        "Honest cameras (the camera simulator, its ground truth) mixed with every known hostile",
        "payload for minutes, with real processes: Mosquitto, the reference receiver, the agent.",
        "See the script's docstring for what is judged and how.",
        "",
        f"- date: {res['date']}",
        f"- commit (when the agent started): {res['commit']}",
        f"- command: `.venv/bin/python -m bench.hostile_soak {' '.join(res['argv'])}`",
        f"- machine: {m['nproc']} × {m['cpu_model']}, {m['ram_gib']} GiB RAM, "
        f"kernel {m['kernel']}, Python {m['python']}, {m['mosquitto']}; "
        f"load average at the end {m['loadavg']}",
        f"- parameters: {args.duration_s:g} s; honest {args.cameras} cameras × "
        f"{args.rate_per_camera:g} msgs/s (= {args.cameras * args.rate_per_camera:g} msgs/s); "
        f"hostile {args.hostile_rate:g} msgs/s over {len(res.get('pill_rows', []))} pills "
        f"+ 1 raw bad-topic publish/s; aggregate.max_cameras = {args.max_cameras}; "
        f"mqtt.max_payload_bytes = {MAX_PAYLOAD}; seed {args.seed}"
        + (f"; pills left out: {', '.join(args.skip_pills)}" if args.skip_pills else ""),
        f"- result: **{'OK' if res['ok'] else 'FAIL'}**",
        "",
        "## Figures",
        "",
        "| figure | value |",
        "|---|---|",
        f"| honest messages acked by the broker | {h.get('acked_by_broker')} "
        f"({h.get('rate_msgs_per_s')} msgs/s) |",
        f"| honest at the cloud / missing / duplicated / mismatched rows | {h.get('received')} / "
        f"{h.get('missing')} / {h.get('duplicated')} / {len(h.get('mismatched_rows') or [])} |",
        f"| hostile messages acked by the broker | "
        f"{sum((res.get('hostile', {}).get('acked') or {}).values())} |",
        f"| agent received (expected) | {res.get('received', {}).get('agent')} "
        f"({res.get('received', {}).get('expected')}) |",
        f"| agent ingest rate, median of 10 s rates | {r.get('msgs_per_s_10s_median')} msgs/s |",
        f"| RSS median, first {r.get('window_s', 0):g} s | {r.get('rss_first_median_mib')} MiB |",
        f"| RSS median, last {r.get('window_s', 0):g} s | {r.get('rss_last_median_mib')} MiB |",
        f"| RSS min / max | {r.get('rss_min_mib')} / {r.get('rss_max_mib')} MiB |",
        f"| agent CPU mean / max ({args.sample_s:g} s samples) | {r.get('cpu_mean_pct')} % / "
        f"{r.get('cpu_max_pct')} % of one core |",
        f"| agent threads (max) | {r.get('threads_max')} |",
        f"| cameras tracked (max) | {r.get('cameras_max')} |",
        f"| flood camera ids acked / at the cloud | {res.get('flood_ids_acked')} / "
        f"{res.get('flood_ids_at_cloud')} |",
        f"| cameras forgotten at the cap | {res.get('cameras_forgotten_at_cap')} |",
        f"| agent log over the run | {res.get('agent_log', {}).get('lines')} lines, "
        f"{res.get('agent_log', {}).get('bytes')} bytes (warnings rate-limited) |",
        f"| MQTT reconnects | {res.get('final_status', {}).get('mqtt', {}).get('reconnects')} |",
        f"| agent pid / exit code on SIGTERM | {res.get('agent_pid')} / {res.get('agent_exit')} |",
        f"| receiver seq gaps / out of order | {res.get('receiver')} |",
        "",
        "## Reject table",
        "",
        "| reason | agent | pills predict | |",
        "|---|---|---|---|",
    ]
    for t in res.get("reject_table", []):
        lines.append(f"| {t['reason']} | {t['agent']} | {t['pills']} | "
                     f"{'ok' if t['ok'] else 'MISMATCH'} |")  # fmt: skip
    lines += ["", "## Pills", "", "| pill | acked | expected | at the cloud |", "|---|---|---|---|"]
    for p in res.get("pill_rows", []):
        cloud = p.get("at_cloud", "")
        if "too_many_cameras" in p:
            cloud = f"{cloud} (+ {p['too_many_cameras']} too_many_cameras)"
        lines.append(f"| {p['pill']} | {p['acked']} | {p['expect']} | {cloud} |")
    lines += [
        "",
        "Raw publishes with invalid UTF-8 in the topic: "
        f"{res.get('hostile', {}).get('raw_bad_topic')}; Mosquitto's log: "
        f'{res.get("broker_malformed_disconnects")} × "disconnected due to malformed packet"'
        " — Mosquitto checks topic UTF-8 and drops the connection, so `bad_topic_encoding` cannot"
        " reach the agent through it.",
        "",
        "A payload far over `mqtt.max_payload_bytes` (`oversized_far_over_1MiB`) is acknowledged"
        " to the publisher and dropped by the broker for the agent (Maximum Packet Size): it"
        ' appears in no counter (README, "Oversized messages are dropped by the broker").',
        "",
        "## Checks",
        "",
    ]
    lines += [f"- [{'x' if v else ' '}] {k}" for k, v in res["checks"].items()]
    lines += [f"- FAILURE: {f}" for f in res["failures"]]
    lines += ["", "## RSS timeline (MiB, every sample)", "", "```"]
    pts = [
        f"{s['t']:.0f}s:{s['rss_kb'] / 1024:.1f}" for s in res.get("samples", []) if "rss_kb" in s
    ]
    for i in range(0, len(pts), 10):
        lines.append("  ".join(pts[i : i + 10]))
    lines += ["```", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.hostile_soak",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--duration-s", type=float, default=300.0)
    p.add_argument("--cameras", type=int, default=100, help="honest cameras")
    p.add_argument("--rate-per-camera", type=float, default=25.0, help="honest msgs/s each")
    p.add_argument("--hostile-rate", type=float, default=300.0, help="hostile msgs/s")
    p.add_argument("--max-cameras", type=int, default=400, help="aggregate.max_cameras")
    p.add_argument("--sample-s", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--skip-pills",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        help="comma-separated pill names to leave out (to bisect a finding)",
    )
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--no-md", action="store_true", help="do not write bench/HOSTILE_SOAK.md")
    p.add_argument("--md", type=Path, default=MD)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    workdir = OUT / time.strftime("%Y%m%d-%H%M%S")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    say(f"hostile soak: {args.duration_s:g} s, {args.cameras} honest cameras x "
        f"{args.rate_per_camera:g}/s, hostile {args.hostile_rate:g}/s, "
        f"max_cameras {args.max_cameras}, seed {args.seed}")  # fmt: skip
    started = time.monotonic()
    # The commit the agent process loads, taken before it starts (agent/ may change meanwhile).
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = git_commit()
    res = run(args, workdir)
    res["date"] = date
    res["commit"] = commit
    res["argv"] = sys.argv[1:] if argv is None else argv
    res["wall_s"] = round(time.monotonic() - started, 1)
    print_summary(res)
    say(f"wall time {res['wall_s']} s; workdir {workdir}")
    (workdir / "result.json").write_text(json.dumps(res, indent=2, default=str))
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=2, default=str))
    if not args.no_md:
        write_md(res, args, args.md)
        say(f"wrote {args.md}")
    if res["ok"] and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the children on SIGTERM
    sys.exit(main())

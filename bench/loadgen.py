"""A lean MQTT v5 QoS 1 load generator: raw sockets, no paho; and the raw MQTT framing the other
benchmarks share (bench.hostile_soak's raw publisher, bench.power_cut's cameras and tap).

Why not the simulator (agent.sim.cameras)? On this 2-core machine a paho publisher process costs
~100 µs of CPU per QoS 1 message and degrades sharply past ~5-8k msgs/s (paho re-scans its
queue on every PUBACK once its in-flight window is full), so the simulator alone cannot offer
20,000 msgs/s here. This generator writes pre-framed PUBLISH packets in bulk and counts PUBACKs
in a reader thread: a few µs per message. Payloads have the simulator's shapes (detections /
motion / health, built with agent.sim.cameras.make_payload), topics
`site/cam/cam-NNN/<stream>`, and `ts` is the publish time (every third camera in integer ms,
like the simulator).

Bounded: at most `duration_s` of publishing, at most `max_messages`, at most `window` messages
in flight, acks awaited for at most `drain_timeout_s`. Several processes share the cameras.

    python -m bench.loadgen --port 1883 --rate 20000 --duration 10 --processes 2
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from agent.sim.cameras import make_payload
from bench.common import ROOT, bench_command, parser

STREAMS = (("detections", 0.7), ("motion", 0.2), ("health", 0.1))


def pick_stream(rng: random.Random) -> str:
    r = rng.random()
    return "detections" if r < 0.7 else "motion" if r < 0.9 else "health"


@dataclass(frozen=True)
class LoadOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    cameras: int = 300
    rate: float = 10_000.0  # messages/s, all processes together
    duration_s: float = 10.0
    processes: int = 2
    seed: int = 1
    start_at: float | None = None  # wall-clock time at which every process starts publishing
    max_messages: int = 5_000_000
    window: int = 30_000  # max QoS 1 messages in flight per process (<= broker's Receive Maximum)
    drain_timeout_s: float = 20.0
    topic_prefix: str = "site/cam"


# -- MQTT v5 framing --------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, keepalive: int = 0) -> bytes:
    """CONNECT, MQTT v5, clean start, no properties."""
    body = mqtt_str("MQTT") + bytes([5, 0x02]) + struct.pack("!HB", keepalive, 0)
    body += mqtt_str(client_id)
    return b"\x10" + varint(len(body)) + body


def publish_packet(topic: bytes, pid: int, payload: bytes) -> bytes:
    """PUBLISH QoS 1, no properties; `topic` already framed (mqtt_str)."""
    return (
        b"\x32"
        + varint(len(topic) + 3 + len(payload))
        + topic
        + struct.pack("!HB", pid, 0)
        + payload
    )


def split_packets(buf: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """The complete packets at the start of buf: [(first byte, body start, body end)], and how
    many bytes they take."""
    out, i, n = [], 0, len(buf)
    while i + 2 <= n:
        j, mult, length = i + 1, 1, 0
        while j < n and j < i + 5:  # the remaining length, a varint of at most 4 bytes
            b = buf[j]
            length += (b & 0x7F) * mult
            j += 1
            if not b & 0x80:
                break
            mult *= 128
        else:
            break
        if j + length > n:
            break
        out.append((buf[i], j, j + length))
        i = j + length
    return out, i


def read_packet(sock: socket.socket) -> tuple[int, bytes] | None:
    """One whole packet: (first byte, body), or None when the connection closes."""

    def read(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            if not (got := sock.recv(n - len(buf))):
                raise ConnectionError("closed")
            buf += got
        return buf

    try:
        first, mult, length = read(1)[0], 1, 0
        while True:
            b = read(1)[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                return first, read(length)
    except OSError:  # ConnectionError included
        return None


def connect(
    host: str, port: int, client_id: str, timeout_s: float = 10
) -> tuple[socket.socket, int]:
    """A clean MQTT v5 session, keepalive off: the socket (blocking) and the broker's Receive
    Maximum. ConnectionError (an OSError) when there is no CONNACK accepting us."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(connect_packet(client_id))
        got = read_packet(sock)
        if got is None or got[0] != 0x20 or len(got[1]) < 2 or got[1][1] != 0:
            raise ConnectionError(f"no CONNACK accepting us: {got!r}"[:200])
        receive_max, props, k = 65535, got[1][3:], 0  # flags, reason, props length (< 128)
        sizes = {0x24: 2, 0x25: 2, 0x28: 2, 0x29: 2, 0x2A: 2, 0x13: 3, 0x22: 3, 0x11: 5, 0x27: 5}
        while k < len(props):
            if props[k] == 0x21:  # Receive Maximum
                receive_max = struct.unpack("!H", props[k + 1 : k + 3])[0]
            elif props[k] not in sizes:  # strings, user properties: not from Mosquitto here
                break
            k += sizes.get(props[k], 3)
        sock.settimeout(None)
        return sock, receive_max
    except BaseException:
        sock.close()
        raise


# -- the generator ----------------------------------------------------------------------------


def _rests(rng: random.Random, stream: str, k: int) -> list[bytes]:
    """k payload bodies without the leading '{"ts":<value>,' (ts is spliced in at send time)."""
    out = []
    for frame in range(k):
        doc = make_payload(rng, stream, 0.0, frame, False)
        doc.pop("ts", None)
        body = json.dumps(doc, separators=(",", ":")).encode()
        out.append(b"," + body[1:] if len(body) > 2 else b"}")
    return out


class _Acks(threading.Thread):
    """Reads the socket: counts PUBACKs (and failed ones), notes a DISCONNECT."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.acked = self.failed = 0
        self.closed: str | None = None

    def run(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError as e:
                self.closed = f"socket error: {e}"
                return
            if not data:
                self.closed = self.closed or "broker closed the connection"
                return
            buf += data
            packets, used = split_packets(buf)
            for first, j, end in packets:
                if first >> 4 == 4:  # PUBACK
                    self.acked += 1
                    self.failed += end - j >= 3 and buf[j + 2] >= 0x80
                elif first >> 4 == 14:  # DISCONNECT from the broker
                    self.closed = f"broker sent DISCONNECT {buf[j] if end > j else 0:#x}"
            buf = buf[used:]


def _worker(opts: LoadOptions, index: int, cams: list[int]) -> dict[str, Any]:
    rng = random.Random(opts.seed * 1000 + index)
    sock, receive_max = connect(
        opts.host, opts.port, f"loadgen-{opts.seed}-{index}-{time.time_ns()}"
    )
    window = max(1, min(opts.window, receive_max, 60_000))
    reader = _Acks(sock)
    reader.start()
    rests = {s: _rests(rng, s, 64) for s, _ in STREAMS}
    # A pre-drawn sequence of (topic field, is-ms camera, payload rest), cycled.
    topics = {(c, s): mqtt_str(f"{opts.topic_prefix}/cam-{c:03d}/{s}")
              for c in cams for s, _ in STREAMS}  # fmt: skip
    seq: list[tuple[bytes, bool, bytes]] = []
    for _ in range(50_000):
        c = rng.choice(cams)
        stream = pick_stream(rng)
        seq.append((topics[(c, stream)], c % 3 == 2, rng.choice(rests[stream])))
    rate = opts.rate * len(cams) / opts.cameras
    published = pid = max_behind = window_waits = k = 0
    if opts.start_at:
        time.sleep(max(0.0, opts.start_at - time.time()))
    start = time.monotonic()
    end = start + opts.duration_s
    while published < opts.max_messages and reader.closed is None:
        now_m = time.monotonic()
        if now_m >= end:
            break
        due = min(int(rate * (now_m - start)), opts.max_messages) - published
        room = window - (published - reader.acked)
        n = min(due, room, 5000)
        window_waits += due > room
        max_behind = max(max_behind, due - n)
        if n > 0:
            now = time.time()
            ts_s = b'{"ts":' + repr(round(now, 3)).encode()
            ts_ms = b'{"ts":' + str(int(now * 1000)).encode()
            parts: list[bytes] = []
            for _ in range(n):
                topic, ms, rest = seq[k]
                k = k + 1 if k + 1 < len(seq) else 0
                pid = pid + 1 if pid < 65535 else 1
                parts.append(publish_packet(topic, pid, (ts_ms if ms else ts_s) + rest))
            sock.sendall(b"".join(parts))
            published += n
        sleep_s = now_m + 0.005 - time.monotonic()
        if sleep_s > 0:
            time.sleep(sleep_s)  # pacing the load generator, not waiting for a condition
    finished = time.monotonic()
    deadline = finished + opts.drain_timeout_s
    while reader.acked < published and reader.closed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    drained = time.monotonic()
    closed_early = reader.closed  # anything after our DISCONNECT is the normal close
    try:
        sock.sendall(b"\xe0\x00")  # DISCONNECT, normal
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    reader.join(timeout=2)
    sock.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "target": int(rate * opts.duration_s), "published": published,
        "acked": reader.acked - reader.failed, "failed": published - (reader.acked - reader.failed),
        "max_behind": max_behind, "window_waits": window_waits,
        "publish_s": round(finished - start, 3), "drain_s": round(drained - finished, 3),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 3), "closed": closed_early,
    }  # fmt: skip


def run_load(opts: LoadOptions) -> dict[str, Any]:
    """Publish from `processes` child processes; return totals (like run_simulation)."""
    procs = max(1, min(opts.processes, opts.cameras))
    groups = [list(range(i, opts.cameras, procs)) for i in range(procs)]
    start_at = opts.start_at or time.time() + 1.0
    o = {**asdict(opts), "start_at": start_at}
    children = [
        subprocess.Popen(bench_command("loadgen", "--child", json.dumps([o, i, g])),
                         stdout=subprocess.PIPE, cwd=ROOT)
        for i, g in enumerate(groups)
    ]  # fmt: skip
    limit_s = (start_at - time.time()) + opts.duration_s + opts.drain_timeout_s + 30
    results = []
    try:
        for child in children:
            out, _ = child.communicate(timeout=limit_s)
            if child.returncode != 0:
                raise RuntimeError(
                    f"load generator process failed with exit code {child.returncode}"
                )
            results.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    keys = ("target", "published", "acked", "failed", "window_waits", "cpu_s")
    total: dict[str, Any] = {k: sum(r[k] for r in results) for k in keys}
    total.update(
        start_at=start_at, processes=procs,
        **{k: max(r[k] for r in results) for k in ("publish_s", "drain_s", "max_behind")},
        closed=[r["closed"] for r in results if r["closed"]],
        rate_msgs_per_s=round(total["published"] / max(opts.duration_s, 1e-9), 1),
    )  # fmt: skip
    return total


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "", quick=False, json_out=False)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--cameras", type=int, default=300)
    p.add_argument("--rate", type=float, default=10_000, help="messages/s in total")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--processes", type=int, default=2)
    a = p.parse_args(argv)
    if a.child:
        raw, index, cams = json.loads(a.child)
        print(json.dumps(_worker(LoadOptions(**raw), index, cams)))
    else:
        print(
            json.dumps(
                run_load(
                    LoadOptions(
                        port=a.port,
                        cameras=a.cameras,
                        rate=a.rate,
                        duration_s=a.duration,
                        processes=a.processes,
                    )
                )
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Power-cut rig (issue #24): Mosquitto and the agent SIGKILLed together under load, again and
again, per broker persistence setting; then every message a camera had its PUBACK for is looked
up at the receiver: lost and doubled, per cut and in total, and what each setting writes.

    .venv/bin/python -m bench.power_cut                     # 20 cuts x 5 settings (~85 min)
    .venv/bin/python -m bench.power_cut --quick             # smoke: 3 cuts, short gaps (~5 min)
    .venv/bin/python -m bench.power_cut --cuts 5 --settings a,d --durability window
    .venv/bin/python -m bench.power_cut --out bench/POWER_CUT.md

Broker settings (a mosquitto.conf per setting, written here; the rest of the file is the same for
all: loopback listener, no queue or in-flight limits, as for the tests' broker):

    a  persistence false
    b  persistence true, autosave_interval left at its default 1800 (Debian's mosquitto.conf)
    c  persistence true, autosave_interval 60
    d  persistence true, autosave_interval 10
    e  persistence true, autosave_on_changes true, autosave_interval 1000 (a save per 1,000 changes)

Per setting: a fresh receiver, broker and outbox; the agent with the shipped defaults (bench's
config: only ports, paths and a 0.1-1 s MQTT reconnect differ; `--durability window` sets
buffer.durability). Load: 300 cameras x 10 msgs/s (raw MQTT v5 QoS 1 over loopback, two
connections, payloads shaped like the camera simulator's). Each message carries its own id as its
stream's categorical value (cls / zone / status: "m<id>"), so the receiver's merged table says
how often each one arrived. With a setting with persistence, the broker is told to save once
(SIGUSR1) 2 s into the load: the snapshot a broker that has been up for a while would hold.
Cut k comes a seeded random gap (uniform in [--min-gap, --max-gap] s; the same gaps for every
setting) after the load resumed; at the cut both processes get SIGKILL, then the broker and the
agent are started again while the cameras keep publishing (reconnecting as soon as the broker
listens; what falls due while it is down is not published). After the last cut the load runs
--tail s more, stops, the agent drains, and the receiver is read.

Whose loss: the agent reaches the broker through a relay here (the "tap", loopback) that reads
every PUBLISH the broker sends the agent (id, DUP flag, packet id), the agent's PUBACKs, the
CONNACK's session-present flag and the SUBACK. A message a camera had its PUBACK for, and that
never arrived at the receiver, is therefore one of: never sent to the agent (the broker lost it:
in its memory at the cut, or acked after a restart that had no session for the agent, before the
agent subscribed again); sent to the agent and not acked by it before the cut (its one durable
copy was the broker's); acked by the agent (the agent lost it). A doubled message is one the
receiver counted more than once: the extra copy came from a later broker life (a replay after a
restart: with DUP or not, its original packet id or not), from the same life, or from nowhere the
tap saw (the agent doubled it on its own). `--no-tap` connects the agent to the broker directly
(totals only). Flash: /proc/<pid>/io write_bytes of every broker and agent process of the
setting, summed over their lives, per second of load.

Everything binds to 127.0.0.1. Every wait and loop is bounded (a setting has a time budget);
working files stay under bench/out/power_cut/<setting>/.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import select
import shlex
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.sim.cameras import make_payload
from bench.common import (
    HOST,
    ProcStat,
    Report,
    fresh_dir,
    kill_quietly,
    machine_description,
    parser,
    say,
)
from bench.loadgen import mqtt_str as _str
from bench.loadgen import varint as _varint
from devtools.procs import Agent, Mosquitto, Receiver, free_port, wait_for
from tests.helpers import wait_quiet

NAME = "power_cut"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_agent_config(
    path: Path,
    *,
    mqtt_port: int,
    receiver_url: str,
    buffer_path: Path,
    health_port: int,
    gateway_id: str,
    client_id: str,
    **sections: dict[str, Any],
) -> Path:
    """The shipped defaults (config.example.toml), plus ports, paths, a quick MQTT reconnect
    and per-section overrides: the config the figures in POWER_CUT.md were measured with."""
    base: dict[str, dict[str, Any]] = {
        "mqtt": {"host": HOST, "port": mqtt_port, "client_id": client_id,
                 "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
        "aggregate": {},
        "buffer": {"path": str(buffer_path)},
        "forward": {"url": receiver_url},
        "health": {"listen": f"{HOST}:{health_port}"},
        "log": {"level": "info"},
    }  # fmt: skip
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    lines = [f"gateway_id = {_toml(gateway_id)}"]
    for section, values in base.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


GATEWAY = "gw-power-cut"
CLIENT_ID = "edge-agent-power-cut"

# The categorical field of each stream (the shipped [[streams]] config) carries the message id.
STREAMS = (("detections", 0.7, "cls"), ("motion", 0.2, "zone"), ("health", 0.1, "status"))
ID_FIELD = {s: f for s, _, f in STREAMS}
ID_RE = re.compile(rb'"(?:cls|zone|status)":"m(\d+)"')

CONNECTIONS = 2  # camera connections to the broker (the cameras are shared among them)
WINDOW = 20_000  # QoS 1 publishes in flight per connection
BURST = 2_000  # at most this many publishes per connection per tick
TICK_S = 0.01
PRIME_AT_S = 2.0  # the SIGUSR1 save of a setting with persistence, into the load
RESTART_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 90.0
SETTLE_S = 3.0
# A message acked by a broker without the agent's session up to this long after the agent's
# SUBACK (the two are read by different threads) and never sent to the agent: no subscriber.
SUBACK_SLACK_S = 1.0

# Message states in the ledger.
UNSENT, SENT, ACKED = 0, 1, 2


@dataclass(frozen=True)
class Setting:
    key: str
    name: str
    persistence: bool
    lines: tuple[str, ...]  # the setting's mosquitto.conf lines


SETTINGS = (
    Setting("a", "persistence false", False, ("persistence false",)),
    Setting(
        "b", "persistence true, autosave_interval 1800 (default, as Debian ships it)", True,
        ("persistence true",),
    ),
    Setting("c", "persistence true, autosave_interval 60", True,
            ("persistence true", "autosave_interval 60")),
    Setting("d", "persistence true, autosave_interval 10", True,
            ("persistence true", "autosave_interval 10")),
    Setting(
        "e", "persistence true, autosave_on_changes true, autosave_interval 1000", True,
        ("persistence true", "autosave_on_changes true", "autosave_interval 1000"),
    ),
)  # fmt: skip
BY_KEY = {s.key: s for s in SETTINGS}


def broker_conf(port: int, workdir: Path, setting: Setting) -> str:
    lines = [
        f"listener {port} {HOST}",
        "allow_anonymous true",
        *setting.lines,
        f"persistence_location {workdir}/",
        "max_queued_messages 0",
        "max_queued_bytes 0",
        "max_inflight_messages 0",
    ]
    if os.geteuid() == 0:  # as root, mosquitto would drop to `mosquitto`, who cannot write here
        lines.append("user root")
    return "\n".join(lines) + "\n"


class RigBroker(Mosquitto):
    """devtools.procs.Mosquitto (start, stop, signals, log) with the setting's config file."""

    def __init__(self, workdir: Path, setting: Setting) -> None:
        super().__init__(workdir, persistence=setting.persistence)
        self.conf_text = broker_conf(self.port, workdir, setting)
        (workdir / "mosquitto.conf").write_text(self.conf_text)


# -- what happened to each message ------------------------------------------------------------


class Shared:
    """State of one setting's run that the camera and tap threads read."""

    def __init__(self, capacity: int, broker_port: int, deadline: float) -> None:
        self.capacity = capacity
        self.broker_port = broker_port
        self.deadline = deadline
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.life = 0  # broker life: 0 until the first cut, k after the k-th restart
        self._ids = itertools.count()
        self.exhausted = False
        # Per message id: state, the broker life it was sent in, when its PUBACK came (s from t0).
        self.state = bytearray(capacity)
        self.sent_life = array("H", bytes(2 * capacity))
        self.ack_t = array("f", bytes(4 * capacity))
        # What the tap saw: the first delivery to the agent (life, packet id), the others.
        self.first_life = array("h", [-1]) * capacity
        self.first_pid = array("H", bytes(2 * capacity))
        self.first_dup = 0
        self.agent_ack_life = array("h", [-1]) * capacity  # the life of the agent's 1st PUBACK
        self.extra: dict[int, list[tuple[int, bool, int]]] = {}
        self.unidentified_publishes = 0
        self.suback_t: dict[int, float] = {}  # life -> first SUBACK to the agent (s from t0)
        self.session_present: dict[int, bool] = {}  # life -> the first CONNACK's flag

    def now(self) -> float:
        return time.monotonic() - self.t0

    def new_id(self) -> int | None:
        mid = next(self._ids)  # atomic under the GIL
        if mid >= self.capacity:
            self.exhausted = True
            return None
        return mid

    @property
    def ids(self) -> int:
        """How many ids were handed out (read once the publishing is over)."""
        return min(self.capacity, next(self._ids))

    def delivered(self, mid: int, life: int, dup: bool, pid: int) -> None:
        if mid >= self.capacity:
            self.unidentified_publishes += 1
        elif self.first_life[mid] < 0:
            self.first_life[mid] = life
            self.first_pid[mid] = pid
            self.first_dup += dup
        else:
            self.extra.setdefault(mid, []).append((life, dup, pid))


def mqtt_connect(port: int, client_id: str, timeout_s: float = 2.0) -> socket.socket:
    """A clean MQTT v5 session (keepalive off); raises OSError if there is no CONNACK."""
    sock = socket.create_connection((HOST, port), timeout=timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        var = _str("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 0) + b"\x00"
        payload = _str(client_id)
        sock.sendall(b"\x10" + _varint(len(var) + len(payload)) + var + payload)
        got = b""
        deadline = time.monotonic() + timeout_s
        while (len(got) < 2 or len(got) < 2 + got[1]) and time.monotonic() < deadline:
            data = sock.recv(256)  # a socket timeout raises OSError
            if not data:
                break
            got += data
        if len(got) < 4 or got[0] != 0x20 or got[3] != 0:
            raise OSError(f"no CONNACK accepting us: {got[:8]!r}")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


def _packets(buf: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """Complete MQTT packets in buf: [(first byte, body start, body end)], bytes consumed."""
    out = []
    i, n = 0, len(buf)
    while i + 2 <= n:
        j, mult, length = i + 1, 1, 0
        while j < n and j < i + 5:
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


class CameraLink(threading.Thread):
    """Some of the cameras on one MQTT connection: publishes at their rate, records each PUBACK,
    reconnects when the broker is gone (until the setting's deadline)."""

    def __init__(self, shared: Shared, index: int, cams: list[int], rate: float, seed: int):
        super().__init__(daemon=True, name=f"cameras-{index}")
        self.shared = shared
        self.index = index
        self.cams = cams
        self.rate = rate
        self.rng = random.Random(seed * 1000 + index)
        self.frames = dict.fromkeys(cams, 0)
        self.topics = {(c, s): _str(f"site/cam/cam-{c:03d}/{s}") for c in cams for s, *_ in STREAMS}
        self.connects = 0
        self.published = 0
        self.error: str | None = None

    def run(self) -> None:
        sh = self.shared
        try:
            while not sh.stop.is_set() and time.monotonic() < sh.deadline:
                try:
                    sock = mqtt_connect(sh.broker_port, f"cams-{self.index}-{time.time_ns()}")
                except OSError:
                    sh.stop.wait(0.05)  # the broker is down: try again
                    continue
                self.connects += 1
                self._session(sock, sh.life)
        except Exception as e:  # reported with the setting's results
            self.error = f"{type(e).__name__}: {e}"

    def _message(self, mid: int, pid: int) -> bytes:
        rng = self.rng
        c = rng.choice(self.cams)
        r = rng.random()
        stream = "detections" if r < 0.7 else "motion" if r < 0.9 else "health"
        self.frames[c] += 1
        doc = make_payload(rng, stream, time.time(), self.frames[c], c % 3 == 2)
        doc[ID_FIELD[stream]] = f"m{mid}"
        body = (
            self.topics[(c, stream)]
            + struct.pack("!HB", pid, 0)
            + json.dumps(doc, separators=(",", ":")).encode()
        )
        return b"\x32" + _varint(len(body)) + body

    def _session(self, sock: socket.socket, life: int) -> None:
        sh = self.shared
        inflight: dict[int, int] = {}  # packet id -> message id
        closed = threading.Event()
        reader = threading.Thread(target=self._read, args=(sock, inflight, closed), daemon=True)
        reader.start()
        start = time.monotonic()
        sent = pid = 0
        try:
            while not closed.is_set() and not sh.stop.is_set():
                now = time.monotonic()
                if now > sh.deadline:
                    break
                n = min(int(self.rate * (now - start)) - sent, BURST, WINDOW - len(inflight))
                parts = []
                for _ in range(max(0, n)):
                    mid = sh.new_id()
                    if mid is None:
                        sh.stop.set()
                        break
                    for _ in range(65535):  # the next packet id not in flight
                        pid = pid % 65535 + 1
                        if pid not in inflight:
                            break
                    sh.state[mid] = SENT
                    sh.sent_life[mid] = life
                    inflight[pid] = mid
                    parts.append(self._message(mid, pid))
                if parts:
                    sock.sendall(b"".join(parts))
                    sent += len(parts)
                    self.published += len(parts)
                pause = now + TICK_S - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing the publisher, not waiting for a condition
            if not closed.is_set():  # a normal end: wait for the last PUBACKs
                until = time.monotonic() + 10.0
                while inflight and not closed.is_set() and time.monotonic() < until:
                    time.sleep(0.02)
                sock.sendall(b"\xe0\x00")
        except OSError:
            pass  # the broker died: what is in flight stays unconfirmed
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            reader.join(timeout=5)
            sock.close()

    def _read(self, sock: socket.socket, inflight: dict[int, int], closed: threading.Event) -> None:
        sh = self.shared
        buf = b""
        try:
            while time.monotonic() < sh.deadline + 30:
                ready, _, _ = select.select([sock], [], [], 1.0)
                if not ready:
                    continue
                data = sock.recv(1 << 16)
                if not data:
                    return
                buf += data
                packets, used = _packets(buf)
                t = sh.now()
                for first, j, end in packets:
                    if first >> 4 == 4 and end - j >= 2:  # PUBACK
                        pid = struct.unpack_from("!H", buf, j)[0]
                        mid = inflight.pop(pid, None)
                        if mid is not None and (end - j < 3 or buf[j + 2] < 0x80):
                            sh.state[mid] = ACKED
                            sh.ack_t[mid] = t
                buf = buf[used:]
        except (OSError, ValueError):
            return
        finally:
            closed.set()


# -- the tap: a relay between the agent and the broker that reads what passes -----------------


class Tap:
    """Listens on a loopback port for the agent; relays each connection to the broker and
    records the broker's PUBLISHes (message id, DUP, packet id), CONNACK and SUBACK, and the
    agent's PUBACKs, in `shared`. Packets are read before they are passed on."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._accepting = threading.Thread(target=self._accept, daemon=True, name="tap")
        self._accepting.start()

    def _accept(self) -> None:
        sh = self.shared
        while not self._closed.is_set() and time.monotonic() < sh.deadline + 60:
            try:
                agent_side, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                broker_side = socket.create_connection((HOST, sh.broker_port), timeout=2)
            except OSError:
                agent_side.close()  # the broker is down: as if the agent had found no listener
                continue
            agent_side.settimeout(None)
            broker_side.settimeout(None)
            self.connections += 1
            life = sh.life
            pids: dict[int, int] = {}  # packet id -> message id, this connection
            self._socks += [agent_side, broker_side]
            for src, dst, down in (
                (broker_side, agent_side, True),
                (agent_side, broker_side, False),
            ):
                t = threading.Thread(
                    target=self._pump, args=(src, dst, down, life, pids), daemon=True
                )
                t.start()
                self._threads.append(t)

    def _pump(
        self, src: socket.socket, dst: socket.socket, down: bool, life: int, pids: dict[int, int]
    ) -> None:
        sh = self.shared
        buf = b""
        try:
            while time.monotonic() < sh.deadline + 60:
                ready, _, _ = select.select([src], [], [], 1.0)
                if not ready:
                    continue
                data = src.recv(1 << 16)
                if not data:
                    return
                buf += data
                packets, used = _packets(buf)
                if down:
                    self._from_broker(buf, packets, life, pids)
                else:
                    self._from_agent(buf, packets, life, pids)
                buf = buf[used:]
                dst.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _from_broker(
        self, buf: bytes, packets: list[tuple[int, int, int]], life: int, pids: dict[int, int]
    ) -> None:
        sh = self.shared
        for first, j, end in packets:
            kind = first >> 4
            if kind == 3:  # PUBLISH
                qos = (first >> 1) & 3
                k = j + 2 + struct.unpack_from("!H", buf, j)[0]
                pid = 0
                if qos:
                    pid = struct.unpack_from("!H", buf, k)[0]
                    k += 2
                plen, mult = 0, 1
                for _ in range(4):  # the properties' length, a varint
                    b = buf[k]
                    k += 1
                    plen += (b & 0x7F) * mult
                    mult *= 128
                    if not b & 0x80:
                        break
                m = ID_RE.search(buf, k + plen, end)
                if m is None:
                    sh.unidentified_publishes += 1
                    continue
                mid = int(m.group(1))
                pids[pid] = mid
                sh.delivered(mid, life, bool(first & 0x08), pid)
            elif kind == 2 and end - j >= 2:  # CONNACK
                sh.session_present.setdefault(life, bool(buf[j] & 1))
            elif kind == 9:  # SUBACK
                sh.suback_t.setdefault(life, sh.now())

    def _from_agent(
        self, buf: bytes, packets: list[tuple[int, int, int]], life: int, pids: dict[int, int]
    ) -> None:
        sh = self.shared
        for first, j, end in packets:
            if first >> 4 == 4 and end - j >= 2:  # PUBACK
                mid = pids.get(struct.unpack_from("!H", buf, j)[0])
                if mid is not None and mid < sh.capacity and sh.agent_ack_life[mid] < 0:
                    sh.agent_ack_life[mid] = life

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._accepting.join(timeout=2)
        for t in self._threads:
            t.join(timeout=2)


# -- flash writes -----------------------------------------------------------------------------


class WriteMeter:
    """/proc/<pid>/io write_bytes of one role (broker or agent), summed over its processes."""

    def __init__(self) -> None:
        self.total = 0
        self._stat: ProcStat | None = None
        self._last = 0

    def track(self, pid: int) -> None:
        self._stat = ProcStat(pid)
        self._last = 0
        self.sample()

    def sample(self) -> None:
        if self._stat is None:
            return
        with contextlib.suppress(OSError, KeyError, ValueError):
            now = self._stat.io()["write_bytes"]
            self.total += max(0, now - self._last)
            self._last = now

    def release(self) -> None:
        """A last reading before the process is killed."""
        self.sample()
        self._stat = None


# -- one setting --------------------------------------------------------------------------------


@dataclass
class Options:
    cuts: int
    gaps: list[float]
    tail_s: float
    rate: float
    cameras: int
    durability: str | None
    tap: bool
    seed: int


@dataclass
class Cut:
    k: int
    at_s: float = 0.0  # since the load started
    down_s: float = 0.0  # SIGKILL -> the agent connected and subscribed again
    agent_status: dict[str, Any] = field(default_factory=dict)  # last /status ingest before it


def _pid(p: Agent | Mosquitto) -> int:
    assert p.popen is not None
    return p.popen.pid


def _ingest(agent: Agent) -> dict[str, Any] | None:
    st = agent.status()
    return None if st is None else dict(st.get("ingest", {}))


def _connected(agent: Agent) -> bool:
    if not agent.running:
        raise RuntimeError(f"the agent exited:\n{agent.log_text()[-2000:]}")
    st = agent.status()
    return bool(st and st.get("mqtt", {}).get("connected"))


def run_setting(setting: Setting, opts: Options) -> dict[str, Any]:
    work = fresh_dir(f"{NAME}/{setting.key}")
    budget_s = sum(opts.gaps) + opts.tail_s + opts.cuts * (RESTART_TIMEOUT_S + 15) + 240
    deadline = time.monotonic() + budget_s
    # Message ids for the whole load (restarts take ~2 s; running out stops the publishing and
    # is reported as an error).
    load_s_max = sum(opts.gaps) + opts.tail_s + opts.cuts * 15 + 30
    capacity = int(opts.rate * load_s_max * 1.1) + 10_000
    receiver = Receiver(work / "cloud").start()
    broker = RigBroker(work / "mosquitto", setting)
    shared = Shared(capacity, broker.port, deadline)
    res: dict[str, Any] = {"key": setting.key, "name": setting.name, "conf": broker.conf_text}
    say(f"\n[{NAME}] ({setting.key}) {setting.name}: broker on {broker.port}, work dir {work}")
    tap: Tap | None = None
    agent: Agent | None = None
    links: list[CameraLink] = []
    cuts: list[Cut] = []
    meters = {"broker": WriteMeter(), "agent": WriteMeter()}
    last_status: dict[str, Any] = {}
    errors: list[str] = []
    db_path = work / "mosquitto" / "mosquitto.db"
    db_max = 0
    try:
        broker.start()
        meters["broker"].track(_pid(broker))
        if opts.tap:
            tap = Tap(shared)
        health_port = free_port()
        sections: dict[str, dict[str, Any]] = {}
        if opts.durability:
            sections["buffer"] = {"durability": opts.durability}
        config = write_agent_config(
            work / "agent.toml", mqtt_port=tap.port if tap else broker.port,
            receiver_url=receiver.url, buffer_path=work / "agent" / "buffer.sqlite3",
            health_port=health_port, gateway_id=GATEWAY, client_id=CLIENT_ID, **sections,
        )  # fmt: skip

        def start_agent() -> Agent:
            a = Agent(config, work / "agent.log", health_port).start()
            meters["agent"].track(_pid(a))
            wait_for(lambda: _connected(a), timeout_s=RESTART_TIMEOUT_S, what="agent subscribed")
            return a

        agent = start_agent()
        per_link = opts.rate / opts.cameras
        shared.t0 = time.monotonic()
        shared.suback_t[0] = 0.0  # the agent subscribed before the load started
        for i in range(CONNECTIONS):
            cams = list(range(i, opts.cameras, CONNECTIONS))
            links.append(CameraLink(shared, i, cams, per_link * len(cams), opts.seed))
        for link in links:
            link.start()
        primed = not setting.persistence
        for k in range(opts.cuts + 1):
            gap = opts.gaps[k] if k < opts.cuts else opts.tail_s
            segment_end = time.monotonic() + gap
            next_poll = 0.0
            while (now := time.monotonic()) < segment_end:  # the load runs; sample meanwhile
                if now > deadline:
                    raise TimeoutError(f"setting budget of {budget_s:.0f} s spent")
                if not primed and shared.now() >= min(PRIME_AT_S, opts.gaps[0] / 2):
                    broker.signal(signal.SIGUSR1)  # save now: a snapshot taken under load
                    primed = True
                if now >= next_poll:
                    next_poll = now + 1.0
                    for m in meters.values():
                        m.sample()
                    with contextlib.suppress(OSError):
                        db_max = max(db_max, db_path.stat().st_size)
                    got = _ingest(agent)
                    if got is not None:
                        last_status = got
                time.sleep(max(0.0, min(0.1, segment_end - now)))
            if k == opts.cuts:
                break
            cut = Cut(k + 1, at_s=round(shared.now(), 2), agent_status=last_status)
            last_status = {}
            meters["broker"].release()
            meters["agent"].release()
            killed_at = time.monotonic()
            agent.signal(signal.SIGKILL)  # the power cut: both at once
            broker.signal(signal.SIGKILL)
            agent.wait(timeout_s=10)
            broker.wait(timeout_s=10)
            shared.life = k + 1
            broker.start()
            meters["broker"].track(_pid(broker))
            agent = start_agent()
            cut.down_s = round(time.monotonic() - killed_at, 2)
            cuts.append(cut)
            say(f"[{NAME}] ({setting.key}) cut {cut.k} at {cut.at_s:.1f} s; back in {cut.down_s} s")
        load_s = shared.now()
        for m in meters.values():
            m.sample()
        shared.stop.set()
        for link in links:
            link.join(timeout=20)
        # Drain: windows close once the cameras are silent (aggregate.idle_close_s).
        a = agent

        def drained() -> bool:
            st = a.status() or {}
            return bool(
                st.get("aggregate", {}).get("windows_open") == 0
                and st.get("outbox", {}).get("chunks") == 0
                and st.get("ingest", {}).get("unacked") == 0
            )

        try:
            wait_for(drained, timeout_s=min(DRAIN_TIMEOUT_S, max(1.0, deadline - time.monotonic())),
                     what="the agent to drain", poll_s=0.25)  # fmt: skip
            wait_quiet(receiver, SETTLE_S, timeout_s=60)
        except TimeoutError as e:
            errors.append(str(e))
        final = _ingest(agent) or {}
        meters["agent"].release()
        meters["broker"].release()
        exit_code = agent.stop(timeout_s=20)
        if exit_code != 0:
            errors.append(f"the agent's final SIGTERM exit code was {exit_code}")
        with contextlib.suppress(TimeoutError):
            wait_quiet(receiver, 1.0, timeout_s=15)
        res.update(
            load_s=round(load_s, 1),
            broker_write_bytes=meters["broker"].total,
            agent_write_bytes=meters["agent"].total,
            broker_write_mb_s=round(meters["broker"].total / load_s / 1e6, 3),
            agent_write_mb_s=round(meters["agent"].total / load_s / 1e6, 3),
            final_agent_status=final,
        )
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}".splitlines()[0][:300])
        say(f"[{NAME}] ({setting.key}) FAILED: {errors[-1]}")
    finally:
        shared.stop.set()
        for link in links:
            link.join(timeout=15)
        kill_quietly(agent, broker)
        if tap is not None:
            tap.close()
    errors += [f"camera link: {link.error}" for link in links if link.error]
    if shared.exhausted:
        errors.append("the message id space ran out: publishing stopped early")
    res["errors"] = errors
    res["camera_connects"] = sum(link.connects for link in links)
    res["tap_connections"] = tap.connections if tap else None
    saves = broker_saves(broker.log_path)
    res["broker_saves"] = saves
    res["broker_db_max_bytes"] = db_max if setting.persistence else None
    try:
        res.update(analyse(shared, receiver.db, cuts, opts))
        for i, c in enumerate(res["cuts"]):
            # saves during the broker life the cut ended; what the next agent skipped (its last
            # /status before the next cut, or at the end)
            c["broker_saves_before"] = saves[c["cut"] - 1] if c["cut"] <= len(saves) else None
            after = cuts[i + 1].agent_status if i + 1 < len(cuts) else res.get("final_agent_status")
            c["agent_skipped_after"] = [
                (after or {}).get("redelivered_skipped"),
                (after or {}).get("replays_skipped"),
            ]
    except Exception as e:  # a broken receiver database is a result too
        res["errors"].append(f"analysis: {type(e).__name__}: {e}")
    finally:
        receiver.stop()
    return res


def broker_saves(log_path: Path) -> list[int]:
    """Per broker life: how many times it wrote its persistence file (from its log), not
    counting the save at the final graceful stop."""
    lives: list[int] = []
    stopping = False
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if "mosquitto version" in line and line.endswith("starting"):
                lives.append(0)
                stopping = False
            elif "mosquitto version" in line and line.endswith("terminating"):
                stopping = True
            elif "Saving in-memory database" in line and lives and not stopping:
                lives[-1] += 1
    return lives


# -- the verdict --------------------------------------------------------------------------------


def received_counts(db: Path, capacity: int) -> tuple[array[int], int, int]:
    """How often the receiver counted each message id; messages it counted without an id (a
    category overflow, "__other__"); all messages it counted."""
    counts = array("H", bytes(2 * capacity))
    unidentified = total = 0
    con = sqlite3.connect(db)
    try:
        for stream, body in con.execute("SELECT stream, body FROM merged"):
            doc = json.loads(body)
            total += int(doc["count"])
            seen = 0
            for value, n in doc.get("cat", {}).get(ID_FIELD.get(stream, ""), {}).items():
                if value.startswith("m") and value[1:].isdigit() and int(value[1:]) < capacity:
                    counts[int(value[1:])] += int(n)
                    seen += int(n)
            unidentified += int(doc["count"]) - seen
    finally:
        con.close()
    return counts, unidentified, total


LOSS_KINDS = ("no_subscriber", "broker_memory", "at_agent_unacked", "agent_acked", "unknown")
DOUBLE_KINDS = ("replay", "same_life", "agent_self", "unknown")


def analyse(shared: Shared, db: Path, cuts: list[Cut], opts: Options) -> dict[str, Any]:
    n = shared.ids
    counts, unidentified, received_total = received_counts(db, shared.capacity)
    lives = opts.cuts + 1
    # Per broker life L (0 before the first cut, L after the L-th): published, doubled and
    # replays (a replay delivered in life L came after cut L); lost per cut (index cuts + 1:
    # after the last cut).
    published = [0] * lives
    lost = [dict.fromkeys(LOSS_KINDS, 0) for _ in range(lives + 1)]
    doubled = [dict.fromkeys(DOUBLE_KINDS, 0) for _ in range(lives)]
    replays = [{"delivered": 0, "dup": 0, "same_pid": 0, "acked_before": 0} for _ in range(lives)]
    unconfirmed = unconfirmed_arrived = 0
    tap = opts.tap
    for mid in range(n):
        st = shared.state[mid]
        got = counts[mid]
        life = shared.sent_life[mid]
        first = shared.first_life[mid]
        if st == ACKED:
            published[life] += 1
            if got == 0:
                if not tap:
                    kind = "unknown"
                elif first < 0:
                    sub = shared.suback_t.get(life)
                    fresh = not shared.session_present.get(life, False)
                    kind = (
                        "no_subscriber"
                        if fresh and (sub is None or shared.ack_t[mid] < sub + SUBACK_SLACK_S)
                        else "broker_memory"
                    )
                else:
                    acked = shared.agent_ack_life[mid] >= 0
                    kind = "agent_acked" if acked else "at_agent_unacked"
                # Lost at the cut that ended its broker life, or, for want of a subscriber,
                # at the restart that began it.
                lost[life if kind == "no_subscriber" else life + 1][kind] += 1
        elif st == SENT:
            unconfirmed += 1
            unconfirmed_arrived += got > 0
        extras = shared.extra.get(mid, [])
        for e_life, dup, pid in extras:
            if e_life > first:
                r = replays[e_life]
                r["delivered"] += 1
                r["dup"] += dup
                r["same_pid"] += pid == shared.first_pid[mid]
                r["acked_before"] += 0 <= shared.agent_ack_life[mid] < e_life
        if got > 1:
            extra_count = got - 1
            if not tap:
                doubled[min(life + 1, lives - 1)]["unknown"] += extra_count
                continue
            deliveries = (1 if first >= 0 else 0) + len(extras)
            if got > deliveries:
                doubled[life]["agent_self"] += got - max(deliveries, 1)
                extra_count -= got - max(deliveries, 1)
            for e_life, _, _ in sorted(extras)[:extra_count]:
                doubled[e_life]["replay" if e_life > first else "same_life"] += 1
    per_cut = []
    for c in cuts:
        L = c.k  # the life that began after this cut
        per_cut.append({
            "cut": c.k, "at_s": c.at_s, "gap_s": round(opts.gaps[c.k - 1], 1), "down_s": c.down_s,
            "published_before": published[L - 1], "lost": lost[L],
            "lost_total": sum(lost[L].values()), "doubled": doubled[L],
            "doubled_total": sum(doubled[L].values()), "replays": replays[L],
            "session_present": shared.session_present.get(L) if tap else None,
            "agent_status_before": {
                k: c.agent_status.get(k)
                for k in ("received", "counted", "acked", "redelivered_skipped",
                          "replays_skipped")
                if k in c.agent_status
            },
        })  # fmt: skip
    tail = {
        "published": published[lives - 1],
        "lost": lost[lives],
        "lost_total": sum(lost[lives].values()) + sum(lost[0].values()),
        # doubles of life 0 (before any cut) are the agent's own, kept with the total
        "doubled_before_first_cut": sum(doubled[0].values()),
    }
    totals_lost = {k: sum(x[k] for x in lost) for k in LOSS_KINDS}
    totals_doubled = {k: sum(x[k] for x in doubled) for k in DOUBLE_KINDS}
    totals_replays = {k: sum(x[k] for x in replays) for k in replays[0]}
    return {
        "ids": n,
        "published": sum(published),
        "unconfirmed": unconfirmed,
        "unconfirmed_arrived": unconfirmed_arrived,
        "received_total": received_total,
        "received_unidentified": unidentified,
        "lost": sum(totals_lost.values()),
        "lost_by_kind": totals_lost,
        "doubled": sum(totals_doubled.values()),
        "doubled_by_kind": totals_doubled,
        "replays": totals_replays,
        "first_deliveries_with_dup": shared.first_dup if tap else None,
        "tap_unidentified_publishes": shared.unidentified_publishes if tap else None,
        "cuts": per_cut,
        "after_last_cut": tail,
        "agent_skips_before_cuts": {
            k: sum(int(c.agent_status.get(k) or 0) for c in cuts)
            for k in ("redelivered_skipped", "replays_skipped")
        },
    }


# -- the report ---------------------------------------------------------------------------------


def _n(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.3f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    m = doc["machine"]
    opts = doc["options"]
    results = doc["settings"]
    lines = [
        "# Power cuts: Mosquitto and the agent SIGKILLed together (issue #24)",
        "",
        f"`{doc['command']}` on {doc['started']}, {doc['seconds']:.0f} s"
        + (" (**smoke run**: few cuts, short gaps; indicative only)" if doc["quick"] else "")
        + ". Written by `bench/power_cut.py` (its docstring says how it works).",
        "",
        f"- machine: {m['nproc']} x {m['cpu_model']}, {m['ram_gib']} GiB, kernel {m['kernel']}, "
        f"{m['filesystem']}; Python {m['python']}; {m['mosquitto']}; shared, machine busy "
        f"{doc['noise'].get('machine_busy_pct', '?')} % during the run",
        f"- agent code: {doc['agent_commit_at_start']} at the start, "
        f"{doc['agent_commit_at_end']} at the end (another engineer edits agent/ in this tree)",
        f"- load: {opts['cameras']} cameras, {opts['rate']:,.0f} msgs/s in all, loopback; "
        f'agent `buffer.durability = "{opts["durability"] or "message"}"`'
        + ("" if opts["durability"] else " (the default)")
        + "; shipped defaults otherwise",
        f"- cuts per setting: {opts['cuts']}, seed {opts['seed']}; gaps (s, load resumed -> "
        f"next cut, the same for every setting): {', '.join(f'{g:.1f}' for g in opts['gaps'])}; "
        f"then {opts['tail_s']:.0f} s of load after the last cut",
        f"- observer: {'the tap (relay between agent and broker)' if opts['tap'] else 'none'}",
        "",
        "## Per setting",
        "",
        "published: messages a camera had its PUBACK for. lost: of those, never counted by the "
        "receiver. doubled: extra counts at the receiver (any message). Write rates: bytes the "
        "process sent to the block layer (/proc/PID/io write_bytes), all its lives, per second "
        "of load (MB = 10^6 bytes).",
        "",
        "| setting | cuts | published | lost | doubled | broker write MB/s | agent write MB/s "
        "| broker saves | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| ({r['key']}) {r['name']} | {len(r.get('cuts', []))} | {_n(r.get('published'))} "
            f"| {_n(r.get('lost'))} | {_n(r.get('doubled'))} | {_n(r.get('broker_write_mb_s'))} "
            f"| {_n(r.get('agent_write_mb_s'))} | {sum(r.get('broker_saves') or [])} "
            f"| {'; '.join(r['errors']) or '-'} |"
        )
    lines += [
        "",
        "## Whose loss, what doubled",
        "",
        "Lost, by where the message was at the cut: *no subscriber*: acked by a restarted broker "
        "that had no session for the agent, before the agent subscribed again; *broker memory*: "
        "never sent to the agent, gone with the broker; *at agent, unacked*: sent to the agent, "
        "which had not acked it (the broker's copy was the durable one); *agent acked*: the "
        "agent acked it and it never arrived (the agent's loss). Doubled: *replay*: the extra "
        "copy came in a later broker life (after a restart); *same life*: a redelivery without "
        "a restart; *agent self*: more counts than deliveries. Replays delivered: messages the "
        "broker sent the agent again after a restart, with how many had DUP=1, their original "
        "packet id, and had been acked by the agent before the cut (counted already: the rest "
        "were not yet, and the snapshot saved them).",
        "",
        "| setting | no subscriber | broker memory | at agent, unacked | agent acked "
        "| doubled: replay | same life | agent self | replays delivered | with DUP | same "
        "packet id | acked before | unconfirmed (no PUBACK) / arrived |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "lost_by_kind" not in r:
            continue
        lk, dk, rp = r["lost_by_kind"], r["doubled_by_kind"], r["replays"]
        lines.append(
            f"| ({r['key']}) | {_n(lk['no_subscriber'])} | {_n(lk['broker_memory'])} | "
            f"{_n(lk['at_agent_unacked'])} | {_n(lk['agent_acked'])} | {_n(dk['replay'])} | "
            f"{_n(dk['same_life'])} | {_n(dk['agent_self'])} | {_n(rp['delivered'])} | "
            f"{_n(rp['dup'])} | {_n(rp['same_pid'])} | {_n(rp['acked_before'])} | "
            f"{_n(r['unconfirmed'])} / "
            f"{_n(r['unconfirmed_arrived'])} |"
        )
    for r in results:
        lines += ["", f"### ({r['key']}) {r['name']}", ""]
        conf = " / ".join(
            ln
            for ln in r["conf"].splitlines()
            if not ln.startswith(("listener", "persistence_loc"))
        )
        lines += [f"mosquitto.conf: `{conf}`", ""]
        if "cuts" not in r:
            lines.append("No figures: " + ("; ".join(r["errors"]) or "?"))
            continue
        lines += [
            "| cut | at s | gap s | down s | published before | lost (no sub / broker / "
            "at agent / agent acked) | doubled after it | replays delivered (DUP, same id, "
            "acked before) | session kept | broker saves before | agent skipped after it "
            "(journal / replay memory) |",
            "|---:|---:|---:|---:|---:|---|---:|---|---|---:|---:|",
        ]
        for c in r["cuts"]:
            lk = c["lost"]
            rp = c["replays"]
            lines.append(
                f"| {c['cut']} | {c['at_s']:.1f} | {c['gap_s']:.1f} | {c['down_s']:.1f} | "
                f"{_n(c['published_before'])} | **{_n(c['lost_total'])}** "
                f"({lk['no_subscriber']} / {lk['broker_memory']} / {lk['at_agent_unacked']} / "
                f"{lk['agent_acked']}) | **{_n(c['doubled_total'])}** | {_n(rp['delivered'])} "
                f"({rp['dup']}, {rp['same_pid']}, {rp['acked_before']}) | "
                f"{_n(c['session_present'])} | {_n(c.get('broker_saves_before'))} | "
                f"{_n(c['agent_skipped_after'][0])} / {_n(c['agent_skipped_after'][1])} |"
            )
        t = r["after_last_cut"]
        lines.append(
            f"| after the last | | | | {_n(t['published'])} | **{_n(t['lost_total'])}** | | | | | |"
        )
        lines += [
            "",
            f"Load {r.get('load_s')} s; broker {_n(r.get('broker_write_bytes'))} bytes "
            f"written, agent {_n(r.get('agent_write_bytes'))}; broker saves per life "
            f"{r['broker_saves']}; largest broker db seen {_n(r['broker_db_max_bytes'])} bytes; "
            f"receiver counted {_n(r['received_total'])} messages "
            f"({_n(r['received_unidentified'])} without an id); first deliveries with DUP "
            f"{_n(r['first_deliveries_with_dup'])}; camera "
            f"connects {r['camera_connects']}.",
        ]
    lines += ["", "## Notes", ""] + [f"- {x}" for x in doc["notes"]] + [""]
    path.write_text("\n".join(lines))


NOTES = [
    "SIGKILL is not a power cut: the kernel's page cache survives it, so data a process wrote "
    "but did not fsync is still there at the restart. The agent fsyncs (`synchronous = full`); "
    "a broker snapshot written without a sync could be older or broken after a real power cut.",
    "The cameras use clean sessions and do not resend a publish whose PUBACK never came "
    "(unconfirmed): such a message is not in 'published'; if it arrived twice, it is doubled.",
    "Broker settings other than persistence are the same for every setting (no queue or "
    "in-flight limits, as for the tests' broker); Debian's own file leaves max_queued_messages "
    "at 1000, which would add queue-overflow losses while the agent restarts.",
    "A setting with persistence gets one forced save (SIGUSR1) 2 s into the load, standing in "
    "for the last autosave of a broker that has been up for a while; Mosquitto's autosave timer "
    "starts again at each restart, so a time-based autosave longer than the gaps never fires and "
    "every restart restores that same snapshot (b, and c when the gaps are under 60 s).",
    "The tap adds a relay hop on loopback between the agent and the broker; `--no-tap` runs "
    "without it (totals only).",
    "Per cut, 'agent skipped after it' is the agent's own /status counters redelivered_skipped "
    "(the ack journal) and replays_skipped (the replay memory, in development) of the agent "
    "started at that cut, at its last poll (each second) before the next cut or at the end: "
    "redeliveries it recognised and did not count again.",
]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "")
    p.add_argument("--cuts", type=int, help="cuts per setting (default 20; --quick: 3)")
    p.add_argument("--settings", default="a,b,c,d,e", help="which settings, e.g. a,d")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=3000.0, help="messages/s, all cameras")
    p.add_argument("--cameras", type=int, default=300)
    p.add_argument(
        "--min-gap", type=float, help="s from load resumed to the next cut, least (15; quick 6)"
    )
    p.add_argument("--max-gap", type=float, help="...and most (default 75; --quick: 14)")
    p.add_argument("--tail", type=float, help="s of load after the last cut (15; quick 5)")
    p.add_argument("--durability", choices=("message", "window"),
                   help="set buffer.durability (default: the agent's own default)")  # fmt: skip
    p.add_argument("--no-tap", action="store_true", help="no relay: totals only")
    p.add_argument("--out", type=Path, help="write the report as markdown (bench/POWER_CUT.md)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.settings.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown or not keys:
        p.error(f"unknown settings {unknown}: choose from {', '.join(BY_KEY)}")
    cuts = args.cuts if args.cuts is not None else (3 if args.quick else 20)
    min_gap = args.min_gap if args.min_gap is not None else (6.0 if args.quick else 15.0)
    max_gap = args.max_gap if args.max_gap is not None else (14.0 if args.quick else 75.0)
    tail = args.tail if args.tail is not None else (5.0 if args.quick else 15.0)
    if not (1 <= cuts <= 1000 and 1.0 <= min_gap <= max_gap <= 3600 and 1.0 <= tail <= 3600):
        p.error("need 1 <= --cuts <= 1000 and 1 <= --min-gap <= --max-gap <= 3600, --tail >= 1")
    if not (1 <= args.cameras <= 999 and 1.0 <= args.rate <= 50_000):
        p.error("need 1 <= --cameras <= 999 and 1 <= --rate <= 50000")
    rng = random.Random(args.seed)
    opts = Options(
        cuts=cuts, gaps=[round(rng.uniform(min_gap, max_gap), 2) for _ in range(cuts)],
        tail_s=tail, rate=args.rate, cameras=args.cameras, durability=args.durability,
        tap=not args.no_tap, seed=args.seed,
    )  # fmt: skip
    command = shlex.join(
        ["python", "-m", f"bench.{NAME}", *(sys.argv[1:] if argv is None else argv)]
    )
    report = Report(NAME, args.quick)
    machine = machine_description()
    results = []
    for key in keys:
        r = run_setting(BY_KEY[key], opts)
        results.append(r)
        report.figure(key, r)
        say(
            f"[{NAME}] ({key}) published {_n(r.get('published'))}, lost {_n(r.get('lost'))} "
            f"{r.get('lost_by_kind', '')}, doubled {_n(r.get('doubled'))} "
            f"{r.get('doubled_by_kind', '')}; replays {r.get('replays', '')}; broker "
            f"{_n(r.get('broker_write_mb_s'))} MB/s, agent {_n(r.get('agent_write_mb_s'))} MB/s"
            + (f"; errors: {r['errors']}" if r["errors"] else "")
        )
    for note in NOTES:
        report.note(note)
    report.figure("options", asdict(opts))
    finished = report.finish(args.json_out)
    doc = {
        **finished,
        "command": command,
        "quick": args.quick,
        "machine": machine,
        "options": asdict(opts),
        "settings": results,
    }
    if args.out is not None:
        write_markdown(args.out, doc)
        say(f"[{NAME}] wrote {args.out}")
    return 0 if all(not r["errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

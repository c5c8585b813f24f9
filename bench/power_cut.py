"""Power-cut rig (issue #24): Mosquitto and the agent SIGKILLed together under load, again and
again, per broker persistence setting; then every message a camera had its PUBACK for is looked
up at the receiver: lost and doubled, per cut and in total, and what each setting writes.

    .venv/bin/python -m bench.power_cut                     # 20 cuts x 5 settings (~85 min)
    .venv/bin/python -m bench.power_cut --quick             # smoke: 3 cuts, short gaps (~5 min)
    .venv/bin/python -m bench.power_cut --cuts 5 --settings a,d --durability window
    .venv/bin/python -m bench.power_cut --out bench/POWER_CUT.md

Broker settings (devtools.procs.Mosquitto's config: loopback listener, no queue or in-flight
limits, as for the tests' broker; only the persistence lines differ):

    a  persistence false
    b  persistence true, autosave_interval 1800 (its default, as Debian's mosquitto.conf leaves it)
    c  persistence true, autosave_interval 60
    d  persistence true, autosave_interval 10
    e  persistence true, autosave_on_changes true, autosave_interval 1000 (a save per 1,000 changes)

Per setting: a fresh receiver, broker and outbox; the agent with the shipped defaults (bench's
config: only ports, paths and a 0.1-1 s MQTT reconnect differ; `--durability window` sets
buffer.durability). Load: 300 cameras x 10 msgs/s (raw MQTT v5 QoS 1 over loopback with
bench.loadgen's framing, two connections, payloads shaped like the camera simulator's). Each
message carries its own id as its stream's categorical value (cls / zone / status: "m<id>"), so
the receiver's merged table says how often each one arrived. With a setting with persistence,
the broker is told to save once (SIGUSR1) 2 s into the load: the snapshot a broker that has been
up for a while would hold. Cut k comes a seeded random gap (uniform in [--min-gap, --max-gap]
s; the same gaps for every setting) after the load resumed; at the cut both processes get
SIGKILL, then the broker and the agent are started again while the cameras keep publishing
(reconnecting as soon as the broker listens; what falls due while it is down is not published).
After the last cut the load runs --tail s more, stops, the agent drains, and the receiver is
read.

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
    ProcStat,
    Report,
    dig,
    fresh_dir,
    idle,
    kill_quietly,
    parser,
    pid,
    respawn,
    say,
    start_agent,
)
from bench.loadgen import STREAMS, connect, mqtt_str, pick_stream, publish_packet, split_packets
from devtools.procs import HOST, Agent, Mosquitto, Receiver, wait_for
from tests.helpers import wait_quiet

NAME = "power_cut"
GATEWAY, CLIENT_ID = "gw-power-cut", "edge-agent-power-cut"
# The categorical field of each stream (the shipped [[streams]] config) carries the message id.
ID_FIELD = {"detections": "cls", "motion": "zone", "health": "status"}
ID_RE = re.compile(rb'"(?:cls|zone|status)":"m(\d+)"')
CONNECTIONS = 2  # camera connections to the broker (the cameras are shared among them)
WINDOW, BURST, TICK_S = 20_000, 2_000, 0.01  # per connection: in flight, publishes per tick
PRIME_AT_S = 2.0  # the SIGUSR1 save of a setting with persistence, into the load
RESTART_TIMEOUT_S, DRAIN_TIMEOUT_S, SETTLE_S = 60.0, 90.0, 3.0
# A message acked by a broker without the agent's session up to this long after the agent's
# SUBACK (the two are read by different threads) and never sent to the agent: no subscriber.
SUBACK_SLACK_S = 1.0
UNSENT, SENT, ACKED = 0, 1, 2  # message states in the ledger
LOSS_KINDS = ("no_subscriber", "broker_memory", "at_agent_unacked", "agent_acked", "unknown")
DOUBLE_KINDS = ("replay", "same_life", "agent_self", "unknown")


@dataclass(frozen=True)
class Setting:
    key: str
    name: str
    persistence: bool
    autosave_interval: int = 1800
    autosave_on_changes: bool = False


SETTINGS = (
    Setting("a", "persistence false", False),
    Setting("b", "persistence true, autosave_interval 1800 (default, as Debian ships it)", True),
    Setting("c", "persistence true, autosave_interval 60", True, 60),
    Setting("d", "persistence true, autosave_interval 10", True, 10),
    Setting("e", "persistence true, autosave_on_changes true, autosave_interval 1000", True, 1000,
            True),
)  # fmt: skip
BY_KEY = {s.key: s for s in SETTINGS}


# -- what happened to each message ------------------------------------------------------------


class Shared:
    """State of one setting's run that the camera and tap threads read."""

    def __init__(self, capacity: int, broker_port: int, deadline: float) -> None:
        self.capacity, self.broker_port, self.deadline = capacity, broker_port, deadline
        self.stop, self.t0 = threading.Event(), time.monotonic()
        self.life = 0  # broker life: 0 until the first cut, k after the k-th restart
        self._ids, self.exhausted = itertools.count(), False
        # Per message id: state, the broker life it was sent in, when its PUBACK came (s from t0).
        self.state = bytearray(capacity)
        self.sent_life = array("H", bytes(2 * capacity))
        self.ack_t = array("f", bytes(4 * capacity))
        # What the tap saw: the first delivery to the agent (life, packet id), the others.
        self.first_life = array("h", [-1]) * capacity
        self.first_pid = array("H", bytes(2 * capacity))
        self.first_dup = self.unidentified_publishes = 0
        self.agent_ack_life = array("h", [-1]) * capacity  # the life of the agent's 1st PUBACK
        self.extra: dict[int, list[tuple[int, bool, int]]] = {}
        self.suback_t: dict[int, float] = {}  # life -> first SUBACK to the agent (s from t0)
        self.session_present: dict[int, bool] = {}  # life -> the first CONNACK's flag

    def now(self) -> float:
        return time.monotonic() - self.t0

    def new_id(self) -> int | None:
        mid = next(self._ids)  # atomic under the GIL
        self.exhausted = self.exhausted or mid >= self.capacity
        return None if mid >= self.capacity else mid

    @property
    def ids(self) -> int:
        """How many ids were handed out (read once the publishing is over)."""
        return min(self.capacity, next(self._ids))

    def delivered(self, mid: int, life: int, dup: bool, pid: int) -> None:
        if mid >= self.capacity:
            self.unidentified_publishes += 1
        elif self.first_life[mid] < 0:
            self.first_life[mid], self.first_pid[mid] = life, pid
            self.first_dup += dup
        else:
            self.extra.setdefault(mid, []).append((life, dup, pid))


def read_packets(sock: socket.socket, until: float, on: Any) -> None:
    """Read MQTT packets from sock until it closes or `until` (monotonic): on(buf, packets,
    data) for each read, packets as bench.loadgen.split_packets gives them."""
    buf = b""
    while time.monotonic() < until:
        if not select.select([sock], [], [], 1.0)[0]:
            continue
        if not (data := sock.recv(1 << 16)):
            return
        packets, used = split_packets(buf := buf + data)
        on(buf, packets, data)
        buf = buf[used:]


class CameraLink(threading.Thread):
    """Some of the cameras on one MQTT connection: publishes at their rate, records each PUBACK,
    reconnects when the broker is gone (until the setting's deadline)."""

    def __init__(self, shared: Shared, index: int, cams: list[int], rate: float, seed: int):
        super().__init__(daemon=True, name=f"cameras-{index}")
        self.shared, self.index, self.cams, self.rate = shared, index, cams, rate
        self.rng = random.Random(seed * 1000 + index)
        self.frames = dict.fromkeys(cams, 0)
        self.topics = {
            (c, s): mqtt_str(f"site/cam/cam-{c:03d}/{s}") for c in cams for s, _ in STREAMS
        }
        self.connects = self.published = 0
        self.error: str | None = None

    def run(self) -> None:
        sh = self.shared
        try:
            while not sh.stop.is_set() and time.monotonic() < sh.deadline:
                try:
                    sock, _ = connect(
                        HOST, sh.broker_port, f"cams-{self.index}-{time.time_ns()}", 2.0
                    )
                except OSError:
                    sh.stop.wait(0.05)  # the broker is down: try again
                    continue
                self.connects += 1
                self._session(sock, sh.life)
        except Exception as e:  # reported with the setting's results
            self.error = f"{type(e).__name__}: {e}"

    def _message(self, mid: int, pid: int) -> bytes:
        c, stream = self.rng.choice(self.cams), pick_stream(self.rng)
        self.frames[c] += 1
        doc = make_payload(self.rng, stream, time.time(), self.frames[c], c % 3 == 2)
        doc[ID_FIELD[stream]] = f"m{mid}"
        return publish_packet(
            self.topics[(c, stream)], pid, json.dumps(doc, separators=(",", ":")).encode()
        )

    def _session(self, sock: socket.socket, life: int) -> None:
        sh = self.shared
        inflight: dict[int, int] = {}  # packet id -> message id
        closed = threading.Event()

        def on_acks(buf: bytes, packets: list[tuple[int, int, int]], _: bytes) -> None:
            t = sh.now()
            for first, j, end in packets:
                if first >> 4 == 4 and end - j >= 2:  # PUBACK
                    mid = inflight.pop(struct.unpack_from("!H", buf, j)[0], None)
                    if mid is not None and (end - j < 3 or buf[j + 2] < 0x80):
                        sh.state[mid], sh.ack_t[mid] = ACKED, t

        def reader() -> None:
            with contextlib.suppress(OSError, ValueError):
                read_packets(sock, sh.deadline + 30, on_acks)
            closed.set()

        threading.Thread(target=reader, daemon=True).start()
        start, sent, pid = time.monotonic(), 0, 0
        try:
            while not closed.is_set() and not sh.stop.is_set() and time.monotonic() <= sh.deadline:
                now = time.monotonic()
                parts = []
                for _ in range(max(0, min(int(self.rate * (now - start)) - sent, BURST,
                                          WINDOW - len(inflight)))):  # fmt: skip
                    if (mid := sh.new_id()) is None:
                        sh.stop.set()
                        break
                    for _ in range(65535):  # the next packet id not in flight
                        if (pid := pid % 65535 + 1) not in inflight:
                            break
                    sh.state[mid], sh.sent_life[mid], inflight[pid] = SENT, life, mid
                    parts.append(self._message(mid, pid))
                if parts:
                    sock.sendall(b"".join(parts))
                    sent, self.published = sent + len(parts), self.published + len(parts)
                time.sleep(max(0.0, now + TICK_S - time.monotonic()))  # pacing the publisher
            until = time.monotonic() + 10.0  # a normal end: wait for the last PUBACKs
            while inflight and not closed.is_set() and time.monotonic() < until:
                time.sleep(0.02)
            if not closed.is_set():
                sock.sendall(b"\xe0\x00")
        except OSError:
            pass  # the broker died: what is in flight stays unconfirmed
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            closed.wait(5)
            sock.close()


# -- the tap: a relay between the agent and the broker that reads what passes -----------------


class Tap:
    """Listens on a loopback port for the agent; relays each connection to the broker and
    records the broker's PUBLISHes (message id, DUP, packet id), CONNACK and SUBACK, and the
    agent's PUBACKs, in `shared`. Packets are read before they are passed on."""

    def __init__(self, shared: Shared) -> None:
        self.shared, self.connections = shared, 0
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
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
            life, pids = sh.life, dict[int, int]()  # packet id -> message id, this connection
            self._socks += [agent_side, broker_side]
            for src, dst, see in ((broker_side, agent_side, self._from_broker),
                                  (agent_side, broker_side, self._from_agent)):  # fmt: skip
                t = threading.Thread(
                    target=self._pump, args=(src, dst, see, life, pids), daemon=True
                )
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, see: Any, life: int,
              pids: dict[int, int]) -> None:  # fmt: skip
        def on(buf: bytes, packets: list[tuple[int, int, int]], data: bytes) -> None:
            see(buf, packets, life, pids)
            dst.sendall(data)

        try:
            read_packets(src, self.shared.deadline + 60, on)
        except (OSError, ValueError):
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _from_broker(self, buf: bytes, packets: list[tuple[int, int, int]], life: int,
                     pids: dict[int, int]) -> None:  # fmt: skip
        sh = self.shared
        for first, j, end in packets:
            kind = first >> 4
            if kind == 3:  # PUBLISH
                k = j + 2 + struct.unpack_from("!H", buf, j)[0]
                pid = 0
                if (first >> 1) & 3:  # QoS > 0: a packet id
                    pid, k = struct.unpack_from("!H", buf, k)[0], k + 2
                plen, mult = 0, 1
                for _ in range(4):  # the properties' length, a varint
                    b, k = buf[k], k + 1
                    plen, mult = plen + (b & 0x7F) * mult, mult * 128
                    if not b & 0x80:
                        break
                if (m := ID_RE.search(buf, k + plen, end)) is None:
                    sh.unidentified_publishes += 1
                    continue
                pids[pid] = int(m.group(1))
                sh.delivered(pids[pid], life, bool(first & 0x08), pid)
            elif kind == 2 and end - j >= 2:  # CONNACK
                sh.session_present.setdefault(life, bool(buf[j] & 1))
            elif kind == 9:  # SUBACK
                sh.suback_t.setdefault(life, sh.now())

    def _from_agent(self, buf: bytes, packets: list[tuple[int, int, int]], life: int,
                    pids: dict[int, int]) -> None:  # fmt: skip
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
        for t in (self._accepting, *self._threads):
            t.join(timeout=2)


# -- one setting --------------------------------------------------------------------------------


class WriteMeter:
    """/proc/<pid>/io write_bytes of one role (broker or agent), summed over its processes;
    track() a new process, sample() now and then, and once more just before it is killed."""

    def __init__(self) -> None:
        self.total, self._last = 0, 0
        self._stat: ProcStat | None = None

    def track(self, p: Agent | Mosquitto) -> None:
        self._stat, self._last = ProcStat(pid(p)), 0
        self.sample()

    def sample(self) -> None:
        with contextlib.suppress(OSError, KeyError, ValueError):
            now = self._stat.io()["write_bytes"] if self._stat else self._last
            self.total, self._last = self.total + max(0, now - self._last), now


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


def run_setting(setting: Setting, opts: Options) -> dict[str, Any]:
    work = fresh_dir(f"{NAME}/{setting.key}")
    budget_s = sum(opts.gaps) + opts.tail_s + opts.cuts * (RESTART_TIMEOUT_S + 15) + 240
    deadline = time.monotonic() + budget_s
    # Message ids for the whole load (restarts take ~2 s; running out stops the publishing and
    # is reported as an error).
    capacity = int(opts.rate * (sum(opts.gaps) + opts.tail_s + opts.cuts * 15 + 30) * 1.1) + 10_000
    receiver = Receiver(work / "cloud").start()
    broker = Mosquitto(work / "mosquitto", persistence=setting.persistence,
                       autosave_interval=setting.autosave_interval,
                       autosave_on_changes=setting.autosave_on_changes)  # fmt: skip
    shared = Shared(capacity, broker.port, deadline)
    res: dict[str, Any] = {"key": setting.key, "name": setting.name,
                           "conf": (work / "mosquitto" / "mosquitto.conf").read_text()}  # fmt: skip
    say(f"\n[{NAME}] ({setting.key}) {setting.name}: broker on {broker.port}, work dir {work}")
    tap: Tap | None = None
    agent: Agent | None = None
    links: list[CameraLink] = []
    cuts: list[Cut] = []
    meters = {"broker": WriteMeter(), "agent": WriteMeter()}
    last_status: dict[str, Any] = {}
    errors: list[str] = []
    db_path, db_max = work / "mosquitto" / "mosquitto.db", 0

    def subscribed(a: Agent) -> Agent:
        meters["agent"].track(a)

        def connected() -> bool:
            if not a.running:
                raise RuntimeError(f"the agent exited:\n{a.log_text()[-2000:]}")
            return bool(dig(a.status(), "mqtt", "connected"))

        wait_for(connected, timeout_s=RESTART_TIMEOUT_S, what="agent subscribed")
        return a

    try:
        broker.start()
        meters["broker"].track(broker)
        tap = Tap(shared) if opts.tap else None
        agent = subscribed(start_agent(
            work, tap.port if tap else broker.port, receiver.url, ready=False, gateway_id=GATEWAY,
            client_id=CLIENT_ID,
            buffer={"durability": opts.durability} if opts.durability else {}))  # fmt: skip
        shared.t0 = time.monotonic()
        shared.suback_t[0] = 0.0  # the agent subscribed before the load started
        for i in range(CONNECTIONS):
            cams = list(range(i, opts.cameras, CONNECTIONS))
            links.append(
                CameraLink(shared, i, cams, opts.rate / opts.cameras * len(cams), opts.seed)
            )
            links[-1].start()
        primed = not setting.persistence
        for k in range(opts.cuts + 1):
            segment_end = time.monotonic() + (opts.gaps[k] if k < opts.cuts else opts.tail_s)
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
                    if (st := agent.status()) is not None:
                        last_status = dict(st.get("ingest", {}))
                time.sleep(max(0.0, min(0.1, segment_end - now)))
            if k == opts.cuts:
                break
            cut = Cut(k + 1, at_s=round(shared.now(), 2), agent_status=last_status)
            last_status = {}
            for m in meters.values():
                m.sample()  # a last reading before the process is killed
            killed_at = time.monotonic()
            agent.signal(signal.SIGKILL)  # the power cut: both at once
            broker.signal(signal.SIGKILL)
            agent.wait(timeout_s=10)
            broker.wait(timeout_s=10)
            shared.life = k + 1
            meters["broker"].track(broker.start())
            agent = subscribed(respawn(agent, ready=False))
            cut.down_s = round(time.monotonic() - killed_at, 2)
            cuts.append(cut)
            say(f"[{NAME}] ({setting.key}) cut {cut.k} at {cut.at_s:.1f} s; back in {cut.down_s} s")
        load_s = shared.now()
        for m in meters.values():
            m.sample()
        shared.stop.set()
        for link in links:
            link.join(timeout=20)
        a = agent  # windows close once the cameras are silent (idle_close_s)
        try:
            wait_for(
                lambda: idle(a.status()),
                what="the agent to drain",
                poll_s=0.25,
                timeout_s=min(DRAIN_TIMEOUT_S, max(1.0, deadline - time.monotonic())),
            )
            wait_quiet(receiver, SETTLE_S, timeout_s=60)
        except TimeoutError as e:
            errors.append(str(e))
        final = dict(dig(agent.status(), "ingest") or {})
        for m in meters.values():
            m.sample()
        if (exit_code := agent.stop(timeout_s=20)) != 0:
            errors.append(f"the agent's final SIGTERM exit code was {exit_code}")
        with contextlib.suppress(TimeoutError):
            wait_quiet(receiver, 1.0, timeout_s=15)
        res.update(
            load_s=round(load_s, 1), final_agent_status=final,
            **{f"{k}_write_bytes": m.total for k, m in meters.items()},
            **{f"{k}_write_mb_s": round(m.total / load_s / 1e6, 3) for k, m in meters.items()},
        )  # fmt: skip
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
    saves = broker_saves(broker.log_path)
    res.update(errors=errors, camera_connects=sum(link.connects for link in links),
               tap_connections=tap.connections if tap else None, broker_saves=saves,
               broker_db_max_bytes=db_max if setting.persistence else None)  # fmt: skip
    try:
        res.update(analyse(shared, receiver.db, cuts, opts))
        for i, c in enumerate(res["cuts"]):
            # saves during the broker life the cut ended; what the next agent skipped (its last
            # /status before the next cut, or at the end)
            c["broker_saves_before"] = saves[c["cut"] - 1] if c["cut"] <= len(saves) else None
            after = (cuts[i + 1].agent_status if i + 1 < len(cuts)
                     else res.get("final_agent_status")) or {}  # fmt: skip
            c["agent_skipped_after"] = [
                after.get("redelivered_skipped"),
                after.get("replays_skipped"),
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
            if "mosquitto version" in line and line.endswith(("starting", "terminating")):
                stopping = line.endswith("terminating")
                lives += [] if stopping else [0]
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


def analyse(shared: Shared, db: Path, cuts: list[Cut], opts: Options) -> dict[str, Any]:
    n, tap, lives = shared.ids, opts.tap, opts.cuts + 1
    counts, unidentified, received_total = received_counts(db, shared.capacity)
    # Per broker life L (0 before the first cut, L after the L-th): published, doubled and
    # replays (a replay delivered in life L came after cut L); lost per cut (index cuts + 1:
    # after the last cut).
    published = [0] * lives
    lost = [dict.fromkeys(LOSS_KINDS, 0) for _ in range(lives + 1)]
    doubled = [dict.fromkeys(DOUBLE_KINDS, 0) for _ in range(lives)]
    replays = [{"delivered": 0, "dup": 0, "same_pid": 0, "acked_before": 0} for _ in range(lives)]
    unconfirmed = unconfirmed_arrived = 0
    for mid in range(n):
        st, got, life, first = (shared.state[mid], counts[mid], shared.sent_life[mid],
                                shared.first_life[mid])  # fmt: skip
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
                    kind = "agent_acked" if shared.agent_ack_life[mid] >= 0 else "at_agent_unacked"
                # Lost at the cut that ended its broker life, or, for want of a subscriber,
                # at the restart that began it.
                lost[life if kind == "no_subscriber" else life + 1][kind] += 1
        elif st == SENT:
            unconfirmed += 1
            unconfirmed_arrived += got > 0
        extras = shared.extra.get(mid, [])
        for e_life, dup, p_id in extras:
            if e_life > first:
                r = replays[e_life]
                r["delivered"] += 1
                r["dup"] += dup
                r["same_pid"] += p_id == shared.first_pid[mid]
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
    # Per cut: c.k is the broker life that began after it.
    per_cut = [{
        "cut": c.k, "at_s": c.at_s, "gap_s": round(opts.gaps[c.k - 1], 1), "down_s": c.down_s,
        "published_before": published[c.k - 1], "lost": lost[c.k],
        "lost_total": sum(lost[c.k].values()), "doubled": doubled[c.k],
        "doubled_total": sum(doubled[c.k].values()), "replays": replays[c.k],
        "session_present": shared.session_present.get(c.k) if tap else None,
        "agent_status_before": {k: c.agent_status.get(k) for k in (
            "received", "counted", "acked", "redelivered_skipped", "replays_skipped")
            if k in c.agent_status},
    } for c in cuts]  # fmt: skip
    totals_lost = {k: sum(x[k] for x in lost) for k in LOSS_KINDS}
    totals_doubled = {k: sum(x[k] for x in doubled) for k in DOUBLE_KINDS}
    return {
        "ids": n, "published": sum(published), "unconfirmed": unconfirmed,
        "unconfirmed_arrived": unconfirmed_arrived, "received_total": received_total,
        "received_unidentified": unidentified, "lost": sum(totals_lost.values()),
        "lost_by_kind": totals_lost, "doubled": sum(totals_doubled.values()),
        "doubled_by_kind": totals_doubled,
        "replays": {k: sum(x[k] for x in replays) for k in replays[0]},
        "first_deliveries_with_dup": shared.first_dup if tap else None,
        "tap_unidentified_publishes": shared.unidentified_publishes if tap else None,
        "cuts": per_cut,
        "after_last_cut": {
            "published": published[lives - 1], "lost": lost[lives],
            "lost_total": sum(lost[lives].values()) + sum(lost[0].values()),
            # doubles of life 0 (before any cut) are the agent's own, kept with the total
            "doubled_before_first_cut": sum(doubled[0].values()),
        },
        "agent_skips_before_cuts": {k: sum(int(c.agent_status.get(k) or 0) for c in cuts)
                                    for k in ("redelivered_skipped", "replays_skipped")},
    }  # fmt: skip


# -- the report ---------------------------------------------------------------------------------


def _n(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.3f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _row(*cells: Any) -> str:
    return "| " + " | ".join(_n(c) if not isinstance(c, str) else c for c in cells) + " |"


HEAD = """# Power cuts: Mosquitto and the agent SIGKILLed together (issue #24)

`{doc[command]}` on {doc[started]}, {doc[seconds]:.0f} s{smoke}. Written by \
`bench/power_cut.py` (its docstring says how it works).

- machine: {m[nproc]} x {m[cpu_model]}, {m[ram_gib]} GiB, kernel {m[kernel]}, {m[filesystem]}; \
Python {m[python]}; {m[mosquitto]}; shared, machine busy {busy} % during the run
- agent code: {doc[agent_commit_at_start]} at the start, {doc[agent_commit_at_end]} at the end \
(another engineer edits agent/ in this tree)
- load: {o[cameras]} cameras, {o[rate]:,.0f} msgs/s in all, loopback; agent \
`buffer.durability = "{durability}"`{default}; shipped defaults otherwise
- cuts per setting: {o[cuts]}, seed {o[seed]}; gaps (s, load resumed -> next cut, the same for \
every setting): {gaps}; then {o[tail_s]:.0f} s of load after the last cut
- observer: {observer}

## Per setting

published: messages a camera had its PUBACK for. lost: of those, never counted by the receiver. \
doubled: extra counts at the receiver (any message). Write rates: bytes the process sent to the \
block layer (/proc/PID/io write_bytes), all its lives, per second of load (MB = 10^6 bytes).

| setting | cuts | published | lost | doubled | broker write MB/s | agent write MB/s | broker \
saves | errors |
|---|---:|---:|---:|---:|---:|---:|---:|---|
"""

WHOSE = """
## Whose loss, what doubled

Lost, by where the message was at the cut: *no subscriber*: acked by a restarted broker that had \
no session for the agent, before the agent subscribed again; *broker memory*: never sent to the \
agent, gone with the broker; *at agent, unacked*: sent to the agent, which had not acked it (the \
broker's copy was the durable one); *agent acked*: the agent acked it and it never arrived (the \
agent's loss). Doubled: *replay*: the extra copy came in a later broker life (after a restart); \
*same life*: a redelivery without a restart; *agent self*: more counts than deliveries. Replays \
delivered: messages the broker sent the agent again after a restart, with how many had DUP=1, \
their original packet id, and had been acked by the agent before the cut (counted already: the \
rest were not yet, and the snapshot saved them).

| setting | no subscriber | broker memory | at agent, unacked | agent acked | doubled: replay | \
same life | agent self | replays delivered | with DUP | same packet id | acked before | \
unconfirmed (no PUBACK) / arrived |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
"""

CUTS = """| cut | at s | gap s | down s | published before | lost (no sub / broker / at agent / \
agent acked) | doubled after it | replays delivered (DUP, same id, acked before) | session kept \
| broker saves before | agent skipped after it (journal / replay memory) |
|---:|---:|---:|---:|---:|---|---:|---|---|---:|---:|"""


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    o, results = doc["options"], doc["settings"]
    text = HEAD.format(
        doc=doc, m=doc["machine"], o=o, busy=doc["noise"].get("machine_busy_pct", "?"),
        smoke=" (**smoke run**: few cuts, short gaps; indicative only)" if doc["quick"] else "",
        durability=o["durability"] or "message",
        default="" if o["durability"] else " (the default)",
        gaps=", ".join(f"{g:.1f}" for g in o["gaps"]),
        observer="the tap (relay between agent and broker)" if o["tap"] else "none",
    )  # fmt: skip
    lines = [_row(f"({r['key']}) {r['name']}", len(r.get("cuts", [])), *(r.get(k) for k in (
        "published", "lost", "doubled", "broker_write_mb_s", "agent_write_mb_s")),
        str(sum(r.get("broker_saves") or [])), "; ".join(r["errors"]) or "-")
        for r in results]  # fmt: skip
    lines.append(WHOSE.rstrip("\n"))
    for r in (r for r in results if "lost_by_kind" in r):
        lk, dk, rp = r["lost_by_kind"], r["doubled_by_kind"], r["replays"]
        lines.append(_row(f"({r['key']})", *(lk[k] for k in LOSS_KINDS[:4]),
                          *(dk[k] for k in DOUBLE_KINDS[:3]), *rp.values(),
                          f"{_n(r['unconfirmed'])} / {_n(r['unconfirmed_arrived'])}"))  # fmt: skip
    for r in results:
        conf = " / ".join(ln for ln in r["conf"].splitlines()
                          if not ln.startswith(("listener", "persistence_loc")))  # fmt: skip
        lines += ["", f"### ({r['key']}) {r['name']}", "", f"mosquitto.conf: `{conf}`", ""]
        if "cuts" not in r:
            lines.append("No figures: " + ("; ".join(r["errors"]) or "?"))
            continue
        lines.append(CUTS)
        for c in r["cuts"]:
            lk, rp = c["lost"], c["replays"]
            lines.append(_row(
                c["cut"], f"{c['at_s']:.1f}", f"{c['gap_s']:.1f}", f"{c['down_s']:.1f}",
                c["published_before"], f"**{_n(c['lost_total'])}** ("
                + " / ".join(str(lk[k]) for k in LOSS_KINDS[:4]) + ")",
                f"**{_n(c['doubled_total'])}**",
                f"{_n(rp['delivered'])} ({rp['dup']}, {rp['same_pid']}, {rp['acked_before']})",
                c["session_present"], c.get("broker_saves_before"),
                " / ".join(_n(x) for x in c["agent_skipped_after"])))  # fmt: skip
        t = r["after_last_cut"]
        lines.append(f"| after the last | | | | {_n(t['published'])} | **{_n(t['lost_total'])}** "
                     "| | | | | |")  # fmt: skip
        lines += ["", (
            f"Load {r.get('load_s')} s; broker {_n(r.get('broker_write_bytes'))} bytes written, "
            f"agent {_n(r.get('agent_write_bytes'))}; broker saves per life {r['broker_saves']}; "
            f"largest broker db seen {_n(r['broker_db_max_bytes'])} bytes; receiver counted "
            f"{_n(r['received_total'])} messages ({_n(r['received_unidentified'])} without an "
            f"id); first deliveries with DUP {_n(r['first_deliveries_with_dup'])}; camera "
            f"connects {r['camera_connects']}.")]  # fmt: skip
    lines += ["", "## Notes", ""] + [f"- {x}" for x in doc["notes"]] + [""]
    path.write_text(text + "\n".join(lines))


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
    if not keys or any(k not in BY_KEY for k in keys):
        p.error(f"unknown settings {args.settings}: choose from {', '.join(BY_KEY)}")

    def default(v: float | None, quick: float, full: float) -> float:
        return v if v is not None else quick if args.quick else full

    cuts, tail = int(default(args.cuts, 3, 20)), default(args.tail, 5.0, 15.0)
    min_gap, max_gap = default(args.min_gap, 6.0, 15.0), default(args.max_gap, 14.0, 75.0)
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
    results = []
    for key in keys:
        results.append(r := run_setting(BY_KEY[key], opts))
        report.figure(key, r)
        say(f"[{NAME}] ({key}) published {_n(r.get('published'))}, lost {_n(r.get('lost'))} "
            f"{r.get('lost_by_kind', '')}, doubled {_n(r.get('doubled'))} "
            f"{r.get('doubled_by_kind', '')}; replays {r.get('replays', '')}; broker "
            f"{_n(r.get('broker_write_mb_s'))} MB/s, agent {_n(r.get('agent_write_mb_s'))} MB/s"
            + (f"; errors: {r['errors']}" if r["errors"] else ""))  # fmt: skip
    for note in NOTES:
        report.note(note)
    report.figure("options", asdict(opts))
    doc = {**report.finish(args.json_out), "command": command, "quick": args.quick,
           "options": asdict(opts), "settings": results}  # fmt: skip
    if args.out is not None:
        write_markdown(args.out, doc)
        say(f"[{NAME}] wrote {args.out}")
    return 0 if all(not r["errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

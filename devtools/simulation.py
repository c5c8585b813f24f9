"""Deterministic simulation of the durable core (docs/design.md, "Delivery guarantees", says why).

One seed decides everything. The real aggregator, ack ledger, intake, checkpoint, outbox (a
real SQLite file; the same SQL as the agent, run inline) and forwarder (a real httpx client)
run on an asyncio loop whose clock is virtual and whose selector never touches a socket, against
a model broker session (redelivery with DUP, packet ids reused after PUBACK) and a model cloud
(dedup by (gateway, seq), contiguity and key checks; 2xx, 409, 429/503 with Retry-After, 500,
413, 422, a timeout after the batch landed, a reset). Faults land at any loop step: a crash
(every object in memory lost; the file and the broker's unacked messages kept), a graceful stop,
a gateway clock step either way, a failed (disk-full) checkpoint, ack pressure, a tiny quota.

After each schedule the cloud's table plus the dead letters must equal what the broker accepted,
exactly. A failure names its seed; `python -m devtools.simulation --seed N -v` replays it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gzip
import itertools
import json
import logging
import random
import selectors
import shutil
import sqlite3
import sys
import tempfile
import time
import weakref
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from agent.app.service import build_pipeline, shutdown_pipeline
from agent.config.settings import Settings, StreamSettings
from agent.durable.checkpoint import Checkpointer
from agent.durable.outbox import Outbox
from agent.durable.store import Store
from agent.ops.pipeline import Pipeline

T = TypeVar("T")
EPOCH = 1_764_126_000.0
GATEWAY = "gw-sim"


class Crash(BaseException):
    """The simulated process died here (a BaseException: nothing may catch it)."""


class Hang(Exception):
    """Every task waits on something that can never happen."""


class Violation(AssertionError):
    """A guarantee was broken."""


VIOLATIONS: list[str] = []


def violated(msg: str) -> Violation:
    """Record a violation (it may be raised inside a task that nobody awaits) and return it."""
    VIOLATIONS.append(msg)
    return Violation(msg)


# -- the virtual loop ------------------------------------------------------------------------


class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0  # monotonic
        self.offset = EPOCH  # wall - monotonic; steps move it

    def wall(self) -> float:
        return self.t + self.offset

    def mono(self) -> float:
        return self.t


class SimSelector(selectors.BaseSelector):
    """Never waits: a timeout advances the virtual clock instead; `on_step` runs each step."""

    def __init__(self, clock: VirtualClock, on_step: Callable[[], None]) -> None:
        self._clock = clock
        self._on_step = on_step
        self._map: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, self._fd(fileobj), events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._map.pop(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self._map.pop(fileobj, None)
        return self.register(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Hang("no task can make progress")
        if timeout > 0:
            self._clock.t += timeout
        self._on_step()
        return []

    def get_map(self) -> Any:
        return self._map

    def close(self) -> None:
        self._map.clear()

    @staticmethod
    def _fd(fileobj: Any) -> int:
        return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


class SimLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock, on_step: Callable[[], None]) -> None:
        super().__init__(SimSelector(clock, on_step))
        self._vclock = clock
        # Each task's creation number: `asyncio.all_tasks` is a set in address order, which
        # differs between runs; a crash cancels what was running in this order instead.
        self.born: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()
        births = itertools.count()

        def numbered(
            loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
        ) -> asyncio.Task[Any]:
            task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **kwargs)
            self.born[task] = next(births)
            return task

        self.set_task_factory(numbered)

    def time(self) -> float:
        return self._vclock.t


# -- the world: broker, cloud, the process ---------------------------------------------------


@dataclass
class Msg:
    n: int
    camera: str
    stream: str
    topic: bytes
    payload: bytes
    value: int
    cls: str


@dataclass
class Params:
    """One schedule's settings, drawn from the seed."""

    cameras: int
    messages: int
    rate: float
    mid_space: int
    receive_maximum: int
    max_ack_delay_s: float
    max_batch_chunks: int
    quota_chunks: int | None
    timeout_s: float
    crash_p: float
    stop_p: float
    step_p: float
    disk_full_p: float
    drop_p: float
    identical_payloads: bool
    reuse_in_flight: bool
    piece_bytes: int
    answers: dict[str, float]
    # buffer.durability; drawn from its own generator (see World) so that adding it left
    # every earlier seed's schedule as it was.
    durability: str = "window"
    # The model broker's persistence (drawn from their own generator, see World): a snapshot of
    # the session every `broker_autosave_s`; at a broker crash it restores the last one
    # (messages in flight then come back with DUP, original ids, though acked since; those
    # accepted after it are the broker's loss), or it restarts without the session.
    broker_autosave_s: float = 1.0
    broker_restore_p: float = 0.0
    broker_forget_p: float = 0.0
    power_cut_p: float = 0.0
    # Cameras stamp their messages (true time, `ts`), and the gateway's wall clock may step by
    # a year either way (a battery-less RTC after a power cut): camera data must not move.
    camera_time: bool = False
    year_step_p: float = 0.0


def draw_params(rng: random.Random) -> Params:
    answers = {
        "ok": 6.0,
        "409": 0.3 * rng.random(),
        "503": rng.random(),
        "429": 0.5 * rng.random(),
        "500": rng.random(),
        "413": 0.5 * rng.random(),
        "422": 0.2 * rng.random(),
        "landed_timeout": 1.5 * rng.random(),
        "slow": rng.choice([0.0, 1.0, 6.0]) * rng.random(),
        "timeout": 0.5 * rng.random(),
        "reset": 0.5 * rng.random(),
    }
    identical = rng.random() < 0.3
    # Mosquitto 2.0.11: past Receive Maximum it sends its whole queue after the first PUBACKs,
    # and ids come in sequence even when the id is still in flight (agent/intake/acks.py). Not with
    # byte-identical payloads: two in-flight messages with one id and the same bytes cannot be
    # told apart by anyone.
    reuse = not identical and rng.random() < 0.25
    mid_space = rng.choice([8, 24, 65535])
    receive_maximum = rng.choice([3, 6, 20, 100])
    rate = rng.choice([5.0, 40.0, 200.0])
    if identical:
        # Byte-identical messages under a reused packet id are told apart only through the
        # broker's id allocation: Mosquitto hands ids out in sequence, so an id comes back
        # tens of thousands of messages after its PUBACK, long after its journal row is
        # pruned. Model that proportion: a 64-id space, few in flight, a moderate rate.
        mid_space, receive_maximum, rate = 64, rng.choice([3, 6, 20]), rng.choice([5.0, 40.0])
    return Params(
        cameras=rng.randint(1, 4),
        messages=rng.randint(10, 140),
        rate=rate,
        mid_space=mid_space,
        identical_payloads=identical,
        reuse_in_flight=reuse,
        receive_maximum=receive_maximum,
        max_ack_delay_s=rng.choice([0.2, 1.0, 10.0]),
        max_batch_chunks=rng.choice([1, 2, 5, 50]),
        quota_chunks=rng.choice([None, None, 6, 15, 40]),
        timeout_s=rng.choice([0.3, 2.0]),
        crash_p=rng.choice([0.0, 0.0005, 0.002, 0.005]),
        stop_p=rng.choice([0.0, 0.0005, 0.002]),
        step_p=rng.choice([0.0, 0.001]),
        disk_full_p=rng.choice([0.0, 0.0, 0.05]),
        drop_p=rng.choice([0.0, 0.002]),
        piece_bytes=rng.choice([4 * 1024**2, 4 * 1024**2, 400, 1500]),
        answers=answers,
    )


@dataclass
class InFlight:
    mid: int
    msg: Msg
    # When it was last sent on this connection; None while it waits for its resend (a broker
    # resends at most Receive Maximum at once, Mosquitto after a restart; the rest as PUBACKs
    # free room): its PUBACK cannot be late yet.
    sent_at: float | None


class Broker:
    """One persistent MQTT session: unacked messages are kept and redelivered with DUP after a
    reconnect. A packet id is reused only after its PUBACK (next free id, in order) — or, with
    `reuse_in_flight` (Mosquitto 2.0.11), Receive Maximum holds only until the first PUBACK and
    ids are handed out in sequence whether in flight or not."""

    def __init__(self, msgs: list[Msg], p: Params, clock: VirtualClock) -> None:
        self.queue: deque[Msg] = deque(msgs)
        # In send order; with reuse_in_flight one mid may appear twice.
        self.inflight: list[InFlight] = []
        self._clock = clock
        self.acked: set[int] = set()  # message numbers acked
        self.connected = False
        self.receive_maximum = p.receive_maximum
        self._space = p.mid_space
        self._reuse = p.reuse_in_flight
        self._flooding = False
        self._next_mid = 1
        self.deliver: Callable[[Msg, int, bool], None] | None = None
        self.changed = asyncio.Event()
        # The last snapshot of the session: (in flight, next packet id), and when it was taken.
        self.saved: tuple[list[InFlight], int] = ([], 1)
        self.saved_at = 0.0
        # Messages first sent since the snapshot (they were in its queue), and those sent again
        # as new after a restore: the agent counts such a message once more when neither its
        # ledger nor its memory holds the key, or when the restored ids happen to continue its
        # frontier (agent/intake/acks.py _check_fresh; a documented limit): at most twice.
        self.sent_since_save: list[Msg] = []
        self.requeued: Counter[int] = Counter()
        # Messages the broker itself lost (accepted after its last snapshot, or with a session
        # it forgot): counted at most once, not exactly once.
        self.lost: set[int] = set()

    def autosave(self) -> None:
        self.saved = ([InFlight(e.mid, e.msg, None) for e in self.inflight], self._next_mid)
        self.saved_at = self._clock.t
        self.sent_since_save = []

    def restore(self) -> int:
        """Crash and restore the last snapshot; how many acked messages come back."""
        inflight, next_mid = self.saved
        kept = {e.msg.n for e in inflight}
        # What it sent since were still queued in the snapshot: they come again, new (no DUP),
        # though the agent may have counted them (agent/intake/acks.py _check_fresh).
        requeued = [m for m in self.sent_since_save if m.n not in kept]
        again = {m.n for m in requeued}
        self.requeued.update(again)
        self.lost |= {e.msg.n for e in self.inflight if e.msg.n not in kept | again}
        back = sum(1 for e in inflight if e.msg.n in self.acked)
        back += sum(1 for m in requeued if m.n in self.acked)
        self.inflight = [InFlight(e.mid, e.msg, None) for e in inflight]
        self.queue.extendleft(reversed(requeued))
        self.sent_since_save = []
        self._next_mid = next_mid
        self.disconnect()
        return back

    def forget(self) -> None:
        """Restart without the session (no persistence): what was in flight is gone."""
        self.lost |= {e.msg.n for e in self.inflight}
        self.inflight = []
        self._next_mid = 1
        self.saved = ([], 1)
        self.disconnect()

    @property
    def sent_at(self) -> list[float]:
        """When each message delivered on this connection and not yet acked was sent."""
        return [e.sent_at for e in self.inflight if e.sent_at is not None]

    def connect(self, deliver: Callable[[Msg, int, bool], None]) -> None:
        self.connected = True
        self.deliver = deliver
        self._flooding = False
        first = min(self.receive_maximum, self._space)
        for i, e in enumerate(self.inflight):
            e.sent_at = self._clock.t if i < first else None
        for e in self.inflight[:first]:
            deliver(e.msg, e.mid, True)

    def disconnect(self) -> None:
        self.connected = False
        self.deliver = None

    def ack(self, mid: int, qos: int) -> None:
        if not self.connected:
            return
        # The oldest delivered under this id, as Mosquitto does.
        i = next(
            (i for i, e in enumerate(self.inflight) if e.mid == mid and e.sent_at is not None),
            None,
        )
        if i is None:
            raise violated(f"PUBACK for packet id {mid}, which is not in flight")
        self.acked.add(self.inflight.pop(i).msg.n)
        self._flooding = self._reuse
        self.changed.set()

    def _waiting(self) -> InFlight | None:
        return next((e for e in self.inflight if e.sent_at is None), None)

    def can_send(self) -> bool:
        if not (self.connected and (self.queue or self._waiting() is not None)):
            return False
        if self._flooding:
            return True
        return len(self.sent_at) < min(self.receive_maximum, self._space)

    def send_one(self) -> None:
        assert self.deliver is not None
        waiting = self._waiting()
        if waiting is not None:  # redeliveries first, in their order, before anything new
            waiting.sent_at = self._clock.t
            self.deliver(waiting.msg, waiting.mid, True)
            return
        msg = self.queue.popleft()
        self.sent_since_save.append(msg)
        mid = self._allocate()
        self.inflight.append(InFlight(mid, msg, self._clock.t))
        self.deliver(msg, mid, False)

    def _allocate(self) -> int:
        in_flight = {e.mid for e in self.inflight}
        for _ in range(self._space):
            mid = self._next_mid
            self._next_mid = mid % self._space + 1
            if self._reuse or mid not in in_flight:
                return mid
        raise violated("no free packet id")

    @property
    def done(self) -> bool:
        return not self.queue and not self.inflight


class Cloud(httpx.AsyncBaseTransport):
    """The cloud's contract: dedup by (gateway, seq), revs added, batches tile their range."""

    def __init__(self, world: World) -> None:
        self.w = world
        self.stored: dict[int, dict[str, Any]] = {}
        self.covered: list[tuple[int, int]] = []
        self.key_body: dict[str, bytes] = {}
        self.landed_keys: set[str] = set()
        self.calm = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        w = self.w
        token = w.incarnation
        raw = await request.aread()
        body = gzip.decompress(raw) if request.headers.get("Content-Encoding") == "gzip" else raw
        key = request.headers["Idempotency-Key"]
        seen = self.key_body.setdefault(key, body)
        if seen != body:
            raise violated(f"Idempotency-Key {key} reused for other content")
        batch = json.loads(body)
        self._check_tiling(batch, key)
        rng = w.rng
        answer = "ok" if self.calm else w.pick(w.p.answers)
        if key in self.landed_keys and answer in ("413", "422"):
            # A cloud that stored this batch answers a repeat as a duplicate, never a refusal.
            answer = "409"
        timeout_s = float(request.extensions.get("timeout", {}).get("read") or 0.0)
        if answer == "slow":
            # Slower than forward.timeout_s, not forever: the cloud stores the batch either way;
            # the agent sees the answer only if it waits long enough.
            latency = rng.uniform(1.2, 2.5) * w.settings.forward.timeout_s
            await asyncio.sleep(min(latency, timeout_s))
            w.alive(token)
            self._land(batch, key)
            if latency > timeout_s:
                raise httpx.ReadTimeout("timed out")
            return httpx.Response(200, stream=httpx.ByteStream(b"{}"))
        if answer in ("timeout", "landed_timeout", "reset"):
            await asyncio.sleep(rng.uniform(0, timeout_s) if answer == "reset" else timeout_s)
            w.alive(token)
            if answer == "landed_timeout":
                self._land(batch, key)
            if answer == "reset":
                raise httpx.RemoteProtocolError("connection reset")
            raise httpx.ReadTimeout("timed out")
        await asyncio.sleep(rng.expovariate(1 / 0.02))
        w.alive(token)
        status, headers = 200, {}
        if answer == "409" and key in self.landed_keys:
            status = 409
        elif answer in ("503", "429"):
            status = int(answer)
            if rng.random() < 0.7:
                headers["Retry-After"] = str(rng.randint(0, 3))
        elif answer == "500":
            status = 500
        elif answer == "413" and len(batch["chunks"]) > 1:
            status = 413
        elif answer == "422":
            status = 422
        if status == 200:
            self._land(batch, key)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(b"{}"))

    def _check_tiling(self, batch: dict[str, Any], key: str) -> None:
        expect = batch["first_seq"]
        for c in batch["chunks"]:
            if c["seq"] != expect:
                raise violated(f"batch {key}: seq {c['seq']} where {expect} was due (G8)")
            expect = c.get("seq_end", c["seq"]) + 1
        if expect != batch["last_seq"] + 1 or key != f"{GATEWAY}:{batch['first_seq']}-{expect - 1}":
            raise violated(f"batch {key} does not tile its range (G8)")

    def _land(self, batch: dict[str, Any], key: str) -> None:
        self.landed_keys.add(key)
        for c in batch["chunks"]:
            if c["seq"] in self.stored:
                if self.stored[c["seq"]] != c:
                    raise violated(f"seq {c['seq']} sent again with other content (G7)")
                continue
            self.stored[c["seq"]] = c
            self.covered.append((c["seq"], c.get("seq_end", c["seq"])))


def _memory_file(path: Path) -> sqlite3.Connection:
    """A connection to the in-memory database that stands for the outbox file at `path`. It
    lives while any connection to it is open: the world keeps one for the whole schedule, so
    what a run committed outlives the run (a crash included), as the file would. A crash lands
    between transactions, never inside one, so a file's WAL adds nothing here but syscalls."""
    return sqlite3.connect(
        f"file:{path}?mode=memory&cache=shared",
        uri=True,
        isolation_level=None,
        check_same_thread=False,
    )


class SimStore(Store):
    """The real store with the quota measured in chunks (a tiny quota without big files), on
    an in-memory database (see _memory_file)."""

    quota_chunks: int | None = None

    @staticmethod
    def _sqlite_connect(path: Path) -> sqlite3.Connection:
        path.touch()  # the store checks the file is still there (and the same)
        return _memory_file(path)

    def usage(self) -> float:
        if self.quota_chunks is None:
            return 0.0
        return self.chunk_count / self.quota_chunks


WRITES = {"checkpoint", "cut", "acknowledged", "release", "dead_letter", "make_room"}


class InlineRunner:
    """Runs each store transaction inline on the loop; every call is a point where the world
    may crash before or after it, or where the disk may be full."""

    def __init__(self, world: World, token: int) -> None:
        self.w = world
        self.token = token

    async def run(self, name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        w = self.w
        await asyncio.sleep(0)
        w.alive(self.token)
        w.maybe_crash(f"before {name}")
        if name in WRITES:
            # A write takes time (an fsync on slow flash): other tasks, stops and crashes may
            # land while it is pending.
            await asyncio.sleep(w.rng.uniform(0, 0.02))
            w.alive(self.token)
        if name in WRITES and not w.cloud.calm:
            # A full disk fails any write: the checkpoint's, and the forwarder's (cut, delete
            # after an answer, release, dead letter), and compaction.
            p_full = w.p.disk_full_p if name == "checkpoint" else w.p.disk_full_p / 3
            if w.rng.random() < p_full:
                w.disturbed = w.clock.t
                raise sqlite3.OperationalError("database or disk is full")
        result = fn(*args, **kw)
        w.maybe_crash(f"after {name}")
        return result

    def close(self) -> None:
        pass


# -- one schedule ----------------------------------------------------------------------------


@dataclass
class Outcome:
    seed: int
    steps: int = 0
    crashes: int = 0
    stops: int = 0
    clock_steps: int = 0
    broker_restores: int = 0
    year_steps: int = 0
    # Messages the agent counted though they may be replays (agent/intake/acks.py `replayed`).
    possible_doubles: Counter[int] = field(default_factory=Counter)
    redelivered: int = 0
    snapshots: int = 0
    compacted: int = 0
    dead_letters: int = 0
    trace: list[str] = field(default_factory=list)


@functools.cache
def _base_settings() -> Settings:
    """Validated once per process; each schedule copies it with its own values."""
    stream = StreamSettings(
        topic="cameras/{camera}/{stream}",
        time_field="ts",
        numeric=("conf",),
        categorical=("cls",),
        max_categories=10_000,
    )
    return Settings(gateway_id=GATEWAY, streams=(stream,))


class World:
    def __init__(self, seed: int, workdir: Path, *, verbose: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.p = draw_params(self.rng)
        self.p.durability = random.Random(seed * 7919 + 24).choice(["window", "message"])
        broker_rng = random.Random(seed * 7919 + 25)
        self.p.broker_autosave_s = broker_rng.choice([0.3, 1.0, 3.0])
        self.p.broker_restore_p = broker_rng.choice([0.0, 0.0, 0.0005, 0.002])
        self.p.broker_forget_p = broker_rng.choice([0.0, 0.0, 0.0, 0.0005])
        self.p.power_cut_p = broker_rng.choice([0.0, 0.5])
        time_rng = random.Random(seed * 7919 + 26)
        self.p.camera_time = time_rng.random() < 0.5
        self.p.year_step_p = time_rng.choice([0.0, 0.0005, 0.002])
        self.year_steps = random.Random(seed * 7919 + 27)
        self.clock = VirtualClock()
        self.loop = SimLoop(self.clock, self._on_step)
        self.workdir = workdir
        self.msgs = self._messages()
        self.broker = Broker(self.msgs, self.p, self.clock)
        # Monotonic time of the last event that may legitimately hold acks back (a start, a
        # stop, a failed commit, a connection drop); see _check_acks_flow.
        self.disturbed = 0.0
        self.cloud = Cloud(self)
        self.settings = self._settings()
        # The outbox "file" (see _memory_file); the world reads it between runs and at the end.
        self.disk = _memory_file(self.settings.buffer.path)
        self.incarnation = 0
        self.dead = False
        self.out = Outcome(seed)
        self.verbose = verbose
        self.tasks: list[asyncio.Task[None]] = []

    # -- randomness ---------------------------------------------------------------------------

    def pick(self, weights: dict[str, float]) -> str:
        total = sum(weights.values())
        x = self.rng.random() * total
        for k, v in weights.items():
            x -= v
            if x <= 0:
                return k
        return next(iter(weights))

    def _messages(self) -> list[Msg]:
        p, rng = self.p, self.rng
        msgs = []
        streams = ("det", "motion")
        for n in range(p.messages):
            cam = f"cam-{rng.randrange(p.cameras)}"
            stream = rng.choice(streams)
            value = rng.randint(0, 9) if not p.identical_payloads else 1
            # A category unique to each message: the oracle can name a lost or doubled one.
            cls = f"m{n}" if not p.identical_payloads else "person"
            doc: dict[str, Any] = {"conf": value, "cls": cls}
            if not p.identical_payloads:
                doc["i"] = n
                if p.camera_time:
                    # The camera's own (right) clock when it means to publish.
                    doc["ts"] = round(EPOCH + n / p.rate, 3)
            payload = json.dumps(doc, separators=(",", ":")).encode()
            topic = f"cameras/{cam}/{stream}".encode()
            msgs.append(Msg(n, cam, stream, topic, payload, value, cls))
        return msgs

    def _settings(self) -> Settings:
        base = _base_settings()
        p = self.p
        # model_copy does not validate: the schedules go below the operator's bounds (a
        # Receive Maximum of 3).
        return base.model_copy(
            update={
                "mqtt": base.mqtt.model_copy(
                    update={
                        "receive_maximum": p.receive_maximum,
                        "broker_autosave_interval_s": p.broker_autosave_s,
                    }
                ),
                "aggregate": base.aggregate.model_copy(
                    update={"allowed_lateness_s": 0.5, "idle_close_s": 1.5}
                ),
                "buffer": base.buffer.model_copy(
                    update={
                        "durability": p.durability,
                        "path": self.workdir / "buffer.sqlite3",
                        "synchronous": "off",
                        "checkpoint_interval_ms": 100,
                        "max_ack_delay_ms": int(p.max_ack_delay_s * 1000),
                    }
                ),
                "forward": base.forward.model_copy(
                    update={
                        "timeout_s": p.timeout_s,
                        "max_batch_chunks": p.max_batch_chunks,
                        "linger_ms": 50,
                        "backoff_min_s": 0.1,
                        "backoff_max_s": 2.0,
                        "shutdown_drain_s": 1.0,
                        "gzip": True,
                    }
                ),
            }
        )

    # -- faults -------------------------------------------------------------------------------

    def alive(self, token: int) -> None:
        if self.dead or token != self.incarnation:
            raise Crash()

    def maybe_crash(self, where: str) -> None:
        if not self.cloud.calm and self.rng.random() < self.p.crash_p * 3:
            self.die(where)

    def die(self, where: str) -> None:
        if self.dead:
            return
        self.out.crashes += 1
        self.note(f"crash {where}")
        self.dead = True
        self.broker.disconnect()
        raise Crash()

    def note(self, what: str) -> None:
        self.out.trace.append(f"{self.clock.t:9.3f} #{self.incarnation} {what}")
        if self.verbose:
            print(self.out.trace[-1], file=sys.stderr)

    def _on_step(self) -> None:
        self.out.steps += 1
        if self.out.steps > 200_000:
            raise Violation("schedule does not end")
        if VIOLATIONS or (self.out.steps % 16 == 0 and any(_died(t) for t in self.tasks)):
            self._stop_loop = True
            self.loop.stop()
            return
        if self._reconnect_at is not None and self.clock.t >= self._reconnect_at:
            self._reconnect_at = None
            self._connect()
        if self.dead or self.cloud.calm:
            return
        if self.out.steps % 32 == 0:
            self._check_acks_flow()
        b = self.broker
        if self.clock.t - b.saved_at >= self.p.broker_autosave_s:
            b.autosave()
        if self.rng.random() < self.p.crash_p:
            self.note("crash at a loop step")
            self.out.crashes += 1
            self.dead = True
            self.broker.disconnect()
            if self.p.power_cut_p and self.rng.random() < self.p.power_cut_p:
                back = b.restore()
                self.out.broker_restores += 1
                self.note(f"power cut: the broker restores its snapshot of "
                          f"{b.saved_at:.3f} ({back} acked messages come back)")  # fmt: skip
            self._stop_loop = True
            self.loop.stop()
        elif self.rng.random() < self.p.broker_restore_p and b.connected and self.pipeline:
            back = b.restore()
            self.out.broker_restores += 1
            self.note(f"broker crash: restores its snapshot of {b.saved_at:.3f} "
                      f"({back} acked messages come back)")  # fmt: skip
            self.disturbed = self.clock.t
            self._reconnect_at = self.clock.t + self.rng.uniform(0.05, 1.0)
        elif self.rng.random() < self.p.broker_forget_p and b.connected and self.pipeline:
            self.note(f"broker restarts without the session ({len(b.inflight)} in flight lost)")
            b.forget()
            self.out.broker_restores += 1
            self.disturbed = self.clock.t
            self._reconnect_at = self.clock.t + self.rng.uniform(0.05, 1.0)
        elif self.rng.random() < self.p.stop_p and self.stop_requested is not None:
            # A graceful stop (SIGTERM) at any loop step: in the middle of a checkpoint, a
            # send, a compaction.
            self.stop_requested.set()
            self.disturbed = self.clock.t
        elif self.year_steps.random() < self.p.year_step_p:
            step = self.year_steps.choice([-1, 1]) * 365 * 86400.0
            self.clock.offset += step
            self.out.clock_steps += 1
            self.out.year_steps += 1
            self.note(f"gateway clock step {step:+.0f} s (a year; the cameras stay right)")
        elif self.rng.random() < self.p.step_p:
            step = self.rng.choice([-1, 1]) * self.rng.uniform(5, 120)
            self.clock.offset += step
            self.out.clock_steps += 1
            self.note(f"gateway clock step {step:+.1f} s")
        elif self.rng.random() < self.p.drop_p and self.broker.connected and self.pipeline:
            self.note("connection drop")
            self.disturbed = self.clock.t
            self.broker.disconnect()
            self._reconnect_at = self.clock.t + self.rng.uniform(0.05, 1.0)

    def _check_acks_flow(self) -> None:
        """Liveness: while connected and undisturbed, no message waits for its PUBACK longer
        than max_ack_delay_ms plus a little (early acks under pressure must work, and timers
        must not follow the wall clock when the gateway clock steps)."""
        b = self.broker
        if not b.connected or not b.sent_at or self.pipeline is None:
            return
        if self.stop_requested is not None and self.stop_requested.is_set():
            return
        cp = self.checkpointer
        if cp is not None and (cp.carried or cp.snapshots_held):
            # A backlog of closed windows, or of open windows to snapshot under ack pressure,
            # commits piece by piece: acks wait for it, rightly (seed 29013: a 400-byte piece
            # saved one of 13 windows a cycle).
            self.disturbed = self.clock.t
        if cp is not None and (cp.failing_since is not None or cp.buffer_full):
            self.disturbed = self.clock.t  # commits fail or the quota holds acks: rightly
        since = max(min(b.sent_at), self.disturbed)
        limit = self.p.max_ack_delay_s + 1.0
        if self.p.durability == "message":
            # Every message durable and acked within a checkpoint or so (100 ms here): its only
            # copy must not stay in the broker, whatever its window does.
            limit = 0.5
        if self.clock.t - since > limit:
            raise violated(
                f"a message waited {self.clock.t - since:.1f} s for its PUBACK "
                f"(max_ack_delay {self.p.max_ack_delay_s:g} s)"
            )

    # -- running ------------------------------------------------------------------------------

    pipeline: Pipeline | None = None
    checkpointer: Checkpointer | None = None
    stop_requested: asyncio.Event | None = None
    _stop_loop = False
    _reconnect_at: float | None = None

    def run(self) -> Outcome:
        VIOLATIONS.clear()
        asyncio.set_event_loop(self.loop)
        try:
            for _ in range(40):
                settled = self.broker.done and self._outbox_empty()
                if settled and self.cloud.calm:
                    break
                # Faults stop after 12 starts, or once everything went through: one calm run
                # then drains what is left and checks that nothing is pending.
                if self.incarnation >= 12 or settled:
                    self.cloud.calm = True
                self._incarnation()
            else:
                raise Violation("did not settle after 40 starts")
            self._oracle()
        finally:
            self.loop.close()
            asyncio.set_event_loop(None)
            self.disk.close()
        return self.out

    def _outbox_empty(self) -> bool:
        try:
            (n,) = self.disk.execute("SELECT count(*) FROM chunks").fetchall()[0]
            (w,) = self.disk.execute("SELECT count(*) FROM open_windows").fetchall()[0]
            return int(n) == 0 and int(w) == 0
        except sqlite3.OperationalError:
            return False

    def _incarnation(self) -> None:
        self.incarnation += 1
        self.dead = False
        self._stop_loop = False
        self.tasks = []
        token = self.incarnation
        self.note("start")
        self.disturbed = self.clock.t
        main = self.loop.create_task(self._process(token))
        while not main.done():
            self._stop_loop = False
            with contextlib.suppress(Crash):
                self._run_until(main)
            if self.dead:
                break
        # The process is gone: abandon what it was doing (its effects are fenced off).
        self.dead = True
        self.broker.disconnect()
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        pending.sort(key=lambda t: self.loop.born.get(t, -1))
        for t in pending:
            t.cancel()
        if pending:
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        if main.done() and not main.cancelled():
            exc = main.exception()
            if exc is not None and not isinstance(exc, Crash):
                raise exc
        if self.store is not None:
            self.store.close()
            self.store = None

    def _run_until(self, main: asyncio.Task[None]) -> None:
        while not main.done() and not self._stop_loop:
            # A stop scheduled by an earlier run (a finished future's callback) may end a run
            # early: run again.
            with contextlib.suppress(RuntimeError):
                self.loop.run_until_complete(main)
        self._check_tasks()

    def _check_tasks(self) -> None:
        if VIOLATIONS:
            raise Violation(VIOLATIONS[0])
        for t in self.tasks:
            if t.done() and not t.cancelled():
                exc = t.exception()
                if exc is not None and not isinstance(exc, Crash):
                    raise Violation(f"task {t.get_name()} died: {exc!r}") from exc

    store: SimStore | None = None

    async def _process(self, token: int) -> None:
        """One run of the agent, from open to stop or death."""
        outbox, recovery = await Outbox.open(
            self.settings.buffer.path,
            synchronous="off",
            runner=InlineRunner(self, token),
            now=self.clock.wall(),
            store_cls=SimStore,
        )
        store = outbox.store
        assert isinstance(store, SimStore)
        store.quota_chunks = self.p.quota_chunks if not self.cloud.calm else None
        self.store = store
        async with httpx.AsyncClient(transport=self.cloud, timeout=None) as http:
            p = await build_pipeline(
                self.settings,
                outbox,
                recovery,
                http,
                clock=self.clock,
                rng=random.Random(self.rng.random()),
                send_acks=self._ack(token),
                can_ack=lambda: self.broker.connected and token == self.incarnation,
                confirm_acks=self._confirm(token),
                id_space=self.p.mid_space,
            )
            self.pipeline = p
            checkpointer = p.checkpointer
            # Small transaction pieces make a backlog of closed windows commit in several.
            checkpointer.piece_bytes = self.p.piece_bytes
            self.checkpointer = checkpointer
            self._connect()
            ckpt = asyncio.create_task(checkpointer.run(), name="checkpoint")
            fwd = asyncio.create_task(p.forwarder.run(), name="forward")
            pump = asyncio.create_task(self._pump(token), name="broker")
            self.tasks = [ckpt, fwd, pump]
            if outbox.chunk_count or outbox.batch is not None:
                p.forwarder.wake.set()
            await self._until_stop(token)
            self.out.stops += 1
            self.note("graceful stop")
            await shutdown_pipeline(p, ckpt, [fwd, pump])
            self.alive(token)
            self.out.snapshots += p.stats.snapshots_written
            self.out.compacted += p.stats.compacted_chunks
            self.out.dead_letters += p.stats.dead_letters
            self.broker.disconnect()

    def _ack(self, token: int) -> Callable[[list[int]], None]:
        def send(mids: list[int]) -> None:
            if token == self.incarnation and not self.dead:
                for mid in mids:
                    self.broker.ack(mid, 1)

        return send

    def _confirm(self, token: int) -> Callable[[], Awaitable[bool]]:
        """The model broker processes a PUBACK at once; the round trip takes a little time."""

        async def confirm() -> bool:
            connected = self.broker.connected
            await asyncio.sleep(0.002)
            return connected and self.broker.connected and token == self.incarnation

        return confirm

    def _connect(self) -> None:
        p = self.pipeline
        if p is None or self.dead:
            return
        # As MqttSession.run: the outbox records the open epoch before a connect.
        p.ledger.open_epoch()
        if not p.ledger.epoch_durable:
            self._reconnect_at = self.clock.t + 0.02
            return
        p.ledger.new_connection()
        self.disturbed = self.clock.t
        intake = p.intake
        clock = self.clock

        def deliver(m: Msg, mid: int, dup: bool) -> None:
            if dup:
                self.out.redelivered += 1
            before = (p.stats.counted, p.stats.redelivered_skipped)
            possible = p.ledger.possible_replays
            intake.handle(m.topic, m.payload, mid, 1, dup, clock.wall(), clock.mono())
            if p.ledger.possible_replays > possible:
                self.out.possible_doubles[m.n] += 1
            if self.verbose:
                what = (
                    "counted"
                    if p.stats.counted > before[0]
                    else ("skipped" if p.stats.redelivered_skipped > before[1] else "ignored")
                )
                if p.ledger.possible_replays > possible:
                    what += " (possibly a replay)"
                self.note(f"deliver m{m.n} mid {mid}{' DUP' if dup else ''}: {what}")

        self.broker.connect(deliver)
        self.broker.changed.set()

    async def _pump(self, token: int) -> None:
        b = self.broker
        while True:
            self.alive(token)
            if b.can_send():
                b.send_one()
                await asyncio.sleep(self.rng.expovariate(self.p.rate))
            else:
                b.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await b.changed.wait()

    async def _until_stop(self, token: int) -> None:
        """Run until a graceful stop (drawn at any loop step, see _on_step), or (when calm)
        until everything is delivered."""
        self.stop_requested = asyncio.Event()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await self.stop_requested.wait()
            self.alive(token)
            if self.stop_requested.is_set():
                return
            if self.cloud.calm:
                if self.broker.done and self._agent_idle():
                    return
                if self.clock.t > 10_000:
                    raise Violation("calm phase does not converge")
                continue
            if self.broker.done and self._agent_idle() and self.rng.random() < 0.2:
                return

    def _agent_idle(self) -> bool:
        p = self.pipeline
        assert p is not None
        return p.outbox.chunk_count == 0 and p.outbox.batch is None and not len(p.ledger)

    # -- the oracle ---------------------------------------------------------------------------

    def _check_camera_time(self, chunks: list[dict[str, Any]]) -> None:
        """Camera time is kept: a message counted in a chunk the agent did not flag as moved
        (bad_time, restamped, time_from_gateway) sits in the second its camera stamped,
        whatever the gateway's clock did (a step of a year included)."""
        if not self.p.camera_time or self.p.identical_payloads:
            return
        ts = {m.cls: EPOCH + m.n / self.p.rate for m in self.msgs}
        for c in chunks:
            if MOVED & set(c.get("flags", [])):
                continue
            width = int(c.get("width_s", 1))
            for cls in c["cat"].get("cls", {}):
                t = ts.get(cls)
                if t is not None and not (c["t"] <= round(t, 3) < c["t"] + width):
                    raise Violation(
                        f"{cls} stamped {t:.3f} by its camera was counted at {c['t']} "
                        f"(width {width}, flags {c.get('flags', [])}) without a flag saying so"
                    )

    def _oracle(self) -> None:
        if not self.broker.done:
            raise Violation(f"broker still holds {len(self.broker.inflight)} unacked messages")
        # Exactly once, except what the broker itself lost: at most once (`extra`).
        want: dict[tuple[str, str], list[Any]] = {}
        extra: dict[tuple[str, str], list[Any]] = {}
        for m in self.msgs:
            # Lost by the broker: at most once. Counted as a possible replay: once or twice.
            intos = [extra] if m.n in self.broker.lost else [want]
            intos += [extra] * self.out.possible_doubles[m.n]
            intos += [extra] * self.broker.requeued[m.n]
            for into in intos:
                e = into.setdefault((m.camera, m.stream), [0, 0, Counter()])
                e[0] += 1
                e[1] += m.value
                e[2][m.cls] += 1
        got: dict[tuple[str, str], list[Any]] = {}

        def add(c: dict[str, Any]) -> None:
            e = got.setdefault((c["camera"], c["stream"]), [0, 0, Counter()])
            e[0] += c["count"]
            if "conf" in c["num"]:
                e[1] += int(c["num"]["conf"]["sum"])
            e[2].update(c["cat"].get("cls", {}))

        for c in self.cloud.stored.values():
            add(c)
        self._check_camera_time(list(self.cloud.stored.values()))
        con = self.disk
        dead = con.execute("SELECT seq, seq_end, body FROM dead_letters").fetchall()
        left = con.execute("SELECT count(*) FROM chunks").fetchall()[0][0]
        snaps = con.execute("SELECT count(*) FROM open_windows").fetchall()[0][0]
        for _seq, _end, body in dead:
            add(json.loads(body))
        if left or snaps:
            raise Violation(f"{left} chunks and {snaps} snapshots left after the final drain")
        empty: list[Any] = [0, 0, Counter()]

        # A restored snapshot's replays are told from new messages by their keys
        # (agent/intake/acks.py ReplayMemory), and byte-identical messages share keys: when a
        # replay run starts right at the frontier's next id with the frontier's own bytes, the
        # agent counts it (a double at worst, never a loss). With identical payloads and a
        # restored broker, at least once.
        # So it is while the broker reuses packet ids still in flight (Mosquitto 2.0.11's
        # flood): an id then names no single message, and a restored run's ids say nothing.
        at_least_once = (
            self.p.identical_payloads or self.p.reuse_in_flight
        ) and self.out.broker_restores > 0

        def off(k: tuple[str, str]) -> bool:
            w, x, g = want.get(k, empty), extra.get(k, empty), got.get(k, empty)
            if at_least_once:
                return not (w[0] <= g[0] and w[1] <= g[1] and not w[2] - g[2])
            return not (
                w[0] <= g[0] <= w[0] + x[0]
                and w[1] <= g[1] <= w[1] + x[1]
                and not w[2] - g[2]
                and not g[2] - (w[2] + x[2])
            )

        diff = {
            k: (want.get(k, [0])[0], got.get(k, [0])[0])
            for k in set(want) | set(got) | set(extra)
            if off(k)
        }
        if diff:
            cats = {}
            for k in diff:
                w_cat, g_cat = want.get(k, empty)[2], got.get(k, empty)[2]
                cats[k] = {
                    "doubled": sorted(g_cat - (w_cat + extra.get(k, empty)[2]))[:10],
                    "lost": sorted(w_cat - g_cat)[:10],
                }
            raise Violation(
                f"cloud + dead letters != published: (want, got) counts {diff}; "
                f"messages off: {cats}"
            )
        # Seq coverage: every seq from the first to the last is stored or dead-lettered, once.
        spans = sorted(self.cloud.covered + [(int(s), int(e or s)) for s, e, _ in dead])
        for (a0, a1), (b0, _b1) in itertools.pairwise(spans):
            if b0 != a1 + 1:
                raise Violation(f"seq coverage broken between {a0}-{a1} and {b0} (G8)")


MOVED = {"bad_time", "restamped", "time_from_gateway"}


def _died(t: asyncio.Task[Any]) -> bool:
    if not t.done() or t.cancelled():
        return False
    exc = t.exception()
    return exc is not None and not isinstance(exc, Crash)


def run_seed(seed: int, *, verbose: bool = False, base: Path | None = None) -> Outcome:
    root = base or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    workdir = Path(tempfile.mkdtemp(prefix=f"edge-sim-{seed}-", dir=root))
    agent_log = logging.getLogger("agent")
    level = agent_log.level  # put back after: a caller's own logging must still work
    agent_log.setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    # Tasks of a crashed process end with Crash, by design: not worth a log line each. Left
    # so: asyncio reports them when they are garbage collected, after this returns.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        world = World(seed, workdir, verbose=verbose)
        try:
            return world.run()
        except (Violation, Hang) as e:
            tail = "\n".join(world.out.trace[-25:])
            raise Violation(
                f"seed {seed}: {e}\n  replay: python -m devtools.simulation --seed {seed} -v\n"
                f"  last steps:\n{tail}"
            ) from e
    finally:
        agent_log.setLevel(level)
        shutil.rmtree(workdir, ignore_errors=True)


def run_seeds(seeds: list[int]) -> tuple[int, Counter[str], str | None]:
    """Run seeds in order until one fails: (schedules run, totals, failure text or None)."""
    totals: Counter[str] = Counter()
    for i, seed in enumerate(seeds):
        try:
            out = run_seed(seed)
        except Violation as e:
            return i + 1, totals, str(e)
        for k in ("steps", "crashes", "stops", "clock_steps", "year_steps", "broker_restores",
                  "redelivered", "snapshots", "compacted", "dead_letters"):  # fmt: skip
            totals[k] += getattr(out, k)
    return len(seeds), totals, None


def run_parallel(seeds: list[int], jobs: int) -> tuple[int, Counter[str], list[str]]:
    """Split seeds over `jobs` processes (each seed still runs alone and replays alike)."""
    if jobs <= 1:
        n, one, failure = run_seeds(seeds)
        return n, one, [failure] if failure else []
    import multiprocessing

    parts = [seeds[i::jobs] for i in range(jobs)]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        results = pool.map(run_seeds, parts)
    totals: Counter[str] = Counter()
    failures = []
    n = 0
    for count, t, failure in results:
        n += count
        totals.update(t)
        if failure:
            failures.append(failure)
    return n, totals, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seed", type=int, help="replay one seed (with -v: every step)")
    ap.add_argument("--seeds", type=int, default=1000, help="how many seeds to run")
    ap.add_argument("--first", type=int, default=0, help="first seed")
    ap.add_argument("--jobs", type=int, default=1, help="processes")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    started = time.monotonic()
    if args.seed is not None:
        try:
            out = run_seed(args.seed, verbose=args.verbose)
        except Violation as e:
            print(f"FAIL {e}", file=sys.stderr)
            return 1
        print(f"seed {args.seed} ok: {out.steps} steps, {out.crashes} crashes, {out.stops} stops")
        return 0
    seeds = list(range(args.first, args.first + args.seeds))
    n, totals, failures = run_parallel(seeds, args.jobs)
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print(
        f"{n} schedules in {time.monotonic() - started:.1f} s"
        + (" ok" if not failures else f", {len(failures)} failing")
        + ": "
        + ", ".join(f"{v} {k}" for k, v in totals.items())
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

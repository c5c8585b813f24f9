"""Camera simulator: realistic detection / motion / health payloads over MQTT QoS 1.

Cameras are split over several processes (one paho client each), paced to the requested rate,
bounded in count and time. With `record`, every publish the broker acknowledged is written to a
JSONL file: the ground truth the tests compare the cloud's table with. Stopped early (`stop`:
`simulate cameras` sets it on SIGTERM or Ctrl-C), every process stops publishing, waits for
the broker's acks of what it sent, writes its record; the summary counts what was sent.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

CLASSES = ("person", "person", "person", "car", "car", "truck", "bicycle", "dog")
ZONES = ("door", "lobby", "parking", "yard")
STATUSES = ("ok", "ok", "ok", "ok", "degraded")
# What stops a publishing process early. They are held (blocked) from its start until it can
# take them, so a stop that comes while it starts is acted on, not fatal.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass(frozen=True)
class SimOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    cameras: int = 300
    rate: float = 10.0
    duration_s: float = 60.0
    seed: int = 1
    processes: int = 2
    topic_prefix: str = "site/cam"
    skew_s: float = 0.0
    # Per camera index: "offset:S", "drift:S_PER_MIN", "reset1970:AFTER_S", "ms_for_s:AFTER_S".
    clocks: tuple[tuple[int, str], ...] = ()
    # Every third camera stamps integer milliseconds (the agent's "auto" unit tells them apart).
    ms_cameras: bool = True
    late_fraction: float = 0.0
    malformed_fraction: float = 0.0
    record: Path | None = None
    start_at: float | None = None
    max_messages: int = 10_000_000
    drain_timeout_s: float = 30.0


def camera_name(i: int) -> str:
    return f"cam-{i:03d}"


def make_payload(
    rng: random.Random, stream: str, ts: float, frame: int, ms: bool
) -> dict[str, Any]:
    stamp: float | int = int(ts * 1000) if ms else round(ts, 3)
    if stream == "detections":
        return {
            "ts": stamp,
            "frame": frame,
            "cls": rng.choice(CLASSES),
            "conf": round(rng.uniform(0.3, 0.99), 3),
        }
    if stream == "motion":
        return {"ts": stamp, "level": round(rng.random(), 3), "zone": rng.choice(ZONES)}
    return {
        "ts": stamp,
        "temp_c": round(rng.uniform(35, 60), 1),
        "fps": round(rng.uniform(24, 30), 1),
        "status": rng.choice(STATUSES),
    }


def camera_clock(kind: str, now: float, elapsed_s: float, ms: bool) -> tuple[float, bool]:
    """What a camera with a bad clock stamps at true time `now`: (timestamp, in milliseconds)."""
    name, _, arg = kind.partition(":")
    x = float(arg or 0)
    if name == "offset":
        return now + x, ms
    if name == "drift":
        return now + elapsed_s * x / 60.0, ms
    if name == "reset1970":
        return (now, ms) if elapsed_s < x else (5.0 + elapsed_s - x, False)
    if name == "ms_for_s":
        return (now, False) if elapsed_s < x else (float(int(now * 1000)), False)
    raise ValueError(f"unknown camera clock fault {kind!r}")


def _worker(
    opts: SimOptions, index: int, cams: list[int], stop: threading.Event | None = None
) -> dict[str, float]:
    stop = stop or threading.Event()
    rng = random.Random(opts.seed * 1000 + index)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"sim-{opts.seed}-{index}-{time.time_ns()}",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(2000)
    lock = threading.Lock()
    inflight: dict[int, tuple[str, bytes, bool]] = {}
    acked: list[tuple[str, bytes, bool]] = []
    early: set[int] = set()

    def on_publish(_c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with lock:
            item = inflight.pop(mid, None)
            if item is None:
                early.add(mid)
            else:
                acked.append(item)

    connects = [0]

    def on_connect(*_args: Any) -> None:
        connects[0] += 1

    client.on_publish = on_publish
    client.on_connect = on_connect
    client.connect(opts.host, opts.port, keepalive=30)
    client.loop_start()
    record = open(opts.record.with_suffix(f".{index}.jsonl"), "w") if opts.record else None  # noqa: SIM115
    published = malformed = 0
    start = time.monotonic()
    publish_s = 0.0
    try:
        if opts.start_at:
            stop.wait(max(0.0, opts.start_at - time.time()))
        total_rate = opts.rate * len(cams)
        start = time.monotonic()
        end = start + opts.duration_s
        frames = dict.fromkeys(cams, 0)
        ms_camera = {c: opts.ms_cameras and c % 3 == 2 for c in cams}
        skew = {c: (opts.skew_s if c % 10 == 9 else 0.0) for c in cams}
        faults = {c: kind for c, kind in opts.clocks if c in cams}
        tick_s = 0.01
        while published < opts.max_messages and not stop.is_set():
            now_m = time.monotonic()
            if now_m >= end:
                break
            # Catch up to the schedule, at most a burst of 5,000 per tick.
            n = min(
                int(total_rate * (now_m - start)) - published, 5000, opts.max_messages - published
            )
            for _ in range(n):
                c = rng.choice(cams)
                r = rng.random()
                stream = "detections" if r < 0.7 else "motion" if r < 0.9 else "health"
                ts = time.time() + skew[c]
                ms = ms_camera[c]
                if c in faults:
                    ts, ms = camera_clock(faults[c], ts, time.monotonic() - start, ms)
                if opts.late_fraction and rng.random() < opts.late_fraction:
                    ts -= rng.uniform(3.0, 10.0)
                frames[c] += 1
                topic = f"{opts.topic_prefix}/{camera_name(c)}/{stream}"
                bad = bool(opts.malformed_fraction) and rng.random() < opts.malformed_fraction
                if bad:
                    payload = b'{"ts": ' + str(ts).encode() + b', "cls": "per'
                    malformed += 1
                else:
                    payload = json.dumps(
                        make_payload(rng, stream, ts, frames[c], ms),
                        separators=(",", ":"),
                    ).encode()
                info = client.publish(topic, payload, qos=1)
                with lock:
                    if info.mid in early:
                        early.discard(info.mid)
                        acked.append((topic, payload, bad))
                    else:
                        inflight[info.mid] = (topic, payload, bad)
                published += 1
            sleep_s = now_m + tick_s - time.monotonic()
            if sleep_s > 0:
                stop.wait(sleep_s)  # pacing the load generator, not waiting for a condition
        publish_s = time.monotonic() - start
        deadline = time.monotonic() + opts.drain_timeout_s
        while time.monotonic() < deadline:
            with lock:
                if not inflight:
                    break
            time.sleep(0.02)
    finally:
        client.disconnect()
        client.loop_stop()
        with lock:
            if record is not None:
                for topic, payload, bad in acked:
                    record.write(
                        json.dumps({"topic": topic, "payload": payload.decode(), "malformed": bad})
                        + "\n"
                    )
                record.close()
    return {
        "published": published,
        "acked": len(acked),
        "failed": published - len(acked),
        "malformed": malformed,
        # A reconnect makes paho resend in-flight publishes (DUP): the broker may then deliver
        # a message twice, and the ground truth is no longer exact.
        "reconnects": max(0, connects[0] - 1),
        "publish_s": round(publish_s, 3),
    }


def run_simulation(
    opts: SimOptions,
    *,
    stop: threading.Event | None = None,
    started: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Publish for `duration_s` from `processes` child processes; return what was published.
    `stop` set ends it early (each process flushes and reports); `started(n)` is called once
    the n processes are launched."""
    procs = max(1, min(opts.processes, opts.cameras))
    groups = [list(range(i, opts.cameras, procs)) for i in range(procs)]
    start_at = opts.start_at or time.time() + 0.5
    o = {**asdict(opts), "start_at": start_at, "record": str(opts.record) if opts.record else None}
    began = time.monotonic()
    # Children inherit the signal mask: they start with the stop signals held (see _child_main).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "agent.sim.cameras", json.dumps([o, i, g])],
                stdout=subprocess.PIPE,
            )
            for i, g in enumerate(groups)
        ]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if started is not None:
        started(len(children))
    limit_s = opts.duration_s + opts.drain_timeout_s + 60
    _wait(children, stop, time.monotonic() + limit_s)
    results = []
    for child in children:
        assert child.stdout is not None
        out = child.stdout.read()
        child.stdout.close()
        if child.returncode != 0:
            raise RuntimeError(f"camera simulator process failed with exit code {child.returncode}")
        results.append(json.loads(out))
    if opts.record is not None:
        with open(opts.record, "w") as merged:
            for i in range(procs):
                part = opts.record.with_suffix(f".{i}.jsonl")
                merged.write(part.read_text())
                part.unlink()
    keys = ("published", "acked", "failed", "malformed", "reconnects")
    total = {k: int(sum(r[k] for r in results)) for k in keys}
    elapsed = time.monotonic() - began
    stopped = stop is not None and stop.is_set()
    # Stopped early: the rate over the time spent publishing, not over the planned duration.
    span = max((r["publish_s"] for r in results), default=0.0) if stopped else opts.duration_s
    summary: dict[str, Any] = dict(total)
    summary.update(
        cameras=opts.cameras,
        seconds=round(elapsed, 2),
        rate_msgs_per_s=round(total["published"] / max(span, 1e-9), 1),
    )
    return summary


def _wait(
    children: list[subprocess.Popen[bytes]], stop: threading.Event | None, deadline: float
) -> None:
    """Until every child has exited; a `stop` is passed on to them (SIGTERM) once."""
    passed_on = False
    while running := [c for c in children if c.poll() is None]:
        if stop is not None and stop.is_set() and not passed_on:
            for c in running:
                c.send_signal(signal.SIGTERM)
            passed_on = True
        if time.monotonic() > deadline:
            for c in running:
                c.kill()
                c.wait()
            raise RuntimeError("camera simulator processes did not finish in time")
        with contextlib.suppress(subprocess.TimeoutExpired):
            running[0].wait(timeout=0.05)


def read_record(path: Path) -> list[dict[str, Any]]:
    """The acknowledged publishes written by `run_simulation(record=...)`."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def _child_main() -> None:
    # Started with the stop signals held (run_simulation): take them, then let them in, so a
    # stop sent while this process was starting is acted on here.
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    raw, index, cams = json.loads(sys.argv[1])
    raw["record"] = Path(raw["record"]) if raw["record"] else None
    raw["clocks"] = tuple((int(c), str(k)) for c, k in raw["clocks"])
    result = _worker(SimOptions(**raw), index, cams, stop)
    # Done: a later stop (`timeout` signals the whole group, and the parent passes its own on)
    # must not kill this process as it exits, when Python has put the default action back.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    print(json.dumps(result))


if __name__ == "__main__":
    _child_main()

"""Soak: 300 cameras x 10 msgs/s (3,000 msgs/s, QoS 1) into the agent for an hour; is it flat?

One run, all on loopback: a private Mosquitto, the reference receiver (`edge-agent simulate
cloud`), the agent with the shipped defaults (bench.common.start_agent) forwarding to it, and
a bare aiomqtt subscriber (bench.bare_sub) on the same broker at the same time, receiving the
same messages: the same-run noise baseline. The publisher is bench.loadgen (raw-socket MQTT v5
QoS 1, one process, a few µs of CPU per message; payloads of the simulator's shapes with a `ts`
field, topics site/cam/cam-NNN/<detections|motion|health>, 300 cameras).

Every --interval seconds (default 10), from /proc and the agent's /status:

  agent      VmRSS, VmHWM, RssAnon; CPU µs per message over the interval (utime + stime delta /
             /status ingest.received delta)
  bare sub   VmRSS; CPU µs per message (its own count)
  broker     CPU (fraction of a core), VmRSS; the receiver's CPU
  /status    what could grow: aggregate.windows_open, ingest.unacked (the ack ledger), cameras
             count and clock_suspect, outbox chunks / bytes / file_bytes, late deltas, rejects,
             drops; and from disk the outbox's -wal file size
  machine    busy % and steal % over the interval (/proc/stat)

At the end: ground truth (every message the broker acked counted exactly once at the receiver:
the sum of the stored chunks' message counts equals the publisher's PUBACK count, with no
seq gaps or out-of-order chunks) and a flatness verdict: least-squares slope of RSS vs time over
the second half of the publishing (MB/hour) and of CPU µs/msg vs time after the warm-up (%/hour
of the mean), for the agent and for the bare subscriber (the noise baseline), plus the slope of
the agent/bare CPU ratio (machine noise moves both); every /status gauge that grows over the
second half is named. Writes bench/SOAK.md (figures, a compact time series) and optionally
--json-out. The receiver's and the agent's databases are deleted at the end (an hour is a few
GB) unless --keep.

    .venv/bin/python -m bench.soak                 # the full hour (~62 min)
    .venv/bin/python -m bench.soak --minutes 3     # smoke run
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH,
    GATEWAY_ID,
    BareSub,
    MachineLoad,
    Mosquitto,
    ProcStat,
    Receiver,
    Report,
    fresh_dir,
    kill_quietly,
    machine_description,
    parser,
    say,
    start_agent,
    wait_for,
)
from bench.loadgen import LoadOptions, run_load

CAMERAS = 300
RATE_PER_CAMERA = 10.0
GATEWAY = GATEWAY_ID  # start_agent's default
MB = 1024 * 1024
# agent/durable/store.py: min(64 MiB, buffer.max_bytes / 8), max_bytes 1 GiB shipped
WAL_CAP = 64 * MB

# /status gauges that must not grow under a steady load: (label, path in /status, unit).
GAUGES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("windows_open", ("aggregate", "windows_open"), "windows"),
    ("ack_ledger_unacked", ("ingest", "unacked"), "messages"),
    ("cameras", ("cameras", "count"), "cameras"),
    ("clock_suspect", ("cameras", "clock_suspect"), "cameras"),
    ("outbox_chunks", ("outbox", "chunks"), "chunks"),
    ("outbox_bytes", ("outbox", "bytes"), "B"),
    ("outbox_file_bytes", ("outbox", "file_bytes"), "B"),
)
# Absolute growth below which a gauge is not called growing (over the second half).
GROWTH_FLOOR = {"B": 256 * 1024, "messages": 3000, "chunks": 1000, "windows": 300}


# -- /proc ------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile (KiB) and Threads of a pid, one read of /proc."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[key] = int(rest.split()[0])
    return out


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def dig(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


# -- numbers ----------------------------------------------------------------------------------


@dataclass
class Fit:
    """Least-squares line y = a + b t: slope b (per hour when t is in hours) and its stderr."""

    n: int
    slope: float
    stderr: float
    mean: float

    @property
    def significant(self) -> bool:
        return self.n >= 3 and abs(self.slope) > 2 * self.stderr


def linfit(points: list[tuple[float, float]]) -> Fit | None:
    pts = [(t, y) for t, y in points if y is not None and math.isfinite(y)]
    n = len(pts)
    if n < 2:
        return None
    mt = sum(t for t, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((t - mt) ** 2 for t, _ in pts)
    if sxx == 0:
        return None
    b = sum((t - mt) * (y - my) for t, y in pts) / sxx
    a = my - b * mt
    if n > 2:
        resid = sum((y - (a + b * t)) ** 2 for t, y in pts)
        se = math.sqrt(resid / (n - 2) / sxx)
    else:
        se = math.inf
    return Fit(n, b, se, my)


# -- sampling ---------------------------------------------------------------------------------


@dataclass
class Sample:
    t_s: float  # seconds since publishing started
    agent: dict[str, int]
    bare: dict[str, int]
    broker: dict[str, int]
    cpu: dict[str, float]  # cumulative CPU seconds per process
    agent_msgs: int | None  # /status ingest.received
    bare_msgs: int
    status: dict[str, Any]
    wal_bytes: int
    db_bytes: int
    busy_pct: float
    steal_pct: float
    # derived over the interval ending here
    agent_us_per_msg: float | None = None
    bare_us_per_msg: float | None = None
    broker_cores: float | None = None
    receiver_cores: float | None = None
    agent_cores: float | None = None
    bare_cores: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def take_sample(
    t_s: float, pids: dict[str, int], agent: Any, bare: BareSub, wal: Path, load: MachineLoad,
) -> Sample:  # fmt: skip
    cpu: dict[str, float] = {}
    for k, pid in pids.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            cpu[k] = ProcStat(pid).cpu_s()
    st = agent.status() or {}
    busy, steal = load.read()
    return Sample(
        t_s=t_s,
        agent=_safe_status(pids["agent"]),
        bare=_safe_status(pids["bare"]),
        broker=_safe_status(pids["broker"]),
        cpu=cpu,
        agent_msgs=dig(st, ("ingest", "received")),
        bare_msgs=bare.count,
        status=st,
        wal_bytes=file_size(wal),
        db_bytes=file_size(wal.with_name(wal.name.removesuffix("-wal"))),
        busy_pct=busy,
        steal_pct=steal,
    )


def _safe_status(pid: int) -> dict[str, int]:
    try:
        return proc_status(pid)
    except OSError:
        return {}


def derive(prev: Sample, cur: Sample) -> None:
    dt = cur.t_s - prev.t_s
    if dt <= 0:
        return

    def dcpu(k: str) -> float | None:
        if k in cur.cpu and k in prev.cpu:
            return cur.cpu[k] - prev.cpu[k]
        return None

    da = dcpu("agent")
    if da is not None and cur.agent_msgs is not None and prev.agent_msgs is not None:
        n = cur.agent_msgs - prev.agent_msgs
        cur.agent_us_per_msg = da / n * 1e6 if n > 0 else None
    db = dcpu("bare")
    nb = cur.bare_msgs - prev.bare_msgs
    if db is not None and nb > 0:
        cur.bare_us_per_msg = db / nb * 1e6
    for k, attr in (("agent", "agent_cores"), ("bare", "bare_cores"),
                    ("broker", "broker_cores"), ("receiver", "receiver_cores")):  # fmt: skip
        d = dcpu(k)
        if d is not None:
            setattr(cur, attr, d / dt)


class LoadThread(threading.Thread):
    """bench.loadgen.run_load in the background (it blocks until the publishers are done)."""

    def __init__(self, opts: LoadOptions) -> None:
        super().__init__(daemon=True)
        self.opts = opts
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = run_load(self.opts)
        except BaseException as e:  # reported by the main thread
            self.error = e


# -- the receiver's ground truth (read from its SQLite, read-only) ----------------------------


def receiver_truth(db: Path) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        chunks, messages = con.execute(
            "SELECT count(*), coalesce(sum(json_extract(body, '$.count')), 0) FROM chunks"
            " WHERE gateway = ?", (GATEWAY,),
        ).fetchone()  # fmt: skip
        row = con.execute(
            "SELECT max_seq, batches, gaps, out_of_order, duplicates, rev0_repeats FROM gateways"
            " WHERE gateway = ?", (GATEWAY,),
        ).fetchone()  # fmt: skip
        (late_chunks,) = con.execute(
            "SELECT count(*) FROM chunks WHERE gateway = ? AND rev > 0", (GATEWAY,)
        ).fetchone()
    finally:
        con.close()
    keys = ("max_seq", "batches", "gaps", "out_of_order", "duplicates", "rev0_repeats")
    doc: dict[str, Any] = dict(zip(keys, row, strict=True)) if row else {}
    doc.update(chunks=chunks, messages=messages, late_delta_chunks=late_chunks)
    return doc


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "")
    p.add_argument("--minutes", type=float, default=60.0, help="minutes of publishing")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--md-out", type=Path, default=BENCH / "SOAK.md",
                   help="the report (default bench/SOAK.md; '-' for none)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the databases under bench/out/soak")
    args = p.parse_args(argv)
    duration_s = args.minutes * 60
    interval = max(1.0, args.interval)
    rate = CAMERAS * RATE_PER_CAMERA
    rep = Report("soak", quick=args.minutes < 15)
    machine = machine_description()
    work = fresh_dir("soak")
    broker = receiver = agent = bare = None
    samples: list[Sample] = []
    load_thread: LoadThread | None = None
    exit_code = 0
    try:
        broker = Mosquitto(work / "mosquitto").start()
        receiver = Receiver(work / "cloud").start()
        agent = start_agent(work, broker.port, receiver.url)
        bare = BareSub(broker.port, work / "bare.log", max_seconds=duration_s + 900)
        bare.wait_ready()
        assert agent.popen is not None and broker.popen is not None
        assert receiver.popen is not None
        pids = {"agent": agent.popen.pid, "bare": bare.pid, "broker": broker.popen.pid,
                "receiver": receiver.popen.pid}  # fmt: skip
        wal = work / "agent" / "buffer.sqlite3-wal"
        idle = proc_status(pids["agent"])
        bare_idle = proc_status(pids["bare"])
        say(
            f"[soak] {CAMERAS} cameras x {RATE_PER_CAMERA:g} msgs/s = {rate:,.0f} msgs/s for "
            f"{args.minutes:g} min (loadgen, 1 process, QoS 1); sample every {interval:g} s; "
            f"agent idle RSS {idle['VmRSS'] / 1024:.1f} MB, bare {bare_idle['VmRSS'] / 1024:.1f} MB"
        )
        opts = LoadOptions(
            port=broker.port, cameras=CAMERAS, rate=rate, duration_s=duration_s, processes=1,
            seed=13, start_at=time.time() + 1.0,
            max_messages=int(rate * duration_s * 1.05) + 10_000,
        )  # fmt: skip
        start_at = opts.start_at
        assert start_at is not None
        load_thread = LoadThread(opts)
        load_thread.start()
        # Publishing starts at start_at (wall clock); sample on a fixed grid from there.
        wait_for(lambda: time.time() >= start_at, timeout_s=5, what="publishing start",
                 poll_s=0.01)  # fmt: skip
        t0 = time.monotonic()
        load = MachineLoad()
        samples.append(take_sample(0.0, pids, agent, bare, wal, load))
        k = 1
        while True:
            due = t0 + k * interval
            # The sampling interval itself: the only sleep in this script.
            time.sleep(max(0.0, due - time.monotonic()))
            if not agent.running:
                raise RuntimeError(f"agent exited during the soak:\n{agent.log_text()[-2000:]}")
            s = take_sample(time.monotonic() - t0, pids, agent, bare, wal, load)
            load = MachineLoad()
            derive(samples[-1], s)
            samples.append(s)
            if k % max(1, round(60 / interval)) == 0 or k == 1:
                say(_progress(s))
            k += 1
            if s.t_s >= duration_s or not load_thread.is_alive():
                break
        t_pub_end = samples[-1].t_s
        load_thread.join(timeout=opts.drain_timeout_s + 60)
        if load_thread.error is not None:
            raise load_thread.error
        pub = load_thread.result or {}
        acked = int(pub.get("acked", 0))
        say(f"[soak] publishing done: {json.dumps(pub)}")

        # Drain: the last windows close after idle_close_s of silence, then go out.
        def drained() -> bool:
            st = agent.status() if agent else None
            return bool(
                st
                and dig(st, ("ingest", "received")) is not None
                and st["ingest"]["received"] >= acked
                and st["aggregate"]["windows_open"] == 0
                and st["ingest"]["unacked"] == 0
                and st["outbox"]["chunks"] == 0
            )

        drain_note = None
        try:
            wait_for(drained, timeout_s=120, what="agent drained (windows closed, outbox empty)",
                     poll_s=0.5)  # fmt: skip
        except TimeoutError as e:
            drain_note = str(e)
            rep.note(drain_note)
        b = bare
        try:
            wait_for(lambda: b.count >= acked or not b.running, timeout_s=30,
                     what="bare subscriber caught up", poll_s=0.2)  # fmt: skip
        except TimeoutError as e:
            rep.note(f"{e}: it got {b.count:,} of {acked:,}")
        final_status = agent.status() or {}
        agent_hwm = proc_status(pids["agent"])["VmHWM"]
        bare_hwm = proc_status(pids["bare"])["VmHWM"]
        bare_count = bare.count
        truth = receiver_truth(receiver.db)
        db_bytes = file_size(receiver.db) + file_size(receiver.db.with_name("cloud.sqlite3-wal"))
    except BaseException:
        exit_code = 1
        raise
    finally:
        kill_quietly(bare, agent, receiver, broker)
        if load_thread is not None and load_thread.is_alive():
            load_thread.join(timeout=5)
        if not args.keep and exit_code == 0:
            for d in ("cloud", "agent", "mosquitto"):
                shutil.rmtree(work / d, ignore_errors=True)

    # -- figures ------------------------------------------------------------------------------
    exact = (
        truth["messages"] == acked
        and pub.get("failed", 0) == 0
        and not truth.get("gaps")
        and not truth.get("out_of_order")
    )
    rep.figure("published", pub)
    rep.figure("receiver", truth)
    rep.figure("bare_received", bare_count)
    rep.figure("exact", exact)
    say(
        f"[soak] ground truth: broker acked {acked:,}, receiver counted {truth['messages']:,} in "
        f"{truth['chunks']:,} chunks (gaps {truth.get('gaps')}, out of order "
        f"{truth.get('out_of_order')}, retransmitted duplicates {truth.get('duplicates')}); bare "
        f"subscriber got {bare_count:,}: {'EXACT' if exact else 'NOT EXACT'}"
    )
    warm = min(60.0, max(interval, 0.1 * t_pub_end))
    half = t_pub_end / 2
    steady = [s for s in samples if warm < s.t_s <= t_pub_end]
    second = [s for s in samples if half <= s.t_s <= t_pub_end]
    hours = 3600.0

    def fit(rows: list[Sample], get: Any) -> Fit | None:
        return linfit([(s.t_s / hours, get(s)) for s in rows])

    f_rss = fit(second, lambda s: s.agent.get("VmRSS", math.nan) / 1024)
    f_rss_anon = fit(second, lambda s: s.agent.get("RssAnon", math.nan) / 1024)
    f_bare_rss = fit(second, lambda s: s.bare.get("VmRSS", math.nan) / 1024)
    f_cpu = fit(steady, lambda s: s.agent_us_per_msg)
    f_bare_cpu = fit(steady, lambda s: s.bare_us_per_msg)
    f_ratio = fit(
        steady,
        lambda s: s.agent_us_per_msg / s.bare_us_per_msg
        if s.agent_us_per_msg and s.bare_us_per_msg else None,
    )  # fmt: skip
    f_cpu_2nd = fit([s for s in second if s.t_s > warm], lambda s: s.agent_us_per_msg)

    def pct_h(f: Fit | None) -> float | None:
        return None if f is None or not f.mean else 100 * f.slope / f.mean

    growing: list[str] = []
    gauge_rows = []
    for label, path, unit in GAUGES:
        g = fit(second, lambda s, path=path: _num(dig(s.status, path)))
        gauge_rows.append((label, unit, g, [_num(dig(s.status, path)) for s in second]))
    gauge_rows.append(("outbox_wal_bytes", "B", fit(second, lambda s: float(s.wal_bytes)),
                       [float(s.wal_bytes) for s in second]))  # fmt: skip
    gauge_rows.append(("outbox_db_file_bytes", "B", fit(second, lambda s: float(s.db_bytes)),
                       [float(s.db_bytes) for s in second]))  # fmt: skip
    threads = fit(second, lambda s: _num(s.agent.get("Threads")))
    gauge_rows.append(("agent_threads", "threads", threads,
                       [_num(s.agent.get("Threads")) for s in second]))  # fmt: skip
    span_h = (second[-1].t_s - second[0].t_s) / hours if len(second) > 1 else 0.0
    gauges_doc = {}
    for label, unit, g, vals in gauge_rows:
        vs = [v for v in vals if v is not None]
        gauges_doc[label] = {
            "unit": unit, "min": min(vs) if vs else None, "max": max(vs) if vs else None,
            "slope_per_hour": None if g is None else g.slope,
            "stderr_per_hour": None if g is None else g.stderr,
        }  # fmt: skip
        if g is not None and g.significant and g.slope > 0:
            rise = g.slope * span_h
            if rise > GROWTH_FLOOR.get(unit, 1) and rise > 0.05 * max(abs(g.mean), 1e-9):
                what = f"{label} (+{_human(g.slope, unit)}/hour over the second half"
                if label in ("outbox_wal_bytes", "outbox_file_bytes") and vs:
                    # The agent caps its WAL (journal_size_limit, wal_autocheckpoint) at
                    # min(64 MiB, buffer.max_bytes / 8): it fills, is checkpointed, restarts.
                    cap = "within" if max(vs) <= WAL_CAP * 1.05 else "ABOVE"
                    what += f"; max {max(vs) / MB:.1f} MB, {cap} the WAL's 64 MiB cap"
                growing.append(what + ")")
    rss_floor = 1.0  # MB/hour: below it RSS is called flat whatever the noise
    rss_flat = f_rss is None or f_rss.slope <= rss_floor or not f_rss.significant
    if not rss_flat and f_bare_rss is not None and f_rss is not None:
        rss_flat = f_rss.slope <= rss_floor + max(0.0, f_bare_rss.slope)
    if not rss_flat and f_rss is not None:  # not flat implies a fit
        growing.insert(0, f"agent RSS (+{f_rss.slope:.1f} MB/hour over the second half)")
    cpu_pct = pct_h(f_cpu)
    ratio_pct = pct_h(f_ratio)
    cpu_flat = (
        cpu_pct is None
        or abs(cpu_pct) <= 5
        or not (f_cpu is not None and f_cpu.significant)
        or (ratio_pct is not None and abs(ratio_pct) <= 5)
    )
    if not cpu_flat:
        growing.insert(0, f"agent CPU per message ({cpu_pct:+.1f} %/hour; agent/bare ratio "
                       f"{_pctv(ratio_pct)}/hour)")  # fmt: skip

    us = [s.agent_us_per_msg for s in steady if s.agent_us_per_msg]
    bus = [s.bare_us_per_msg for s in steady if s.bare_us_per_msg]
    figures = {
        "minutes": args.minutes,
        "interval_s": interval,
        "msgs_per_s": round(acked / t_pub_end, 1) if t_pub_end else None,
        "agent_idle_rss_mb": round(idle["VmRSS"] / 1024, 1),
        "agent_peak_rss_mb": round(agent_hwm / 1024, 1),
        "bare_peak_rss_mb": round(bare_hwm / 1024, 1),
        "agent_rss_slope_mb_per_h": _fitdoc(f_rss),
        "agent_rss_anon_slope_mb_per_h": _fitdoc(f_rss_anon),
        "bare_rss_slope_mb_per_h": _fitdoc(f_bare_rss),
        "agent_us_per_msg_mean": round(sum(us) / len(us), 1) if us else None,
        "bare_us_per_msg_mean": round(sum(bus) / len(bus), 1) if bus else None,
        "agent_cpu_slope_pct_per_h": _r(cpu_pct),
        "agent_cpu_slope_second_half_pct_per_h": _r(pct_h(f_cpu_2nd)),
        "bare_cpu_slope_pct_per_h": _r(pct_h(f_bare_cpu)),
        "agent_over_bare_slope_pct_per_h": _r(ratio_pct),
        "gauges_second_half": gauges_doc,
        "rss_flat": rss_flat,
        "cpu_flat": cpu_flat,
        "growing": growing,
        "receiver_db_bytes": db_bytes,
    }
    for key, value in figures.items():
        rep.figure(key, value)
    rep.figure("samples", [_sample_doc(s) for s in samples])
    rep.figure("final_status", final_status)
    verdict = "FLAT" if rss_flat and cpu_flat else "GROWS: " + "; ".join(growing[:2])
    say(
        f"[soak] agent RSS {_fitstr(f_rss, 'MB')}/h over the second half (bare "
        f"{_fitstr(f_bare_rss, 'MB')}/h); CPU µs/msg {_pctv(cpu_pct)}/h (bare "
        f"{_pctv(pct_h(f_bare_cpu))}/h, agent/bare {_pctv(ratio_pct)}/h): {verdict}"
    )
    if growing:
        say("[soak] grows: " + "; ".join(growing))
    doc = rep.finish(args.json_out)
    if str(args.md_out) != "-":
        write_md(args.md_out, doc, machine, samples, figures, pub, truth, exact, idle, bare_idle,
                 f_rss, f_bare_rss, f_rss_anon, f_cpu, f_bare_cpu, f_ratio, t_pub_end, warm,
                 drain_note, bare_count, final_status)  # fmt: skip
        say(f"[soak] wrote {args.md_out}")
    return 0 if exact else 1


# -- output -----------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def _pctv(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f} %"


def _fitdoc(f: Fit | None) -> dict[str, Any] | None:
    if f is None:
        return None
    return {"slope": round(f.slope, 3), "stderr": round(f.stderr, 3), "n": f.n,
            "mean": round(f.mean, 2)}  # fmt: skip


def _fitstr(f: Fit | None, unit: str) -> str:
    if f is None:
        return "n/a"
    return f"{f.slope:+.2f} ± {2 * f.stderr:.2f} {unit}"


def _human(x: float, unit: str) -> str:
    if unit == "B":
        return f"{x / 1024:,.0f} KiB"
    return f"{x:,.1f} {unit}"


def _progress(s: Sample) -> str:
    st = s.status
    return (
        f"[soak] t={s.t_s / 60:5.1f} min  agent RSS {s.agent.get('VmRSS', 0) / 1024:5.1f} MB, "
        f"{_f1(s.agent_us_per_msg)} µs/msg ({_pct(s.agent_cores)})  bare "
        f"{s.bare.get('VmRSS', 0) / 1024:5.1f} MB, {_f1(s.bare_us_per_msg)} µs/msg  broker "
        f"{_pct(s.broker_cores)}  windows {dig(st, ('aggregate', 'windows_open'))}  unacked "
        f"{dig(st, ('ingest', 'unacked'))}  outbox {dig(st, ('outbox', 'chunks'))} chunks, "
        f"WAL {s.wal_bytes / MB:.1f} MB  machine busy {s.busy_pct:.0f} %"
    )


def _f1(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f} %"


def _sample_doc(s: Sample) -> dict[str, Any]:
    st = s.status
    return {
        "t_s": round(s.t_s, 1),
        "agent_rss_kb": s.agent.get("VmRSS"),
        "agent_hwm_kb": s.agent.get("VmHWM"),
        "agent_rss_anon_kb": s.agent.get("RssAnon"),
        "agent_threads": s.agent.get("Threads"),
        "agent_us_per_msg": _r(s.agent_us_per_msg, 1),
        "agent_cores": _r(s.agent_cores, 3),
        "bare_rss_kb": s.bare.get("VmRSS"),
        "bare_us_per_msg": _r(s.bare_us_per_msg, 1),
        "bare_cores": _r(s.bare_cores, 3),
        "broker_cores": _r(s.broker_cores, 3),
        "broker_rss_kb": s.broker.get("VmRSS"),
        "receiver_cores": _r(s.receiver_cores, 3),
        "agent_received": s.agent_msgs,
        "bare_received": s.bare_msgs,
        "windows_open": dig(st, ("aggregate", "windows_open")),
        "late_deltas": dig(st, ("aggregate", "late_deltas")),
        "unacked": dig(st, ("ingest", "unacked")),
        "cameras": dig(st, ("cameras", "count")),
        "clock_suspect": dig(st, ("cameras", "clock_suspect")),
        "outbox_chunks": dig(st, ("outbox", "chunks")),
        "outbox_bytes": dig(st, ("outbox", "bytes")),
        "outbox_file_bytes": dig(st, ("outbox", "file_bytes")),
        "wal_bytes": s.wal_bytes,
        "db_file_bytes": s.db_bytes,
        "rejects": sum((dig(st, ("ingest", "rejects")) or {}).values()),
        "drops": sum((dig(st, ("drops",)) or {}).values()),
        "machine_busy_pct": round(s.busy_pct, 1),
        "machine_steal_pct": round(s.steal_pct, 1),
    }


def write_md(
    path: Path, doc: dict[str, Any], machine: dict[str, Any], samples: list[Sample],
    figures: dict[str, Any], pub: dict[str, Any], truth: dict[str, Any], exact: bool,
    idle: dict[str, int], bare_idle: dict[str, int], f_rss: Fit | None, f_bare_rss: Fit | None,
    f_rss_anon: Fit | None, f_cpu: Fit | None, f_bare_cpu: Fit | None, f_ratio: Fit | None,
    t_end: float, warm: float, drain_note: str | None, bare_count: int,
    final_status: dict[str, Any],
) -> None:  # fmt: skip
    minutes = figures["minutes"]
    smoke = minutes < 15
    noise = doc.get("noise", {})

    def pct_h(f: Fit | None) -> str:
        if f is None or not f.mean:
            return "n/a"
        return f"{100 * f.slope / f.mean:+.1f} ± {200 * f.stderr / f.mean:.1f} %/hour"

    lines = [
        "# edge-agent soak: 300 cameras x 10 msgs/s for "
        + (f"{minutes:g} minutes" if minutes < 60 else f"{minutes / 60:g} hour(s)"),
        "",
    ]
    if smoke:
        lines += [
            f"**SMOKE RUN ({minutes:g} minutes)**: proves the script, not the agent. Slopes "
            "extrapolated to an hour from a few minutes are dominated by warm-up and the "
            "neighbours' noise; the full hour is `.venv/bin/python -m bench.soak` (~62 min).",
            "",
        ]
    lines += [
        f"Generated by `python -m bench.soak --minutes {minutes:g}` on {doc['started']}; agent "
        f"commit {doc.get('agent_commit_at_start')}; {machine['nproc']} x {machine['cpu_model']}, "
        f"Python {machine['python']}, {machine['mosquitto']}. Machine busy "
        f"{noise.get('machine_busy_pct')} % of all cores during the run (steal "
        f"{noise.get('machine_steal_pct')} %), calibration {noise.get('calibration_start_ops_s'):,}"
        f" -> {noise.get('calibration_end_ops_s'):,} ops/s.",
        "",
        "Setup: private Mosquitto, the reference receiver, the agent with the shipped defaults, "
        "and a bare aiomqtt subscriber (bench/bare_sub.py) on the same broker receiving the same "
        "messages (the noise baseline); publisher bench/loadgen.py (1 process, raw-socket MQTT "
        f"v5, QoS 1, `ts` field, 300 cameras x 3 streams). Sampled every "
        f"{figures['interval_s']:g} s. CPU slopes from {warm:.0f} s on (warm-up excluded); RSS "
        "and gauge slopes over the second half of the publishing. ± is two standard errors of "
        "the least-squares slope.",
        "",
        "## Figures",
        "",
        "| figure | agent | bare aiomqtt (same run) | verdict |",
        "|---|---|---|---|",
        f"| ground truth | broker acked {pub.get('acked', 0):,}; receiver counted "
        f"{truth['messages']:,} in {truth['chunks']:,} chunks; gaps {truth.get('gaps')}, out of "
        f"order {truth.get('out_of_order')}, retransmitted duplicates (deduped) "
        f"{truth.get('duplicates')} | received {bare_count:,} | "
        f"{'exact' if exact else '**NOT exact**'} |",
        f"| publishing | {figures['msgs_per_s']:,} msgs/s for {t_end / 60:.1f} min | | |",
        f"| RSS idle -> peak (VmHWM) | {idle['VmRSS'] / 1024:.1f} -> "
        f"{figures['agent_peak_rss_mb']} MB | {bare_idle['VmRSS'] / 1024:.1f} -> "
        f"{figures['bare_peak_rss_mb']} MB | |",
        f"| RSS slope, second half | {_fitstr(f_rss, 'MB')}/hour (anon "
        f"{_fitstr(f_rss_anon, 'MB')}/hour) | {_fitstr(f_bare_rss, 'MB')}/hour | "
        f"{'flat' if figures['rss_flat'] else '**grows**'} |",
        f"| CPU per message, mean | {figures['agent_us_per_msg_mean']} µs | "
        f"{figures['bare_us_per_msg_mean']} µs | |",
        f"| CPU per message, slope | {pct_h(f_cpu)} (agent/bare ratio {pct_h(f_ratio)}) | "
        f"{pct_h(f_bare_cpu)} | {'flat' if figures['cpu_flat'] else '**grows**'} |",
        "",
        "Verdict rules: RSS is flat when its slope is <= 1 MB/hour, or not significant (< 2 "
        "standard errors), or within 1 MB/hour of the bare subscriber's; CPU per message is flat "
        "when its slope is within ±5 %/hour, or not significant, or the agent/bare ratio is "
        "within ±5 %/hour (the neighbours slow both).",
        "",
        "**Grows:** " + ("; ".join(figures["growing"]) if figures["growing"] else "nothing."),
        "",
        "## What could grow (/status and disk, second half)",
        "",
        "| gauge | min | max | slope per hour |",
        "|---|---|---|---|",
    ]
    for label, g in figures["gauges_second_half"].items():
        unit = g["unit"]

        def v(x: Any, unit: str = unit) -> str:
            if x is None:
                return "n/a"
            return f"{x / MB:.2f} MB" if unit == "B" else f"{x:,.0f}"

        slope = g["slope_per_hour"]
        se = g["stderr_per_hour"]
        sl = "n/a" if slope is None else (
            f"{slope / MB:+.2f} ± {2 * se / MB:.2f} MB" if unit == "B"
            else f"{slope:+,.1f} ± {2 * se:,.1f}"
        )  # fmt: skip
        lines.append(f"| {label} | {v(g['min'])} | {v(g['max'])} | {sl} |")
    fs = final_status
    lines += [
        "",
        f"At the end: aggregate {dig(fs, ('aggregate',))}, late-delta chunks at the receiver "
        f"{truth.get('late_delta_chunks')}, rejects {dig(fs, ('ingest', 'rejects'))}, "
        f"drops {dig(fs, ('drops',))}, redelivered skipped "
        f"{dig(fs, ('ingest', 'redelivered_skipped'))}, MQTT reconnects "
        f"{dig(fs, ('mqtt', 'reconnects'))}, batches sent {dig(fs, ('forward', 'batches_sent'))}"
        f" (failed {dig(fs, ('forward', 'batches_failed'))}), snapshots written "
        f"{dig(fs, ('outbox', 'snapshots_written'))}; receiver database "
        f"{figures['receiver_db_bytes'] / MB:,.0f} MB.",
    ]
    if drain_note:
        lines += ["", f"Drain: {drain_note}"]
    step = 300.0 if t_end >= 20 * 60 else 30.0
    lines += [
        "",
        f"## Time series (every {step / 60:g} min; CPU averaged over the preceding "
        f"{figures['interval_s']:g} s sample)",
        "",
        "| t (min) | agent RSS MB | agent anon MB | agent µs/msg | agent % core | bare RSS MB "
        "| bare µs/msg | broker % core | windows open | unacked | outbox chunks | outbox file MB "
        "| WAL MB | machine busy % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    next_t = 0.0
    for s in samples:
        if s.t_s + 1e-6 < next_t and s is not samples[-1]:
            continue
        next_t = (math.floor(s.t_s / step + 1e-6) + 1) * step
        st = s.status
        lines.append(
            f"| {s.t_s / 60:.1f} | {s.agent.get('VmRSS', 0) / 1024:.1f} | "
            f"{s.agent.get('RssAnon', 0) / 1024:.1f} | {_f1(s.agent_us_per_msg)} | "
            f"{_pct(s.agent_cores)} | {s.bare.get('VmRSS', 0) / 1024:.1f} | "
            f"{_f1(s.bare_us_per_msg)} | {_pct(s.broker_cores)} | "
            f"{dig(st, ('aggregate', 'windows_open'))} | {dig(st, ('ingest', 'unacked'))} | "
            f"{dig(st, ('outbox', 'chunks'))} | "
            f"{(dig(st, ('outbox', 'file_bytes')) or 0) / MB:.1f} | {s.wal_bytes / MB:.1f} | "
            f"{'n/a' if s is samples[0] else f'{s.busy_pct:.0f}'} |"
        )
    lines += [
        "",
        "## Reproduce",
        "",
        "```sh",
        ".venv/bin/python -m bench.soak                  # the full hour (~62 min), writes "
        "bench/SOAK.md",
        ".venv/bin/python -m bench.soak --minutes 3      # smoke run",
        ".venv/bin/python -m bench.soak --json-out bench/out/soak.json   # every sample as JSON",
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

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
second half is named. Writes bench/SOAK.md (figures, a compact time series; from the JSON alone,
`--md-from soak.json` writes it again) and optionally --json-out. The receiver's and the agent's
databases are deleted at the end (an hour is a few GB) unless --keep.

    .venv/bin/python -m bench.soak                 # the full hour (~62 min)
    .venv/bin/python -m bench.soak --minutes 3     # smoke run
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH,
    GATEWAY_ID,
    MB,
    CountingSub,
    Fit,
    LoadThread,
    MachineLoad,
    Mosquitto,
    ProcStat,
    Receiver,
    Report,
    Sampler,
    dig,
    fresh_dir,
    kill_quietly,
    linfit,
    parser,
    rnd,
    say,
    start_agent,
    wait_for,
)
from bench.loadgen import LoadOptions, run_load

CAMERAS = 300
RATE_PER_CAMERA = 10.0
# agent/durable/store.py: min(64 MiB, buffer.max_bytes / 8), max_bytes 1 GiB shipped
WAL_CAP = 64 * MB
# What a sample reads from /status: (sample key, path in /status).
FROM_STATUS = (
    ("agent_received", ("ingest", "received")), ("windows_open", ("aggregate", "windows_open")),
    ("late_deltas", ("aggregate", "late_deltas")), ("unacked", ("ingest", "unacked")),
    ("cameras", ("cameras", "count")), ("clock_suspect", ("cameras", "clock_suspect")),
    ("outbox_chunks", ("outbox", "chunks")), ("outbox_bytes", ("outbox", "bytes")),
    ("outbox_file_bytes", ("outbox", "file_bytes")),
)  # fmt: skip
# What must not grow under a steady load: (label, sample key, unit).
GAUGES = (
    ("windows_open", "windows_open", "windows"), ("ack_ledger_unacked", "unacked", "messages"),
    ("cameras", "cameras", "cameras"), ("clock_suspect", "clock_suspect", "cameras"),
    ("outbox_chunks", "outbox_chunks", "chunks"), ("outbox_bytes", "outbox_bytes", "B"),
    ("outbox_file_bytes", "outbox_file_bytes", "B"), ("outbox_wal_bytes", "wal_bytes", "B"),
    ("outbox_db_file_bytes", "db_file_bytes", "B"), ("agent_threads", "agent_threads", "threads"),
)  # fmt: skip
# Absolute growth below which a gauge is not called growing (over the second half).
GROWTH_FLOOR = {"B": 256 * 1024, "messages": 3000, "chunks": 1000, "windows": 300}
CORES = ("agent", "bare", "broker", "receiver")


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


class Readings:
    """What the soak reads at each sample besides /proc (the Sampler's `extra`): the agent's
    /status, the bare subscriber's count, the outbox's files, the machine's load since the
    previous sample; and the figures of the interval ending there (CPU per message, cores)."""

    def __init__(self, agent: Any, bare: CountingSub, wal: Path, t0: float) -> None:
        self.agent, self.bare, self.wal, self.t0 = agent, bare, wal, t0
        self.load = MachineLoad()

    def __call__(self, s: dict[str, Any], prev: dict[str, Any] | None) -> None:
        st = self.agent.status() or {}
        busy, steal = self.load.read()
        self.load = MachineLoad()
        a, b = s.get("agent", {}), s.get("bare", {})
        s.update(
            t_s=s["t"] - self.t0, agent_rss_kb=a.get("rss_kb"), agent_hwm_kb=a.get("hwm_kb"),
            agent_rss_anon_kb=a.get("anon_kb"), agent_threads=a.get("threads"),
            bare_rss_kb=b.get("rss_kb"), broker_rss_kb=s.get("broker", {}).get("rss_kb"),
            bare_received=self.bare.count, wal_bytes=file_size(self.wal),
            db_file_bytes=file_size(self.wal.with_name(self.wal.name.removesuffix("-wal"))),
            rejects=sum((dig(st, "ingest", "rejects") or {}).values()),
            drops=sum((dig(st, "drops") or {}).values()), machine_busy_pct=busy,
            machine_steal_pct=steal, status=st, agent_us_per_msg=None, bare_us_per_msg=None,
        )  # fmt: skip
        for key, path in FROM_STATUS:
            s[key] = dig(st, *path)
        dt = s["t_s"] - prev["t_s"] if prev else 0
        d = {k: s[k]["cpu_s"] - prev[k]["cpu_s"] for k in CORES if prev and k in s and k in prev}
        for k in CORES:
            s[f"{k}_cores"] = d[k] / dt if k in d and dt > 0 else None
        if prev is None or dt <= 0:
            return
        n = (None if s["agent_received"] is None or prev["agent_received"] is None
             else s["agent_received"] - prev["agent_received"])  # fmt: skip
        s["agent_us_per_msg"] = d["agent"] / n * 1e6 if "agent" in d and n and n > 0 else None
        nb = s["bare_received"] - prev["bare_received"]
        s["bare_us_per_msg"] = d["bare"] / nb * 1e6 if "bare" in d and nb > 0 else None


def receiver_truth(db: Path) -> dict[str, Any]:
    """The receiver's ground truth, read from its SQLite (read-only)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        chunks, messages = con.execute(
            "SELECT count(*), coalesce(sum(json_extract(body, '$.count')), 0) FROM chunks"
            " WHERE gateway = ?", (GATEWAY_ID,),
        ).fetchone()  # fmt: skip
        row = con.execute(
            "SELECT max_seq, batches, gaps, out_of_order, duplicates, rev0_repeats FROM gateways"
            " WHERE gateway = ?", (GATEWAY_ID,),
        ).fetchone()  # fmt: skip
        (late_chunks,) = con.execute(
            "SELECT count(*) FROM chunks WHERE gateway = ? AND rev > 0", (GATEWAY_ID,)
        ).fetchone()
    finally:
        con.close()
    keys = ("max_seq", "batches", "gaps", "out_of_order", "duplicates", "rev0_repeats")
    doc: dict[str, Any] = dict(zip(keys, row, strict=True)) if row else {}
    doc.update(chunks=chunks, messages=messages, late_delta_chunks=late_chunks)
    return doc


def run(rep: Report, work: Path, minutes: float, interval: float, keep: bool) -> dict[str, Any]:
    """The hour: the agent and the bare subscriber under loadgen's load, sampled on a grid;
    then drained, and the receiver's ground truth read."""
    duration_s = minutes * 60
    rate = CAMERAS * RATE_PER_CAMERA
    broker = receiver = agent = bare = load_thread = None
    samples: list[dict[str, Any]] = []  # the Sampler's
    exit_code = 0
    try:
        broker = Mosquitto(work / "mosquitto").start()
        receiver = Receiver(work / "cloud").start()
        agent = start_agent(work, broker.port, receiver.url)
        bare = CountingSub("bare", broker.port, work / "bare.log", max_seconds=duration_s + 900)
        bare.wait_ready()
        assert agent.popen is not None and broker.popen is not None
        assert receiver.popen is not None
        pids = {"agent": agent.popen.pid, "bare": bare.pid, "broker": broker.popen.pid,
                "receiver": receiver.popen.pid}  # fmt: skip
        wal = work / "agent" / "buffer.sqlite3-wal"
        idle, bare_idle = ProcStat(pids["agent"]).rss_kb(), ProcStat(pids["bare"]).rss_kb()
        say(f"[soak] {CAMERAS} cameras x {RATE_PER_CAMERA:g} msgs/s = {rate:,.0f} msgs/s for "
            f"{minutes:g} min (loadgen, 1 process, QoS 1); sample every {interval:g} s; "
            f"agent idle RSS {idle / 1024:.1f} MB, bare {bare_idle / 1024:.1f} MB")  # fmt: skip
        start_at = time.time() + 1.0
        opts = LoadOptions(port=broker.port, cameras=CAMERAS, rate=rate, duration_s=duration_s,
                           processes=1, seed=13, start_at=start_at,
                           max_messages=int(rate * duration_s * 1.05) + 10_000)  # fmt: skip
        load_thread = LoadThread(lambda: run_load(opts))
        load_thread.start()
        # Publishing starts at start_at (wall clock); sample on a fixed grid from there.
        wait_for(lambda: time.time() >= start_at, timeout_s=5, what="publishing start",
                 poll_s=0.01)  # fmt: skip
        t0 = time.monotonic()
        sampler = Sampler(pids, extra=Readings(agent, bare, wal, t0))
        samples = sampler.samples
        sampler.take()
        k = 1
        while True:
            # The sampling interval itself: the only sleep in this script.
            time.sleep(max(0.0, t0 + k * interval - time.monotonic()))
            if not agent.running:
                raise RuntimeError(f"agent exited during the soak:\n{agent.log_text()[-2000:]}")
            s = sampler.take()
            if k % max(1, round(60 / interval)) == 0 or k == 1:
                say(_progress(s))
            k += 1
            if s["t_s"] >= duration_s or not load_thread.is_alive():
                break
        t_pub_end = samples[-1]["t_s"]
        load_thread.join(timeout=opts.drain_timeout_s + 60)
        if load_thread.error is not None:
            raise load_thread.error
        pub = load_thread.result
        acked = int(pub.get("acked", 0))
        say(f"[soak] publishing done: {json.dumps(pub)}")

        def drained() -> bool:  # the last windows close after idle_close_s of silence
            st = agent.status() if agent else None
            return bool(
                st and dig(st, "ingest", "received") is not None
                and st["ingest"]["received"] >= acked and st["aggregate"]["windows_open"] == 0
                and st["ingest"]["unacked"] == 0 and st["outbox"]["chunks"] == 0
            )  # fmt: skip

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
        agent_hwm, bare_hwm = ProcStat(pids["agent"]).hwm_kb(), ProcStat(pids["bare"]).hwm_kb()
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
        if not keep and exit_code == 0:
            for d in ("cloud", "agent", "mosquitto"):
                shutil.rmtree(work / d, ignore_errors=True)
    return dict(samples=samples, t_pub_end=t_pub_end, pub=pub, acked=acked, idle=idle,
                bare_idle=bare_idle, drain_note=drain_note, final_status=final_status,
                agent_hwm=agent_hwm, bare_hwm=bare_hwm, bare_count=bare_count, truth=truth,
                db_bytes=db_bytes)  # fmt: skip


def flatness(rep: Report, r: dict[str, Any], minutes: float, interval: float) -> dict[str, Any]:
    """Ground truth, slopes and the verdict: the figures."""
    samples, t_pub_end, pub, acked, truth, bare_count = (
        r[k] for k in ("samples", "t_pub_end", "pub", "acked", "truth", "bare_count"))  # fmt: skip
    exact = (truth["messages"] == acked and pub.get("failed", 0) == 0 and not truth.get("gaps")
             and not truth.get("out_of_order"))  # fmt: skip
    rep.figure("published", pub)
    rep.figure("receiver", truth)
    rep.figure("bare_received", bare_count)
    rep.figure("exact", exact)
    say(f"[soak] ground truth: broker acked {acked:,}, receiver counted {truth['messages']:,} in "
        f"{truth['chunks']:,} chunks (gaps {truth.get('gaps')}, out of order "
        f"{truth.get('out_of_order')}, retransmitted duplicates {truth.get('duplicates')}); bare "
        f"subscriber got {bare_count:,}: {'EXACT' if exact else 'NOT EXACT'}")  # fmt: skip
    warm = min(60.0, max(interval, 0.1 * t_pub_end))
    steady = [s for s in samples if warm < s["t_s"] <= t_pub_end]
    second = [s for s in samples if t_pub_end / 2 <= s["t_s"] <= t_pub_end]

    def fit(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> Fit | None:
        return linfit((s["t_s"] / 3600, None if (v := _num(s.get(key))) is None else v / scale)
                      for s in rows)  # fmt: skip

    def per_msg_ratio(s: dict[str, Any]) -> float | None:
        a, b = s.get("agent_us_per_msg"), s.get("bare_us_per_msg")
        return a / b if a and b else None

    fits = {
        "agent_rss": fit(second, "agent_rss_kb", 1024),
        "agent_rss_anon": fit(second, "agent_rss_anon_kb", 1024),
        "bare_rss": fit(second, "bare_rss_kb", 1024),
        "agent_cpu": fit(steady, "agent_us_per_msg"),
        "bare_cpu": fit(steady, "bare_us_per_msg"),
        "ratio": linfit((s["t_s"] / 3600, per_msg_ratio(s)) for s in steady),
        "agent_cpu_2nd": fit([s for s in second if s["t_s"] > warm], "agent_us_per_msg"),
    }
    f_rss, f_bare_rss, f_cpu = fits["agent_rss"], fits["bare_rss"], fits["agent_cpu"]

    def pct_h(f: Fit | None) -> float | None:
        return None if f is None or not f.mean else 100 * f.slope / f.mean

    growing: list[str] = []
    gauges_doc = {}
    span_h = (second[-1]["t_s"] - second[0]["t_s"]) / 3600 if len(second) > 1 else 0.0
    for label, key, unit in GAUGES:
        g = fit(second, key)
        vs = [v for s in second if (v := _num(s.get(key))) is not None]
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
    cpu_pct, ratio_pct = pct_h(f_cpu), pct_h(fits["ratio"])
    cpu_flat = (
        cpu_pct is None or abs(cpu_pct) <= 5 or not (f_cpu is not None and f_cpu.significant)
        or (ratio_pct is not None and abs(ratio_pct) <= 5)
    )  # fmt: skip
    if not cpu_flat:
        growing.insert(0, f"agent CPU per message ({cpu_pct:+.1f} %/hour; agent/bare ratio "
                       f"{_pctv(ratio_pct)}/hour)")  # fmt: skip

    us = [s["agent_us_per_msg"] for s in steady if s.get("agent_us_per_msg")]
    bus = [s["bare_us_per_msg"] for s in steady if s.get("bare_us_per_msg")]
    figures = {
        "minutes": minutes,
        "interval_s": interval,
        "msgs_per_s": round(acked / t_pub_end, 1) if t_pub_end else None,
        "agent_idle_rss_mb": round(r["idle"] / 1024, 1),
        "agent_peak_rss_mb": round(r["agent_hwm"] / 1024, 1),
        "bare_peak_rss_mb": round(r["bare_hwm"] / 1024, 1),
        "agent_rss_slope_mb_per_h": _fitdoc(f_rss),
        "agent_rss_anon_slope_mb_per_h": _fitdoc(fits["agent_rss_anon"]),
        "bare_rss_slope_mb_per_h": _fitdoc(f_bare_rss),
        "agent_us_per_msg_mean": round(sum(us) / len(us), 1) if us else None,
        "bare_us_per_msg_mean": round(sum(bus) / len(bus), 1) if bus else None,
        "agent_cpu_slope_pct_per_h": rnd(cpu_pct),
        "agent_cpu_slope_second_half_pct_per_h": rnd(pct_h(fits["agent_cpu_2nd"])),
        "bare_cpu_slope_pct_per_h": rnd(pct_h(fits["bare_cpu"])),
        "agent_over_bare_slope_pct_per_h": rnd(ratio_pct),
        "gauges_second_half": gauges_doc,
        "rss_flat": rss_flat,
        "cpu_flat": cpu_flat,
        "growing": growing,
        "receiver_db_bytes": r["db_bytes"],
        # What bench/SOAK.md is written from, besides the figures above.
        "bare_idle_rss_mb": round(r["bare_idle"] / 1024, 1),
        "publish_s": t_pub_end,
        "warmup_s": warm,
        "drain_note": r["drain_note"],
        "fits": {k: None if f is None else vars(f) for k, f in fits.items()},
    }
    for key, value in figures.items():
        rep.figure(key, value)
    rep.figure("samples", [_sample_doc(s) for s in samples])
    rep.figure("final_status", r["final_status"])
    verdict = "FLAT" if rss_flat and cpu_flat else "GROWS: " + "; ".join(growing[:2])
    say(
        f"[soak] agent RSS {_fitstr(f_rss, 'MB')}/h over the second half (bare "
        f"{_fitstr(f_bare_rss, 'MB')}/h); CPU µs/msg {_pctv(cpu_pct)}/h (bare "
        f"{_pctv(pct_h(fits['bare_cpu']))}/h, agent/bare {_pctv(ratio_pct)}/h): {verdict}"
    )
    if growing:
        say("[soak] grows: " + "; ".join(growing))
    return figures


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "", quick=False)
    p.add_argument("--minutes", type=float, default=60.0, help="minutes of publishing")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--md-out", type=Path, default=BENCH / "SOAK.md",
                   help="the report (default bench/SOAK.md; '-' for none)")  # fmt: skip
    p.add_argument("--md-from", type=Path, help="only write the report from this --json-out")
    p.add_argument("--keep", action="store_true", help="keep the databases under bench/out/soak")
    args = p.parse_args(argv)
    if args.md_from:
        write_md(args.md_out, json.loads(args.md_from.read_text()))
        return 0
    interval = max(1.0, args.interval)
    rep = Report("soak", quick=args.minutes < 15)
    r = run(rep, fresh_dir("soak"), args.minutes, interval, args.keep)
    flatness(rep, r, args.minutes, interval)
    doc = rep.finish(args.json_out)
    if str(args.md_out) != "-":
        write_md(args.md_out, doc)
        say(f"[soak] wrote {args.md_out}")
    return 0 if rep.figures["exact"] else 1


# -- output -----------------------------------------------------------------------------------


def _pctv(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f} %"


def _fitdoc(f: Fit | None) -> dict[str, Any] | None:
    if f is None:
        return None
    return {"slope": round(f.slope, 3), "stderr": round(f.stderr, 3), "n": f.n,
            "mean": round(f.mean, 2)}  # fmt: skip


def _fitstr(f: Fit | dict[str, Any] | None, unit: str) -> str:
    if isinstance(f, Fit):
        f = vars(f)
    return "n/a" if f is None else f"{f['slope']:+.2f} ± {2 * f['stderr']:.2f} {unit}"


def _pct_h(f: dict[str, Any] | None) -> str:
    if f is None or not f["mean"]:
        return "n/a"
    return f"{100 * f['slope'] / f['mean']:+.1f} ± {200 * f['stderr'] / f['mean']:.1f} %/hour"


def _human(x: float, unit: str) -> str:
    return f"{x / 1024:,.0f} KiB" if unit == "B" else f"{x:,.1f} {unit}"


def _f1(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f} %"


def _progress(s: dict[str, Any]) -> str:
    return (
        f"[soak] t={s['t_s'] / 60:5.1f} min  agent RSS {(s['agent_rss_kb'] or 0) / 1024:5.1f} MB, "
        f"{_f1(s.get('agent_us_per_msg'))} µs/msg ({_pct(s.get('agent_cores'))})  bare "
        f"{(s['bare_rss_kb'] or 0) / 1024:5.1f} MB, {_f1(s.get('bare_us_per_msg'))} µs/msg  "
        f"broker {_pct(s.get('broker_cores'))}  windows {s['windows_open']}  unacked "
        f"{s['unacked']}  outbox {s['outbox_chunks']} chunks, WAL {s['wal_bytes'] / MB:.1f} MB  "
        f"machine busy {s['machine_busy_pct']:.0f} %"
    )


def _sample_doc(s: dict[str, Any]) -> dict[str, Any]:
    """A sample as written to the JSON: derived figures rounded, the raw readings left out."""
    nd = {"agent_us_per_msg": 1, "bare_us_per_msg": 1, "machine_busy_pct": 1,
          "machine_steal_pct": 1, "t_s": 1}  # fmt: skip
    return {
        k: rnd(v, nd.get(k, 3)) if k in nd or k.endswith("_cores") else v
        for k, v in s.items() if k not in ("t", "status", *CORES)
    }  # fmt: skip


MD = """# edge-agent soak: 300 cameras x 10 msgs/s for {length}
{smoke}
Generated by `python -m bench.soak --minutes {f[minutes]:g}` on {doc[started]}; agent commit \
{doc[agent_commit_at_start]}; {m[nproc]} x {m[cpu_model]}, Python {m[python]}, {m[mosquitto]}. \
Machine busy {n[machine_busy_pct]} % of all cores during the run (steal {n[machine_steal_pct]} \
%), calibration {n[calibration_start_ops_s]:,} -> {n[calibration_end_ops_s]:,} ops/s.

Setup: private Mosquitto, the reference receiver, the agent with the shipped defaults, and a \
bare aiomqtt subscriber (bench/bare_sub.py) on the same broker receiving the same messages (the \
noise baseline); publisher bench/loadgen.py (1 process, raw-socket MQTT v5, QoS 1, `ts` field, \
300 cameras x 3 streams). Sampled every {f[interval_s]:g} s. CPU slopes from {f[warmup_s]:.0f} s \
on (warm-up excluded); RSS and gauge slopes over the second half of the publishing. ± is two \
standard errors of the least-squares slope.

## Figures

| figure | agent | bare aiomqtt (same run) | verdict |
|---|---|---|---|
| ground truth | broker acked {acked:,}; receiver counted {t[messages]:,} in {t[chunks]:,} chunks; \
gaps {gaps}, out of order {ooo}, retransmitted duplicates (deduped) {dups} | received \
{f[bare_received]:,} | {exact} |
| publishing | {f[msgs_per_s]:,} msgs/s for {pub_min:.1f} min | | |
| RSS idle -> peak (VmHWM) | {f[agent_idle_rss_mb]:.1f} -> {f[agent_peak_rss_mb]} MB | \
{f[bare_idle_rss_mb]:.1f} -> {f[bare_peak_rss_mb]} MB | |
| RSS slope, second half | {rss}/hour (anon {rss_anon}/hour) | {bare_rss}/hour | {rss_flat} |
| CPU per message, mean | {f[agent_us_per_msg_mean]} µs | {f[bare_us_per_msg_mean]} µs | |
| CPU per message, slope | {cpu} (agent/bare ratio {ratio}) | {bare_cpu} | {cpu_flat} |

Verdict rules: RSS is flat when its slope is <= 1 MB/hour, or not significant (< 2 standard \
errors), or within 1 MB/hour of the bare subscriber's; CPU per message is flat when its slope is \
within ±5 %/hour, or not significant, or the agent/bare ratio is within ±5 %/hour (the \
neighbours slow both).

**Grows:** {grows}

## What could grow (/status and disk, second half)

| gauge | min | max | slope per hour |
|---|---|---|---|
{gauges}

At the end: aggregate {aggregate}, late-delta chunks at the receiver \
{late}, rejects {rejects}, drops {drops}, redelivered skipped \
{redelivered}, MQTT reconnects {reconnects}, batches sent {batches} (failed {failed}), snapshots \
written {snapshots}; receiver database {db_mb:,.0f} MB.{drain}

## Time series (every {step_min:g} min; CPU averaged over the preceding {f[interval_s]:g} s \
sample)

| t (min) | agent RSS MB | agent anon MB | agent µs/msg | agent % core | bare RSS MB | bare \
µs/msg | broker % core | windows open | unacked | outbox chunks | outbox file MB | WAL MB | \
machine busy % |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{series}

## Reproduce

```sh
.venv/bin/python -m bench.soak                  # the full hour (~62 min), writes bench/SOAK.md
.venv/bin/python -m bench.soak --minutes 3      # smoke run
.venv/bin/python -m bench.soak --json-out bench/out/soak.json   # every sample as JSON
```
"""


def write_md(path: Path, doc: dict[str, Any]) -> None:
    """bench/SOAK.md from the soak's JSON document (Report.finish)."""
    f = doc["figures"]
    fits, fs, minutes, t_end = f["fits"], f["final_status"], f["minutes"], f["publish_s"]

    def gauge(label: str, g: dict[str, Any]) -> str:
        mb = g["unit"] == "B"

        def v(x: Any) -> str:
            return "n/a" if x is None else f"{x / MB:.2f} MB" if mb else f"{x:,.0f}"

        slope, se = g["slope_per_hour"], g["stderr_per_hour"]
        sl = "n/a" if slope is None else (f"{slope / MB:+.2f} ± {2 * se / MB:.2f} MB" if mb
                                          else f"{slope:+,.1f} ± {2 * se:,.1f}")  # fmt: skip
        return f"| {label} | {v(g['min'])} | {v(g['max'])} | {sl} |"

    step = 300.0 if t_end >= 20 * 60 else 30.0
    series, next_t, samples = [], 0.0, f["samples"]
    for i, s in enumerate(samples):
        if s["t_s"] + 1e-6 < next_t and i != len(samples) - 1:
            continue
        next_t = (math.floor(s["t_s"] / step + 1e-6) + 1) * step
        busy = "n/a" if i == 0 else f"{s['machine_busy_pct']:.0f}"
        series.append(
            f"| {s['t_s'] / 60:.1f} | {(s['agent_rss_kb'] or 0) / 1024:.1f} | "
            f"{(s['agent_rss_anon_kb'] or 0) / 1024:.1f} | {_f1(s.get('agent_us_per_msg'))} | "
            f"{_pct(s.get('agent_cores'))} | {(s['bare_rss_kb'] or 0) / 1024:.1f} | "
            f"{_f1(s.get('bare_us_per_msg'))} | {_pct(s.get('broker_cores'))} | "
            f"{s['windows_open']} | {s['unacked']} | {s['outbox_chunks']} | "
            f"{(s['outbox_file_bytes'] or 0) / MB:.1f} | {s['wal_bytes'] / MB:.1f} | "
            f"{busy} |"
        )
    truth = f["receiver"]
    path.write_text(MD.format(
        length=f"{minutes:g} minutes" if minutes < 60 else f"{minutes / 60:g} hour(s)",
        smoke="" if minutes >= 15 else (
            f"\n**SMOKE RUN ({minutes:g} minutes)**: proves the script, not the agent. Slopes "
            "extrapolated to an hour from a few minutes are dominated by warm-up and the "
            "neighbours' noise; the full hour is `.venv/bin/python -m bench.soak` (~62 min).\n"),
        doc=doc, f=f, m=doc["machine"], n=doc["noise"], t=truth,
        acked=f["published"].get("acked", 0), gaps=truth.get("gaps"),
        ooo=truth.get("out_of_order"), dups=truth.get("duplicates"),
        exact="exact" if f["exact"] else "**NOT exact**", pub_min=t_end / 60,
        rss=_fitstr(fits["agent_rss"], "MB"), rss_anon=_fitstr(fits["agent_rss_anon"], "MB"),
        bare_rss=_fitstr(fits["bare_rss"], "MB"),
        rss_flat="flat" if f["rss_flat"] else "**grows**",
        cpu=_pct_h(fits["agent_cpu"]), ratio=_pct_h(fits["ratio"]),
        bare_cpu=_pct_h(fits["bare_cpu"]), cpu_flat="flat" if f["cpu_flat"] else "**grows**",
        grows="; ".join(f["growing"]) if f["growing"] else "nothing.",
        gauges="\n".join(gauge(k, g) for k, g in f["gauges_second_half"].items()),
        aggregate=dig(fs, "aggregate"), drops=dig(fs, "drops"),
        late=truth.get("late_delta_chunks"), rejects=dig(fs, "ingest", "rejects"),
        redelivered=dig(fs, "ingest", "redelivered_skipped"),
        reconnects=dig(fs, "mqtt", "reconnects"), batches=dig(fs, "forward", "batches_sent"),
        failed=dig(fs, "forward", "batches_failed"),
        snapshots=dig(fs, "outbox", "snapshots_written"), db_mb=f["receiver_db_bytes"] / MB,
        drain=f"\n\nDrain: {f['drain_note']}" if f["drain_note"] else "",
        step_min=step / 60, series="\n".join(series),
    ))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

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

import itertools
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
    Nones,
    ProcStat,
    Report,
    Sampler,
    dig,
    fill,
    fresh_dir,
    idle,
    linfit,
    parser,
    pid,
    rnd,
    say,
    site,
)
from bench.loadgen import LoadOptions, run_load
from devtools.procs import wait_for

CAMERAS, RATE_PER_CAMERA = 300, 10.0
WAL_CAP = 64 * MB  # agent/durable/store.py: min(64 MiB, buffer.max_bytes / 8), max_bytes 1 GiB
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
    return path.stat().st_size if path.exists() else 0


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
        (busy, steal), self.load = self.load.read(), MachineLoad()
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
            **{key: dig(st, *path) for key, path in FROM_STATUS},
        )  # fmt: skip
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
        q = [con.execute(sql, (GATEWAY_ID,)).fetchone() for sql in (
            "SELECT count(*), coalesce(sum(json_extract(body, '$.count')), 0) FROM chunks"
            " WHERE gateway = ?",
            "SELECT max_seq, batches, gaps, out_of_order, duplicates, rev0_repeats FROM gateways"
            " WHERE gateway = ?",
            "SELECT count(*) FROM chunks WHERE gateway = ? AND rev > 0")]  # fmt: skip
    finally:
        con.close()
    keys = ("max_seq", "batches", "gaps", "out_of_order", "duplicates", "rev0_repeats")
    doc: dict[str, Any] = dict(zip(keys, q[1], strict=True)) if q[1] else {}
    doc.update(chunks=q[0][0], messages=q[0][1], late_delta_chunks=q[2][0])
    return doc


def run(rep: Report, work: Path, minutes: float, interval: float, keep: bool) -> dict[str, Any]:
    """The hour: the agent and the bare subscriber under loadgen's load, sampled on a grid;
    then drained, and the receiver's ground truth read."""
    duration_s, rate = minutes * 60, CAMERAS * RATE_PER_CAMERA
    r: dict[str, Any] = {"samples": []}  # the Sampler's samples, and what is measured
    with site(work) as (broker, receiver, agent):
        bare = CountingSub("bare", broker.port, work / "bare.log", max_seconds=duration_s + 900)
        load_thread = None
        try:
            bare.wait_ready()
            pids = {"agent": pid(agent), "bare": bare.pid, "broker": pid(broker),
                    "receiver": pid(receiver)}  # fmt: skip
            wal = work / "agent" / "buffer.sqlite3-wal"
            idle_kb = r["idle"] = ProcStat(pids["agent"]).rss_kb()
            bare_kb = r["bare_idle"] = ProcStat(pids["bare"]).rss_kb()
            say(f"[soak] {CAMERAS} cameras x {RATE_PER_CAMERA:g} msgs/s = {rate:,.0f} msgs/s for "
                f"{minutes:g} min (loadgen, 1 process, QoS 1); sample every {interval:g} s; "
                f"agent idle RSS {idle_kb / 1024:.1f} MB, bare {bare_kb / 1024:.1f} MB"
            )  # fmt: skip
            start_at = time.time() + 1.0
            opts = LoadOptions(port=broker.port, cameras=CAMERAS, rate=rate, duration_s=duration_s,
                               processes=1, seed=13, start_at=start_at,
                               max_messages=int(rate * duration_s * 1.05) + 10_000)  # fmt: skip
            load_thread = LoadThread(lambda: run_load(opts))
            load_thread.start()
            # Publishing starts at start_at (wall clock); sample on a fixed grid from there.
            time.sleep(max(0.0, start_at - time.time()))
            t0 = time.monotonic()
            sampler = Sampler(pids, extra=Readings(agent, bare, wal, t0))
            samples = r["samples"] = sampler.samples
            sampler.take()
            for k in itertools.count(1):
                # The sampling interval itself: the only sleep in this script.
                time.sleep(max(0.0, t0 + k * interval - time.monotonic()))
                if not agent.running:
                    raise RuntimeError(f"agent exited during the soak:\n{agent.log_text()[-2000:]}")
                s = sampler.take()
                if k % max(1, round(60 / interval)) == 0 or k == 1:
                    say(_progress(s))
                if s["t_s"] >= duration_s or not load_thread.is_alive():
                    break
            r["t_pub_end"] = samples[-1]["t_s"]
            load_thread.join(timeout=opts.drain_timeout_s + 60)
            if load_thread.error is not None:
                raise load_thread.error
            pub = r["pub"] = load_thread.result
            acked = r["acked"] = int(pub.get("acked", 0))
            say(f"[soak] publishing done: {json.dumps(pub)}")

            def drained() -> bool:  # the last windows close after idle_close_s of silence
                st = agent.status()
                return idle(st) and (dig(st, "ingest", "received") or 0) >= acked

            r["drain_note"] = None
            try:
                wait_for(drained, timeout_s=120, poll_s=0.5,
                         what="agent drained (windows closed, outbox empty)")  # fmt: skip
            except TimeoutError as e:
                r["drain_note"] = str(e)
                rep.note(str(e))
            try:
                wait_for(lambda: bare.count >= acked or not bare.running, timeout_s=30,
                         what="bare subscriber caught up", poll_s=0.2)  # fmt: skip
            except TimeoutError as e:
                rep.note(f"{e}: it got {bare.count:,} of {acked:,}")
            r.update(final_status=agent.status() or {}, agent_hwm=ProcStat(pids["agent"]).hwm_kb(),
                     bare_hwm=ProcStat(pids["bare"]).hwm_kb(), bare_count=bare.count,
                     truth=receiver_truth(receiver.db),
                     db_bytes=file_size(receiver.db) + file_size(receiver.db.with_name(
                         "cloud.sqlite3-wal")))  # fmt: skip
        finally:
            bare.stop()
            if load_thread is not None and load_thread.is_alive():
                load_thread.join(timeout=5)
    if not keep:
        for d in ("cloud", "agent", "mosquitto"):
            shutil.rmtree(work / d, ignore_errors=True)
    return r


def flatness(rep: Report, r: dict[str, Any], minutes: float, interval: float) -> dict[str, Any]:
    """Ground truth, slopes and the verdict: the figures."""
    samples, t_pub_end, pub, acked, truth = (r[k] for k in ("samples", "t_pub_end", "pub",
                                                            "acked", "truth"))  # fmt: skip
    exact = (truth["messages"] == acked and pub.get("failed", 0) == 0 and not truth.get("gaps")
             and not truth.get("out_of_order"))  # fmt: skip
    for key, value in (("published", pub), ("receiver", truth), ("bare_received", r["bare_count"]),
                       ("exact", exact)):  # fmt: skip
        rep.figure(key, value)
    say(f"[soak] ground truth: broker acked {acked:,}, receiver counted {truth['messages']:,} in "
        f"{truth['chunks']:,} chunks (gaps {truth.get('gaps')}, out of order "
        f"{truth.get('out_of_order')}, retransmitted duplicates {truth.get('duplicates')}); bare "
        f"subscriber got {r['bare_count']:,}: {'EXACT' if exact else 'NOT EXACT'}")  # fmt: skip
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
                       f"{fill('{r:+.1f} %', r=ratio_pct)}/hour)")  # fmt: skip

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
    say(fill("[soak] agent RSS {a}/h over the second half (bare {b}/h); CPU µs/msg {c:+.1f} %/h "
             "(bare {bc:+.1f} %/h, agent/bare {r:+.1f} %/h): {v}", a=_fitstr(f_rss, "MB"),
             b=_fitstr(f_bare_rss, "MB"), c=cpu_pct, bc=pct_h(fits["bare_cpu"]), r=ratio_pct,
             v=verdict))  # fmt: skip
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


def _fitdoc(f: Fit | None) -> dict[str, Any] | None:
    return None if f is None else {"slope": round(f.slope, 3), "stderr": round(f.stderr, 3),
                                   "n": f.n, "mean": round(f.mean, 2)}  # fmt: skip


def _fitstr(f: Fit | dict[str, Any] | None, unit: str) -> str:
    f = vars(f) if isinstance(f, Fit) else f
    return "n/a" if f is None else f"{f['slope']:+.2f} ± {2 * f['stderr']:.2f} {unit}"


def _pct_h(f: dict[str, Any] | None) -> str:
    if f is None or not f["mean"]:
        return "n/a"
    return f"{100 * f['slope'] / f['mean']:+.1f} ± {200 * f['stderr'] / f['mean']:.1f} %/hour"


def _human(x: float, unit: str) -> str:
    return f"{x / 1024:,.0f} KiB" if unit == "B" else f"{x:,.1f} {unit}"


def _progress(s: dict[str, Any]) -> str:
    return fill(
        "[soak] t={tm:5.1f} min  agent RSS {ar:5.1f} MB, {agent_us_per_msg:.1f} µs/msg "
        "({agent_cores:pct})  bare {br:5.1f} MB, {bare_us_per_msg:.1f} µs/msg  broker "
        "{broker_cores:pct}  windows {windows_open}  unacked {unacked}  outbox {outbox_chunks} "
        "chunks, WAL {wal:.1f} MB  machine busy {machine_busy_pct:.0f} %",
        tm=s["t_s"] / 60, ar=(s["agent_rss_kb"] or 0) / 1024, br=(s["bare_rss_kb"] or 0) / 1024,
        wal=s["wal_bytes"] / MB, **{k: v for k, v in s.items() if k != "t"},
    )  # fmt: skip


def _sample_doc(s: dict[str, Any]) -> dict[str, Any]:
    """A sample as written to the JSON: derived figures rounded, the raw readings left out."""
    nd = {"agent_us_per_msg": 1, "bare_us_per_msg": 1, "machine_busy_pct": 1,
          "machine_steal_pct": 1, "t_s": 1}  # fmt: skip
    return {k: rnd(v, nd.get(k, 3)) if k in nd or k.endswith("_cores") else v
            for k, v in s.items() if k not in ("t", "status", *CORES)}  # fmt: skip


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
gaps {t[gaps]}, out of order {t[out_of_order]}, retransmitted duplicates (deduped) \
{t[duplicates]} | received {f[bare_received]:,} | {exact} |
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

At the end: aggregate {fs[aggregate]}, late-delta chunks at the receiver \
{t[late_delta_chunks]}, rejects {ingest[rejects]}, drops {fs[drops]}, redelivered skipped \
{ingest[redelivered_skipped]}, MQTT reconnects {mqtt[reconnects]}, batches sent \
{fw[batches_sent]} (failed {fw[batches_failed]}), snapshots written \
{outbox[snapshots_written]}; receiver database {db_mb:,.0f} MB.{drain}

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
    fits, fs, minutes, t_end = f["fits"], Nones(f["final_status"]), f["minutes"], f["publish_s"]

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
        series.append(fill(
            "| {tm:.1f} | {ar:.1f} | {aa:.1f} | {agent_us_per_msg:.1f} | {agent_cores:pct} | "
            "{br:.1f} | {bare_us_per_msg:.1f} | {broker_cores:pct} | {windows_open} | {unacked} "
            "| {outbox_chunks} | {ob:.1f} | {wal:.1f} | {busy:.0f} |", tm=s["t_s"] / 60,
            ar=(s["agent_rss_kb"] or 0) / 1024, aa=(s["agent_rss_anon_kb"] or 0) / 1024,
            br=(s["bare_rss_kb"] or 0) / 1024, ob=(s["outbox_file_bytes"] or 0) / MB,
            wal=s["wal_bytes"] / MB, busy=s["machine_busy_pct"] if i else None, **s))  # fmt: skip
    t = Nones(f["receiver"])
    path.write_text(MD.format(
        length=f"{minutes:g} minutes" if minutes < 60 else f"{minutes / 60:g} hour(s)",
        smoke="" if minutes >= 15 else (
            f"\n**SMOKE RUN ({minutes:g} minutes)**: proves the script, not the agent. Slopes "
            "extrapolated to an hour from a few minutes are dominated by warm-up and the "
            "neighbours' noise; the full hour is `.venv/bin/python -m bench.soak` (~62 min).\n"),
        doc=doc, f=f, m=doc["machine"], n=doc["noise"], t=t, fs=fs,
        **{k: Nones(fs[k] or {}) for k in ("ingest", "mqtt", "outbox")},
        fw=Nones(fs["forward"] or {}),
        acked=f["published"].get("acked", 0), exact="exact" if f["exact"] else "**NOT exact**",
        pub_min=t_end / 60, rss=_fitstr(fits["agent_rss"], "MB"),
        rss_anon=_fitstr(fits["agent_rss_anon"], "MB"), bare_rss=_fitstr(fits["bare_rss"], "MB"),
        rss_flat="flat" if f["rss_flat"] else "**grows**", cpu=_pct_h(fits["agent_cpu"]),
        ratio=_pct_h(fits["ratio"]), bare_cpu=_pct_h(fits["bare_cpu"]),
        cpu_flat="flat" if f["cpu_flat"] else "**grows**",
        grows="; ".join(f["growing"]) if f["growing"] else "nothing.",
        gauges="\n".join(gauge(k, g) for k, g in f["gauges_second_half"].items()),
        db_mb=f["receiver_db_bytes"] / MB, step_min=step / 60, series="\n".join(series),
        drain=f"\n\nDrain: {f['drain_note']}" if f["drain_note"] else "",
    ))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

"""Footprint: 300 cameras x 10 msgs/s (3,000 msgs/s) for 60 s into the agent.

The camera simulator (devtools.procs.Publisher: paho, QoS 1, 2 processes) publishes to a
private Mosquitto; the agent runs with the shipped defaults (window 1 s, allowed lateness 2 s,
idle close 5 s, checkpoint 250 ms, synchronous = full, linger 200 ms) and forwards to the
reference receiver. Measured on the agent's pid from /proc:

  CPU          utime + stime over the steady part of the publishing (from 5 s after the start,
               once windows close, to the end), as % of one core
  peak RSS     VmHWM at the end of the run (the kernel's high-water mark, whole lifetime)
  write_bytes  /proc/PID/io write_bytes: per second during publishing, and over the whole run
               (first message to outbox drained) per byte of chunk JSON produced ("flash wear")
  delay        from the receiver's SQLite: received_at of each chunk minus the publish time
               (payload ts = event time) of its oldest message (event_first: an upper bound for
               every message of the chunk) and of its newest (event_last: a lower bound),
               weighted by the chunk's message count

Baselines in the same run:
  bare aiomqtt subscriber (bench.bare_sub) on the same broker at the same time, receiving the
    same messages: its CPU and peak RSS
  raw SQLite: a child process writes the very same chunk bodies into the same table with the
    agent's commit cadence (its number of checkpoints and batches), WAL + synchronous FULL,
    inserting then deleting, and reports its own write_bytes: the floor for "durably queue these
    chunks"; the difference is what the agent adds (ack journal, open-window state, ...)
  delay floor: window + allowed lateness + checkpoint interval + linger (the design's own wait)

    python -m bench.footprint [--quick] [--duration S]
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from agent.sim.cloud import load_merged
from bench.common import (
    GATEWAY_ID,
    ROOT,
    CountingSub,
    ProcStat,
    Report,
    Sampler,
    agent_figure,
    bench_command,
    dig,
    fill,
    fresh_dir,
    parser,
    pid,
    ratio,
    rnd,
    say,
    site,
    weighted_percentile,
)
from devtools.procs import Publisher, wait_for
from devtools.truth import compare

CAMERAS, RATE = 300, 10.0
PEAK_RSS_TARGET_MB = 70  # issue #20: with pydantic-settings loaded (60 MB without, issue #13)
WINDOW_S, LATENESS_S, IDLE_CLOSE_S, CHECKPOINT_S, LINGER_S = 1.0, 2.0, 5.0, 0.25, 0.2  # shipped
WARMUP_S = 5.0


def sqlite_baseline(db: Path, bodies_file: Path, commits: int, batches: int) -> dict[str, Any]:
    """The raw SQLite baseline (in a child process, to read its own /proc/self/io)."""
    bodies: list[bytes] = msgspec.msgpack.decode(bodies_file.read_bytes())
    before = ProcStat(os.getpid()).io()
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE chunks (seq INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT"
                " NULL, body BLOB NOT NULL)")  # fmt: skip

    def transaction(sql: str, *args: Any) -> None:
        con.execute("BEGIN IMMEDIATE")
        (con.executemany if args and isinstance(args[0], list) else con.execute)(sql, *args)
        con.execute("COMMIT")

    per = max(1, -(-len(bodies) // max(1, commits)))
    delete_every = max(1, round(max(1, commits) / max(1, batches)))
    last_seq = k = 0
    for i in range(0, len(bodies), per):
        group = bodies[i : i + per]
        transaction("INSERT INTO chunks (created_at, body) VALUES (?, ?)",
                    [(time.time(), b) for b in group])  # fmt: skip
        k += 1
        if k % delete_every == 0:
            transaction("DELETE FROM chunks WHERE seq <= ?", (last_seq,))
        last_seq += len(group)
    transaction("DELETE FROM chunks")
    con.close()
    after = ProcStat(os.getpid()).io()
    d = {k: after[k] - before[k] for k in ("write_bytes", "cancelled_write_bytes")}
    return {**d, "commits": k, "delete_every": delete_every}


def measure(rep: Report, work: Path, duration: float) -> dict[str, Any]:
    """The run: the agent and the bare subscriber under the simulator's load, then drained;
    what was measured, by name."""
    m: dict[str, Any] = {"duration": duration}
    with site(work) as (broker, receiver, agent):
        bare = CountingSub("bare", broker.port, work / "bare.log").wait_ready()
        try:
            ast = ProcStat(pid(agent))
            sampler = m["sampler"] = Sampler(
                {"agent": ast.pid, "bare": bare.pid, "broker": pid(broker)}, interval_s=0.5
            )
            sampler.start()
            time.sleep(1.0)
            m.update(idle_rss_kb=ast.rss_kb(), io0=ast.io(), st0=agent.status() or {})
            log_size0 = (work / "agent.log").stat().st_size
            say(f"[footprint] {CAMERAS} cameras x {RATE:g} msgs/s for {duration:g} s (simulator, "
                f"2 processes); agent idle RSS {m['idle_rss_kb'] / 1024:.1f} MB")  # fmt: skip
            pub = Publisher(broker, work, cameras=CAMERAS, rate=RATE, duration_s=duration,
                            seed=11, processes=2)  # fmt: skip
            m["pub_start_wall"], m["t_pub0"] = time.time(), time.monotonic()
            pub.start()
            while pub.running:
                pub.wait(0.5)
                if "io_pub" not in m and time.monotonic() - m["t_pub0"] >= 1.5 + duration:
                    m["io_pub"] = (time.monotonic(), ast.io())
            m["t_pub1"], m["pub_end_wall"] = time.monotonic(), time.time()
            m.setdefault("io_pub", (m["t_pub1"], ast.io()))
            acked = m["acked"] = int(pub.summary.get("acked", 0))
            expected = None
            try:
                expected = pub.join()
            except Exception as e:
                rep.note(f"simulator ground truth unavailable: {e}")
            # Everything at the receiver, then the outbox drained (the deletes count as wear).
            try:
                wait_for(lambda: receiver.messages() >= acked, timeout_s=IDLE_CLOSE_S + 30,
                         what="every message at the receiver", poll_s=0.5)  # fmt: skip
                wait_for(lambda: agent_figure(agent, "outbox", "chunks") == 0, timeout_s=20,
                         what="outbox drained", poll_s=0.2)  # fmt: skip
            except TimeoutError as e:
                rep.note(str(e))
            time.sleep(0.5)
            m.update(io1=ast.io(), hwm_kb=ast.hwm_kb(), bare_hwm_kb=ProcStat(bare.pid).hwm_kb(),
                     st1=agent.status() or {}, delivered=receiver.messages(),
                     log_growth=(work / "agent.log").stat().st_size - log_size0)  # fmt: skip
            sampler.stop()
        finally:
            bare.stop()
        m["bare_count"] = bare.count
        agent.stop()
        con = sqlite3.connect(receiver.db)
        m["rows"] = [
            (float(r), json.loads(b))
            for r, b in con.execute(
                "SELECT received_at, body FROM chunks WHERE gateway = ? ORDER BY seq", (GATEWAY_ID,)
            )
        ]
        con.close()
        m["exact"] = None if expected is None else compare(
            expected, load_merged(receiver.db, GATEWAY_ID)).exact  # fmt: skip
    return m


def cpu_and_memory(rep: Report, m: dict[str, Any]) -> None:
    """CPU over the steady part of the publishing, and over each half of it; RSS."""
    sampler, t_pub0, t_pub1, acked = m["sampler"], m["t_pub0"], m["t_pub1"], m["acked"]
    c0, c1 = t_pub0 + WARMUP_S, t_pub1 - 1.0
    cpu = {k: sampler.cpu_between(k, c0, c1) for k in ("agent", "bare", "broker")}
    cpu_a, cpu_b = (sampler.cpu_between("agent", *h) for h in halves(c0, c1))
    rate = acked / m["duration"] if m["duration"] else 0

    def pct(v: float | None) -> float | None:
        return rnd(None if v is None else v * 100, 1)

    for key, value in (
        ("agent_cpu_pct_first_half", pct(cpu_a)), ("agent_cpu_pct_second_half", pct(cpu_b)),
        ("published_acked", acked), ("delivered_messages", m["delivered"]),
        ("bare_received", m["bare_count"]), ("msgs_per_s", round(rate, 1)),
        ("agent_cpu_pct", pct(cpu["agent"])), ("bare_cpu_pct", pct(cpu["bare"])),
        ("broker_cpu_pct", pct(cpu["broker"])),
    ):  # fmt: skip
        rep.figure(key, value)
    if m["exact"] is not None:
        rep.figure("exact", m["exact"])
    truth = {True: "EXACT", False: "not exact", None: "n/a"}[m["exact"]]
    say(f"[footprint] {acked:,} messages acked by the broker ({rate:,.0f} msgs/s), "
        f"{m['delivered']:,} counted at the receiver, bare subscriber got {m['bare_count']:,}; "
        f"ground truth {truth}")  # fmt: skip
    rep.row(
        f"Agent CPU at {rate:,.0f} msgs/s", "<= 10 % of one core and <= 0.35x bare aiomqtt",
        fill("{a:pct} (first half {ca:pct}, second half {cb:pct})", a=cpu["agent"], ca=cpu_a,
             cb=cpu_b) if cpu["agent"] is not None else "n/a",
        fill("bare aiomqtt {b:pct} (agent/bare {r:x}); broker {m:pct}", b=cpu["bare"],
             r=ratio(cpu["agent"], cpu["bare"]), m=cpu["broker"]),
        None if cpu["agent"] is None or cpu["bare"] is None
        else cpu["agent"] <= 0.10 and cpu["agent"] <= 0.35 * cpu["bare"],
    )  # fmt: skip
    hwm, bare_hwm, idle = (m[k] / 1024 for k in ("hwm_kb", "bare_hwm_kb", "idle_rss_kb"))
    quarters = [sampler.rss_at("agent", t_pub0 + (t_pub1 - t_pub0) * q / 4) for q in (1, 2, 3, 4)]
    rep.figure(
        "agent_rss_mb_by_quarter", [None if q is None else round(q / 1024, 1) for q in quarters],
        "agent RSS at 1/4, 1/2, 3/4 and the end of the publishing: "
        + ", ".join("n/a" if q is None else f"{q / 1024:.1f} MB" for q in quarters),
    )  # fmt: skip
    rep.figure("agent_peak_rss_mb", round(hwm, 1))
    rep.figure("agent_idle_rss_mb", round(idle, 1))
    rep.figure("bare_peak_rss_mb", round(bare_hwm, 1))
    rep.row(f"Agent peak RSS, {CAMERAS} cameras", f"<= {PEAK_RSS_TARGET_MB} MB",
            f"{hwm:.1f} MB (VmHWM)", f"bare aiomqtt {bare_hwm:.1f} MB; agent idle before load "
            f"{idle:.1f} MB", hwm <= PEAK_RSS_TARGET_MB)  # fmt: skip


def halves(c0: float, c1: float) -> tuple[tuple[float, float], tuple[float, float]]:
    return (c0, (c0 + c1) / 2), ((c0 + c1) / 2, c1)


def writes(rep: Report, m: dict[str, Any], work: Path) -> dict[str, Any]:
    """SQLite bytes written: per second, per byte of chunks, against raw SQLite's; the agent's
    counters."""
    io0, io1, (t_io, io_pub), st0, st1 = m["io0"], m["io1"], m["io_pub"], m["st0"], m["st1"]
    wb_pub = io_pub["write_bytes"] - io0["write_bytes"]
    wb_all = io1["write_bytes"] - io0["write_bytes"] - m["log_growth"]
    cancelled = io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"]
    pub_s = t_io - m["t_pub0"]
    bodies = [msgspec.json.encode({k: v for k, v in c.items() if k != "seq"}) for _, c in m["rows"]]
    chunk_bytes = sum(len(b) for b in bodies)
    wear, wear_net = ratio(wb_all, chunk_bytes), ratio(wb_all - cancelled, chunk_bytes)
    chunk_rate = chunk_bytes / m["duration"]  # chunks come evenly while the cameras publish
    h = halves(m["t_pub0"] + WARMUP_S, m["t_pub1"] - 1.0)
    wr_a, wr_b = (m["sampler"].rate("agent", "write_bytes", *x) for x in h)
    wear_a, wear_b = ratio(wr_a, chunk_rate), ratio(wr_b, chunk_rate)
    commits, batches = (
        (dig(st1, *path) or 0) - (dig(st0, *path) or 0)
        for path in (("outbox", "checkpoints"), ("forward", "batches_sent"))
    )
    bodies_file = work / "bodies.msgpack"
    bodies_file.write_bytes(msgspec.msgpack.encode(bodies))
    base = json.loads(subprocess.run(
        bench_command("footprint", "--sqlite-baseline", str(work / "baseline.sqlite3"),
                      str(bodies_file), str(commits), str(batches)),
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300,
    ).stdout)  # fmt: skip
    base_wear = ratio(base["write_bytes"], chunk_bytes)
    outbox, fw = st1.get("outbox") or {}, st1.get("forward") or {}
    for key, value in (
        ("wear_net_of_cancelled", rnd(wear_net)), ("write_bytes_per_s_first_half", rnd(wr_a, None)),
        ("write_bytes_per_s_second_half", rnd(wr_b, None)), ("wear_first_half", rnd(wear_a)),
        ("wear_second_half", rnd(wear_b)),
    ):  # fmt: skip
        rep.figure(key, value)
    rep.figure("sqlite_write_bytes_per_s", round(wb_pub / pub_s) if pub_s > 0 else None,
               f"agent write_bytes during publishing: {wb_pub:,} B in {pub_s:.1f} s = "
               f"{wb_pub / pub_s / 1024:,.0f} KiB/s")  # fmt: skip
    for key, value in (
        ("write_bytes_run", wb_all), ("cancelled_write_bytes_run", cancelled),
        ("log_bytes_excluded", m["log_growth"]), ("chunks", len(bodies)),
        ("chunk_bytes", chunk_bytes), ("chunks_committed", outbox.get("chunks_committed")),
        ("snapshots_written", outbox.get("snapshots_written")), ("checkpoints", commits),
        ("batches_sent", batches), ("sqlite_baseline", base),
    ):  # fmt: skip
        rep.figure(key, value)
    if fw.get("chunks_sent"):
        rep.figure("wire_bytes_per_chunk_live", round(fw["bytes_sent"] / fw["chunks_sent"], 1))
    rep.row(
        "SQLite bytes written per second (3,000 msgs/s)", "(report)",
        fill("{r:kibs} (first half {a:kibs}, second half {b:kibs})",
             r=wb_pub / pub_s if pub_s > 0 else None, a=wr_a, b=wr_b),
        fill("raw SQLite, same chunks and commit cadence: {raw:,} B for the whole run vs the "
             "agent's {agent:,} B (agent/raw {r:x})", raw=base["write_bytes"], agent=wb_all,
             r=ratio(wb_all, base["write_bytes"])),
        None,
    )  # fmt: skip
    rep.row(
        "Flash wear: SQLite write_bytes per byte of chunks", "<= 4",
        fill("{w:.2f} over the run ({wb:,} B for {cb:,} B of {n:,} chunks); net of cancelled "
             "writes {net:.2f}; by half of the publishing {a:.2f}, {b:.2f}", w=wear, wb=wb_all,
             cb=chunk_bytes, n=len(bodies), net=wear_net, a=wear_a, b=wear_b)
        if wear is not None else "n/a",
        fill("raw SQLite {b:.2f} (agent/raw {r:x})", b=base_wear, r=ratio(wear, base_wear))
        if base_wear is not None else "n/a",
        None if wear is None else wear <= 4,
    )  # fmt: skip
    if cancelled > 0.05 * wb_all:
        rep.note(fill(
            "{c:,} B of the agent's write_bytes were cancelled (cancelled_write_bytes: pages "
            "dirtied then truncated or deleted before writeback, e.g. SQLite temp files); net of "
            "them the wear ratio is {net:.2f}", c=cancelled, net=wear_net))  # fmt: skip
    return {"commits": commits, "batches": batches, "snapshots": outbox.get("snapshots_written")}


def delay(rep: Report, m: dict[str, Any]) -> None:
    """Publish -> receiver delay per message, in windows closed while the cameras published."""
    steady_until = m["pub_end_wall"] - (WINDOW_S + LATENESS_S) - 0.5
    oldest, newest, oldest_all = [], [], []
    for received_at, c in m["rows"]:
        if c.get("rev", 0) != 0:
            continue
        w, d_old = int(c.get("count", 0)), received_at - float(c["event_first"])
        oldest_all.append((d_old, w))
        t = float(c["t"])
        if t + float(c.get("width_s", 1)) <= steady_until and t >= m["pub_start_wall"] + 1:
            oldest.append((d_old, w))
            newest.append((received_at - float(c["event_last"]), w))
    d = {f"delay_p{p}_{b}_s": weighted_percentile(x, p)
         for b, x in (("upper", oldest), ("lower", newest)) for p in (50, 99)}  # fmt: skip
    d["delay_p99_upper_incl_end_of_run_s"] = weighted_percentile(oldest_all, 99)
    for k, v in d.items():
        rep.figure(k, rnd(v, 3))
    target = WINDOW_S + LATENESS_S + 1.0
    rep.row(
        "Publish -> receiver delay p50 / p99 (per message)",
        f"p99 <= window + lateness + 1 s = {target:g} s",
        fill("p50 {delay_p50_upper_s:sec} / p99 {delay_p99_upper_s:sec} (upper bound: oldest "
             "message of each chunk); lower bound p50 {delay_p50_lower_s:sec} / p99 "
             "{delay_p99_lower_s:sec}", **d),
        f"design floor window + lateness + checkpoint + linger = "
        f"{WINDOW_S + LATENESS_S + CHECKPOINT_S + LINGER_S:g} s (worst message)",
        None if d["delay_p99_upper_s"] is None else d["delay_p99_upper_s"] <= target,
    )  # fmt: skip
    rep.note(fill(
        "delay percentiles are over {n:,} messages in windows closed while the cameras were "
        "publishing (steady state); including the last windows of the run, which close only "
        "after idle_close_s = {idle:g} s of silence, p99 (upper) is "
        "{delay_p99_upper_incl_end_of_run_s:sec}", n=sum(w for _, w in oldest), idle=IDLE_CLOSE_S,
        **d))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "")
    p.add_argument("--duration", type=float, help="seconds of publishing")
    p.add_argument("--sqlite-baseline", nargs=4, metavar=("DB", "BODIES", "COMMITS", "BATCHES"),
                   help="internal: run the raw SQLite baseline")  # fmt: skip
    args = p.parse_args(argv)
    if args.sqlite_baseline:
        db, bodies, commits, batches = args.sqlite_baseline
        print(json.dumps(sqlite_baseline(Path(db), Path(bodies), int(commits), int(batches))))
        return 0
    rep, work = Report("footprint", args.quick), fresh_dir("footprint")
    m = measure(rep, work, args.duration or (32.0 if args.quick else 60.0))
    cpu_and_memory(rep, m)
    c = writes(rep, m, work)
    delay(rep, m)
    rep.note(
        "flash wear = agent write_bytes from just before the first message to the outbox "
        "drained (after the last delete), minus the growth of its log file, over the bytes of "
        "chunk JSON produced (receiver's stored chunks re-encoded as the agent stores them: "
        "msgspec, without seq); write_bytes counts pages dirtied (4 KiB granularity), so a WAL "
        "frame appended after each fsync'd commit costs at least a page"
    )
    rep.note(f"agent counters: {c['commits']} checkpoints, {c['batches']} batches sent, "
             f"snapshots (ack pressure) {c['snapshots']}")  # fmt: skip
    rep.finish(args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

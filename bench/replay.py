"""Replay: drain an outbox backlog of 300 cameras x 3 streams to the cloud.

An outbox file is pre-filled with agent.outbox.Outbox + CheckpointWrite (realistic chunks: per
camera and second ~7 detections, 2 motion, 1 health messages aggregated with agent.model.Chunk,
encoded with encode_chunk), then the agent is started on a copy of it (`python -m agent.cli run`,
shipped defaults except forward.max_chunks_per_s = 10,000,000 so the pacer never limits, and
buffer.max_bytes = 8 GiB so nothing is compacted) and timed until its outbox is empty. The drain
time is taken on the receiver's side: from the arrival of the first batch to that of the last.

Runs, in this order, each on a fresh copy / fresh receiver:
  receiver alone (baseline)  the same chunks in the agent's own requests (forward's defaults:
                             max_batch_chunks per batch, agent.model.encode_batch, then
                             agent.forward.build_request: gzip and headers), POSTed back to back
                             on one keep-alive connection to the reference receiver: what the
                             receiver can take
  fast receiver alone        the same into bench.fast_receiver (validates schema and seq
                             tiling, dedups by (gateway, seq), counts messages; stores nothing)
  null receiver alone        the same into bench.null_receiver (checks a chunk count only):
                             transport
  agent -> null, 1/4 backlog the agent's own ceiling on a quarter of the backlog, and...
  agent -> null receiver     ...on all of it: does the rate depend on the backlog size? (used to
                             extrapolate to an hour of backlog, 3.2 M chunks)
  agent -> fast receiver     the headline: the agent's drain into a receiver that checks what the
                             reference checks on the wire (seq tiling, dedup, counts) and keeps
                             up, so the figure is the agent's
  agent -> reference         end to end into the SQLite reference receiver (receiver-bound)

    python -m bench.replay [--quick] [--seconds S]   (backlog = 300 x 3 x S chunks)
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import shutil
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from agent.config.settings import ForwardSettings
from agent.core.model import Chunk, encode_batch, encode_chunk
from agent.durable.compaction import counted_messages
from agent.durable.outbox import Batch, CheckpointWrite, Outbox
from agent.forward.forwarder import build_request
from bench.common import (
    GATEWAY_ID,
    HOST,
    Agent,
    Mosquitto,
    ProcStat,
    Receiver,
    Report,
    Sampler,
    bench_command,
    child_env,
    free_port,
    fresh_dir,
    kill_quietly,
    parser,
    wait_for,
    write_agent_config,
)
from devtools.procs import Proc, port_open

CAMERAS = 300
STREAMS = (("detections", 7), ("motion", 2), ("health", 1))  # messages per camera-second
FORWARD = ForwardSettings()  # the shipped defaults, as the agent runs here (bar the pace)
BATCH = FORWARD.max_batch_chunks
GATEWAY = GATEWAY_ID  # write_agent_config's default
TARGET_CHUNKS_S = 50_000


# -- the backlog ------------------------------------------------------------------------------


def _payload(rng: random.Random, stream: str) -> tuple[dict[str, float], dict[str, str]]:
    if stream == "detections":
        num = {"conf": round(rng.uniform(0.3, 0.99), 3)}
        cat = {"cls": rng.choice(("person", "person", "person", "car", "car", "truck", "dog"))}
    elif stream == "motion":
        num = {"level": round(rng.random(), 3)}
        cat = {"zone": rng.choice(("door", "lobby", "parking", "yard"))}
    else:
        num = {"temp_c": round(rng.uniform(35, 60), 1), "fps": round(rng.uniform(24, 30), 1)}
        cat = {"status": rng.choice(("ok", "ok", "ok", "ok", "degraded"))}
    return num, cat


def _templates(rng: random.Random, k: int = 3000) -> dict[str, list[Chunk]]:
    """k realistic chunks per stream, aggregated from simulated messages of one second."""
    out: dict[str, list[Chunk]] = {}
    for stream, n in STREAMS:
        out[stream] = []
        for _ in range(k):
            c = Chunk("cam-000", stream, 0, 1)
            for _ in range(max(1, n + rng.randint(-1, 1))):
                ts = rng.random()
                c.add_times(ts, ts + rng.uniform(0.002, 0.02))
                num, cat = _payload(rng, stream)
                for f, v in num.items():
                    c.add_number(f, v, ts)
                for f, s in cat.items():
                    c.add_category(f, s, 32)
            out[stream].append(c)
    return out


def backlog_chunks(seconds: int, t0: int, seed: int = 1) -> tuple[list[bytes], int]:
    """300 cameras x 3 streams x `seconds` encoded chunks, in window order (as checkpoints
    would write them), and the number of messages they count."""
    rng = random.Random(seed)
    tpl = _templates(rng)
    out = []
    messages = 0
    for s in range(seconds):
        t = t0 + s
        for cam in range(CAMERAS):
            name = f"cam-{cam:03d}"
            for stream, _ in STREAMS:
                c = rng.choice(tpl[stream])
                base = (c.event_first, c.event_last, c.recv_first, c.recv_last)
                c.camera, c.t = name, t
                c.event_first, c.event_last = base[0] + t, base[1] + t
                c.recv_first, c.recv_last = base[2] + t, base[3] + t
                for ns in c.num.values():
                    ns.last_t += t
                out.append(encode_chunk(c))
                messages += c.count
                for ns in c.num.values():
                    ns.last_t -= t
                c.event_first, c.event_last, c.recv_first, c.recv_last = base
    return out, messages


async def _fill(path: Path, chunks: list[bytes], created_at: float) -> None:
    ob, _ = await Outbox.open(path, synchronous="off")
    try:
        for i in range(0, len(chunks), 20_000):
            await ob.checkpoint(CheckpointWrite(chunks=chunks[i : i + 20_000]), now=created_at)
    finally:
        await ob.close()  # the last connection closing checkpoints the WAL into the file


# -- baselines: POST pre-encoded batches directly ---------------------------------------------


class Request(NamedTuple):
    """One batch as the agent would POST it."""

    chunks: int
    body: bytes
    headers: dict[str, str]


def encoded_batches(rows: list[tuple[int, bytes]]) -> list[Request]:
    """(seq, chunk body) rows as the agent's requests: cut BATCH at a time like the outbox does
    (Store.cut: encode_batch over (seq, seq_end, body)), then the forwarder's build_request."""
    out = []
    for i in range(0, len(rows), BATCH):
        part = rows[i : i + BATCH]
        triples = [(seq, seq, chunk) for seq, chunk in part]
        batch = Batch(
            first_seq=part[0][0],
            last_seq=part[-1][0],
            last_row=part[-1][0],
            chunks=len(part),
            messages=counted_messages(chunk for _, chunk in part),
            body=encode_batch(GATEWAY, triples, sent_at=time.time()),
        )
        body, headers = build_request(FORWARD, GATEWAY, batch)
        out.append(Request(batch.chunks, body, headers))
    return out


def post_all(port: int, batches: list[Request], time_limit_s: float) -> dict[str, Any]:
    """POST batches back to back, one in flight, one keep-alive connection; chunks/s."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    sent = failed = 0
    started = time.monotonic()
    for req in batches:
        conn.request("POST", "/ingest", body=req.body, headers=req.headers)
        r = conn.getresponse()
        r.read()
        if 200 <= r.status < 300:
            sent += req.chunks
        else:
            failed += 1
        if time.monotonic() - started > time_limit_s:
            break
    elapsed = time.monotonic() - started
    conn.close()
    return {"chunks": sent, "failed_batches": failed, "seconds": round(elapsed, 2),
            "chunks_per_s": round(sent / elapsed, 1) if elapsed else None}  # fmt: skip


# -- the agent draining a copy of the backlog -------------------------------------------------


def agent_drain(
    label: str,
    src: Path,
    work: Path,
    url: str,
    receiver_pid: int,
    n: int,
    timeout_s: float,
    span: Callable[[], tuple[float | None, float | None]],
) -> dict[str, Any]:
    """Start the agent on a copy of `src`; wait for its outbox to be empty. `span` gives the
    receiver-side wall times of the first and last batch received."""
    d = work / label
    (d / "agent").mkdir(parents=True)
    shutil.copyfile(src, d / "agent" / "buffer.sqlite3")
    broker = agent = None
    try:
        broker = Mosquitto(d / "mosquitto").start()
        health_port = free_port()
        config = write_agent_config(
            d / "agent.toml", mqtt_port=broker.port, receiver_url=url,
            buffer_path=d / "agent" / "buffer.sqlite3", health_port=health_port,
            buffer={"max_bytes": "8GiB"},
            forward={"max_chunks_per_s": 10_000_000.0},
        )  # fmt: skip
        launched = time.monotonic()
        launched_wall = time.time()
        agent = Agent(config, d / "agent.log", health_port).start()
        assert agent.popen is not None
        sampler = Sampler({"agent": agent.popen.pid, "receiver": receiver_pid}, interval_s=0.25)
        sampler.start()
        timeline: list[tuple[float, int]] = []  # (t, chunks sent)
        sent = nbytes = 0
        done = False
        deadline = launched + timeout_s
        while time.monotonic() < deadline:
            if not agent.running:
                raise RuntimeError(f"agent exited:\n{agent.log_text()[-2000:]}")
            s = agent.status()
            if s is not None:
                sent, nbytes = s["forward"]["chunks_sent"], s["forward"]["bytes_sent"]
                # /status is rebuilt at most once a second: a repeated answer is not a new
                # point (it made whole tenths of the backlog read 0 chunks/s)
                if not timeline or sent != timeline[-1][1]:
                    timeline.append((time.monotonic(), sent))
                if s["outbox"]["chunks"] == 0 and sent >= n:
                    done = True
                    break
            time.sleep(0.2)
        end = time.monotonic()
        sampler.stop()
        first_at, last_at = span()
        # Receiver side: the first batch's arrival to the last's; n - BATCH chunks in between.
        drain_s = (last_at - first_at) * n / max(1, n - BATCH) if first_at and last_at else None
        if not done:  # partial: the rate so far
            drain_s = None
        rate = (
            (sent - BATCH) / (last_at - first_at)
            if first_at and last_at and last_at > first_at
            else None
        )
        tenths = []
        for k in range(10):
            lo, hi = n * k / 10, n * (k + 1) / 10
            pts = [(t, c) for t, c in timeline if lo <= c <= hi]
            if len(pts) >= 3 and pts[-1][0] > pts[0][0]:
                tenths.append(round((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])))
        t_a = launched + ((first_at - launched_wall) if first_at else 0)
        return {
            "chunks": n,
            "drained": done,
            "chunks_sent": sent,
            "startup_s": round(first_at - launched_wall, 2) if first_at else None,
            "drain_s": None if drain_s is None else round(drain_s, 2),
            "chunks_per_s": None if rate is None else round(rate, 1),
            "chunks_per_s_by_tenth": tenths,
            "wire_bytes_per_chunk": round(nbytes / sent, 1) if sent else None,
            "agent_cpu_cores": _r(sampler.cpu_between("agent", t_a, end)),
            "receiver_cpu_cores": _r(sampler.cpu_between("receiver", t_a, end)),
            "agent_peak_rss_mb": round(sampler.max_rss_kb["agent"] / 1024, 1),
        }
    finally:
        kill_quietly(agent, broker)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


class NullReceiver:
    """bench.null_receiver as a child process (agent.sim.procs.Proc)."""

    script = "null_receiver"

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        # Proc takes no cwd: the repository root goes on the child's PYTHONPATH instead.
        self.proc = Proc(
            bench_command(self.script, "--port", str(self.port)), log_path, env=child_env()
        ).start()
        wait_for(
            lambda: port_open(self.port) or not self.proc.running, timeout_s=15,
            what=self.script,
        )  # fmt: skip
        assert self.proc.popen is not None
        self.pid = self.proc.popen.pid
        self.url = f"http://{HOST}:{self.port}/ingest"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/_stats", timeout=5) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    def span(self) -> tuple[float | None, float | None]:
        s = self.stats()
        return s["first_at"], s["last_at"]

    def stop(self) -> None:
        self.proc.stop()


class FastReceiver(NullReceiver):
    """bench.fast_receiver (validates tiling, dedups by seq, counts) as a child process."""

    script = "fast_receiver"

    def check(self, gateway: str = GATEWAY) -> dict[str, Any]:
        """What it counted: chunks, messages, and the gateway's gaps / out of order / dups."""
        s = self.stats()
        gw = s["gateways"].get(gateway, {})
        return {"receiver_chunks": s["chunks"], "receiver_messages": s["messages"],
                "bad_batches": s["bad"], "gaps": gw.get("gaps"),
                "out_of_order": gw.get("out_of_order"),
                "duplicates": gw.get("duplicates")}  # fmt: skip


def reference_span(db: Path) -> tuple[float | None, float | None]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        row = con.execute("SELECT min(received_at), max(received_at) FROM chunks").fetchone()
        return row[0], row[1]
    finally:
        con.close()


# -- main -------------------------------------------------------------------------------------

HOUR = 3_200_000  # an hour of 300 cameras x 3 streams (README: 3.2 M chunks)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "")
    p.add_argument("--seconds", type=int, help="backlog length in seconds of 300 x 3 chunks")
    p.add_argument("--baseline-chunks", type=int, help="chunks POSTed in each direct baseline")
    args = p.parse_args(argv)
    seconds = args.seconds or (40 if args.quick else 400)
    n = CAMERAS * len(STREAMS) * seconds
    n_small = n // 4
    base_n = min(n, args.baseline_chunks or (36_000 if args.quick else 90_000))
    timeout_s = 120 if args.quick else 300
    rep = Report("replay", args.quick)
    work = fresh_dir("replay")
    src, src_small = work / "backlog.sqlite3", work / "backlog-quarter.sqlite3"

    t0 = int(time.time()) - seconds - 10
    started = time.monotonic()
    chunks, messages = backlog_chunks(seconds, t0)
    raw_bytes = sum(len(c) for c in chunks)
    asyncio.run(_fill(src, chunks, created_at=float(t0 + 3)))
    asyncio.run(_fill(src_small, chunks[:n_small], created_at=float(t0 + 3)))
    rows = [(i + 1, chunks[i]) for i in range(base_n)]
    base_messages = sum(msgspec.json.decode(c)["count"] for c in chunks[:base_n])
    del chunks
    rep.figure("backlog_chunks", n)
    rep.figure("backlog_messages", messages)
    rep.figure("backlog_chunk_bytes", raw_bytes)
    rep.figure("backlog_file_bytes", src.stat().st_size)
    rep.figure(
        "chunk_json_bytes", round(raw_bytes / n, 1),
        f"backlog: {n:,} chunks (300 cameras x 3 streams x {seconds} s), {raw_bytes / n:.0f} B "
        f"of JSON per chunk, outbox file {src.stat().st_size / 1e6:.0f} MB, built in "
        f"{time.monotonic() - started:.1f} s",
    )  # fmt: skip
    batches = encoded_batches(rows)
    wire = sum(len(b.body) for b in batches)

    # Baseline 1: the reference receiver alone.
    recv = Receiver(work / "cloud-baseline").start()
    try:
        assert recv.popen is not None
        rx = ProcStat(recv.popen.pid)
        cpu0 = rx.cpu_s()
        base_ref = post_all(recv.port, batches, time_limit_s=60)
        base_ref["receiver_cpu_cores"] = round((rx.cpu_s() - cpu0) / base_ref["seconds"], 2)
        base_ref["stored"] = recv.stats()["chunks"]
    finally:
        kill_quietly(recv)
    rep.figure(
        "receiver_alone", base_ref,
        f"baseline, reference receiver alone: {base_ref['chunks']:,} chunks in "
        f"{base_ref['seconds']} s = {_rate(base_ref['chunks_per_s'])} chunks/s "
        f"(stored {base_ref['stored']:,}), receiver CPU {base_ref['receiver_cpu_cores']} cores",
    )  # fmt: skip

    # Baseline 2: the fast receiver alone (the headline's receiver).
    fast = FastReceiver(work / "fast-receiver-baseline.log")
    try:
        cpu0 = ProcStat(fast.pid).cpu_s()
        base_fast = post_all(fast.port, batches, time_limit_s=60)
        base_fast["receiver_cpu_cores"] = round(
            (ProcStat(fast.pid).cpu_s() - cpu0) / base_fast["seconds"], 2
        )
        base_fast.update(fast.check())
    finally:
        kill_quietly(fast)
    fast_ok = (base_fast["receiver_chunks"] == base_fast["chunks"]
               and base_fast["receiver_messages"] == base_messages)  # fmt: skip
    rep.figure(
        "fast_receiver_alone", base_fast,
        f"baseline, fast receiver alone: {base_fast['chunks']:,} chunks in "
        f"{base_fast['seconds']} s = {_rate(base_fast['chunks_per_s'])} chunks/s, receiver CPU "
        f"{base_fast['receiver_cpu_cores']} cores; counted {base_fast['receiver_messages']:,} "
        f"messages of {base_messages:,} {'(exact)' if fast_ok else '(** NOT exact **)'}",
    )  # fmt: skip

    # Baseline 3: the null receiver alone (transport + gunzip).
    null = NullReceiver(work / "null-receiver-baseline.log")
    try:
        base_null = post_all(null.port, batches, time_limit_s=60)
    finally:
        kill_quietly(null)
    rep.figure(
        "null_receiver_alone",
        base_null,
        f"baseline, null receiver alone: {_rate(base_null['chunks_per_s'])} chunks/s",
    )

    # The agent into the null receiver, a quarter then all of the backlog.
    results: dict[str, dict[str, Any]] = {}
    for key, path, count in (("agent_to_null_quarter", src_small, n_small),
                             ("agent_to_null", src, n)):  # fmt: skip
        null = NullReceiver(work / f"{key}.log")
        try:
            results[key] = agent_drain(key, path, work, null.url, null.pid, count, timeout_s,
                                       null.span)  # fmt: skip
        finally:
            kill_quietly(null)
        _show(rep, key, f"agent -> null receiver ({count:,} chunks)", results[key])
    to_null = results["agent_to_null"]
    quarter = results["agent_to_null_quarter"]

    # The headline: the agent into the fast checking receiver.
    fast = FastReceiver(work / "agent_to_fast.log")
    try:
        to_fast = agent_drain("agent_to_fast", src, work, fast.url, fast.pid, n, timeout_s,
                              fast.span)  # fmt: skip
        to_fast.update(fast.check())
    finally:
        kill_quietly(fast)
    to_fast["exact"] = (
        to_fast["receiver_chunks"] == n and to_fast["receiver_messages"] == messages
        and to_fast["gaps"] == 0 and to_fast["out_of_order"] == 0
    )  # fmt: skip
    _show(rep, "agent_to_fast", "agent -> fast receiver", to_fast)

    # The agent into the reference receiver: end to end.
    recv = Receiver(work / "cloud").start()
    try:
        assert recv.popen is not None
        to_ref = agent_drain("agent_to_reference", src, work, recv.url, recv.popen.pid, n,
                             timeout_s, lambda: reference_span(recv.db))  # fmt: skip
        st = recv.stats()
        gw = st["gateways"].get(GATEWAY, {})
        to_ref.update(
            receiver_chunks=st["chunks"], gaps=gw.get("gaps"), out_of_order=gw.get("out_of_order"),
            duplicates=gw.get("duplicates"),
        )  # fmt: skip
    finally:
        kill_quietly(recv)
    _show(rep, "agent_to_reference", "agent -> reference receiver", to_ref)
    for key in ("agent_to_null_quarter", "agent_to_null", "agent_to_fast", "agent_to_reference"):
        shutil.rmtree(work / key / "agent", ignore_errors=True)
    src.unlink()
    src_small.unlink()

    # One batch in flight: the receiver's and the agent's per-batch times add up.
    e2e = to_ref.get("chunks_per_s")
    agent_alone = to_null.get("chunks_per_s")
    rx_rate = base_ref.get("chunks_per_s")
    model = 1 / (1 / rx_rate + 1 / agent_alone) if rx_rate and agent_alone else None
    rep.figure("one_in_flight_model_chunks_per_s", None if model is None else round(model))
    headline = to_fast.get("chunks_per_s")
    fast_rx = base_fast.get("chunks_per_s")
    model_fast = 1 / (1 / fast_rx + 1 / agent_alone) if fast_rx and agent_alone else None
    rep.figure(
        "one_in_flight_model_fast_chunks_per_s", None if model_fast is None else round(model_fast)
    )

    # Does the agent's per-chunk time grow with the backlog? T(n)/n = a + b n (two points).
    hour_agent = hour_e2e = None
    q_rate = quarter.get("chunks_per_s")
    if q_rate and agent_alone:
        c1, c2 = 1 / q_rate, 1 / agent_alone
        b = max(0.0, (c2 - c1) / (n - n_small))
        a = c1 - b * n_small if b else (c1 + c2) / 2
        hour_agent = HOUR * (a + b * HOUR)
        rep.figure("per_chunk_us_quarter", round(c1 * 1e6, 2))
        rep.figure("per_chunk_us_full", round(c2 * 1e6, 2))
        rep.figure("per_chunk_growth_us_per_100k_backlog", round(b * 1e5 * 1e6, 3))
        rep.figure("extrapolated_3_2M_agent_alone_s", round(hour_agent))
        if rx_rate:
            hour_e2e = HOUR / rx_rate + hour_agent
            rep.figure("extrapolated_3_2M_reference_s", round(hour_e2e))

    rep.row(
        f"Replay drain, {n:,} chunks, agent -> fast checking receiver (headline)",
        ">= 50,000 chunks/s",
        f"{_rate(headline)} chunks/s, {to_fast.get('drain_s')} s"
        + ("" if to_fast.get("drained") else " (NOT drained before the time limit)")
        + (
            f"; receiver counted {to_fast['receiver_chunks']:,} chunks, "
            f"{to_fast['receiver_messages']:,} messages of {messages:,}, gaps {to_fast['gaps']}, "
            f"out of order {to_fast['out_of_order']}: "
            + ("exact" if to_fast["exact"] else "**NOT exact**")
        ),
        f"fast receiver alone {_rate(fast_rx)} chunks/s (reference receiver alone "
        f"{_rate(rx_rate)}); agent alone (null receiver) {_rate(agent_alone)}; one batch in "
        f"flight: 1/(1/rx + 1/agent) = {_rate(model_fast)}",
        None if headline is None else headline >= TARGET_CHUNKS_S and bool(to_fast["exact"]),
    )
    rep.row(
        "Benchmark receiver alone (fast checking receiver, batches posted back to back)",
        ">= 60,000 chunks/s",
        f"{_rate(fast_rx)} chunks/s",
        f"reference receiver alone {_rate(rx_rate)} chunks/s",
        None if fast_rx is None else fast_rx >= 60_000,
    )
    rep.row(
        f"Replay drain, {n:,} chunks, to the reference receiver",
        "(report: bound by the SQLite reference receiver)",
        f"{_rate(e2e)} chunks/s, {to_ref.get('drain_s')} s"
        + ("" if to_ref.get("drained") else " (NOT drained before the time limit)"),
        f"receiver alone {_rate(rx_rate)} chunks/s; agent alone {_rate(agent_alone)}; with one "
        f"batch in flight their times add up: 1/(1/rx + 1/agent) = {_rate(model)}",
        None,
    )
    rep.row(
        f"Replay drain, {n:,} chunks, agent alone (null receiver)",
        ">= 50,000 chunks/s",
        f"{_rate(agent_alone)} chunks/s, {to_null.get('drain_s')} s"
        + ("" if to_null.get("drained") else " (NOT drained before the time limit)"),
        f"null receiver alone {_rate(base_null.get('chunks_per_s'))} chunks/s; agent alone on "
        f"{n_small:,} chunks {_rate(q_rate)} chunks/s",
        None if agent_alone is None else agent_alone >= TARGET_CHUNKS_S,
    )
    rep.row(
        "Replay of an hour (3.2 M chunks), extrapolated",
        "(report; 50,000 chunks/s = 64 s)",
        f"agent alone {_mins(hour_agent)}, to the reference receiver {_mins(hour_e2e)}",
        f"linear extrapolation of this run's rates: agent alone {_mins_rate(agent_alone)}, "
        f"to the fast receiver {_mins_rate(headline)}, reference {_mins_rate(e2e)}",
        None,
    )
    rep.row(
        "Bytes on the wire per chunk (gzip body)",
        "(report)",
        f"{to_ref.get('wire_bytes_per_chunk')} B",
        f"uncompressed chunk JSON {raw_bytes / n:.0f} B "
        f"(gzip {raw_bytes / n / (wire / len(rows)):.1f}x)",
        None,
    )
    if base_ref.get("receiver_cpu_cores") is not None and base_ref["receiver_cpu_cores"] < 0.7:
        rep.note(
            f"the reference receiver alone used {base_ref['receiver_cpu_cores']} cores while "
            "batches were posted back to back: it was waiting, not computing, part of the time "
            "(it replies with TCP_NODELAY, so not on delayed ACKs: look at the machine's load "
            "during the run; the null receiver took "
            f"{_rate(base_null.get('chunks_per_s'))} chunks/s over the same client)"
        )
    if q_rate and agent_alone and agent_alone < 0.85 * q_rate:
        rep.note(
            f"agent alone: {_rate(q_rate)} chunks/s on a {n_small:,}-chunk backlog but "
            f"{_rate(agent_alone)} on {n:,}: the per-batch cost grows with the backlog (look for "
            "a per-batch outbox query that scans the chunks table); the hour extrapolation fits "
            "per-chunk time = a + b x backlog on the two runs"
        )
    rep.note(
        "drain time and rate are taken at the receiver (first to last batch arrival); the "
        "agent's startup (outbox open, PRAGMA quick_check) comes before and is listed apart"
    )
    default_pace = FORWARD.max_chunks_per_s
    rep.figure("default_max_chunks_per_s", default_pace)
    rep.note(
        "pace: forward.max_chunks_per_s raised to 10 M for this run; with the shipped default "
        f"({default_pace:,.0f}) the pacer caps the replay at {default_pace:,.0f} chunks/s"
    )
    rep.note(
        "wire bytes = /status forward.bytes_sent / chunks_sent (gzip request bodies; HTTP "
        "headers not included: ~250 B per 500-chunk batch, < 1 B per chunk)"
    )
    rep.finish(args.json_out)
    return 0


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _mins(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def _mins_rate(rate: float | None) -> str:
    return "n/a" if not rate else f"{HOUR / rate / 60:.1f} min"


def _show(rep: Report, key: str, label: str, res: dict[str, Any]) -> None:
    rep.figure(
        key, res,
        f"{label}: {res['chunks_sent']:,}/{res['chunks']:,} chunks, drained in {res['drain_s']} s "
        f"= {_rate(res['chunks_per_s'])} chunks/s (startup before the first batch "
        f"{res['startup_s']} s); by tenth of the backlog {res['chunks_per_s_by_tenth']}; "
        f"{res['wire_bytes_per_chunk']} B/chunk on the wire; CPU agent {res['agent_cpu_cores']} "
        f"cores, receiver {res['receiver_cpu_cores']} cores; agent peak RSS "
        f"{res['agent_peak_rss_mb']} MB"
        + ("" if res["drained"] else "  ** not drained before the time limit **"),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

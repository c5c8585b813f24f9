"""Replay: drain an outbox backlog of 300 cameras x 3 streams to the cloud.

An outbox file is pre-filled with agent.outbox.Outbox + CheckpointWrite (realistic chunks: per
camera and second ~7 detections, 2 motion, 1 health messages of the camera simulator's shapes
aggregated with agent.model.Chunk, encoded with encode_chunk), then the agent is started on a
copy of it (`python -m agent.cli run`, shipped defaults except forward.max_chunks_per_s =
10,000,000 so the pacer never limits, and buffer.max_bytes = 8 GiB so nothing is compacted) and
timed until its outbox is empty. The drain time is taken on the receiver's side: from the
arrival of the first batch to that of the last.

Runs, in this order, each on a fresh copy / fresh receiver:
  receiver alone (baseline)  the same chunks in the agent's own requests (forward's defaults:
                             max_batch_chunks per batch, agent.model.encode_batch, then
                             agent.forward.build_request: gzip and headers), POSTed back to back
                             on one keep-alive connection to the reference receiver: what the
                             receiver can take
  fast receiver alone        the same into bench.fast_receiver (validates schema and seq
                             tiling, dedups by (gateway, seq), counts messages; stores nothing)
  null receiver alone        the same into bench.fast_receiver --null (checks a chunk count
                             only): transport
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
from typing import Any

import msgspec

from agent.config.settings import ForwardSettings
from agent.core.model import Chunk, encode_batch, encode_chunk
from agent.durable.compaction import counted_messages
from agent.durable.outbox import Batch, CheckpointWrite, Outbox
from agent.forward.forwarder import build_request
from agent.sim.cameras import make_payload
from bench.common import (
    GATEWAY_ID,
    ProcStat,
    Report,
    Sampler,
    bench_command,
    child_env,
    fill,
    fresh_dir,
    kill_quietly,
    parser,
    pid,
    rnd,
    start_agent,
)  # fmt: skip
from devtools.procs import HOST, Mosquitto, Proc, Receiver, free_port, port_open, wait_for
from devtools.truth import CATEGORICAL, NUMERIC

CAMERAS = 300
STREAMS = (("detections", 7), ("motion", 2), ("health", 1))  # messages per camera-second
FORWARD = ForwardSettings()  # the shipped defaults, as the agent runs here (bar the pace)
BATCH = FORWARD.max_batch_chunks
TARGET_CHUNKS_S = 50_000
HOUR = 3_200_000  # an hour of 300 cameras x 3 streams (README: 3.2 M chunks)


# -- the backlog ------------------------------------------------------------------------------


def _template(rng: random.Random, stream: str, n: int) -> Chunk:
    """A realistic chunk: ~n simulated messages of one second aggregated."""
    c = Chunk("cam-000", stream, 0, 1)
    for _ in range(max(1, n + rng.randint(-1, 1))):
        ts = rng.random()
        c.add_times(ts, ts + rng.uniform(0.002, 0.02))
        for f, v in make_payload(rng, stream, ts, 0, False).items():
            if f in NUMERIC:
                c.add_number(f, v, ts)
            elif f in CATEGORICAL:
                c.add_category(f, v, 32)
    return c


def backlog_chunks(seconds: int, t0: int, seed: int = 1) -> tuple[list[bytes], int]:
    """300 cameras x 3 streams x `seconds` encoded chunks, in window order (as checkpoints
    would write them), and the number of messages they count."""
    rng = random.Random(seed)
    tpl = {stream: [_template(rng, stream, n) for _ in range(3000)] for stream, n in STREAMS}
    out, messages = [], 0
    for t in range(t0, t0 + seconds):
        for cam in range(CAMERAS):
            for stream, _ in STREAMS:
                c = rng.choice(tpl[stream])
                base = (c.event_first, c.event_last, c.recv_first, c.recv_last)
                c.camera, c.t = f"cam-{cam:03d}", t
                c.event_first, c.event_last, c.recv_first, c.recv_last = (x + t for x in base)
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


def encoded_batches(rows: list[tuple[int, bytes]]) -> list[tuple[int, bytes, dict[str, str]]]:
    """(seq, chunk body) rows as the agent's requests, (chunks, body, headers): cut BATCH at a
    time like the outbox does (Store.cut: encode_batch over (seq, seq_end, body)), then the
    forwarder's build_request."""
    out = []
    for i in range(0, len(rows), BATCH):
        part = rows[i : i + BATCH]
        batch = Batch(
            first_seq=part[0][0], last_seq=part[-1][0], last_row=part[-1][0], chunks=len(part),
            messages=counted_messages(chunk for _, chunk in part),
            body=encode_batch(GATEWAY_ID, [(seq, seq, chunk) for seq, chunk in part],
                              sent_at=time.time()),
        )  # fmt: skip
        out.append((batch.chunks, *build_request(FORWARD, GATEWAY_ID, batch)))
    return out


def post_all(recv: Any, batches: list[tuple[int, bytes, dict[str, str]]]) -> dict[str, Any]:
    """POST batches back to back, one in flight, one keep-alive connection (at most 60 s):
    chunks/s, and the receiver's CPU over it."""
    conn = http.client.HTTPConnection(HOST, recv.port, timeout=30)
    sent = failed = 0
    cpu0, started = ProcStat(pid(recv)).cpu_s(), time.monotonic()
    for chunks, body, headers in batches:
        conn.request("POST", "/ingest", body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        sent, failed = (sent + chunks, failed) if 200 <= r.status < 300 else (sent, failed + 1)
        if time.monotonic() - started > 60:
            break
    elapsed = time.monotonic() - started
    conn.close()
    cpu = ProcStat(pid(recv)).cpu_s() - cpu0
    return {"chunks": sent, "failed_batches": failed, "seconds": round(elapsed, 2),
            "chunks_per_s": round(sent / elapsed, 1) if elapsed else None,
            "receiver_cpu_cores": round(cpu / elapsed, 2)}  # fmt: skip


# -- the receivers ----------------------------------------------------------------------------


class BenchReceiver(Proc):
    """bench.fast_receiver (validates tiling, dedups by seq, counts), or with null=True its
    null mode (checks a chunk count only), as a child process, started."""

    def __init__(self, log_path: Path, *, null: bool = False) -> None:
        self.port = free_port()
        # Proc takes no cwd: the repository root goes on the child's PYTHONPATH instead.
        args = ["--port", str(self.port)] + (["--null"] if null else [])
        super().__init__(bench_command("fast_receiver", *args), log_path, env=child_env())
        self.start()
        wait_for(lambda: port_open(self.port) or not self.running, timeout_s=15,
                 what="bench receiver")  # fmt: skip
        self.url = f"http://{HOST}:{self.port}/ingest"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/_stats", timeout=5) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    def span(self) -> tuple[float | None, float | None]:
        s = self.stats()
        return s["first_at"], s["last_at"]


class Reference(Receiver):
    """The reference receiver (`edge-agent simulate cloud`, SQLite), started."""

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.start()

    def span(self) -> tuple[float | None, float | None]:
        """received_at of its first and last chunk."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            row = con.execute("SELECT min(received_at), max(received_at) FROM chunks").fetchone()
            return row[0], row[1]
        finally:
            con.close()


RECEIVERS: dict[str, Callable[[Path], Any]] = {  # name -> start it, given a path to work in
    "receiver": Reference,
    "fast_receiver": lambda d: BenchReceiver(d.with_suffix(".log")),
    "null_receiver": lambda d: BenchReceiver(d.with_suffix(".log"), null=True),
}


def check(stats: dict[str, Any]) -> dict[str, Any]:
    """What a checking receiver counted: chunks, messages, the gateway's gaps / out of order /
    duplicates (the fast and the reference receiver's /_stats have the same shape)."""
    gw = stats["gateways"].get(GATEWAY_ID, {})
    bad = {"bad_batches": stats["bad"]} if "bad" in stats else {}  # the reference has none
    return {"receiver_chunks": stats["chunks"], "receiver_messages": stats["messages"], **bad,
            **{k: gw.get(k) for k in ("gaps", "out_of_order", "duplicates")}}  # fmt: skip


# -- the agent draining a copy of the backlog -------------------------------------------------


def agent_drain(label: str, src: Path, work: Path, recv: Any, n: int,
                timeout_s: float) -> dict[str, Any]:  # fmt: skip
    """Start the agent on a copy of `src`; wait for its outbox to be empty. recv.span() gives
    the receiver-side wall times of the first and last batch received."""
    d = work / label
    (d / "agent").mkdir(parents=True)
    shutil.copyfile(src, d / "agent" / "buffer.sqlite3")
    broker = agent = None
    try:
        broker = Mosquitto(d / "mosquitto").start()
        launched, launched_wall = time.monotonic(), time.time()
        agent = start_agent(d, broker.port, recv.url, ready=False, buffer={"max_bytes": "8GiB"},
                            forward={"max_chunks_per_s": 10_000_000.0})  # fmt: skip
        sampler = Sampler({"agent": pid(agent), "receiver": pid(recv)}, interval_s=0.25)
        sampler.start()
        timeline: list[tuple[float, int]] = []  # (t, chunks sent)
        sent = nbytes = 0
        done = False
        while not done and time.monotonic() < launched + timeout_s:
            if not agent.running:
                raise RuntimeError(f"agent exited:\n{agent.log_text()[-2000:]}")
            if (s := agent.status()) is not None:
                sent, nbytes = s["forward"]["chunks_sent"], s["forward"]["bytes_sent"]
                # /status is rebuilt at most once a second: a repeated answer is not a new
                # point (it made whole tenths of the backlog read 0 chunks/s)
                if not timeline or sent != timeline[-1][1]:
                    timeline.append((time.monotonic(), sent))
                done = s["outbox"]["chunks"] == 0 and sent >= n
            if not done:
                time.sleep(0.2)
        end = time.monotonic()
        sampler.stop()
        first_at, last_at = recv.span()
        spanned = first_at and last_at and last_at > first_at
        tenths = []
        for k in range(10):
            pts = [(t, c) for t, c in timeline if n * k / 10 <= c <= n * (k + 1) / 10]
            if len(pts) >= 3 and pts[-1][0] > pts[0][0]:
                tenths.append(round((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])))
        t_a = launched + ((first_at - launched_wall) if first_at else 0)
        return {
            "chunks": n, "drained": done, "chunks_sent": sent,
            "startup_s": round(first_at - launched_wall, 2) if first_at else None,
            # Receiver side: the first batch's arrival to the last's; n - BATCH chunks between.
            "drain_s": round((last_at - first_at) * n / max(1, n - BATCH), 2)
            if done and first_at and last_at else None,
            "chunks_per_s": round((sent - BATCH) / (last_at - first_at), 1) if spanned else None,
            "chunks_per_s_by_tenth": tenths,
            "wire_bytes_per_chunk": round(nbytes / sent, 1) if sent else None,
            "agent_cpu_cores": rnd(sampler.cpu_between("agent", t_a, end)),
            "receiver_cpu_cores": rnd(sampler.cpu_between("receiver", t_a, end)),
            "agent_peak_rss_mb": round(sampler.max_rss_kb("agent") / 1024, 1),
        }  # fmt: skip
    finally:
        kill_quietly(agent, broker)
        shutil.rmtree(d / "agent", ignore_errors=True)


# -- the run ----------------------------------------------------------------------------------


def build_backlog(rep: Report, work: Path, seconds: int, base_n: int) -> dict[str, Any]:
    """The outbox files (all of the backlog, and a quarter of it) and the baselines' requests."""
    n = CAMERAS * len(STREAMS) * seconds
    src, src_small = work / "backlog.sqlite3", work / "backlog-quarter.sqlite3"
    t0, started = int(time.time()) - seconds - 10, time.monotonic()
    chunks, messages = backlog_chunks(seconds, t0)
    raw_bytes = sum(len(c) for c in chunks)
    asyncio.run(_fill(src, chunks, created_at=float(t0 + 3)))
    asyncio.run(_fill(src_small, chunks[: n // 4], created_at=float(t0 + 3)))
    batches = encoded_batches([(i + 1, chunks[i]) for i in range(base_n)])
    base_messages = sum(msgspec.json.decode(c)["count"] for c in chunks[:base_n])
    del chunks
    for key, value in (("backlog_chunks", n), ("backlog_messages", messages),
                       ("backlog_chunk_bytes", raw_bytes),
                       ("backlog_file_bytes", src.stat().st_size)):  # fmt: skip
        rep.figure(key, value)
    rep.figure(
        "chunk_json_bytes", round(raw_bytes / n, 1),
        f"backlog: {n:,} chunks (300 cameras x 3 streams x {seconds} s), {raw_bytes / n:.0f} B "
        f"of JSON per chunk, outbox file {src.stat().st_size / 1e6:.0f} MB, built in "
        f"{time.monotonic() - started:.1f} s",
    )  # fmt: skip
    return dict(n=n, n_small=n // 4, src=src, src_small=src_small, messages=messages,
                raw_bytes=raw_bytes, batches=batches, base_messages=base_messages,
                wire=sum(len(b[1]) for b in batches), base_n=base_n)  # fmt: skip


def baselines(rep: Report, work: Path, bk: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each receiver alone: the agent's requests posted back to back."""
    base: dict[str, dict[str, Any]] = {}
    for name, start in RECEIVERS.items():
        recv = start(work / f"{name}-baseline")
        try:
            b = base[name] = post_all(recv, bk["batches"])
            if name == "receiver":
                b["stored"] = recv.stats()["chunks"]
            elif name == "fast_receiver":
                b.update(check(recv.stats()))
        finally:
            kill_quietly(recv)
    base_fast = base["fast_receiver"]
    fast_ok = (base_fast["receiver_chunks"] == base_fast["chunks"]
               and base_fast["receiver_messages"] == bk["base_messages"])  # fmt: skip
    rep.figure("receiver_alone", base["receiver"], fill(
        "baseline, reference receiver alone: {chunks:,} chunks in {seconds} s = "
        "{chunks_per_s:n} chunks/s (stored {stored:,}), receiver CPU "
        "{receiver_cpu_cores} cores", **base["receiver"]))  # fmt: skip
    rep.figure("fast_receiver_alone", base_fast, fill(
        "baseline, fast receiver alone: {chunks:,} chunks in {seconds} s = {chunks_per_s:n} "
        "chunks/s, receiver CPU {receiver_cpu_cores} cores; counted {receiver_messages:,} "
        "messages of {m:,} {ok}", m=bk["base_messages"],
        ok="(exact)" if fast_ok else "(** NOT exact **)", **base_fast))  # fmt: skip
    rep.figure(
        "null_receiver_alone",
        base["null_receiver"],
        fill("baseline, null receiver alone: {chunks_per_s:n} chunks/s", **base["null_receiver"]),
    )
    return base


def drains(rep: Report, work: Path, bk: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """The agent into the null receiver (a quarter, then all of the backlog), the fast checking
    receiver (the headline) and the reference receiver (end to end)."""
    n, n_small, src = bk["n"], bk["n_small"], bk["src"]
    runs = (
        ("agent_to_null_quarter", f"agent -> null receiver ({n_small:,} chunks)", bk["src_small"],
         n_small, RECEIVERS["null_receiver"]),
        ("agent_to_null", f"agent -> null receiver ({n:,} chunks)", src, n,
         RECEIVERS["null_receiver"]),
        ("agent_to_fast", "agent -> fast receiver", src, n, RECEIVERS["fast_receiver"]),
        ("agent_to_reference", "agent -> reference receiver", src, n, Reference),
    )  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for key, label, path, count, start in runs:
        recv = start(work / key)
        try:
            res = results[key] = agent_drain(key, path, work, recv, count, timeout_s)
            if key in ("agent_to_fast", "agent_to_reference"):
                res.update(check(recv.stats()))
        finally:
            kill_quietly(recv)
        if key == "agent_to_fast":
            res["exact"] = (res["receiver_chunks"], res["receiver_messages"], res["gaps"],
                            res["out_of_order"]) == (n, bk["messages"], 0, 0)  # fmt: skip
        rep.figure(key, res, fill(
            "{label}: {chunks_sent:,}/{chunks:,} chunks, drained in {drain_s} s = "
            "{chunks_per_s:n} chunks/s (startup before the first batch {startup_s} s); by tenth "
            "of the backlog {chunks_per_s_by_tenth}; {wire_bytes_per_chunk} B/chunk on the wire; "
            "CPU agent {agent_cpu_cores} cores, receiver {receiver_cpu_cores} cores; agent peak "
            "RSS {agent_peak_rss_mb} MB{nd}", label=label, **res,
            nd="" if res["drained"] else "  ** not drained before the time limit **"))  # fmt: skip
    src.unlink()
    bk["src_small"].unlink()
    return results


def verdicts(rep: Report, bk: dict[str, Any], base: dict[str, Any],
             results: dict[str, Any]) -> None:  # fmt: skip
    """The rows: the drains against their targets and the same-run baselines; the models."""
    n, n_small = bk["n"], bk["n_small"]
    base_ref, to_fast = base["receiver"], results["agent_to_fast"]
    to_null, to_ref = results["agent_to_null"], results["agent_to_reference"]
    r = dict(  # the rates, chunks/s
        headline=to_fast.get("chunks_per_s"), fast_rx=base["fast_receiver"].get("chunks_per_s"),
        rx=base_ref.get("chunks_per_s"), alone=to_null.get("chunks_per_s"),
        e2e=to_ref.get("chunks_per_s"), q=results["agent_to_null_quarter"].get("chunks_per_s"),
        null_rx=base["null_receiver"].get("chunks_per_s"),
    )  # fmt: skip
    # One batch in flight: the receiver's and the agent's per-batch times add up.
    alone, rx, q = r["alone"], r["rx"], r["q"]
    r["model"] = 1 / (1 / rx + 1 / alone) if rx and alone else None
    r["model_fast"] = 1 / (1 / r["fast_rx"] + 1 / alone) if r["fast_rx"] and alone else None
    rep.figure("one_in_flight_model_chunks_per_s", rnd(r["model"], None))
    rep.figure("one_in_flight_model_fast_chunks_per_s", rnd(r["model_fast"], None))

    # Does the agent's per-chunk time grow with the backlog? T(n)/n = a + b n (two points).
    hour_agent = hour_e2e = None
    if q and alone:
        c1, c2 = 1 / q, 1 / alone
        b = max(0.0, (c2 - c1) / (n - n_small))
        a = c1 - b * n_small if b else (c1 + c2) / 2
        hour_agent = HOUR * (a + b * HOUR)
        rep.figure("per_chunk_us_quarter", round(c1 * 1e6, 2))
        rep.figure("per_chunk_us_full", round(c2 * 1e6, 2))
        rep.figure("per_chunk_growth_us_per_100k_backlog", round(b * 1e5 * 1e6, 3))
        rep.figure("extrapolated_3_2M_agent_alone_s", round(hour_agent))
        if rx:
            hour_e2e = HOUR / rx + hour_agent
            rep.figure("extrapolated_3_2M_reference_s", round(hour_e2e))

    nd = {k: "" if x.get("drained") else " (NOT drained before the time limit)"
          for k, x in results.items()}  # fmt: skip
    rep.row(
        f"Replay drain, {n:,} chunks, agent -> fast checking receiver (headline)",
        ">= 50,000 chunks/s",
        fill("{headline:n} chunks/s, {drain_s} s", **r, drain_s=to_fast.get("drain_s"))
        + nd["agent_to_fast"]
        + fill("; receiver counted {receiver_chunks:,} chunks, {receiver_messages:,} messages of "
               "{m:,}, gaps {gaps}, out of order {out_of_order}: ", m=bk["messages"], **to_fast)
        + ("exact" if to_fast["exact"] else "**NOT exact**"),
        fill("fast receiver alone {fast_rx:n} chunks/s (reference receiver alone {rx:n}); agent "
             "alone (null receiver) {alone:n}; one batch in flight: 1/(1/rx + 1/agent) = "
             "{model_fast:n}", **r),
        None if r["headline"] is None
        else r["headline"] >= TARGET_CHUNKS_S and bool(to_fast["exact"]),
    )  # fmt: skip
    rep.row(
        "Benchmark receiver alone (fast checking receiver, batches posted back to back)",
        ">= 60,000 chunks/s", fill("{fast_rx:n} chunks/s", **r),
        fill("reference receiver alone {rx:n} chunks/s", **r),
        None if r["fast_rx"] is None else r["fast_rx"] >= 60_000,
    )  # fmt: skip
    rep.row(
        f"Replay drain, {n:,} chunks, to the reference receiver",
        "(report: bound by the SQLite reference receiver)",
        fill("{e2e:n} chunks/s, {s} s", **r, s=to_ref.get("drain_s")) + nd["agent_to_reference"],
        fill("receiver alone {rx:n} chunks/s; agent alone {alone:n}; with one batch in flight "
             "their times add up: 1/(1/rx + 1/agent) = {model:n}", **r),
        None,
    )  # fmt: skip
    rep.row(
        f"Replay drain, {n:,} chunks, agent alone (null receiver)", ">= 50,000 chunks/s",
        fill("{alone:n} chunks/s, {s} s", **r, s=to_null.get("drain_s")) + nd["agent_to_null"],
        fill("null receiver alone {null_rx:n} chunks/s; agent alone on {ns:,} chunks {q:n} "
             "chunks/s", **r, ns=n_small),
        None if alone is None else alone >= TARGET_CHUNKS_S,
    )  # fmt: skip
    mins = {k: HOUR / v if v else None for k, v in r.items()}  # at this run's rates
    rep.row(
        "Replay of an hour (3.2 M chunks), extrapolated", "(report; 50,000 chunks/s = 64 s)",
        fill("agent alone {a:min}, to the reference receiver {e:min}", a=hour_agent, e=hour_e2e),
        fill("linear extrapolation of this run's rates: agent alone {alone:min}, to the fast "
             "receiver {headline:min}, reference {e2e:min}", **mins),
        None,
    )  # fmt: skip
    chunk_b = bk["raw_bytes"] / n
    rep.row(
        "Bytes on the wire per chunk (gzip body)", "(report)",
        f"{to_ref.get('wire_bytes_per_chunk')} B",
        f"uncompressed chunk JSON {chunk_b:.0f} B "
        f"(gzip {chunk_b / (bk['wire'] / bk['base_n']):.1f}x)",
        None,
    )  # fmt: skip
    if base_ref.get("receiver_cpu_cores") is not None and base_ref["receiver_cpu_cores"] < 0.7:
        rep.note(fill(
            "the reference receiver alone used {cores} cores while batches were posted back to "
            "back: it was waiting, not computing, part of the time (it replies with TCP_NODELAY, "
            "so not on delayed ACKs: look at the machine's load during the run; the null "
            "receiver took {null_rx:n} chunks/s over the same client)",
            cores=base_ref["receiver_cpu_cores"], **r))  # fmt: skip
    if q and alone and alone < 0.85 * q:
        rep.note(fill(
            "agent alone: {q:n} chunks/s on a {ns:,}-chunk backlog but {alone:n} on {n:,}: the "
            "per-batch cost grows with the backlog (look for a per-batch outbox query that scans "
            "the chunks table); the hour extrapolation fits per-chunk time = a + b x backlog on "
            "the two runs", ns=n_small, n=n, **r))  # fmt: skip
    rep.note(
        "drain time and rate are taken at the receiver (first to last batch arrival); the "
        "agent's startup (outbox open, PRAGMA quick_check) comes before and is listed apart"
    )
    rep.figure("default_max_chunks_per_s", FORWARD.max_chunks_per_s)
    rep.note(
        "pace: forward.max_chunks_per_s raised to 10 M for this run; with the shipped default "
        f"({FORWARD.max_chunks_per_s:,.0f}) the pacer caps the replay at "
        f"{FORWARD.max_chunks_per_s:,.0f} chunks/s"
    )
    rep.note(
        "wire bytes = /status forward.bytes_sent / chunks_sent (gzip request bodies; HTTP "
        "headers not included: ~250 B per 500-chunk batch, < 1 B per chunk)"
    )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "")
    p.add_argument("--seconds", type=int, help="backlog length in seconds of 300 x 3 chunks")
    p.add_argument("--baseline-chunks", type=int, help="chunks POSTed in each direct baseline")
    args = p.parse_args(argv)
    seconds = args.seconds or (40 if args.quick else 400)
    base_n = min(CAMERAS * len(STREAMS) * seconds,
                 args.baseline_chunks or (36_000 if args.quick else 90_000))  # fmt: skip
    rep, work = Report("replay", args.quick), fresh_dir("replay")
    bk = build_backlog(rep, work, seconds, base_n)
    base = baselines(rep, work, bk)
    verdicts(rep, bk, base, drains(rep, work, bk, 120 if args.quick else 300))
    rep.finish(args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Replay: drain an outbox backlog of 300 cameras x 3 streams to the cloud.

An outbox file is pre-filled with agent.outbox.Outbox + CheckpointWrite (realistic chunks: per
camera and second ~7 detections, 2 motion, 1 health messages aggregated with agent.model.Chunk,
encoded with encode_chunk), then the agent is started on a copy of it (`python -m agent.cli run`,
shipped defaults except forward.max_chunks_per_s = 10,000,000 so the pace never limits, and
buffer.max_bytes = 8 GiB so no compaction) and timed until its outbox is empty.

Runs, in this order, each on a fresh copy / fresh receiver:
  receiver alone (baseline)  the same batches, pre-encoded exactly as the agent would (500
                             chunks, gzip level 5), POSTed back to back on one keep-alive
                             connection to the reference receiver: what the receiver can take
  null receiver alone        the same, into bench/null_receiver.py (stores nothing): transport
  agent -> null receiver     the agent's own replay ceiling
  agent -> reference         end to end, what the issue asks for

    python bench/replay.py [--quick] [--seconds S]   (backlog = 300 x 3 x S chunks)
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import random
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    HOST,
    Agent,
    Mosquitto,
    Receiver,
    Report,
    Sampler,
    free_port,
    fresh_dir,
    kill_quietly,
    parser,
    say,
    wait_for,
    write_agent_config,
)

from agent.forward import encode_batch  # noqa: E402
from agent.model import Chunk, encode_chunk  # noqa: E402
from agent.outbox import CheckpointWrite, Outbox  # noqa: E402
from agent.sim.procs import Proc, port_open  # noqa: E402

CAMERAS = 300
STREAMS = (("detections", 7), ("motion", 2), ("health", 1))  # messages per camera-second
BATCH = 500  # forward.max_batch_chunks default
GATEWAY = "bench-gw"
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


def backlog_chunks(seconds: int, t0: int, seed: int = 1) -> list[bytes]:
    """300 cameras x 3 streams x `seconds` encoded chunks, in window order (as checkpoints
    would write them)."""
    rng = random.Random(seed)
    tpl = _templates(rng)
    out = []
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
                out.append(encode_chunk(c))
                c.event_first, c.event_last, c.recv_first, c.recv_last = base
    return out


async def _fill(path: Path, chunks: list[bytes], created_at: float) -> None:
    ob, _ = await Outbox.open(path, synchronous="off")
    try:
        for i in range(0, len(chunks), 20_000):
            await ob.checkpoint(CheckpointWrite(chunks=chunks[i : i + 20_000]), now=created_at)
    finally:
        await ob.close()  # the last connection closing checkpoints the WAL into the file


# -- baselines: POST pre-encoded batches directly ---------------------------------------------


def encoded_batches(rows: list[tuple[int, bytes]]) -> list[tuple[int, int, bytes]]:
    out = []
    for i in range(0, len(rows), BATCH):
        part = rows[i : i + BATCH]
        body = gzip.compress(encode_batch(GATEWAY, part, sent_at=time.time()), 5, mtime=0)
        out.append((part[0][0], part[-1][0], body))
    return out


def post_all(port: int, batches: list[tuple[int, int, bytes]], time_limit_s: float) -> dict[str, Any]:
    """POST batches back to back, one in flight, one keep-alive connection; chunks/s."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    sent = failed = 0
    started = time.monotonic()
    for first, last, body in batches:
        conn.request(
            "POST", "/ingest", body=body,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip",
                     "Idempotency-Key": f"{GATEWAY}:{first}-{last}"},
        )  # fmt: skip
        r = conn.getresponse()
        r.read()
        if 200 <= r.status < 300:
            sent += last - first + 1
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
    label: str, src: Path, work: Path, url: str, receiver_pid: int, n: int, timeout_s: float
) -> dict[str, Any]:
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
        agent = Agent(config, d / "agent.log", health_port).start()
        assert agent.popen is not None
        sampler = Sampler({"agent": agent.popen.pid, "receiver": receiver_pid}, interval_s=0.25)
        sampler.start()
        timeline: list[tuple[float, int, int, int]] = []  # (t, outbox chunks, sent, bytes_sent)
        first_status = first_sent = done = None
        deadline = launched + timeout_s
        while time.monotonic() < deadline:
            if not agent.running:
                raise RuntimeError(f"agent exited:\n{agent.log_text()[-2000:]}")
            s = agent.status()
            now = time.monotonic()
            if s is not None:
                first_status = first_status or now
                ob, fw = s["outbox"], s["forward"]
                timeline.append((now, ob["chunks"], fw["chunks_sent"], fw["bytes_sent"]))
                if first_sent is None and fw["chunks_sent"] > 0:
                    first_sent = now
                if ob["chunks"] == 0 and fw["chunks_sent"] >= n:
                    done = now
                    break
            time.sleep(0.25)
        sampler.stop()
        end = done or time.monotonic()
        last = timeline[-1] if timeline else (end, n, 0, 0)
        sent, nbytes = last[2], last[3]
        fwd_s = (end - first_sent) if first_sent else None
        # Throughput by tenths of the backlog: does it slow down as the outbox empties?
        tenths = []
        for k in range(10):
            lo, hi = n * k / 10, n * (k + 1) / 10
            pts = [(t, c) for t, _, c, _ in timeline if lo <= c <= hi]
            if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
                tenths.append(round((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])))
        t_a = first_sent or launched
        res = {
            "drained": done is not None,
            "chunks_sent": sent,
            "startup_s": round((first_status or end) - launched, 2),
            "drain_s_from_launch": round(end - launched, 2),
            "drain_s_from_first_batch": None if fwd_s is None else round(fwd_s, 2),
            "chunks_per_s": round(sent / fwd_s, 1) if fwd_s else None,
            "chunks_per_s_by_tenth": tenths,
            "wire_bytes_per_chunk": round(nbytes / sent, 1) if sent else None,
            "agent_cpu_cores": _r(sampler.cpu_between("agent", t_a, end)),
            "receiver_cpu_cores": _r(sampler.cpu_between("receiver", t_a, end)),
            "agent_peak_rss_mb": round(sampler.max_rss_kb["agent"] / 1024, 1),
        }
        return res
    finally:
        kill_quietly(agent, broker)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "")
    p.add_argument("--seconds", type=int, help="backlog length in seconds of 300 x 3 chunks")
    p.add_argument("--baseline-chunks", type=int, help="chunks POSTed in each direct baseline")
    args = p.parse_args(argv)
    seconds = args.seconds or (40 if args.quick else 400)
    n = CAMERAS * len(STREAMS) * seconds
    base_n = min(n, args.baseline_chunks or (36_000 if args.quick else 90_000))
    timeout_s = 120 if args.quick else 300
    rep = Report("replay", args.quick)
    work = fresh_dir("replay")
    src = work / "backlog.sqlite3"

    t0 = int(time.time()) - seconds - 10
    started = time.monotonic()
    chunks = backlog_chunks(seconds, t0)
    raw_bytes = sum(len(c) for c in chunks)
    asyncio.run(_fill(src, chunks, created_at=float(t0 + 3)))
    del chunks
    rep.figure("backlog_chunks", n)
    rep.figure("backlog_chunk_bytes", raw_bytes)
    rep.figure("backlog_file_bytes", src.stat().st_size)
    rep.figure(
        "chunk_json_bytes", round(raw_bytes / n, 1),
        f"backlog: {n:,} chunks (300 cameras x 3 streams x {seconds} s), {raw_bytes / n:.0f} B "
        f"of JSON per chunk, outbox file {src.stat().st_size / 1e6:.0f} MB, built in "
        f"{time.monotonic() - started:.1f} s",
    )  # fmt: skip

    con = sqlite3.connect(src)
    rows = [(int(s), bytes(b)) for s, b in con.execute(
        "SELECT seq, body FROM chunks ORDER BY seq LIMIT ?", (base_n,))]  # fmt: skip
    con.close()
    batches = encoded_batches(rows)
    wire = sum(len(b) for _, _, b in batches)
    rep.figure("baseline_wire_bytes_per_chunk", round(wire / len(rows), 1))

    # Baseline 1: the reference receiver alone.
    recv = Receiver(work / "cloud-baseline").start()
    try:
        base_ref = post_all(recv.port, batches, time_limit_s=60)
        st = recv.stats()
        base_ref["stored"] = st["chunks"]
    finally:
        kill_quietly(recv)
    rep.figure(
        "receiver_alone", base_ref,
        f"baseline, reference receiver alone: {base_ref['chunks']:,} chunks in "
        f"{base_ref['seconds']} s = {base_ref['chunks_per_s']:,.0f} chunks/s "
        f"(stored {base_ref['stored']:,})",
    )  # fmt: skip

    # Baseline 2: the null receiver alone (transport + gunzip).
    null_port = free_port()
    null = Proc(
        [sys.executable, str(Path(__file__).resolve().parent / "null_receiver.py"),
         "--port", str(null_port)], work / "null-receiver.log",
    ).start()  # fmt: skip
    try:
        wait_for(lambda: port_open(null_port) or not null.running, timeout_s=15, what="null rx")
        base_null = post_all(null_port, batches, time_limit_s=60)
    finally:
        kill_quietly(null)
    rep.figure(
        "null_receiver_alone", base_null,
        f"baseline, null receiver alone: {base_null['chunks_per_s']:,.0f} chunks/s",
    )

    # The agent into the null receiver: the agent's own ceiling.
    null_port = free_port()
    null = Proc(
        [sys.executable, str(Path(__file__).resolve().parent / "null_receiver.py"),
         "--port", str(null_port)], work / "null-receiver-2.log",
    ).start()  # fmt: skip
    try:
        wait_for(lambda: port_open(null_port) or not null.running, timeout_s=15, what="null rx")
        assert null.popen is not None
        to_null = agent_drain(
            "agent-null", src, work, f"http://{HOST}:{null_port}/ingest", null.popen.pid, n,
            timeout_s,
        )  # fmt: skip
    finally:
        kill_quietly(null)
    _show(rep, "agent_to_null", "agent -> null receiver", to_null, n)

    # The agent into the reference receiver: end to end.
    recv = Receiver(work / "cloud").start()
    try:
        assert recv.popen is not None
        to_ref = agent_drain("agent-ref", src, work, recv.url, recv.popen.pid, n, timeout_s)
        st = recv.stats()
        gw = st["gateways"].get(GATEWAY, {})
        to_ref.update(
            receiver_chunks=st["chunks"], gaps=gw.get("gaps"), out_of_order=gw.get("out_of_order"),
            duplicates=gw.get("duplicates"),
        )  # fmt: skip
    finally:
        kill_quietly(recv)
    _show(rep, "agent_to_reference", "agent -> reference receiver", to_ref, n)
    shutil.rmtree(work / "agent-null" / "agent", ignore_errors=True)
    shutil.rmtree(work / "agent-ref" / "agent", ignore_errors=True)
    src.unlink()

    # Rows.
    e2e = to_ref.get("chunks_per_s")
    agent_alone = to_null.get("chunks_per_s")
    rx = base_ref.get("chunks_per_s")
    limiter = (
        "the reference receiver limits it"
        if e2e and rx and agent_alone and rx < agent_alone and e2e >= 0.7 * rx
        else "the agent limits it" if e2e and agent_alone and e2e >= 0.7 * agent_alone
        else "both / unclear"
    )  # fmt: skip
    rep.row(
        f"Replay drain, {n:,} chunks, to the reference receiver",
        ">= 50,000 chunks/s",
        f"{_rate(e2e)} chunks/s, {to_ref.get('drain_s_from_first_batch')} s"
        + ("" if to_ref.get("drained") else " (NOT fully drained before the time limit)"),
        f"receiver alone {_rate(rx)} chunks/s ({limiter})",
        None if e2e is None else e2e >= TARGET_CHUNKS_S,
    )
    rep.row(
        f"Replay drain, {n:,} chunks, agent alone (null receiver)",
        ">= 50,000 chunks/s",
        f"{_rate(agent_alone)} chunks/s, {to_null.get('drain_s_from_first_batch')} s"
        + ("" if to_null.get("drained") else " (NOT fully drained before the time limit)"),
        f"null receiver alone {_rate(base_null.get('chunks_per_s'))} chunks/s",
        None if agent_alone is None else agent_alone >= TARGET_CHUNKS_S,
    )
    rep.row(
        "Bytes on the wire per chunk (gzip body)",
        "(report)",
        f"{to_ref.get('wire_bytes_per_chunk')} B (JSON {raw_bytes / n:.0f} B)",
        f"direct encode of the same chunks {wire / len(rows):.1f} B",
        None,
    )
    full = 3_200_000
    for key, res in (("agent_to_reference", to_ref), ("agent_to_null", to_null)):
        r = res.get("chunks_per_s")
        if r:
            rep.figure(f"extrapolated_3_2M_s_{key}", round(full / r))
    rep.note(
        f"extrapolation to an hour of backlog (3.2 M chunks): {_mins(full, e2e)} to the reference "
        f"receiver, {_mins(full, agent_alone)} to the null receiver, at the rates measured here "
        f"on {n:,} chunks; linear only if the rate does not depend on the backlog size (see "
        "chunks_per_s_by_tenth)"
    )
    rep.note(
        "pace: forward.max_chunks_per_s raised to 10 M for this run; with the shipped default "
        "(20,000) the replay would be capped at 20,000 chunks/s by the pacer"
    )
    rep.note(
        "wire bytes = /status forward.bytes_sent / chunks_sent (gzip request bodies, HTTP "
        "headers not included: ~250 B per 500-chunk batch, < 1 B per chunk)"
    )
    rep.finish(args.json_out)
    return 0


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _mins(n: int, rate: float | None) -> str:
    return "n/a" if not rate else f"{n / rate / 60:.1f} min"


def _show(rep: Report, key: str, label: str, res: dict[str, Any], n: int) -> None:
    tenths = res.get("chunks_per_s_by_tenth") or []
    rep.figure(
        key, res,
        f"{label}: {res['chunks_sent']:,}/{n:,} chunks in {res['drain_s_from_first_batch']} s "
        f"from the first batch ({res['drain_s_from_launch']} s from launch, startup "
        f"{res['startup_s']} s) = {_rate(res['chunks_per_s'])} chunks/s; by tenth of the backlog "
        f"{tenths}; {res['wire_bytes_per_chunk']} B/chunk on the wire; CPU agent "
        f"{res['agent_cpu_cores']} cores, receiver {res['receiver_cpu_cores']} cores; agent peak "
        f"RSS {res['agent_peak_rss_mb']} MB"
        + ("" if res["drained"] else "  ** not drained before the time limit **"),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

"""Hostile-camera soak: honest cameras at a few thousand msgs/s mixed with every known hostile
payload ("pill", bench/pills.py), for minutes, with real processes.

    .venv/bin/python -m bench.hostile_soak --duration-s 300
    .venv/bin/python -m bench.hostile_soak --duration-s 30 --no-md     # a quick check

One run: its own Mosquitto and reference receiver on free loopback ports, a fresh outbox, the
agent as a child process (`edge-agent run`), the camera simulator (agent.sim.cameras, its ground
truth) as the honest cameras, and, in parallel, a hostile publisher (raw MQTT v5 from
bench.loadgen, QoS 1, its own client ids, camera ids `evil-*` / `flood-*`, never `cam-*`)
looping over every pill at a few hundred msgs/s. Every few seconds: the agent's RSS
(/proc/<pid>/status VmRSS), CPU (utime + stime), threads, /healthz and /status (rejects by
reason, MQTT reconnects, counters).

At the end the hostile publisher stops, the honest one finishes, the script waits for delivery,
takes the final /status, stops the agent (SIGTERM, exit 0 expected) and judges:

- honest exact: the receiver's merged table restricted to the honest camera ids equals the ground
  truth per (camera, stream, second) — missing 0, duplicated 0, no mismatched row; seqs clean;
- no MQTT reconnect (`mqtt.reconnects` stayed 0), no honest or hostile publisher reconnect;
- the agent never restarted: same pid, alive and /healthz 200 at every sample;
- RSS flat: median of the first minute vs median of the last minute (first / last third of the
  run when it is shorter than 3 minutes), and the max; growth allowed: 10 % + 8 MiB;
- every pill accounted for under its reason: for each reject reason, the agent's count equals
  the number of pills the broker acknowledged for it; each counted pill reaches the cloud once
  under its own camera id, and its side counter (bad_numeric_field, bad_categorical_field,
  bad_timestamp_used_gateway_time, bad_time_restamped) matches exactly; the id flood is
  counted at the cloud or rejected as too_many_cameras, nothing else; a payload far over
  mqtt.max_payload_bytes is dropped by the broker (see the README) and appears nowhere.

A payload with invalid UTF-8 in its topic is sent on its own connection, once a second.
Mosquitto validates topic UTF-8 and disconnects such a client, so the agent never sees it: the
outcome is reported (and, should one be acknowledged, it is expected as bad_topic_encoding).

Prints a summary; writes bench/HOSTILE_SOAK.md (unless --no-md) with the date, commit,
parameters and figures. The working directory is kept under bench/out/hostile_soak/ on failure
(or with --keep).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import random
import shutil
import signal
import socket
import statistics
import struct
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from agent.sim.cameras import camera_name
from agent.sim.cloud import load_merged
from bench.common import (
    BENCH,
    OUT,
    Nones,
    Sampler,
    dig,
    idle,
    machine_description,
    parser,
    pid,
    say,
    site,
    write_json,
)
from bench.loadgen import connect, mqtt_str, publish_packet, read_packet, split_packets
from bench.pills import MAX_PAYLOAD, PILLS, RAW_TOPICS, SIDE_COUNTERS, STREAMS
from devtools.procs import HOST, Agent, Publisher, wait_for
from devtools.truth import compare

GATEWAY = "gw-hostile"


def raw_publish(port: int, topic: bytes, payload: bytes, client_id: str) -> str:
    """CONNECT (v5, clean start), PUBLISH QoS 1 on a raw topic; what the broker answered."""
    try:
        sock, _ = connect(HOST, port, client_id, timeout_s=5)
    except ConnectionError:
        return "no_connack"
    with sock:
        sock.settimeout(5)
        sock.sendall(publish_packet(mqtt_str(topic), 1, payload))
        if (got := read_packet(sock)) is None:
            return "disconnected"
        kind, body = got[0] >> 4, got[1]
        if kind == 4:
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")
            rc = body[2] if len(body) > 2 else 0
            return "puback" if rc < 0x80 else f"puback_rc_{rc:#x}"
        return f"disconnect_rc_{body[0] if body else 0:#x}" if kind == 14 else f"packet_{kind}"


class Hostile:
    """Loops over every pill at `rate` msgs/s (weighted, seeded) on one raw MQTT connection (QoS
    1, at most 1,000 in flight); the raw bad-topic pill once a second on its own connections."""

    def __init__(self, port: int, rate: float, seed: int, skip: frozenset[str]) -> None:
        self.port, self.rate, self.rng = port, rate, random.Random(seed)
        self.pills = [p for p in PILLS if p.name not in skip]
        self.by_name = {p.name: p for p in self.pills}
        self.sent: Counter[str] = Counter()
        self.acked: Counter[str] = Counter()
        self.ack_rc: Counter[str] = Counter()  # "pill:rc" for non-success PUBACKs
        self.raw_outcomes: Counter[str] = Counter()
        self.flood_acked: set[str] = set()
        self.connects = self.disconnects = 0
        self.error = ""
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._inflight: dict[int, tuple[str, str]] = {}  # packet id -> (pill, topic)
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._run, self._raw)]

    def start(self) -> Hostile:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _acks(self, sock: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := sock.recv(1 << 16):
                packets, used = split_packets(buf := buf + data)
                for first, j, end in packets:
                    if first >> 4 == 14:
                        self.disconnects += 1
                    if first >> 4 != 4:
                        continue
                    rc = buf[j + 2] if end - j > 2 else 0
                    with self._lock:
                        name, topic = self._inflight.pop(struct.unpack_from("!H", buf, j)[0])
                    if rc >= 0x80:
                        self.ack_rc[f"{name}:{rc:#x}"] += 1
                        continue
                    self.acked[name] += 1
                    if self.by_name[name].outcome == "flood":
                        self.flood_acked.add(topic.split("/")[2])
                buf = buf[used:]

    def _run(self) -> None:
        try:
            sock, receive_max = connect(HOST, self.port, f"hostile-{time.time_ns()}")
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
            return
        self.connects += 1
        reader = threading.Thread(target=self._acks, args=(sock,), daemon=True)
        reader.start()
        names, weights = [p.name for p in self.pills], [p.weight for p in self.pills]
        try:
            start, n_sent, mid = time.monotonic(), 0, 0
            while not self._stop.is_set():
                due = int(self.rate * (time.monotonic() - start)) - n_sent
                parts = []
                for _ in range(max(0, min(due, 500, min(1000, receive_max) - len(self._inflight)))):
                    pill = self.by_name[self.rng.choices(names, weights)[0]]
                    topic = pill.topic(self.sent[pill.name])
                    with self._lock:
                        while (mid := mid % 65535 + 1) in self._inflight:
                            pass
                        self._inflight[mid] = (pill.name, topic)
                    parts.append(publish_packet(mqtt_str(topic), mid, pill.payload(time.time())))
                    self.sent[pill.name] += 1
                    n_sent += 1
                sock.sendall(b"".join(parts))
                time.sleep(0.01)
            deadline = time.monotonic() + 30
            while self._inflight and reader.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            sock.sendall(b"\xe0\x00")
        except Exception as e:  # reported, and the run fails
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            reader.join(timeout=5)
            sock.close()
            if self._inflight and not self.error:
                self.error = f"{len(self._inflight)} hostile publishes never acknowledged"

    def _raw(self) -> None:
        for n in itertools.count():
            if self._stop.wait(1.0):
                return
            try:
                out = raw_publish(self.port, RAW_TOPICS[n % 3], b'{"conf": 0.5}',
                                  f"hostile-raw-{time.time_ns()}")  # fmt: skip
            except OSError as e:
                out = f"error_{type(e).__name__}"
            self.raw_outcomes[out] += 1


class Watch:
    """What the hostile soak reads at each sample (the Sampler's `extra`): the agent's RSS, CPU
    and threads, its child processes, /healthz and /status; anything wrong goes to `problems`."""

    STATUS = (
        ("received", ("ingest", "received")), ("counted", ("ingest", "counted")),
        ("msgs_per_s_10s", ("ingest", "msgs_per_s_10s")), ("unacked", ("ingest", "unacked")),
        ("reconnects", ("mqtt", "reconnects")), ("connected", ("mqtt", "connected")),
        ("cameras", ("cameras", "count")), ("windows_open", ("aggregate", "windows_open")),
        ("outbox_chunks", ("outbox", "chunks")),
    )  # fmt: skip

    def __init__(self, agent: Agent, t0: float) -> None:
        assert agent.popen is not None
        self.agent, self.popen, self.pid, self.t0 = agent, agent.popen, agent.popen.pid, t0
        self.problems: list[str] = []

    def __call__(self, s: dict[str, Any], _prev: dict[str, Any] | None) -> None:
        t = s["t"] - self.t0
        proc, s["t"] = s.pop("agent", None), round(t, 1)
        if not self.agent.running:
            self.problems.append(f"t={t:.1f}s agent not running (exit {self.popen.poll()})")
            return
        if proc is None:
            self.problems.append(f"t={t:.1f}s /proc/{self.pid} unreadable")
        else:
            s.update(rss_kb=proc["rss_kb"], cpu_s=proc["cpu_s"], threads=proc["threads"])
        kids: list[str] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids += (task / "children").read_text().split()
        s["children"] = len(kids)
        if kids:
            self.problems.append(f"t={t:.1f}s agent has child processes {kids}")
        got = self.agent._get("/healthz")  # devtools.procs: (status, JSON body) or None
        s["healthz"] = got[0] if got else None
        if s["healthz"] != 200:
            self.problems.append(f"t={t:.1f}s /healthz answered {s['healthz']}")
        st = self.agent.status() or {}
        s.update({key: dig(st, *path) for key, path in self.STATUS})
        s["rejects"] = dig(st, "ingest", "rejects") or {}
        if s["reconnects"]:
            self.problems.append(f"t={t:.1f}s mqtt.reconnects = {s['reconnects']}")


def window_median(samples: list[dict[str, Any]], lo: float, hi: float) -> float | None:
    vals = [s["rss_kb"] for s in samples if "rss_kb" in s and lo <= s["t"] < hi]
    return statistics.median(vals) if vals else None


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"checks": {}, "failures": []}
    checks: dict[str, bool] = res["checks"]
    try:
        with site(workdir, test_config=True, gateway_id=GATEWAY,
                  client_id="edge-agent-hostile-soak", mqtt={"max_payload_bytes": MAX_PAYLOAD},
                  aggregate={"max_cameras": args.max_cameras}, streams=STREAMS,
                  ) as (broker, receiver, agent):  # fmt: skip
            res["config"] = (workdir / "agent.toml").read_text()
            apid = res["agent_pid"] = pid(agent)
            say(f"agent pid {apid}, broker :{broker.port}, receiver :{receiver.port}, "
                f"health :{agent.health_port}, workdir {workdir}")  # fmt: skip
            t0 = time.monotonic()
            watch = Watch(agent, t0)
            sampler = Sampler({"agent": apid}, args.sample_s, extra=watch)
            sampler.start()
            pub = Publisher(broker, workdir, cameras=args.cameras, rate=args.rate_per_camera,
                            duration_s=args.duration_s, seed=args.seed).start()  # fmt: skip
            wait_for(lambda: (dig(agent.status(), "ingest", "counted") or 0) > 0, timeout_s=30,
                     what="honest traffic counted")  # fmt: skip
            hostile = Hostile(broker.port, args.hostile_rate, args.seed, frozenset(args.skip_pills))
            hostile.start()
            say(f"honest cameras publishing ({args.cameras} x {args.rate_per_camera:g}/s), "
                f"hostile publisher started ({args.hostile_rate:g}/s)")  # fmt: skip
            next_line = time.monotonic() + 30
            while time.monotonic() < t0 + args.duration_s and agent.running:
                time.sleep(0.2)
                if time.monotonic() >= next_line:
                    next_line += 30
                    s = sampler.samples[-1]
                    say(f"  t={s['t']:6.1f}s rss={s.get('rss_kb', 0) / 1024:6.1f} MiB "
                        f"rate10s={s.get('msgs_per_s_10s')} cameras={s.get('cameras')} "
                        f"rejects={sum((s.get('rejects') or {}).values())} "
                        f"reconnects={s.get('reconnects')} "
                        f"hostile_sent={sum(hostile.sent.values())}")  # fmt: skip
            hostile.stop()
            res["hostile_stopped_at_s"] = round(time.monotonic() - t0, 1)
            expected = pub.join()
            res["honest_summary"] = pub.summary
            honest_ids = {camera_name(i) for i in range(args.cameras)}

            def delivered() -> bool:  # everything the agent counted is at the receiver, none open
                st = agent.status()
                return idle(st) and receiver.messages() == dig(st, "ingest", "counted")

            try:
                wait_for(delivered, timeout_s=90, poll_s=0.5,
                         what="delivery of every counted message")  # fmt: skip
            except TimeoutError as e:
                res["failures"].append(str(e))
            sampler.stop()
            sampler.take()
            final = res["final_status"] = agent.status() or {}
            samples = res["samples"] = sampler.samples
            checks["same agent pid, never exited"] = (
                agent.running and pid(agent) == apid
                and not any("not running" in p for p in watch.problems)
            )  # fmt: skip
            checks["the agent is one process (no child processes at any sample)"] = all(
                not s.get("children") for s in samples
            )
            checks["/healthz 200 at every sample"] = all(s.get("healthz") == 200 for s in samples)
            checks["mqtt.reconnects 0 throughout"] = (
                all(not s.get("reconnects") for s in samples)
                and dig(final, "mqtt", "reconnects") == 0)  # fmt: skip
            res["agent_exit"] = agent.stop(timeout_s=30)
            checks["agent exit 0 on SIGTERM"] = res["agent_exit"] == 0

            # -- honest: exact per (camera, stream, second)
            merged = load_merged(receiver.db)
            cmp = compare(expected, {k: c for k, c in merged.items() if k[0] in honest_ids})
            res["honest"] = {
                "published": pub.summary.get("published"),
                "acked_by_broker": pub.summary.get("acked"), "expected": cmp.expected_messages,
                "received": cmp.received_messages, "missing": cmp.missing,
                "duplicated": cmp.duplicated, "mismatched_rows": cmp.mismatched_rows[:10],
                "rate_msgs_per_s": pub.summary.get("rate_msgs_per_s"),
            }  # fmt: skip
            checks["honest exact (missing 0, duplicated 0, rows equal)"] = (
                cmp.exact and sum(e.count for e in expected.values()) > 0
            )
            gw = receiver.stats().get("gateways", {}).get(GATEWAY, {})
            res["receiver"] = {k: gw.get(k) for k in ("gaps", "out_of_order", "duplicates")}
            checks["receiver: no seq gap, none out of order"] = not gw.get("gaps") and not gw.get(
                "out_of_order"
            )
            judge_pills(res, hostile, merged, honest_ids, final, args.skip_pills)
            checks["no honest or hostile publisher reconnect"] = (
                not pub.summary.get("reconnects") and hostile.connects == 1
            )
            resources(res, samples, args.duration_s)
            res["sampler_problems"] = watch.problems[:20]
            res["broker_malformed_disconnects"] = broker.log_text().count(
                "disconnected due to malformed packet"
            )
            alog = agent.log_text()
            res["agent_log"] = {"lines": alog.count("\n"), "bytes": len(alog.encode())}
            res["cameras_forgotten_at_cap"] = (
                dig(final, "aggregate", "cameras_forgotten_at_cap") or 0
            )
    except Exception as e:
        res["failures"].append(f"{type(e).__name__}: {e}")
        (workdir / "traceback.txt").write_text(traceback.format_exc())
    res["ok"] = bool(checks) and all(checks.values()) and not res["failures"]
    return res


def resources(res: dict[str, Any], samples: list[dict[str, Any]], duration_s: float) -> None:
    """RSS (first and last window), CPU, threads, cameras and ingest rate over the samples."""
    win = 60.0 if duration_s >= 180 else duration_s / 3
    last_end = res["hostile_stopped_at_s"]
    first = window_median(samples, 0, win)
    last = window_median(samples, last_end - win, last_end + 0.01)
    rss_all = [s["rss_kb"] for s in samples if "rss_kb" in s]
    cpu = [(s["t"], s["cpu_s"]) for s in samples if "cpu_s" in s]
    cpu_pct = [100 * (b[1] - a[1]) / (b[0] - a[0])
               for a, b in itertools.pairwise(cpu) if b[0] > a[0]]  # fmt: skip
    busy = [(t, c) for t, c in cpu if t <= last_end]
    rates = [s["msgs_per_s_10s"] for s in samples
             if s.get("msgs_per_s_10s") and 15 <= s["t"] <= last_end]  # fmt: skip
    res["resources"] = {
        "window_s": win,
        "rss_first_median_mib": round(first / 1024, 1) if first else None,
        "rss_last_median_mib": round(last / 1024, 1) if last else None,
        "rss_max_mib": round(max(rss_all) / 1024, 1) if rss_all else None,
        "rss_min_mib": round(min(rss_all) / 1024, 1) if rss_all else None,
        "cpu_mean_pct": round(100 * (busy[-1][1] - busy[0][1]) / (busy[-1][0] - busy[0][0]), 1)
        if len(busy) > 1 and busy[-1][0] > busy[0][0] else None,
        "cpu_max_pct": round(max(cpu_pct), 1) if cpu_pct else None,
        "threads_max": max((s.get("threads", 0) for s in samples), default=0),
        "samples": len(samples),
        "cameras_max": max((s.get("cameras") or 0 for s in samples), default=0),
        "msgs_per_s_10s_median": statistics.median(rates or [0]),
    }  # fmt: skip
    res["checks"]["RSS flat (last-window median <= first-window median + 10 % + 8 MiB)"] = bool(
        first and last and last <= first * 1.10 + 8 * 1024
    )


def judge_pills(
    res: dict[str, Any], hostile: Hostile, merged: dict[Any, Any], honest_ids: set[str],
    final: dict[str, Any], skip: list[str],
) -> None:  # fmt: skip
    """Every pill under its reason: the reject table, the pill rows and their checks."""
    checks = res["checks"]
    per_camera: Counter[str] = Counter()
    for (camera, _s, _t), c in merged.items():
        if camera not in honest_ids:
            per_camera[camera] += c.count
    res["hostile"] = {
        "sent": dict(hostile.sent), "acked": dict(hostile.acked),
        "non_success_pubacks": dict(hostile.ack_rc), "raw_bad_topic": dict(hostile.raw_outcomes),
        "connects": hostile.connects, "disconnects": hostile.disconnects, "error": hostile.error,
    }  # fmt: skip
    checks["hostile publisher: every publish acked, one connection"] = (
        not hostile.error and hostile.connects == 1 and not hostile.ack_rc
    )
    rejects: dict[str, int] = dig(final, "ingest", "rejects") or {}
    agg: dict[str, int] = final.get("aggregate", {})
    want_rejects: Counter[str] = Counter()
    want_side: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    for p in hostile.pills:
        n = hostile.acked[p.name]
        row: dict[str, Any] = {"pill": p.name, "acked": n, "expect": p.outcome}
        if p.outcome.startswith("reject:"):
            want_rejects[p.outcome.split(":", 1)[1]] += n
        elif p.outcome == "counted":
            row.update(
                at_cloud=per_camera.get(p.camera, 0),
                expect="counted"
                + (" + " + ", ".join(f"{k}×{v}" for k, v in p.side.items()) if p.side else ""),
            )
            row["ok"] = row["at_cloud"] == n
            want_side.update({k: v * n for k, v in p.side.items()})
        elif p.outcome == "flood":
            row.update(at_cloud=sum(c for cam, c in per_camera.items() if cam.startswith("flood-")),
                       too_many_cameras=rejects.get("too_many_cameras", 0),
                       expect="counted or too_many_cameras")  # fmt: skip
            row["ok"] = row["at_cloud"] + row["too_many_cameras"] == n
        rows.append(row)
    raw_puback = hostile.raw_outcomes.get("puback", 0)
    want_rejects["bad_topic_encoding"] += raw_puback
    res["pill_rows"] = rows
    res["flood_ids_acked"] = len(hostile.flood_acked)
    res["flood_ids_at_cloud"] = sum(1 for c in per_camera if c.startswith("flood-"))
    # The reject table: every reason the agent reports, against what the pills predict.
    flood = next((r for r in rows if r["expect"] == "counted or too_many_cameras"), None)
    table: list[dict[str, Any]] = []
    for reason in sorted(set(rejects) | set(want_rejects) | {"too_many_cameras"}):
        got = rejects.get(reason, 0)
        if reason == "too_many_cameras":
            table.append({"reason": reason, "agent": got, "pills": "flood rest",
                          "ok": flood["ok"] if flood else not got})  # fmt: skip
        else:
            table.append({"reason": reason, "agent": got, "pills": want_rejects.get(reason, 0),
                          "ok": got == want_rejects.get(reason, 0)})  # fmt: skip
    table += [{"reason": f"aggregate.{k}", "agent": agg.get(k, 0), "pills": want_side[k],
               "ok": agg.get(k, 0) == want_side[k]} for k in SIDE_COUNTERS]  # fmt: skip
    res["reject_table"] = table
    checks["every reject reason equals its pills"] = all(r["ok"] for r in table)
    checks["every counted pill at the cloud once, under its camera"] = all(
        r.get("ok", True) for r in rows
    )
    far = hostile.acked["oversized_far_over_1MiB"]
    # The agent's received = honest + hostile acked (but what the broker drops) + raw acked.
    want_received = int(res["honest_summary"].get("acked", 0)) + (
        sum(hostile.acked.values()) - far + raw_puback
    )
    got_received = dig(final, "ingest", "received")
    res["received"] = {"agent": got_received, "expected": want_received}
    checks["agent received = honest + hostile delivered"] = got_received == want_received
    checks["far-over payloads: acked by the broker, received by nobody"] = (
        far > 0 or "oversized_far_over_1MiB" in skip
    ) and got_received == want_received
    checks["no internal_error"] = not rejects.get("internal_error")


# -- output -------------------------------------------------------------------------------------


MD = """# Hostile-camera soak (`bench/hostile_soak.py`)

Honest cameras (the camera simulator, its ground truth) mixed with every known hostile
payload for minutes, with real processes: Mosquitto, the reference receiver, the agent.
See the script's docstring for what is judged and how.

- date: {res[date]}
- commit (when the agent started): {res[commit]}
- command: `.venv/bin/python -m bench.hostile_soak {argv}`
- machine: {m[nproc]} × {m[cpu_model]}, {m[ram_gib]} GiB RAM, kernel {m[kernel]}, \
Python {m[python]}, {m[mosquitto]}; load average at the end {m[loadavg]}
- parameters: {a.duration_s:g} s; honest {a.cameras} cameras × {a.rate_per_camera:g} msgs/s \
(= {honest_rate:g} msgs/s); hostile {a.hostile_rate:g} msgs/s over {pills} pills + 1 raw \
bad-topic publish/s; aggregate.max_cameras = {a.max_cameras}; mqtt.max_payload_bytes = \
{max_payload}; seed {a.seed}{skipped}
- result: **{result}**

## Figures

| figure | value |
|---|---|
| honest messages acked by the broker | {h[acked_by_broker]} ({h[rate_msgs_per_s]} msgs/s) |
| honest at the cloud / missing / duplicated / mismatched rows | {h[received]} / {h[missing]} \
/ {h[duplicated]} / {mismatched} |
| hostile messages acked by the broker | {hostile_acked} |
| agent received (expected) | {rcv[agent]} ({rcv[expected]}) |
| agent ingest rate, median of 10 s rates | {r[msgs_per_s_10s_median]} msgs/s |
| RSS median, first {r[window_s]:g} s | {r[rss_first_median_mib]} MiB |
| RSS median, last {r[window_s]:g} s | {r[rss_last_median_mib]} MiB |
| RSS min / max | {r[rss_min_mib]} / {r[rss_max_mib]} MiB |
| agent CPU mean / max ({a.sample_s:g} s samples) | {r[cpu_mean_pct]} % / {r[cpu_max_pct]} % \
of one core |
| agent threads (max) | {r[threads_max]} |
| cameras tracked (max) | {r[cameras_max]} |
| flood camera ids acked / at the cloud | {res[flood_ids_acked]} / {res[flood_ids_at_cloud]} |
| cameras forgotten at the cap | {res[cameras_forgotten_at_cap]} |
| agent log over the run | {log[lines]} lines, {log[bytes]} bytes (warnings rate-limited) |
| MQTT reconnects | {reconnects} |
| agent pid / exit code on SIGTERM | {res[agent_pid]} / {res[agent_exit]} |
| receiver seq gaps / out of order | {res[receiver]} |

## Reject table

| reason | agent | pills predict | |
|---|---|---|---|
{reject_rows}

## Pills

| pill | acked | expected | at the cloud |
|---|---|---|---|
{pill_rows}

Raw publishes with invalid UTF-8 in the topic: {raw}; Mosquitto's log: \
{res[broker_malformed_disconnects]} × "disconnected due to malformed packet" — Mosquitto \
checks topic UTF-8 and drops the connection, so `bad_topic_encoding` cannot reach the agent \
through it.

A payload far over `mqtt.max_payload_bytes` (`oversized_far_over_1MiB`) is acknowledged to the \
publisher and dropped by the broker for the agent (Maximum Packet Size): it appears in no counter \
(README, "Oversized messages are dropped by the broker").

## Checks

{checks}

## RSS timeline (MiB, every sample)

```
{timeline}
```
"""


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    """bench/HOSTILE_SOAK.md, also printed at the end of a run."""
    pts = [f"{s['t']:.0f}s:{s['rss_kb'] / 1024:.1f}" for s in res.get("samples", [])
           if "rss_kb" in s]  # fmt: skip
    pills = [(p, f" (+ {p['too_many_cameras']} too_many_cameras)" if "too_many_cameras" in p
              else "") for p in res.get("pill_rows", [])]  # fmt: skip
    return MD.format(
        res=Nones(res), argv=" ".join(res["argv"]), m=machine_description(), a=args,
        honest_rate=args.cameras * args.rate_per_camera, pills=len(res.get("pill_rows", [])),
        max_payload=MAX_PAYLOAD, result="OK" if res["ok"] else "FAIL",
        skipped=f"; pills left out: {', '.join(args.skip_pills)}" if args.skip_pills else "",
        h=Nones(res.get("honest", {})), r=Nones(res.get("resources", {"window_s": 0})),
        rcv=Nones(res.get("received", {})), log=Nones(res.get("agent_log", {})),
        mismatched=len(dig(res, "honest", "mismatched_rows") or []),
        hostile_acked=sum((dig(res, "hostile", "acked") or {}).values()),
        reconnects=dig(res, "final_status", "mqtt", "reconnects"),
        reject_rows="\n".join(f"| {t['reason']} | {t['agent']} | {t['pills']} | "
                              f"{'ok' if t['ok'] else 'MISMATCH'} |"
                              for t in res.get("reject_table", [])),
        pill_rows="\n".join(f"| {p['pill']} | {p['acked']} | {p['expect']} | "
                            f"{p.get('at_cloud', '')}{flood} |" for p, flood in pills),
        raw=dig(res, "hostile", "raw_bad_topic"),
        checks="\n".join([f"- [{'x' if v else ' '}] {k}" for k, v in res["checks"].items()]
                         + [f"- FAILURE: {f}" for f in res["failures"]]
                         + [f"- sampler: {p}" for p in res.get("sampler_problems", [])]),
        timeline="\n".join("  ".join(pts[i : i + 10]) for i in range(0, len(pts), 10)),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "", quick=False)
    p.add_argument("--duration-s", type=float, default=300.0)
    p.add_argument("--cameras", type=int, default=100, help="honest cameras")
    p.add_argument("--rate-per-camera", type=float, default=25.0, help="honest msgs/s each")
    p.add_argument("--hostile-rate", type=float, default=300.0, help="hostile msgs/s")
    p.add_argument("--max-cameras", type=int, default=400, help="aggregate.max_cameras")
    p.add_argument("--sample-s", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--skip-pills",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        help="comma-separated pill names to leave out (to bisect a finding)",
    )
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--no-md", action="store_true", help="do not write bench/HOSTILE_SOAK.md")
    p.add_argument("--md", type=Path, default=BENCH / "HOSTILE_SOAK.md")
    args = p.parse_args(argv)
    workdir = OUT / "hostile_soak" / time.strftime("%Y%m%d-%H%M%S")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    say(f"hostile soak: {args.duration_s:g} s, {args.cameras} honest cameras x "
        f"{args.rate_per_camera:g}/s, hostile {args.hostile_rate:g}/s, "
        f"max_cameras {args.max_cameras}, seed {args.seed}")  # fmt: skip
    started = time.monotonic()
    # The commit the agent process loads, taken before it starts (agent/ may change meanwhile).
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = machine_description()["agent_commit"]
    res = run(args, workdir)
    res.update(date=date, commit=commit, argv=sys.argv[1:] if argv is None else argv,
               wall_s=round(time.monotonic() - started, 1))  # fmt: skip
    text = report(res, args)
    say(f"\n{text}\nRESULT: {'OK' if res['ok'] else 'FAIL'}; wall time {res['wall_s']} s; "
        f"workdir {workdir}")  # fmt: skip
    write_json(workdir / "result.json", res)
    write_json(args.json_out, res)
    if not args.no_md:
        args.md.write_text(text)
        say(f"wrote {args.md}")
    if res["ok"] and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the children on SIGTERM
    sys.exit(main())

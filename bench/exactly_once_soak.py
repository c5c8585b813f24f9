"""Exactly-once soak: end-to-end proofs with real processes, each scenario run N times in a row.

    .venv/bin/python -m bench.exactly_once_soak --scenario ack-pressure --runs 20
    .venv/bin/python -m bench.exactly_once_soak --scenario sigterm-slow-fsync --runs 20
    .venv/bin/python -m bench.exactly_once_soak --scenario tiny-quota-late-cloud --seed 7 --runs 1

Every run starts its own Mosquitto and reference receiver on free loopback ports, a fresh outbox,
the agent as a child process (`edge-agent run`), and the camera simulator; it ends with a final
SIGTERM of the agent (windows closed, drained) and compares the receiver's merged table with the
ground truth computed from every publish the broker acknowledged (devtools.truth).

Scenarios (each run bounded: RUN_BUDGET_S):

- ack-pressure: mqtt.receive_maximum = 100; 40 cameras at 800 msgs/s for 15 s; five agent
  restarts at seeded random moments (3 SIGTERM, 2 SIGKILL). Exact per (camera, stream, second).
- tiny-quota-late-cloud: buffer.max_bytes = 2MiB, forward.timeout_s = 1; 60 cameras at
  1,500 msgs/s for 15 s; the cloud answers 503 for 8 s, then for 8 s answers after 900-1300 ms
  (re-drawn every 0.5 s: some answers within the timeout, some after it, the batch landing
  anyway), then normally. Compacted chunks cover 10/60 s: exact per (camera, stream).
- sigterm-slow-fsync: buffer.synchronous = full, every fsync/fdatasync of the agent 20-100 ms
  slower (tests/tools/slowfsync.c, an LD_PRELOAD shim given to the agent process only);
  100 cameras at 2,000 msgs/s for 20 s; 8 SIGTERM restarts at seeded random moments. Exact per
  (camera, stream, second).

One line per run (scenario, seed, published, received, missing, duplicated, restarts, duration),
then a summary. A failed run keeps its working directory under bench/out/exactly_once/ and prints
its seed and an excerpt of the agent's log.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.sim.cloud import load_merged
from bench.common import OUT, dig, parser, respawn, say, start_agent, write_json
from devtools.procs import Agent, Mosquitto, Publisher, Receiver, merged, wait_for
from devtools.truth import compare, compare_per_stream
from tests.shims import build

RUN_BUDGET_S = 60.0
GATEWAY = "gw-soak"


@dataclass
class Scenario:
    name: str
    cameras: int
    rate_per_camera: float
    duration_s: float
    # Restart kinds in schedule order are drawn from this multiset ("TERM" / "KILL").
    restarts: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)  # over the test agent's config
    per_stream: bool = False
    slow_fsync: bool = False
    late_cloud: bool = False


SCENARIOS = {
    "ack-pressure": Scenario(
        "ack-pressure", cameras=40, rate_per_camera=20, duration_s=15,
        restarts=("TERM", "TERM", "TERM", "KILL", "KILL"),
        config={"mqtt": {"receive_maximum": 100}},
    ),
    "tiny-quota-late-cloud": Scenario(
        "tiny-quota-late-cloud", cameras=60, rate_per_camera=25, duration_s=15,
        config={"buffer": {"max_bytes": "2MiB"}, "forward": {"timeout_s": 1}},
        per_stream=True, late_cloud=True,
    ),
    "sigterm-slow-fsync": Scenario(
        "sigterm-slow-fsync", cameras=100, rate_per_camera=20, duration_s=20,
        restarts=("TERM",) * 8, config={"buffer": {"synchronous": "full"}}, slow_fsync=True,
    ),
}  # fmt: skip


@dataclass
class RunResult:
    scenario: str
    seed: int
    ok: bool = False
    published: int = 0
    acked_by_broker: int = 0
    received: int = 0
    missing: int = 0
    duplicated: int = 0
    mismatched_rows: int = 0
    restarts: int = 0
    restart_schedule: list[str] = field(default_factory=list)
    gaps: int = 0
    out_of_order: int = 0
    final_exit: int | None = None
    duration_s: float = 0.0
    error: str = ""
    workdir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"{self.scenario:22s} seed={self.seed:<6d} published={self.acked_by_broker:<6d} "
            f"received={self.received:<6d} missing={self.missing:<4d} "
            f"duplicated={self.duplicated:<4d} restarts={self.restarts} "
            f"gaps={self.gaps} ooo={self.out_of_order} exit={self.final_exit} "
            f"duration={self.duration_s:5.1f}s {'OK' if self.ok else 'FAIL'}"
            + (f" ({self.error})" if self.error else "")
        )


def plans(sc: Scenario, rng: random.Random, res: RunResult) -> list[tuple[float, Any]]:
    """The run's schedule, drawn before anything runs so the seed alone decides it: (seconds
    after the publishing starts, a restart kind or the receiver's fault settings)."""
    kinds = list(sc.restarts)
    rng.shuffle(kinds)
    moments = sorted(rng.uniform(1.0, sc.duration_s - 1.0) for _ in kinds)
    res.restart_schedule = [f"{k}@{t:.1f}s" for t, k in zip(moments, kinds, strict=True)]
    plan: list[tuple[float, Any]] = list(zip(moments, kinds, strict=True))
    if sc.late_cloud:
        down_s, slow_s = rng.uniform(7.5, 8.5), rng.uniform(7.5, 8.5)
        plan += [
            (0.0, {"status": 503}),
            (down_s, {"status": None, "delay_ms": rng.uniform(900, 1300)}),
        ]
        t = down_s
        while t + 0.5 < down_s + slow_s:
            t += 0.5
            plan.append((t, {"delay_ms": rng.uniform(900, 1300)}))
        plan.append((down_s + slow_s, {"delay_ms": 0}))
        res.extra["cloud"] = f"503 for {down_s:.1f}s, slow for {slow_s:.1f}s"
    return sorted(plan, key=lambda x: x[0])


def execute(sc: Scenario, res: RunResult, work: Path, shim: Path | None, procs: list[Any]) -> None:
    started = time.monotonic()

    def left() -> float:
        return max(0.5, started + RUN_BUDGET_S - time.monotonic())

    def sample_outbox() -> None:  # peak outbox usage and compaction seen during the run
        ob = (agent.status() or {}).get("outbox", {})
        x, usage = res.extra, float(ob.get("usage_of_max_bytes") or 0.0)
        x["peak_usage"] = round(max(x.get("peak_usage", 0.0), usage), 3)
        x["peak_chunks"] = max(x.get("peak_chunks", 0), ob.get("chunks", 0))

    broker = Mosquitto(work / "mosquitto").start()
    receiver = Receiver(work / "cloud").start()
    procs += [receiver, broker]
    plan = plans(sc, random.Random(res.seed), res)
    if plan and plan[0][0] == 0.0 and isinstance(plan[0][1], dict):
        receiver.fault(**plan.pop(0)[1])
    env = {"LD_PRELOAD": str(shim)} if shim is not None else None  # the agent process only
    agent = start_agent(work, broker.port, receiver.url, test_config=True, env=env,
                        gateway_id=GATEWAY, client_id="edge-agent-test", **sc.config)  # fmt: skip
    procs.append(agent)
    pub = Publisher(broker, work, cameras=sc.cameras, rate=sc.rate_per_camera,
                    duration_s=sc.duration_s, seed=res.seed).start()  # fmt: skip
    t0, sampled = time.monotonic() + 0.5, 0.0  # the simulator publishes half a second later
    while plan:
        now = time.monotonic() - t0
        if now >= plan[0][0]:
            what = plan.pop(0)[1]
            if isinstance(what, dict):
                receiver.fault(**what)
                continue
            if what == "KILL":
                agent.kill()
            else:
                agent.signal(signal.SIGTERM)
                if (code := agent.wait(timeout_s=min(20.0, left()))) != 0:
                    raise RuntimeError(f"agent exited {code} after SIGTERM")
            res.restarts += 1
            agent = respawn(agent)
            procs.append(agent)
            continue
        if sc.late_cloud and time.monotonic() - sampled >= 0.25:
            sampled = time.monotonic()
            sample_outbox()
        time.sleep(max(0.0, min(0.05, plan[0][0] - now)))
        if time.monotonic() > started + RUN_BUDGET_S:
            raise TimeoutError("run budget spent before the schedule was done")
    while sc.late_cloud and pub.running:
        sample_outbox()
        pub.wait(0.25)
    expected = pub.join()
    res.published = int(pub.summary.get("published", 0))
    res.acked_by_broker = int(pub.summary.get("acked", 0))
    want = sum(e.count for e in expected.values())
    try:
        wait_for(lambda: receiver.messages() >= want, timeout_s=max(0.5, left() - 8),
                 what=f"{want} messages at the receiver")  # fmt: skip
    except TimeoutError as e:
        res.error = str(e)
    st = agent.status() or {}
    res.extra["last_agent"] = {k: dig(st, section, k) for section, k in (
        ("outbox", "snapshots_written"), ("outbox", "compacted_chunks"),
        ("ingest", "redelivered_skipped"), ("forward", "batches_failed"))}  # fmt: skip
    agent.signal(signal.SIGTERM)
    try:
        res.final_exit = agent.wait(timeout_s=min(10.0, left()))
    except subprocess.TimeoutExpired:
        res.error = "; ".join(x for x in (res.error, "final SIGTERM hung") if x)
    c = (compare_per_stream if sc.per_stream else compare)(expected, load_merged(receiver.db))
    res.received, res.missing, res.duplicated = c.received_messages, c.missing, c.duplicated
    res.mismatched_rows = len(c.mismatched_rows)
    if c.mismatched_rows:
        res.extra["mismatched"] = c.mismatched_rows[:10]
    gw = receiver.stats().get("gateways", {}).get(GATEWAY, {})
    res.gaps, res.out_of_order = int(gw.get("gaps", 0)), int(gw.get("out_of_order", 0))
    res.extra["cloud_duplicates"] = int(gw.get("duplicates", 0))
    res.ok = (
        c.expected_messages > 0 and c.exact and res.gaps == 0 and res.out_of_order == 0
        and res.final_exit == 0 and res.restarts == len(sc.restarts) and not res.error
    )  # fmt: skip


def log_excerpt(workdir: Path, lines: int = 40) -> str:
    try:
        text = (workdir / "agent.log").read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no agent log)"
    keys = ("error", "warn", "fault", "traceback", "shim", "shutdown", "outbox ", "exception")
    hits = [ln for ln in text if any(k in ln.lower() for k in keys)]
    return "\n".join((hits[-lines:] if hits else []) + ["-- last lines --"] + text[-15:])


def one_run(sc: Scenario, seed: int, shim: Path | None, keep: bool) -> RunResult:
    workdir = OUT / "exactly_once" / sc.name / f"seed-{seed}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    res, started = RunResult(sc.name, seed, workdir=str(workdir)), time.monotonic()
    procs: list[Any] = []
    try:
        execute(sc, res, workdir, shim, procs)
    except Exception as e:  # a run that could not finish is a failed run, with its evidence
        res.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        (workdir / "traceback.txt").write_text(traceback.format_exc())
        res.ok = False
    finally:
        for p in reversed(procs):
            if isinstance(p, Agent):
                p.kill()
            else:
                p.stop(timeout_s=5)
        res.duration_s = round(time.monotonic() - started, 1)
    if shim is not None:  # what the shim did, from each agent's exit line (SIGTERM exits only)
        calls = slept = 0.0
        for ln in (workdir / "agent.log").read_text(errors="replace").splitlines():
            if ln.startswith("slow-fsync shim: "):
                parts = ln.split()
                calls, slept = calls + float(parts[2]), slept + float(parts[4])
        res.extra.update(fsync_calls_slowed=int(calls), fsync_ms_added=int(slept))
    if res.ok and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        (workdir / "result.json").write_text(json.dumps(asdict(res), indent=2))
    return res


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "", quick=False)
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, help="seed of the first run (the next runs add 1)")
    p.add_argument("--keep", action="store_true", help="keep the working directory of good runs")
    p.add_argument("--max-bytes", help='override buffer.max_bytes (e.g. "1MiB"), for a variant run')
    args = p.parse_args(argv)
    sc = SCENARIOS[args.scenario]
    if args.max_bytes:
        sc = replace(sc, config=merged(sc.config, {"buffer": {"max_bytes": args.max_bytes}}))
    first = args.seed if args.seed is not None else time.time_ns() % 100_000
    say(f"exactly-once soak: {sc.name}, {args.runs} runs, seeds {first}..{first + args.runs - 1}")
    say(f"  {sc}")
    tmp = Path(tempfile.mkdtemp(prefix="eo-shim-"))
    results: list[RunResult] = []
    failures: list[tuple[RunResult, str]] = []
    try:
        shim = build("slowfsync.c", tmp / "slowfsync.so") if sc.slow_fsync else None
        for seed in range(first, first + args.runs):
            r = one_run(sc, seed, shim, args.keep)
            results.append(r)
            extra = f" schedule={','.join(r.restart_schedule)}" if r.restart_schedule else ""
            extra += f" cloud=[{r.extra['cloud']}]" if "cloud" in r.extra else ""
            say(r.line() + extra)
            if not r.ok:
                failures.append((r, excerpt := log_excerpt(Path(r.workdir))))
                say(f"  FAILED seed {seed}; evidence kept in {r.workdir}")
                if r.extra.get("mismatched"):
                    say("  " + "\n  ".join(r.extra["mismatched"]))
                say("  agent log excerpt:\n    " + excerpt.replace("\n", "\n    "))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    durations, ok = [r.duration_s for r in results], sum(r.ok for r in results)
    s = {
        "scenario": sc.name, "runs": len(results), "ok": ok, "failed": len(results) - ok,
        "failed_seeds": [r.seed for r in results if not r.ok],
        "published_total": sum(r.acked_by_broker for r in results),
        "restarts_total": sum(r.restarts for r in results),
        "duration_min_s": min(durations), "duration_median_s": statistics.median(durations),
        "duration_max_s": max(durations),
    }  # fmt: skip
    say(
        f"SUMMARY {sc.name}: {s['ok']}/{s['runs']} exact, {s['failed']} failed"
        + (f" (seeds {s['failed_seeds']})" if s["failed_seeds"] else "")
        + f"; duration min/median/max {s['duration_min_s']:.1f}/{s['duration_median_s']:.1f}/"
        f"{s['duration_max_s']:.1f} s; {s['published_total']} messages, "
        f"{s['restarts_total']} restarts"
    )
    write_json(args.json_out, {
        "summary": s, "runs": [asdict(r) for r in results],
        "failures": [{"seed": r.seed, "log_excerpt": e} for r, e in failures],
    })  # fmt: skip
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

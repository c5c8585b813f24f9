"""Ingest ceiling: the highest rate the agent sustains end to end with zero loss.

For each rate of a ladder, a fresh private Mosquitto is started with one consumer, and
publishers in separate processes (bench.loadgen; `--generator sim` uses the camera simulator
instead) publish at that rate for N s at QoS 1 over 300 cameras x 3 streams. Consumers, run one
after the other at every rate (so machine noise hits them alike):

  agent          the agent (shipped defaults, idle_close_s = 2 to end runs sooner) forwarding
                 to the reference receiver; delivered = sum of counts stored by the receiver
  bare_aiomqtt   baseline: bench.bare_sub, one aiomqtt client that only counts
  mosquitto_sub  baseline: the broker's own C client, `mosquitto_sub -q 1`

A step passes ("sustained") when
  - the generator offered >= 97 % of the target rate (otherwise the step is generator-limited
    and says nothing about the consumer),
  - at the end of the N s the consumer was at most 0.1 x N s of traffic behind (it kept up:
    its capacity is >= 90 % of the rate), and
  - every message the broker acknowledged to the publishers was counted by the consumer
    (agent: stored at the receiver) within the grace period after publishing ended
    (3 s; agent: idle_close + allowed lateness + 8 s, the time its last windows need).
The ceiling is the highest offered rate of a passing step; after the first failure the ladder
is bisected between the last pass and the failure.

    python -m bench.ingest_ceiling [--quick] [--duration S] [--rates 5000,10000,...]
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    BareSub,
    MosqSub,
    Mosquitto,
    Receiver,
    Report,
    Sampler,
    agent_figure,
    fmt_rate,
    fresh_dir,
    kill_quietly,
    parser,
    ratio,
    say,
    start_agent,
)
from bench.loadgen import LoadOptions, run_load

CONSUMERS = ("agent", "bare_aiomqtt", "mosquitto_sub")
IDLE_CLOSE_S = 2.0
ALLOWED_LATENESS_S = 2.0  # the shipped default
KEEPUP_LAG_FRACTION = 0.1  # of N: at most 0.1 x N s of traffic behind (capacity >= 90 %)
GRACE_S = 3.0
AGENT_GRACE_S = IDLE_CLOSE_S + ALLOWED_LATENESS_S + 8.0
MIN_OFFERED = 0.97


def generate(port: int, rate: float, duration_s: float, generator: str) -> dict[str, Any]:
    """Run the publishers (blocking); totals with `published`, `acked`, `cpu_s`."""
    if generator == "sim":
        import resource

        from agent.sim.cameras import SimOptions, run_simulation

        procs = max(2, math.ceil(rate / 4000))
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s = run_simulation(
            SimOptions(port=port, cameras=300, rate=rate / 300, duration_s=duration_s,
                       processes=procs, drain_timeout_s=20)
        )  # fmt: skip
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s["cpu_s"] = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        s["target"] = int(rate * duration_s)
        s["processes"] = procs
        s["window_waits"] = 0
        return s
    procs = max(1, math.ceil(rate / 40_000))
    return run_load(
        LoadOptions(port=port, cameras=300, rate=rate, duration_s=duration_s, processes=procs)
    )


def run_step(
    consumer: str, rate: float, duration_s: float, work: Path, generator: str
) -> dict[str, Any]:
    d = work / f"{consumer}-{int(rate)}"
    d.mkdir(parents=True, exist_ok=True)
    broker = receiver = agent = sub = None
    res: dict[str, Any] = {"consumer": consumer, "target_rate": rate}
    # count: what the consumer has received (None: the agent did not answer); delivered: what
    # reached the end of the line (the agent: the receiver's stored messages).
    count: Callable[[], int | None]
    delivered: Callable[[], int]
    try:
        broker = Mosquitto(d / "mosquitto").start()
        assert broker.popen is not None
        if consumer == "agent":
            receiver = Receiver(d / "cloud").start()
            agent = start_agent(
                d, broker.port, receiver.url, aggregate={"idle_close_s": IDLE_CLOSE_S}
            )
            assert agent.popen is not None
            pid = agent.popen.pid

            def agent_received() -> int | None:
                v = agent_figure(agent, "ingest", "received")
                return int(v) if v is not None else None

            count, delivered = agent_received, receiver.messages
            grace = AGENT_GRACE_S
        else:
            sub = (BareSub if consumer == "bare_aiomqtt" else MosqSub)(
                broker.port, d / f"{consumer}.log"
            )
            sub.wait_ready()
            pid = sub.pid

            def sub_count() -> int:
                return sub.count

            count, delivered = sub_count, sub_count
            grace = GRACE_S
        sampler = Sampler({"consumer": pid, "broker": broker.popen.pid}, interval_s=0.25)
        sampler.start()
        summary: dict[str, Any] = {}
        err: list[BaseException] = []

        def gen() -> None:
            try:
                summary.update(generate(broker.port, rate, duration_s, generator))
            except BaseException as e:  # reported below
                err.append(e)

        t = threading.Thread(target=gen, daemon=True)
        started_wall = time.time()
        t.start()
        # The generator starts publishing ~1 s after it is launched (process start).
        end_wall = started_wall + 1.0 + duration_s
        count_at_end = None
        at_end_mono = None
        poll = 0.25 if consumer == "agent" else 0.1
        while t.is_alive():
            now = time.time()
            if count_at_end is None and now >= end_wall:
                count_at_end = count()
                at_end_mono = time.monotonic()
            time.sleep(poll)
        t.join()
        if err:
            raise err[0]
        if count_at_end is None:
            count_at_end = count()
            at_end_mono = time.monotonic()
        published = int(summary["published"])
        acked = int(summary["acked"])
        offered = published / duration_s
        res.update(
            offered_rate=round(offered, 1),
            published=published,
            broker_acked=acked,
            generator_processes=summary.get("processes"),
            generator_cpu_cores=round(float(summary.get("cpu_s", 0)) / duration_s, 2),
            generator_window_waits=summary.get("window_waits", 0),
        )
        # Grace: wait for everything the broker acknowledged to reach the consumer / receiver.
        deadline = time.monotonic() + grace
        got = delivered()
        while got < acked and time.monotonic() < deadline:
            time.sleep(0.2)
            got = delivered()
        done_mono = time.monotonic()
        received = count()
        sampler.stop()
        t_pub0 = at_end_mono - duration_s if at_end_mono else done_mono
        res.update(
            consumer_count_at_end=count_at_end,
            lag_at_end=None if count_at_end is None else published - count_at_end,
            consumer_received=received,
            delivered=got,
            consumer_cpu_cores=_r(
                sampler.cpu_between("consumer", t_pub0, at_end_mono or done_mono)
            ),
            broker_cpu_cores=_r(sampler.cpu_between("broker", t_pub0, at_end_mono or done_mono)),
            consumer_max_rss_mb=round(sampler.max_rss_kb["consumer"] / 1024, 1),
        )
        if agent is not None:
            res["agent_snapshots_written"] = agent_figure(agent, "outbox", "snapshots_written")
            res["agent_unacked_end"] = agent_figure(agent, "ingest", "unacked")
        # The verdict.
        lag = res["lag_at_end"]
        reasons = []
        if summary.get("failed"):
            reasons.append(f"broker failed to ack {summary['failed']} publishes")
        if summary.get("reconnects") or summary.get("closed"):
            reasons.append("a publisher lost its connection")
        if offered < MIN_OFFERED * rate:
            res["generator_limited"] = True
            reasons.append(f"generator offered only {offered:,.0f} of {rate:,.0f} msgs/s")
        else:
            res["generator_limited"] = False
        if lag is None or lag > max(KEEPUP_LAG_FRACTION * duration_s * rate, 200):
            reasons.append(
                f"fell behind: {lag} messages ({(lag or 0) / rate:.1f} s) not yet received "
                "when publishing ended"
            )
        if got != acked:
            reasons.append(f"delivered {got} of {acked} within {grace:.0f} s of the end")
        res["passed"] = not reasons
        res["reason"] = "; ".join(reasons) or "ok"
        return res
    finally:
        kill_quietly(agent, sub, receiver, broker)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _bound_note(lower_bound: dict[str, bool]) -> str:
    """Which way the agent / bare ratio may be off when a ceiling is only a lower bound."""
    agent, bare = lower_bound.get("agent"), lower_bound.get("bare_aiomqtt")
    if bare and not agent:
        return " (bare passed every rate tried: the true ratio is lower)"
    if agent and not bare:
        return " (the agent passed every rate tried: the true ratio is higher)"
    if agent and bare:
        return " (both passed every rate tried: inconclusive)"
    return ""


def show(res: dict[str, Any]) -> None:
    say(
        f"  {res['consumer']:<14} target {res['target_rate']:>7,.0f}  offered "
        f"{res.get('offered_rate', 0):>8,.0f}  lag@end {res.get('lag_at_end')!s:>7}  delivered "
        f"{res.get('delivered')!s:>8}/{res.get('broker_acked')!s:<8} cpu consumer "
        f"{res.get('consumer_cpu_cores')} broker {res.get('broker_cpu_cores')} gen "
        f"{res.get('generator_cpu_cores')}  -> {'PASS' if res.get('passed') else 'FAIL'}"
        + ("" if res.get("passed") else f" ({res.get('reason')})")
    )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "")
    p.add_argument("--duration", type=float, help="seconds per step (N)")
    p.add_argument("--rates", help="comma-separated ladder of msgs/s")
    p.add_argument("--bisect", type=int, help="bisection steps after the first failure")
    p.add_argument("--generator", choices=("loadgen", "sim"), default="loadgen")
    p.add_argument("--consumers", default=",".join(CONSUMERS))
    args = p.parse_args(argv)
    duration = args.duration or (4.0 if args.quick else 10.0)
    if args.rates:
        ladder = [float(x) for x in args.rates.split(",")]
    elif args.quick:
        ladder = [5000, 10000, 20000, 40000]
    else:
        ladder = [2500, 5000, 10000, 20000, 30000, 45000, 60000]
    bisect_steps = args.bisect if args.bisect is not None else (1 if args.quick else 2)
    consumers = [c for c in args.consumers.split(",") if c in CONSUMERS]
    rep = Report("ingest_ceiling", args.quick)
    work = fresh_dir("ingest_ceiling")
    say(
        f"[ingest_ceiling] {len(ladder)} rates x {len(consumers)} consumers, N = {duration:g} s "
        f"per step, generator {args.generator}, 300 cameras x 3 streams, QoS 1"
    )
    results: list[dict[str, Any]] = []
    state: dict[str, dict[str, Any]] = {
        c: {"pass": None, "fail": None, "stop": False} for c in consumers
    }
    budget_end = time.monotonic() + (240 if args.quick else 420)
    for rate in ladder:
        say(f"[ingest_ceiling] rate {rate:,.0f} msgs/s")
        for c in consumers:
            st = state[c]
            if st["stop"]:
                continue
            if time.monotonic() > budget_end:
                rep.note(f"time budget reached; {c} not run at {rate:,.0f} msgs/s")
                st["stop"] = True
                continue
            try:
                res = run_step(c, rate, duration, work, args.generator)
            except Exception as e:  # a broken step is a failure, with its reason
                res = {"consumer": c, "target_rate": rate, "passed": False,
                       "reason": f"step error: {type(e).__name__}: {e}"}  # fmt: skip
            results.append(res)
            show(res)
            if res.get("passed"):
                st["pass"] = res
            else:
                st["stop"] = True
                if res.get("generator_limited"):
                    st["gen_limited"] = res
                else:
                    st["fail"] = res
    # Bisect between the last pass and the first real failure.
    for c in consumers:
        st = state[c]
        for _ in range(bisect_steps):
            if st["fail"] is None or time.monotonic() > budget_end:
                break
            lo = st["pass"]["target_rate"] if st["pass"] else 0.0
            hi = st["fail"]["target_rate"]
            mid = round((lo + hi) / 2 / 500) * 500
            if mid <= lo or mid >= hi:
                break
            say(f"[ingest_ceiling] bisect {c} at {mid:,.0f} msgs/s")
            try:
                res = run_step(c, mid, duration, work, args.generator)
            except Exception as e:
                res = {"consumer": c, "target_rate": mid, "passed": False,
                       "reason": f"step error: {type(e).__name__}: {e}"}  # fmt: skip
            results.append(res)
            show(res)
            if res.get("passed"):
                st["pass"] = res
            elif res.get("generator_limited"):
                break
            else:
                st["fail"] = res

    ceilings: dict[str, float | None] = {}
    for c in consumers:
        passes = [r for r in results if r["consumer"] == c and r.get("passed")]
        # A passing step offered >= 97 % of its target: the ceiling is named by its target.
        ceilings[c] = max((r["target_rate"] for r in passes), default=None)
        st = state[c]
        if st.get("fail"):
            bound = f"fails at {st['fail']['target_rate']:,.0f}: {st['fail']['reason']}"
        elif st.get("gen_limited"):
            bound = "generator-limited above; the ceiling is at least this"
        else:
            bound = "passed every rate tried; the ceiling is at least this"
        best = next((r for r in passes if r["target_rate"] == ceilings[c]), None)
        rep.figure(
            f"ceiling_{c}", ceilings[c],
            f"ceiling {c}: {fmt_rate(ceilings[c])} msgs/s ({bound})"
            + (
                f"; at that rate consumer CPU {best['consumer_cpu_cores']} cores, broker "
                f"{best['broker_cpu_cores']}, generator {best['generator_cpu_cores']}"
                if best
                else ""
            ),
        )  # fmt: skip
        rep.figure(f"ceiling_{c}_bound", bound)
    rep.figure("steps", results)
    rep.figure("duration_s", duration)
    rep.figure("generator", args.generator)

    agent_c = ceilings.get("agent")
    r_bare = ratio(agent_c, ceilings.get("bare_aiomqtt"))
    r_mosq = ratio(agent_c, ceilings.get("mosquitto_sub"))
    rep.figure("agent_over_bare_aiomqtt", None if r_bare is None else round(r_bare, 3))
    rep.figure("agent_over_mosquitto_sub", None if r_mosq is None else round(r_mosq, 3))
    lower_bound = {c: not state[c].get("fail") for c in consumers}
    rep.row(
        f"Sustained ingest, zero loss, N = {duration:g} s",
        ">= 30,000 msgs/s",
        f"{fmt_rate(agent_c)} msgs/s" + (" (lower bound)" if lower_bound.get("agent") else ""),
        f"bare aiomqtt {fmt_rate(ceilings.get('bare_aiomqtt'))}"
        + (" (lower bound)" if lower_bound.get("bare_aiomqtt") else "")
        + f"; mosquitto_sub {fmt_rate(ceilings.get('mosquitto_sub'))}"
        + (" (lower bound)" if lower_bound.get("mosquitto_sub") else ""),
        None if agent_c is None else agent_c >= 30_000,
    )
    rep.row(
        "Agent / bare aiomqtt, agent / mosquitto_sub (ingest ceiling)",
        ">= 3 and >= 0.55",
        "n/a" if r_bare is None else f"{r_bare:.2f}" + _bound_note(lower_bound),
        f"agent / mosquitto_sub = {'n/a' if r_mosq is None else f'{r_mosq:.2f}'}"
        + (" (mosquitto_sub is a lower bound)" if lower_bound.get("mosquitto_sub") else ""),
        None if r_bare is None or r_mosq is None else r_bare >= 3 and r_mosq >= 0.55,
    )  # fmt: skip
    agent_fail = state.get("agent", {}).get("fail")
    if agent_fail:
        rep.note(
            f"agent's first failing step: {agent_fail['target_rate']:,.0f} msgs/s, consumer CPU "
            f"{agent_fail.get('consumer_cpu_cores')} cores (1.0 = one core: the agent is one "
            f"Python thread plus the SQLite worker), snapshots written "
            f"{agent_fail.get('agent_snapshots_written')}: {agent_fail['reason']}"
        )
    rep.note(
        "sustained = generator offered >= 97 % of the rate, the consumer was <= "
        f"{KEEPUP_LAG_FRACTION * duration:g} s of traffic behind when publishing ended "
        "(capacity >= 90 %), and everything the broker acked was counted (agent: at "
        f"the receiver) within {GRACE_S:g} s (agent {AGENT_GRACE_S:g} s) of the end"
    )
    rep.note(
        f"publishers: {args.generator} ("
        + ("bench/loadgen.py, raw-socket MQTT v5 QoS 1, a few µs of CPU per message; the paho "
           "simulator costs ~100 µs per message here and cannot offer 20k msgs/s on 2 cores"
           if args.generator == "loadgen" else "agent.sim.cameras, paho")
        + "); publishers, broker and consumer share the machine's cores"
    )  # fmt: skip
    rep.finish(args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

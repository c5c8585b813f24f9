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

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.sim.cameras import SimOptions, run_simulation
from bench.common import (
    CountingSub,
    LoadThread,
    Report,
    Sampler,
    agent_figure,
    fill,
    fresh_dir,
    parser,
    pid,
    ratio,
    rnd,
    say,
    site,
)  # fmt: skip
from bench.loadgen import LoadOptions, run_load
from devtools.procs import Mosquitto

CONSUMERS = ("agent", "bare_aiomqtt", "mosquitto_sub")
IDLE_CLOSE_S = 2.0
ALLOWED_LATENESS_S = 2.0  # the shipped default
KEEPUP_LAG_FRACTION = 0.1  # of N: at most 0.1 x N s of traffic behind (capacity >= 90 %)
GRACE_S = 3.0
AGENT_GRACE_S = IDLE_CLOSE_S + ALLOWED_LATENESS_S + 8.0
MIN_OFFERED = 0.97


def generate(port: int, rate: float, duration_s: float, generator: str) -> dict[str, Any]:
    """Run the publishers (blocking); totals with `published`, `acked`, `cpu_s`."""
    if generator == "loadgen":
        return run_load(LoadOptions(port=port, cameras=300, rate=rate, duration_s=duration_s,
                                    processes=max(1, math.ceil(rate / 40_000))))  # fmt: skip
    procs = max(2, math.ceil(rate / 4000))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = run_simulation(SimOptions(port=port, cameras=300, rate=rate / 300, duration_s=duration_s,
                                  processes=procs, drain_timeout_s=20))  # fmt: skip
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s.update(cpu_s=r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, processes=procs,
             target=int(rate * duration_s), window_waits=0)  # fmt: skip
    return s


def run_step(consumer: str, rate: float, n_s: float, work: Path, generator: str) -> dict[str, Any]:
    d = work / f"{consumer}-{int(rate)}"
    d.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"consumer": consumer, "target_rate": rate}
    # count: what the consumer has received (None: the agent did not answer); delivered: what
    # reached the end of the line (the agent: the receiver's stored messages).
    count: Callable[[], int | None]
    delivered: Callable[[], int]
    with contextlib.ExitStack() as stack:
        if consumer == "agent":
            broker, receiver, agent = stack.enter_context(
                site(d, aggregate={"idle_close_s": IDLE_CLOSE_S})
            )
            cpid, grace, delivered = pid(agent), AGENT_GRACE_S, receiver.messages

            def count() -> int | None:
                v = agent_figure(agent, "ingest", "received")
                return None if v is None else int(v)
        else:
            broker = Mosquitto(d / "mosquitto").start()
            stack.callback(broker.stop)
            kind = "bare" if consumer == "bare_aiomqtt" else "mosq"
            sub = CountingSub(kind, broker.port, d / f"{consumer}.log")
            stack.callback(sub.stop)
            cpid, grace = sub.wait_ready().pid, GRACE_S
            count = delivered = lambda: sub.count
        sampler = Sampler({"consumer": cpid, "broker": pid(broker)}, interval_s=0.25)
        sampler.start()
        gen = LoadThread(lambda: generate(broker.port, rate, n_s, generator))
        end_wall = time.time() + 1.0 + n_s  # the generator starts publishing ~1 s after launch
        gen.start()
        count_at_end = at_end = None
        while gen.is_alive():
            if count_at_end is None and time.time() >= end_wall:
                count_at_end, at_end = count(), time.monotonic()
            time.sleep(0.25 if consumer == "agent" else 0.1)
        if gen.error is not None:
            raise gen.error
        summary = gen.result
        if count_at_end is None:
            count_at_end, at_end = count(), time.monotonic()
        published, acked = int(summary["published"]), int(summary["acked"])
        offered = published / n_s
        # Grace: wait for everything the broker acknowledged to reach the consumer / receiver.
        deadline = time.monotonic() + grace
        while (got := delivered()) < acked and time.monotonic() < deadline:
            time.sleep(0.2)
        received = count()
        sampler.stop()
        lag = None if count_at_end is None else published - count_at_end
        t1 = at_end or time.monotonic()  # the end of the publishing
        res.update(
            offered_rate=round(offered, 1), published=published, broker_acked=acked,
            generator_processes=summary.get("processes"),
            generator_cpu_cores=round(float(summary.get("cpu_s", 0)) / n_s, 2),
            generator_window_waits=summary.get("window_waits", 0),
            consumer_count_at_end=count_at_end, lag_at_end=lag, consumer_received=received,
            delivered=got,
            consumer_cpu_cores=rnd(sampler.cpu_between("consumer", t1 - n_s, t1)),
            broker_cpu_cores=rnd(sampler.cpu_between("broker", t1 - n_s, t1)),
            consumer_max_rss_mb=round(sampler.max_rss_kb("consumer") / 1024, 1),
        )  # fmt: skip
        if consumer == "agent":
            res["agent_snapshots_written"] = agent_figure(agent, "outbox", "snapshots_written")
            res["agent_unacked_end"] = agent_figure(agent, "ingest", "unacked")
    res["generator_limited"] = offered < MIN_OFFERED * rate
    reasons = [
        f"broker failed to ack {summary['failed']} publishes" if summary.get("failed") else "",
        "a publisher lost its connection"
        if summary.get("reconnects") or summary.get("closed") else "",
        f"generator offered only {offered:,.0f} of {rate:,.0f} msgs/s"
        if res["generator_limited"] else "",
        f"fell behind: {lag} messages ({(lag or 0) / rate:.1f} s) not yet received when "
        "publishing ended" if lag is None or lag > max(KEEPUP_LAG_FRACTION * n_s * rate, 200)
        else "",
        f"delivered {got} of {acked} within {grace:.0f} s of the end" if got != acked else "",
    ]  # fmt: skip
    res["passed"] = not any(reasons)
    res["reason"] = "; ".join(r for r in reasons if r) or "ok"
    return res


def step(consumer: str, rate: float, duration_s: float, work: Path, gen: str) -> dict[str, Any]:
    """run_step, a broken step being a failure with its reason; printed."""
    try:
        r = run_step(consumer, rate, duration_s, work, gen)
    except Exception as e:
        r = {"consumer": consumer, "target_rate": rate, "passed": False,
             "reason": f"step error: {type(e).__name__}: {e}"}  # fmt: skip
    say(fill("  {consumer:<14} target {target_rate:>7,.0f}  offered {o:>8,.0f}  lag@end "
             "{lag_at_end!s:>7}  delivered {delivered!s:>8}/{broker_acked!s:<8} cpu consumer "
             "{consumer_cpu_cores} broker {broker_cpu_cores} gen {generator_cpu_cores}  -> ",
             o=r.get("offered_rate", 0), **r)
        + ("PASS" if r.get("passed") else f"FAIL ({r.get('reason')})"))  # fmt: skip
    return r


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "")
    p.add_argument("--duration", type=float, help="seconds per step (N)")
    p.add_argument("--rates", help="comma-separated ladder of msgs/s")
    p.add_argument("--bisect", type=int, help="bisection steps after the first failure")
    p.add_argument("--generator", choices=("loadgen", "sim"), default="loadgen")
    p.add_argument("--consumers", default=",".join(CONSUMERS))
    args = p.parse_args(argv)
    n_s = args.duration or (4.0 if args.quick else 10.0)
    ladder = ([float(x) for x in args.rates.split(",")] if args.rates else
              [5000, 10000, 20000, 40000] if args.quick else
              [2500, 5000, 10000, 20000, 30000, 45000, 60000])  # fmt: skip
    bisect_steps = args.bisect if args.bisect is not None else (1 if args.quick else 2)
    consumers = [c for c in args.consumers.split(",") if c in CONSUMERS]
    rep, work = Report("ingest_ceiling", args.quick), fresh_dir("ingest_ceiling")
    say(f"[ingest_ceiling] {len(ladder)} rates x {len(consumers)} consumers, N = {n_s:g} s "
        f"per step, generator {args.generator}, 300 cameras x 3 streams, QoS 1")  # fmt: skip
    results: list[dict[str, Any]] = []
    # Per consumer: its last pass, its first real failure, its first generator-limited step.
    state: dict[str, dict[str, Any]] = {c: {"pass": None, "fail": None} for c in consumers}
    budget_end = time.monotonic() + (240 if args.quick else 420)

    def try_rate(c: str, rate: float) -> dict[str, Any]:
        results.append(r := step(c, rate, n_s, work, args.generator))
        key = "pass" if r.get("passed") else "gen_limited" if r.get("generator_limited") else "fail"
        state[c][key] = r
        return r

    stopped: set[str] = set()
    for rate in ladder:
        say(f"[ingest_ceiling] rate {rate:,.0f} msgs/s")
        for c in [c for c in consumers if c not in stopped]:
            if time.monotonic() > budget_end:
                rep.note(f"time budget reached; {c} not run at {rate:,.0f} msgs/s")
                stopped.add(c)
            elif not try_rate(c, rate).get("passed"):
                stopped.add(c)
    for c in consumers:  # bisect between the last pass and the first real failure
        for _ in range(bisect_steps):
            st = state[c]
            lo = st["pass"]["target_rate"] if st["pass"] else 0.0
            mid = round((lo + st["fail"]["target_rate"]) / 2 / 500) * 500 if st["fail"] else lo
            if not lo < mid < st["fail"]["target_rate"] or time.monotonic() > budget_end:
                break
            say(f"[ingest_ceiling] bisect {c} at {mid:,.0f} msgs/s")
            if try_rate(c, mid).get("generator_limited"):
                break

    ceilings: dict[str, float | None] = {}
    for c in consumers:
        passes = [r for r in results if r["consumer"] == c and r.get("passed")]
        # A passing step offered >= 97 % of its target: the ceiling is named by its target.
        ceiling = ceilings[c] = max((r["target_rate"] for r in passes), default=None)
        st = state[c]
        bound = (f"fails at {st['fail']['target_rate']:,.0f}: {st['fail']['reason']}"
                 if st.get("fail") else "generator-limited above; the ceiling is at least this"
                 if st.get("gen_limited") else
                 "passed every rate tried; the ceiling is at least this")  # fmt: skip
        best = next((r for r in passes if r["target_rate"] == ceiling), None)
        rep.figure(f"ceiling_{c}", ceiling, fill("ceiling {c}: {v:n} msgs/s ({b})", c=c, v=ceiling,
                   b=bound) + (fill("; at that rate consumer CPU {consumer_cpu_cores} cores, "
                   "broker {broker_cpu_cores}, generator {generator_cpu_cores}", **best)
                   if best else ""))  # fmt: skip
        rep.figure(f"ceiling_{c}_bound", bound)
    rep.figure("steps", results)
    rep.figure("duration_s", n_s)
    rep.figure("generator", args.generator)

    agent_c = ceilings.get("agent")
    r_bare = ratio(agent_c, ceilings.get("bare_aiomqtt"))
    r_mosq = ratio(agent_c, ceilings.get("mosquitto_sub"))
    rep.figure("agent_over_bare_aiomqtt", rnd(r_bare, 3))
    rep.figure("agent_over_mosquitto_sub", rnd(r_mosq, 3))
    lower = {c: " (lower bound)" if not state[c].get("fail") else "" for c in consumers}
    bound_note = {  # which way the agent / bare ratio may be off when a ceiling is a lower bound
        (False, True): " (bare passed every rate tried: the true ratio is lower)",
        (True, False): " (the agent passed every rate tried: the true ratio is higher)",
        (True, True): " (both passed every rate tried: inconclusive)",
    }.get((bool(lower.get("agent")), bool(lower.get("bare_aiomqtt"))), "")
    rep.row(
        f"Sustained ingest, zero loss, N = {n_s:g} s", ">= 30,000 msgs/s",
        fill("{v:n} msgs/s", v=agent_c) + lower.get("agent", ""),
        fill("bare aiomqtt {b:n}{lb}; mosquitto_sub {m:n}{lm}", b=ceilings.get("bare_aiomqtt"),
             lb=lower.get("bare_aiomqtt", ""), m=ceilings.get("mosquitto_sub"),
             lm=lower.get("mosquitto_sub", "")),
        None if agent_c is None else agent_c >= 30_000,
    )  # fmt: skip
    rep.row(
        "Agent / bare aiomqtt, agent / mosquitto_sub (ingest ceiling)", ">= 3 and >= 0.55",
        "n/a" if r_bare is None else f"{r_bare:.2f}" + bound_note,
        fill("agent / mosquitto_sub = {r:.2f}", r=r_mosq)
        + (" (mosquitto_sub is a lower bound)" if lower.get("mosquitto_sub") else ""),
        None if r_bare is None or r_mosq is None else r_bare >= 3 and r_mosq >= 0.55,
    )  # fmt: skip
    if fail := state.get("agent", {}).get("fail"):
        rep.note(
            fill(
                "agent's first failing step: {target_rate:,.0f} msgs/s, consumer CPU "
                "{consumer_cpu_cores} cores (1.0 = one core: the agent is one Python thread plus "
                "the SQLite worker), snapshots written {agent_snapshots_written}: {reason}",
                **fail,
            )
        )
    rep.note(
        "sustained = generator offered >= 97 % of the rate, the consumer was <= "
        f"{KEEPUP_LAG_FRACTION * n_s:g} s of traffic behind when publishing ended "
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

"""The deterministic simulation of the durable core (devtools/simulation.py) as a test.

SIM_SEEDS sets how many schedules (default 10,000, split over 2 processes); SEED=n replays one
seed alone, exactly as it failed. `make simulate SEEDS=100000` is the long soak.
"""

from __future__ import annotations

import os

import pytest

from devtools.simulation import run_parallel, run_seed


# Minutes of CPU: outside the inner loop (`pytest -m "not e2e"`) like the process tests.
@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_simulated_schedules_count_every_message_exactly_once() -> None:
    if os.environ.get("SEED"):
        run_seed(int(os.environ["SEED"]))
        return
    seeds = list(
        range(
            int(os.environ.get("SIM_FIRST", "0")),
            int(os.environ.get("SIM_FIRST", "0")) + int(os.environ.get("SIM_SEEDS", "10000")),
        )
    )
    n, totals, failures = run_parallel(seeds, jobs=int(os.environ.get("SIM_JOBS", "2")))
    assert not failures, "\n\n".join(failures)
    assert n == len(seeds)
    # The schedules really exercised the faults they are meant to (a guard against a
    # simulation that silently stopped injecting them).
    for what in ("crashes", "stops", "clock_steps", "redelivered", "snapshots", "compacted",
                 "dead_letters"):  # fmt: skip
        assert totals[what] > 0, (what, totals)


def test_a_seed_replays_identically() -> None:
    a, b = run_seed(123), run_seed(123)
    assert a.trace == b.trace and a.steps == b.steps

"""The ingest's seeded-schedule simulation (devtools/ingest_simulation.py) as tests: a few seeds
in the inner loop on the shared cluster (no server crash there: the cluster is shared), more
under e2e on a cluster of the test's own, which the schedules crash and restart.

ISIM_SEEDS / ISIM_E2E_SEEDS / ISIM_FIRST set how many seeds and from where; ISIM_SEED=n replays
one seed alone (with its trace on failure), as `python -m devtools.ingest_simulation --seed n -v`
does. tests/ingest/SIMULATION-TEETH.md records the defects it finds.
"""

from __future__ import annotations

import gc
import os
from collections import Counter

import pytest

from devtools.ingest_simulation import (
    FAULTS,
    Params,
    Postgres,
    draw_plans,
    postgres,
    quiet,
    run_seed,
    run_seeds,
)
from devtools.postgres import PostgresCluster


async def _run(pg: Postgres, default: int, jobs: int) -> tuple[int, Counter[str]]:
    with quiet():
        if os.environ.get("ISIM_SEED"):
            out = await run_seed(int(os.environ["ISIM_SEED"]), pg)
            return 1, out.counts
        first = int(os.environ.get("ISIM_FIRST", "0"))
        seeds = list(range(first, first + default))
        n, totals, failures = await run_seeds(seeds, pg, jobs=jobs)
    assert not failures, "\n\n".join(failures)
    assert n == len(seeds)
    return n, totals


def test_a_schedule_is_a_function_of_its_seed() -> None:
    # What replays: the world and every attempt's plan, whatever the timing did before.
    assert Params.draw(7) == Params.draw(7)
    p = Params.draw(7)
    for attempt in range(12):
        assert draw_plans(7, p, "gw-1", 3, attempt) == draw_plans(7, p, "gw-1", 3, attempt)
    assert any(draw_plans(7, p, "gw-1", 3, a) != draw_plans(8, p, "gw-1", 3, a) for a in range(12))
    # From CALM_AFTER attempts on, no fault: every batch gets its final answer.
    assert all(pl.fault is None and not pl.drop for pl in draw_plans(7, p, "gw-1", 3, 50)[0])


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_seeded_schedules_merge_every_batch_exactly_once(pg_cluster: PostgresCluster) -> None:
    async with postgres(pg_cluster.dsn()) as pg:  # a shared cluster: `restart` is `terminate`
        _, totals = await _run(pg, int(os.environ.get("ISIM_SEEDS", "8")), jobs=2)
    gc.collect()  # the abandoned sockets' warnings now, inside this test's filters
    assert totals["batches"] > 0 and totals["answer_200"] > 0


@pytest.mark.e2e
@pytest.mark.timeout(300)
# A simulated SIGKILL aborts every socket of a replica at once, as the kernel would; the Python
# socket objects it leaves are collected unclosed (ResourceWarning), which is the point.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_many_seeded_schedules_with_server_crashes() -> None:
    # A cluster of its own (on tmpfs when there is one), crashed and restarted by schedules.
    async with postgres(None) as pg:
        assert pg.cluster is not None
        _, totals = await _run(pg, int(os.environ.get("ISIM_E2E_SEEDS", "80")), jobs=3)
    gc.collect()  # the abandoned sockets' warnings now, inside this test's filters
    if os.environ.get("ISIM_SEED"):
        return
    # The schedules really exercised what they are meant to (a guard against a simulation
    # that silently stopped injecting faults).
    for what in (*(f"fired_{f}" for f in FAULTS), "kill", "restart", "dropped", "twins",
                 "answer_422", "answer_503", "answer_conn_error", "answer_gave_up"):  # fmt: skip
        assert totals[what] > 0, (what, totals)


@pytest.mark.e2e
def test_the_command_line_runs_seeds(tmp_path: object) -> None:
    # `python -m devtools.ingest_simulation` on its own cluster: exit 0 and its summary line.
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "devtools.ingest_simulation", "--seeds", "3", "--first", "40"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 seeds in" in done.stdout and " ok: " in done.stdout, done.stdout

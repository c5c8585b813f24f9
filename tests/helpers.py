"""Shared steps of the end-to-end tests."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from agent.sim.cloud import load_merged
from agent.sim.procs import Mosquitto, Publisher, Receiver, wait_for
from agent.sim.truth import Comparison, Expected, compare


def publish(broker: Mosquitto, workdir: Path, **kw: Any) -> dict[tuple[str, str, int], Expected]:
    return Publisher(broker, workdir, **kw).start().join()


def wait_delivered(
    receiver: Receiver, expected: dict[tuple[str, str, int], Expected], timeout_s: float = 60
) -> Comparison:
    """Wait until the receiver holds as many messages as were published, then compare tables."""
    want = sum(e.count for e in expected.values())
    # On a timeout the comparison below says what is missing.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: receiver.messages() >= want, timeout_s=timeout_s, what=f"{want} messages")
    return compare(expected, load_merged(receiver.db))


def assert_exact(c: Comparison) -> None:
    assert c.expected_messages > 0
    assert c.missing == 0 and c.duplicated == 0, (c.missing, c.duplicated, c.mismatched_rows)
    assert c.mismatched_rows == []


def assert_seqs_clean(receiver: Receiver) -> None:
    gw = receiver.stats()["gateways"]["gw-test"]
    assert gw["gaps"] == 0, gw
    assert gw["out_of_order"] == 0, gw

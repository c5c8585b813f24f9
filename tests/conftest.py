"""Fixtures: a private Mosquitto and the reference receiver on free loopback ports, real files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.procs import Mosquitto, Receiver
from tests.helpers import AgentFactory

# Fixtures that start a process (Mosquitto, the agent, the receiver, tmux, tap, dpkg): a test
# using one, directly or through another fixture, is marked e2e, so `pytest -m "not e2e"` is the
# inner loop. A test that starts a process without them carries @pytest.mark.e2e itself.
PROCESS_FIXTURES = frozenset(
    {"broker", "receiver", "agents", "tls_broker", "tls_receiver", "taps", "term", "deb", "machine"}
)


# The longest tests start first: `make test` runs on 2 workers (pytest-xdist), and a
# minutes-long test collected last would run alone at the end while the other worker idles.
LONGEST_FIRST = ("test_simulation.py", "test_crash.py", "test_deb.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    mq = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield mq
    finally:
        mq.stop()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    rc = Receiver(tmp_path / "cloud").start()
    try:
        yield rc
    finally:
        rc.stop()


@pytest.fixture
def agents(tmp_path: Path, broker: Mosquitto, receiver: Receiver) -> Iterator[AgentFactory]:
    f = AgentFactory(tmp_path, broker, receiver)
    try:
        yield f
    finally:
        f.stop_all()

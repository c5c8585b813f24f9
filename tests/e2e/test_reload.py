"""Reload without restart (issue #23 item 9): SIGHUP (`systemctl reload`, the unit's
ExecReload=) reads the config again. What may change live does, at once and all together; a
file that changes anything else, or does not validate, is refused with one log line naming the
keys, and the running config stays. Nothing is lost or doubled across any of it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from agent.core.model import Chunk
from agent.sim.cloud import load_merged
from devtools.procs import Agent, Receiver, wait_for
from devtools.truth import Expected, compare
from tests.helpers import AgentFactory, assert_exact, publish

pytestmark = pytest.mark.e2e


def _hup_and_wait(agent: Agent, line: str, seen: int) -> None:
    agent.signal(signal.SIGHUP)
    wait_for(lambda: agent.log_text().count(line) > seen, timeout_s=20, what=repr(line))


def _union(*tables: dict[tuple[str, str, int], Expected]) -> dict[tuple[str, str, int], Expected]:
    out: dict[tuple[str, str, int], Expected] = {}
    for table in tables:
        for key, e in table.items():
            mine = out.setdefault(key, Expected())
            mine.count += e.count
            for f, v in e.sums.items():
                mine.sums[f] += v
            for f, counts in e.cats.items():
                for k, n in counts.items():
                    mine.cats[f][k] += n
    return out


def _both(a: Receiver, b: Receiver) -> dict[tuple[str, str, int], Chunk]:
    merged = load_merged(a.db)
    for key, c in load_merged(b.db).items():
        if key in merged:
            merged[key].merge(c)
        else:
            merged[key] = c
    return merged


def test_sighup_applies_live_keys_and_refuses_the_rest(
    agents: AgentFactory, tmp_path: Path
) -> None:
    a = agents.receiver
    b = Receiver(tmp_path / "cloud-b").start()
    try:
        config = agents.config()
        agent = agents.start(config)
        first = publish(agents.broker, tmp_path, cameras=10, rate=10, duration_s=2, seed=21)
        want = sum(e.count for e in first.values())
        wait_for(lambda: a.messages() >= want, timeout_s=30, what="the first messages at A")

        # Live: the cloud's url (to receiver B) and the log level, applied together.
        text = config.read_text()
        config.write_text(
            text.replace(a.url, b.url).replace("[forward]", '[log]\nlevel = "debug"\n\n[forward]')
        )
        _hup_and_wait(agent, "reload: applied forward.url, log.level", 0)
        second = publish(agents.broker, tmp_path, cameras=10, rate=10, duration_s=2, seed=22)
        want_b = sum(e.count for e in second.values())
        wait_for(lambda: b.messages() >= want_b, timeout_s=30, what="the next messages at B")

        # Not live: the outbox's path. Refused, naming it; the url change beside it is not
        # applied either (all or nothing), so data keeps going to B.
        live_text = config.read_text()
        config.write_text(
            live_text.replace(b.url, a.url).replace("buffer.sqlite3", "elsewhere.sqlite3")
        )
        _hup_and_wait(agent, "reload refused, the running config stays: buffer.path", 0)
        # Not valid: refused with the problem, the agent keeps running as it was.
        config.write_text(live_text.replace(f"port = {agents.broker.port}", "port = 70000", 1))
        _hup_and_wait(agent, "reload refused, the running config stays: mqtt.port", 0)
        third = publish(agents.broker, tmp_path, cameras=10, rate=10, duration_s=2, seed=23)
        want_b += sum(e.count for e in third.values())
        wait_for(lambda: b.messages() >= want_b, timeout_s=30, what="the last messages at B")

        assert a.messages() == want, "nothing went to A after the url moved to B"
        assert_exact(compare(_union(first, second, third), _both(a, b)))
        agent.wait_ready()
        assert agent.stop() == 0
    finally:
        b.stop()

"""The ingest rates of /status (`msgs_per_s_10s`, `msgs_per_s_60s`) right after a start: an
agent up for less than the window does not average in the seconds before its first message
(18 s up, cameras at 200 msgs/s since second 10: 200, not 86)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agent.app.service import build_pipeline
from agent.config.settings import BufferSettings, Settings
from agent.core.stats import Stats
from agent.durable.outbox import Outbox
from agent.ops.pipeline import Pipeline
from agent.ops.status import status_document

TICK_S = 0.25  # one sample per checkpoint


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    settings = Settings(gateway_id="gw-rate", buffer=BufferSettings(path=tmp_path / "b.sqlite3"))
    outbox, recovery = await Outbox.open(settings.buffer.path)
    transport = httpx.MockTransport(lambda request: httpx.Response(500))  # never called
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            yield await build_pipeline(settings, outbox, recovery, http)
    finally:
        await outbox.close()


def run_for(st: Stats, seconds: float, *, rate: float, first_s: float, last_s: float = 1e9) -> None:
    """Samples as the checkpoint loop takes them: an agent up `seconds`, counting `rate`
    messages a second from `first_s` to `last_s` after its start, up to now."""
    now = time.monotonic()
    start = now - seconds
    st.started_at = time.time() - seconds
    st.samples.clear()
    for i in range(int(seconds / TICK_S) + 1):
        t = start + i * TICK_S
        st.counted = round(max(0.0, min(t - start, last_s) - first_s) * rate)
        st.sample(t)


def rates(p: Pipeline) -> tuple[float, float]:
    ingest = status_document(p)["ingest"]
    return ingest["msgs_per_s_10s"], ingest["msgs_per_s_60s"]


def approx(x: float) -> object:
    """Within one checkpoint's messages: a window holds whole samples."""
    return pytest.approx(x, rel=0.03, abs=200 * TICK_S / 9)


async def test_the_seconds_before_the_first_message_are_not_averaged_in(
    pipeline: Pipeline,
) -> None:
    run_for(pipeline.stats, 18, rate=200, first_s=10)  # the issue's: 86 msgs/s for 200
    assert rates(pipeline) == (approx(200), approx(200))
    run_for(pipeline.stats, 6, rate=200, first_s=3)
    assert rates(pipeline) == (approx(200), approx(200))
    # Up 5 minutes before the cameras began: the same.
    run_for(pipeline.stats, 300, rate=200, first_s=292)
    assert rates(pipeline) == (approx(200), approx(200))


async def test_nothing_received_yet_is_zero(pipeline: Pipeline) -> None:
    run_for(pipeline.stats, 18, rate=200, first_s=60)
    assert rates(pipeline) == (0.0, 0.0)


async def test_once_messages_flow_each_window_is_its_length(pipeline: Pipeline) -> None:
    """A camera pause after the first message is averaged in, as the window's name says."""
    run_for(pipeline.stats, 300, rate=200, first_s=0, last_s=292)  # quiet for the last 8 s
    assert rates(pipeline) == (approx(200 * 2 / 10), approx(200 * 52 / 60))
    run_for(pipeline.stats, 40, rate=200, first_s=5, last_s=30)  # young, quiet for 10 s
    assert rates(pipeline) == (0.0, approx(200 * 25 / 35))

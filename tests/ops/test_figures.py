"""Every plain figure is defined once (agent/ops/figures.py): /status and /metrics render it from
that table, and docs/reference.md's /status schema and /metrics list name each one."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from agent.app.service import build_pipeline
from agent.config.settings import BufferSettings, Settings
from agent.durable.outbox import Outbox
from agent.ops.figures import FIGURES
from agent.ops.metrics import render
from agent.ops.status import status_document

README = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def test_each_figure_has_one_place_and_one_name() -> None:
    places = [(f.section, f.key) for f in FIGURES]
    assert len(places) == len(set(places))
    metrics = [f.metric for f in FIGURES if f.metric]
    assert len(metrics) == len(set(metrics))


def _expand(pattern: str) -> list[str]:
    """`a_{b,c}_d` -> [a_b_d, a_c_d]; `a{,_x}` -> [a, a_x]."""
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_the_readme_names_every_figure() -> None:
    text = README.read_text()
    schema = text[text.index("`/status` schema:") :].split("\n\n", 1)[0]
    for f in FIGURES:
        section = schema[schema.index(f"`{f.section}` {{") :]
        section = section[: section.index("}")]
        assert f"`{f.key}`" in section, (
            f"docs/reference.md's /status schema: {f.section}.{f.key} missing"
        )
    listed = {
        name
        for pattern in re.findall(r"`(edge_agent_[a-z_{},]+)`", text)
        for name in _expand(pattern)
    }
    for f in FIGURES:
        if f.metric:
            name = "edge_agent_" + f.metric + ("_total" if f.kind == "counter" else "")
            assert name in listed, f"docs/reference.md's /metrics list: {name} missing"


async def test_status_and_metrics_show_the_same_value_of_each_figure(tmp_path: Path) -> None:
    settings = Settings(gateway_id="gw-figures", buffer=BufferSettings(path=tmp_path / "b.sqlite3"))
    outbox, recovery = await Outbox.open(settings.buffer.path)
    transport = httpx.MockTransport(lambda request: httpx.Response(500))  # never called
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            p = await build_pipeline(settings, outbox, recovery, http)
            st = p.stats
            st.received, st.counted, st.acked, st.checkpoints, st.bytes_sent = 7, 5, 4, 3, 999
            st.mqtt_connected, st.buffer_usage = True, 0.123456
            status = status_document(p)
            metrics = {
                s.name: s.value
                for fam in text_string_to_metric_families(render(p).decode())
                for s in fam.samples
            }
            values = {(f.section, f.key): f.get(p) for f in FIGURES}
    finally:
        await outbox.close()
    for f in FIGURES:
        value = values[(f.section, f.key)]
        shown = status[f.section][f.key]
        assert shown == (value if f.digits is None else round(value, f.digits)), f.key
        if f.metric:
            name = "edge_agent_" + f.metric + ("_total" if f.kind == "counter" else "")
            assert metrics[name] == float(value), name
    assert status["ingest"]["received"] == 7 and metrics["edge_agent_messages_received_total"] == 7
    assert status["outbox"]["usage_of_max_bytes"] == 0.1235

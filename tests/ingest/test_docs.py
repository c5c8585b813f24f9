"""docs/ingest.md is held to the code: every configuration key, 503 cause, outcome and metric
it lists exists, and every one the code has is listed."""

from __future__ import annotations

import re
from pathlib import Path

from edge_ingest.config import IngestSettings
from edge_ingest.metrics import Metrics
from edge_ingest.store import CAUSES, Outcome, Store

DOC = (Path(__file__).parents[2] / "docs" / "ingest.md").read_text()


def _section(title: str) -> str:
    return DOC.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", _section("Run it"), re.M))
    assert documented == set(IngestSettings.model_fields)


def test_every_503_cause_and_outcome_is_documented() -> None:
    answers = _section("Answers")
    causes = answers.split("503 causes", 1)[1]
    documented = set(re.findall(r"^- `([a-z_]+)`:", causes, re.M))
    assert documented == set(CAUSES)
    for o in Outcome:
        assert f"`{o.value}`" in answers


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    names = set()
    for m in Metrics(Store("postgresql://unused")).registry.collect():
        suffix = "_total" if m.type == "counter" else ""
        names.add(m.name + suffix)
    documented = set(re.findall(r"`(edge_ingest_[a-z_]+)", _section("Endpoints and metrics")))
    assert documented == names

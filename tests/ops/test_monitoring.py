"""Metrics hygiene and the shipped monitoring, against a live agent's /metrics:
`promtool check metrics` and `promtool check rules` clean, every metric the alert rules and
the Grafana dashboard use exists, reason-labelled counters present at 0 from the start."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import agent.core.buildinfo as buildinfo
from agent import __version__
from agent.core.reasons import AGGREGATE_EVENTS, CLOCK_EVENTS, DROP_REASONS, REJECT_REASONS
from tests.helpers import AgentFactory

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "alerts.yml"
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
# Series Prometheus makes itself, not the agent.
FROM_PROMETHEUS = {"up"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus); CI installs it")
    return found


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def names_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression (ours and the process collector's)."""
    return set(re.findall(r"\b((?:edge_agent|process)_[a-z0-9_]+|up)\b", expr))


def rule_exprs() -> list[str]:
    # Each rule's `expr:` (one line, or a folded block after `expr: >`).
    exprs, lines = [], RULES.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*expr:\s*(.*)$", line)
        if not m:
            continue
        expr = m.group(1)
        if expr in (">", "|"):
            indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
            body = []
            for follow in lines[i + 1 :]:
                if len(follow) - len(follow.lstrip()) < indent or not follow.strip():
                    break
                body.append(follow.strip())
            expr = " ".join(body)
        exprs.append(expr)
    return exprs


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var.get("definition"):
            exprs.append(var["definition"])
    return exprs


def test_metrics_of_a_fresh_agent(agents: AgentFactory) -> None:
    started = time.time()
    agent = agents.start()
    text = scrape(agent.health_port)
    families = {f.name: f for f in text_string_to_metric_families(text)}

    (info,) = families["edge_agent_build_info"].samples
    assert info.name == "edge_agent_build_info" and info.value == 1
    # The commit as the agent saw it at its start ("-dirty" comes and goes with local edits).
    assert info.labels["version"] == __version__
    assert info.labels["commit"].removesuffix("-dirty") == buildinfo.commit().removesuffix("-dirty")
    assert info.labels["commit"] != buildinfo.UNKNOWN  # a checkout knows its commit
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    assert "process_cpu_seconds" in families
    start = families["edge_agent_start_time_seconds"].samples[0].value
    assert started - 30 < start <= time.time()
    # Timestamps, not ages with -1: 0 until the first success.
    assert families["edge_agent_forward_last_success_timestamp_seconds"].samples[0].value == 0
    assert "edge_agent_forward_last_success_age_seconds" not in families
    assert families["edge_agent_forward_failing_since_timestamp_seconds"].samples[0].value == 0
    assert families["edge_agent_ready"].samples[0].value == 1
    # Skew as gauges, not a histogram rebuilt per scrape.
    assert families["edge_agent_cameras_clock_skew_max_abs_seconds"].type == "gauge"
    assert not any(f.type == "histogram" and "skew" in name for name, f in families.items())
    for name in ("cameras_silent", "cameras_active", "outbox_dead_letters"):
        assert families[f"edge_agent_{name}"].type == "gauge"
        assert families[f"edge_agent_{name}"].samples[0].value == 0

    def labelled(family: str, label: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in families[family].samples if label in s.labels}

    assert labelled("edge_agent_messages_rejected", "reason") == dict.fromkeys(REJECT_REASONS, 0)
    assert labelled("edge_agent_dropped", "reason") == dict.fromkeys(DROP_REASONS, 0)
    assert labelled("edge_agent_aggregate_events", "kind") == dict.fromkeys(AGGREGATE_EVENTS, 0)
    assert labelled("edge_agent_clock_events", "kind") == dict.fromkeys(CLOCK_EVENTS, 0)

    lint = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0 and lint.stdout.strip() == "", lint.stdout + lint.stderr


def test_every_reason_the_code_counts_is_listed_so_it_shows_at_0() -> None:
    """A literal `rejects["x"]`, `drops["x"]` or `counters["x"]` in agent/ must be in
    agent/core/reasons.py, and so are the reasons the topic router, decoder and caps return."""
    source = "\n".join(p.read_text() for p in (ROOT / "agent").rglob("*.py"))
    counted = set(re.findall(r'(?:rejects|drops|counters)\["([a-z_]+)"\]', source))
    intake = "\n".join(
        (ROOT / "agent" / f).read_text() for f in ("intake/ingest.py", "windows/aggregate.py")
    )
    counted |= set(re.findall(r'return "([a-z_]+)"(?:, None)?$', intake, flags=re.M))
    counted |= set(re.findall(r'reason = "([a-z_]+)"', intake))
    known = set(REJECT_REASONS) | set(DROP_REASONS) | set(AGGREGATE_EVENTS) | set(CLOCK_EVENTS)
    assert counted - known == set()


def test_shipped_rules_and_dashboard_are_valid_and_use_only_live_metrics(
    agents: AgentFactory,
) -> None:
    tool = promtool()
    check = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    rules = rule_exprs()
    assert len(rules) == len(re.findall(r"^\s*- alert:", RULES.read_text(), flags=re.M))
    for alert in ("EdgeAgentDown", "EdgeAgentNotReady", "EdgeAgentBacklogOld",
                  "EdgeAgentDeadLetters", "EdgeAgentCamerasSilent", "EdgeAgentCameraClockSuspect",
                  "EdgeAgentOutboxNearFull", "EdgeAgentCloudUnreachable"):  # fmt: skip
        assert f"- alert: {alert}\n" in RULES.read_text()

    live = sample_names(scrape(agents.start().health_port))
    used = set().union(*(names_in(e) for e in rules + dashboard_exprs()))
    assert used, "no metric names found in the rules and the dashboard"
    missing = used - live - FROM_PROMETHEUS
    assert missing == set(), f"used by monitoring/ but not in a live /metrics: {sorted(missing)}"

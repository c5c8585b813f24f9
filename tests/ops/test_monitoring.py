"""Metrics hygiene and the shipped monitoring, against a live agent's /metrics:
`promtool check metrics` and `promtool check rules` clean, every metric the alert rules and
the Grafana dashboard use exists, reason-labelled counters present at 0 from the start.
The rules' unit tests (monitoring/alerts_test.yml, `promtool test rules`) pass and cover every
alert, and the dashboard's queries, evaluated by promtool over the agent's own exposition for
two gateways, answer for the chosen gateway only, by its gateway_id."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import agent.core.buildinfo as buildinfo
from agent import __version__
from agent.app.service import build_pipeline
from agent.config.settings import BufferSettings, Settings
from agent.core.reasons import AGGREGATE_EVENTS, CLOCK_EVENTS, DROP_REASONS, REJECT_REASONS
from agent.durable.outbox import Outbox
from agent.ops.metrics import render
from tests.helpers import AgentFactory

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "alerts.yml"
RULE_TESTS = ROOT / "monitoring" / "alerts_test.yml"
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
OPERATING = ROOT / "docs" / "operating.md"
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
    # Which gateway this is, for a central Prometheus where every gateway's local scrape says
    # instance="127.0.0.1:9108" (docs/operating.md joins it onto every series).
    assert info.labels["gateway_id"] == "gw-test"
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


# --- The alert rules' unit tests -------------------------------------------------------------


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)\s*$", RULES.read_text(), flags=re.M)


def rule_test_cases() -> list[tuple[str, bool]]:
    """(alertname, fires) for each `alert_rule_test` case of alerts_test.yml: fires when the
    case expects alerts with their annotations, not when it expects `exp_alerts: []`."""
    cases = []
    for case in re.split(r"^\s*- eval_time:", RULE_TESTS.read_text(), flags=re.M)[1:]:
        name = re.search(r"^\s*alertname:\s*(\S+)\s*$", case, flags=re.M)
        quiet = re.search(r"^\s*exp_alerts:\s*\[\]\s*$", case, flags=re.M) is not None
        fires = re.search(r"^\s*exp_annotations:", case, flags=re.M) is not None
        assert name is not None and quiet != fires, f"unreadable case in {RULE_TESTS}: {case}"
        cases.append((name.group(1), fires))
    return cases


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    alerts = alert_names()
    assert len(alerts) == len(set(alerts)) == len(rule_exprs())
    assert re.search(r"^rule_files:\n\s+- alerts\.yml$", RULE_TESTS.read_text(), flags=re.M)
    cases = rule_test_cases()
    fire = {name for name, fires in cases if fires}
    quiet = {name for name, fires in cases if not fires}
    assert [a for a in alerts if a not in fire] == [], "no case where it fires, annotated"
    assert [a for a in alerts if a not in quiet] == [], "no case where it stays quiet"
    assert {name for name, _ in cases} - set(alerts) == set(), "a case for no alert"


def test_alert_rules_unit_tests_pass() -> None:
    """`promtool test rules`: each alert fires when it should, with the exact text of its
    annotations (a `$value` reads as the figure the text names), and only then."""
    run = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


# --- The dashboard, evaluated over the agent's own /metrics ----------------------------------

# Two gateways as a central Prometheus sees them: their own instance, gateway_id only in
# edge_agent_build_info. The dashboard is looked at with the first one chosen.
GATEWAYS = {"gw-a": "gateway-a:9108", "gw-b": "gateway-b:9108"}
CHOSEN, OTHER = "gw-a", "gw-b"


async def exposition(tmp_path: Path, gateway_id: str) -> str:
    """What the agent's /metrics says for this gateway_id (rendered in process)."""
    settings = Settings(
        gateway_id=gateway_id, buffer=BufferSettings(path=tmp_path / f"{gateway_id}.sqlite3")
    )
    outbox, recovery = await Outbox.open(settings.buffer.path)
    transport = httpx.MockTransport(lambda request: httpx.Response(500))  # never called
    try:
        async with httpx.AsyncClient(transport=transport) as http:
            return render(await build_pipeline(settings, outbox, recovery, http)).decode()
    finally:
        await outbox.close()


def input_series(text: str, instance: str, samples: int) -> list[dict[str, str]]:
    """promtool input series for each sample of an exposition, scraped as job "edge-agent":
    counters (and histogram buckets, counts, sums) grow by 1 a step, the rest stay put."""
    out = []
    for family in text_string_to_metric_families(text):
        grows = family.type in ("counter", "histogram", "summary")
        for s in family.samples:
            labels = {**s.labels, "job": "edge-agent", "instance": instance}
            selector = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
            step = "+1" if grows and not s.name.endswith("_created") else ""
            out.append(
                {"series": f"{s.name}{{{selector}}}", "values": f"{s.value!r}{step}x{samples}"}
            )
    return out


def panel_targets() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every query of every panel."""
    doc = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t["expr"], t.get("legendFormat", ""))
        for p in doc["panels"]
        for t in p.get("targets", [])
    ]


def for_gateway(expr: str, gateway: str) -> str:
    """The query Grafana sends with the `gateway` variable set to one gateway."""
    sent = expr.replace("${gateway}", gateway).replace("$gateway", gateway)
    assert "$" not in sent, f"a dashboard variable the test does not know: {expr}"
    return sent


def test_the_dashboard_has_a_gateway_variable_and_a_version_panel_that_shows_the_version() -> None:
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    gateway = variables["gateway"]
    assert gateway["definition"] == "label_values(edge_agent_build_info, gateway_id)"
    assert gateway["query"]["query"] == gateway["definition"]
    assert "instance" not in variables  # 127.0.0.1:9108 on every gateway with a local scraper
    for title, expr, _ in panel_targets():
        assert '{gateway_id=~"$gateway"}' in expr, f"{title}: not filtered by the gateway"
    # Every per-gateway query joins gateway_id from build_info (the series do not carry it).
    joined = "* on(instance) group_left(gateway_id) edge_agent_build_info"
    for title, expr, _ in panel_targets():
        assert joined in expr or expr.startswith("edge_agent_build_info{"), title

    (version,) = [p for p in doc["panels"] if p["title"] == "Version"]
    (target,) = version["targets"]
    assert target["expr"] == 'edge_agent_build_info{gateway_id=~"$gateway"}'
    # A stat shows the value (1) unless told to show the series' name: the version label.
    assert version["type"] == "stat" and version["options"]["textMode"] == "name"
    assert "{{version}}" in target["legendFormat"]


def test_each_dashboard_query_answers_for_the_chosen_gateway_only(tmp_path: Path) -> None:
    """Each panel's query, run by Prometheus's engine (promtool) over what two agents' /metrics
    say: it has data for the chosen gateway, none when an unknown one is chosen, never the
    other gateway's series, and every label its legend names."""
    tool = promtool()
    steps, at = 30, "20m"
    series = []
    for gateway_id, instance in GATEWAYS.items():
        text = asyncio.run(exposition(tmp_path, gateway_id))
        (info,) = [
            s for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "edge_agent_build_info"
        ]  # fmt: skip
        assert info.labels["gateway_id"] == gateway_id
        series += input_series(text, instance, steps)

    checks = []
    for _, expr, legend in panel_targets():
        chosen = for_gateway(expr, CHOSEN)
        checks.append(f"absent({chosen})")  # data for the chosen gateway
        checks.append(for_gateway(expr, "no-such-gateway"))  # filtered by the variable
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            checks.append(f"({chosen}) and on({label}) vector(1)")  # a series without it
        for label in ("gateway_id", "instance"):  # the other gateway's series, or a mislabel
            checks.append(
                f'({chosen}) and on({label}) edge_agent_build_info{{gateway_id="{OTHER}"}}'
            )
    tests = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {"expr": c, "eval_time": at, "exp_samples": []} for c in checks
                ],
            }
        ],
    }
    path = tmp_path / "dashboard_test.yml"  # JSON is YAML
    path.write_text(json.dumps(tests, indent=1))
    run = subprocess.run(
        [tool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_documented_relabelling_is_a_valid_config_and_the_dashboards_join(
    tmp_path: Path,
) -> None:
    """docs/operating.md's recipe for gateways with a local Prometheus agent: promtool accepts
    it, it makes `instance` the gateway's id for the job the rules expect, and its join is the
    one the dashboard uses."""
    text = OPERATING.read_text()
    section = text[text.index("**Which gateway, centrally**") :]
    recipe = re.search(r"```yaml\n(.*?)```", section, flags=re.S)
    assert recipe is not None
    config = recipe.group(1)
    assert "job_name: edge-agent" in config and "target_label: instance" in config
    assert "* on(instance) group_left(gateway_id) edge_agent_build_info" in section
    assert "* on(instance) group_left(gateway_id) edge_agent_build_info" in DASHBOARD.read_text()
    path = tmp_path / "prometheus.yml"
    path.write_text(config)
    run = subprocess.run(
        [promtool(), "check", "config", "--agent", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr

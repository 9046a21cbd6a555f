"""What operators import from deploy/: the alert rules pass Prometheus's own promtool (`check rules`,
and `test rules` with series for each alert), every PromQL expression in the rules and the Grafana
dashboard parses, and every metric they query is one a running daemon exports."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
from conftest import Mana, serving
from procs import ROOT, free_port, until
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runner import metrics
from runner.journal import Journal
from runner.report import Thresholds, rating_trends

RULES = ROOT / "deploy" / "prometheus" / "persona-runner.rules.yaml"
RULES_TEST = ROOT / "tests" / "promtool" / "rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "persona-runner.json"
# Unpacked from Debian's prometheus package by the Makefile (`make test`, or `make .venv/promtool/promtool`).
PROMTOOL = ROOT / ".venv" / "promtool" / "promtool"
# Grafana's variables, as Grafana would put them in before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*"}


def promtool(*args: str) -> str:
    assert PROMTOOL.is_file(), f"{PROMTOOL} is missing: run `make .venv/promtool/promtool` (make test does)"
    done = subprocess.run([str(PROMTOOL), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def rule_expressions() -> dict[str, str]:
    """Each alert's `expr`, read from the rules file as written there: one line, or a `|` block."""
    exprs: dict[str, str] = {}
    lines = RULES.read_text().splitlines()
    alert = ""
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- alert: (\w+)$", line):
            alert = m[1]
        elif m := re.match(r"(\s*)expr: (.*)$", line):
            indent, value = len(m[1]), m[2]
            if value == "|":
                block: list[str] = []
                for following in lines[i + 1 :]:
                    if following.strip() and len(following) - len(following.lstrip()) <= indent:
                        break
                    block.append(following.strip())
                value = " ".join(block).strip()
            assert alert and alert not in exprs, f"expr without its own alert at line {i + 1}"
            exprs[alert] = value
    assert len(exprs) == RULES.read_text().count("- alert: ")
    return exprs


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panel_expressions(board: dict[str, Any]) -> dict[str, str]:
    """Each panel target's PromQL with Grafana's variables filled in, keyed by panel title and refId."""
    exprs: dict[str, str] = {}
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"an unknown Grafana variable in {panel['title']}: {expr}"
            exprs[f"{panel['title']} {target['refId']}"] = expr
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects; a selector without a name would hide one."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def exported_names(text: str) -> set[str]:
    """The names a scrape offers: each family's samples, and the sample names its type implies, so a
    labelled metric that has no child yet (only HELP and TYPE) counts too."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, []))
    return names


def test_promtool_checks_the_rules_and_each_alert_fires_only_on_its_series() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(rule_expressions())} rules found" in checked
    assert "SUCCESS" in promtool("test", "rules", str(RULES_TEST))
    # Each alert has a case where it fires and one where it stays quiet.
    cases = RULES_TEST.read_text()
    for alert in rule_expressions():
        fires = re.findall(rf"alertname: {alert}\n\s+eval_time: \S+\n\s+exp_alerts:\n\s+- exp_labels", cases)
        quiet = re.findall(rf"alertname: {alert}\n\s+eval_time: \S+.*\n\s+exp_alerts: \[\]", cases)
        assert fires and quiet, f"{alert}: fires in {len(fires)} cases, quiet in {len(quiet)}"


def test_the_dashboard_is_importable_with_any_prometheus_and_every_query_parses() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    # No data source is named by its uid anywhere: the variable is the only one.
    uids = re.findall(r'"uid": "([^"]*)"', DASHBOARD.read_text())
    assert set(uids) == {"${datasource}", board["uid"]}
    for where, expr in {**panel_expressions(board), **rule_expressions()}.items():
        assert metric_names(expr), where  # parses, and queries something


async def test_every_metric_the_dashboard_and_rules_query_is_exported_by_a_running_daemon(
    mana: Mana, tmp_path: Path
) -> None:
    board = dashboard()
    queried = {name for expr in panel_expressions(board).values() for name in metric_names(expr)}
    queried |= {name for expr in rule_expressions().values() for name in metric_names(expr)}
    for variable in board["templating"]["list"]:
        queried.update(re.findall(r"label_values\((\w+)", variable.get("definition", "")))

    def ok_ticks() -> float:
        text = generate_latest(metrics.REGISTRY).decode()
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "persona_ticks_total" and s.labels.get("outcome") == "ok"
        )

    before = ok_ticks()
    async with serving(mana.settings(tmp_path, tick_interval_ms=200, port=free_port())) as url:
        await until(lambda: ok_ticks() > before, what="one ok tick")
        async with httpx.AsyncClient() as client:
            scraped = (await client.get(f"{url}/metrics")).text
    missing = queried - exported_names(scraped)
    assert not missing, f"queried but not exported: {sorted(missing)}"
    # The budget gauges are there from the start, with a value, before anything sets them.
    assert {"persona_budget_spent_usd", "persona_budget_limit_usd", "persona_budget_exhausted"} <= {
        s.name for f in text_string_to_metric_families(scraped) for s in f.samples
    }


async def test_the_module_rating_gauges_are_the_reports_recent_means_and_flags(mana: Mana, tmp_path: Path) -> None:
    # Today, so the ticks' ratings fall in the report's recent period (it ends on today's UTC date).
    await mana.post("clock", {"now": datetime.now(UTC).replace(hour=9).isoformat()})
    settings = mana.settings(tmp_path, tick_interval_ms=200, port=free_port())
    async with serving(settings) as url:
        await until(lambda: len(httpx.get(f"{mana.sandbox.api_url}/__sandbox/feedback").json()) >= 5, what="ratings")
        # A rating reaches the API only after its tick's seal, whose transaction updated the rollup.
        journal = await Journal.open(settings.runner_state_path, own=False)
        try:
            trends = await rating_trends(journal, datetime.now(UTC).date(), Thresholds.of(settings))
        finally:
            await journal.close()
        async with httpx.AsyncClient() as client:
            scraped = (await client.get(f"{url}/metrics")).text
    samples = {
        (s.name, s.labels.get("module")): s.value for f in text_string_to_metric_families(scraped) for s in f.samples
    }
    rated = {m: t for m, t in trends.items() if t["recent_mean"] is not None}
    assert rated, trends
    for module, trend in rated.items():
        assert samples[("persona_module_rating_recent", module)] == pytest.approx(trend["recent_mean"])
        assert samples[("persona_module_rating_regression", module)] == (1.0 if trend["regression"] else 0.0)

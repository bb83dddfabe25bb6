"""The shipped Grafana dashboard: valid JSON, importable, and querying only real metrics.

Every PromQL expression (panel targets, annotations, template variables) may name only
metrics that the guard exports, so a renamed metric breaks this test rather than a panel.
With promtool available the expressions are also parsed as PromQL.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.sandbox import require

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_FILE = REPO_ROOT / "packaging" / "grafana" / "spaceguard-dashboard.json"
DATASOURCE_UID = "${DS_PROMETHEUS}"

GUARD_METRICS = frozenset(
    {
        "spaceguard_build_info",
        "spaceguard_dbus_connected",
        "spaceguard_config_last_reload_successful",
        "spaceguard_volume_up",
        "spaceguard_volume_avail_bytes",
        "spaceguard_volume_size_bytes",
        "spaceguard_volume_files_avail",
        "spaceguard_volume_files",
        "spaceguard_volume_fill_rate_bytes_per_second",
        "spaceguard_volume_seconds_to_pause",
        "spaceguard_volume_low",
        "spaceguard_migration_state",
        "spaceguard_migration_paused",
        "spaceguard_migration_paused_seconds",
        "spaceguard_migration_pause_info",
        "spaceguard_migration_failed",
        "spaceguard_migration_stalled",
        "spaceguard_migration_retries_total",
        "spaceguard_migration_last_progress_timestamp_seconds",
        "spaceguard_migration_transferred_bytes",
        "spaceguard_log_lines_total",
        "spaceguard_log_errors_total",
        "spaceguard_incidents_total",
        "spaceguard_incidents_open",
        "spaceguard_actions_total",
        "spaceguard_alerts_sent_total",
        "spaceguard_alerts_spooled",
        "spaceguard_alerts_oldest_spooled_age_seconds",
        "spaceguard_usage_bytes",
        "spaceguard_usage_growth_bytes_per_second",
        "spaceguard_usage_unexplained_bytes",
        "spaceguard_usage_reclaimable_bytes",
        "spaceguard_usage_scan_timestamp_seconds",
        "spaceguard_usage_scan_duration_seconds",
        "spaceguard_usage_scan_partial",
        "spaceguard_usage_scan_entries",
        "spaceguard_usage_scan_running",
        "spaceguard_usage_scans_total",
    }
)
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
# Grafana replaces these before the query reaches Prometheus.
GRAFANA_SUBSTITUTES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "$volume": ".*",
    "$account": ".*",
}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def all_expressions(dashboard: dict[str, Any]) -> list[str]:
    expressions = [
        target["expr"]
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    expressions += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        values_of = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        expressions.append(values_of.group(1) if values_of else query)
    return expressions


def metric_names(expression: str) -> set[str]:
    """The metric names an expression selects (a PromQL reading just deep enough for that)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 39
    assert dashboard["uid"] == "spaceguard"
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]


def test_dashboard_has_the_promised_rows() -> None:
    rows = [p["title"] for p in load_dashboard()["panels"] if p["type"] == "row"]
    assert rows == [
        "Volumes",
        "Migrations",
        "Actions on units",
        "Alert delivery",
        "Guard",
        "What fills the volumes",
    ]


def test_every_expression_names_only_guard_metrics() -> None:
    used: set[str] = set()
    for expression in all_expressions(load_dashboard()):
        names = metric_names(expression)
        assert names, f"no metric in {expression!r}"
        assert names <= GUARD_METRICS, f"unknown metric(s) {names - GUARD_METRICS}: {expression}"
        used |= names
    # Every exported metric has a place on the dashboard.
    assert used == GUARD_METRICS, f"not shown: {sorted(GUARD_METRICS - used)}"


def test_metric_name_reading_is_not_fooled() -> None:
    assert metric_names(
        'sum by (action, result) (increase(spaceguard_actions_total{instance=~"$x"}[5m])) > 0'
    ) == {"spaceguard_actions_total"}
    assert metric_names("time() - up offset 5m unless on(job) nope_total > 1e3") == {
        "up",
        "nope_total",
    }


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool not found (Debian package prometheus provides it)")
    assert promtool is not None
    rules = []
    for index, expression in enumerate(all_expressions(load_dashboard())):
        for variable, value in GRAFANA_SUBSTITUTES.items():
            expression = expression.replace(variable, value)
        rules.append(
            f"      - record: dashboard:expr{index}\n        expr: {json.dumps(expression)}"
        )
    rules_file = tmp_path / "dashboard-exprs.yml"
    rules_file.write_text("groups:\n  - name: dashboard\n    rules:\n" + "\n".join(rules) + "\n")
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""The shipped Prometheus alert rules: valid, unit-tested with promtool, and complete.

promtool comes from Debian's `prometheus` package. Under CI=true a missing promtool fails
these tests (the rules must be checked there); elsewhere it only skips them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = REPO_ROOT / "packaging" / "prometheus" / "spaceguard-rules.yml"
RULE_TESTS_DIR = REPO_ROOT / "tests" / "prometheus"
RUNBOOK_POINTERS = ("spaceguardctl", "journalctl -u", "df -h /space", "runbook scenario")


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (Debian package prometheus provides it)"
        if running_in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.test.yml"))


def alerting_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES_FILE.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_rules_accepts_the_rules_file() -> None:
    result = run_promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    test_files = rule_test_files()
    assert test_files, f"no *.test.yml in {RULE_TESTS_DIR}"
    result = run_promtool("test", "rules", *map(str, test_files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_both_firing_and_not_firing() -> None:
    alert_names = {rule["alert"] for rule in alerting_rules()}
    tested_firing: set[str] = set()
    tested_quiet: set[str] = set()
    for test_file in rule_test_files():
        document = yaml.safe_load(test_file.read_text())
        for test_group in document["tests"]:
            for case in test_group.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    tested_firing.add(case["alertname"])
                else:
                    tested_quiet.add(case["alertname"])
    assert alert_names - tested_firing == set(), "alerts never tested firing"
    assert alert_names - tested_quiet == set(), "alerts never tested not firing"
    assert (tested_firing | tested_quiet) - alert_names == set(), "tests of unknown alerts"


def test_every_alert_has_for_severity_and_actionable_annotations() -> None:
    rules = alerting_rules()
    assert len(rules) >= 14
    for rule in rules:
        name = rule["alert"]
        assert name.startswith("Spaceguard"), name
        assert rule.get("for"), f"{name}: no for:"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        description = annotations.get("description", "")
        # Descriptions must tell the on-call person what to run, not just what happened.
        assert any(pointer in description for pointer in RUNBOOK_POINTERS), name


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in alerting_rules()]
    assert len(names) == len(set(names))

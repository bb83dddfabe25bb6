"""The shipped Prometheus alert rules: valid, unit-tested with promtool, and complete.

promtool comes from Debian's `prometheus` package. Under CI=true a missing promtool fails
these tests (the rules must be checked there); elsewhere it only skips them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.sandbox import require

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = REPO_ROOT / "packaging" / "prometheus" / "spaceguard-rules.yml"
RULE_TESTS_DIR = REPO_ROOT / "tests" / "prometheus"
RUNBOOK_POINTERS = ("spaceguardctl", "journalctl -u", "df -h /space", "runbook scenario")
# The files are ours and regular, so a line-based reading is enough (and needs no YAML
# library in the test environment); promtool itself validates their real structure.
ALERT_RULE_START = re.compile(r"^\s*- alert: (\S+)\s*$", re.MULTILINE)
RULE_TEST_CASE_START = re.compile(r"^\s*- eval_time: ", re.MULTILINE)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} not found (Debian package prometheus provides it)")
    assert path is not None
    return path


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.test.yml"))


def alerting_rules() -> dict[str, str]:
    """Alert name -> the text of its rule."""
    text = RULES_FILE.read_text()
    starts = list(ALERT_RULE_START.finditer(text))
    rules = {}
    for index, match in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(text)
        assert match.group(1) not in rules, f"duplicate alert {match.group(1)}"
        rules[match.group(1)] = text[match.start() : end]
    return rules


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_rules_accepts_the_rules_file() -> None:
    result = run_promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerting_rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    test_files = rule_test_files()
    assert test_files, f"no *.test.yml in {RULE_TESTS_DIR}"
    result = run_promtool("test", "rules", *map(str, test_files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_both_firing_and_not_firing() -> None:
    alert_names = set(alerting_rules())
    tested_firing: set[str] = set()
    tested_quiet: set[str] = set()
    for test_file in rule_test_files():
        cases = RULE_TEST_CASE_START.split(test_file.read_text())[1:]
        for case in cases:
            alertname = re.search(r"^\s*alertname: (\S+)", case, re.MULTILINE)
            assert alertname is not None, f"{test_file}: a case without alertname"
            if re.search(r"^\s*exp_alerts: \[\]", case, re.MULTILINE):
                tested_quiet.add(alertname.group(1))
            else:
                assert re.search(r"^\s*- exp_labels:", case, re.MULTILINE), case
                tested_firing.add(alertname.group(1))
    assert alert_names - tested_firing == set(), "alerts never tested firing"
    assert alert_names - tested_quiet == set(), "alerts never tested not firing"
    assert (tested_firing | tested_quiet) - alert_names == set(), "tests of unknown alerts"


def test_every_alert_has_for_severity_and_actionable_annotations() -> None:
    rules = alerting_rules()
    assert len(rules) >= 14
    for name, rule in rules.items():
        assert name.startswith("Spaceguard"), name
        assert re.search(r"^\s*for: \d+[smh]\s*$", rule, re.MULTILINE), f"{name}: no for:"
        assert re.search(r"^\s*severity: (warning|critical)\s*$", rule, re.MULTILINE), name
        assert re.search(r"^\s*summary: \S", rule, re.MULTILINE), f"{name}: no summary"
        description = rule.partition("description:")[2]
        assert description.strip(), f"{name}: no description"
        # Descriptions must tell the on-call person what to run, not just what happened.
        assert any(pointer in description for pointer in RUNBOOK_POINTERS), name

"""The alert rules in ops/prometheus: valid (`promtool check rules`), passing their unit tests
(`promtool test rules`), every alert tested and carrying a runbook line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops_tools import ensure_binary

RULES_DIR = Path(__file__).resolve().parent.parent / "ops" / "prometheus"
RULES = RULES_DIR / "taskcache.rules.yml"
UNIT_TESTS = RULES_DIR / "tests" / "taskcache.test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    return ensure_binary("promtool", "prometheus")


def _run(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=RULES_DIR, capture_output=True, text=True,
                          timeout=300)


def _alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_rules_are_valid(promtool):
    done = _run(promtool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rules_pass_their_unit_tests(promtool):
    done = _run(promtool, "test", "rules", str(UNIT_TESTS.relative_to(RULES_DIR)))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_every_alert_has_a_runbook_and_a_unit_test_that_fires_it():
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case.get("exp_alerts")}
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if not case.get("exp_alerts")}
    for rule in _alerts():
        assert rule["annotations"].get("runbook"), rule["alert"]
        assert rule["labels"].get("severity"), rule["alert"]
        assert rule["alert"] in fired and rule["alert"] in quiet, rule["alert"]


def test_a_wrong_threshold_fails_the_unit_tests(promtool, tmp_path):
    """The unit tests pin the thresholds: moving one (hit rate 60 % -> 40 %) makes them fail."""
    (tmp_path / "tests").mkdir()
    changed = RULES.read_text().replace("cache:hit_ratio:rate5m < 0.60", "cache:hit_ratio:rate5m < 0.40")
    assert changed != RULES.read_text()
    (tmp_path / "taskcache.rules.yml").write_text(changed)
    (tmp_path / "tests" / "taskcache.test.yml").write_text(UNIT_TESTS.read_text())
    done = subprocess.run([promtool, "test", "rules", "tests/taskcache.test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "CacheHitRateLow" in done.stdout + done.stderr

"""The Prometheus alert rules: promtool accepts them, their unit tests pass, and every alert carries what
the on-call person needs (severity, summary, description, a runbook link into docs/)."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from kubeforge.serve.protocol import LATENCY_BUCKETS
from tests.dashboards import ALERT_RULES, REPO, dashboard_files, panel_queries, rule_expressions

pytestmark = pytest.mark.unit

RULE_TESTS = ALERT_RULES.parent / "tests" / "kubeforge-alerts.test.yml"
RUNBOOK = "docs/operations.md"
RUNBOOK_ANCHORS = {
    "serving-error-rate-high",
    "latency-slo-burn",
    "training-stalled",
    "stage-failed",
    "canary-rolled-back",
    "traffic-drift",
    "monitor-blind",
}
"""Sections docs/operations.md must have (GitHub's anchors of its headings, e.g. `## Serving error rate
high`): the alerts' runbook_url links point at them."""
ALERTS = {
    "KubeForgeServingErrorRateHigh",
    "KubeForgeLatencySLOBurn",
    "KubeForgeTrainingStalled",
    "KubeForgeStageFailed",
    "KubeForgeCanaryRolledBack",
    "KubeForgeTrafficDrift",
    "KubeForgeMonitorBlind",
}
SEVERITIES = {"critical", "warning"}
"""critical pages someone now, warning opens a ticket."""


def promtool() -> str:
    """Debian's promtool; `make test` installs it with prometheus, so its absence is a broken install."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool missing: `make test` installs Debian's prometheus package, which carries it")
    return found


def groups() -> list[dict[str, Any]]:
    return yaml.safe_load(ALERT_RULES.read_text())["groups"]


def alerts() -> list[dict[str, Any]]:
    return [rule for group in groups() for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(ALERT_RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts_exist_and_each_is_seen_firing_in_the_unit_tests() -> None:
    assert {rule["alert"] for rule in alerts()} == ALERTS
    fired = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == ALERTS
    # Both burn-rate windows (page and ticket) are tested by severity, not just by name.
    tested = RULE_TESTS.read_text()
    for burn in ("fast", "slow"):
        assert f"burn: {burn}" in tested


def test_every_alert_says_how_bad_what_and_where_to_look() -> None:
    for rule in alerts():
        name = rule["alert"]
        assert "for" in rule, f"{name}: no `for`"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{name}: no {key} annotation"
        url = annotations["runbook_url"]
        match = re.fullmatch(re.escape(RUNBOOK) + r"#(.+)", url)
        assert match, f"{name}: runbook_url {url!r} must point into {RUNBOOK}"
        assert match.group(1) in RUNBOOK_ANCHORS, f"{name}: anchor {match.group(1)!r} missing from RUNBOOK_ANCHORS"


def test_runbook_anchors() -> None:
    used = {rule["annotations"]["runbook_url"].partition("#")[2] for rule in alerts()}
    assert used == RUNBOOK_ANCHORS  # the list the docs work from names exactly what the alerts link
    for anchor in RUNBOOK_ANCHORS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", anchor), anchor
    docs = REPO / RUNBOOK
    if docs.exists():  # the runbook is written after the rules; from then on the links must resolve
        headings = {github_anchor(line) for line in docs.read_text().splitlines() if line.startswith("#")}
        missing = sorted(RUNBOOK_ANCHORS - headings)
        assert not missing, f"{RUNBOOK} lacks sections: {missing}"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def test_recording_rules_are_prefixed_and_apart_from_the_alerts() -> None:
    for group in groups():
        kinds = {"record" if "record" in rule else "alert" for rule in group["rules"]}
        assert len(kinds) == 1, f"group {group['name']} mixes recording and alerting rules"
        for rule in group["rules"]:
            if "record" in rule:
                assert rule["record"].startswith("kubeforge:"), rule["record"]


def test_le_matchers_are_real_bucket_boundaries() -> None:
    """`le="2.5"` selects nothing unless 2.5 is a boundary of the router's latency histogram: the SLO would
    then read as 100% missed (or as no data) without any error anywhere."""
    assert 2.5 in LATENCY_BUCKETS
    exprs = [expr for _, expr in rule_expressions()]
    exprs += [expr for path in dashboard_files() for _, expr in panel_queries(path)]
    boundaries = {str(b) for b in LATENCY_BUCKETS}
    for expr in exprs:
        for value in re.findall(r'le="([^"]*)"', expr):
            assert value in boundaries, f"le={value!r} is no bucket boundary of LATENCY_BUCKETS: {expr}"


def test_the_local_alertmanager_routes_to_the_loops_webhook() -> None:
    """infra/prometheus/alertmanager.yml is valid for Debian's Alertmanager and posts where `kubeforge serve`
    listens by default (spec.monitor.retrain.alertmanager)."""
    from kubeforge.monitor.webhook import PATH
    from kubeforge.spec.monitor import AlertmanagerTrigger

    config = REPO / "infra" / "prometheus" / "alertmanager.yml"
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.fail("amtool missing: `make test` installs Debian's prometheus-alertmanager, which carries it")
    checked = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (receiver,) = yaml.safe_load(config.read_text())["receivers"]
    (webhook,) = receiver["webhook_configs"]
    assert webhook["url"] == f"http://127.0.0.1:{AlertmanagerTrigger().port}{PATH}"
    prometheus = yaml.safe_load((REPO / "infra" / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]

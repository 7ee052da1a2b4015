"""The Grafana dashboards: well-formed, bound to the `datasource` variable, and every query valid PromQL over
metrics that KubeForge really exports (a renamed metric or a typo fails here, not on a blank panel)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboards import (
    ALERT_RULES,
    ANY,
    CONTROLLER_METRICS,
    OPERATOR_ROW,
    code_families,
    dashboard_files,
    known_series,
    load,
    metric_names,
    panel_queries,
    panels,
    recorded_names,
    rule_expressions,
    substitute,
    variable_queries,
)

pytestmark = pytest.mark.unit

EXPECTED = {"kubeforge-training.json", "kubeforge-serving.json", "kubeforge-rollout.json"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
LABEL_VARIABLES = {
    "kubeforge-training.json": {"pipeline", "stage"},
    "kubeforge-serving.json": {"model", "version", "variant"},
    "kubeforge-rollout.json": {"deployment", "model"},
}


def promtool() -> str:
    """Debian's promtool; `make test` installs it with prometheus, so its absence is a broken install."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool missing: `make test` installs Debian's prometheus package, which carries it")
    return found


def test_the_three_dashboards_ship() -> None:
    assert {path.name for path in dashboard_files()} == EXPECTED


@pytest.fixture(params=sorted(EXPECTED))
def dashboard(request: pytest.FixtureRequest) -> tuple[Path, dict[str, Any]]:
    path = next(p for p in dashboard_files() if p.name == request.param)
    return path, load(path)


def test_dashboard_identity(dashboard: tuple[Path, dict[str, Any]]) -> None:
    path, board = dashboard
    # A fixed uid keeps links and provisioning stable across re-imports.
    assert board["uid"] == path.stem
    assert board["title"].startswith("KubeForge / ")
    assert board["schemaVersion"] >= 39
    assert board["panels"]


def test_variables(dashboard: tuple[Path, dict[str, Any]]) -> None:
    path, board = dashboard
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    queried = {name for name, v in variables.items() if v["type"] == "query"}
    assert queried == LABEL_VARIABLES[path.name]
    for name in queried:
        assert variables[name]["datasource"] == DATASOURCE, f"{path.name}: variable {name}"
    # Each is label_values(selector, label); the selector's metric is checked with the panels' below.
    assert {name for name, _ in variable_queries(path)} == queried


def test_panels_use_the_datasource_variable_and_unique_ids(dashboard: tuple[Path, dict[str, Any]]) -> None:
    path, board = dashboard
    ids: list[int] = []
    for _row, panel in panels(board):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue  # a row has no queries of its own
        where = f"{path.name}: panel {panel.get('title')!r}"
        assert panel.get("title"), where
        assert panel.get("datasource") == DATASOURCE, where
        assert panel.get("targets"), where
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, f"{where}, target {target.get('refId')}"
            assert target.get("expr"), f"{where}, target {target.get('refId')}"
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"{path.name}: panel ids used twice: {duplicates}"


def test_ranges_follow_the_rate_interval(dashboard: tuple[Path, dict[str, Any]]) -> None:
    """A fixed `[1m]` breaks when the scrape interval grows; $__rate_interval adapts to it."""
    path, board = dashboard
    for _row, panel in panels(board):
        for target in panel.get("targets", []):
            ranges = re.findall(r"\[([^\]]*)\]", target["expr"])
            assert all(r == "$__rate_interval" for r in ranges), f"{path.name}: {panel['title']!r}: {ranges}"


def test_panel_queries_substitute_every_variable_and_descend_into_rows() -> None:
    training = next(p for p in dashboard_files() if p.name == "kubeforge-training.json")
    queries = panel_queries(training)
    assert all("$" not in expr and "[[" not in expr for _, expr in queries)
    titles = [title for title, _ in queries]
    assert "Quantization" in titles  # inside the collapsed row
    assert 'pipeline=~".+"' in dict(queries)["Optimizer step"]
    given = dict(panel_queries(training, {"pipeline": "quickstart", "stage": "pretrain"}))
    assert given["Optimizer step"] == 'kubeforge_train_step{pipeline=~"quickstart", stage=~"pretrain"}'

    rollout = next(p for p in dashboard_files() if p.name == "kubeforge-rollout.json")
    every = {title for title, _ in panel_queries(rollout)}
    served = {title for title, _ in panel_queries(rollout, exclude_rows={OPERATOR_ROW})}
    assert "Reconcile duration p95" in every - served
    assert "Candidate weight over time" in served


def test_substitute() -> None:
    assert substitute('rate(x{a=~"$model",b=~"${variant:regex}"}[$__rate_interval])') == (
        f'rate(x{{a=~"{ANY}",b=~"{ANY}"}}[1m])')
    assert substitute("[[model]] $__interval", {"model": "m"}) == "m 15s"
    with pytest.raises(ValueError, match="__unknown"):
        substitute("x[$__unknown]")


def every_query() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard panel and variable selector."""
    found = []
    for path in dashboard_files():
        board = load(path)
        for _row, panel in panels(board):
            for target in panel.get("targets", []):
                found.append((f"{path.name} / {panel['title']} / {target['refId']}", substitute(target["expr"])))
        found.extend((f"{path.name} / variable {name}", selector) for name, selector in variable_queries(path))
    return found


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule. One group per query, named after its dashboard
    and panel, because promtool names the group of an expression it cannot parse."""
    queries = every_query()
    groups = [{"name": f"{i}: {where}", "rules": [{"record": f"kubeforge:dashboard_check_{i}", "expr": expr}]}
              for i, (where, expr) in enumerate(queries)]
    rules = tmp_path / "dashboards.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True)
    if result.returncode != 0:
        bad = {int(i) for i in re.findall(r'group "(\d+): ', result.stdout + result.stderr)}
        shown = "\n".join(f"  {queries[i][0]}: {queries[i][1]}" for i in sorted(bad))
        pytest.fail(f"promtool rejects dashboard queries:\n{result.stdout}{result.stderr}\n{shown}")
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_metric_names_come_from_the_code() -> None:
    """Every metric the dashboards and the alert rules read is one the code (or, for the rollout
    controller and operator, CONTROLLER_METRICS) exports, or one of our recording rules."""
    allowed = known_series() | recorded_names()
    unknown = []
    for where, expr in [*every_query(), *((f"{ALERT_RULES.name} / {name}", e) for name, e in rule_expressions())]:
        unknown.extend(f"{where}: {name}" for name in sorted(metric_names(expr) - allowed))
    assert not unknown, "metrics that nothing exports:\n" + "\n".join(unknown)


def test_dashboards_read_raw_metrics_only() -> None:
    """A Prometheus scraping a laptop run has no recording rules loaded; the dashboards must work there."""
    recorded = [f"{where}: {name}" for where, expr in every_query() for name in metric_names(expr) if ":" in name]
    assert not recorded


def test_controller_metrics_match_the_registry() -> None:
    """Where kubeforge.metrics already registers a rollout or operator family, it has the name and type
    CONTROLLER_METRICS promises."""
    families = code_families()
    mismatched = {name: (kind, families[name]) for name, kind in CONTROLLER_METRICS.items()
                  if name in families and families[name] != kind}
    assert not mismatched, f"CONTROLLER_METRICS type != registered type: {mismatched}"


def test_metric_names_helper() -> None:
    expr = ('max by (pipeline, stage) (max_over_time(kubeforge_stage_state{kubeforge_stage_state="failed"}[10m])) == 1'
            ' unless on (pipeline, stage) (kubeforge_stage_state{kubeforge_stage_state=~"running"} == 1)'
            ' or histogram_quantile(0.95, sum(rate(kubeforge_serve_request_seconds_bucket[5m])) by (le))'
            ' or vector(1e3) or kubeforge:serve_requests:rate5m offset 5m')
    assert metric_names(expr) == {
        "kubeforge_stage_state", "kubeforge_serve_request_seconds_bucket", "kubeforge:serve_requests:rate5m"}
    # The check would see a typo.
    assert "kubeforge_serve_request_total" not in known_series()
    assert {"kubeforge_serve_requests_total", "kubeforge_rollout_analyses_total",
            "kubeforge_operator_reconcile_seconds_bucket", "kubeforge_stage_state"} <= known_series()

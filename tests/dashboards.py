"""The Grafana dashboards and alert rules as data: their PromQL with Grafana's variables filled in, and the
metric names KubeForge really exports, so tests can check one against the other.

Used by tests/unit/test_dashboards.py (syntax, names) and meant for live tests that scrape a running
deployment and ask Prometheus for every panel's query.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = REPO / "infra" / "grafana" / "dashboards"
ALERT_RULES = REPO / "infra" / "prometheus" / "rules" / "kubeforge-alerts.yml"

CONTROLLER_METRICS: dict[str, str] = {
    "kubeforge_rollout_candidate_weight": "gauge",
    "kubeforge_rollout_step": "gauge",
    "kubeforge_rollout_phase": "stateset",
    "kubeforge_rollout_analyses": "counter",
    "kubeforge_rollout_rollbacks": "counter",
    "kubeforge_rollout_promotions": "counter",
    "kubeforge_rollout_check_value": "gauge",
    "kubeforge_operator_reconciles": "counter",
    "kubeforge_operator_reconcile_seconds": "histogram",
    "kubeforge_operator_errors": "counter",
}
"""Metric families of the rollout controller and the operator, by prometheus_client type (counters without
their `_total`, as prometheus_client names them). They MUST match what the controller
(kubeforge.rollout.controller) and the operator register: the dashboards and alerts are checked against
this list, and where kubeforge.metrics.REGISTRY already defines one of them, the unit tests check that
the two agree."""

OPERATOR_ROW = "Operator"
"""Title of the rollout dashboard's row of operator panels: a live test of `kubeforge serve` has no
operator, so it passes `exclude_rows={OPERATOR_ROW}` to `panel_queries`."""
MONITOR_ROW = "Drift monitor and retraining loop"
"""Title of the rollout dashboard's row of monitor and loop panels: tests/integration/test_loop_turn.py
checks them against a deployment with spec.monitor.retrain; the other live tests exclude them."""

BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "datasource": ""}
"""Grafana's own variables with the values a test substitutes: `1m` is Grafana's $__rate_interval for a
15 s scrape interval (four scrapes), and the datasource only ever appears outside PromQL."""

ANY = ".+"
"""What a label variable becomes when the caller gives no value. The dashboards only use variables in
regex matchers (`model=~"$model"`), where this matches every series that has the label."""

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_SUFFIXES = {
    # How prometheus_client turns a family of each type into series names (`_created` is the
    # client's creation timestamp, exported by default).
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "stateset": ("",),
    "info": ("_info",),
}


def dashboard_files() -> list[Path]:
    """Every dashboard JSON file that ships, sorted."""
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: Mapping[str, Any]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """Every panel with the title of the row it sits under (None above the first row), rows included.

    A collapsed row holds its panels in its own `panels`; an expanded row's panels follow it at the top
    level, so the row a panel belongs to is the last row seen before it.
    """
    row: str | None = None
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            row = panel.get("title")
            yield row, panel
            for nested in panel.get("panels", []):
                yield row, nested
        else:
            yield row, panel


def substitute(expr: str, values: Mapping[str, str] | None = None) -> str:
    """`expr` with Grafana's variables replaced: the built-ins by BUILTIN_VARIABLES, any other variable by
    `values[name]` (inserted as it is, so a regex when the matcher is `=~`) or else by ANY."""
    given = values or {}

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name in given:
            return given[name]
        if name.startswith("__") and name not in BUILTIN_VARIABLES:
            raise ValueError(f"no test value for Grafana's built-in variable ${name} (in {expr!r})")
        return BUILTIN_VARIABLES.get(name, ANY)

    return _VARIABLE.sub(replace, expr)


def panel_queries(
    path: Path, values: Mapping[str, str] | None = None, exclude_rows: Collection[str] = ()
) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel of the dashboard at `path`, in order, with the
    variables substituted (see `substitute`). Panels under a row titled in `exclude_rows` are left out."""
    queries = []
    for row, panel in panels(load(path)):
        if row in exclude_rows:
            continue
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((panel.get("title", ""), substitute(target["expr"], values)))
    return queries


def queries_without_data(prometheus_url: str, queries: Iterable[tuple[str, str]], since: float) -> list[str]:
    """`title: expr` of each query with no data since `since`, asked as a Grafana panel asks: a range query.

    An instant query is not enough: one scrape that times out (a busy 2-core machine, a 1 s scrape
    interval) marks every series of its target stale, and a query at that moment finds nothing. The
    step is the scrape interval, so series that live only a few seconds are not stepped over.
    """
    empty = []
    for title, expr in queries:
        body = requests.get(f"{prometheus_url}/api/v1/query_range", timeout=10,
                            params={"query": expr, "start": since, "end": time.time(), "step": "1s"}).json()
        assert body["status"] == "success", (title, expr, body)
        if not body["data"]["result"]:
            empty.append(f"{title}: {expr}")
    return empty


def wait_for_panel_data(
    prometheus_url: str, queries: Iterable[tuple[str, str]], since: float, limit_s: float = 120
) -> list[str]:
    """`queries_without_data`, asked again every second until every query has data or `limit_s` has passed:
    what a test has just done reaches Prometheus only with the next scrape that succeeds."""
    queries = list(queries)
    deadline = time.monotonic() + limit_s
    while (empty := queries_without_data(prometheus_url, queries, since)) and time.monotonic() < deadline:
        time.sleep(1)
    return empty


def variable_queries(path: Path, values: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(variable name, the series selector of its `label_values(selector, label)` query) per query variable."""
    found = []
    for variable in load(path).get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else query or ""
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", text)
        if match is None:
            raise ValueError(f"{path.name}: variable {variable.get('name')!r} is not label_values(...): {text!r}")
        found.append((variable["name"], substitute(match.group(1), values)))
    return found


def rule_expressions(path: Path = ALERT_RULES) -> list[tuple[str, str]]:
    """(rule name: `record` or `alert`, PromQL) for every rule of a Prometheus rules file."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return [(rule.get("record") or rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def recorded_names(path: Path = ALERT_RULES) -> set[str]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def family_series(name: str, kind: str) -> set[str]:
    """The series names prometheus_client exports for a family `name` of type `kind`."""
    return {name + suffix for suffix in _SUFFIXES[kind]}


def code_families() -> dict[str, str]:
    """{family name: type} of what the code registers: kubeforge.metrics (runner, stages, rollout) and the
    serving router's registry (kubeforge.serve.protocol.Metrics, built from kubeforge.rollout.queries)."""
    from kubeforge.metrics import REGISTRY
    from kubeforge.serve.protocol import Metrics

    families = {}
    for registry in (REGISTRY, Metrics().registry):
        for family in registry.collect():
            families[family.name] = family.type
    return families


def known_series() -> set[str]:
    """Every series name a dashboard or rule may read: the code's and CONTROLLER_METRICS'."""
    families = {**CONTROLLER_METRICS, **code_families()}
    return {series for name, kind in families.items() for series in family_series(name, kind)}


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[a-zA-Z_:][\w:]*")
_NOT_METRICS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "atan2",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads.

    Not a parser, but enough for our own expressions: strings, label matchers and grouping label lists go
    first (label names such as `kubeforge_stage_state` would otherwise look like metrics); what remains
    that is neither a keyword nor followed by `(` (a function or aggregation) is a metric name.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    # The look-behind of _IDENTIFIER keeps the unit of a duration (`5m`) and an exponent (`1e3`) out.
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if word.lower() in _NOT_METRICS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names

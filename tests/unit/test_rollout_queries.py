"""The PromQL rollout decisions are made from: labels, windows, escaping, and that Prometheus parses it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubeforge.rollout.queries import (
    REQUESTS_TOTAL,
    ab_queries,
    builtin_queries,
    duration,
    label_value,
    selector,
)
from kubeforge.spec.deployment import ABRollout, Analysis

pytestmark = pytest.mark.unit

SEL = '{model="quickstart",version="4",variant="candidate"}'


def analysis(**settings: Any) -> Analysis:
    return Analysis.model_validate({"prometheus": "http://p:9090", **settings})


def ab(**settings: Any) -> ABRollout:
    return ABRollout.model_validate({"strategy": "ab", "candidate": "models:/quickstart/4",
                                     "prometheus": "http://p:9090", **settings})


def promtool() -> str:
    """Debian's promtool; `make test` installs it with prometheus, so its absence is a broken install."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool missing: `make test` installs Debian's prometheus package, which carries it")
    return found


def test_builtin_queries_select_the_candidate_over_the_window() -> None:
    queries = builtin_queries(
        analysis(window="2m", max_error_rate=0.02, max_p95_latency_s=1.0, max_p95_ttft_s=0.2), "quickstart", "4")
    assert list(queries) == ["error_rate", "p95_latency_s", "p95_ttft_s"]
    assert queries["error_rate"] == (
        '(sum(rate(kubeforge_serve_requests_total{model="quickstart",version="4",variant="candidate",status=~"5.."}[2m]))'
        " or vector(0))"
        f" / sum(rate(kubeforge_serve_requests_total{SEL}[2m]))"
    )
    assert queries["p95_latency_s"] == (
        f"histogram_quantile(0.95, sum by (le) (rate(kubeforge_serve_request_seconds_bucket{SEL}[2m])))")
    assert queries["p95_ttft_s"] == (
        f"histogram_quantile(0.95, sum by (le) (rate(kubeforge_serve_time_to_first_token_seconds_bucket{SEL}[2m])))")


def test_only_thresholds_that_are_set_get_a_query_and_custom_checks_are_filled_in() -> None:
    spec = analysis(max_error_rate=None, max_p95_latency_s=0.5, checks=[{
        "name": "tokens_per_s",
        "query": 'sum(rate(kubeforge_serve_generated_tokens_total{model="{model}",version="{version}",'
                 'variant="{variant}"}[5m]))',
        "min": 10,
    }])
    queries = builtin_queries(spec, "quickstart", "7", variant="stable")
    assert list(queries) == ["p95_latency_s", "tokens_per_s"]
    assert "[1m]" in queries["p95_latency_s"]  # the default window
    assert 'variant="stable"' in queries["p95_latency_s"]
    assert queries["tokens_per_s"] == (
        'sum(rate(kubeforge_serve_generated_tokens_total{model="quickstart",version="7",variant="stable"}[5m]))')


def test_label_values_are_escaped() -> None:
    assert label_value('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert selector('we"ird', "1", "candidate") == '{model="we\\"ird",version="1",variant="candidate"}'
    spec = analysis(checks=[{"name": "x", "query": 'up{model="{model}"}', "max": 1}])
    assert builtin_queries(spec, 'we"ird', "1")["x"] == 'up{model="we\\"ird"}'


def test_ab_queries_count_over_the_test_duration() -> None:
    errors = ab_queries(ab(metric="error_rate", duration_s=3600), "quickstart", "3", "stable")
    stable = '{model="quickstart",version="3",variant="stable"}'
    assert errors == {
        "errors": 'sum(increase(kubeforge_serve_requests_total{model="quickstart",version="3",variant="stable",'
                  'status=~"5.."}[3600s])) or vector(0)',
        "requests": f"sum(increase({REQUESTS_TOTAL}{stable}[3600s]))",
    }
    latency = ab_queries(ab(metric="latency", duration_s=90.5), "quickstart", "4", "candidate", end=1_700_000_000)
    assert latency == {
        "buckets": f"sum by (le) (increase(kubeforge_serve_request_seconds_bucket{SEL}[90500ms] @ 1700000000.000))"}
    ttft = ab_queries(ab(metric="ttft"), "quickstart", "4", "candidate")
    assert ttft == {"buckets": f"sum by (le) (increase(kubeforge_serve_time_to_first_token_seconds_bucket{SEL}[3600s]))"}


def test_durations() -> None:
    assert (duration(60), duration(60.0), duration(0.25)) == ("60s", "60s", "250ms")
    with pytest.raises(ValueError, match="positive number of seconds"):
        duration(0)


def test_prometheus_parses_every_query(tmp_path: Path) -> None:
    spec = analysis(max_p95_latency_s=1, max_p95_ttft_s=1, checks=[
        {"name": "in_flight", "query": 'max(kubeforge_serve_requests_in_flight{variant="{variant}"})', "max": 8}])
    queries = list(builtin_queries(spec, "quickstart", 'we"ird', "candidate").values())
    for metric in ("error_rate", "latency", "ttft"):
        queries.extend(ab_queries(ab(metric=metric), "quickstart", "4", "stable", end=1_700_000_000.5).values())
    rules = {"groups": [{"name": "rollout", "rules": [
        {"record": f"kubeforge:rollout_query_{i}", "expr": q} for i, q in enumerate(queries)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def series(metric: str, version: str, variant: str, values: str, **labels: str) -> dict[str, str]:
    extra = "".join(f',{k}="{v}"' for k, v in labels.items())
    return {"series": f'{metric}{{model="quickstart",version="{version}",variant="{variant}"{extra}}}', "values": values}


def test_queries_compute_the_right_numbers_in_prometheus(tmp_path: Path) -> None:
    """Real PromQL semantics on synthetic scrapes (`promtool test rules`): 15 s scrapes over 10 minutes."""
    bucket = "kubeforge_serve_request_seconds_bucket"
    inputs = [
        # candidate 4: 57 ok + 3 server errors per scrape (5%), and a 4xx that must not count.
        series(REQUESTS_TOTAL, "4", "candidate", "0+57x40", status="200"),
        series(REQUESTS_TOTAL, "4", "candidate", "0+3x40", status="503"),
        series(REQUESTS_TOTAL, "4", "candidate", "0+1x40", status="404"),
        # stable 3: no 5xx series at all, as before a router's first 5xx.
        series(REQUESTS_TOTAL, "3", "stable", "0+60x40", status="200"),
        # candidate latency: half under 0.1 s, all under 0.5 s.
        series(bucket, "4", "candidate", "0+50x40", le="0.1"),
        series(bucket, "4", "candidate", "0+100x40", le="0.5"),
        series(bucket, "4", "candidate", "0+100x40", le="+Inf"),
    ]
    spec = analysis(max_error_rate=0.01, max_p95_latency_s=1)
    candidate = builtin_queries(spec, "quickstart", "4", "candidate")
    stable = builtin_queries(spec, "quickstart", "3", "stable")
    nobody = builtin_queries(spec, "quickstart", "5", "candidate")  # a version without traffic yet
    ab_errors = ab_queries(ab(metric="error_rate", duration_s=300), "quickstart", "4", "candidate", end=300)
    ab_stable = ab_queries(ab(metric="error_rate", duration_s=300), "quickstart", "3", "stable", end=300)
    ab_latency = ab_queries(ab(metric="latency", duration_s=300), "quickstart", "4", "candidate", end=300)

    def one(value: float) -> list[dict[str, Any]]:
        return [{"labels": "{}", "value": value}]

    def micro(query: str) -> str:
        """promtool compares floats exactly: compare millionths."""
        return f"round(({query}) * 1e6)"

    expectations = [
        (micro(candidate["error_rate"]), one(49_180)),  # 3 / 61: a 4xx counts as a request, not an error
        (stable["error_rate"], one(0)),  # no 5xx series is a 0% error rate, not "no data"
        (nobody["error_rate"], []),  # no requests at all is no data
        (micro(candidate["p95_latency_s"]), one(460_000)),  # rank 95 of 100 lies 90% into the (0.1, 0.5] bucket
        (nobody["p95_latency_s"], []),
        # pinned at 300 s with `@`, though evaluated at 600 s: exactly the 20 scrape intervals of the test
        (ab_errors["errors"], one(60)),
        (ab_errors["requests"], one(61 * 20)),
        (ab_stable["errors"], one(0)),
        (ab_latency["buckets"], [{"labels": '{le="0.1"}', "value": 1000}, {"labels": '{le="0.5"}', "value": 2000},
                                 {"labels": '{le="+Inf"}', "value": 2000}]),
    ]
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "15s",
            "input_series": inputs,
            "promql_expr_test": [{"expr": q, "eval_time": "10m", "exp_samples": s} for q, s in expectations],
        }],
    }
    path = tmp_path / "test.yml"
    path.write_text(json.dumps(test))
    result = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

"""The serving metrics the router exports, and the PromQL that rollout decisions are made from.

Every series carries the labels `model`, `version` and `variant` ("stable" or "candidate"). Queries select
on all three: a variant name is reused by the next rollout, and a counter of the previous candidate
version can still be inside the query's range.
"""

from __future__ import annotations

import math

from kubeforge.rollout.decision import ERROR_RATE, P95_LATENCY, P95_TTFT
from kubeforge.spec.deployment import ABRollout, Analysis

REQUESTS_TOTAL = "kubeforge_serve_requests_total"
"""Counter, labels model, version, variant, status (the HTTP status code as a string)."""
REQUEST_SECONDS = "kubeforge_serve_request_seconds"
"""Histogram of whole-request latency."""
TTFT_SECONDS = "kubeforge_serve_time_to_first_token_seconds"
"""Histogram of time to first token."""
INTER_TOKEN_SECONDS = "kubeforge_serve_inter_token_seconds"
"""Histogram of the time between generated tokens."""
PROMPT_TOKENS_TOTAL = "kubeforge_serve_prompt_tokens_total"
GENERATED_TOKENS_TOTAL = "kubeforge_serve_generated_tokens_total"
REQUESTS_IN_FLIGHT = "kubeforge_serve_requests_in_flight"
"""Gauge."""

STABLE = "stable"
CANDIDATE = "candidate"
SERVER_ERRORS = '"5.."'
"""Status codes that count as errors: 5xx only, since a 4xx is the client's fault, not the candidate's."""

AB_HISTOGRAMS = {"latency": REQUEST_SECONDS, "ttft": TTFT_SECONDS}


def label_value(value: str) -> str:
    """A PromQL double-quoted string literal holding `value` (backslash, quote and newline escaped)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def selector(model: str, version: str, variant: str, *extra: str) -> str:
    """`{model="m",version="v",variant="candidate",...}` with `extra` matchers appended as given."""
    matchers = [f"model={label_value(model)}", f"version={label_value(version)}", f"variant={label_value(variant)}"]
    return "{" + ",".join([*matchers, *extra]) + "}"


def duration(seconds: float) -> str:
    """A PromQL range: whole seconds as "3600s", anything finer in milliseconds."""
    if seconds <= 0 or not math.isfinite(seconds):
        raise ValueError(f"a PromQL range must be a positive number of seconds (got {seconds})")
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{round(seconds * 1000)}ms"


def builtin_queries(analysis: Analysis, model: str, version: str, variant: str = CANDIDATE) -> dict[str, str]:
    """PromQL for every check of the analysis, keyed by check name (the keys `decision.judge` reads).

    Built-in checks appear only when their threshold is set; custom checks get `{model}`, `{version}` and
    `{variant}` replaced (by plain substitution: PromQL's own braces rule out `str.format`).
    """
    sel = selector(model, version, variant)
    errors = selector(model, version, variant, f"status=~{SERVER_ERRORS}")
    window = analysis.window
    queries: dict[str, str] = {}
    if analysis.max_error_rate is not None:
        # No 5xx series exists until the first 5xx (client libraries create a labelled series on first
        # use), and an empty numerator would make the ratio empty, i.e. "no data" on a healthy candidate.
        # `or vector(0)` makes it 0 then; with no requests at all the denominator stays empty: no data.
        queries[ERROR_RATE] = (
            f"(sum(rate({REQUESTS_TOTAL}{errors}[{window}])) or vector(0))"
            f" / sum(rate({REQUESTS_TOTAL}{sel}[{window}]))"
        )
    if analysis.max_p95_latency_s is not None:
        queries[P95_LATENCY] = _p95(REQUEST_SECONDS, sel, window)
    if analysis.max_p95_ttft_s is not None:
        queries[P95_TTFT] = _p95(TTFT_SECONDS, sel, window)
    for check in analysis.checks:
        queries[check.name] = (
            check.query.replace("{model}", _bare(model))
            .replace("{version}", _bare(version))
            .replace("{variant}", _bare(variant))
        )
    return queries


def ab_queries(policy: ABRollout, model: str, version: str, variant: str, end: float | None = None) -> dict[str, str]:
    """PromQL for the raw inputs of `kubeforge.rollout.stats` for one variant, over the test's `duration_s`.

    error_rate: {"errors", "requests"}, each one number (`compare_error_rates`); latency and ttft:
    {"buckets"}, one sample per `le` label (`compare_histograms`). With `end` (Unix seconds) the range
    is pinned with the `@` modifier, so a decision taken late (an operator restart) still sees exactly the
    test's window.
    """
    at = "" if end is None else f" @ {end:.3f}"
    rng = f"[{duration(policy.duration_s)}]{at}"
    sel = selector(model, version, variant)
    if policy.metric == "error_rate":
        errors = selector(model, version, variant, f"status=~{SERVER_ERRORS}")
        return {
            "errors": f"sum(increase({REQUESTS_TOTAL}{errors}{rng})) or vector(0)",
            "requests": f"sum(increase({REQUESTS_TOTAL}{sel}{rng}))",
        }
    return {"buckets": f"sum by (le) (increase({AB_HISTOGRAMS[policy.metric]}_bucket{sel}{rng}))"}


def _p95(histogram: str, sel: str, window: str) -> str:
    return f"histogram_quantile(0.95, sum by (le) (rate({histogram}_bucket{sel}[{window}])))"


def _bare(value: str) -> str:
    """`value` escaped for use inside the quotes a custom query already has around `{model}` etc."""
    return label_value(value)[1:-1]

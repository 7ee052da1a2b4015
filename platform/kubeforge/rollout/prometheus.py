"""Instant queries against a real Prometheus server, reduced to the numbers a rollout decides on.

An analysis needs one number per check: a query that returns nothing (no traffic yet, a series
not scraped yet) is `None`, which the decision treats as inconclusive rather than as a pass; a
query that returns several series is the author's mistake and says how to fix it.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from kubeforge.errors import KubeForgeError


class PrometheusError(KubeForgeError):
    """Prometheus could not be asked, or refused the query (bad PromQL names the query)."""


def query(base_url: str, promql: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The `data` of Prometheus's answer to an instant query (resultType and result), as it comes."""
    url = f"{base_url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        # Prometheus answers a bad query with 400 and a JSON error body.
        try:
            body = json.loads(exc.read())
        except ValueError:
            raise PrometheusError(f"Prometheus at {base_url} answered {exc.code} to {promql!r}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrometheusError(f"cannot reach Prometheus at {base_url} ({reason}); check analysis.prometheus") from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus refused {promql!r}: {body.get('errorType', 'error')}: {body.get('error')}")
    data: dict[str, Any] = body["data"]
    return data


def _number(raw: Any) -> float | None:
    value = float(raw)
    # 0/0 (no requests) is NaN: no data, not a value. +Inf is a value (x/0 with errors but no
    # requests counted yet, a custom query's overflow) that must fail a `max`, not wait as "no data".
    return None if math.isnan(value) else value


def query_value(base_url: str, promql: str, timeout_s: float = 10.0) -> float | None:
    """The single number `promql` evaluates to now, or None when it returns no data."""
    data = query(base_url, promql, timeout_s)
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":
        return _number(result[1])
    if kind != "vector":
        raise PrometheusError(f"{promql!r} returns a {kind}; an analysis needs an instant vector or a scalar")
    if not result:
        return None
    if len(result) > 1:
        raise PrometheusError(
            f"{promql!r} returns {len(result)} series; aggregate it to one number (sum, max, histogram_quantile)"
        )
    return _number(result[0]["value"][1])


def query_buckets(base_url: str, promql: str, timeout_s: float = 10.0) -> list[tuple[float, float]]:
    """(le, cumulative count) of a `sum by (le) (...)` histogram query, by ascending bound."""
    data = query(base_url, promql, timeout_s)
    if data["resultType"] != "vector":
        raise PrometheusError(f"{promql!r} returns a {data['resultType']}; expected the buckets of a histogram")
    buckets = []
    for series in data["result"]:
        bound = series["metric"].get("le")
        if bound is None:
            raise PrometheusError(f"{promql!r} returns series without an 'le' label; group it with sum by (le)")
        buckets.append((float(bound), float(series["value"][1])))
    return sorted(buckets)

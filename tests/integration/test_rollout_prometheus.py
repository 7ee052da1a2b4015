"""The rollout's Prometheus queries against Debian's real Prometheus scraping a live exporter."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from kubeforge.rollout.prometheus import PrometheusError, query_buckets, query_value
from tests.helpers import free_port, running_prometheus

pytestmark = pytest.mark.integration


def test_values_buckets_no_data_and_bad_queries(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    requests_total = Counter("demo_requests", "requests", ["variant", "status"], registry=registry)
    latency = Histogram("demo_latency_seconds", "latency", ["variant"], buckets=(0.1, 0.5, 1.0), registry=registry)
    for _ in range(9):
        requests_total.labels("candidate", "200").inc()
        latency.labels("candidate").observe(0.05)
    requests_total.labels("candidate", "503").inc()
    latency.labels("candidate").observe(0.7)
    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=registry)

    # The instant queries below read the exporter's current values; a scrape that missed the 1 s default
    # (a busy machine) would make its series stale and every query empty until the next one. These values
    # never change, so a 5 s scrape interval costs only the wait for the first scrape.
    with running_prometheus(tmp_path, port, scrape_interval_s=5) as url:
        share = 'sum(demo_requests_total{status=~"5.."}) / sum(demo_requests_total)'
        deadline = time.monotonic() + 60
        while query_value(url, share) is None:  # until the first scrape lands
            assert time.monotonic() < deadline, "Prometheus never scraped the exporter"
            time.sleep(0.5)
        assert query_value(url, share) == pytest.approx(0.1)
        assert query_value(url, "scalar(sum(demo_requests_total))") == 10
        # No series (a variant without traffic) and 0/0 are "no data", not zero.
        assert query_value(url, 'sum(demo_requests_total{variant="stable"})') is None
        assert query_value(url, 'sum(demo_requests_total{variant="stable"}) / 0') is None
        assert query_value(url, "sum(demo_requests_total) / 0") == float("inf")  # a value, which fails a max
        assert query_buckets(url, "sum by (le) (demo_latency_seconds_bucket)") == [
            (0.1, 9.0), (0.5, 9.0), (1.0, 10.0), (float("inf"), 10.0)
        ]
        with pytest.raises(PrometheusError, match="returns 2 series; aggregate it to one number"):
            query_value(url, "sum by (status) (demo_requests_total)")
        with pytest.raises(PrometheusError, match=r"Prometheus refused 'sum\(': bad_data"):
            query_value(url, "sum(")
    with pytest.raises(PrometheusError, match="cannot reach Prometheus at"):
        query_value(url, "up", timeout_s=2)

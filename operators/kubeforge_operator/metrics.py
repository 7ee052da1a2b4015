"""The operator's Prometheus metrics, on a registry of their own so /metrics shows only these: its
reconciliations, and the rollout and retraining-loop metrics its ModelDeployment reconciler sets
(`kubeforge.metrics`).

The names are a contract: the rollout dashboard (infra/grafana/dashboards/kubeforge-rollout.json)
queries them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import kopf
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import Metric

from kubeforge.metrics import LOOP_METRICS, ROLLOUT_METRICS

REGISTRY = CollectorRegistry(auto_describe=True)


class _Deployments:
    """The rollout controller's and the loop's metrics, which live in kubeforge.metrics' registry, on this one too."""

    def collect(self) -> Iterator[Metric]:
        for metric in (*ROLLOUT_METRICS, *LOOP_METRICS):
            yield from metric.collect()


REGISTRY.register(_Deployments())

RECONCILES = Counter(
    "kubeforge_operator_reconciles",
    "Reconciliations by kind and result (ok, retry, permanent, error).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "kubeforge_operator_reconcile_seconds",
    "Time one reconciliation takes, API calls included.",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ERRORS = Counter(
    "kubeforge_operator_errors",
    "Errors met while reconciling, by kind and type (the class of the underlying exception).",
    ["kind", "type"],
    registry=REGISTRY,
)


@contextmanager
def observed(kind: str) -> Iterator[None]:
    """Count and time one reconciliation of `kind`; a TemporaryError is a retry, not a failure."""
    start = time.monotonic()
    try:
        yield
    except kopf.TemporaryError as exc:
        RECONCILES.labels(kind, "retry").inc()
        # A retry caused by an error (an API conflict, a 5xx) counts as one; waiting out a delay does not.
        if exc.__cause__ is not None:
            ERRORS.labels(kind, type(exc.__cause__).__name__).inc()
        raise
    except kopf.PermanentError as exc:
        RECONCILES.labels(kind, "permanent").inc()
        ERRORS.labels(kind, type(exc.__cause__ or exc).__name__).inc()
        raise
    except Exception as exc:
        RECONCILES.labels(kind, "error").inc()
        ERRORS.labels(kind, type(exc).__name__).inc()
        raise
    else:
        RECONCILES.labels(kind, "ok").inc()
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - start)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """/metrics on `port` in a background thread (prometheus_client's own server)."""
    start_http_server(port, addr=addr, registry=REGISTRY)

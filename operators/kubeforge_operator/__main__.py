"""`python -m kubeforge_operator`: the operator as the Helm chart runs it (configuration: config.py).

It exits with status 2 and one line naming the variable when the configuration is invalid.
"""

from __future__ import annotations

import os
import sys

import kopf

from kubeforge_operator import handlers, metrics
from kubeforge_operator.config import ConfigError, OperatorConfig


def main() -> int:
    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # MLflow's client retries a failing request for minutes by default, and a reconciliation waiting on
    # it holds its object's lock; failing fast is better, as every MLflow call here is retried later.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    kopf.configure(log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.PLAIN)
    metrics.serve(config.metrics_port)
    kopf.run(
        registry=kopf.get_default_registry(),  # where importing `handlers` put them
        clusterwide=config.clusterwide,
        namespaces=config.namespaces,
        # With a peering object, kopf keeps one replica active and the others on standby; without one
        # the operator must run as a single replica.
        peering_name=config.peering,
        standalone=config.peering is None,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
        memo=kopf.Memo(config=config),
    )
    return 0


# Importing the handlers registers them; the name keeps the import from looking unused.
HANDLERS = handlers

if __name__ == "__main__":
    sys.exit(main())

"""The monitor of a deployment on a Ray cluster: `spec.monitor` served by the operator's RayService.

`kubeforge serve` runs the monitor in a thread of its own process (`kubeforge.monitor.runner`). On
Kubernetes nothing of KubeForge runs beside the RayService but the operator, whose image has no torch to
score prompts with, so the same `MonitorRunner` runs in a one-replica deployment of the application:

* its checks follow the capture's object-store prefix (`spec.capture.path`) and score prompts with the
  served version, which the replica downloads from $MLFLOW_TRACKING_URI like a variant replica;
* which version that is comes with its user_config (`{"version": "5"}`), which the operator changes when a
  rollout promotes its candidate, without restarting the replica;
* its metrics (`kubeforge_monitor_*`) reach Prometheus through the router's `/metrics`, which appends
  them: the pods' scrape already reads that endpoint, and the monitor needs no port of its own.

The operator reads the signals back from Prometheus to decide a turn of the loop
(`kubeforge_operator.loop`); this replica only computes and exports them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from ray import serve

from kubeforge import metrics
from kubeforge.errors import KubeForgeError
from kubeforge.monitor.check import Monitor
from kubeforge.monitor.runner import MonitorRunner
from kubeforge.serve.app import MONITOR_CPUS, MONITOR_DEPLOYMENT
from kubeforge.spec.monitor import MonitorSpec

logger = logging.getLogger("kubeforge.monitor")



class MonitorMetrics:
    """The monitor's metric families alone (a collector `generate_latest` takes): the router appends exactly
    these to its own, which share no name with them."""

    def collect(self) -> Any:
        for metric in metrics.MONITOR_METRICS:
            yield from metric.collect()


@serve.deployment(name=MONITOR_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": MONITOR_CPUS})
class MonitorServer:
    def __init__(self, deployment: str, monitor: dict[str, Any], model: str, capture: str | None,
                 prometheus: str | None) -> None:
        self.model = model
        self.version: str | None = None
        self.folder: tuple[str, Path] | None = None
        checks = Monitor(MonitorSpec.model_validate(monitor), model, capture, prometheus)
        self.runner = MonitorRunner(deployment, checks, self.served)
        self.thread = threading.Thread(target=self.runner.run, name=f"kubeforge-monitor-{deployment}", daemon=True)
        self.thread.start()

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.version = str(config["version"])

    def served(self) -> tuple[str, Path]:
        """The version the operator says is served, and its files (downloaded once per version)."""
        from kubeforge.serve.resolve import replica_model_folder

        if self.version is None:
            raise KubeForgeError("no served version in the Monitor deployment's user_config yet")
        if self.folder is None or self.folder[0] != self.version:
            self.folder = (self.version, replica_model_folder(f"models:/{self.model}/{self.version}", "transformers",
                                                              "cpu"))
        return self.folder

    def exposition(self) -> bytes:
        return generate_latest(MonitorMetrics())

    def __del__(self) -> None:
        self.runner.stop.set()

"""The monitor of a served deployment, in a thread of the serving process: a check every `interval_s`,
its signals exported to Prometheus (`kubeforge.metrics`: MONITOR_*).

Nothing here may interrupt serving: a check that fails is logged, and the thread goes on to the next
interval. A signal not computed at a check loses its series, so neither a dashboard nor an alert reads a
stale value; `kubeforge_monitor_blind` says when Prometheus itself could not be asked.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from kubeforge import metrics
from kubeforge.errors import KubeForgeError
from kubeforge.monitor.check import Monitor, Reading

logger = logging.getLogger("kubeforge.monitor")


class MonitorRunner:
    """`served()` says which version the stable variant serves now, and where its files are."""

    def __init__(self, deployment: str, monitor: Monitor, served: Callable[[], tuple[str, Path]]) -> None:
        self.deployment = deployment
        self.monitor = monitor
        self.served = served
        self.stop = threading.Event()
        self.last: Reading | None = None
        for name, threshold in monitor.spec.thresholds.items():
            metrics.MONITOR_THRESHOLD.labels(deployment, name).set(threshold)

    def run(self) -> None:
        """Check every `interval_s` until `stop` is set."""
        while not self.stop.is_set():
            self.check_once()
            self.stop.wait(self.monitor.spec.interval_s)

    @contextlib.contextmanager
    def running(self) -> Iterator[MonitorRunner]:
        """The checks in a thread of their own while the block runs."""
        thread = threading.Thread(target=self.run, name=f"kubeforge-monitor-{self.deployment}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            thread.join()

    def check_once(self, now: float | None = None) -> Reading | None:
        try:
            version, model_dir = self.served()
            reading = self.monitor.check(version, model_dir, now)
        except (KubeForgeError, OSError, ValueError) as exc:
            logger.warning("monitor of %s: check failed: %s", self.deployment, exc)
            return None
        self.export(reading)
        self.last = reading
        for signal in reading.crossed:
            logger.warning("monitor of %s: %s is %.4g, above its threshold %g", self.deployment, signal.name,
                           signal.value, signal.threshold)
        return reading

    def export(self, reading: Reading) -> None:
        computed = {s.name: s for s in reading.signals}
        for name, _ in self.monitor.spec.thresholds.items():
            if name in computed:
                metrics.MONITOR_SIGNAL.labels(self.deployment, name).set(computed[name].value)
            else:
                with contextlib.suppress(KeyError):  # never computed yet
                    metrics.MONITOR_SIGNAL.remove(self.deployment, name)
        metrics.MONITOR_WINDOW.labels(self.deployment, "reference").set(reading.reference_size)
        metrics.MONITOR_WINDOW.labels(self.deployment, "current").set(reading.current_size)
        metrics.MONITOR_BLIND.labels(self.deployment).set(1 if reading.blind else 0)
        metrics.MONITOR_LAST_CHECK.labels(self.deployment).set(reading.time)

"""The monitor of a served deployment, in a thread of the serving process: a check every `interval_s`,
its signals exported to Prometheus (`kubeforge.metrics`: MONITOR_*), and with `spec.monitor.retrain` a
turn of the loop when one is due and the guard rails allow it (`kubeforge.monitor.loop`).

Turns run in this same thread, so two never run at once: a trigger during a turn (a crossed signal, the
schedule, a person's request) is looked at again after it, where the cooldown meets it.

Nothing here may interrupt serving: a check that fails is logged, and the thread goes on to the next
interval. A signal not computed at a check loses its series, so neither a dashboard nor an alert reads a
stale value; `kubeforge_monitor_blind` says when Prometheus itself could not be asked.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kubeforge import metrics
from kubeforge.errors import KubeForgeError
from kubeforge.monitor.check import Monitor, Reading
from kubeforge.monitor.loop import LoopStore, Trigger, Turn, due_trigger, refusal

logger = logging.getLogger("kubeforge.monitor")

POLL_S = 1.0
"""How often the thread looks for a person's request for a turn between checks."""


class MonitorRunner:
    """`served()` says which version the stable variant serves now, and where its files are."""

    def __init__(self, deployment: str, monitor: Monitor, served: Callable[[], tuple[str, Path]],
                 loop: tuple[LoopStore, Turn] | None = None, say: Callable[[str], None] = logger.info) -> None:
        self.deployment = deployment
        self.monitor = monitor
        self.served = served
        self.loop = loop
        self.say = say
        self.stop = loop[1].stop if loop is not None else threading.Event()
        self.started = time.time()
        self.last: Reading | None = None
        self.requests: queue.SimpleQueue[Trigger] = queue.SimpleQueue()
        for name, threshold in monitor.spec.thresholds.items():
            metrics.MONITOR_THRESHOLD.labels(deployment, name).set(threshold)

    def run(self) -> None:
        """Check every `interval_s`, and look for requests for a turn every second, until `stop`."""
        next_check = time.time()
        while not self.stop.is_set():
            if time.time() >= next_check:
                self.check_once()
                next_check = time.time() + self.monitor.spec.interval_s
                self.consider(None)
            if self.loop is not None:
                for request in self.pending():
                    self.consider(request)
            self.stop.wait(POLL_S)

    def request(self, trigger: Trigger) -> None:
        """Ask for a turn from another thread (Alertmanager's webhook); taken within a second."""
        self.requests.put(trigger)

    def pending(self) -> list[Trigger]:
        """The requests waiting: a person's (`kubeforge loop trigger`) and the webhook's."""
        assert self.loop is not None
        waiting = [] if (request := self.loop[0].take_request()) is None else [request]
        while not self.requests.empty():
            waiting.append(self.requests.get())
        return waiting

    def consider(self, request: Trigger | None, now: float | None = None) -> None:
        """Run a turn when one is due (a request, a crossed signal, the schedule) and the guard rails allow."""
        if self.loop is None:
            return
        store, turn = self.loop
        now = time.time() if now is None else now
        turns = store.turns()
        crossed = {} if self.last is None else {s.name: s.value for s in self.last.crossed}
        since = (turns[-1].ended or self.started) if turns else self.started
        trigger = request or due_trigger(turn.retrain, crossed, since, now)
        if trigger is None:
            return
        refused = refusal(turn.retrain, turns, store.state(), now)
        if refused is not None:
            metrics.LOOP_REFUSED.labels(self.deployment, trigger.kind).inc()
            (self.say if request is not None else logger.info)(f"loop: {trigger.kind} trigger refused: {refused}")
            return
        number = len(turns) + 1
        self.say(f"loop: turn {number} starts ({trigger.kind}: {trigger.detail})")
        metrics.LOOP_TURN_RUNNING.labels(self.deployment).set(1)
        try:
            record = turn.run(trigger, number)
        finally:
            metrics.LOOP_TURN_RUNNING.labels(self.deployment).set(0)
        metrics.LOOP_TURNS.labels(self.deployment, record.outcome or "interrupted").inc()
        self.say(f"loop: turn {number} ended: {record.outcome} ({record.reason})")
        # The next check reads the served version's traffic afresh (a promotion starts a new reference).
        self.last = None

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

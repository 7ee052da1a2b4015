"""Progress from the Ray Train workers to the driver.

Workers push small dicts to a `ProgressHub` actor without waiting (fire-and-forget), so reporting
never slows a training step; the driver drains the hub from a background thread and turns the
messages into the progress bar, the Prometheus gauges and MLflow metrics. MLflow is only ever
called from the driver: workers may run on nodes that cannot reach the tracking server.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import ray

from kubeforge import metrics
from kubeforge.context import ProgressTask
from kubeforge.tracking import Tracker

STEP_FIELDS = ("event", "rank", "step", "train_loss", "lr", "tokens_per_second", "tokens")
"""What every step message carries; the rest are the recipe's own figures."""


@ray.remote(num_cpus=0)
class ProgressHub:
    """A mailbox. Zero CPUs so that it never takes a slot the training workers need."""

    def __init__(self) -> None:
        self._messages: list[dict[str, Any]] = []

    def push(self, message: dict[str, Any]) -> None:
        self._messages.append(message)

    def drain(self) -> list[dict[str, Any]]:
        messages, self._messages = self._messages, []
        return messages


class HubPoller:
    """Driver side: drains the hub every `interval` seconds on a daemon thread."""

    def __init__(
        self,
        hub: Any,
        tracker: Tracker,
        task: ProgressTask,
        pipeline: str,
        stage: str,
        max_steps: int,
        workers: int,
        log: Callable[[str], None],
        interval: float = 0.5,
    ) -> None:
        self.hub = hub
        self.tracker = tracker
        self.task = task
        self.labels = {"pipeline": pipeline, "stage": stage}
        self.max_steps = max_steps
        self.workers = workers
        # Step messages wait here until every worker has reported the step: the ranks' messages for
        # one step can arrive in different drains, and MLflow should get one point per step.
        self._pending: dict[int, dict[int, dict[str, Any]]] = {}
        self.log = log
        self.interval = interval
        self.restored_steps: list[int] = []
        self.evaluations: dict[int, tuple[float, float]] = {}
        self.last_step = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubeforge-pretrain-progress", daemon=True)

    def __enter__(self) -> HubPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is None:
            # Messages pushed just before the workers finished, and steps some rank never reported
            # (the workers of an attempt that failed mid-step).
            self.poll_once(flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
            except Exception as exc:  # re-raised by the stage after fit: a tracking failure fails the stage
                self.error = exc
                return

    def poll_once(self, flush: bool = False) -> None:
        messages = ray.get(self.hub.drain.remote())
        for message in messages:
            event = message["event"]
            if event == "step":
                self._pending.setdefault(message["step"], {})[message["rank"]] = message
            elif event == "eval":
                self._on_eval(message)
            elif event == "restored":
                self.restored_steps.append(int(message["step"]))
                self.log(f"{self.labels['stage']}: resumed from the checkpoint of step {message['step']}")
                self.tracker.log_metrics({"resumed_from_step": message["step"]}, step=message["step"])
        for step in sorted(self._pending):
            if flush or len(self._pending[step]) >= self.workers:
                self._on_step(step, self._pending.pop(step))

    def _on_step(self, step: int, by_rank: dict[int, dict[str, Any]]) -> None:
        any_rank = next(iter(by_rank.values()))
        metrics.TRAIN_STEP.labels(**self.labels).set(step)
        metrics.TRAIN_LOSS.labels(split="train", **self.labels).set(any_rank["train_loss"])
        metrics.TRAIN_LEARNING_RATE.labels(**self.labels).set(any_rank["lr"])
        metrics.TRAIN_TOKENS.labels(**self.labels).set(any_rank["tokens"])
        rates = []
        for rank, message in by_rank.items():
            metrics.TRAIN_TOKENS_PER_SECOND.labels(worker=str(rank), **self.labels).set(message["tokens_per_second"])
            rates.append(message["tokens_per_second"])
            if "mfu" in message:
                metrics.TRAIN_MFU.labels(worker=str(rank), **self.labels).set(message["mfu"])
        self.last_step = max(self.last_step, step)
        self.task.update(self.last_step, total=self.max_steps)
        logged = {"train_loss": any_rank["train_loss"], "lr": any_rank["lr"], "tokens_per_second": sum(rates)}
        # A recipe's own figures (`Recipe._step_extras`: MFU, the rl stage's reward, KL, entropy and response
        # length), averaged over the workers.
        for name in sorted({key for m in by_rank.values() for key in m} - set(STEP_FIELDS)):
            values = [float(m[name]) for m in by_rank.values() if name in m]
            logged[name] = sum(values) / len(values)
            if name != "mfu":  # MFU has its per-worker gauge
                metrics.TRAIN_STEP_METRIC.labels(metric=name, **self.labels).set(logged[name])
        self.tracker.log_metrics(logged, step=step)

    def _on_eval(self, message: dict[str, Any]) -> None:
        """`val_loss` and `val_perplexity` where the objective has them; other metrics (DPO's reward accuracy
        and margin, the reward model's accuracy and margin, the rl stage's rewards) go to MLflow as they come
        and to the `kubeforge_train_eval_metric` gauge."""
        step = int(message["step"])
        values = {k: float(v) for k, v in message.items() if k not in ("event", "step")}
        loss, perplexity = values.get("val_loss", math.nan), values.get("val_perplexity", math.nan)
        self.evaluations[step] = (loss, perplexity)
        if math.isfinite(loss):
            metrics.TRAIN_LOSS.labels(split="validation", **self.labels).set(loss)
            if math.isfinite(perplexity):
                metrics.TRAIN_PERPLEXITY.labels(split="validation", **self.labels).set(perplexity)
        for name, value in values.items():
            if name not in ("val_loss", "val_perplexity") and math.isfinite(value):
                metrics.TRAIN_EVAL_METRIC.labels(metric=name, **self.labels).set(value)
        self.tracker.log_metrics(values, step=step)
